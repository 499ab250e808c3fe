"""tf.data pipelines over prepared token shards, sharded across ranks.

A split's token stream is cut into samples: sample i is the window
tokens[i*seq_len : i*seq_len + seq_len + 1] (inputs are its first seq_len
tokens, targets its last seq_len, so consecutive windows share one token and
every token is a target once).

Training shards by *global sample index*. For epoch e, a permutation of all
samples seeded by (seed, e) is cut into global batches of batch_size x world
samples; rank r takes the r-th slice of batch_size rows of each. So:

- ranks read disjoint samples, and together exactly the samples of the epoch;
- every rank runs the same number of steps, `num_samples // global_batch`,
  whatever the corpus size (the last partial global batch is dropped), so no
  rank ever waits in an allreduce that another will not join;
- the position in an epoch is "samples consumed" = step x global_batch,
  which a run resumed with another number of ranks turns back into a step.

Evaluation instead covers every sample exactly once: rank r takes the r-th
contiguous block, padded to full batches with rows of weight 0, so shapes
stay static (no retracing) and padding never counts in a metric.

Rank and world size arrive as arguments: nothing here imports Horovod.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Windows:
    """Samples of `seq_len + 1` tokens over one split, for one rank of `world`."""

    tokens: np.ndarray
    seq_len: int
    batch_size: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world={self.world}); got {self.rank}")

    @property
    def num_samples(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.seq_len

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

    def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = indices.astype(np.int64) * self.seq_len
        rows = np.asarray(
            self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int32
        )
        return rows[:, :-1], rows[:, 1:]

    def _dataset(self, indices: np.ndarray, weights: np.ndarray) -> tf.data.Dataset:
        """Batches (inputs, targets, row weights) for `indices` of shape [batches, batch_size]."""
        seq_len, batch = self.seq_len, self.batch_size

        def load(idx, w):
            x, y = tf.numpy_function(self._gather, [idx], (tf.int32, tf.int32), stateful=False)
            x.set_shape((batch, seq_len))
            y.set_shape((batch, seq_len))
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


def resume_step(samples_consumed: int, global_batch: int) -> int:
    """The step at which an epoch continues after `samples_consumed` samples.

    Exact when the old and new global batches divide each other's multiples
    (e.g. np=2 -> np=1 with the same per-rank batch); otherwise the partial
    global batch is taken again.
    """
    return samples_consumed // global_batch
