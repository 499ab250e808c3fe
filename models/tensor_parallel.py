"""Megatron-style tensor-parallel decoder blocks and causal LM, equal in math to CausalTransformer.

One shard of a tensor group of T holds, in each block:

    x ─ LN1 (replicated) ─ copy ─ Q K V (column-parallel: H/T whole heads)
        ─ causal attention on its H/T heads ─ O (row-parallel: rows of its heads)
        ─ reduce (allreduce-sum) ─ + O bias (once) ─ dropout ─ + x
      ─ LN2 (replicated) ─ copy ─ FFN1 (column-parallel: F/T columns) ─ gelu
        ─ FFN2 (row-parallel: F/T rows) ─ reduce ─ + FFN2 bias (once) ─ dropout ─ + residual

`copy` and `reduce` are the conjugate collectives of
utils/distributed/tensor_parallel.py. Everything outside the blocks (token
and position embeddings, the final norm and the tied vocabulary head) is
replicated: every shard computes the full logits, so the loss needs no
collective. No vocabulary-parallel embedding or head is built: at this
project's sizes (vocabulary 4000 x width 256) the embedding is a small
share of the weights and splitting it would add two collectives per step.

The block follows keras-hub's TransformerDecoder as CausalTransformer
builds it (normalize_first=True, gelu, causal self-attention, no
cross-attention, biases everywhere, layer-norm epsilon 1e-5) and Keras's
MultiHeadAttention (query scaled by 1/sqrt(head_dim), masked softmax,
dropout on the attention probabilities). With the same full weights, the
logits of T shards equal CausalTransformer's to float rounding
(tests/test_tensor_parallel.py).

Dropout: the residual-stream dropouts must draw the same mask on every shard
of a tensor group (they act on replicated activations), so they share a
seed; the attention dropout acts on each shard's own heads and gets a seed
offset by the tensor rank. Data-parallel replicas get seeds offset by their
data rank, so that they draw different masks, as data-parallel ranks do in
train.py. Exactness against the T=1 model is tested with dropout 0; with
dropout, the tests check that the shards' replicated weights stay identical.

XLA (`xla=True`): Horovod ops have no XLA kernels, so a shard's train step
cannot be compiled whole; instead the compute between two collectives runs
as `tf.function(jit_compile=True)` segments (the backward of each is
compiled too), and only the collectives, the loss and the optimizer update
stay outside XLA:

    embed | LN1 | copy | QKV-attention-O | reduce | +bO-dropout-+x-LN2 | copy
          | FFN1-gelu-FFN2 | reduce | +b2-dropout-+x | ... | final norm-head

Exact, but off in training (train.py builds the shard with xla=False): on a
2-core AVX2 CPU at np=2, T=2 it measured 1 to 7% slower per step and about
10 s slower to start (docs/parallelism.md).

`shard_from_full` / `full_from_shards` convert between a full
CausalTransformer and the shards, so checkpoints and model.keras stay the
ordinary T=1 model.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from keras_hub.src.layers.modeling.transformer_layer_utils import (
    compute_causal_mask,
    merge_padding_and_attention_mask,
)

from models.transformer import CausalTransformer, _init
from utils.distributed.tensor_parallel import (
    TensorParallel,
    copy_to_tensor_group,
    gather_full_weights,
    reduce_from_tensor_group,
    shard_full_weights,
)
from utils.errors import UserError


def check_model_divides(num_heads: int, intermediate_dim: int, tensor: int) -> None:
    """UserError (one line) unless T divides the heads and the feed-forward width."""
    if num_heads % tensor:
        raise UserError(
            f"parallel.tensor={tensor} must divide model.n_heads={num_heads} "
            "(each shard holds whole heads)"
        )
    if intermediate_dim % tensor:
        raise UserError(f"parallel.tensor={tensor} must divide model.d_ff={intermediate_dim}")


def segments(layer: keras.layers.Layer, names: tuple[str, ...]) -> dict:
    """`layer._NAME_fn` for each name, compiled by XLA as a function of its own (its gradient
    too): the compute between two collectives, which must hold no Horovod op."""
    return {name: tf.function(getattr(layer, f"_{name}_fn"), jit_compile=True) for name in names}


def _run(layer: keras.layers.Layer, name: str, *args):
    """Segment `name` of `layer`: compiled when the layer's `xla` is on, else the plain function."""
    if layer.xla:
        return layer._segments[name](*args)
    return getattr(layer, f"_{name}_fn")(*args)


