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
    python main.py --init-from-preset ./my_gpt2 --data notes.txt     # start from a keras-hub preset
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


def prepare_data(task, world, preset: pathlib.Path | None = None) -> None:
    """Horovod: one process per host prepares the data (hosts may not share a
    filesystem) and the others wait; the same settings give the same directory.
    `preset`: a preset's preset.json, whose tokenizer encodes the data."""
    from data.prepare import load_prepared
    from utils import distributed

    tokenizer = preset
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


def check_input(config: Config, resume: bool = False) -> None:
    """Fail fast, before TensorFlow is imported: the data path, --init-from and a local preset
    (which a resumed run does not need: its run directory keeps the preset's preset.json)."""
    from data.sources import open_pairs, open_source
    from utils.presets import check_local, is_local

    d = config.data
    if config.task == "seq2seq":  # pairs: a source and a target column
        open_pairs(d.path, d.format, d.source_column, d.target_column)
    else:
        label_column = d.label_column if config.task == "classify" else None
        open_source(d.path, d.format, d.text_column, label_column)
    if config.train.init_from_preset and is_local(config.train.init_from_preset) and not resume:
        check_local(config.train.init_from_preset, config.task)
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
    check_input(config, args.resume)

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

    preset = fetch_preset(config, RunDir(args.run_dir) if args.resume else None)
    task = make_task(config)
    prepare_data(task, world, preset)
    task.check_sizes()
    path = args.run_dir or str(default_run_dir(args.preset, config.task))
    run_dir = RunDir(distributed.chief_runs(lambda: _create_run_dir(path, args.resume), "run_dir"))
    model, _ = train.run_training(
        task, run_dir, args.resume, {"preset": args.preset, "command": ["main.py", *argv]}
    )
    finish_run(task, model, run_dir)
    distributed.shutdown()


def fetch_preset(config: Config, resumed=None) -> pathlib.Path | None:
    """--init-from-preset: every rank gets the preset's preset.json (architecture, tokenizer).

    Rank 0 reads the preset (or, resuming, the run directory's copy, so the
    preset need not exist any more) and broadcasts the bundle: hosts without
    a shared filesystem or network need nothing but the launch. The weights
    stay on rank 0 until training starts and Horovod broadcasts them.
    `model.seq_len` is capped at the backbone's longest input.
    """
    handle = config.train.init_from_preset
    if not handle:
        return None
    import atexit
    import shutil
    import tempfile

    from utils import distributed
    from utils.presets import BUNDLE_NAME, read_bundle

    def read_here() -> bytes:
        if resumed is not None and resumed.tokenizer.name == BUNDLE_NAME:
            return resumed.tokenizer.read_bytes()
        from models.presets import fetch

        return fetch(handle, config.task)[0]

    data = distributed.chief_runs(read_here, "preset")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="preset-"))
    atexit.register(shutil.rmtree, scratch, True)
    bundle = scratch / BUNDLE_NAME
    bundle.write_bytes(data)
    info = read_bundle(bundle)["info"]
    longest = info.get("max_sequence_length")
    if longest and config.model.seq_len > longest:
        distributed.print0(
            f"note: model.seq_len {config.model.seq_len} -> {longest}, the longest input of "
            f"the preset's {info['backbone']}"
        )
        config.model.seq_len = longest
    return bundle


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
    preset = fetch_preset(config)
    task = make_task(config)
    prepare_data(task, world, preset)
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
