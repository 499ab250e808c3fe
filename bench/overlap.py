"""The gradient allreduce overlapped with the backward pass, at np=2 (issue 10).

    python -m bench.overlap                        # 3 launches of horovodrun -np 2, ~4 minutes
    python -m bench.overlap --trials 1 --repeats 4 # one launch
    python -m bench.overlap --model small
    python -m bench.overlap --model small --dropout 0
    python -m bench.overlap --variants one,local,sync   # where np=2 loses time

The project's step compiles the whole forward and backward pass into one
XLA computation, so every gradient is ready at the same moment and one
grouped allreduce follows it: nothing overlaps the communication. Overlap
needs the backward pass in pieces whose gradients are ready one after
another. Three train functions of the same model (`--model`, 1 thread per
rank as in the scaling suite), each built by
`utils.distributed.train_function.make_averaged_function`:

- `one`: the project's step: forward and backward as one XLA computation,
  one grouped allreduce, the update in XLA.
- `segments`: each Transformer block's forward and backward is an XLA
  computation of its own (`tf.function(jit_compile=True)` around the
  block's `call`); embeddings, head and loss run in TensorFlow's graph
  executor; one grouped allreduce after the backward pass. It prices the
  cut alone.
- `overlap`: the same segments, and one allreduce per gradient
  (`utils.distributed.core.allreduce_each`): the graph executor hands each
  gradient to Horovod as soon as its block's backward has made it, and
  Horovod sends what is ready every cycle while the earlier blocks'
  backward runs.

Two more (`--variants one,local,sync`) tell where np=2 loses time against
two processes that do not communicate, both with the project's XLA step cut
where the allreduce goes:

- `local`: no communication at all (the ranks drift apart; only the time
  counts): the price of cutting the step in three;
- `sync`: the ranks meet once after the backward pass (an allreduce of one
  number that depends on every gradient) and average nothing: the price
  of waiting for the slower rank.

They run in the same two processes on the same weights, timed in rotating
blocks (A B C, B C A, C A B, ...), so that other work on the machine slows
them alike. Per launch: each one's median ms/step and the medians of the
per-round ratios against `one`; `--trials` launches.
Results: printed, and written to bench/results/<CPU kind>/overlap.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

from bench.common import RESULTS, emit, horovodrun_json, median_time, result_header

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ("one", "segments", "overlap", "local", "sync")
DEFAULT_VARIANTS = "one,segments,overlap"
SEGMENTED = ("segments", "overlap")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.overlap", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", choices=("reference", "small"), default="reference")
    p.add_argument("--dropout", default="", help="dropout rate (default: the model's)")
    p.add_argument("--warmup", type=int, default=10, help="steps of each variant before timing")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=6, help="timed blocks of each variant")
    p.add_argument("--trials", type=int, default=3, help="launches of horovodrun -np 2")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"train functions to time, 'one' first: {','.join(VARIANTS)}",
    )
    p.add_argument("--out", default="", help="the JSON result (default: bench/results/<kind>/)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # under horovodrun
    return p.parse_args(argv)


def segment_blocks(model, segmented: list[bool]) -> int:
    """Give every Transformer block a `call` that is an XLA computation while `segmented[0]`.

    The choice is made when a train function is traced, so functions traced
    before and after flipping the flag keep their own. Returns the block count.
    """
    import keras_hub
    import tensorflow as tf

    blocks = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(
            layer, keras_hub.layers.TransformerDecoder | keras_hub.layers.TransformerEncoder
        )
    ]
    for block in blocks:
        plain = block.call
        compiled = tf.function(plain, jit_compile=True, reduce_retracing=True)

        def call(*args, _plain=plain, _compiled=compiled, **kwargs):
            return (_compiled if segmented[0] else _plain)(*args, **kwargs)

        block.call = call
    return len(blocks)


def _variants(args: argparse.Namespace) -> list[str]:
    names = args.variants.split(",")
    if names[0] != "one" or not set(names) <= set(VARIANTS) or len(set(names)) < len(names):
        raise SystemExit(f"--variants: 'one' first, then some of {', '.join(VARIANTS[1:])}")
    return names


def _sync_only(dist, grads: list) -> list:
    """The ranks meet once after the backward pass (one scalar allreduce), averaging nothing."""
    import tensorflow as tf

    from utils import distributed

    ready = tf.add_n([tf.reshape(g, [-1])[0] for g in grads if g is not None])
    met = distributed.allreduce(ready * 0.0)
    return [None if g is None else g + met for g in grads]


def worker(args: argparse.Namespace) -> None:
    """Under horovodrun: the train functions in rotating blocks; rank 0 writes JSON."""
    from bench.step import parse as step_parse
    from bench.step import setup
    from utils import distributed
    from utils.distributed.averaged_update import average, find_distributed
    from utils.distributed.train_function import make_averaged_function

    world = distributed.init(threads=1)
    if world.size < 2:
        raise SystemExit("bench.overlap --worker runs under horovodrun -np 2 or more")
    dropout = ["--dropout", args.dropout] if args.dropout else []
    model, _, _, step = setup(
        step_parse(["--model", args.model, "--threads", "1", *dropout]), world
    )
    dist = find_distributed(model.optimizer)
    segmented = [False]
    blocks = segment_blocks(model, segmented)
    reductions = {
        "segments": average,
        "overlap": lambda d, grads: distributed.allreduce_each(grads, d._hvd_compression),
        "local": lambda d, grads: grads,
        "sync": _sync_only,
    }
    variants = _variants(args)
    functions = {
        name: model.train_function
        if name == "one"
        else make_averaged_function(
            model, dist, forward_xla=name not in SEGMENTED, reduce=reductions[name]
        )
        for name in variants
    }
    iterator = step.iterator
    steps = {name: (lambda f=f: float(f(iterator)["loss"])) for name, f in functions.items()}
    first = {}
    for name in variants:  # the first call traces (and compiles) each
        segmented[0] = name in SEGMENTED
        started = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - started
    for _ in range(args.warmup):
        for name in variants:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        turn = r % len(variants)
        for name in variants[turn:] + variants[:turn]:
            times[name] += median_time(steps[name], 0, args.steps, 1)[1]
    if world.is_chief:
        emit(
            {
                "blocks_segmented": blocks,
                **{f"ms_per_step_{n}": statistics.median(t) * 1e3 for n, t in times.items()},
                **{
                    f"ratio_{n}": statistics.median(
                        b / a for a, b in zip(times["one"], times[n], strict=True)
                    )
                    for n in variants[1:]
                },
                "first_call_s": first,
                "blocks_ms": {n: [b * 1e3 for b in t] for n, t in times.items()},
            },
            args.out,
        )
    distributed.shutdown()


def launch(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--trials` launches of the worker under `horovodrun -np 2`."""
    rows = []
    for trial in range(args.trials):
        worker = ["bench.overlap", "--worker", "--model", args.model]
        worker += ["--dropout", args.dropout] if args.dropout else []
        worker += ["--variants", args.variants]
        worker += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        rows.append({"trial": trial, **horovodrun_json([*worker, "--repeats", str(args.repeats)])})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "blocks_ms"}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.worker:
        worker(args)
        return {}
    variants = _variants(args)
    header = result_header()
    rows = launch(args)
    keys = [f"ms_per_step_{n}" for n in variants] + [f"ratio_{n}" for n in variants[1:]]
    result = {
        **header,
        "model": args.model,
        "dropout": args.dropout or "the model's",
        "np": 2,
        "threads_per_rank": 1,
        "command": "python -m bench.overlap " + " ".join(argv or sys.argv[1:]),
        "trials": rows,
        "summary": {k: statistics.median(r[k] for r in rows) for k in keys},
    }
    print(json.dumps(result["summary"]))
    out = pathlib.Path(args.out) if args.out else RESULTS / header["cpu_kind"] / "overlap.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
