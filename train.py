"""The training step, the loop and its callbacks.

One step, on every rank:

    grads, stats = grad_fn(batch)          # forward + backward; XLA-compiled when train.xla
    grads = allreduce_gradients(grads)     # Horovod: average across ranks (outside XLA:
                                           #   Horovod ops have no XLA kernels)
    optimizer.apply(grads)                 # clip by global norm, then update

Every rank applies the same averaged gradients to the same weights (rank 0's,
broadcast once the optimizer is built), so the replicas stay identical.
Metrics are summed per rank and across ranks before dividing. Rank 0 alone
shows progress and writes history, checkpoints and TensorBoard logs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from data.load import Windows, resume_step
from data.prepare import PAD_ID, Prepared
from models.losses import token_stats
from models.transformer import build_causal_lm, count_params
from utils import checkpoint, distributed
from utils.callbacks import Callback, HistoryCSV, ProgressBar, TensorBoard
from utils.config import Config, TrainConfig
from utils.errors import UserError
from utils.metrics import Sums, lm_metrics
from utils.run_dir import RunDir
from utils.schedules import WarmupDecay

NO_WEIGHT_DECAY = ["bias", "gamma", "beta"]  # norms and biases: decay only matrices and embeddings


def build_optimizer(
    cfg: TrainConfig, peak_lr: float, total_steps: int
) -> keras.optimizers.Optimizer:
    """The optimizer named by `cfg`, with warmup + decay and global-norm clipping.

    Args:
        cfg: the train section of the config.
        peak_lr: learning rate after warmup (already scaled by world size).
        total_steps: steps in the whole run, where decay ends.
    """
    schedule = WarmupDecay(peak_lr, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)
    common = {
        "learning_rate": schedule,
        "global_clipnorm": cfg.clip_norm or None,
        "weight_decay": cfg.weight_decay or None,
    }
    if cfg.optimizer == "adamw":
        opt = keras.optimizers.AdamW(beta_1=cfg.beta_1, beta_2=cfg.beta_2, **common)
    elif cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(beta_1=cfg.beta_1, beta_2=cfg.beta_2, **common)
    elif cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(momentum=cfg.momentum, **common)
    elif cfg.optimizer == "adagrad":
        opt = keras.optimizers.Adagrad(**common)
    elif cfg.optimizer == "adadelta":
        opt = keras.optimizers.Adadelta(**common)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    if cfg.weight_decay:
        opt.exclude_from_weight_decay(var_names=NO_WEIGHT_DECAY)
    return opt


def model_inputs(x) -> dict:
    """The model's input dict for a batch of token ids (padding is id 0)."""
    return {"token_ids": x, "padding_mask": tf.cast(tf.not_equal(x, PAD_ID), "int32")}


def lm_stats(model: keras.Model, x, y, w, training: bool) -> dict:
    """Summed loss, correct and counted target tokens of one batch."""
    logits = model(model_inputs(x), training=training)  # (B, T, V)
    return token_stats(y, logits, w, PAD_ID)


def make_eval_fn(model: keras.Model, xla: bool):
    """A compiled (x, y, w) -> sums function (no Horovod op inside, so XLA is allowed)."""
    return tf.function(
        lambda x, y, w: lm_stats(model, x, y, w, training=False),
        jit_compile=xla,
        reduce_retracing=True,
    )


def evaluate_lm(eval_fn, windows: Windows, max_batches: int = 0) -> dict[str, float]:
    """Exact loss/perplexity/accuracy over a split: sums over batches and ranks, then divided."""
    sums = Sums({"loss_sum": 0.0, "correct": 0.0, "count": 0.0})
    for x, y, w in windows.eval_dataset(max_batches):
        sums.add({k: v.numpy() for k, v in eval_fn(x, y, w).items()})
    return lm_metrics(distributed.allreduce_sums(sums.values))


