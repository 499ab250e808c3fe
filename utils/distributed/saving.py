"""`load_model`: rank 0 reads a saved model, every rank gets it (no shared filesystem needed)."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import keras

from utils.distributed import core
from utils.distributed.optimizer import make_distributed


def load_model(
    filepath: str | os.PathLike | None,
    custom_objects: dict[str, Any] | None = None,
    compile: bool = True,
) -> keras.Model:
    """The model saved at `filepath` on rank 0, on every rank; its optimizer made distributed.

    Rank 0 reads the file and broadcasts its bytes, so the other ranks need
    neither the file nor a shared filesystem (they may pass None). A compiled
    model's optimizer comes back as a DistributedOptimizer with its state
    (default settings: no compression, one backward pass per step), like
    Horovod's `hvd.load_model`.
    """
    data = pathlib.Path(filepath).read_bytes() if core.is_chief() else None
    data = core.broadcast_object(data, name="load_model")
    suffix = pathlib.Path(str(filepath)).suffix if filepath else ".keras"
    with tempfile.TemporaryDirectory() as tmp:
        local = pathlib.Path(tmp) / f"model{suffix or '.keras'}"
        local.write_bytes(data)
        model = keras.saving.load_model(local, custom_objects=custom_objects, compile=compile)
    optimizer = getattr(model, "optimizer", None)
    if compile and optimizer is not None:
        make_distributed(optimizer)
        model.train_function = None  # traced again with averaging
    return model
