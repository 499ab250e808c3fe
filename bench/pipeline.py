"""Input pipeline alone: tokens/s that data/load.py delivers, with no model attached.

    python -m bench.pipeline --model reference --out result.json

Runs the same tf.data pipeline training uses (seeded shuffle, window
gather, batch, prefetch) on the same threads, epoch after epoch, and
reports the median rate of repeated blocks after warm-up.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import model_and_data, timing_arguments


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", choices=("reference", "tiny", "small"), default="reference")
    p.add_argument("--batch", type=int, default=0, help="per-rank batch (default: the model's)")
    p.add_argument("--threads", type=int, default=0)
    timing_arguments(p, warmup=50, steps=500)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from utils import distributed

    world = distributed.init(threads=args.threads, use_horovod=False)
    from bench.common import emit, endless_batches, median_time
    from data.load import Windows

    model_cfg, batch, tokens, _ = model_and_data(args.model, args.batch)
    shards = Windows(tokens, model_cfg.seq_len, batch)

    stream = endless_batches(shards)

    def step():
        x, _, _ = next(stream)
        x.numpy()

    seconds, _ = median_time(step, args.warmup, args.steps, args.repeats)
    result = {
        "model": args.model,
        "threads": world.intra_op_threads,
        "batch_per_rank": batch,
        "seq_len": model_cfg.seq_len,
        "ms_per_batch": seconds * 1e3,
        "tokens_per_sec": batch * model_cfg.seq_len / seconds,
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
