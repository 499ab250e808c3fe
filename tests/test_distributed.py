"""The Horovod integration (utils/distributed.py + the train step), proven across ranks.

Marked `multiprocess`: test_multiprocess.py runs this file under
`horovodrun -np 2` (one launch for the whole group); in the ordinary test
session it runs as one process, where the checks that need two ranks skip.
Every rank runs the same collectives in the same order; each test gathers
what it compares, so all ranks reach the same verdict.
"""

import keras
import numpy as np
import pytest

from data.load import Windows
from models.transformer import build_causal_lm
from tasks import Task
from train import Trainer, build_optimizer, evaluate_shards, make_eval_fn
from utils import distributed
from utils.config import Config, ModelConfig, TrainConfig
from utils.metrics import Sums, lm_metrics

pytestmark = pytest.mark.multiprocess

VOCAB = 24
MODEL = ModelConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, seq_len=8, dropout=0.1)
LM = Task(Config())  # the causal-LM loss (the task's data is not used here)


@pytest.fixture(scope="module")
def world():
    return distributed.init()


# Plain SGD: the update is lr x gradient, so weights compare like gradients.
PLAIN_SGD = TrainConfig(
    optimizer="sgd",
    momentum=0.0,
    lr=0.5,
    schedule="constant",
    warmup_steps=0,
    clip_norm=0.0,
    weight_decay=0.0,
    xla=False,
)


def _need_two(world):
    if world.size < 2:
        pytest.skip("needs 2 ranks: runs under horovodrun -np 2 in test_multiprocess.py")


def _batch(rng, rows, seq_len=8):
    x = rng.integers(1, VOCAB, (rows, seq_len)).astype("int32")
    return x, np.roll(x, -1, axis=1), np.ones((rows,), "float32")


def _state(trainer):
    return [
        np.asarray(v.numpy())
        for v in trainer.model.trainable_variables + list(trainer.optimizer.variables)
    ]


def _train(world, average: bool, steps: int = 4):
    keras.utils.set_random_seed(1000 + world.rank)  # a different initialisation on every rank
    model = build_causal_lm(MODEL, VOCAB)
    initial = np.asarray(model.trainable_variables[0].numpy())
    cfg = TrainConfig(xla=False, warmup_steps=0, lr=1e-2)
    trainer = Trainer(LM, model, build_optimizer(cfg, 1e-2, 100), cfg, average_gradients=average)
    trainer.broadcast_state()
    rng = np.random.default_rng(world.rank)  # every rank its own data
    for _ in range(steps):
        trainer.train_step(*_batch(rng, 4))
    return initial, _state(trainer)


def test_ranks_start_apart_and_end_identical(world):
    _need_two(world)
    initial, final = _train(world, average=True)
    initials = distributed.allgather_object(initial, name="initial")
    finals = distributed.allgather_object(final, name="final")
    assert not np.array_equal(initials[0], initials[1]), "ranks should start from different weights"
    assert len(finals[0]) > len(MODEL.__dict__)  # weights and optimizer slots
    for a, b in zip(finals[0], finals[1], strict=True):
        np.testing.assert_array_equal(a, b)  # every weight and optimizer slot, bit for bit


def test_without_averaging_ranks_diverge(world):
    """Negative control: the same run with the allreduce switched off."""
    _need_two(world)
    _, final = _train(world, average=False)
    finals = distributed.allgather_object(final, name="final_no_avg")
    assert any(not np.allclose(a, b) for a, b in zip(finals[0], finals[1], strict=True))


