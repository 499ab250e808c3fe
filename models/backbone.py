"""The shared base of the models/ backbones: one keras-hub `Backbone` graph, its config and checks.

CausalTransformer (models/transformer.py) and EncoderBackbone (models/encoder.py)
are the same functional graph up to their token embedding, blocks and output:

    token_ids (B, T) -> token embedding + learned position embedding -> dropout
      -> num_layers x keras-hub Transformer block (pre-norm) -> layer norm -> output

`TransformerBackbone` builds that graph from the class attributes a subclass
sets, and keeps the constructor arguments as config. keras_hub.models.Backbone,
its base, adds `name`, `trainable` and `dtype` to that config and supplies
`from_config`, the `token_embedding` property and `save_to_preset` /
`from_preset`.

The classes of the layers and their order decide where model.keras keeps each
weight, and other modules find the layers by name ("token_embedding",
"transformer_layer_0", "final_norm"...): changing either breaks files saved
before (tests/fixtures/saved_before_backbone holds some).
"""

from __future__ import annotations

import keras
import keras_hub

from models import dropout
from utils.config import ModelConfig


def initializer(stddev: float = 0.02) -> keras.initializers.Initializer:
    """The normal initializer of the embeddings and block kernels (GPT-2's and BERT's)."""
    return keras.initializers.RandomNormal(stddev=stddev)


def check_heads_divide(hidden_dim: int, num_heads: int) -> None:
    """ValueError unless `num_heads` divides `hidden_dim` (each head gets an equal slice)."""
    if hidden_dim % num_heads:
        raise ValueError(
            "`hidden_dim` must be divisible by `num_heads`. "
            f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
        )


class TransformerBackbone(keras_hub.models.Backbone):
    """Embeddings, `num_layers` keras-hub Transformer blocks and a final layer norm.

    Not used directly: a subclass sets the class attributes below and may
    override `_output`; constructor and config are the same for all.

    Args:
        vocabulary_size: int. Number of token ids.
        num_layers: int. Number of Transformer blocks.
        num_heads: int. Attention heads per block; must divide `hidden_dim`.
        hidden_dim: int. Width of the residual stream.
        intermediate_dim: int. Width of each block's feed-forward layer.
        max_sequence_length: int. Longest input (size of the position table).
        dropout: float. Dropout rate in embeddings, attention and feed-forward.
        dtype: None or a dtype policy (name) for every layer; None follows
            Keras's global policy.

    Inputs are a dict: `token_ids` (int, B x T) and `padding_mask` (int/bool,
    B x T, 1 for real tokens).
    """

    # The "token_embedding" layer: its class and its initializer's stddev.
    token_embedding_class: type[keras.layers.Embedding]
    token_embedding_stddev: float
    # The block (keras_hub.layers.TransformerEncoder or TransformerDecoder) and
    # the keyword under which its call takes the padding mask.
    transformer_layer_class: type[keras.layers.Layer]
    padding_mask_argument: str

    def __init__(
        self,
        vocabulary_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        intermediate_dim: int,
        max_sequence_length: int,
        dropout: float = 0.0,
        dtype: str | keras.DTypePolicy | None = None,
        **kwargs,
    ):
        check_heads_divide(hidden_dim, num_heads)
        # === Layers === (all made before the graph, in the order the causal LM made
        # them before this base, so its seeded initial weights are unchanged; the
        # encoder made each block as it wired it, so its seeded draws now differ)
        self.token_embedding, self.position_embedding = self.embeddings(
            vocabulary_size, hidden_dim, max_sequence_length, dtype=dtype
        )
        blocks = [
            self.transformer_layer_class(
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                dropout=dropout,
                activation="gelu",
                kernel_initializer=initializer(0.02),
                normalize_first=True,
                dtype=dtype,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.token_embedding(token_ids)  # (B, T, D)
        x = keras.layers.Add(dtype=dtype, name="embeddings_add")([x, self.position_embedding(x)])
        x = keras.layers.Dropout(dropout, dtype=dtype, name="embeddings_dropout")(x)
        for block in blocks:
            x = block(x, **{self.padding_mask_argument: padding_mask})
        x = keras.layers.LayerNormalization(epsilon=1e-5, dtype=dtype, name="final_norm")(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=self._output(x),
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.max_sequence_length = max_sequence_length
        self.dropout = dropout

    @classmethod
    def from_model_config(
        cls, config: ModelConfig, vocabulary_size: int, name: str
    ) -> TransformerBackbone:
        """The backbone the `model` section of a run's config describes."""
        dropout.use(config.dropout_masks)
        return cls(
            vocabulary_size=vocabulary_size,
            num_layers=config.n_layers,
            num_heads=config.n_heads,
            hidden_dim=config.d_model,
            intermediate_dim=config.d_ff,
            max_sequence_length=config.seq_len,
            dropout=config.dropout,
            name=name,
        )

    @classmethod
    def embeddings(
        cls,
        vocabulary_size: int,
        hidden_dim: int,
        max_sequence_length: int,
        dtype: str | keras.DTypePolicy | None = None,
    ) -> tuple[keras.layers.Embedding, keras_hub.layers.PositionEmbedding]:
        """New "token_embedding" and "position_embedding" layers, as this class makes them.

        A classmethod so that a model holding the same weights in another
        graph (models/tensor_parallel.py) makes the very same layers.
        """
        token_embedding = cls.token_embedding_class(
            vocabulary_size,
            hidden_dim,
            embeddings_initializer=initializer(cls.token_embedding_stddev),
            dtype=dtype,
            name="token_embedding",
        )
        position_embedding = keras_hub.layers.PositionEmbedding(
            sequence_length=max_sequence_length,
            initializer=initializer(0.02),
            dtype=dtype,
            name="position_embedding",
        )
        return token_embedding, position_embedding

    def _output(self, sequence: keras.KerasTensor) -> keras.KerasTensor:
        """The model's output from the normed sequence (B, T, D): the sequence itself here."""
        return sequence

    def get_config(self) -> dict:
        # Backbone's config (name, trainable, dtype), not the functional layer graph:
        # the constructor rebuilds the graph from these arguments.
        config = super().get_config()
        dtype = config.get("dtype")
        if not (isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap"):
            # Unlike keras-hub, a plain policy is not saved: a model trained under
            # mixed_bfloat16 evaluates and serves in the loading process's policy
            # (float32 by default), as files saved before this class was a Backbone do.
            # A quantized model's per-layer map is kept: its weights need it.
            config.pop("dtype", None)
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "max_sequence_length": self.max_sequence_length,
                "dropout": self.dropout,
            }
        )
        return config
