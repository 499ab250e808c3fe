"""The project's training on Horovod (compile_model's DistributedOptimizer), proven across ranks.

Marked `multiprocess`: test_multiprocess.py runs this file under
`horovodrun -np 2` (one launch for the whole group); in the ordinary test
session it runs as one process, where the checks that need two ranks skip.
Every rank runs the same collectives in the same order; each test gathers
what it compares, so all ranks reach the same verdict. Steps run through
the train function that model.fit calls.
"""

from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf

from data.load import Windows
from models.tasks import CausalLM, model_inputs
from models.tasks.base import evaluate_shards, make_eval_fn
from models.transformer import build_causal_lm
from train import build_optimizer, compile_model
from utils import distributed
from utils.config import Config, ModelConfig, TrainConfig
from utils.metrics import Sums, lm_metrics

pytestmark = pytest.mark.multiprocess

VOCAB = 24
MODEL = ModelConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, seq_len=8, dropout=0.1)
LM = CausalLM(Config())  # the causal-LM loss and metrics (the task's data is not used here)


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


def _step(model, x, y, w=None, task=LM):
    """One call of the train function model.fit runs, on the task's form of (x, y, w)."""
    w = np.ones(len(x), "float32") if w is None else w
    batch = next(iter(task.fit_dataset(tf.data.Dataset.from_tensors((x, y, w)), training=True)))
    model.make_train_function()
    return model.train_function(iter(tf.data.Dataset.from_tensors(batch)))


def _compiled(cfg, lr, model_cfg=MODEL, averaged=True, task=LM):
    """A model compiled as train.py compiles it; or, with averaged=False, with the plain optimizer."""
    model = build_causal_lm(model_cfg, VOCAB) if task is LM else task.build_model()
    if averaged:
        compile_model(task, model, cfg, lr, 100)
    else:
        model.compile(
            optimizer=build_optimizer(cfg, lr, 100), jit_compile=cfg.xla, **task.compile_args()
        )
        model.optimizer.build(model.trainable_variables)
    return model


def _state(model):
    return [
        np.asarray(v.numpy()) for v in model.trainable_variables + list(model.optimizer.variables)
    ]


def _train(world, average: bool, steps: int = 4):
    keras.utils.set_random_seed(1000 + world.rank)  # a different initialisation on every rank
    model = _compiled(TrainConfig(xla=False, warmup_steps=0, lr=1e-2), 1e-2, averaged=average)
    initial = np.asarray(model.trainable_variables[0].numpy())
    distributed.broadcast_model(model)
    rng = np.random.default_rng(world.rank)  # every rank its own data
    for _ in range(steps):
        _step(model, *_batch(rng, 4))
    return initial, _state(model)


def test_ranks_start_apart_and_end_identical(world):
    _need_two(world)
    initial, final = _train(world, average=True)
    initials = distributed.allgather_object(initial, name="initial")
    finals = distributed.allgather_object(final, name="final")
    assert not np.array_equal(initials[0], initials[1]), "ranks should start from different weights"
    # What is compared is the whole state: each of the model's 36 weights (2 embeddings; per
    # block, 4 attention kernels and biases, 2 layer norms, 2 dense layers; the final norm),
    # AdamW's 2 slots (momentum, velocity) per weight, Keras's iteration counter and the
    # DistributedOptimizer's count of skipped non-finite steps.
    weights = 2 + 16 * MODEL.n_layers + 2
    assert len(finals[0]) == 3 * weights + 2 == 110
    shapes = [a.shape for a in finals[0]]
    assert Counter(shapes[weights:]) == Counter(2 * shapes[:weights] + [(), ()])
    for a, b in zip(finals[0], finals[1], strict=True):
        np.testing.assert_array_equal(a, b)  # every weight and optimizer slot, bit for bit


def test_without_averaging_ranks_diverge(world):
    """Negative control: the same run with the plain optimizer (no DistributedOptimizer)."""
    _need_two(world)
    _, final = _train(world, average=False)
    finals = distributed.allgather_object(final, name="final_no_avg")
    assert any(not np.allclose(a, b) for a, b in zip(finals[0], finals[1], strict=True))


def _allreduce_each(dist, grads):
    return distributed.allreduce_each(grads, dist._hvd_compression)


