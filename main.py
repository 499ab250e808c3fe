"""Train and evaluate Transformer language models with Keras 3 and Horovod.

    python main.py                              # one process: default corpus, preset "small"
    horovodrun -np 4 python main.py             # 4 ranks on this machine (Gloo)
    horovodrun -np 8 -H host1:4,host2:4 python main.py   # 2 hosts x 4 ranks (see README)
    horovodrun -np 2 --min-np 1 --max-np 2 -H localhost:1,127.0.0.1:1 --network-interface lo \
        python main.py --elastic                # survives a lost worker (docs/elastic.md)
    python main.py --preset tiny                # a smoke run in seconds
    python main.py --data notes.txt --train.epochs=10 --model.n_layers=6
    python main.py --config my.yaml --run-dir runs/exp1
    python main.py --run-dir runs/exp1 --resume # continue from the newest checkpoint
    python main.py evaluate --run-dir runs/exp1 # = python evaluate.py --run-dir runs/exp1
    python main.py generate --run-dir runs/exp1 --prompt "Return the"
    python main.py --task mlm --run-dir runs/mlm                      # BERT-style pretraining
    python main.py --task classify --init-from runs/mlm              # fine-tune on labelled text
    python main.py predict --run-dir runs/cls --text "Parse an email message."
    python main.py prepare --data corpus/       # prepare the data only
    python main.py export --run-dir runs/exp1 --quantize int8   # SavedModel taking raw strings
    python main.py serve --export DIR --model-name lm   # TF Serving's REST API on port 8501

Commands: train (the default), evaluate, generate, predict, prepare, serve, export.
`python main.py CMD --help` lists every option with its default. Bad input
ends with one line naming the problem and exit code 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import evaluate
from utils.cli import config_from_args, overrides_from_args, parse
from utils.config import Config
from utils.errors import UserError, run_main


def prepare_data(task, world) -> None:
    """Horovod: one process per host prepares the data (hosts may not share a
    filesystem) and the others wait; the same settings give the same directory."""
    from data.prepare import load_prepared
    from utils import distributed

    tokenizer = None
    if task.config.train.init_from:  # encode with the pretrained encoder's tokenizer
        tokenizer = pathlib.Path(task.config.train.init_from) / "tokenizer.model"

    def prepare_here() -> str:
        log = distributed.print0 if world.is_chief else (lambda *a, **k: None)
        return str(task.prepare(progress=world.is_chief, log=log, tokenizer=tokenizer).dir)

    dirs = distributed.local_chief_runs(prepare_here, "prepare")
    if len(set(dirs)) > 1:
        raise UserError(
            f"hosts prepared different data ({', '.join(sorted(set(dirs)))}): "
            "the input or Python version differs between hosts"
        )
    task.prepared = load_prepared(dirs[0])


def check_input(config: Config) -> None:
    """Fail fast, before TensorFlow is imported: the data path and --init-from."""
    from data.sources import open_pairs, open_source

    d = config.data
    if config.task == "seq2seq":  # pairs: a source and a target column
        open_pairs(d.path, d.format, d.source_column, d.target_column)
    else:
        label_column = d.label_column if config.task == "classify" else None
        open_source(d.path, d.format, d.text_column, label_column)
    if config.train.init_from:
        from utils.run_dir import RunDir

        source = RunDir(config.train.init_from)
        saved = source.load_config()
        if saved.task != "mlm":
            raise UserError(
                f"--init-from {source.path}: a {saved.task} run; it must be a --task mlm run"
            )
        # The encoder's shape and context come with its weights.
        saved.model.dropout = config.model.dropout
        config.model = saved.model


def cmd_train(args: argparse.Namespace, argv: list[str]) -> None:
    """prepare -> check sizes -> run directory -> train -> test, on every rank."""
    from utils.run_dir import RunDir, default_run_dir

    if args.resume:
        if not args.run_dir:
            raise UserError("--resume needs --run-dir DIR (the run to continue)")
        config = resume_config(RunDir(args.run_dir), args)
    else:
        config = config_from_args(args)
    check_input(config)

    from utils import distributed

    if config.parallel.tensor > 1:  # the process sets must exist when Horovod starts
        distributed.tensor_parallel.init(config.parallel.tensor, config.train.threads)
        world = distributed.world()
    else:
        world = distributed.init(threads=config.train.threads, elastic=config.train.elastic)
    if config.train.elastic and not world.elastic:
        distributed.print0(
            "note: --elastic: not started by horovodrun in elastic mode (--min-np or "
            "--host-discovery-script), so this is an ordinary run"
        )
    import train
    from models.tasks import make_task

    task = make_task(config)
    prepare_data(task, world)
    task.check_sizes()
    path = args.run_dir or str(default_run_dir(args.preset, config.task))
    run_dir = RunDir(distributed.chief_runs(lambda: _create_run_dir(path, args.resume), "run_dir"))
    model, _ = train.run_training(
        task, run_dir, args.resume, {"preset": args.preset, "command": ["main.py", *argv]}
    )
    finish_run(task, model, run_dir)
    distributed.shutdown()


def finish_run(task, model, run_dir) -> None:
    """After training: test metrics (all ranks), then the task's sample and the curves (rank 0)."""
    from data.prepare import load_tokenizer
    from models.inference import Run
    from utils import distributed

    tokenizer = load_tokenizer(task.prepared.tokenizer_path)
    results = task.evaluate(model, tokenizer, "test")
    if not distributed.is_chief():
        return
    task.report(results, run_dir)
    task.after_training(Run(run_dir.path, model, tokenizer, task.config, run_dir.read_config()))
    from utils.plots import plot_runs

    plot_runs([run_dir.path], run_dir.curves)
    print(f"run directory: {run_dir.path}", flush=True)


