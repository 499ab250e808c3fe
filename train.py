"""The training step, the loop and its callbacks, for any task (tasks.py).

One step, on every rank:

    grads, stats = grad_fn(batch)          # forward + backward (k micro-batches with
                                           #   train.accumulate_steps); XLA when train.xla
    grads = allreduce_gradients(grads)     # Horovod: average across ranks (outside XLA:
                                           #   Horovod ops have no XLA kernels)
    apply_fn(grads)                        # clip by global norm, then update; XLA too

With one rank there is nothing to average, and the whole step is one
XLA-compiled function.
Every rank applies the same averaged gradients to the same weights (rank 0's,
broadcast once the optimizer is built), so the replicas stay identical.
Metrics are summed per rank and across ranks before dividing. Rank 0 alone
shows progress and writes history, checkpoints and TensorBoard logs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from data.load import Shards, resume_step
from models.transformer import count_params
from tasks import Task
from utils import checkpoint, distributed
from utils.callbacks import Callback, HistoryCSV, ProgressBar, TensorBoard
from utils.config import TrainConfig
from utils.metrics import Sums
from utils.run_dir import RunDir
from utils.schedules import WarmupDecay

NO_WEIGHT_DECAY = ["bias", "gamma", "beta"]  # norms and biases: decay only matrices and embeddings


class NonFiniteLoss(RuntimeError):
    """Training stopped, on every rank together, because a loss or gradient went NaN/inf."""


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


def make_eval_fn(task: Task, model: keras.Model, xla: bool):
    """A compiled (inputs, targets, weights) -> sums function (no Horovod op, so XLA is allowed)."""
    return tf.function(
        lambda x, y, w: task.stats(model, x, y, w, training=False),
        jit_compile=xla,
        reduce_retracing=True,
    )


def evaluate_totals(task: Task, eval_fn, shards: Shards, max_batches: int = 0) -> dict[str, Any]:
    """The task's sums (losses, counts, confusion...) over a split, over batches and ranks."""
    sums = Sums()
    for x, y, w in task.transform(shards.eval_dataset(max_batches), training=False):
        sums.add({k: v.numpy() for k, v in eval_fn(x, y, w).items()})
    return distributed.allreduce_sums(sums.values)


def evaluate_shards(task: Task, eval_fn, shards: Shards, max_batches: int = 0) -> dict[str, float]:
    """Exact metrics over a split: sums over batches and ranks, then divided."""
    return task.metrics(evaluate_totals(task, eval_fn, shards, max_batches))