@pytest.mark.parametrize("reduce", ["grouped", "each"])
def test_np2_with_half_batches_equals_np1_with_the_whole_batch(world, reduce):
    """Rank r fed rows [rB, (r+1)B) of a 2B batch gives the weights of one process fed all 2B.

    `each`: the train function bench/overlap.py measures (one allreduce per
    gradient, the forward/backward outside XLA) keeps the same promise.
    """
    from utils.distributed.averaged_update import find_distributed
    from utils.distributed.train_function import make_averaged_function

    cfg = PLAIN_SGD
    model_cfg = ModelConfig(**{**MODEL.__dict__, "dropout": 0.0})
    keras.utils.set_random_seed(7)
    reference = _compiled(cfg, cfg.lr, model_cfg, averaged=False)  # no allreduce
    distributed.broadcast_variables(reference.trainable_variables)
    replica = _compiled(cfg, cfg.lr, model_cfg)
    replica.set_weights(reference.get_weights())
    if reduce == "each":
        dist = find_distributed(replica.optimizer)
        replica.train_function = make_averaged_function(replica, dist, False, _allreduce_each)
    rng = np.random.default_rng(3)
    total_rows = 8
    rows = total_rows // world.size
    for _ in range(3):
        x, y, w = _batch(rng, total_rows)
        _step(reference, x, y, w)  # one process, the whole batch
        mine = slice(world.rank * rows, (world.rank + 1) * rows)
        _step(replica, x[mine], y[mine], w[mine])  # this rank's rows, gradients averaged
    for a, b in zip(reference.trainable_variables, replica.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert not np.allclose(
        reference.trainable_variables[0].numpy(),
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
    models = {}
    for compression in ("none", "fp16"):
        run_cfg = TrainConfig(**{**cfg.__dict__, "compression": compression})
        models[compression] = _compiled(run_cfg, cfg.lr, model_cfg)
    distributed.broadcast_model(models["none"])
    models["fp16"].set_weights(models["none"].get_weights())
    initial = [v.numpy() for v in models["none"].trainable_variables]
    rng = np.random.default_rng(world.rank)
    for _ in range(3):
        batch = _batch(rng, 4)
        for model in models.values():
            _step(model, *batch)
    plain = [v.numpy() for v in models["none"].trainable_variables]
    packed = [v.numpy() for v in models["fp16"].trainable_variables]
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
    from models.tasks import Classify

    task = Classify(Config(task="classify", model=MODEL))
    task.prepared = type(
        "P",
        (),
        {
            "vocab_size": VOCAB,
            "meta": {"labels": ["a", "b", "c"], "class_weights": [0.7, 1.0, 1.6]},
        },
    )()
    keras.utils.set_random_seed(50 + world.rank)
    cfg = TrainConfig(xla=False, warmup_steps=0, lr=1e-2, batch_size=4)
    model = _compiled(cfg, 1e-2, task=task)
    before = distributed.allgather_object(
        np.asarray(model.trainable_variables[0].numpy()), name="cls_init"
    )
    distributed.broadcast_model(model)
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
        _step(model, x, y, w, task=task)
    finals = distributed.allgather_object(_state(model), name="cls_final")
    assert not np.array_equal(before[0], before[1])
    for a, b in zip(finals[0], finals[1], strict=True):
        np.testing.assert_array_equal(a, b)


class _WeightedLM(CausalLM):
    """The causal LM with its row weights as Keras sample weights: a NaN weight poisons a loss."""

    def fit_dataset(self, dataset, training):
        return dataset.map(
            lambda x, y, w: (model_inputs(x), y, tf.broadcast_to(w[:, None], tf.shape(y)))
        )


def _lm(world, task=LM, **cfg_overrides):
    keras.utils.set_random_seed(70)
    cfg = TrainConfig(xla=False, warmup_steps=0, lr=1e-2, batch_size=4, **cfg_overrides)
    model = _compiled(cfg, 1e-2)
    distributed.broadcast_model(model)
    return model


def test_a_nan_on_one_rank_is_skipped_by_every_rank(world):
    model = _lm(world)
    before = _state(model)
    x, y, w = _batch(np.random.default_rng(world.rank), 4)
    if world.rank == world.size - 1:
        w[0] = np.nan  # poisons this rank's loss and gradients only
    _step(model, x, y, w, task=_WeightedLM(Config()))
    skipped = distributed.allgather_object(model.optimizer.nonfinite_steps, name="nan_counts")
    assert skipped == [1] * world.size  # every rank saw it
    after = _state(model)
    for a, b in zip(before, after, strict=True):
        if a.shape:  # not the optimizer's counters
            np.testing.assert_array_equal(a, b)  # and no rank applied the update
    _step(model, *_batch(np.random.default_rng(world.rank), 4))  # the next clean step trains
    assert model.optimizer.nonfinite_steps == 1
    assert not np.array_equal(after[0], _state(model)[0])


class _Poisoned(Windows):
    """Windows whose 3rd training batch carries a NaN weight on the last rank."""

    def train_stream(self, *args, **kwargs):
        poison = self.rank == self.world - 1
        ds = super().train_stream(*args, **kwargs).enumerate()
        return ds.map(lambda i, b: (b[0], b[1], tf.where((i == 2) & poison, b[2] * np.nan, b[2])))


def test_a_nan_stops_every_rank_at_the_same_step_and_keeps_the_last_checkpoint(world, tmp_path):
    from tests.conftest import InMemoryData
    from train import fit
    from utils import checkpoint
    from utils.callbacks import Progress
    from utils.errors import NonFiniteLoss
    from utils.run_dir import RunDir

    cfg = TrainConfig(
        xla=False,
        warmup_steps=0,
        lr=1e-2,
        batch_size=4,
        checkpoint_every=1,
        epochs=1,
        tensorboard=False,
    )
    task = _WeightedLM(Config(model=MODEL, train=cfg))
    tokens = (
        np.random.default_rng(1).integers(1, VOCAB, 8 * 4 * world.size * 6 + 1).astype(np.uint16)
    )
    task.prepared = InMemoryData(VOCAB, train=tokens, val=tokens)
    task.shards = lambda split: _Poisoned(tokens, 8, 4, world.rank, world.size)
    model = _lm(world)
    run_dir = RunDir(tmp_path / f"rank{world.rank}")
    run_dir.create(resume=False)
    with pytest.raises(
        NonFiniteLoss, match=r"NaN/inf at step 3 .*training stopped on every rank"
    ) as e:
        fit(task, model, Progress(), run_dir)
    messages = distributed.allgather_object(str(e.value).split(";")[0], name="nan_messages")
    assert len(set(messages)) == 1
    if world.is_chief:
        assert checkpoint.latest(run_dir.checkpoints).name == "step-00000002"  # the last good step
