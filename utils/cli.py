"""The command-line grammar of main.py: one parser per command, one-line errors.

python main.py [train] [--task causal_lm|mlm|classify|seq2seq] [--preset tiny|small] [--config FILE]
               [--data PATH] [--run-dir DIR] [--resume] [--init-from DIR]
               [--init-from-preset PRESET] [--section.key=value ...]
python main.py evaluate --run-dir DIR [--split test] [--data PATH]
python main.py generate --run-dir DIR --prompt TEXT [--max-new-tokens N] [--sampler ...]
python main.py predict  --run-dir DIR (--text TEXT ... | --data FILE [--out FILE])
python main.py prepare  [--task ...] [--data PATH] [--section.key=value ...]
python main.py export   --run-dir DIR [--quantize int8|int4|float8] [--out DIR]
python main.py serve    --export DIR [--model-name NAME] [--port 8501] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse

from utils.config import (
    DEFAULT_PRESET,
    PRESETS,
    QUANTIZE_MODES,
    SAMPLERS,
    SECTIONS,
    TASKS,
    Config,
    resolve,
    section_fields,
)
from utils.errors import UserError

COMMANDS = ("train", "evaluate", "generate", "predict", "prepare", "serve", "export")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of usage dumps."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        raise UserError(f"{message} (see {self.prog} --help)")


def _type_name(section: str, name: str) -> str:
    default = getattr(SECTIONS[section](), name)
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(type(default), "STR")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--task, --preset, --config, --data and one --section.key flag per config field."""
    parser.add_argument(
        "--task", choices=TASKS, default=None, help="what to learn (default: causal_lm)"
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=list(PRESETS),
        help="named set of defaults; tiny runs in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file: {task: ..., data: {...}, model: {...}, train: {...}}",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        dest="data_path",
        help="text file, folder of .txt files, .jsonl or .csv (default: Python standard-library "
        "docstrings; for classify, labelled by module family)",
    )
    defaults = Config()
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} options (override the preset and --config)")
        for name, f in section_fields(section).items():
            choices = f.metadata.get("choices")
            group.add_argument(
                f"--{section}.{name}",
                dest=f"{section}.{name}",
                default=argparse.SUPPRESS,
                metavar="|".join(choices) if choices else _type_name(section, name),
                help=f"{f.metadata['help']} (default: {getattr(getattr(defaults, section), name)!r})",
            )


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The --section.key flags, plus --data, --init-from and --init-from-preset as their keys."""
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    if getattr(args, "data_path", None) is not None:
        overrides.setdefault("data.path", args.data_path)
    if getattr(args, "init_from", None):
        overrides.setdefault("train.init_from", args.init_from)
    if getattr(args, "init_from_preset", None):
        overrides.setdefault("train.init_from_preset", args.init_from_preset)
    if getattr(args, "elastic", False):
        overrides.setdefault("train.elastic", "true")
    return overrides


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve the config: task defaults < preset < --config file < flags."""
    return resolve(args.preset, args.config, overrides_from_args(args), args.task)


