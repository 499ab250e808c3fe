"""keras-hub presets on disk: checked, hashed and bundled, without TensorFlow.

A preset (what `Backbone.save_to_preset` and `Tokenizer.save_to_preset`
write) is a directory: config.json (the backbone, Keras-serialized),
model.weights.h5, tokenizer.json, assets/tokenizer/* (vocabulary, merges)
and usually metadata.json (which keras-hub tasks fit the backbone).

A *bundle* is one JSON file, `preset.json`, holding every file of a preset
but its weights: the architecture and the tokenizer. Rank 0 makes it and
broadcasts it, so hosts without a shared filesystem (and without network
access) get the tokenizer and the model's shape; the weights follow by
Horovod's broadcast of rank 0's variables when training starts. The
prepared data and the run directory keep the bundle where a learned run
keeps tokenizer.model, so a run evaluates, generates and resumes without
the preset.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
from typing import Any

from utils.errors import UserError

BUNDLE_NAME = "preset.json"
BUNDLE_FORMAT = "keras-hub preset without weights, v1"
# The keras-hub task each of this project's tasks is built on.
HUB_TASKS = {"causal_lm": "CausalLM", "classify": "TextClassifier"}
_WEIGHT_SUFFIXES = (".weights.h5", ".weights.json", ".safetensors", ".h5")


def is_local(handle: str) -> bool:
    """A directory path rather than a keras-hub handle ("gpt2_base_en", "kaggle://...")."""
    if "://" in handle:
        return False
    return os.path.exists(handle) or "/" in handle or handle.startswith(".")


def _flag(handle: str) -> str:
    return f"--init-from-preset {handle}"


def read_config(root: pathlib.Path, handle: str) -> dict[str, Any]:
    """config.json of a local preset, checked to be a Keras-serialized backbone."""
    path = root / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{_flag(handle)}: {path} cannot be read as JSON ({e})") from None
    if not isinstance(config, dict) or "registered_name" not in config:
        raise UserError(
            f"{_flag(handle)}: {path} is not a keras-hub backbone config "
            '(no "registered_name"; write presets with Backbone.save_to_preset)'
        )
    return config


def check_local(handle: str, task: str) -> dict[str, Any]:
    """Check a local preset directory for `task` before anything is built; returns config.json.

    Raises UserError (one line) when the directory is missing, is not a
    preset, lacks its weights or tokenizer, or holds a backbone whose
    keras-hub tasks (metadata.json) do not include the one `task` needs.
    """
    root = pathlib.Path(handle)
    if not root.exists():
        raise UserError(f"{_flag(handle)}: no such directory")
    if not root.is_dir() or not (root / "config.json").is_file():
        raise UserError(
            f"{_flag(handle)}: not a keras-hub preset directory (no config.json; a preset is "
            "what Backbone.save_to_preset and Tokenizer.save_to_preset write)"
        )
    config = read_config(root, handle)
    if not (root / "model.weights.h5").is_file() and not (root / "model.weights.json").is_file():
        raise UserError(f"{_flag(handle)}: no model.weights.h5 (the backbone's weights)")
    if not (root / "tokenizer.json").is_file():
        raise UserError(
            f"{_flag(handle)}: no tokenizer.json (save the tokenizer with "
            "Tokenizer.save_to_preset into the same directory)"
        )
    check_fits(handle, config, _metadata_tasks(root), task)
    return config


def _metadata_tasks(root: pathlib.Path) -> list[str] | None:
    try:
        tasks = json.loads((root / "metadata.json").read_text(encoding="utf-8")).get("tasks")
    except (OSError, ValueError, AttributeError):
        return None
    return list(tasks) if isinstance(tasks, list) else None


def check_fits(handle: str, config: dict[str, Any], tasks: list[str] | None, task: str) -> None:
    """The preset's backbone serves the keras-hub task `task` is built on (when metadata says)."""
    if task not in HUB_TASKS:
        raise UserError(
            f"{_flag(handle)}: --task {task} cannot start from a preset (causal_lm and classify can)"
        )
    needed = HUB_TASKS[task]
    if tasks is not None and needed not in tasks:
        raise UserError(
            f"{_flag(handle)}: a {backbone_class(config)} serves {', '.join(tasks) or 'no task'}; "
            f"--task {task} needs a backbone with a keras-hub {needed} "
            f"({'GPT-2-style' if task == 'causal_lm' else 'BERT-style'})"
        )


def backbone_class(config: dict[str, Any]) -> str:
    return str(config.get("class_name") or config.get("registered_name", "?")).split(">")[-1]


def max_sequence_length(config: dict[str, Any]) -> int | None:
    """The backbone's longest input (position embeddings), when its config says."""
    value = config.get("config", {}).get("max_sequence_length")
    return int(value) if isinstance(value, int) else None


def _is_weights(relative: str) -> bool:
    return relative.endswith(_WEIGHT_SUFFIXES)


def preset_files(root: pathlib.Path) -> list[str]:
    """Relative paths of every file of a preset directory, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def files_sha256(root: pathlib.Path) -> str:
    """One SHA-256 over a directory's files: their relative paths and contents."""
    h = hashlib.sha256()
    for relative in preset_files(root):
        h.update(relative.encode() + b"\0")
        with open(root / relative, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def bundle(root: pathlib.Path, info: dict[str, Any]) -> bytes:
    """preset.json: every file of the preset directory but the weights, and `info`."""
    files = {
        relative: base64.b64encode((root / relative).read_bytes()).decode("ascii")
        for relative in preset_files(root)
        if not _is_weights(relative)
    }
    return (
        json.dumps({"format": BUNDLE_FORMAT, "info": info, "files": files}, indent=1) + "\n"
    ).encode()


def is_bundle(path: str | os.PathLike) -> bool:
    return pathlib.Path(path).name == BUNDLE_NAME


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """A bundle's {"info", "files"}; a damaged one is a UserError naming the file."""
    try:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable preset bundle ({e})") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path}: not a preset bundle (format {BUNDLE_FORMAT!r})")
    return data


def unpack(path: str | os.PathLike, dest: pathlib.Path) -> pathlib.Path:
    """Write a bundle's files under `dest` (a preset directory without weights); returns dest."""
    for relative, data in read_bundle(path)["files"].items():
        target = dest / relative
        if ".." in pathlib.PurePosixPath(relative).parts:
            raise UserError(f"{path}: file name {relative!r} leaves the preset directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(data))
    return dest


def bundle_config(path: str | os.PathLike) -> dict[str, Any]:
    """The backbone's config.json inside a bundle."""
    raw = read_bundle(path)["files"].get("config.json")
    if raw is None:
        raise UserError(f"{path}: the bundle has no config.json")
    return json.loads(base64.b64decode(raw))
