"""tf.data pipelines over prepared data, sharded across ranks.

Two kinds of samples:

- `Windows` over a token stream (language modelling): sample i is
  tokens[i*seq_len : i*seq_len + seq_len + 1]; inputs are its first seq_len
  tokens, targets its last seq_len, so every token is a target once.
- `Documents` (classification): sample i is document i's token ids,
  truncated or right-padded with 0 to seq_len, and its label.

Both shard by *global sample index*. For epoch e, a permutation of all
samples seeded by (seed, e) is cut into global batches of batch_size x world
samples; rank r takes the r-th slice of batch_size rows of each. So:

- ranks read disjoint samples, and together exactly the samples of the epoch;
- every rank runs the same number of steps, `num_samples // global_batch`,
  whatever the data size (the last partial global batch is dropped), so no
  rank ever waits in an allreduce that another will not join;
- the position in an epoch is "samples consumed" = step x global_batch,
  which a run resumed with another number of ranks turns back into a step.

Evaluation instead covers every sample exactly once: rank r takes the r-th
contiguous block, padded to full batches with rows of weight 0, so shapes
stay static (no retracing) and padding never counts in a metric.

Every dataset yields (inputs, targets, row_weights). Rank and world size
arrive as arguments: nothing here imports Horovod.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class Shards:
    """Samples addressed by global index, read by one rank of `world`.

    Subclasses say how many samples there are and how to gather a batch.
    """

    def __init__(self, batch_size: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}); got {rank}")
        self.batch_size, self.rank, self.world = batch_size, rank, world

    @property
    def num_samples(self) -> int:
        raise NotImplementedError

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) for a batch of sample indices."""
        raise NotImplementedError

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one row of inputs and of targets."""
        raise NotImplementedError

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per epoch: the same on every rank."""
        return self.num_samples // self.global_batch

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """The permutation of sample indices for `epoch`, identical on every rank."""
        return np.random.default_rng([seed, epoch]).permutation(self.num_samples)

    def rank_indices(self, epoch: int, seed: int, steps: int | None = None) -> np.ndarray:
        """[steps, batch_size] sample indices this rank reads in `epoch`."""
        steps = self.steps_per_epoch if steps is None else min(steps, self.steps_per_epoch)
        order = self.epoch_order(epoch, seed)[: steps * self.global_batch]
        return order.reshape(steps, self.world, self.batch_size)[:, self.rank, :]

    def _dataset(self, indices: np.ndarray, weights: np.ndarray) -> tf.data.Dataset:
        """Batches (inputs, targets, row weights) for `indices` of shape [batches, batch_size]."""
        x_shape, y_shape = self.shapes()

        def load(idx, w):
            x, y = tf.numpy_function(self.gather, [idx], (tf.int32, tf.int32), stateful=False)
            x.set_shape((self.batch_size, *x_shape))
            y.set_shape((self.batch_size, *y_shape))
            return x, y, w

        ds = tf.data.Dataset.from_tensor_slices((indices, weights))
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def train_dataset(
        self, epoch: int, seed: int, start_step: int = 0, steps: int | None = None
    ) -> tf.data.Dataset:
        """This rank's batches for `epoch`, from `start_step` (to resume mid-epoch).

        Args:
            epoch: epoch number; with `seed`, it fixes the order.
            seed: the run's seed.
            start_step: first step to yield (steps before it were already taken).
            steps: cap on steps in the epoch (default: steps_per_epoch).
        """
        indices = self.rank_indices(epoch, seed, steps)[start_step:]
        return self._dataset(indices, np.ones(indices.shape, np.float32))

    def eval_indices(self, max_batches: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous block of samples as [batches, batch_size], and row weights."""
        bounds = np.linspace(0, self.num_samples, self.world + 1).round().astype(np.int64)
        mine = np.arange(bounds[self.rank], bounds[self.rank + 1])
        if max_batches:
            mine = mine[: max_batches * self.batch_size]
        batches = -(-len(mine) // self.batch_size)
        padded = np.zeros(batches * self.batch_size, np.int64)
        weights = np.zeros(batches * self.batch_size, np.float32)
        padded[: len(mine)], weights[: len(mine)] = mine, 1.0
        shape = (batches, self.batch_size)
        return padded.reshape(shape), weights.reshape(shape)

    def eval_dataset(self, max_batches: int = 0) -> tf.data.Dataset:
        """This rank's share of every sample once, in order, as padded batches."""
        return self._dataset(*self.eval_indices(max_batches))


class Windows(Shards):
    """Windows of `seq_len + 1` tokens over a token stream: inputs and next-token targets."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world: int = 1
    ):
        super().__init__(batch_size, rank, world)
        self.tokens, self.seq_len = tokens, seq_len

    @property
    def num_samples(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.seq_len

    def shapes(self):
        return (self.seq_len,), (self.seq_len,)

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = indices.astype(np.int64) * self.seq_len
        rows = np.asarray(
            self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int32
        )
        return rows[:, :-1], rows[:, 1:]


class Documents(Shards):
    """Labelled documents: token ids (flat, with offsets) truncated or padded to `seq_len`.

    Args:
        ids: every document's token ids, concatenated.
        offsets: document i is ids[offsets[i]:offsets[i+1]] (len = documents + 1).
        labels: one class id per document.
        seq_len: tokens per row (longer documents are cut, shorter padded with 0).
    """

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        labels: np.ndarray,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
    ):
        super().__init__(batch_size, rank, world)
        if len(offsets) != len(labels) + 1:
            raise ValueError(
                f"offsets must have one entry more than labels; got {len(offsets)} and {len(labels)}"
            )
        self.ids, self.offsets, self.labels, self.seq_len = ids, offsets, labels, seq_len

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def shapes(self):
        return (self.seq_len,), ()

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.zeros((len(indices), self.seq_len), np.int32)
        for row, i in enumerate(indices):
            start, end = self.offsets[i], min(self.offsets[i + 1], self.offsets[i] + self.seq_len)
            rows[row, : end - start] = self.ids[start:end]
        return rows, np.asarray(self.labels[indices], dtype=np.int32)


def resume_step(samples_consumed: int, global_batch: int) -> int:
    """The step at which an epoch continues after `samples_consumed` samples.

    Exact when the old and new global batches divide each other's multiples
    (e.g. np=2 -> np=1 with the same per-rank batch); otherwise the partial
    global batch is taken again.
    """
    return samples_consumed // global_batch
