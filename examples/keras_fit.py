"""A plain Keras training script in Horovod's idiom, on the project's Keras 3 integration.

    horovodrun -np 2 python examples/keras_fit.py
    python examples/keras_fit.py            # the same script, one process

It makes the calls of Horovod's own Keras examples
(examples/tensorflow2/tensorflow2_keras_mnist.py in Horovod 0.28.1), in the
same places, with `import utils.distributed as hvd` in place of
`import horovod.tensorflow.keras as hvd`, which under Keras 3 silently does
not average gradients. The model is a small GPT (keras-hub layers) that
learns synthetic sequences; nothing is downloaded.

Data parallelism as Horovod does it: every rank reads its own slice of each
global batch (batch size x ranks), the DistributedOptimizer averages the
gradients, so `-np 2 --batch-size B` trains the same weights as one process
with `--batch-size 2B` and the same global learning rate.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the project's root

import utils.distributed as hvd


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step on each rank")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of one rank")
    p.add_argument("--warmup-epochs", type=int, default=2, help="0: no warmup")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--jit-compile", action="store_true", help="XLA (off by default on CPUs)")
    p.add_argument("--out", default="keras_fit_out", help="checkpoints and final weights")
    return p.parse_args(argv)


def synthetic_sequences(samples: int, length: int = 17, vocabulary: int = 32, seed: int = 0):
    """Sequences that count up from a random start by a random step (mod vocabulary)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocabulary, (samples, 1))
    step = rng.integers(1, 4, (samples, 1))
    tokens = (start + step * np.arange(length)) % vocabulary
    return tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")


def build_model(vocabulary: int = 32, length: int = 16):
    import keras
    import keras_hub

    token_ids = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, 32)(token_ids)
    x = x + keras_hub.layers.PositionEmbedding(length)(x)
    x = keras_hub.layers.TransformerDecoder(64, num_heads=2, normalize_first=True)(x)
    logits = keras.layers.Dense(vocabulary)(keras.layers.LayerNormalization()(x))
    return keras.Model(token_ids, logits)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)

    # Horovod: initialize Horovod.
    hvd.init()

    import keras
    import numpy as np
    import tensorflow as tf

    # Horovod: pin GPU to be used to process local rank (one GPU per process).
    gpus = tf.config.experimental.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.experimental.set_visible_devices(gpus[hvd.local_rank()], "GPU")

    # Every rank holds the (synthetic) data and reads its slice of every global batch.
    inputs, targets = synthetic_sequences(args.samples)
    global_batch = args.batch_size * hvd.size()
    rank_rows = slice(hvd.rank() * args.batch_size, (hvd.rank() + 1) * args.batch_size)
    dataset = (
        tf.data.Dataset.from_tensor_slices((inputs, targets))
        .shuffle(args.samples, seed=0)
        .repeat()
        .batch(global_batch, drop_remainder=True)
        .map(lambda x, y: (x[rank_rows], y[rank_rows]))
    )

    # Different random weights on every rank: the broadcast below makes them rank 0's.
    keras.utils.set_random_seed(hvd.rank())
    model = build_model()

    # Horovod: adjust learning rate based on number of ranks.
    scaled_lr = args.lr * hvd.size()
    opt = keras.optimizers.SGD(scaled_lr, momentum=0.9)

    # Horovod: add Horovod DistributedOptimizer.
    opt = hvd.DistributedOptimizer(
        opt, backward_passes_per_step=1, average_aggregated_gradients=True
    )

    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=opt,
        metrics=["accuracy"],
        jit_compile=args.jit_compile,
    )

    callbacks = [
        # Horovod: broadcast initial variable states from rank 0 to all other processes.
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Horovod: average metrics among workers at the end of every epoch.
        # Note: before the callbacks that read metrics (ReduceLROnPlateau, TensorBoard, ...).
        hvd.callbacks.MetricAverageCallback(),
    ]
    if args.warmup_epochs:
        # Horovod: ramp the learning rate up to `scaled_lr` over the first epochs.
        callbacks.append(
            hvd.callbacks.LearningRateWarmupCallback(
                initial_lr=scaled_lr, warmup_epochs=args.warmup_epochs, verbose=1
            )
        )

    out = pathlib.Path(args.out)
    # Horovod: save checkpoints only on worker 0 to prevent other workers from corrupting them.
    if hvd.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(str(out / "checkpoint-{epoch}.keras")))

    # Horovod: write logs on worker 0.
    verbose = 2 if hvd.rank() == 0 else 0

    # Train the model.
    # Horovod: adjust number of steps based on number of ranks.
    history = model.fit(
        dataset,
        steps_per_epoch=args.samples // global_batch,
        callbacks=callbacks,
        epochs=args.epochs,
        verbose=verbose,
    )

    # For comparing runs: every rank's final weights (the ranks should hold the same).
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"weights-rank{hvd.rank()}.npz", *[w.numpy() for w in model.weights])
    if hvd.rank() == 0:
        losses = ", ".join(f"{loss:.4f}" for loss in history.history["loss"])
        print(f"loss per epoch: {losses}", flush=True)


if __name__ == "__main__":
    main()
