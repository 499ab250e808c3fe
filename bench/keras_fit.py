"""A stock Keras `model.fit(jit_compile=True)`: the yardstick for the project's train function.

    python -m bench.keras_fit --model reference --out result.json

The same model, optimizer, loss and metrics as `python -m bench.step`, but
none of the project's training code: no DistributedOptimizer, no Horovod,
Keras's own train function, fed by a plain `tf.data` pipeline over the same
tokens. Times the same way (median of blocks after warm-up, measured between
batch ends by a callback). Prints one JSON line; writes it to --out.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

from bench.common import emit, timing_arguments


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.keras_fit", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", choices=("reference", "tiny", "small"), default="reference")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    timing_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from utils import distributed

    world = distributed.init(threads=args.threads, use_horovod=False)
    import keras
    import numpy as np
    import tensorflow as tf

    from bench.common import model_and_data
    from models.tasks import CausalLM
    from models.transformer import build_causal_lm, count_params
    from train import build_optimizer
    from utils.config import Config, TrainConfig

    model_cfg, batch, tokens, vocab = model_and_data(args.model, 0)
    keras.utils.set_random_seed(0)
    model = build_causal_lm(model_cfg, vocab)
    model.compile(
        optimizer=build_optimizer(TrainConfig(warmup_steps=10), 1e-3, 10_000),
        jit_compile=True,
        **CausalLM(Config(model=model_cfg)).compile_args(),
    )
    t = model_cfg.seq_len
    windows = (len(tokens) - 1) // t
    starts = np.arange(windows) * t
    rows = np.asarray(tokens)[starts[:, None] + np.arange(t + 1)].astype("int32")
    x = {"token_ids": rows[:, :-1], "padding_mask": np.ones_like(rows[:, :-1])}
    data = tf.data.Dataset.from_tensor_slices((x, rows[:, 1:]))
    data = data.shuffle(4096, seed=0).repeat().batch(batch, drop_remainder=True).prefetch(8)

    ends: list[float] = []

    class BatchTimes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # the step has finished
            ends.append(time.perf_counter())

    total = args.warmup + args.steps * args.repeats
    model.fit(data, epochs=1, steps_per_epoch=total, callbacks=[BatchTimes()], verbose=0)
    marks = ends[args.warmup - 1 :: args.steps]
    blocks = [(b - a) / args.steps for a, b in itertools.pairwise(marks)]
    seconds = statistics.median(blocks)
    result = {
        "model": args.model,
        "stack": "stock Keras model.fit(jit_compile=True)",
        "world_size": 1,
        "threads_per_rank": world.intra_op_threads,
        "batch_per_rank": batch,
        "seq_len": t,
        "vocab": vocab,
        "parameters": count_params(model),
        "ms_per_step": seconds * 1e3,
        "blocks_ms": [b * 1e3 for b in blocks],
        "tokens_per_sec": batch * t / seconds,
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