class TensorParallelDecoder(keras.layers.Layer):
    """One shard of a pre-norm decoder block: H/T heads and F/T feed-forward units.

    Args:
        intermediate_dim: full feed-forward width F (the shard holds F/T).
        num_heads: full number of heads H (the shard holds H/T).
        tp: this rank's tensor-parallel groups.
        dropout: rate of the attention, residual and feed-forward dropouts.
        reduce: False leaves out the row-parallel allreduce (a negative
            control for tests: the output is then wrong).
        seed: dropout seed, the same on every shard of the tensor group.
        xla: compile the compute between the collectives with XLA (see the
            module's docstring).
    """

    def __init__(
        self,
        intermediate_dim: int,
        num_heads: int,
        tp: TensorParallel,
        dropout: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        reduce: bool = True,
        seed: int = 0,
        xla: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_model_divides(num_heads, intermediate_dim, tp.tensor_size)
        self.xla = xla
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.tp = tp
        self.dropout = dropout
        self.reduce = reduce
        self.local_heads = num_heads // tp.tensor_size
        self.local_intermediate = intermediate_dim // tp.tensor_size
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="self_attention_layer_norm"
        )
        self.feedforward_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="feedforward_layer_norm"
        )
        self.attention_probs_dropout = keras.layers.Dropout(
            dropout, seed=seed + 1000 * (tp.tensor_rank + 1)
        )
        self.attention_dropout = keras.layers.Dropout(dropout, seed=seed + 1)
        self.feedforward_dropout = keras.layers.Dropout(dropout, seed=seed + 2)
        # The compute between collectives; XLA-compiled segments with xla=True.
        names = ("attention_in", "attention", "between", "feedforward", "out")
        self._segments = segments(self, names) if xla else {}

    def build(self, input_shape):
        hidden = input_shape[-1]
        if hidden % self.num_heads:
            raise UserError(f"model.n_heads={self.num_heads} must divide d_model={hidden}")
        self.head_dim = hidden // self.num_heads
        self.attention_norm.build(input_shape)
        self.feedforward_norm.build(input_shape)
        heads, width = (self.local_heads, self.head_dim), self.local_intermediate
        init, zeros = _init(0.02), "zeros"
        for name in ("query", "key", "value"):  # column-parallel
            setattr(self, f"{name}_kernel", self.add_weight((hidden, *heads), init, name=name))
            setattr(self, f"{name}_bias", self.add_weight(heads, zeros, name=f"{name}_bias"))
        # Row-parallel: this shard's rows; the bias is replicated and added after the sum.
        self.output_kernel = self.add_weight((*heads, hidden), init, name="attention_output")
        self.output_bias = self.add_weight((hidden,), zeros, name="attention_output_bias")
        self.ffn1_kernel = self.add_weight((hidden, width), init, name="ffn_intermediate")
        self.ffn1_bias = self.add_weight((width,), zeros, name="ffn_intermediate_bias")
        self.ffn2_kernel = self.add_weight((width, hidden), init, name="ffn_output")
        self.ffn2_bias = self.add_weight((hidden,), zeros, name="ffn_output_bias")
        self.built = True

    def _reduce(self, x):
        return reduce_from_tensor_group(x, self.tp) if self.reduce else x

    def call(self, x, padding_mask=None, training=None):
        # Collectives (and nothing else) between the segments.
        h = copy_to_tensor_group(_run(self, "attention_in", x), self.tp)
        partial = _run(self, "attention", h, padding_mask, training)
        x, h = _run(self, "between", self._reduce(partial), x, training)
        partial = _run(self, "feedforward", copy_to_tensor_group(h, self.tp))
        return _run(self, "out", self._reduce(partial), x, training)

    def _attention_in_fn(self, x):
        return self.attention_norm(x)

    def _attention_fn(self, h, padding_mask, training):
        """Causal self-attention on this shard's heads: its partial output, before the sum."""
        mask = merge_padding_and_attention_mask(h, padding_mask, None)
        batch, length = ops.shape(h)[0], ops.shape(h)[1]
        causal = compute_causal_mask(batch, length, length)
        mask = causal if mask is None else ops.minimum(mask, causal)
        q = ops.einsum("btd,dnh->btnh", h, self.query_kernel) + self.query_bias
        k = ops.einsum("btd,dnh->btnh", h, self.key_kernel) + self.key_bias
        v = ops.einsum("btd,dnh->btnh", h, self.value_kernel) + self.value_bias
        q = q * ops.cast(1.0 / math.sqrt(self.head_dim), q.dtype)
        scores = ops.einsum("bsnh,btnh->bnts", k, q)
        scores = ops.where(ops.expand_dims(ops.cast(mask, "bool"), 1), scores, -1e9)
        probs = self.attention_probs_dropout(ops.softmax(scores, axis=-1), training=training)
        attended = ops.einsum("bnts,bsnh->btnh", probs, v)
        return ops.einsum("btnh,nhd->btd", attended, self.output_kernel)

    def _between_fn(self, attention, residual, training):
        """The summed attention output joins the residual stream; LN2 of it."""
        x = self.attention_dropout(attention + self.output_bias, training=training) + residual
        return x, self.feedforward_norm(x)

    def _feedforward_fn(self, h):
        """FFN1 on this shard's columns, gelu, FFN2 on its rows: the partial output."""
        h = keras.activations.gelu(ops.matmul(h, self.ffn1_kernel) + self.ffn1_bias)
        return ops.matmul(h, self.ffn2_kernel)

    def _out_fn(self, feedforward, residual, training):
        return self.feedforward_dropout(feedforward + self.ffn2_bias, training=training) + residual