def test_np2_with_half_batches_equals_np1_with_the_whole_batch(world):
    """Rank r fed rows [rB, (r+1)B) of a 2B batch gives the weights of one process fed all 2B."""
    cfg = PLAIN_SGD
    model_cfg = ModelConfig(**{**MODEL.__dict__, "dropout": 0.0})
    keras.utils.set_random_seed(7)
    reference = Trainer(
        LM,
        build_causal_lm(model_cfg, VOCAB),
        build_optimizer(cfg, cfg.lr, 100),
        cfg,
        average_gradients=False,
    )
    distributed.broadcast_variables(reference.model.trainable_variables)
    replica = Trainer(LM, build_causal_lm(model_cfg, VOCAB), build_optimizer(cfg, cfg.lr, 100), cfg)
    for src, dst in zip(
        reference.model.trainable_variables, replica.model.trainable_variables, strict=True
    ):
        dst.assign(src)
    rng = np.random.default_rng(3)
    total_rows = 8
    rows = total_rows // world.size
    for _ in range(3):
        x, y, w = _batch(rng, total_rows)
        reference.train_step(x, y, w)  # one process, the whole batch, no allreduce
        mine = slice(world.rank * rows, (world.rank + 1) * rows)
        replica.train_step(x[mine], y[mine], w[mine])  # this rank's rows, gradients averaged
    for a, b in zip(
        reference.model.trainable_variables, replica.model.trainable_variables, strict=True
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert not np.allclose(
        reference.model.trainable_variables[0].numpy(),
        build_causal_lm(model_cfg, VOCAB).trainable_variables[0].numpy(),
    )


FP16_TOLERANCE = 2e-3  # of the largest weight change; fp16 keeps 11 significant bits (~5e-4)


def test_fp16_compression_keeps_ranks_identical_and_close_to_uncompressed(world):
    """Gradients sent as float16: every rank applies the same (rounded) average, and
    the weights stay within FP16_TOLERANCE of the uncompressed run's."""
    _need_two(world)
    cfg = PLAIN_SGD
    model_cfg = ModelConfig(**{**MODEL.__dict__, "dropout": 0.0})
    keras.utils.set_random_seed(11)
    trainers = {}
    for compression in ("none", "fp16"):
        run_cfg = TrainConfig(**{**cfg.__dict__, "compression": compression})
        model = build_causal_lm(model_cfg, VOCAB)
        trainers[compression] = Trainer(LM, model, build_optimizer(run_cfg, cfg.lr, 100), run_cfg)
        trainers[compression].broadcast_state()
    initial = [v.numpy() for v in trainers["none"].model.trainable_variables]
    for src, dst in zip(
        trainers["none"].model.trainable_variables,
        trainers["fp16"].model.trainable_variables,
        strict=True,
    ):
        dst.assign(src)
    rng = np.random.default_rng(world.rank)
    for _ in range(3):
        batch = _batch(rng, 4)
        for trainer in trainers.values():
            trainer.train_step(*batch)
    plain = [v.numpy() for v in trainers["none"].model.trainable_variables]
    packed = [v.numpy() for v in trainers["fp16"].model.trainable_variables]
    every_rank = distributed.allgather_object(packed, name="fp16_weights")
    for a, b in zip(every_rank[0], every_rank[1], strict=True):
        np.testing.assert_array_equal(a, b)
    change = max(np.max(np.abs(p - i)) for p, i in zip(plain, initial, strict=True))
    gap = max(np.max(np.abs(p - q)) for p, q in zip(plain, packed, strict=True))
    assert 0 < gap < FP16_TOLERANCE * change, (gap, change)


def test_epoch_metrics_over_unequal_shards_are_exact(world):
    # rank r holds r + 1 ... r * 3 + 1 tokens: unequal shards with unequal means
    per_rank = [np.arange(1, 3 * r + 2, dtype=float) * (r + 1) for r in range(world.size)]
    mine = per_rank[world.rank]
    sums = Sums({"loss_sum": mine.sum(), "correct": (mine > 2).sum(), "count": len(mine)})
    metrics = lm_metrics(distributed.allreduce_sums(sums.values))
    union = np.concatenate(per_rank)
    assert metrics["loss"] == pytest.approx(union.mean())
    assert metrics["accuracy"] == pytest.approx((union > 2).mean())
    everywhere = distributed.allgather_object(metrics, name="metrics")
    assert all(m == everywhere[0] for m in everywhere)


def test_evaluation_is_exact_on_a_split_that_does_not_divide(world):
    keras.utils.set_random_seed(11)
    model = build_causal_lm(MODEL, VOCAB)
    distributed.broadcast_variables(model.trainable_variables)
    tokens = np.random.default_rng(5).integers(1, VOCAB, 8 * 37 + 3).astype(np.uint16)  # 37 windows
    eval_fn = make_eval_fn(LM, model, xla=False)
    sharded = evaluate_shards(LM, eval_fn, Windows(tokens, 8, 5, world.rank, world.size))
    local = Sums()
    for x, y, w in Windows(tokens, 8, 5).eval_dataset():
        local.add({k: v.numpy() for k, v in eval_fn(x, y, w).items()})
    whole = lm_metrics(local.values)
    assert sharded["tokens"] == whole["tokens"] == 37 * 8
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert sharded["accuracy"] == pytest.approx(whole["accuracy"])


def test_chief_errors_reach_every_rank(world):
    from utils.errors import UserError

    def fails_on_chief():
        raise UserError("bad input on rank 0")

    with pytest.raises(UserError, match="bad input on rank 0"):
        distributed.chief_runs(fails_on_chief, "chief_error")
    assert distributed.chief_runs(lambda: distributed.world().rank, "chief_value") == 0
    assert distributed.any_rank(distributed.world().rank == world.size - 1)


def test_classifier_fine_tuning_keeps_ranks_identical(world):
    """The encoder + classification head, trained with class weights on each rank's documents."""
    _need_two(world)
    from data.load import Documents
    from models.encoder import build_backbone, build_classifier
    from tasks import Classify

    task = Classify(Config(task="classify"))
    task.prepared = type(
        "P", (), {"meta": {"labels": ["a", "b", "c"], "class_weights": [0.7, 1.0, 1.6]}}
    )()
    keras.utils.set_random_seed(50 + world.rank)
    model = build_classifier(build_backbone(MODEL, VOCAB), 3)
    before = distributed.allgather_object(
        np.asarray(model.trainable_variables[0].numpy()), name="cls_init"
    )
    cfg = TrainConfig(xla=False, warmup_steps=0, lr=1e-2, batch_size=4)
    trainer = Trainer(task, model, build_optimizer(cfg, 1e-2, 100), cfg)
    trainer.broadcast_state()
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, 64)
    docs = Documents(
        rng.integers(1, VOCAB, lengths.sum()).astype(np.uint16),
        np.concatenate([[0], np.cumsum(lengths)]),
        rng.integers(0, 3, 64),
        8,
        4,
        world.rank,
        world.size,
    )
    for x, y, w in docs.train_dataset(epoch=0, seed=0):
        trainer.train_step(x, y, w)
    finals = distributed.allgather_object(_state(trainer), name="cls_final")
    assert not np.array_equal(before[0], before[1])
    for a, b in zip(finals[0], finals[1], strict=True):
        np.testing.assert_array_equal(a, b)


