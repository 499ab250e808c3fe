"""A GPT-style decoder-only Transformer built from keras-hub layers.

    token_ids (B, T) -> token embedding + learned position embedding -> dropout
      -> n_layers x keras_hub TransformerDecoder (pre-norm, causal self-attention)
      -> layer norm -> projection onto the vocabulary (tied to the embedding)
      -> logits (B, T, V)

The graph, constructor and config are TransformerBackbone's (models/backbone.py,
a keras_hub.models.Backbone); this module picks its embedding, blocks and output.
The model takes tensors only: it knows nothing of files, tokenizers or ranks.
"""

from __future__ import annotations

import keras
import keras_hub

from models.backbone import TransformerBackbone, initializer
from utils.config import ModelConfig

_init = initializer  # the name models/tensor_parallel.py and older code import


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class CausalTransformer(TransformerBackbone):
    """Decoder-only Transformer language model (a keras-hub Backbone).

    Arguments are TransformerBackbone's (models/backbone.py): vocabulary_size,
    num_layers, num_heads, hidden_dim, intermediate_dim, max_sequence_length,
    dropout, dtype. The blocks are keras-hub TransformerDecoders (causal
    self-attention, no cross-attention). Inputs are a dict: `token_ids` (int,
    B x T) and `padding_mask` (int/bool, B x T, 1 for real tokens). The output
    is next-token logits (B x T x V), projected by the token embedding.
    """

    token_embedding_class = keras.layers.ReversibleEmbedding  # also the output projection
    token_embedding_stddev = 0.01
    transformer_layer_class = keras_hub.layers.TransformerDecoder
    padding_mask_argument = "decoder_padding_mask"  # the causal mask is implied

    def _output(self, sequence: keras.KerasTensor) -> keras.KerasTensor:
        """Logits (B, T, V): weights tied to the input embedding."""
        return self.token_embedding(sequence, reverse=True)


def build_causal_lm(config: ModelConfig, vocabulary_size: int) -> CausalTransformer:
    """The causal LM described by the `model` section of a run's config."""
    return CausalTransformer.from_model_config(config, vocabulary_size, "causal_transformer")


def count_params(model: keras.Model) -> int:
    return int(sum(w.numpy().size for w in model.trainable_weights))
