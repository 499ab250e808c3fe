"""The run directory: everything a run leaves behind, written by rank 0 only.

    config.json      resolved config, world size, global batch, versions, corpus hash
    history.csv      one row per epoch (Keras's CSVLogger; epochs counted from 0): loss,
                     accuracy, val_loss, val_accuracy, lr, tokens/s, times
    metrics.json     final metrics; later steps merge keys in, never drop them
    model.keras      the trained model
    tokenizer.model  the SentencePiece tokenizer the model was trained with
    preset.json      instead, for --init-from-preset: the preset's tokenizer and config
    data.json        the prepared dataset's meta.json (sizes, hashes)
    curves.png       loss and accuracy per epoch (utils/plots.py)
    best.keras       the model at its best epoch (by val_loss, or val_macro_f1 for classify)
    checkpoints/     step checkpoints (utils/checkpoint.py)
    tensorboard/     TensorBoard logs

Notebooks and plots read only these files.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import time
from typing import Any

from utils.config import Config, apply_nested, validate
from utils.errors import UserError
from utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from utils.presets import BUNDLE_NAME


def default_run_dir(preset: str, task: str) -> pathlib.Path:
    """runs/<date>-<time>-<task>-<preset>: a fresh directory for each run."""
    return pathlib.Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{task}-{preset}"


class RunDir:
    """Paths and atomic writers for one run's directory."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)

    config = property(lambda self: self.path / "config.json")
    history = property(lambda self: self.path / "history.csv")
    metrics = property(lambda self: self.path / "metrics.json")
    model = property(lambda self: self.path / "model.keras")
    # tokenizer.model (learned), or preset.json (a keras-hub preset's, utils/presets.py)
    tokenizer = property(
        lambda self: (
            self.path / BUNDLE_NAME
            if (self.path / BUNDLE_NAME).is_file()
            else self.path / "tokenizer.model"
        )
    )
    data_meta = property(lambda self: self.path / "data.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tensorboard")
    curves = property(lambda self: self.path / "curves.png")

    def create(self, resume: bool) -> None:
        """Make the directory; refuse to mix a new run into an old one."""
        if resume:
            if not self.config.is_file():
                raise UserError(f"--resume: {self.path} is not a run directory (no config.json)")
            return
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(
                f"{self.path} already holds a run; pass --resume to continue it or choose another --run-dir"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config, config)

    def read_config(self) -> dict[str, Any]:
        """config.json as written: the config, and the facts of the run (data, world, ...)."""
        if not self.config.is_file():
            raise UserError(f"{self.path}: not a run directory (no config.json)")
        try:
            record = json.loads(self.config.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.config}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise UserError(f'{self.config}: no "config" mapping; not a run\'s config.json')
        return record

    def load_config(self) -> Config:
        """The run's typed config, checked as the command line's is.

        An unknown or mistyped key, or a value the rules refuse, is a
        UserError naming config.json and the key.
        """
        config = Config()
        apply_nested(config, self.read_config()["config"], str(self.config))
        validate(config)
        return config

    def copy_data_files(self, tokenizer: pathlib.Path, meta: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / tokenizer.name, tokenizer.read_bytes())
        atomic_write_json(self.data_meta, meta)

    def read_history(self) -> list[dict[str, str]]:
        if not self.history.is_file():
            return []
        with open(self.history, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_history(self, epochs: int) -> None:
        """Keep the rows of the first `epochs` epochs (and no half-written line).

        A resumed run writes its interrupted epoch's row again.
        """
        if not self.history.is_file():
            return
        with open(self.history, newline="") as f:
            header, *rows = list(csv.reader(f)) or [[]]
        kept = [r for r in rows if len(r) == len(header) and r[0].isdigit() and int(r[0]) < epochs]
        if len(kept) != len(rows):
            buf = io.StringIO()
            csv.writer(buf).writerows([header, *kept])  # the excel dialect, as CSVLogger writes
            atomic_write_text(self.history, buf.getvalue())

    def merge_metrics(self, new: dict[str, Any]) -> dict[str, Any]:
        """Add `new` keys to metrics.json, keeping every key already there."""
        metrics = json.loads(self.metrics.read_text()) if self.metrics.is_file() else {}
        metrics.update(new)
        atomic_write_json(self.metrics, metrics)
        return metrics

    best_model = property(lambda self: self.path / "best.keras")

    def save_model(self, model) -> None:
        """model.keras, atomically (Keras writes a zip; a crash must not leave half of one)."""
        _save_atomically(model.save, self.path / ".model.tmp.keras", self.model)


def _save_atomically(save, tmp: pathlib.Path, target: pathlib.Path) -> None:
    """save(tmp), then rename onto target; on any failure remove tmp (nothing half-written)."""
    try:
        save(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
