"""Typed configuration: one dataclass per concern, presets, files and overrides.

A run's configuration is resolved in this order, each step overriding the
previous one: the dataclass defaults, a named preset (`--preset`), a YAML or
JSON file (`--config`), then `--section.key=value` flags. Unknown keys and
values of the wrong type raise `UserError` naming the key; `validate()`
checks the rules that span fields. Nothing here imports TensorFlow, so bad
configuration fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any

from utils.errors import UserError

TASKS = ("causal_lm", "mlm", "classify", "seq2seq")
OPTIMIZERS = ("adamw", "adam", "sgd", "adagrad", "adadelta")
SCHEDULES = ("cosine", "linear", "constant")
FORMATS = ("auto", "text", "jsonl", "csv")
COMPRESSIONS = ("none", "fp16")
NONFINITE = ("stop", "skip")
PRECISIONS = ("float32", "mixed_bfloat16")
SAMPLERS = ("greedy", "top_k", "top_p", "beam")  # generate --sampler (beam: seq2seq runs)
QUANTIZE_MODES = ("int8", "int4", "float8")  # evaluate/export --quantize


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its command-line help (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token ids (data/prepare.py)."""

    path: str = _opt(
        "",
        "text file, folder of .txt files, .jsonl or .csv; empty: the built-in corpus (Python standard-library docstrings)",
    )
    format: str = _opt("auto", "input format; auto picks it from the file extension", FORMATS)
    text_column: str = _opt("text", "column/key holding the text in JSONL and CSV input")
    label_column: str = _opt("label", "column/key holding the label (task classify)")
    source_column: str = _opt(
        "source", "column/key holding the text to summarize in JSONL and CSV input (task seq2seq)"
    )
    target_column: str = _opt(
        "target", "column/key holding the summary to learn in JSONL and CSV input (task seq2seq)"
    )
    lowercase: bool = _opt(False, "lowercase the text before learning the vocabulary")
    vocab_size: int = _opt(4000, "subword vocabulary size (SentencePiece unigram)")
    max_chars: int = _opt(
        0, "use only the first N characters of cleaned text (0: all); for smoke runs"
    )
    val_fraction: float = _opt(0.05, "share of documents held out for validation")
    test_fraction: float = _opt(0.05, "share of documents held out for the final test")
    split_seed: int = _opt(0, "seed of the deterministic document-level train/val/test split")
    vocab_sample_chars: int = _opt(
        10_000_000, "at most this many characters are sampled to learn the vocabulary"
    )
    prepared_dir: str = _opt(
        "prepared", "where prepared token shards are cached, keyed by a hash of source and settings"
    )


@dataclass
class ModelConfig:
    """Shape of the GPT-style decoder (models/transformer.py)."""

    n_layers: int = _opt(4, "number of Transformer decoder blocks")
    n_heads: int = _opt(4, "attention heads per block; must divide d_model")
    d_model: int = _opt(128, "width of the residual stream")
    d_ff: int = _opt(512, "width of the feed-forward layer in each block")
    seq_len: int = _opt(
        64,
        "context length in tokens (training windows are seq_len + 1; seq2seq: longer sources "
        "are cut to it)",
    )
    target_len: int = _opt(
        32,
        "seq2seq: longest target in tokens; longer targets are cut (counted in meta.json), and "
        "generation stops after it",
    )
    dropout: float = _opt(
        0.0,
        "dropout rate in embeddings, attention and feed-forward (0 for causal_lm, which its "
        "few epochs leave undertrained; 0.1 for the other tasks)",
    )
    dropout_masks: str = _opt(
        "keras",
        "how dropout masks are drawn: keras (Philox) or hash (a counter hash XLA fuses, "
        "about 60x cheaper on a CPU; docs/performance.md)",
        ("keras", "hash"),
    )


