"""Post-training weight quantization with Keras 3's `model.quantize(mode)`.

- int8: Dense, EinsumDense, Embedding and ReversibleEmbedding kernels become
  int8 with a float scale per output channel; activations are quantized on
  the fly (per row, abs-max) for the matmuls.
- int4: the same layers, weights packed two per byte (range -8..7).
- float8: Dense and EinsumDense only (e4m3 weights and inputs, e5m2
  gradients, with delayed scaling): a training format; embeddings stay float32.

Layers Keras does not quantize (LayerNormalization, keras-hub's
PositionEmbedding) keep float32 weights.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from utils.config import QUANTIZE_MODES as MODES
from utils.errors import UserError


def check_mode(mode: str) -> None:
    """UserError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise UserError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")


def quantize_model(model: Any, mode: str) -> dict[str, int]:
    """Quantize `model` in place; returns how many layers of each class were quantized.

    Raises UserError naming the mode when Keras cannot quantize this model
    (or quantizes nothing in it).
    """
    import warnings

    check_mode(mode)
    try:
        with warnings.catch_warnings():  # one per layer Keras leaves as it is (Softmax, ...)
            warnings.filterwarnings("ignore", category=UserWarning, module="keras.src.models")
            model.quantize(mode)
    except Exception as e:  # Keras raises NotImplementedError / ValueError
        raise UserError(
            f"--quantize {mode}: Keras cannot quantize this model ({type(e).__name__}: {e})"
        ) from None
    counts = quantized_layers(model)
    if not counts:
        raise UserError(f"--quantize {mode}: no layer of this model supports {mode}")
    return counts


def quantized_layers(model: Any) -> dict[str, int]:
    """Class name -> number of layers whose dtype policy carries a quantization mode."""
    counts: Counter[str] = Counter()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if getattr(layer.dtype_policy, "quantization_mode", None):
            counts[type(layer).__name__] += 1
    return dict(sorted(counts.items()))