@dataclasses.dataclass
class TrainState:
    """Where training is: saved in every checkpoint, restored by --resume."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps completed in the current epoch
    global_step: int = 0
    samples_in_epoch: int = 0  # samples consumed in the current epoch (all ranks)
    epoch_sums: dict[str, float] = dataclasses.field(
        default_factory=dict
    )  # all ranks, up to the last checkpoint
    best_val_loss: float = math.inf
    bad_epochs: int = 0  # epochs without val_loss improvement
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Trainer:
    """Trains `model` with `optimizer` on this rank's share of the data.

    Args:
        model: a Keras model mapping {"token_ids", "padding_mask"} to logits.
        optimizer: a Keras 3 optimizer (see `build_optimizer`).
        cfg: the train section of the config.
        average_gradients: allreduce gradients across ranks (switch off only
            to show, in tests, that replicas then drift apart).
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        cfg: TrainConfig,
        average_gradients: bool = True,
    ):
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.average_gradients = average_gradients
        self.optimizer.build(model.trainable_variables)
        self._grad_fn = tf.function(self._gradients, jit_compile=cfg.xla, reduce_retracing=True)
        self._eval_fn = make_eval_fn(model, cfg.xla)
        self.train_step = tf.function(self._train_step, jit_compile=False, reduce_retracing=True)

    # --- steps -----------------------------------------------------------

    def _gradients(self, x, y, w):
        """Forward and backward pass: the part XLA may compile."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            stats = lm_stats(self.model, x, y, w, training=True)
            loss = stats["loss_sum"] / tf.maximum(
                stats["count"], 1.0
            )  # mean over this rank's tokens
        grads = tape.gradient(loss, variables)
        return [tf.convert_to_tensor(g) for g in grads], stats

    def _train_step(self, x, y, w):
        grads, stats = self._grad_fn(x, y, w)
        if self.average_gradients:
            # Horovod: average gradients across ranks before any rank applies them.
            grads = distributed.allreduce_gradients(grads, self.cfg.compression)
        self.optimizer.apply(grads, self.model.trainable_variables)
        return stats

    def broadcast_state(self) -> None:
        """Horovod: start every rank from rank 0's weights and optimizer slots.

        Dropout RNG states are left per rank, so ranks draw different masks.
        """
        distributed.broadcast_variables(
            self.model.trainable_variables + list(self.optimizer.variables)
        )

    # --- loops -------------------------------------------------------------

    def evaluate(self, windows: Windows, max_batches: int = 0) -> dict[str, float]:
        return evaluate_lm(self._eval_fn, windows, max_batches)

    def current_lr(self) -> float:
        return float(np.asarray(self.optimizer.learning_rate))

    def fit(
        self,
        train: Windows,
        val: Windows,
        state: TrainState,
        steps_per_epoch: int,
        callbacks: list[Callback] = (),
        run_dir: RunDir | None = None,
    ) -> TrainState:
        """Train from `state` to the end (epochs, max_steps or early stopping).

        Args:
            train, val: this rank's windows over the train and validation splits.
            state: where to start (a fresh TrainState, or one from a checkpoint).
            steps_per_epoch: steps per epoch (the same on every rank).
            callbacks: progress, history, TensorBoard...
            run_dir: where rank 0 writes checkpoints (None: no checkpoints).
        """
        cfg = self.cfg
        tokens_per_step = train.global_batch * train.seq_len
        session_start, seconds_before = time.perf_counter(), state.train_seconds

        def clock() -> float:  # wall seconds of training, across resumes
            return seconds_before + time.perf_counter() - session_start

        for cb in callbacks:
            cb.on_train_begin(self, state, steps_per_epoch)
        while state.epoch < cfg.epochs and not self._done(state):
            epoch, start = state.epoch, state.step_in_epoch
            end = steps_per_epoch
            if cfg.max_steps:
                end = min(end, start + cfg.max_steps - state.global_step)
            running = Sums({"loss_sum": 0.0, "correct": 0.0, "count": 0.0})
            epoch_start = time.perf_counter()
            # The loop always runs its dataset to the end: abandoning a tf.data
            # iterator mid-way can block for tens of seconds while it tears down.
            for x, y, w in train.train_dataset(epoch, cfg.seed, start, end):
                running.add({k: v.numpy() for k, v in self.train_step(x, y, w).items()})
                state.step_in_epoch += 1
                state.global_step += 1
                state.samples_in_epoch = state.step_in_epoch * train.global_batch
                for cb in callbacks:
                    cb.on_step_end(self, state, running)
                if (
                    cfg.checkpoint_every
                    and state.global_step % cfg.checkpoint_every == 0
                    and state.step_in_epoch < end  # the end of the loop saves anyway
                ):
                    state.train_seconds = clock()
                    self._fold_sums(state, running)
                    self._save(state, run_dir)
            seconds = time.perf_counter() - epoch_start
            self._fold_sums(state, running)
            train_metrics = lm_metrics(state.epoch_sums)
            val_metrics = self.evaluate(val, cfg.eval_batches)
            state.train_seconds = clock()
            row = {
                "epoch": epoch + 1,
                "step": state.global_step,
                "loss": train_metrics.get("loss"),
                "accuracy": train_metrics.get("accuracy"),
                "val_loss": val_metrics.get("loss"),
                "val_accuracy": val_metrics.get("accuracy"),
                "val_perplexity": val_metrics.get("perplexity"),
                "lr": self.current_lr(),
                "tokens_per_sec": (state.step_in_epoch - start)
                * tokens_per_step
                / max(seconds, 1e-9),
                "epoch_seconds": seconds,
                "wall_seconds": state.train_seconds,
                "world_size": train.world,
            }
            # A resumed epoch's row replaces the one written when it was interrupted.
            state.history = [r for r in state.history if r["epoch"] != row["epoch"]] + [row]
            if state.step_in_epoch == steps_per_epoch:  # else max_steps stopped it mid-epoch
                state.epoch += 1
                state.step_in_epoch = state.samples_in_epoch = 0
                state.epoch_sums = {}
                self._update_early_stopping(state, row["val_loss"])
            self._save(state, run_dir)
            for cb in callbacks:
                cb.on_epoch_end(self, state, row)
            if state.stopped_early:
                break
        return state

    def _done(self, state: TrainState) -> bool:
        return bool(self.cfg.max_steps) and state.global_step >= self.cfg.max_steps

    def _update_early_stopping(self, state: TrainState, val_loss: float) -> None:
        # val_loss is summed across ranks, so every rank takes the same decision.
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.bad_epochs = val_loss, 0
        else:
            state.bad_epochs += 1
        patience = self.cfg.early_stopping_patience
        state.stopped_early = bool(patience) and state.bad_epochs >= patience

    def _fold_sums(self, state: TrainState, running: Sums) -> None:
        """Add every rank's running sums into state.epoch_sums, then zero them.

        Every rank calls this at the same step, so the allreduce always matches.
        """
        sums = Sums(state.epoch_sums)
        sums.add(distributed.allreduce_sums(running.values))
        state.epoch_sums = sums.values
        running.values = dict.fromkeys(running.values, 0.0)

    def _save(self, state: TrainState, run_dir: RunDir | None) -> None:
        """Rank 0 writes a checkpoint of the variables and `state`."""
        if run_dir is None or not distributed.is_chief():
            return
        checkpoint.save(
            run_dir.checkpoints,
            state.global_step,
            self.model.variables + list(self.optimizer.variables),
            state.to_dict(),
            self.cfg.keep_checkpoints,
        )

    def restore(self, run_dir: RunDir, global_batch: int) -> TrainState:
        """Rank 0 reads the newest checkpoint; every rank gets its state and weights.

        The position in the epoch is carried as samples consumed, so a run may
        resume with a different number of ranks.
        """
        saved = None
        if distributed.is_chief():
            latest = checkpoint.latest(run_dir.checkpoints)
            if latest is not None:
                saved = checkpoint.restore(
                    latest, self.model.variables + list(self.optimizer.variables)
                )
        saved = distributed.broadcast_object(saved, name="resume_state")
        self.broadcast_state()
        if saved is None:
            return TrainState()
        state = TrainState(**saved)
        state.step_in_epoch = resume_step(state.samples_in_epoch, global_batch)
        return state


def make_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> Windows:
    """Windows over a split for this rank (rank and size from utils.distributed)."""
    w = distributed.world()
    return Windows(tokens, seq_len, batch_size, w.rank, w.size)


def check_sizes(config: Config, prepared: Prepared) -> None:
    """Fail with a clear message when the splits are too small for seq_len and the batch."""
    seq_len, batch = config.model.seq_len, config.train.batch_size
    world = distributed.world().size
    for split in ("train", "val", "test"):
        n_tokens = prepared.meta["tokens"][split]
        if n_tokens < seq_len + 1:
            raise UserError(
                f"model.seq_len={seq_len} is longer than the {split} split ({n_tokens} tokens); "
                "lower model.seq_len or add text"
            )
    windows = make_windows(prepared.tokens("train"), seq_len, batch)
    if windows.steps_per_epoch == 0:
        raise UserError(
            f"the train split holds {windows.num_samples} windows of {seq_len + 1} tokens, fewer than one "
            f"global batch (train.batch_size={batch} x {world} ranks); lower train.batch_size or model.seq_len, "
            "or add text"
        )


def run_training(
    config: Config, prepared: Prepared, run_dir: RunDir, resume: bool, record: dict[str, Any]
) -> tuple[keras.Model, dict[str, float]]:
    """Build and train a model; rank 0 writes everything into `run_dir`.

    Args:
        config: the resolved config.
        prepared: the prepared dataset (same on every rank).
        run_dir: the run directory (created by rank 0 beforehand).
        resume: continue from the newest checkpoint in `run_dir`.
        record: extra facts for config.json (preset, command line...).

    Returns:
        The trained model and the training metrics (also in metrics.json).
    """
    m, t = config.model, config.train
    world = distributed.world()
    # Ranks seed differently: their initial weights differ until rank 0's are
    # broadcast (which the tests check), and their dropout masks stay different.
    keras.utils.set_random_seed(t.seed + world.rank)
    train = make_windows(prepared.tokens("train"), m.seq_len, t.batch_size)
    val = make_windows(prepared.tokens("val"), m.seq_len, t.batch_size)
    steps_per_epoch = min(train.steps_per_epoch, t.steps_per_epoch or train.steps_per_epoch)
    total_steps = min(t.epochs * steps_per_epoch, t.max_steps or t.epochs * steps_per_epoch)
    # Horovod: the global batch is batch_size x ranks, so the learning rate scales with it.
    peak_lr = distributed.scaled_learning_rate(t.lr, t.scale_lr)

    model = build_causal_lm(m, prepared.vocab_size)
    trainer = Trainer(model, build_optimizer(t, peak_lr, total_steps), t)
    if resume:
        state = trainer.restore(run_dir, train.global_batch)
    else:
        trainer.broadcast_state()
        state = TrainState()
    if distributed.is_chief():
        run_dir.write_config(
            {
                **record,
                "config": config.to_dict(),
                "world": distributed.describe(),
                "batch_size_per_rank": t.batch_size,
                "global_batch": train.global_batch,
                "learning_rate": {"base": t.lr, "peak": peak_lr, "scaled_by": peak_lr / t.lr},
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "parameters": count_params(model),
                "versions": versions(),
                "data": {
                    "dir": str(prepared.dir.resolve()),
                    "key": prepared.meta["key"],
                    "text_sha256": prepared.meta["text_sha256"],
                    "source": prepared.meta["source"],
                    "python": prepared.meta["python"],
                    "tokens": prepared.meta["tokens"],
                },
            }
        )
        run_dir.copy_data_files(prepared.tokenizer_path, prepared.meta)
        distributed.print0(
            f"model: {count_params(model):,} parameters; {world.size} rank(s) x batch {t.batch_size} = "
            f"global batch {train.global_batch}; peak lr {peak_lr:g}; {steps_per_epoch} steps/epoch"
            + (
                f"; resuming at epoch {state.epoch + 1} step {state.step_in_epoch}"
                if resume
                else ""
            )
        )
    callbacks = [ProgressBar(t.epochs, t.log_every), HistoryCSV(run_dir)]
    if t.tensorboard:
        callbacks.append(TensorBoard(run_dir, t.log_every))
    state = trainer.fit(train, val, state, steps_per_epoch, callbacks, run_dir)

    final = {
        "test_unigram_perplexity": prepared.meta["unigram_perplexity"]["test"],
        "epochs_completed": state.epoch,
        "steps": state.global_step,
        "stopped_early": state.stopped_early,
        "train_seconds": state.train_seconds,
        "world_size": world.size,
    }
    if state.history:
        # Keys of their own: evaluate.py owns val_* and test_* (whole splits).
        keys = ("loss", "accuracy", "val_loss", "val_accuracy", "val_perplexity", "tokens_per_sec")
        final.update({f"last_epoch_{k}": state.history[-1][k] for k in keys})
    if distributed.is_chief():
        run_dir.save_model(model)
        run_dir.merge_metrics(final)
    return model, final


def versions() -> dict[str, str | None]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("tensorflow", "keras", "keras-hub", "tensorflow-text", "horovod"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