@dataclass
class TrainConfig:
    """How the model is trained (train.py, utils/distributed.py)."""

    batch_size: int = _opt(
        8, "sequences per step on EACH rank; global batch = batch_size x world size"
    )
    epochs: int = _opt(4, "passes over the training split")
    steps_per_epoch: int = _opt(
        0, "cap on steps per epoch (0: a full pass over the training split)"
    )
    max_steps: int = _opt(0, "stop after this many steps in total (0: no cap)")
    optimizer: str = _opt("adamw", "optimizer", OPTIMIZERS)
    lr: float = _opt(
        1e-3, "peak learning rate for ONE rank; multiplied by world size when scale_lr"
    )
    scale_lr: bool = _opt(
        True, "scale the learning rate by the number of ranks (Horovod's convention)"
    )
    schedule: str = _opt("cosine", "decay after warmup", SCHEDULES)
    warmup_steps: int = _opt(50, "linear warmup from 0 to the peak learning rate")
    min_lr_ratio: float = _opt(
        0.5,
        "final learning rate as a share of the peak (cosine and linear); 0.5 for causal_lm, "
        "which its few epochs leave undertrained, 0.1 for the other tasks",
    )
    weight_decay: float = _opt(
        0.01, "decoupled weight decay (adamw); L2 is not applied to norms and biases"
    )
    beta_1: float = _opt(0.9, "Adam/AdamW first-moment decay")
    beta_2: float = _opt(0.98, "Adam/AdamW second-moment decay")
    momentum: float = _opt(0.9, "SGD momentum")
    clip_norm: float = _opt(
        1.0, "clip gradients by global norm after averaging across ranks (0: off)"
    )
    early_stopping_patience: int = _opt(
        0, "stop when val_loss has not improved for N epochs (0: off)"
    )
    seed: int = _opt(0, "seed for initialisation, dropout and data order")
    xla: bool = _opt(
        True, "compile the forward/backward pass with XLA (the allreduce stays outside)"
    )
    threads: int = _opt(0, "intra-op threads per rank (0: CPU cores / ranks on this host)")
    compression: str = _opt("none", "compression of gradients sent between ranks", COMPRESSIONS)
    accumulate_steps: int = _opt(
        1,
        "micro-batches of batch_size per update, gradients summed locally and allreduced once "
        "(global batch = batch_size x accumulate_steps x world size)",
    )
    precision: str = _opt(
        "float32",
        "compute dtype policy; mixed_bfloat16 runs matmuls in bfloat16 (variables and loss "
        "stay float32)",
        PRECISIONS,
    )
    checkpoint_every: int = _opt(
        200, "save a checkpoint every N steps, and at each epoch end (0: epoch ends only)"
    )
    keep_checkpoints: int = _opt(3, "number of most recent checkpoints kept")
    elastic: bool = _opt(
        False,
        "Horovod elastic training (horovodrun --min-np/--host-discovery-script): survive a lost "
        "worker and go on with the others; same as --elastic",
    )
    commit_every: int = _opt(
        0,
        "elastic: keep an in-memory copy of the state every N steps, and at each epoch end "
        "(0: every train.checkpoint_every steps)",
    )
    log_every: int = _opt(10, "update the progress bar every N steps")
    eval_batches: int = _opt(
        0, "validation batches per rank at each epoch end (0: the whole split)"
    )
    tensorboard: bool = _opt(True, "write TensorBoard logs into the run directory")
    on_nonfinite: str = _opt(
        "stop",
        "when a loss or gradient is NaN/inf on any rank: stop every rank, or skip the step",
        NONFINITE,
    )
    restore_best: bool = _opt(
        True, "end with the weights of the best epoch (val_loss; val_macro_f1 for classify)"
    )
    init_from: str = _opt(
        "", "start the encoder from this run directory's (an --task mlm run); classify only"
    )
    init_from_preset: str = _opt(
        "",
        "start from a keras-hub preset: a handle (gpt2_base_en) or a save_to_preset "
        "directory; its backbone, weights and tokenizer (causal_lm, classify)",
    )
    class_weights: bool = _opt(True, "weight the loss by inverse class frequency (classify)")
    mask_rate: float = _opt(0.15, "share of tokens selected for prediction (mlm)")


@dataclass
class ParallelConfig:
    """How the ranks share the model (utils/distributed/tensor_parallel.py, docs/parallelism.md)."""

    tensor: int = _opt(
        1,
        "tensor-parallel shards per data-parallel replica (Megatron-style; must divide the "
        "ranks, model.n_heads and model.d_ff; causal_lm only; docs/parallelism.md)",
    )


@dataclass
class Config:
    """Everything that defines a run; saved as config.json in the run directory."""

    task: str = "causal_lm"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Seconds on one CPU core: for tests, CI and a first look.
    "tiny": {
        "data": {"vocab_size": 512, "max_chars": 300_000},
        "model": {
            "n_layers": 2,
            "n_heads": 2,
            "d_model": 32,
            "d_ff": 64,
            "seq_len": 32,
            "dropout": 0.0,
        },
        "train": {
            "batch_size": 16,
            "epochs": 4,
            "steps_per_epoch": 40,
            "lr": 1e-2,
            "warmup_steps": 10,
            "checkpoint_every": 0,
            "log_every": 5,
            "eval_batches": 20,
            "tensorboard": False,
        },
    },
    # The default: learns the standard-library docstrings in a few minutes on 2 cores.
    "small": {},
}
DEFAULT_PRESET = "small"