def _create_run_dir(path: str, resume: bool) -> str:
    from utils.run_dir import RunDir

    RunDir(path).create(resume)
    return path


def resume_config(run_dir, args: argparse.Namespace) -> Config:
    """The saved config of the run to resume, with this command line's flags on top."""
    from utils.config import set_value, validate

    config = run_dir.load_config()
    # The layout is not part of the run (checkpoints hold the full model): it is this
    # launch's, parallel.tensor=1 unless the command line sets it.
    config.parallel.tensor = 1
    for dotted, value in overrides_from_args(args).items():
        section, _, key = dotted.partition(".")
        set_value(config, section, key, value, "command line")
    validate(config)
    return config


def cmd_prepare(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    check_input(config)
    from models.tasks import make_task
    from utils import distributed

    world = distributed.init(threads=config.train.threads)
    task = make_task(config)
    prepare_data(task, world)
    distributed.print0(f"prepared: {task.prepared.dir}")


def cmd_generate(args: argparse.Namespace) -> None:
    from models.inference import generate, load_run

    run = load_run(args.run_dir)
    outputs = generate(
        run, args.prompt, args.max_new_tokens, args.sampler, args.temperature, args.seed
    )
    for prompt, text in zip(args.prompt, outputs, strict=True):
        print(run.task.show_generated(prompt, text))


def cmd_predict(args: argparse.Namespace) -> None:
    from models.inference import load_run, predict, predict_file

    run = load_run(args.run_dir)
    if args.text:
        for text, (label, probability, _) in zip(args.text, predict(run, args.text), strict=True):
            print(f"{label}\t{probability:.3f}\t{text}")
        return
    print(f"wrote {predict_file(run, args.data, args.out, args.text_column)}")


def cmd_export(args: argparse.Namespace) -> None:
    from serving.export import export_run

    print(f"exported: {export_run(args.run_dir, args.out, args.quantize)}")


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.server import serve

    serve(
        args.export,
        args.model_name,
        args.host,
        args.port,
        args.max_batch,
        args.batch_timeout_ms,
        args.max_queue,
        args.max_request_bytes,
    )


HANDLERS = {  # every command but train, which also records its command line
    "prepare": cmd_prepare,
    "evaluate": evaluate.command,
    "generate": cmd_generate,
    "predict": cmd_predict,
    "export": cmd_export,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        command, args = parse(argv, "\n\n".join(__doc__.split("\n\n")[:2]))
        if command == "train":
            cmd_train(args, argv)
        else:
            HANDLERS[command](args)

    run_main(body)


if __name__ == "__main__":
    main()
