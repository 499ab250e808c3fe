"""Training: Keras's `model.fit` with the project's Horovod integration, for any task (models/tasks).

    model.compile(optimizer=hvd.DistributedOptimizer(AdamW(...)), **task.compile_args(),
                  jit_compile=train.xla)
    model.fit(this rank's data stream, validation_data=this rank's validation share,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         hvd.callbacks.MetricAverageCallback(),
                         NonFiniteGuard, TrainingProgress,        # the project's own
                         EarlyStopping, CSVLogger, TensorBoard,   # Keras's, rank 0 where
                         ModelCheckpoint, ...user callbacks])     #   they write files

Every rank computes gradients on its own shard; the DistributedOptimizer
averages them (one fused allreduce) before every update, so replicas stay
identical; with XLA the allreduce sits between the compiled gradient and
update functions (utils/distributed/train_function.py). Metrics are summed
across ranks before dividing. Rank 0 alone shows progress and writes
history, checkpoints, TensorBoard logs and the model.

With --parallel.tensor=T > 1 (docs/parallelism.md), each rank trains its
shard of the full model (`shard_model`), gradients are averaged within its
data-parallel group, and checkpoints, best.keras and model.keras hold the
full model gathered from the shards (`ShardedState`).

With --elastic under horovodrun's elastic mode (`fit_elastic`, docs/elastic.md),
`fit` runs inside Horovod's elastic loop (`distributed.run_elastic`):

- every `train.commit_every` steps (default `train.checkpoint_every`) and at
  each epoch boundary, every rank commits: an in-memory copy of the weights,
  optimizer slots and the Progress (position, the epoch's metric sums,
  early-stopping state);
- when a worker dies, the survivors' next collective fails; they go back to
  the last commit, Horovod re-forms the ranks, and `fit` starts again with
  the new rank and size: new data shards (the position in the epoch is kept
  as samples, so no sample is skipped or repeated), the learning rate
  rescaled to the new global batch, the train function traced again, the
  callbacks made again (rank 0 may be another process now);
- rank 0 goes on writing checkpoints and history; each epoch's `world_size`
  column shows the size that finished it, and metrics.json lists the resets
  (`elastic_resets`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from data.load import Shards, resume_step
from models.sharded_state import ShardedState
from models.tasks import Task
from models.tensor_parallel import build_shard
from models.transformer import count_params
from utils import checkpoint, distributed
from utils.callbacks import (
    AtomicModelCheckpoint,
    GatheredModelCheckpoint,
    NonFiniteGuard,
    ProgbarLogger,
    Progress,
    TrainingProgress,
)
from utils.config import TrainConfig, parallel_layout
from utils.errors import UserError
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


def compile_model(
    task: Task,
    model: keras.Model,
    cfg: TrainConfig,
    peak_lr: float,
    total_steps: int,
    group: distributed.ProcessGroup | None = None,
    xla: bool | None = None,
) -> None:
    """Compile `model` for `task` with the DistributedOptimizer, and build the optimizer.

    Gradient accumulation is Horovod's `backward_passes_per_step`: the
    gradients of `accumulate_steps` batches are added up locally and
    averaged across ranks once. Non-finite steps are skipped on every rank
    (NonFiniteGuard then stops or warns). `group`: average over these ranks
    only (tensor parallelism's data-parallel group); `xla`: instead of train.xla.
    """
    optimizer = distributed.DistributedOptimizer(
        build_optimizer(cfg, peak_lr, total_steps),
        compression=cfg.compression,
        backward_passes_per_step=cfg.accumulate_steps,
        skip_nonfinite=True,
        group=group,
    )
    xla = cfg.xla if xla is None else xla
    model.compile(optimizer=optimizer, jit_compile=xla, **task.compile_args())
    model.optimizer.build(model.trainable_variables)


def steps_per_epoch(task: Task, train: Shards) -> int:
    """Updates per epoch: a full pass over the shards, or train.steps_per_epoch if smaller."""
    cap = task.config.train.steps_per_epoch
    return min(train.steps_per_epoch, cap or train.steps_per_epoch)


def fit(
    task: Task,
    model: keras.Model,
    progress: Progress,
    run_dir: RunDir | None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    savers: Sequence = (),
    sharded: ShardedState | None = None,
) -> TrainingProgress:
    """`model.fit` from `progress` to the end of the run (epochs, max_steps or early stop).

    Data, world size and callbacks are taken afresh: elastic training calls
    this again after the ranks changed.

    Args:
        task: the task, with its config and prepared data.
        model: compiled by `compile_model`; rank 0's weights win (broadcast).
        progress: where to start; updated in place.
        run_dir: where rank 0 writes (None: nowhere, for tests).
        callbacks: more Keras callbacks, after the project's.
        savers: more (every N steps, function of the progress), e.g. elastic commits.
        sharded: tensor parallelism: `model` is this rank's shard; checkpoints and
            best.keras hold the full model, gathered from the shards (every rank
            takes part, rank 0 writes).

    Returns:
        The TrainingProgress callback: its `progress` and `last_logs`.
    """
    t = task.config.train
    train, val = task.shards("train"), task.shards("val")
    steps = steps_per_epoch(task, train)
    start = min(resume_step(progress.samples_in_epoch, train.global_batch), steps)
    progress.step_in_epoch, progress.samples_in_epoch = start, start * train.global_batch
    left = (t.max_steps - progress.global_step) if t.max_steps else None
    stream = train.train_stream(
        t.seed, progress.epoch, start, t.epochs, steps, t.accumulate_steps, left
    )
    chief = distributed.is_chief()
    if run_dir is not None and chief:
        run_dir.truncate_history(progress.epoch)  # an interrupted epoch's row is written again

    def save_checkpoint(p: Progress) -> None:
        saved, best = model.variables + list(model.optimizer.variables), p.best_weights
        if sharded is not None:  # collectives: every rank, before rank 0 writes
            saved = sharded.gather_values()
            best = sharded.full_weights(best) if best else None
        if run_dir is not None and chief:
            checkpoint.save(
                run_dir.checkpoints,
                p.global_step,
                saved,
                p.to_dict(),
                t.keep_checkpoints,
                arrays=best or (),
            )

    early_stopping = best_model = None
    if t.early_stopping_patience or t.restore_best:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor=task.monitor,
            mode=task.monitor_mode,
            # patience 0 = no early stopping: only the best epoch's weights at the end
            patience=t.early_stopping_patience or t.epochs + 1,
            restore_best_weights=t.restore_best,
            verbose=int(chief),
        )
    tracker = TrainingProgress(
        progress,
        steps,
        t.accumulate_steps,
        train.global_batch,
        getattr(train, "seq_len", 1),
        t.max_steps,
        savers=[(t.checkpoint_every, save_checkpoint), *savers],
        figures=task.epoch_figures,
        early_stopping=early_stopping,
    )
    last_checkpoint = (
        (lambda: checkpoint.latest(run_dir.checkpoints)) if run_dir is not None else (lambda: None)
    )
    verbose = (1 if sys.stdout.isatty() else 2) if chief else 0
    everyone = [
        # Tensor parallelism: the shards start from the full model broadcast before sharding.
        *([distributed.callbacks.BroadcastGlobalVariablesCallback(0)] if sharded is None else []),
        distributed.callbacks.MetricAverageCallback(),
        # Rank 0's progress bar, here: it shows the exact metrics, not the figures added next.
        *([ProgbarLogger()] if verbose else []),
        NonFiniteGuard(t.on_nonfinite, progress, last_checkpoint),
        tracker,
        *([early_stopping] if early_stopping else []),
    ]
    rank0 = []
    if run_dir is not None and sharded is not None and early_stopping is not None:
        best_model = GatheredModelCheckpoint(
            run_dir.best_model,
            sharded.gather,
            chief,
            monitor=task.monitor,
            mode=task.monitor_mode,
            save_best_only=True,
        )
        tracker.best_checkpoint = best_model
        everyone.append(best_model)
    if run_dir is not None and chief:
        rank0.append(keras.callbacks.CSVLogger(str(run_dir.history), append=True))
        if t.tensorboard:
            rank0.append(
                keras.callbacks.TensorBoard(
                    str(run_dir.tensorboard), update_freq=t.log_every, write_graph=False
                )
            )
        if early_stopping is not None and sharded is None:
            best_model = AtomicModelCheckpoint(
                run_dir.best_model,
                monitor=task.monitor,
                mode=task.monitor_mode,
                save_best_only=True,
            )
            tracker.best_checkpoint = best_model
            rank0.append(best_model)
    if progress.epoch < t.epochs and not (t.max_steps and progress.global_step >= t.max_steps):
        try:
            model.fit(
                task.fit_dataset(stream, training=True),
                epochs=t.epochs,
                initial_epoch=progress.epoch,
                steps_per_epoch=steps * t.accumulate_steps,
                validation_data=task.fit_dataset(val.validation_dataset(t.eval_batches), False),
                callbacks=[*everyone, *rank0, *callbacks],
                verbose=verbose,
                shuffle=False,  # the stream is already in each epoch's seeded order
            )
        except BaseException:
            for callback in rank0:  # close history.csv and TensorBoard's files
                callback.on_train_end()
            raise
    return tracker


def restore(model: keras.Model, run_dir: RunDir) -> Progress:
    """Rank 0 reads the newest checkpoint; every rank gets the progress (the weights follow
    by broadcast when fit begins). A run without a checkpoint starts from the beginning."""
    saved = None
    if distributed.is_chief():
        latest = checkpoint.latest(run_dir.checkpoints)
        if latest is not None:
            state, arrays = checkpoint.restore(
                latest, model.variables + list(model.optimizer.variables)
            )
            saved = (state, arrays)
    saved = distributed.broadcast_object(saved, name="resume_state")
    if saved is None:
        return Progress()
    state, arrays = saved
    return Progress.from_dict(state, best_weights=list(arrays) or None)


def preset_record(prepared) -> dict[str, Any]:
    """{"init_from_preset": the preset's handle, SHA-256 of its files, backbone}, if it has one."""
    from utils.presets import is_bundle, read_bundle

    if not is_bundle(prepared.tokenizer_path):
        return {}
    return {"init_from_preset": read_bundle(prepared.tokenizer_path)["info"]}


def init_from(model: keras.Model, source_dir: str) -> None:
    """Copy a pretrained run's encoder into `model` on rank 0 (fit broadcasts it).

    Used by --init-from RUN_DIR: the source's "encoder_backbone" weights
    replace this model's; its task head stays newly initialised.
    """
    from models.encoder import BACKBONE_NAME

    if not distributed.is_chief():
        return
    from models.inference import load_run

    source = load_run(source_dir).model
    try:
        source.get_layer(BACKBONE_NAME)
    except ValueError:
        raise UserError(
            f"--init-from {source_dir}: its model has no encoder (train it with --task mlm)"
        ) from None
    model.get_layer(BACKBONE_NAME).set_weights(source.get_layer(BACKBONE_NAME).get_weights())


def run_training(
    task: Task,
    run_dir: RunDir,
    resume: bool,
    record: dict[str, Any],
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict]:
    """Build and train the task's model; rank 0 writes everything into `run_dir`.

    Args:
        task: the task, with its config and prepared data.
        run_dir: the run directory (created by rank 0 beforehand).
        resume: continue from the newest checkpoint in `run_dir`.
        record: extra facts for config.json (preset, command line...).
        callbacks: any Keras callbacks, run after the project's (every rank
            runs them; write files from rank 0 only).

    Returns:
        The trained model and the training metrics (also in metrics.json).
    """
    config, prepared = task.config, task.prepared
    t = config.train
    world = distributed.world()
    tensor = distributed.tensor_size()
    if tensor > 1 and t.xla:
        # Horovod ops have no XLA kernels, and the shard's forward pass holds them.
        # (The config keeps train.xla: evaluation of the gathered model still uses it.)
        distributed.print0(f"note: parallel.tensor={tensor}: the shards train without XLA")
    # Ranks seed differently: their initial weights differ until rank 0's are
    # broadcast (which the tests check), and their dropout masks stay different.
    keras.utils.set_random_seed(t.seed + world.rank)
    train = task.shards("train")
    steps = steps_per_epoch(task, train)
    total_steps = min(t.epochs * steps, t.max_steps or t.epochs * steps)
    # Horovod: the global batch is batch_size x replicas, so the learning rate scales with it.
    peak_lr = distributed.scaled_learning_rate(t.lr, t.scale_lr)

    keras.mixed_precision.set_global_policy(t.precision)
    model = task.build_model()
    compile_model(task, model, t, peak_lr, total_steps)
    progress = restore(model, run_dir) if resume else Progress()
    if progress.global_step == 0:  # a new start (or a resume before any checkpoint)
        if t.init_from:
            init_from(model, t.init_from)
        if t.init_from_preset:  # rank 0 reads the weights; fit broadcasts them
            from models.presets import load_weights

            distributed.chief_runs(lambda: load_weights(model, t.init_from_preset), "weights")
    parameters, sharded = count_params(model), None
    if tensor > 1:  # from here on no rank keeps the full model (models/sharded_state.py)
        model, sharded = shard_model(task, model, progress, peak_lr, total_steps)
    if distributed.is_chief():
        run_dir.write_config(
            {
                **record,
                "config": config.to_dict(),
                "world": distributed.describe(),
                "parallel": parallel_layout(config.parallel, world.size),
                "batch_size_per_rank": t.batch_size,  # per data-parallel replica
                "global_batch": train.global_batch,
                "learning_rate": {"base": t.lr, "peak": peak_lr, "scaled_by": peak_lr / t.lr},
                "steps_per_epoch": steps,
                "total_steps": total_steps,
                "parameters": parameters,
                **preset_record(prepared),
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
        start = resume_step(progress.samples_in_epoch, train.global_batch)
        layout = f"{world.size // tensor} replica(s) of {tensor} shard(s)" if tensor > 1 else ""
        distributed.print0(
            f"model: {parameters:,} parameters; "
            + (layout or f"{world.size} rank(s)")
            + f" x batch {t.batch_size} = "
            f"global batch {train.global_batch}; peak lr {peak_lr:g}; {steps} steps/epoch"
            + (f"; resuming at epoch {progress.epoch + 1} step {start}" if resume else "")
        )
    resets = None
    if world.elastic:  # --elastic under horovodrun's elastic mode
        tracker, resets = fit_elastic(task, model, progress, run_dir, callbacks)
    else:
        tracker = fit(task, model, progress, run_dir, callbacks, sharded=sharded)
    progress = tracker.progress
    if sharded is not None:  # every rank: evaluation and model.keras use the full model
        model = sharded.gather()

    final = {
        "epochs_completed": progress.epoch,
        "steps": progress.global_step,
        "stopped_early": progress.stopped_early,
        "best_epoch": progress.early_stopping.get("best_epoch", -1) + 1,
        "train_seconds": progress.train_seconds,
        "world_size": distributed.world().size,  # at the end (elastic: it may have changed)
    }
    if resets is not None:
        final["elastic_resets"] = resets
    # Keys of their own: evaluate.py owns val_* and test_* (whole splits).
    final.update(
        {
            f"last_epoch_{k}": v
            for k, v in tracker.last_logs.items()
            if k not in ("step", "world_size") and np.ndim(v) == 0
        }
    )
    if distributed.is_chief():
        run_dir.save_model(model)
        run_dir.merge_metrics(final)
    return model, final


def shard_model(
    task: Task, full: keras.Model, progress: Progress, peak_lr: float, total_steps: int
) -> tuple[keras.Model, ShardedState]:
    """This rank's tensor-parallel shard of `full`, compiled, with its slice of the state.

    Every rank built (and rank 0 maybe restored) the full model and its
    optimizer; rank 0's full state is broadcast to all, then each rank
    keeps its slices: the shards of a replica start from the same full
    model, and the replicas from the same one. The full model is not kept
    (the caller drops it too): a rank holds its shard's weights and slots
    only, and a full model is built again when one is needed (best.keras,
    the end). The shard averages its gradients over its data-parallel group
    only, and clips by the whole model's gradient norm. A resumed run's
    best-epoch weights are cut too.
    """
    t = task.config.train
    tp = distributed.tensor_parallel.current(distributed.tensor_size())
    distributed.broadcast_variables(full.variables + list(full.optimizer.variables), 0)
    shard = build_shard(full, tp, seed=t.seed)
    compile_model(task, shard, t, peak_lr, total_steps, group=tp.data_group, xla=False)

    def make_full() -> keras.Model:
        model = task.build_model()
        compile_model(task, model, t, peak_lr, total_steps)
        return model

    sharded = ShardedState(shard, full, make_full)  # this shard's slices of the full state
    distributed.optimizer.set_tensor_parallel(
        shard.optimizer, sharded.split_variables(), tp.tensor_group
    )
    if progress.best_weights:
        progress.best_weights = sharded.shard_weights(progress.best_weights)
    return shard, sharded


def _rescale_schedule(
    model: keras.Model, task: Task, progress: Progress, steps: int
) -> float | None:
    """Fit the LR schedule to a new world size; returns the new peak (None: not a WarmupDecay).

    The peak scales with the ranks (train.scale_lr), and decay now ends
    after the steps that remain at the new global batch.
    """
    t = task.config.train
    optimizer = model.optimizer
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    schedule = getattr(optimizer, "_learning_rate", None)
    if not isinstance(schedule, WarmupDecay):
        return None
    schedule.peak = distributed.scaled_learning_rate(t.lr, t.scale_lr)
    remaining = (steps - progress.step_in_epoch) + (t.epochs - progress.epoch - 1) * steps
    total = progress.global_step + max(remaining, 0)
    if t.max_steps:
        total = min(total, t.max_steps)
    schedule.total_steps = max(total, schedule.warmup_steps + 1)
    return schedule.peak


def fit_elastic(
    task: Task,
    model: keras.Model,
    progress: Progress,
    run_dir: RunDir | None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[TrainingProgress, list[dict[str, Any]]]:
    """`train.fit` under Horovod's elastic loop, from `progress` to the end.

    Returns:
        The last fit's TrainingProgress, and one record per reset (when, sizes, new peak LR).
    """
    t = task.config.train
    shared = list(model.weights) + list(model.optimizer.variables)
    local = list(model.variables) + list(model.optimizer.variables)
    elastic = distributed.elastic_state(shared, local, progress)
    resets: list[dict[str, Any]] = []
    seen = {"resets": 0, "size": distributed.world().size}

    def train(elastic: Any) -> TrainingProgress:
        world = distributed.world()
        progress: Progress = elastic.progress  # the last commit, from rank 0
        if elastic.resets != seen["resets"]:
            steps = steps_per_epoch(task, task.shards("train"))
            event: dict[str, Any] = {
                "reset": elastic.resets,
                "time": time.time(),
                "from_size": seen["size"],
                "to_size": world.size,
                "epoch": progress.epoch + 1,
                "global_step": progress.global_step,
            }
            if world.size != seen["size"]:
                event["peak_lr"] = _rescale_schedule(model, task, progress, steps)
            resets.append(event)
            seen.update(resets=elastic.resets, size=world.size)
            distributed.print0(
                f"elastic: reset {elastic.resets}: world size {event['from_size']} -> "
                f"{world.size}; continuing at epoch {event['epoch']} (global step "
                f"{progress.global_step}) from the last commit"
            )
        # Traced again: the world size and the schedule's constants are baked in.
        model.make_train_function(force=True)
        every = t.commit_every or t.checkpoint_every
        tracker = fit(
            task, model, progress, run_dir, callbacks, [(every, lambda p: elastic.commit())]
        )
        # A last collective inside the elastic loop: a peer lost after the last step is
        # noticed here (and the job goes on) rather than failing the job at exit.
        elastic.commit()
        return tracker

    tracker = distributed.run_elastic(train, elastic)
    return tracker, resets


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
