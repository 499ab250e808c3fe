"""data/load.py: window shapes, disjoint shards, equal steps on every rank, resume."""

import numpy as np
import pytest

from data.load import Windows, resume_step


def _all_rank_indices(tokens, seq_len, batch, world, epoch=0, seed=0, steps=None):
    return [
        Windows(tokens, seq_len, batch, r, world).rank_indices(epoch, seed, steps)
        for r in range(world)
    ]


def test_windows_are_shifted_pairs():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = Windows(tokens, seq_len=8, batch_size=4)
    x, y, w = next(iter(windows.train_dataset(epoch=0, seed=0)))
    assert x.shape == y.shape == (4, 8) and w.shape == (4,)
    assert x.dtype.name == "int32"
    np.testing.assert_array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])
    np.testing.assert_array_equal(
        x.numpy() % 8, np.tile(np.arange(8), (4, 1))
    )  # windows start at multiples of seq_len
    assert windows.num_samples == (1000 - 1) // 8


@pytest.mark.parametrize("n_tokens", [1, 9, 100, 101, 1234, 5003])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_ranks_step_equally(n_tokens, world):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    seq_len, batch = 7, 3
    per_rank = _all_rank_indices(tokens, seq_len, batch, world)
    steps = {len(ix) for ix in per_rank}
    assert (
        len(steps) == 1
    )  # the same number of steps everywhere: no rank waits in an allreduce alone
    num_samples = max(n_tokens - 1, 0) // seq_len
    assert steps.pop() == num_samples // (batch * world)
    seen = np.concatenate([ix.ravel() for ix in per_rank])
    assert len(seen) == len(set(seen.tolist()))  # disjoint
    # ...and the datasets yield exactly those batches
    for rank, ix in enumerate(per_rank):
        batches = list(Windows(tokens, seq_len, batch, rank, world).train_dataset(0, 0))
        assert len(batches) == len(ix)


def test_order_is_seeded_and_changes_per_epoch():
    tokens = np.arange(4000, dtype=np.uint16)
    w = Windows(tokens, 10, 4, 0, 2)
    np.testing.assert_array_equal(w.rank_indices(0, 1), w.rank_indices(0, 1))
    assert not np.array_equal(w.rank_indices(0, 1), w.rank_indices(1, 1))
    assert not np.array_equal(w.rank_indices(0, 1), w.rank_indices(0, 2))


def test_epoch_position_survives_a_change_of_world_size():
    """np=2 for 5 steps, then np=1 from the same position: every sample of the epoch once."""
    tokens = np.arange(10_000, dtype=np.uint16)
    seq_len, batch = 5, 4
    two = _all_rank_indices(tokens, seq_len, batch, world=2)
    consumed_steps = 5
    before = np.concatenate([ix[:consumed_steps].ravel() for ix in two])
    one = Windows(tokens, seq_len, batch, 0, 1)
    start = resume_step(consumed_steps * 2 * batch, one.global_batch)
    after = one.rank_indices(0, 0)[start:].ravel()
    together = np.concatenate([before, after])
    assert len(together) == len(set(together.tolist()))
    assert set(together.tolist()) == set(one.rank_indices(0, 0).ravel().tolist())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_covers_every_sample_once(world):
    tokens = np.arange(1001, dtype=np.uint16)
    seq_len, batch = 6, 4  # 166 samples: does not divide into batches or ranks
    seen, weight_total = [], 0.0
    for rank in range(world):
        for x, _, w in Windows(tokens, seq_len, batch, rank, world).eval_dataset():
            assert x.shape == (batch, seq_len)
            real = w.numpy() > 0
            seen.extend((x.numpy()[real, 0] // seq_len).tolist())
            weight_total += float(w.numpy().sum())
    assert sorted(seen) == list(range(166)) and weight_total == 166


def test_eval_batch_cap():
    windows = Windows(np.arange(1001, dtype=np.uint16), 6, 4)
    assert len(list(windows.eval_dataset(max_batches=3))) == 3


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be in"):
        Windows(np.arange(10), 2, 2, rank=2, world=2)