# What each task changes from the defaults, before the preset applies.
# The defaults above are the default job's (causal_lm, preset small), chosen on the validation
# split (docs/performance.md): 4 epochs leave the model undertrained, so no dropout (as good
# on validation over 2 seeds, and a cheaper step) and a learning rate that decays to half its
# peak, not a tenth (validation perplexity about 177 against 200). The other tasks keep the
# dropout (0.1) and decay (to 0.1) they were tuned with.
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "causal_lm": {},
    # BERT-style pretraining.
    "mlm": {"model": {"dropout": 0.1}, "train": {"batch_size": 16, "min_lr_ratio": 0.1}},
    # Docstrings are short (median 21 tokens; 82% fit in the default 64).
    # Larger held-out shares, since whole source files are held out. Early
    # stopping on validation macro-F1 ends the run.
    "classify": {
        "data": {"val_fraction": 0.15, "test_fraction": 0.15},
        "model": {"dropout": 0.1},
        "train": {
            "batch_size": 16,
            "epochs": 20,
            "min_lr_ratio": 0.1,
            "early_stopping_patience": 4,
            "checkpoint_every": 0,
        },
    },
    # The built-in docstring summaries: 2,152 training pairs, bodies of median 29 words (their
    # first 64 tokens), summaries of at most 15 (32 tokens hold them all). A small model: larger
    # ones did no better on so few pairs (docs/seq2seq.md), and this one trains in minutes.
    "seq2seq": {
        "data": {"val_fraction": 0.1, "test_fraction": 0.1, "vocab_size": 1000, "lowercase": True},
        "model": {
            "n_layers": 2,
            "d_model": 64,
            "d_ff": 256,
            "seq_len": 64,
            "target_len": 32,
            "dropout": 0.1,
        },
        "train": {
            "batch_size": 16,
            "epochs": 20,
            "lr": 3e-3,
            "warmup_steps": 100,
            "min_lr_ratio": 0.1,
            "checkpoint_every": 0,
        },
    },
}


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _unknown_key(where: str, key: str, valid: typing.Iterable[str]) -> UserError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _field_type(section: str, name: str) -> type:
    hints = typing.get_type_hints(SECTIONS[section])
    return hints[name]


