"""A GPT-style decoder-only Transformer built from keras-hub layers.

    token_ids (B, T) -> token embedding + learned position embedding -> dropout
      -> n_layers x keras_hub TransformerDecoder (pre-norm, causal self-attention)
      -> layer norm -> projection onto the vocabulary (tied to the embedding)
      -> logits (B, T, V)

The model takes tensors only: it knows nothing of files, tokenizers or ranks.
"""

from __future__ import annotations

import keras
import keras_hub

from models import dropout
from utils.config import ModelConfig


def _init(stddev: float = 0.02) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(stddev=stddev)


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class CausalTransformer(keras.Model):
    """Decoder-only Transformer language model (functional, keras-hub layers).

    Args:
        vocabulary_size: int. Number of token ids.
        num_layers: int. Number of TransformerDecoder blocks.
        num_heads: int. Attention heads per block; must divide `hidden_dim`.
        hidden_dim: int. Width of the residual stream.
        intermediate_dim: int. Width of each block's feed-forward layer.
        max_sequence_length: int. Longest input (size of the position table).
        dropout: float. Dropout rate in embeddings, attention and feed-forward.

    Inputs are a dict: `token_ids` (int, B x T) and `padding_mask` (int/bool,
    B x T, 1 for real tokens). The output is next-token logits (B x T x V).
    """

    def __init__(
        self,
        vocabulary_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        intermediate_dim: int,
        max_sequence_length: int,
        dropout: float = 0.0,
        **kwargs,
    ):
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        # === Layers ===
        token_embedding = keras.layers.ReversibleEmbedding(
            vocabulary_size, hidden_dim, embeddings_initializer=_init(0.01), name="token_embedding"
        )
        position_embedding = keras_hub.layers.PositionEmbedding(
            sequence_length=max_sequence_length, initializer=_init(0.02), name="position_embedding"
        )
        blocks = [
            keras_hub.layers.TransformerDecoder(
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                dropout=dropout,
                activation="gelu",
                kernel_initializer=_init(0.02),
                normalize_first=True,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = token_embedding(token_ids)  # (B, T, D)
        x = keras.layers.Add(name="embeddings_add")([x, position_embedding(x)])
        x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
        for block in blocks:
            x = block(x, decoder_padding_mask=padding_mask)  # causal mask is implied
        x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
        logits = token_embedding(x, reverse=True)  # (B, T, V), weights tied to the input embedding
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask}, outputs=logits, **kwargs
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.max_sequence_length = max_sequence_length
        self.dropout = dropout

    def get_config(self) -> dict:
        # Not chained to super(): a functional model's config is its layer graph,
        # which this constructor rebuilds from these arguments.
        return {
            "name": self.name,
            "trainable": self.trainable,
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "max_sequence_length": self.max_sequence_length,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: dict) -> CausalTransformer:
        return cls(**config)


def build_causal_lm(config: ModelConfig, vocabulary_size: int) -> CausalTransformer:
    """The causal LM described by the `model` section of a run's config."""
    dropout.use(config.dropout_masks)
    return CausalTransformer(
        vocabulary_size=vocabulary_size,
        num_layers=config.n_layers,
        num_heads=config.n_heads,
        hidden_dim=config.d_model,
        intermediate_dim=config.d_ff,
        max_sequence_length=config.seq_len,
        dropout=config.dropout,
        name="causal_transformer",
    )


def count_params(model: keras.Model) -> int:
    return int(sum(w.numpy().size for w in model.trainable_weights))