@dataclasses.dataclass
class TrainState:
    """Where training is: saved in every checkpoint, restored by --resume."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps completed in the current epoch
    global_step: int = 0
    samples_in_epoch: int = 0  # samples consumed in the current epoch (all ranks)
    epoch_sums: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # all ranks, to the last fold
    best_value: float | None = None  # of the task's monitored metric
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs without improvement
    train_seconds: float = 0.0
    skipped_steps: int = 0  # non-finite steps skipped (train.on_nonfinite=skip)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["epoch_sums"] = {k: np.asarray(v).tolist() for k, v in self.epoch_sums.items()}
        return out


class Trainer:
    """Trains `model` for `task` with `optimizer` on this rank's share of the data.

    Args:
        task: what is learned (its loss and metrics).
        model: the task's Keras model.
        optimizer: a Keras 3 optimizer (see `build_optimizer`).
        cfg: the train section of the config.
        average_gradients: allreduce gradients across ranks (switch off only
            to show, in tests, that replicas then drift apart).
    """

    def __init__(
        self,
        task: Task,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        cfg: TrainConfig,
        average_gradients: bool = True,
    ):
        self.task, self.model, self.optimizer, self.cfg = task, model, optimizer, cfg
        self.average_gradients = average_gradients
        self.optimizer.build(model.trainable_variables)
        self.build_steps()

    def build_steps(self) -> None:
        """(Re)create the compiled functions. Called again after an elastic resize, since
        the world size and the learning-rate schedule's constants are baked in when traced."""
        jit = {"jit_compile": self.cfg.xla, "reduce_retracing": True}
        self._grad_fn = tf.function(self._gradients, **jit)
        self._grad_fn_accumulated = tf.function(self._accumulated_gradients, **jit)
        self._apply_fn = tf.function(self._apply_unless_nonfinite, **jit)
        self._eval_fn = make_eval_fn(self.task, self.model, self.cfg.xla)
        # With several ranks the allreduce must sit between two compiled halves
        # (Horovod ops have no XLA kernels); alone, the whole step (gradients and
        # optimizer update) is one compiled function.
        self.allreduce = self.average_gradients and distributed.averaging()
        if self.allreduce:
            self.train_step = tf.function(
                self._split_step, jit_compile=False, reduce_retracing=True
            )
        else:
            self.train_step = tf.function(self._local_step, **jit)

    # --- steps -----------------------------------------------------------

    def _gradients(self, x, y, w):
        """Forward and backward pass of one micro-batch: the part XLA may compile."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            stats = self.task.stats(self.model, x, y, w, training=True)
            # mean over this rank's targets
            loss = stats["loss_sum"] / tf.maximum(stats["loss_weight"], 1e-9)
        grads = tape.gradient(loss, variables)
        return [tf.convert_to_tensor(g, tf.float32) for g in grads], stats

    def _accumulated_gradients(self, x, y, w):
        """Gradients and summed stats of `accumulate_steps` micro-batches, locally.

        The rows of (x, y, w) are split into k micro-batches. Each one's
        gradient is of its mean loss, so they are combined weighted by their
        loss weights: the result is exactly the gradient of the mean loss of
        the whole k x batch_size rows, with one micro-batch in memory at a time.
        Also returns 1.0 when the loss or the gradients are NaN/inf, else 0.0.
        """
        k = self.cfg.accumulate_steps
        if k == 1:
            grads, stats = self._grad_fn(x, y, w)
        else:

            def part(i):  # rows [i*B, (i+1)*B) of every tensor (inputs may be a dict)
                return tf.nest.map_structure(lambda t: tf.split(t, k)[i], (x, y, w))

            total, stats = None, None
            for i in range(k):
                grads_i, stats_i = self._grad_fn(*part(i))
                weight = stats_i["loss_weight"]
                scaled = [g * weight for g in grads_i]
                if total is None:
                    total, stats = scaled, stats_i
                else:
                    total = [a + b for a, b in zip(total, scaled, strict=True)]
                    stats = {key: stats[key] + stats_i[key] for key in stats}
            norm = tf.maximum(stats["loss_weight"], 1e-9)
            grads = [g / norm for g in total]
        finite = tf.math.is_finite(stats["loss_sum"]) & tf.math.is_finite(
            tf.linalg.global_norm(grads)
        )
        return grads, stats, 1.0 - tf.cast(finite, tf.float32)

    def _apply_unless_nonfinite(self, grads, bad):
        """The optimizer update, unless some rank went non-finite (then nothing changes)."""

        def apply():
            self.optimizer.apply(grads, self.model.trainable_variables)
            return tf.constant(True)

        tf.cond(bad > 0, lambda: tf.constant(False), apply)

    def _local_step(self, x, y, w):
        """The whole step without an allreduce (one rank): compiled as one function."""
        grads, stats, bad = self._accumulated_gradients(x, y, w)
        self._apply_unless_nonfinite(grads, bad)
        return {**stats, "nonfinite": bad}

    def _split_step(self, x, y, w):
        """Compiled gradients -> Horovod allreduce -> compiled update."""
        grads, stats, bad = self._grad_fn_accumulated(x, y, w)
        # Horovod: average gradients across ranks before any rank applies them.
        # The NaN flag rides in the same fused allreduce, so every rank sees
        # "some rank went non-finite" at the same step and decides alike.
        *grads, bad = distributed.allreduce_gradients([*grads, bad], self.cfg.compression)
        self._apply_fn(grads, bad)
        return {**stats, "nonfinite": tf.cast(bad > 0, tf.float32)}

    def broadcast_state(self) -> None:
        """Horovod: start every rank from rank 0's weights and optimizer slots.

        Dropout RNG states are left per rank, so ranks draw different masks.
        """
        distributed.broadcast_variables(
            self.model.trainable_variables + list(self.optimizer.variables)
        )

    # --- loops -------------------------------------------------------------

    def evaluate(self, shards: Shards, max_batches: int = 0) -> dict[str, float]:
        return evaluate_shards(self.task, self._eval_fn, shards, max_batches)

    def current_lr(self) -> float:
        return float(np.asarray(self.optimizer.learning_rate))

    def fit(
        self,
        train: Shards,
        val: Shards,
        state: TrainState,
        steps_per_epoch: int,
        callbacks: list[Callback] = (),
        run_dir: RunDir | None = None,
    ) -> TrainState:
        """Train from `state` to the end (epochs, max_steps or early stopping).

        Args:
            train, val: this rank's shards of the train and validation splits.
            state: where to start (a fresh TrainState, or one from a checkpoint).
            steps_per_epoch: steps per epoch (the same on every rank).
            callbacks: progress, history, TensorBoard...
            run_dir: where rank 0 writes checkpoints (None: no checkpoints).
        """
        cfg = self.cfg
        tokens_per_step = train.global_batch * getattr(train, "seq_len", 1)
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
            running = Sums()
            epoch_start = time.perf_counter()
            # The loop always runs its dataset to the end: abandoning a tf.data
            # iterator mid-way can block for tens of seconds while it tears down.
            batches = self.task.transform(
                train.train_dataset(epoch, cfg.seed, start, end), training=True
            )
            for x, y, w in batches:
                stats = {k: v.numpy() for k, v in self.train_step(x, y, w).items()}
                if stats.pop("nonfinite"):
                    self._on_nonfinite(state, run_dir)
                    state.skipped_steps += 1
                    stats = {
                        k: np.zeros_like(v) for k, v in stats.items()
                    }  # a skipped step adds nothing
                running.add(stats)
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
            row = {
                "epoch": epoch + 1,
                "step": state.global_step,
                **self.task.metrics(state.epoch_sums),
            }
            row.update({f"val_{k}": v for k, v in self.evaluate(val, cfg.eval_batches).items()})
            state.train_seconds = clock()
            steps_run = state.step_in_epoch - start
            row.update(
                {
                    "lr": self.current_lr(),
                    "tokens_per_sec": steps_run * tokens_per_step / max(seconds, 1e-9),
                    "samples_per_sec": steps_run * train.global_batch / max(seconds, 1e-9),
                    "epoch_seconds": seconds,
                    "wall_seconds": state.train_seconds,
                    "world_size": train.world,
                }
            )
            # A resumed epoch's row replaces the one written when it was interrupted.
            state.history = [r for r in state.history if r["epoch"] != row["epoch"]] + [row]
            if state.step_in_epoch == steps_per_epoch:  # else max_steps stopped it mid-epoch
                state.epoch += 1
                state.step_in_epoch = state.samples_in_epoch = 0
                state.epoch_sums = {}
                self._track_best(state, row, run_dir)
            self._save(state, run_dir)
            for cb in callbacks:
                cb.on_epoch_end(self, state, row)
            if state.stopped_early:
                break
        return state

    def _on_nonfinite(self, state: TrainState, run_dir: RunDir | None) -> None:
        """Every rank gets here at the same step (the flag was allreduced)."""
        step = state.global_step + 1
        if self.cfg.on_nonfinite == "skip":
            distributed.print0(
                f"warning: non-finite loss or gradients at step {step} on some rank; step skipped"
            )
            return
        latest = checkpoint.latest(run_dir.checkpoints) if run_dir is not None else None
        where = f"; the last good checkpoint is {latest}" if latest else ""
        raise NonFiniteLoss(
            f"the loss or gradients became NaN/inf at step {step} (epoch {state.epoch + 1}, step "
            f"{state.step_in_epoch + 1} of the epoch) on at least one rank; training stopped on every rank{where}. "
            "Lower train.lr, raise train.warmup_steps or clip harder (train.clip_norm), or pass "
            "--train.on_nonfinite=skip to skip such steps"
        )

    def _done(self, state: TrainState) -> bool:
        return bool(self.cfg.max_steps) and state.global_step >= self.cfg.max_steps

    def _track_best(self, state: TrainState, row: dict[str, Any], run_dir: RunDir | None) -> None:
        """Early stopping on the task's monitored metric; rank 0 keeps the best weights.

        The metric is summed across ranks, so every rank takes the same decision.
        """
        value = row.get(self.task.monitor)
        if value is None:
            return
        better = state.best_value is None or (
            value < state.best_value
            if self.task.monitor_mode == "min"
            else value > state.best_value
        )
        if better:
            state.best_value, state.best_epoch, state.bad_epochs = value, row["epoch"], 0
            if run_dir is not None and distributed.is_chief():
                run_dir.save_best_weights(self.model)
        else:
            state.bad_epochs += 1
        patience = self.cfg.early_stopping_patience
        state.stopped_early = bool(patience) and state.bad_epochs >= patience

    def restore_best(self, state: TrainState, run_dir: RunDir) -> None:
        """Horovod: rank 0 loads the best epoch's weights and broadcasts them."""
        if not state.history or state.best_epoch in (0, state.history[-1]["epoch"]):
            return  # the last epoch is the best (or nothing to go back to)
        if distributed.is_chief():
            run_dir.load_best_weights(self.model)
        distributed.broadcast_variables(self.model.trainable_variables)
        distributed.print0(
            f"restored the weights of epoch {state.best_epoch} (best {self.task.monitor})"
        )

    def _fold_sums(self, state: TrainState, running: Sums) -> None:
        """Add every rank's running sums into state.epoch_sums, then zero them.

        Every rank calls this at the same step, so the allreduce always matches.
        """
        sums = Sums(state.epoch_sums)
        sums.add(distributed.allreduce_sums(running.values))
        state.epoch_sums = sums.values
        running.values = {k: v * 0 for k, v in running.values.items()}

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
        saved["epoch_sums"] = {
            k: np.asarray(v) if isinstance(v, list) else v for k, v in saved["epoch_sums"].items()
        }
        state = TrainState(**saved)
        state.step_in_epoch = resume_step(state.samples_in_epoch, global_batch)
        return state


