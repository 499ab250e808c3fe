"""Elastic training (--elastic): `train.fit`, entered again after a lost worker.

Under `horovodrun --min-np ... --host-discovery-script ...` (docs/elastic.md),
`train.fit` (Keras's `model.fit`) runs inside Horovod's elastic loop
(`distributed.run_elastic`):

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

Nothing here imports Horovod: utils/distributed holds all of it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import keras

from tasks import Task
from train import fit, steps_per_epoch
from utils import distributed
from utils.callbacks import Progress, TrainingProgress
from utils.run_dir import RunDir
from utils.schedules import WarmupDecay


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
