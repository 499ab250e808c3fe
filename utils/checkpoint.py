"""Step checkpoints: model and optimizer variables plus the training position.

    <run_dir>/checkpoints/step-00000400/variables.npz   every model variable
                                                        (dropout RNG state too),
                                                        optimizer slot, and extra
                                                        arrays (the best epoch's
                                                        weights for early stopping)
    <run_dir>/checkpoints/step-00000400/state.json      epoch, step, data position...
    <run_dir>/checkpoints/latest                        name of the newest one

Each checkpoint directory is written under a temporary name and renamed
(never half-written), `latest` is replaced atomically after it, and only the
newest `keep` are kept. Rank 0 writes; on resume rank 0 reads and the others
receive the state by broadcast, so hosts need no shared filesystem.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils.errors import UserError
from utils.io import atomic_directory, atomic_write_text

LATEST = "latest"


def _paths(variables: Sequence) -> list[str]:
    return [getattr(v, "path", getattr(v, "name", str(i))) for i, v in enumerate(variables)]


def save(
    directory: str | pathlib.Path,
    step: int,
    variables: Sequence,
    state: dict[str, Any],
    keep: int,
    arrays: Sequence[np.ndarray] = (),
) -> pathlib.Path:
    """Write checkpoint `step-<step>` atomically and prune all but the newest `keep`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{step:08d}"
    if target.exists():  # e.g. the epoch end falls on a step interval: same content
        return target
    with atomic_directory(target) as tmp:
        values = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(variables)}
        values.update({f"a{i:05d}": np.asarray(a) for i, a in enumerate(arrays)})
        with open(tmp / "variables.npz", "wb") as f:
            np.savez(f, names=np.array(_paths(variables)), **values)
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    atomic_write_text(directory / LATEST, target.name + "\n")
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest(directory: str | pathlib.Path) -> pathlib.Path | None:
    """The newest complete checkpoint, or None."""
    directory = pathlib.Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = [p for p in sorted(directory.glob("step-*")) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def restore(
    checkpoint: str | pathlib.Path, variables: Sequence
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Assign the saved values to `variables` (same model and optimizer).

    Returns the saved state and the extra arrays.
    """
    checkpoint = pathlib.Path(checkpoint)
    with np.load(checkpoint / "variables.npz") as data:
        names = [str(n) for n in data["names"]]
        expected = _paths(variables)
        if len(names) != len(expected):
            raise UserError(
                f"{checkpoint}: holds {len(names)} variables, this model and optimizer have {len(expected)}; "
                "was the run's config changed?"
            )
        for i, (v, name) in enumerate(zip(variables, names, strict=True)):
            value = data[f"v{i:05d}"]
            if tuple(value.shape) != tuple(v.shape):
                raise UserError(
                    f"{checkpoint}: {name} has shape {value.shape}, the model expects {tuple(v.shape)}"
                )
            v.assign(value)
        arrays = [data[k] for k in sorted(k for k in data.files if k.startswith("a"))]
    return json.loads((checkpoint / "state.json").read_text()), arrays
