"""A BERT-style Transformer encoder from keras-hub layers, and its two heads.

    token_ids (B, T) -> token embedding + learned position embedding -> dropout
      -> n_layers x keras_hub TransformerEncoder (pre-norm, bidirectional)
      -> layer norm -> sequence (B, T, D)

The graph, constructor and config are TransformerBackbone's (models/backbone.py,
a keras_hub.models.Backbone). `build_masked_lm` adds keras-hub's MaskedLMHead
for pretraining; `build_classifier` pools the sequence (mean over real tokens)
into a dense softmax head for text classification. Both wrap the same
`EncoderBackbone` layer, named "encoder_backbone", so a classifier can start
from a pretrained encoder's weights.
"""

from __future__ import annotations

import keras
import keras_hub
from keras import ops

from models.backbone import TransformerBackbone, initializer
from utils.config import ModelConfig

BACKBONE_NAME = "encoder_backbone"


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class EncoderBackbone(TransformerBackbone):
    """Bidirectional Transformer encoder (a keras-hub Backbone).

    Arguments are TransformerBackbone's (models/backbone.py): vocabulary_size,
    num_layers, num_heads, hidden_dim, intermediate_dim, max_sequence_length,
    dropout, dtype. The blocks are keras-hub TransformerEncoders. Inputs:
    `token_ids` and `padding_mask` (B x T). Output: (B, T, hidden_dim).
    """

    token_embedding_class = keras.layers.Embedding
    token_embedding_stddev = 0.02
    transformer_layer_class = keras_hub.layers.TransformerEncoder
    padding_mask_argument = "padding_mask"


def build_backbone(config: ModelConfig, vocabulary_size: int) -> EncoderBackbone:
    return EncoderBackbone.from_model_config(config, vocabulary_size, BACKBONE_NAME)


def build_masked_lm(backbone: EncoderBackbone) -> keras.Model:
    """Inputs token_ids, padding_mask, mask_positions (B, P) -> logits at those positions (B, P, V)."""
    inputs = {
        "token_ids": keras.Input(shape=(None,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input(shape=(None,), dtype="int32", name="padding_mask"),
        "mask_positions": keras.Input(shape=(None,), dtype="int32", name="mask_positions"),
    }
    sequence = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]})
    # An output projection of its own: tied to the token embedding, the head
    # would not survive model.save/load_model (it re-creates the embedding).
    head = keras_hub.layers.MaskedLMHead(
        vocabulary_size=backbone.vocabulary_size, intermediate_activation="gelu", name="mlm_head"
    )
    return keras.Model(
        inputs, head(sequence, mask_positions=inputs["mask_positions"]), name="masked_lm"
    )


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean of the sequence over real tokens: (B, T, D) and mask (B, T) -> (B, D)."""

    def call(self, sequence, padding_mask):
        mask = ops.expand_dims(ops.cast(padding_mask, sequence.dtype), -1)
        return ops.sum(sequence * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)


def build_classifier(
    backbone: EncoderBackbone, num_classes: int, dropout: float = 0.1
) -> keras.Model:
    """Inputs token_ids, padding_mask -> class logits (B, num_classes)."""
    inputs = {
        "token_ids": keras.Input(shape=(None,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input(shape=(None,), dtype="int32", name="padding_mask"),
    }
    sequence = backbone(inputs)
    pooled = MaskedMeanPooling(name="pooling")(sequence, inputs["padding_mask"])
    pooled = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=initializer(0.02), name="classification_head"
    )(pooled)
    return keras.Model(inputs, logits, name="classifier")
