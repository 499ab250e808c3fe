"""A BERT-style Transformer encoder from keras-hub layers, and its two heads.

    token_ids (B, T) -> token embedding + learned position embedding -> dropout
      -> n_layers x keras_hub TransformerEncoder (pre-norm, bidirectional)
      -> layer norm -> sequence (B, T, D)

`build_masked_lm` adds keras-hub's MaskedLMHead for pretraining; `build_classifier` pools the sequence (mean over
real tokens) into a dense softmax head for text classification. Both wrap
the same `EncoderBackbone` layer, named "encoder_backbone", so a classifier
can start from a pretrained encoder's weights.
"""

from __future__ import annotations

import keras
import keras_hub
from keras import ops

from models import dropout
from models.transformer import _init
from utils.config import ModelConfig

BACKBONE_NAME = "encoder_backbone"


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class EncoderBackbone(keras.Model):
    """Bidirectional Transformer encoder (functional, keras-hub layers).

    Args:
        vocabulary_size: int. Number of token ids.
        num_layers: int. Number of TransformerEncoder blocks.
        num_heads: int. Attention heads per block; must divide `hidden_dim`.
        hidden_dim: int. Width of the residual stream.
        intermediate_dim: int. Width of each block's feed-forward layer.
        max_sequence_length: int. Longest input (size of the position table).
        dropout: float. Dropout rate in embeddings, attention and feed-forward.

    Inputs: `token_ids` and `padding_mask` (B x T). Output: (B, T, hidden_dim).
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
        token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, embeddings_initializer=_init(0.02), name="token_embedding"
        )
        position_embedding = keras_hub.layers.PositionEmbedding(
            sequence_length=max_sequence_length, initializer=_init(0.02), name="position_embedding"
        )
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = token_embedding(token_ids)
        x = keras.layers.Add(name="embeddings_add")([x, position_embedding(x)])
        x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
        for i in range(num_layers):
            x = keras_hub.layers.TransformerEncoder(
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                dropout=dropout,
                activation="gelu",
                kernel_initializer=_init(0.02),
                normalize_first=True,
                name=f"transformer_layer_{i}",
            )(x, padding_mask=padding_mask)
        x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask}, outputs=x, **kwargs
        )
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.max_sequence_length = max_sequence_length
        self.dropout = dropout

    def get_config(self) -> dict:
        # Not chained to super(): this constructor rebuilds the layer graph.
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
    def from_config(cls, config: dict) -> EncoderBackbone:
        return cls(**config)


def build_backbone(config: ModelConfig, vocabulary_size: int) -> EncoderBackbone:
    dropout.use(config.dropout_masks)
    return EncoderBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=config.n_layers,
        num_heads=config.n_heads,
        hidden_dim=config.d_model,
        intermediate_dim=config.d_ff,
        max_sequence_length=config.seq_len,
        dropout=config.dropout,
        name=BACKBONE_NAME,
    )


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
        num_classes, kernel_initializer=_init(0.02), name="classification_head"
    )(pooled)
    return keras.Model(inputs, logits, name="classifier")