class TensorParallelCausalLM(keras.Model):
    """One shard of CausalTransformer: replicated embeddings, norm and head; sharded blocks.

    Same arguments as CausalTransformer, plus `tp` (this rank's groups),
    `reduce` and `xla` (see TensorParallelDecoder) and `seed` (dropout). Inputs and outputs are
    CausalTransformer's: a dict of `token_ids` and `padding_mask`, and the
    full logits (B x T x V) on every shard. Not meant to be saved: save the
    full model from `full_from_shards`.
    """

    def __init__(
        self,
        vocabulary_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        intermediate_dim: int,
        max_sequence_length: int,
        tp: TensorParallel,
        dropout: float = 0.0,
        reduce: bool = True,
        seed: int = 0,
        xla: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_model_divides(num_heads, intermediate_dim, tp.tensor_size)
        self.tp = tp
        self.xla = xla
        seed += 100_003 * tp.data_rank  # replicas draw different masks; shards the same
        self.config = dict(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            max_sequence_length=max_sequence_length,
            dropout=dropout,
        )
        self.token_embedding, self.position_embedding = CausalTransformer.embeddings(
            vocabulary_size, hidden_dim, max_sequence_length
        )
        self.embeddings_dropout = keras.layers.Dropout(dropout, seed=seed)
        self.blocks = [
            TensorParallelDecoder(
                intermediate_dim,
                num_heads,
                tp,
                dropout,
                reduce=reduce,
                seed=seed + 10 * (i + 1),
                xla=xla,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        self._segments = segments(self, ("embed", "head")) if xla else {}
        self.build_now()

    def build_now(self) -> None:
        """Create every weight (with one tiny forward pass) so they can be assigned at once.

        Without the XLA segments: nothing is compiled for this pass's shape.
        """
        ids = np.zeros((1, 2), "int32")
        layers = [self, *self.blocks]
        xla = [layer.xla for layer in layers]
        for layer in layers:
            layer.xla = False
        try:
            self({"token_ids": ids, "padding_mask": np.ones_like(ids)})
        finally:
            for layer, on in zip(layers, xla, strict=True):
                layer.xla = on

    def call(self, inputs, training=None):
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        x = _run(self, "embed", token_ids, training)
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask, training=training)
        return _run(self, "head", x)

    def _embed_fn(self, token_ids, training):
        x = self.token_embedding(token_ids)
        x = x + self.position_embedding(x)
        return self.embeddings_dropout(x, training=training)

    def _head_fn(self, x):
        return self.token_embedding(self.final_norm(x), reverse=True)


# --- full model <-> shards ---------------------------------------------------------


def weight_pairs(shard: TensorParallelCausalLM, full: CausalTransformer) -> list[tuple]:
    """(shard variable, full variable, split axis or None for replicated), for every weight."""
    pairs = [
        (shard.token_embedding.embeddings, full.get_layer("token_embedding").embeddings, None),
        (
            shard.position_embedding.position_embeddings,
            full.get_layer("position_embedding").position_embeddings,
            None,
        ),
        (shard.final_norm.gamma, full.get_layer("final_norm").gamma, None),
        (shard.final_norm.beta, full.get_layer("final_norm").beta, None),
    ]
    for block in shard.blocks:
        ref = full.get_layer(block.name)
        attention = ref._self_attention_layer
        for name, dense in (
            ("query", attention._query_dense),
            ("key", attention._key_dense),
            ("value", attention._value_dense),
        ):
            pairs.append((getattr(block, f"{name}_kernel"), dense.kernel, 1))  # (D, H, hd)
            pairs.append((getattr(block, f"{name}_bias"), dense.bias, 0))  # (H, hd)
        ffn1, ffn2 = ref._feedforward_intermediate_dense, ref._feedforward_output_dense
        pairs += [
            (block.output_kernel, attention._output_dense.kernel, 0),  # (H, hd, D)
            (block.output_bias, attention._output_dense.bias, None),
            (block.ffn1_kernel, ffn1.kernel, 1),  # (D, F)
            (block.ffn1_bias, ffn1.bias, 0),
            (block.ffn2_kernel, ffn2.kernel, 0),  # (F, D)
            (block.ffn2_bias, ffn2.bias, None),
            (block.attention_norm.gamma, ref._self_attention_layer_norm.gamma, None),
            (block.attention_norm.beta, ref._self_attention_layer_norm.beta, None),
            (block.feedforward_norm.gamma, ref._feedforward_layer_norm.gamma, None),
            (block.feedforward_norm.beta, ref._feedforward_layer_norm.beta, None),
        ]
    return pairs


def replicated_weights(shard: TensorParallelCausalLM) -> list:
    """The shard's variables that every shard of a tensor group holds in full.

    Embeddings, layer norms and the row-parallel biases: their gradients are
    the same on every shard, so they must stay bit-identical.
    """
    out = [
        shard.token_embedding.embeddings,
        shard.position_embedding.position_embeddings,
        shard.final_norm.gamma,
        shard.final_norm.beta,
    ]
    for block in shard.blocks:
        out += [block.output_bias, block.ffn2_bias]
        out += [block.attention_norm.gamma, block.attention_norm.beta]
        out += [block.feedforward_norm.gamma, block.feedforward_norm.beta]
    return out


def full_like(shard: TensorParallelCausalLM) -> CausalTransformer:
    """An (untrained) full CausalTransformer of the shard's shape."""
    return CausalTransformer(**shard.config, name="causal_transformer")


def build_shard(
    full: CausalTransformer,
    tp: TensorParallel,
    reduce: bool = True,
    seed: int = 0,
    xla: bool = False,
) -> TensorParallelCausalLM:
    """This rank's shard of `full`, holding its slice of `full`'s weights.

    `xla`: compile the compute between the collectives with XLA (compile the
    shard itself with jit_compile=False: its step holds Horovod ops).
    """
    shard = TensorParallelCausalLM(
        full.vocabulary_size,
        full.num_layers,
        full.num_heads,
        full.hidden_dim,
        full.intermediate_dim,
        full.max_sequence_length,
        tp,
        full.dropout,
        reduce=reduce,
        seed=seed,
        xla=xla,
        name="tensor_parallel_causal_lm",
    )
    shard_from_full(shard, full)
    return shard


def shard_from_full(shard: TensorParallelCausalLM, full: CausalTransformer) -> None:
    """Assign to `shard` its slice of `full`'s weights (whole heads, FFN columns and rows)."""
    pairs = weight_pairs(shard, full)
    slices = shard_full_weights(
        [f.numpy() for _, f, _ in pairs], [axis for _, _, axis in pairs], shard.tp
    )
    for (variable, _, _), value in zip(pairs, slices, strict=True):
        variable.assign(value)


def full_from_shards(
    shard: TensorParallelCausalLM, full: CausalTransformer | None = None
) -> CausalTransformer:
    """The full CausalTransformer (made, or `full` overwritten) from the shards of a tensor group.

    A collective: every shard of the group calls it. The result is the
    ordinary T=1 model, to save as model.keras or a checkpoint.
    """
    full = full_like(shard) if full is None else full
    pairs = weight_pairs(shard, full)
    arrays = gather_full_weights(
        [s.numpy() for s, _, _ in pairs], [axis for _, _, axis in pairs], shard.tp
    )
    for (_, variable, _), value in zip(pairs, arrays, strict=True):
        variable.assign(value)
    return full