def coerce(value: Any, kind: type, where: str) -> Any:
    """Convert `value` (from a file, or a string from the command line) to `kind`."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {kind}")


def set_value(config: Config, section: str, key: str, value: Any, where: str) -> None:
    """Set `config.<section>.<key>`, checking that the key exists and the type fits."""
    fields = section_fields(section)
    if key not in fields:
        raise _unknown_key(where, f"{section}.{key}", (f"{section}.{k}" for k in fields))
    value = coerce(value, _field_type(section, key), f"{where}: {section}.{key}")
    choices = fields[key].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(
            f"{where}: {section}.{key} must be one of {', '.join(choices)}; got {value!r}"
        )
    setattr(getattr(config, section), key, value)


def apply_nested(config: Config, values: dict[str, Any], where: str) -> None:
    """Apply a {"section": {"key": value}} mapping (a preset or a config file)."""
    for section, entries in values.items():
        if section == "task":
            if entries not in TASKS:
                raise UserError(f"{where}: task must be one of {', '.join(TASKS)}; got {entries!r}")
            config.task = entries
            continue
        if section not in SECTIONS:
            raise _unknown_key(where, section, [*SECTIONS, "task"])
        if not isinstance(entries, dict):
            raise UserError(
                f"{where}: {section!r} must be a mapping of keys to values, got {entries!r}"
            )
        for key, value in entries.items():
            set_value(config, section, key, value, where)


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a nested mapping."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        if p.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(
            f"config file {path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(
            f"config file {path}: expected a mapping of sections (data, model, train, parallel), got {type(values).__name__}"
        )
    return values


def resolve(
    preset: str, config_file: str | None, overrides: dict[str, str], task: str | None = None
) -> Config:
    """Build the run's config: defaults < task defaults < preset < file < command-line overrides.

    Args:
        preset: a key of PRESETS.
        config_file: optional YAML/JSON path with {"data": {...}, "model": {...}, "train": {...}}.
        overrides: {"section.key": "value"} from the command line.
        task: the task from the command line, if given (else the file's, else causal_lm).
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    file_values = load_file(config_file) if config_file else {}
    task = task or file_values.get("task") or "causal_lm"
    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    config = Config(task=task)
    apply_nested(config, TASK_DEFAULTS[task], f"task {task}")
    apply_nested(config, PRESETS[preset], f"preset {preset}")
    if config_file:
        apply_nested(config, file_values, f"config file {config_file}")
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise _unknown_key(
                "command line", dotted, (f"{s}.{k}" for s in SECTIONS for k in section_fields(s))
            )
        set_value(config, section, key, value, "command line")
    config.task = task
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check the rules between and within fields; raise UserError naming the key."""
    m, t, d = config.model, config.train, config.data

    def positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            rule = ">= 0" if allow_zero else "> 0"
            raise UserError(f"{section}.{name} must be {rule}; got {value}")

    for name in ("n_layers", "n_heads", "d_model", "d_ff", "seq_len", "target_len"):
        positive("model", name, getattr(m, name))
    if m.d_model % m.n_heads:
        raise UserError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})"
        )
    for name in ("batch_size", "epochs", "log_every", "keep_checkpoints", "accumulate_steps"):
        positive("train", name, getattr(t, name))
    for name in (
        "steps_per_epoch",
        "max_steps",
        "warmup_steps",
        "checkpoint_every",
        "commit_every",
        "eval_batches",
        "threads",
        "weight_decay",
        "clip_norm",
        "early_stopping_patience",
        "momentum",
    ):
        positive("train", name, getattr(t, name), allow_zero=True)
    positive("train", "lr", t.lr)
    for name in ("min_lr_ratio", "beta_1", "beta_2"):
        if not 0 <= getattr(t, name) <= 1:
            raise UserError(f"train.{name} must be between 0 and 1; got {getattr(t, name)}")
    if not 0 <= m.dropout < 1:
        raise UserError(f"model.dropout must be in [0, 1); got {m.dropout}")
    if d.vocab_size < 16:
        raise UserError(f"data.vocab_size must be at least 16; got {d.vocab_size}")
    for name in ("val_fraction", "test_fraction"):
        if not 0 < getattr(d, name) < 0.5:
            raise UserError(f"data.{name} must be in (0, 0.5); got {getattr(d, name)}")
    positive("data", "max_chars", d.max_chars, allow_zero=True)
    for name in ("source_column", "target_column"):
        if not getattr(d, name).strip():
            raise UserError(f"data.{name} must name a column; got {getattr(d, name)!r}")
    if config.task == "seq2seq" and d.source_column == d.target_column:
        raise UserError(
            f"data.source_column and data.target_column must differ; both are {d.source_column!r}"
        )
    positive("data", "vocab_sample_chars", d.vocab_sample_chars)
    if not 0 < t.mask_rate < 1:
        raise UserError(f"train.mask_rate must be in (0, 1); got {t.mask_rate}")
    if t.init_from and config.task != "classify":
        raise UserError(
            f"train.init_from (--init-from) is for --task classify; the task is {config.task}"
        )
    if t.init_from_preset:
        if config.task not in ("causal_lm", "classify"):
            raise UserError(
                "train.init_from_preset (--init-from-preset) is for --task causal_lm and --task "
                f"classify; the task is {config.task}"
            )
        if t.init_from:
            raise UserError("--init-from and --init-from-preset: choose one starting point")
        if config.parallel.tensor > 1:
            raise UserError(
                "parallel.tensor > 1 shards this project's own Transformer blocks; a "
                "--init-from-preset model trains data-parallel only (parallel.tensor=1)"
            )
    validate_parallel(config)


def validate_parallel(config: Config) -> None:
    """parallel.tensor: at least 1, dividing the heads and the feed-forward width.

    Whether it divides the number of ranks is known only under horovodrun
    (utils/distributed/tensor_parallel.py `init`, from HOROVOD_SIZE). Only the
    causal LM has tensor-parallel blocks, and elastic training would change
    the number of ranks under the tensor groups: both refused for T > 1.
    """
    tensor, m = config.parallel.tensor, config.model
    if tensor < 1:
        raise UserError(f"parallel.tensor must be >= 1; got {tensor}")
    if m.n_heads % tensor:
        raise UserError(
            f"parallel.tensor ({tensor}) must divide model.n_heads ({m.n_heads}): "
            "each shard holds whole heads"
        )
    if m.d_ff % tensor:
        raise UserError(f"parallel.tensor ({tensor}) must divide model.d_ff ({m.d_ff})")
    if tensor > 1 and config.task != "causal_lm":
        raise UserError(
            f"parallel.tensor={tensor} is for --task causal_lm (only its blocks are "
            f"tensor-parallel); the task is {config.task}: use parallel.tensor=1"
        )
    if tensor > 1 and config.train.elastic:
        raise UserError(
            f"parallel.tensor={tensor} needs a fixed number of ranks: drop --elastic "
            "(train.elastic) or use parallel.tensor=1"
        )


def parallel_layout(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
    """{"tensor": T, "data": ranks / T} for config.json; UserError when T does not divide the ranks."""
    tensor = parallel.tensor
    if world_size % tensor:
        raise UserError(f"parallel.tensor={tensor} must divide the number of ranks ({world_size})")
    return {"tensor": tensor, "data": world_size // tensor}
