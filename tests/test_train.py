"""train.py: the loop's stopping rules, mid-epoch stops, checkpoint round trip, schedule."""

import dataclasses

import numpy as np
import pytest

from data.load import Windows
from models.transformer import build_causal_lm
from tasks import Task
from train import Trainer, TrainState, build_optimizer
from utils import distributed
from utils.config import Config, ModelConfig, TrainConfig
from utils.run_dir import RunDir
from utils.schedules import WarmupDecay

MODEL = ModelConfig(n_layers=1, n_heads=2, d_model=16, d_ff=32, seq_len=8, dropout=0.0)


@pytest.fixture(scope="module", autouse=True)
def world():
    return distributed.init()


def _trainer(lr=1e-2, **train_overrides):
    cfg = TrainConfig(
        xla=False, warmup_steps=0, batch_size=4, checkpoint_every=3, **train_overrides
    )
    return Trainer(Task(Config()), build_causal_lm(MODEL, 30), build_optimizer(cfg, lr, 100), cfg)


def _windows(seed=0, n=8 * 4 * 4 + 1):
    tokens = np.random.default_rng(seed).integers(4, 30, n).astype(np.uint16)
    return Windows(tokens, 8, 4)


def test_early_stopping_when_validation_stalls():
    trainer = _trainer(lr=0.0, epochs=10, early_stopping_patience=2)
    state = trainer.fit(_windows(), _windows(1), TrainState(), steps_per_epoch=4)
    assert (
        state.stopped_early and len(state.history) == 3
    )  # best at epoch 1, then 2 without improvement


def test_max_steps_stops_mid_epoch_and_the_epoch_resumes(tmp_path):
    run_dir = RunDir(tmp_path)
    trainer = _trainer(epochs=3, max_steps=6)
    state = trainer.fit(_windows(), _windows(1), TrainState(), steps_per_epoch=4, run_dir=run_dir)
    assert (state.global_step, state.epoch, state.step_in_epoch) == (6, 1, 2)
    assert [r["epoch"] for r in state.history] == [1, 2] and state.history[-1]["step"] == 6
    trainer.cfg = dataclasses.replace(trainer.cfg, max_steps=0)
    state = trainer.fit(_windows(), _windows(1), state, steps_per_epoch=4, run_dir=run_dir)
    assert [r["epoch"] for r in state.history] == [1, 2, 3]  # the partial row was replaced
    assert [r["step"] for r in state.history] == [4, 8, 12]
    # train metrics of the interrupted epoch cover all of its 4 steps
    assert state.history[1]["loss"] > 0


def test_checkpoint_round_trip(tmp_path):
    run_dir = RunDir(tmp_path)
    trainer = _trainer(epochs=1)
    state = trainer.fit(_windows(), _windows(1), TrainState(), steps_per_epoch=4, run_dir=run_dir)
    saved = sorted(p.name for p in run_dir.checkpoints.glob("step-*"))
    assert saved == ["step-00000003", "step-00000004"]
    fresh = _trainer(epochs=1)
    restored = fresh.restore(run_dir, global_batch=4)
    assert restored.global_step == 4 and restored.epoch == 1 and restored.history == state.history
    a = trainer.model.variables + list(trainer.optimizer.variables)
    b = fresh.model.variables + list(fresh.optimizer.variables)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_warmup_then_cosine_decay():
    schedule = WarmupDecay(
        peak=1.0, warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1
    )
    lrs = [float(schedule(step)) for step in (0, 4, 9, 10, 60, 110, 500)]
    assert (
        lrs[0] == pytest.approx(0.1)
        and lrs[1] == pytest.approx(0.5)
        and lrs[2] == pytest.approx(1.0)
    )
    assert (
        lrs[3] == pytest.approx(1.0)
        and lrs[4] == pytest.approx(0.55)
        and lrs[5] == pytest.approx(0.1)
    )
    assert lrs[6] == pytest.approx(0.1)
    linear = WarmupDecay(1.0, 0, 100, "linear", 0.0)
    assert float(linear(50)) == pytest.approx(0.5)