def init_from(model: keras.Model, source_dir: str) -> None:
    """Copy a pretrained run's encoder into `model` (rank 0 reads, then broadcast).

    Used by --init-from RUN_DIR: the source's "encoder_backbone" weights
    replace this model's; its task head stays newly initialised.
    """
    from models.encoder import BACKBONE_NAME

    if distributed.is_chief():
        from inference import load_run

        source = load_run(source_dir).model
        try:
            source.get_layer(BACKBONE_NAME)
        except ValueError:
            from utils.errors import UserError

            raise UserError(
                f"--init-from {source_dir}: its model has no encoder (train it with --task mlm)"
            ) from None
        model.get_layer(BACKBONE_NAME).set_weights(source.get_layer(BACKBONE_NAME).get_weights())
    distributed.broadcast_variables(model.trainable_variables)


def run_training(
    task: Task, run_dir: RunDir, resume: bool, record: dict[str, Any]
) -> tuple[keras.Model, dict]:
    """Build and train the task's model; rank 0 writes everything into `run_dir`.

    Args:
        task: the task, with its config and prepared data.
        run_dir: the run directory (created by rank 0 beforehand).
        resume: continue from the newest checkpoint in `run_dir`.
        record: extra facts for config.json (preset, command line...).

    Returns:
        The trained model and the training metrics (also in metrics.json).
    """
    config, prepared = task.config, task.prepared
    t = config.train
    world = distributed.world()
    # Ranks seed differently: their initial weights differ until rank 0's are
    # broadcast (which the tests check), and their dropout masks stay different.
    keras.utils.set_random_seed(t.seed + world.rank)
    train, val = task.shards("train"), task.shards("val")
    steps_per_epoch = min(train.steps_per_epoch, t.steps_per_epoch or train.steps_per_epoch)
    total_steps = min(t.epochs * steps_per_epoch, t.max_steps or t.epochs * steps_per_epoch)
    # Horovod: the global batch is batch_size x ranks, so the learning rate scales with it.
    peak_lr = distributed.scaled_learning_rate(t.lr, t.scale_lr)

    keras.mixed_precision.set_global_policy(t.precision)
    model = task.build_model()
    trainer = Trainer(task, model, build_optimizer(t, peak_lr, total_steps), t)
    if resume:
        state = trainer.restore(run_dir, train.global_batch)
    else:
        if t.init_from:
            init_from(model, t.init_from)
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
                    **({"labels": prepared.meta["labels"]} if "labels" in prepared.meta else {}),
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
    resets = None
    if distributed.world().elastic:  # --elastic under horovodrun's elastic mode
        from elastic_train import fit_elastic

        state, resets = fit_elastic(trainer, task, state, callbacks, run_dir)
    else:
        state = trainer.fit(train, val, state, steps_per_epoch, callbacks, run_dir)
    if t.restore_best:
        trainer.restore_best(state, run_dir)

    final = {
        "epochs_completed": state.epoch,
        "steps": state.global_step,
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "train_seconds": state.train_seconds,
        "world_size": distributed.world().size,  # at the end (elastic: it may have changed)
    }
    if resets is not None:
        final["elastic_resets"] = resets
    if state.history:
        # Keys of their own: evaluate.py owns val_* and test_* (whole splits).
        final.update(
            {
                f"last_epoch_{k}": v
                for k, v in state.history[-1].items()
                if k not in ("epoch", "step", "world_size")
            }
        )
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