def _lm_trainer(world, **cfg_overrides):
    keras.utils.set_random_seed(70)
    cfg = TrainConfig(xla=False, warmup_steps=0, lr=1e-2, batch_size=4, **cfg_overrides)
    trainer = Trainer(LM, build_causal_lm(MODEL, VOCAB), build_optimizer(cfg, 1e-2, 100), cfg)
    trainer.broadcast_state()
    return trainer


def test_a_nan_on_one_rank_is_skipped_by_every_rank(world):
    trainer = _lm_trainer(world)
    before = _state(trainer)
    x, y, w = _batch(np.random.default_rng(world.rank), 4)
    if world.rank == world.size - 1:
        w[0] = np.nan  # poisons this rank's loss and gradients only
    stats = trainer.train_step(x, y, w)
    flags = distributed.allgather_object(float(stats["nonfinite"]), name="nan_flags")
    assert flags == [1.0] * world.size  # every rank saw it
    for a, b in zip(before, _state(trainer), strict=True):
        np.testing.assert_array_equal(a, b)  # and no rank applied the update
    x, y, w = _batch(np.random.default_rng(world.rank), 4)
    assert float(trainer.train_step(x, y, w)["nonfinite"]) == 0.0  # the next clean step trains


class _Poisoned(Windows):
    """Windows whose 3rd training batch carries a NaN weight on the last rank."""

    def train_dataset(self, epoch, seed, start_step=0, steps=None):
        import tensorflow as tf

        poison = self.rank == self.world - 1
        ds = super().train_dataset(epoch, seed, start_step, steps).enumerate()
        return ds.map(lambda i, b: (b[0], b[1], tf.where((i == 2) & poison, b[2] * np.nan, b[2])))


def test_a_nan_stops_every_rank_at_the_same_step_and_keeps_the_last_checkpoint(world, tmp_path):
    from train import NonFiniteLoss, TrainState
    from utils import checkpoint
    from utils.run_dir import RunDir

    trainer = _lm_trainer(world, checkpoint_every=1, epochs=1)
    tokens = (
        np.random.default_rng(1).integers(1, VOCAB, 8 * 4 * world.size * 6 + 1).astype(np.uint16)
    )
    train = _Poisoned(tokens, 8, 4, world.rank, world.size)
    run_dir = RunDir(tmp_path)
    with pytest.raises(
        NonFiniteLoss, match=r"NaN/inf at step 3 .*training stopped on every rank"
    ) as e:
        trainer.fit(
            train,
            Windows(tokens, 8, 4, world.rank, world.size),
            TrainState(),
            train.steps_per_epoch,
            run_dir=run_dir,
        )
    messages = distributed.allgather_object(str(e.value).split(";")[0], name="nan_messages")
    assert len(set(messages)) == 1
    if world.is_chief:
        assert checkpoint.latest(run_dir.checkpoints).name == "step-00000002"  # the last good step
