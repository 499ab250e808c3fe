"""Measure the project's training step: one process, or every rank under horovodrun.

    python -m bench.step --model reference --out result.json
    horovodrun -np 2 python -m bench.step --model reference --threads 1 --out result.json

The step is the real one: the train function that `model.fit` runs in
main.py (the model compiled by train.compile_model, with the
DistributedOptimizer), called on the real input pipeline (data/load.py and
the task's fit_dataset) as fit calls it, after warm-up; the result is the
median of repeated blocks. Rank 0 also measures the float32 matmul peak on the same
threads, for MFU. Prints one JSON line; writes it to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bench.common import (
    emit,
    flops_per_token,
    matmul_peaks,
    median_time,
    model_and_data,
    timing_arguments,
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("reference", "tiny", "small"), default="reference")
    p.add_argument("--batch", type=int, default=0, help="per-rank batch (default: the model's)")
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per rank (0: cores / ranks)"
    )
    p.add_argument("--xla", type=int, default=1)
    p.add_argument("--compression", default="none", choices=("none", "fp16"))
    p.add_argument(
        "--accumulate", type=int, default=1, help="micro-batches per update (allreduce once)"
    )
    p.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    p.add_argument("--no-horovod", action="store_true", help="run without Horovod at all")
    p.add_argument(
        "--dropout", type=float, default=None, help="dropout rate (default: the model's)"
    )
    timing_arguments(p)
    p.add_argument("--peak", type=int, default=1, help="also measure the matmul peak")
    p.add_argument(
        "--peak-seconds", type=float, default=3.0, help="time each peak matmul this long"
    )
    return p.parse_args(argv)


def setup(args: argparse.Namespace, world):
    """(model, model config, per-rank batch, step): `step()` runs one update as fit does."""
    import keras

    from data.load import Windows
    from models.tasks import CausalLM
    from train import compile_model
    from utils import distributed
    from utils.config import Config, TrainConfig

    if args.precision != "float32":
        keras.mixed_precision.set_global_policy(args.precision)
    model_cfg, batch, tokens, vocab = model_and_data(args.model, args.batch)
    if args.dropout is not None:
        model_cfg = dataclasses.replace(model_cfg, dropout=args.dropout)
    train_cfg = TrainConfig(
        batch_size=batch,
        xla=bool(args.xla),
        compression=args.compression,
        accumulate_steps=args.accumulate,
        warmup_steps=10,
    )
    task = CausalLM(Config(model=model_cfg, train=train_cfg))
    task.prepared = type("Prepared", (), {"vocab_size": vocab})()
    keras.utils.set_random_seed(world.rank)
    model = task.build_model()
    compile_model(task, model, train_cfg, 1e-3, 10_000)
    distributed.broadcast_model(model)
    # One update reads `accumulate` batches of `batch` rows; the stream splits them.
    shards = Windows(tokens, model_cfg.seq_len, batch * args.accumulate, world.rank, world.size)
    stream = shards.train_stream(0, 0, 0, 1_000_000, micro_batches=args.accumulate)
    iterator = iter(task.fit_dataset(stream, training=True))
    model.make_train_function()

    def step():
        for _ in range(args.accumulate):
            logs = model.train_function(iterator)
        float(logs["loss"])  # wait for the step to finish

    step.iterator = iterator  # the batches, for benchmarks that time other train functions
    return model, model_cfg, batch, step


def build_step(model: str = "reference", xla: bool = True):
    """(step, description) for one process without Horovod: what bench/profile.py records."""
    from utils import distributed

    args = parse(["--model", model, "--xla", str(int(xla)), "--no-horovod"])
    world = distributed.init(threads=0, use_horovod=False)
    _, cfg, batch, step = setup(args, world)
    return step, f"{model} (batch {batch} x {cfg.seq_len}, XLA {'on' if xla else 'off'})"


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from utils import distributed

    world = distributed.init(threads=args.threads, use_horovod=False if args.no_horovod else None)
    from models.transformer import count_params

    model, model_cfg, batch, step = setup(args, world)

    seconds, blocks = median_time(step, args.warmup, args.steps, args.repeats)
    tokens_per_step = batch * args.accumulate * model_cfg.seq_len * world.size
    params = count_params(model)
    result = {
        "model": args.model,
        "world_size": world.size,
        "threads_per_rank": world.intra_op_threads,
        "horovod": world.horovod,
        "allreduce_skipped": not (world.horovod and world.size > 1),
        "batch_per_rank": batch,
        "seq_len": model_cfg.seq_len,
        "vocab": model.vocabulary_size,
        "parameters": params,
        "xla": bool(args.xla),
        "compression": args.compression,
        "accumulate": args.accumulate,
        "precision": args.precision,
        "env": {
            k: v
            for k, v in os.environ.items()
            if k in ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME")
        },
        "ms_per_step": seconds * 1e3,
        "blocks_ms": [b * 1e3 for b in blocks],
        "tokens_per_sec": tokens_per_step / seconds,
        "flops_per_token": flops_per_token(
            params, model_cfg.n_layers, model_cfg.d_model, model_cfg.seq_len
        ),
    }
    if args.peak and world.is_chief:
        # Per rank: the model FLOPs this rank does per second, over the peak of its own threads.
        # The peak is the higher of TensorFlow's and XLA's matmul on the same threads.
        peaks = matmul_peaks(seconds=args.peak_seconds)
        peak = max(peaks.values())
        per_rank = result["flops_per_token"] * result["tokens_per_sec"] / world.size / 1e9
        result.update(
            {
                "matmul_peak_gflops": peak,
                "matmul_peak_by_path": peaks,
                "model_gflops_per_rank": per_rank,
                "mfu": per_rank / peak,
            }
        )
    if world.is_chief:
        emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
