"""Train and evaluate Transformer language models with Keras 3 and Horovod.

    python main.py                              # one process: default corpus, preset "small"
    horovodrun -np 4 python main.py             # 4 ranks on this machine (Gloo)
    horovodrun -np 8 -H host1:4,host2:4 python main.py   # 2 hosts x 4 ranks (see README)
    python main.py --preset tiny                # a smoke run in seconds
    python main.py --data notes.txt --train.epochs=10 --model.n_layers=6
    python main.py --config my.yaml --run-dir runs/exp1
    python main.py --run-dir runs/exp1 --resume # continue from the newest checkpoint
    python main.py evaluate --run-dir runs/exp1 # = python evaluate.py --run-dir runs/exp1
    python main.py generate --run-dir runs/exp1 --prompt "Return the"
    python main.py prepare --data corpus/       # prepare token shards only

Commands: train (the default), evaluate, generate, prepare. `python main.py CMD --help`
lists every option with its default. Bad input ends with one line naming
the problem and exit code 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from utils.config import DEFAULT_PRESET, PRESETS, SECTIONS, TASKS, Config, resolve, section_fields
from utils.errors import UserError, exit_with_user_error

COMMANDS = ("train", "evaluate", "generate", "prepare")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of usage dumps."""

    def error(self, message: str) -> None:
        raise UserError(f"{message} (see {self.prog} --help)")


def _type_name(section: str, name: str) -> str:
    default = getattr(SECTIONS[section](), name)
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(type(default), "STR")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--preset, --config, --data and one --section.key flag per config field."""
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=list(PRESETS),
        help="named set of defaults; tiny runs in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file: {data: {...}, model: {...}, train: {...}}",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        dest="data_path",
        help="text file, folder of .txt files, .jsonl or .csv (default: Python standard-library docstrings)",
    )
    defaults = Config()
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} options (override preset and --config)")
        for name, f in section_fields(section).items():
            choices = f.metadata.get("choices")
            default = getattr(getattr(defaults, section), name)
            group.add_argument(
                f"--{section}.{name}",
                dest=f"{section}.{name}",
                default=argparse.SUPPRESS,
                metavar="|".join(choices) if choices else _type_name(section, name),
                help=f"{f.metadata['help']} (default: {default!r})",
            )


def config_from_args(args: argparse.Namespace) -> tuple[Config, dict[str, str]]:
    """Resolve the config: preset < --config file < --data < --section.key flags."""
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    if args.data_path is not None:
        overrides.setdefault("data.path", args.data_path)
    return resolve(args.preset, args.config, overrides, getattr(args, "task", None)), overrides


def build_parser(command: str) -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    if command == "train":
        p = _Parser(
            prog="main.py [train]",
            description=doc[0] + "\n\n" + doc[1],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        p.add_argument(
            "--task", choices=TASKS, default=None, help="what to train (default: causal_lm)"
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
        add_config_options(p)
    elif command == "prepare":
        p = _Parser(
            prog="main.py prepare",
            allow_abbrev=False,
            description="Clean, split, tokenize and cache a corpus (what train does first).",
        )
        add_config_options(p)
    elif command == "evaluate":
        p = _Parser(
            prog="main.py evaluate",
            allow_abbrev=False,
            description="Evaluate a trained run on a split of its data (or of --data); "
            "prints a table and merges it into metrics.json.",
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
            help="other text to evaluate on, split with the run's settings "
            "and encoded with its tokenizer (default: the run's own data)",
        )
    else:
        from inference import SAMPLERS

        p = _Parser(
            prog="main.py generate",
            allow_abbrev=False,
            description="Continue a prompt with a trained run's model and keras-hub samplers.",
        )
        p.add_argument(
            "--run-dir", metavar="DIR", required=True, help="a run directory written by train"
        )
        p.add_argument(
            "--prompt", required=True, action="append", help="text to continue (repeat for several)"
        )
        p.add_argument("--max-new-tokens", type=int, default=40, help="(default: %(default)s)")
        p.add_argument(
            "--sampler", choices=SAMPLERS, default="greedy", help="(default: %(default)s)"
        )
        p.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
        p.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of top_k/top_p sampling (default: %(default)s)",
        )
    return p


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Split off the command (train when none is given) and parse its options."""
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        section = flag.removeprefix("--").split(".", 1)[0]
        if section in SECTIONS and "." in flag:
            valid = ", ".join(f"--{section}.{k}" for k in section_fields(section))
            raise UserError(f"unknown option {flag}; valid {section} options: {valid}")
        raise UserError(f"unrecognized argument {unknown[0]!r} (see main.py {command} --help)")
    return command, args


