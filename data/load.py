"""tf.data pipelines over prepared data, sharded across ranks.

Three kinds of samples:

- `Windows` over a token stream (language modelling): sample i is
  tokens[i*seq_len : i*seq_len + seq_len + 1]; inputs are its first seq_len
  tokens, targets its last seq_len, so every token is a target once.
- `Documents` (classification): sample i is document i's token ids,
  truncated or right-padded with 0 to seq_len, and its label.
- `Pairs` (sequence to sequence): sample i is source i's ids and target i's,
  as encoder input, decoder input (BOS + target) and labels (target + EOS).

All shard by *global sample index*. For epoch e, a permutation of all
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

from data.prepare import BOS_ID, EOS_ID


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

    def _load(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(inputs, targets) for a batch of sample indices, inside tf.data."""
        x_shape, y_shape = self.shapes()
        x, y = tf.numpy_function(self.gather, [indices], (tf.int32, tf.int32), stateful=False)
        rows = indices.shape[0]
        x.set_shape((rows, *x_shape))
        y.set_shape((rows, *y_shape))
        return x, y

    def _dataset(self, indices: np.ndarray, weights: np.ndarray) -> tf.data.Dataset:
        """Batches (inputs, targets, row weights) for `indices` of shape [batches, batch_size]."""
        ds = tf.data.Dataset.from_tensor_slices((indices, weights))
        ds = ds.map(lambda i, w: (*self._load(i), w), num_parallel_calls=tf.data.AUTOTUNE)
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

    def train_stream(
        self,
        seed: int,
        epoch: int,
        start_step: int,
        end_epoch: int,
        steps: int | None = None,
        micro_batches: int = 1,
        max_steps: int | None = None,
    ) -> tf.data.Dataset:
        """This rank's batches from `start_step` of `epoch` to the end of epoch `end_epoch - 1`.

        One dataset for a whole `model.fit` (epochs after each other, each in
        its own seeded order), so that a run resumed mid-epoch goes on from
        the exact sample.

        Args:
            seed: the run's seed.
            epoch, start_step: where to start.
            end_epoch: the epoch to stop before.
            steps: steps per epoch (default: steps_per_epoch).
            micro_batches: split each step's rows into this many batches
                (gradient accumulation: one update per `micro_batches` batches).
            max_steps: stop after this many steps in all.
        """
        rows = self.batch_size // micro_batches

        def indices(e: np.int64) -> np.ndarray:
            ix = self.rank_indices(int(e), seed, steps)[start_step if e == epoch else 0 :]
            return ix.reshape(-1, rows).astype(np.int64)

        def epoch_batches(e: tf.Tensor) -> tf.data.Dataset:
            ix = tf.numpy_function(indices, [e], tf.int64, stateful=False)
            return tf.data.Dataset.from_tensor_slices(tf.reshape(ix, (-1, rows)))

        ds = tf.data.Dataset.range(epoch, end_epoch).flat_map(epoch_batches)
        if max_steps is not None:
            ds = ds.take(max_steps * micro_batches)
        ones = tf.ones((rows,), tf.float32)
        ds = ds.map(lambda i: (*self._load(i), ones), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

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

    def validation_dataset(self, max_batches: int = 0) -> tf.data.Dataset:
        """This rank's share of every sample once, in order; the last batch may be short.

        For `model.fit(validation_data=...)`: no padding rows, so Keras's
        loss (a mean weighted by batch size) is exact. Ranks may run
        different numbers of batches: validation runs no collective per batch.
        """
        indices, weights = self.eval_indices(max_batches)
        mine = indices.ravel()[weights.ravel() > 0]
        ds = tf.data.Dataset.from_tensor_slices(mine).batch(self.batch_size)
        ds = ds.map(lambda i: (*self._load(i), tf.ones(tf.shape(i), tf.float32)))
        return ds.prefetch(tf.data.AUTOTUNE)


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
        seq_len: tokens per row (longer documents are cut, shorter padded).
        pad_id: the id that fills a short row.
        start_id, end_id: ids that open and close every row (a preset's
            [CLS] and [SEP], which its pretraining put there); None: none.
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
        pad_id: int = 0,
        start_id: int | None = None,
        end_id: int | None = None,
    ):
        super().__init__(batch_size, rank, world)
        if len(offsets) != len(labels) + 1:
            raise ValueError(
                f"offsets must have one entry more than labels; got {len(offsets)} and {len(labels)}"
            )
        self.ids, self.offsets, self.labels, self.seq_len = ids, offsets, labels, seq_len
        self.pad_id, self.start_id, self.end_id = pad_id, start_id, end_id

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def shapes(self):
        return (self.seq_len,), ()

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.zeros((len(indices), self.seq_len), np.int32)
        for row, i in enumerate(indices):
            ids = self.ids[self.offsets[i] : self.offsets[i + 1]]
            rows[row] = document_row(ids, self.seq_len, self.pad_id, self.start_id, self.end_id)
        return rows, np.asarray(self.labels[indices], dtype=np.int32)


