"""train.py: model.fit's stopping rules, mid-epoch stops and resume, checkpoint round trip."""

import keras
import numpy as np
import pytest

from models.tasks import CausalLM, Task
from models.transformer import build_causal_lm
from tests.conftest import InMemoryData
from train import compile_model, fit, restore
from utils import distributed
from utils.callbacks import Progress
from utils.config import Config, ModelConfig, TrainConfig
from utils.run_dir import RunDir
from utils.schedules import WarmupDecay

MODEL = ModelConfig(n_layers=1, n_heads=2, d_model=16, d_ff=32, seq_len=8, dropout=0.0)
VOCAB = 30


@pytest.fixture(scope="module", autouse=True)
def world():
    return distributed.init()


def _tokens(seed, n=8 * 4 * 4 + 1):
    return np.random.default_rng(seed).integers(4, VOCAB, n).astype(np.uint16)


def _task(**train_overrides) -> Task:
    cfg = TrainConfig(
        xla=False,
        warmup_steps=0,
        batch_size=4,
        checkpoint_every=3,
        tensorboard=False,
        **train_overrides,
    )
    task = CausalLM(Config(model=MODEL, train=cfg))
    task.prepared = InMemoryData(VOCAB, train=_tokens(0), val=_tokens(1))
    return task


def _model(task: Task, lr: float = 1e-2) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = build_causal_lm(MODEL, VOCAB)
    compile_model(task, model, task.config.train, lr, 100)
    return model


class EpochEnds(keras.callbacks.Callback):
    """A user's callback: records each epoch's logs and how many rows its loss covers."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, float, dict]] = []

    def on_epoch_end(self, epoch, logs=None):
        loss_rows = float(self.model.metrics[0].variables[1].numpy())  # Mean's count
        self.rows.append((epoch, loss_rows, dict(logs)))


def test_early_stopping_when_validation_stalls():
    task = _task(epochs=10, early_stopping_patience=2)
    model = _model(task, lr=0.0)
    seen = EpochEnds()
    tracker = fit(task, model, Progress(), None, callbacks=[seen])
    # best at epoch 1, then 2 epochs without improvement
    assert tracker.progress.stopped_early and [e for e, _, _ in seen.rows] == [0, 1, 2]


def _epoch_lines(out: str) -> list[str]:
    """The `steps/planned` count of each epoch line the progress bar printed (verbose 2)."""
    return [line.split(" - ")[0].strip() for line in out.splitlines() if "/4 - " in line]


def test_max_steps_stops_mid_epoch_and_the_epoch_resumes(tmp_path, capsys):
    run_dir = RunDir(tmp_path)
    task = _task(epochs=3, max_steps=6)
    model = _model(task)
    first = EpochEnds()
    progress = fit(task, model, Progress(), run_dir, callbacks=[first]).progress
    assert (progress.global_step, progress.epoch, progress.step_in_epoch) == (6, 1, 2)
    assert [(e, logs["step"]) for e, _, logs in first.rows] == [(0, 4), (1, 6)]
    # The stopped epoch's line counts the steps that ran, not the 4 planned.
    assert _epoch_lines(capsys.readouterr().out) == ["4/4", "2/4"]
    task.config.train.max_steps = 0
    second = EpochEnds()
    fit(task, model, progress, run_dir, callbacks=[second])
    assert _epoch_lines(capsys.readouterr().out) == ["2/4", "4/4"]  # the resumed epoch's 2
    history = run_dir.read_history()
    assert [r["epoch"] for r in history] == ["0", "1", "2"]  # the partial row was replaced
    assert [r["step"] for r in history] == ["4", "8", "12"]
    # The interrupted epoch's figures cover all of its 4 steps x 4 rows, not the last 2 steps.
    assert [(e, rows) for e, rows, _ in second.rows] == [(1, 16.0), (2, 16.0)]


def test_checkpoint_round_trip(tmp_path):
    run_dir = RunDir(tmp_path)
    task = _task(epochs=1)
    model = _model(task)
    progress = fit(task, model, Progress(), run_dir).progress
    saved = sorted(p.name for p in run_dir.checkpoints.glob("step-*"))
    assert saved == ["step-00000003", "step-00000004"]
    fresh = _model(_task(epochs=1))
    restored = restore(fresh, run_dir)
    assert (restored.global_step, restored.epoch) == (4, 1)
    assert restored.early_stopping == progress.early_stopping
    a = model.variables + list(model.optimizer.variables)
    b = fresh.variables + list(fresh.optimizer.variables)
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