def cmd_prepare(args: argparse.Namespace) -> None:
    config, _ = config_from_args(args)
    from data.prepare import prepare
    from utils.tf_env import import_tensorflow

    import_tensorflow()
    prepared = prepare(config.data)
    print(f"prepared: {prepared.dir}")


def cmd_train(args: argparse.Namespace, argv: list[str]) -> None:
    """prepare -> check sizes -> run directory -> train -> test, on every rank."""
    from data.sources import open_source
    from utils.run_dir import RunDir, default_run_dir

    if args.resume:
        if not args.run_dir:
            raise UserError("--resume needs --run-dir DIR (the run to continue)")
        config = resume_config(RunDir(args.run_dir), args)
    else:
        config, _ = config_from_args(args)
    open_source(
        config.data.path, config.data.format, config.data.text_column
    )  # fail fast, before TensorFlow

    from utils import distributed

    world = distributed.init(threads=config.train.threads)
    from data.prepare import load_prepared, prepare

    # Horovod: one process per host prepares the data (hosts may not share a
    # filesystem), the others wait; the same settings give the same directory.
    def prepare_here() -> str:
        log = distributed.print0 if world.is_chief else (lambda *a, **k: None)
        return str(prepare(config.data, progress=world.is_chief, log=log).dir)

    dirs = distributed.local_chief_runs(prepare_here, "prepare")
    if len(set(dirs)) > 1:
        raise UserError(
            f"hosts prepared different data ({', '.join(sorted(set(dirs)))}): "
            "the input or Python version differs between hosts"
        )
    prepared = load_prepared(dirs[0])

    import train

    train.check_sizes(config, prepared)
    run_dir = RunDir(
        distributed.chief_runs(
            lambda: _create_run_dir(
                args.run_dir or str(default_run_dir(args.preset, config.task)), args.resume
            ),
            "run_dir",
        )
    )
    model, _ = train.run_training(
        config,
        prepared,
        run_dir,
        args.resume,
        {"preset": args.preset, "command": ["main.py", *argv]},
    )
    finish_run(model, prepared, config, run_dir)
    distributed.shutdown()


def finish_run(model, prepared, config: Config, run_dir) -> None:
    """After training: test metrics (all ranks), then a sample and the curves (rank 0)."""
    import evaluate
    from data.prepare import load_tokenizer
    from utils import distributed

    tokenizer = load_tokenizer(prepared.tokenizer_path)
    results = evaluate.evaluate_split(model, tokenizer, prepared, config.to_dict(), "test")
    if not distributed.is_chief():
        return
    run_dir.merge_metrics(results)
    print(
        evaluate.format_table(
            {**results, "test_unigram_perplexity": prepared.meta["unigram_perplexity"]["test"]}
        )
    )
    from inference import Run, generate
    from utils.plots import plot_runs

    prompt = "Return the"
    sample = generate(
        Run(run_dir.path, model, tokenizer, run_dir.read_config()), [prompt], max_new_tokens=30
    )[0]
    print(f"sample: {prompt} -> {sample}")
    plot_runs([run_dir.path], run_dir.curves)
    print(f"run directory: {run_dir.path}", flush=True)


def cmd_generate(args: argparse.Namespace) -> None:
    from inference import generate, load_run

    run = load_run(args.run_dir)
    outputs = generate(
        run, args.prompt, args.max_new_tokens, args.sampler, args.temperature, args.seed
    )
    for prompt, text in zip(args.prompt, outputs, strict=True):
        print(f"{prompt}{'' if prompt.endswith(' ') or not text else ' '}{text}")


def _create_run_dir(path: str, resume: bool) -> str:
    from utils.run_dir import RunDir

    RunDir(path).create(resume)
    return path


def resume_config(run_dir, args: argparse.Namespace) -> Config:
    """The saved config of the run to resume, with this command line's flags on top."""
    from utils.config import apply_nested, set_value, validate

    saved = run_dir.read_config()["config"]
    config = Config()
    apply_nested(config, saved, f"{run_dir.config}")
    for dotted, value in {k: v for k, v in vars(args).items() if "." in k}.items():
        section, _, key = dotted.partition(".")
        set_value(config, section, key, value, "command line")
    validate(config)
    return config


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, args = parse(argv)
        if command == "train":
            cmd_train(args, argv)
        elif command == "prepare":
            cmd_prepare(args)
        elif command == "evaluate":
            import evaluate

            evaluate.run(pathlib.Path(args.run_dir), args.split, args.data)
        else:
            cmd_generate(args)
    except UserError as e:
        exit_with_user_error(e)


if __name__ == "__main__":
    main()