def build_parser(command: str, description: str = "") -> argparse.ArgumentParser:
    if command == "train":
        p = Parser(
            prog="main.py [train]",
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--run-dir",
            metavar="DIR",
            help="where the run's files go (default: runs/<date-time>-<task>-<preset>)",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --run-dir from its newest checkpoint",
        )
        p.add_argument(
            "--elastic",
            action="store_true",
            help="Horovod elastic training: under horovodrun --min-np/--host-discovery-script, "
            "the job survives a lost worker (docs/elastic.md); alone, an ordinary run",
        )
        p.add_argument(
            "--init-from",
            metavar="DIR",
            help="classify: start the encoder from this --task mlm run (its model and tokenizer)",
        )
        p.add_argument(
            "--init-from-preset",
            metavar="PRESET",
            help="causal_lm, classify: start from a keras-hub preset (a handle such as gpt2_base_en, "
            "or a save_to_preset directory): its backbone, weights and tokenizer",
        )
        add_config_options(p)
    elif command == "prepare":
        p = Parser(
            prog="main.py prepare",
            description="Clean, split, tokenize and cache data (what train does first).",
        )
        add_config_options(p)
    elif command == "evaluate":
        p = Parser(
            prog="main.py evaluate",
            description="Evaluate a trained run on a split of its data (or of "
            "--data); prints a table and merges it into metrics.json.",
        )
        p.add_argument(
            "--run-dir", metavar="DIR", required=True, help="a run directory written by train"
        )
        p.add_argument(
            "--split",
            choices=("test", "val", "train"),
            default="test",
            help="(default: %(default)s)",
        )
        p.add_argument(
            "--data",
            metavar="PATH",
            help="other data to evaluate on, split with the run's settings and "
            "encoded with its tokenizer (default: the run's own data)",
        )
        p.add_argument(
            "--quantize",
            choices=QUANTIZE_MODES,
            help="also quantize the model's weights (Keras model.quantize) and report both "
            "side by side, with weight bytes and latency; written to quantization.json",
        )
    elif command == "generate":
        p = Parser(
            prog="main.py generate",
            description="Continue a prompt with a trained causal LM and keras-hub samplers.",
        )
        p.add_argument(
            "--run-dir", metavar="DIR", required=True, help="a --task causal_lm run directory"
        )
        p.add_argument(
            "--prompt", required=True, action="append", help="text to continue (repeat for several)"
        )
        p.add_argument("--max-new-tokens", type=int, default=40, help="(default: %(default)s)")
        p.add_argument(
            "--sampler",
            choices=SAMPLERS,
            default="greedy",
            help="beam: beam search, seq2seq runs only (default: %(default)s)",
        )
        p.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
        p.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of top_k/top_p sampling (default: %(default)s)",
        )
    elif command == "serve":
        p = serve_parser()
    elif command == "export":
        p = export_parser()
    else:
        p = Parser(
            prog="main.py predict", description="Classify texts with a trained --task classify run."
        )
        p.add_argument(
            "--run-dir", metavar="DIR", required=True, help="a --task classify run directory"
        )
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument(
            "--text", action="append", help="a text to classify (repeat for several)"
        )
        source.add_argument(
            "--data", metavar="FILE", help="a .jsonl or .csv file with a text column"
        )
        p.add_argument(
            "--out",
            metavar="FILE",
            help="with --data: write predictions here, .csv or .jsonl (default: <data>.predictions.jsonl)",
        )
        p.add_argument(
            "--text-column", default=None, help="with --data: the text column (default: the run's)"
        )
    return p


def export_parser() -> argparse.ArgumentParser:
    """main.py export: a run as a SavedModel taking raw strings (serving/export.py)."""
    p = Parser(
        prog="main.py export",
        description="Export a causal_lm or classify run as a TensorFlow SavedModel whose "
        "signatures take raw strings (tokenizer inside the graph), with serving.json.",
    )
    p.add_argument("--run-dir", metavar="DIR", required=True, help="a finished run directory")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="quantize the weights first (Keras model.quantize; default: float32 as trained)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write it (default: RUN_DIR/export, or RUN_DIR/export-MODE when quantized); "
        "an existing directory is replaced only if it holds an earlier export",
    )
    return p


def serve_parser() -> argparse.ArgumentParser:
    """main.py serve: TF Serving's REST API over an export (serving/server.py)."""
    p = Parser(
        prog="main.py serve",
        description="Serve an exported model over HTTP with TF Serving's REST API "
        "(/v1/models/NAME:predict), batching concurrent requests; SIGTERM stops it gracefully.",
    )
    p.add_argument("--export", metavar="DIR", required=True, help="a directory written by export")
    p.add_argument(
        "--model-name",
        metavar="NAME",
        default=None,
        help="the NAME in /v1/models/NAME (default: the export directory's name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=int, metavar="N", default=8501, help="(default: %(default)s)")
    p.add_argument(
        "--max-batch",
        type=int,
        metavar="ROWS",
        default=32,
        help="most rows in one model call (default: %(default)s)",
    )
    p.add_argument(
        "--batch-timeout-ms",
        type=float,
        metavar="MS",
        default=5.0,
        help="how long a request waits for others to share its model call, counted from "
        "when the model is free (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        metavar="ROWS",
        default=1024,
        help="most rows waiting; more are refused with 503 (default: %(default)s)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        metavar="BYTES",
        default=1 << 20,
        help="larger request bodies are refused with 413 (default: %(default)s)",
    )
    return p


def parse(argv: list[str], description: str = "") -> tuple[str, argparse.Namespace]:
    """Split off the command (train when none is given) and parse its options."""
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    args, unknown = build_parser(command, description).parse_known_args(rest)
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        section = flag.removeprefix("--").split(".", 1)[0]
        if section in SECTIONS and "." in flag:
            valid = ", ".join(f"--{section}.{k}" for k in section_fields(section))
            raise UserError(f"unknown option {flag}; valid {section} options: {valid}")
        raise UserError(f"unrecognized argument {unknown[0]!r} (see main.py {command} --help)")
    return command, args