def document_row(
    ids: np.ndarray,
    seq_len: int,
    pad_id: int = 0,
    start_id: int | None = None,
    end_id: int | None = None,
) -> np.ndarray:
    """One document as a model row: [start] ids... [end], cut to `seq_len` and padded."""
    row = np.full(seq_len, pad_id, np.int32)
    first = 0 if start_id is None else 1
    body = seq_len - first - (end_id is not None)
    ids = np.asarray(ids[:body], np.int32)
    row[first : first + len(ids)] = ids
    if start_id is not None:
        row[0] = start_id
    if end_id is not None:
        row[first + len(ids)] = end_id
    return row


class Pairs(Shards):
    """Source/target pairs for an encoder-decoder, with teacher forcing (task seq2seq).

    Sample i's inputs are a dict: "source", its source ids cut or right-padded
    with 0 to `source_len`, and "decoder", BOS followed by its target ids;
    its targets are the target ids followed by EOS. Both decoder rows are
    cut or padded to `target_len + 1`, so a target of `target_len` tokens
    still ends with EOS.

    Args:
        source_ids, source_offsets: every source's ids, concatenated; source i
            is source_ids[source_offsets[i]:source_offsets[i+1]].
        target_ids, target_offsets: the same for the targets.
        source_len: tokens per source row (model.seq_len).
        target_len: longest target (model.target_len).
        bos_id, eos_id: the ids that open the decoder's input and end its targets.
    """

    def __init__(
        self,
        source_ids: np.ndarray,
        source_offsets: np.ndarray,
        target_ids: np.ndarray,
        target_offsets: np.ndarray,
        source_len: int,
        target_len: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
    ):
        super().__init__(batch_size, rank, world)
        if len(source_offsets) != len(target_offsets):
            raise ValueError(
                f"sources and targets must pair up; got {len(source_offsets) - 1} sources and "
                f"{len(target_offsets) - 1} targets"
            )
        self.source_ids, self.source_offsets = source_ids, source_offsets
        self.target_ids, self.target_offsets = target_ids, target_offsets
        self.source_len, self.decoder_len = source_len, target_len + 1
        self.bos_id, self.eos_id = bos_id, eos_id

    @property
    def num_samples(self) -> int:
        return len(self.source_offsets) - 1

    @property
    def seq_len(self) -> int:
        """Positions per sample, encoder's and decoder's: what tokens/s counts."""
        return self.source_len + self.decoder_len

    def shapes(self) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
        """Shapes of one row: of the inputs (a dict, as `gather` returns them) and of the labels."""
        return {"source": (self.source_len,), "decoder": (self.decoder_len,)}, (self.decoder_len,)

    def gather(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rows = len(indices)
        source = np.zeros((rows, self.source_len), np.int32)
        decoder = np.zeros((rows, self.decoder_len), np.int32)
        labels = np.zeros((rows, self.decoder_len), np.int32)
        for row, i in enumerate(indices):
            start = self.source_offsets[i]
            end = min(self.source_offsets[i + 1], start + self.source_len)
            source[row, : end - start] = self.source_ids[start:end]
            start = self.target_offsets[i]
            end = min(self.target_offsets[i + 1], start + self.decoder_len - 1)
            target = self.target_ids[start:end]
            decoder[row, 0], decoder[row, 1 : len(target) + 1] = self.bos_id, target
            labels[row, : len(target)], labels[row, len(target)] = target, self.eos_id
        return {"source": source, "decoder": decoder}, labels

    def _load(self, indices: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        def flat(ix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            inputs, labels = self.gather(ix)
            return inputs["source"], inputs["decoder"], labels

        source, decoder, labels = tf.numpy_function(
            flat, [indices], (tf.int32, tf.int32, tf.int32), stateful=False
        )
        rows = indices.shape[0]
        source.set_shape((rows, self.source_len))
        decoder.set_shape((rows, self.decoder_len))
        labels.set_shape((rows, self.decoder_len))
        return {"source": source, "decoder": decoder}, labels


def resume_step(samples_consumed: int, global_batch: int) -> int:
    """The step at which an epoch continues after `samples_consumed` samples.

    Exact when the old and new global batches divide each other's multiples
    (e.g. np=2 -> np=1 with the same per-rank batch); otherwise the partial
    global batch is taken again.
    """
    return samples_consumed // global_batch
