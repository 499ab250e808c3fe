"""An encoder-decoder Transformer from keras-hub layers, on one shared vocabulary.

    encoder_token_ids (B, S) -> token embedding + encoder position embedding -> dropout
      -> n_layers x keras_hub TransformerEncoder (pre-norm, bidirectional) -> layer norm
      -> encoder output (B, S, D)
    decoder_token_ids (B, T) -> the same token embedding + decoder position embedding
      -> dropout -> n_layers x keras_hub TransformerDecoder (pre-norm, causal
      self-attention, cross-attention to the encoder output) -> layer norm
      -> projection onto the vocabulary (the token embedding, transposed)
      -> logits (B, T, V)

One token embedding serves the encoder's input, the decoder's input and the
output projection: sources and targets share the vocabulary. `encode` and
`decode` run the two halves apart (the same layers and weights as the
graph), so that generation encodes a source once and decodes token by token.
The model takes tensors only: it knows nothing of files, tokenizers or ranks.
"""

from __future__ import annotations

from typing import Any

import keras
import keras_hub

from models import dropout
from models.backbone import check_heads_divide, initializer
from utils.config import ModelConfig


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class Seq2SeqTransformer(keras_hub.models.Backbone):
    """Encoder-decoder Transformer (a keras-hub Backbone) with a tied, shared token embedding.

    Args:
        vocabulary_size: int. Number of token ids (sources and targets share them).
        num_layers: int. Transformer blocks in the encoder, and again in the decoder.
        num_heads: int. Attention heads per block; must divide `hidden_dim`.
        hidden_dim: int. Width of the residual stream.
        intermediate_dim: int. Width of each block's feed-forward layer.
        max_source_length: int. Longest encoder input (its position table).
        max_target_length: int. Longest decoder input (its position table).
        dropout: float. Dropout rate in embeddings, attention and feed-forward.
        dtype: None or a dtype policy (name) for every layer.

    Inputs are a dict: `encoder_token_ids`, `encoder_padding_mask` (B x S),
    `decoder_token_ids`, `decoder_padding_mask` (B x T); masks are 1 for real
    tokens. The output is next-token logits for the decoder (B x T x V).
    """

    def __init__(
        self,
        vocabulary_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        intermediate_dim: int,
        max_source_length: int,
        max_target_length: int,
        dropout: float = 0.0,
        dtype: str | keras.DTypePolicy | None = None,
        **kwargs,
    ):
        check_heads_divide(hidden_dim, num_heads)

        def block(kind: type[keras.layers.Layer], name: str) -> keras.layers.Layer:
            return kind(
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                dropout=dropout,
                activation="gelu",
                kernel_initializer=initializer(0.02),
                normalize_first=True,
                dtype=dtype,
                name=name,
            )

        # === Layers === (attributes, so that encode/decode can run them after the graph is built)
        self.token_embedding = keras.layers.ReversibleEmbedding(
            vocabulary_size,
            hidden_dim,
            embeddings_initializer=initializer(0.01),
            dtype=dtype,
            name="token_embedding",
        )
        self.halves = {}
        for half, length, kind in (
            ("encoder", max_source_length, keras_hub.layers.TransformerEncoder),
            ("decoder", max_target_length, keras_hub.layers.TransformerDecoder),
        ):
            self.halves[half] = {
                "position_embedding": keras_hub.layers.PositionEmbedding(
                    sequence_length=length,
                    initializer=initializer(0.02),
                    dtype=dtype,
                    name=f"{half}_position_embedding",
                ),
                "add": keras.layers.Add(dtype=dtype, name=f"{half}_embeddings_add"),
                "dropout": keras.layers.Dropout(
                    dropout, dtype=dtype, name=f"{half}_embeddings_dropout"
                ),
                "blocks": [block(kind, f"{half}_layer_{i}") for i in range(num_layers)],
                "final_norm": keras.layers.LayerNormalization(
                    epsilon=1e-5, dtype=dtype, name=f"{half}_final_norm"
                ),
            }

        # === Functional model ===
        inputs = {
            name: keras.Input(shape=(None,), dtype="int32", name=name)
            for name in (
                "encoder_token_ids",
                "encoder_padding_mask",
                "decoder_token_ids",
                "decoder_padding_mask",
            )
        }
        encoded = self.encode(inputs["encoder_token_ids"], inputs["encoder_padding_mask"])
        logits = self.decode(
            encoded,
            inputs["encoder_padding_mask"],
            inputs["decoder_token_ids"],
            inputs["decoder_padding_mask"],
        )
        super().__init__(inputs=inputs, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.dropout = dropout

    def _embed(self, half: str, token_ids: Any, training: bool | None) -> Any:
        layers = self.halves[half]
        x = self.token_embedding(token_ids)
        x = layers["add"]([x, layers["position_embedding"](x)])
        return layers["dropout"](x, training=training)

    def encode(self, token_ids: Any, padding_mask: Any, training: bool | None = None) -> Any:
        """The encoder output (B, S, D) of source ids (B, S) and their padding mask."""
        layers = self.halves["encoder"]
        x = self._embed("encoder", token_ids, training)
        for block in layers["blocks"]:
            x = block(x, padding_mask=padding_mask, training=training)
        return layers["final_norm"](x)

    def decode(
        self,
        encoder_output: Any,
        encoder_padding_mask: Any,
        token_ids: Any,
        padding_mask: Any,
        training: bool | None = None,
    ) -> Any:
        """Next-token logits (B, T, V) of decoder ids (B, T), attending to `encoder_output`."""
        layers = self.halves["decoder"]
        x = self._embed("decoder", token_ids, training)
        for block in layers["blocks"]:
            x = block(
                x,
                encoder_sequence=encoder_output,
                decoder_padding_mask=padding_mask,
                encoder_padding_mask=encoder_padding_mask,
                training=training,
            )
        return self.token_embedding(layers["final_norm"](x), reverse=True)

    def get_config(self) -> dict:
        # As models/backbone.py: the constructor's arguments, not the layer graph, and no
        # plain dtype policy (a run trained under mixed_bfloat16 loads in float32).
        config = super().get_config()
        dtype = config.get("dtype")
        if not (isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap"):
            config.pop("dtype", None)
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "max_source_length": self.max_source_length,
                "max_target_length": self.max_target_length,
                "dropout": self.dropout,
            }
        )
        return config


def build_seq2seq(config: ModelConfig, vocabulary_size: int) -> Seq2SeqTransformer:
    """The encoder-decoder the `model` section of a run's config describes.

    Sources are up to `seq_len` tokens; the decoder reads BOS and up to
    `target_len` target tokens.
    """
    dropout.use(config.dropout_masks)
    return Seq2SeqTransformer(
        vocabulary_size=vocabulary_size,
        num_layers=config.n_layers,
        num_heads=config.n_heads,
        hidden_dim=config.d_model,
        intermediate_dim=config.d_ff,
        max_source_length=config.seq_len,
        max_target_length=config.target_len + 1,
        dropout=config.dropout,
        name="seq2seq_transformer",
    )
