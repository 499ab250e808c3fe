"""Tensor x data parallelism: memory per rank, and the step time at two ranks.

    python -m bench.parallel                 # both parts, about 3 minutes on 2 cores
    python -m bench.parallel --part bytes    # memory only, one process, seconds
    python -m bench.parallel --steps 10 --repeats 3
    python -m bench.parallel --part step --envs default --layouts tp2,tp2-xla --trials 5
    python -m bench.parallel --part xla-ab --trials 3 --repeats 6   # XLA segments, A/B

Memory: the bytes of parameters and optimizer slots (AdamW's two moments)
one rank holds, for T = 1, 2 and 4 on a wide model (width 512, 8 heads,
FFN 2048, 4 blocks, vocabulary 4000). The shards are built in one process
(models/tensor_parallel.py `build_shard`; sizes need no collective): the
split matrices and their slots fall to 1/T, the embeddings, norms and
row-parallel biases stay whole on every shard.

Time: the real training step (train.compile_model's DistributedOptimizer,
the train function `model.fit` runs, no XLA in either layout so that they
compare) of the wide model with 2 blocks, batch 8 x 64 tokens per replica,
under `horovodrun -np 2`: data parallel (two replicas, one gradient
allreduce per step) against T = 2 (one replica of two shards, four
activation allreduces per block and step). Each layout runs with Horovod's
defaults, with HOROVOD_CYCLE_TIME=5 (ms between the background thread's
negotiation cycles; Horovod's default otherwise), and
with HOROVOD_FUSION_THRESHOLD=0 (no tensor fusion: every allreduce of the
grouped gradient allreduce travels alone).

Layouts (`--layouts`): `dp` and `tp2` as above; `tp2-xla`, T = 2 with the
shard's compute between collectives in XLA segments (`build_shard(...,
xla=True)`, models/tensor_parallel.py); `dp-xla`, data parallel with
train.xla (XLA around the gradient allreduce, the project's default). With
`--trials N` every layout is launched N times, interleaved (A B C A B C
...), so that a change in the machine's load hits them alike; the summary
takes the median of the trials' medians, and each launch records the load
average before and after it (`--max-load L` waits for a load below L first).

`--part xla-ab`: T = 2 without and with XLA segments in the same two
processes (two shards of the same full model, each with its own train
function), timed in alternating blocks (A B, B A, A B, ...) so that other
work on the machine slows both alike; per launch, the median of each and
the median of the per-round ratios; `--trials` launches.

Results: printed, and written to bench/results/<CPU kind>/parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

from bench.common import RESULTS, emit, horovodrun_json, median_time, result_header, table

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The model whose memory is counted; the timed one has 2 of its blocks (2 cores).
WIDE = {"n_layers": 4, "n_heads": 8, "d_model": 512, "d_ff": 2048, "seq_len": 64, "dropout": 0.0}
VOCAB = 4000
STEP_LAYERS, STEP_BATCH = 2, 8
LAYOUTS = {  # name: (T, XLA)
    "dp": (1, False),
    "tp2": (2, False),
    "tp2-xla": (2, True),
    "dp-xla": (1, True),
}
LAYOUT_NAMES = {
    "dp": "data parallel (2 replicas)",
    "tp2": "T=2 (1 replica of 2 shards)",
    "tp2-xla": "T=2, XLA segments",
    "dp-xla": "data parallel, XLA",
}
ENVS = {
    "default": {},
    "HOROVOD_CYCLE_TIME=5": {"HOROVOD_CYCLE_TIME": "5"},
    "HOROVOD_FUSION_THRESHOLD=0": {"HOROVOD_FUSION_THRESHOLD": "0"},
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.parallel", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--part", choices=("all", "bytes", "step", "xla-ab"), default="all")
    p.add_argument("--tensors", default="1,2,4", help="values of T for the memory part")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing")
    p.add_argument("--steps", type=int, default=8, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks (median)")
    p.add_argument("--envs", default=",".join(ENVS), help="Horovod settings to time under")
    p.add_argument("--layouts", default="dp,tp2", help=f"layouts to time: {','.join(LAYOUTS)}")
    p.add_argument("--trials", type=int, default=1, help="launches per layout, interleaved")
    p.add_argument(
        "--max-load", type=float, default=0.0,
        help="before each launch, wait (up to 10 minutes) for the 1-minute load average to fall "
        "below this (0: do not wait); on a shared machine",
    )  # fmt: skip
    p.add_argument("--out", default="", help="the JSON result (default: bench/results/<kind>/)")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # T, under horovodrun
    p.add_argument("--xla", action="store_true", help=argparse.SUPPRESS)  # worker: XLA
    p.add_argument("--ab", action="store_true", help=argparse.SUPPRESS)  # worker: xla-ab
    return p.parse_args(argv)


def _config(n_layers: int, batch: int, xla: bool = False):
    """(Config, CausalLM) of the wide model, AdamW, for `n_layers` blocks (no XLA by default)."""
    from models.tasks import CausalLM
    from utils.config import Config, ModelConfig, TrainConfig

    config = Config(
        model=ModelConfig(**{**WIDE, "n_layers": n_layers}),
        train=TrainConfig(batch_size=batch, xla=xla, warmup_steps=10),
    )
    task = CausalLM(config)
    task.prepared = type("Prepared", (), {"vocab_size": VOCAB})()
    return config, task


def _nbytes(variables) -> int:
    return int(sum(int(v.numpy().nbytes) for v in variables))


def memory(tensors: list[int]) -> list[dict[str, Any]]:
    """Bytes of weights and optimizer slots on one rank (tensor rank 0) for each T."""
    import keras

    from models.sharded_state import ShardedState, optimizer_slot_lists
    from models.tensor_parallel import build_shard
    from train import compile_model
    from utils import distributed
    from utils.distributed.tensor_parallel import layout

    distributed.init(threads=0, use_horovod=False)
    _, task = _config(WIDE["n_layers"], STEP_BATCH)
    keras.utils.set_random_seed(0)
    full = task.build_model()
    compile_model(task, full, task.config.train, 1e-3, 1000)
    rows = []
    for tensor in tensors:
        if tensor == 1:
            model, split = full, set()
            slots = optimizer_slot_lists(full.optimizer)
        else:
            shard = build_shard(full, layout(tensor, tensor, 0))  # no Horovod: no collective
            compile_model(task, shard, task.config.train, 1e-3, 1000, xla=False)
            model, split = (
                shard,
                {id(v) for v in ShardedState(shard, full, lambda: full).split_variables()},
            )
            slots = optimizer_slot_lists(shard.optimizer)
        trainable = list(model.optimizer._trainable_variables)
        slot_of = [
            [lst[i] for lst in slots.values() if lst[i] is not None] for i in range(len(trainable))
        ]
        split_w = [v for v in trainable if id(v) in split]
        repl_w = [v for v in trainable if id(v) not in split]
        split_s = [
            s for v, ss in zip(trainable, slot_of, strict=True) if id(v) in split for s in ss
        ]
        repl_s = [
            s for v, ss in zip(trainable, slot_of, strict=True) if id(v) not in split for s in ss
        ]
        row = {
            "T": tensor,
            "params_bytes": _nbytes(trainable),
            "slot_bytes": _nbytes(s for ss in slot_of for s in ss),
            "split_params_bytes": _nbytes(split_w),
            "split_slot_bytes": _nbytes(split_s),
            "replicated_params_bytes": _nbytes(repl_w),
            "replicated_slot_bytes": _nbytes(repl_s),
        }
        row["total_bytes"] = row["params_bytes"] + row["slot_bytes"]
        rows.append(row)
    # At T=1 the same variables count as "split" (they are what T > 1 cuts): from T=2's pairs.
    base = rows[0]
    if len(rows) > 1:
        t2 = rows[1]
        base["split_params_bytes"] = t2["split_params_bytes"] * t2["T"]
        base["split_slot_bytes"] = t2["split_slot_bytes"] * t2["T"]
        base["replicated_params_bytes"] = base["params_bytes"] - base["split_params_bytes"]
        base["replicated_slot_bytes"] = base["slot_bytes"] - base["split_slot_bytes"]
    for row in rows:
        row["share_of_T1"] = row["total_bytes"] / base["total_bytes"]
    return rows


def worker(args: argparse.Namespace) -> None:
    """Under horovodrun: time the training step of T shards per replica; rank 0 prints JSON."""
    import keras
    import numpy as np

    import train
    from data.load import Windows
    from models.tensor_parallel import build_shard
    from train import compile_model, shard_model
    from utils import distributed
    from utils.callbacks import Progress

    tensor = args.worker
    if tensor > 1:
        distributed.tensor_parallel.init(tensor)
        world = distributed.world()
        # shard_model builds the shard; give it the XLA segments or not, whatever it passes.
        train.build_shard = lambda *a, **k: build_shard(*a, **{**k, "xla": args.xla})
    else:
        world = distributed.init()
    config, task = _config(STEP_LAYERS, STEP_BATCH, xla=args.xla and tensor == 1)
    keras.utils.set_random_seed(world.rank)
    model = task.build_model()
    compile_model(task, model, config.train, 1e-3, 10_000)
    tokens = np.random.default_rng(0).integers(1, VOCAB, 200_000).astype(np.int32)
    shards = Windows(
        tokens, config.model.seq_len, STEP_BATCH, distributed.data_rank(), distributed.data_size()
    )
    iterator = iter(task.fit_dataset(shards.train_stream(0, 0, 0, 1_000_000), training=True))
    if args.ab:
        _ab(args, world, task, model, iterator)
        distributed.shutdown()
        return
    if tensor > 1:
        model, _ = shard_model(task, model, Progress(), 1e-3, 10_000)
    else:
        distributed.broadcast_model(model)
    model.make_train_function()

    def step():
        float(model.train_function(iterator)["loss"])

    seconds, blocks = median_time(step, args.warmup, args.steps, args.repeats)
    if world.is_chief:
        emit(
            {
                "ms_per_step": seconds * 1e3,
                "blocks_ms": [b * 1e3 for b in blocks],
                "trainable_params_per_rank": int(
                    sum(np.prod(v.shape) for v in model.trainable_variables)
                ),
            },
            args.out,
        )
    distributed.shutdown()


def _ab(args: argparse.Namespace, world, task, full, iterator) -> None:
    """T=2 shards without (A) and with (B) XLA segments, timed in alternating blocks."""
    import train
    from models.tensor_parallel import build_shard
    from utils.callbacks import Progress

    shards = {}
    for xla in (False, True):
        train.build_shard = lambda *a, xla=xla, **k: build_shard(*a, **{**k, "xla": xla})
        shards[xla], _ = train.shard_model(task, full, Progress(), 1e-3, 10_000)
        shards[xla].make_train_function()
    steps = {
        xla: (lambda m=m: float(m.train_function(iterator)["loss"])) for xla, m in shards.items()
    }
    first = {}
    for xla in (False, True):  # the first step traces (and with XLA compiles) the step
        started = time.perf_counter()
        steps[xla]()
        first[xla] = time.perf_counter() - started
    for _ in range(args.warmup - 1):
        for xla in (False, True):
            steps[xla]()
    blocks: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for xla in (False, True) if r % 2 == 0 else (True, False):
            _, one = median_time(steps[xla], 0, args.steps, 1)
            blocks[xla] += one
    if world.is_chief:
        ratios = [b / a for a, b in zip(blocks[False], blocks[True], strict=True)]
        emit(
            {
                "ms_per_step": statistics.median(blocks[False]) * 1e3,
                "ms_per_step_xla": statistics.median(blocks[True]) * 1e3,
                "xla_ratio": statistics.median(ratios),
                "first_step_s": first[False],
                "first_step_s_xla": first[True],
                "blocks_ms": [b * 1e3 for b in blocks[False]],
                "blocks_ms_xla": [b * 1e3 for b in blocks[True]],
            },
            args.out,
        )


def time_ab(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--trials` launches of the in-process A/B of XLA segments at np=2, T=2."""
    rows = []
    for trial in range(args.trials):
        worker = ["bench.parallel", "--worker", "2", "--ab", *_timing(args)]
        rows.append({"trial": trial, **horovodrun_json(worker, max_load=args.max_load)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def time_layouts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """ms/step at np=2 of each layout (`--layouts`), under each Horovod setting, interleaved."""
    rows = []
    for env_name in args.envs.split(","):
        for trial in range(args.trials):
            for name in args.layouts.split(","):
                rows.append(_launch(args, env_name, name, trial))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _timing(args: argparse.Namespace) -> list[str]:
    return [
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
    ]


def _launch(args: argparse.Namespace, env_name: str, name: str, trial: int) -> dict[str, Any]:
    """One `horovodrun -np 2` launch timing layout `name`; its row."""
    tensor, xla = LAYOUTS[name]
    worker = [
        "bench.parallel",
        "--worker",
        str(tensor),
        *(["--xla"] if xla else []),
        *_timing(args),
    ]
    result = horovodrun_json(worker, env=ENVS[env_name], max_load=args.max_load)
    return {
        "np": 2,
        "layout": LAYOUT_NAMES[name],
        "name": name,
        "T": tensor,
        "xla": xla,
        "horovod": env_name,
        "trial": trial,
        "ms_per_step": result["ms_per_step"],
        "sequences_per_sec": STEP_BATCH * (2 // tensor) / result["ms_per_step"] * 1e3,
        **{
            key: result[key]
            for key in (
                "trainable_params_per_rank",
                "blocks_ms",
                "launch_seconds",
                "load_before",
                "load_after",
            )
        },
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (Horovod setting, layout): the median of its trials' ms/step."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["horovod"], row["name"]), []).append(row)
    summary = []
    for (env_name, _), trials in groups.items():
        ms = statistics.median(r["ms_per_step"] for r in trials)
        tensor = trials[0]["T"]
        summary.append(
            {
                "np": 2,
                "layout": trials[0]["layout"],
                "horovod": env_name,
                "trials": len(trials),
                "ms_per_step": ms,
                "trials_ms": [round(r["ms_per_step"], 1) for r in trials],
                "sequences_per_sec": STEP_BATCH * (2 // tensor) / ms * 1e3,
                "max_load_before": max(r["load_before"] for r in trials),
                "max_load_after": max(r["load_after"] for r in trials),
            }
        )
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.worker:
        worker(args)
        return {}
    header = result_header()
    result: dict[str, Any] = {
        **header,
        "wide_model": {**WIDE, "vocab": VOCAB},
        "step_model": {
            **WIDE,
            "n_layers": STEP_LAYERS,
            "vocab": VOCAB,
            "batch_per_replica": STEP_BATCH,
        },
    }
    if args.part in ("all", "bytes"):
        result["memory"] = memory([int(t) for t in args.tensors.split(",")])
        print(table(result["memory"], ["T", "params_bytes", "slot_bytes", "split_params_bytes",
                                        "replicated_params_bytes", "total_bytes", "share_of_T1"]))  # fmt: skip
    if args.part == "xla-ab":
        result["xla_ab"] = time_ab(args)
        result["xla_ab_summary"] = {
            key: statistics.median(r[key] for r in result["xla_ab"])
            for key in ("ms_per_step", "ms_per_step_xla", "xla_ratio")
        }
        print(json.dumps(result["xla_ab_summary"]))
    if args.part in ("all", "step"):
        result["load_average_before"] = os.getloadavg()
        result["step"] = time_layouts(args)
        result["step_summary"] = summarize(result["step"])
        result["load_average_after"] = os.getloadavg()
        columns = ["np", "layout", "horovod", "trials", "ms_per_step", "trials_ms"]
        print(table(result["step_summary"], [*columns, "sequences_per_sec", "max_load_before"]))
    out = pathlib.Path(args.out) if args.out else RESULTS / header["cpu_kind"] / "parallel.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
