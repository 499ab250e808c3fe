"""Elastic training (--elastic): the training loop of train.py, re-entered after a lost worker.

Under `horovodrun --min-np ... --host-discovery-script ...` (docs/elastic.md),
`Trainer.fit` runs inside Horovod's elastic loop (`distributed.run_elastic`):

- every `train.commit_every` steps (default `train.checkpoint_every`) and at
  each epoch end, every rank commits: an in-memory copy of the weights,
  optimizer slots and TrainState;
- when a worker dies, the survivors' next collective fails; they go back to
  the last commit, Horovod re-forms the ranks, and `fit` starts again with
  the new rank and size: new data shards (the position in the epoch is kept
  as samples, so no sample is skipped or repeated), the learning rate
  rescaled to the new global batch, the train step traced again;
- rank 0 (possibly a new one) goes on writing checkpoints and history;
  each epoch's `world_size` column shows the size that finished it, and
  metrics.json lists the resets (`elastic_resets`).

Nothing here imports Horovod: utils/distributed.py holds all of it.
"""

from __future__ import annotations

import time
from typing import Any

from data.load import resume_step
from tasks import Task
from train import Trainer, TrainState
from utils import distributed
from utils.callbacks import Callback
from utils.metrics import Sums
from utils.run_dir import RunDir
from utils.schedules import WarmupDecay


class ElasticCommit(Callback):
    """Commits the elastic state every `every` steps (0: epoch ends only) and at epoch ends.

    Every rank commits at the same step (a commit runs a broadcast). The
    running sums are folded into the state first, so a restored epoch's
    metrics count every step once.
    """

    def __init__(self, state: Any, every: int, steps_per_epoch: int):
        self.state, self.every, self.steps_per_epoch = state, every, steps_per_epoch

    def on_step_end(self, trainer: Trainer, state: TrainState, running: Sums) -> None:
        if (
            self.every
            and state.global_step % self.every == 0
            and state.step_in_epoch < self.steps_per_epoch  # the epoch end commits anyway
        ):
            trainer._fold_sums(state, running)
            self.state.commit()

    def on_epoch_end(self, trainer: Trainer, state: TrainState, row: dict[str, Any]) -> None:
        self.state.commit()


def _rescale_schedule(trainer: Trainer, state: TrainState, steps_per_epoch: int) -> float | None:
    """Fit the LR schedule to a new world size; returns the new peak (None: not a WarmupDecay).

    The peak scales with the ranks (train.scale_lr), and decay now ends
    after the steps that remain at the new global batch.
    """
    t = trainer.cfg
    schedule = getattr(trainer.optimizer, "_learning_rate", None)
    if not isinstance(schedule, WarmupDecay):
        return None
    schedule.peak = distributed.scaled_learning_rate(t.lr, t.scale_lr)
    remaining = (steps_per_epoch - state.step_in_epoch) + (
        t.epochs - state.epoch - 1
    ) * steps_per_epoch
    total = state.global_step + max(remaining, 0)
    if t.max_steps:
        total = min(total, t.max_steps)
    schedule.total_steps = max(total, schedule.warmup_steps + 1)
    return schedule.peak


def fit_elastic(
    trainer: Trainer,
    task: Task,
    state: TrainState,
    callbacks: list[Callback],
    run_dir: RunDir | None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """`trainer.fit` under Horovod's elastic loop, from `state` to the end.

    Args:
        trainer: the Trainer (model and optimizer built and broadcast).
        task: the task; its shards are rebuilt for every world size.
        state: where to start (fresh, or from --resume).
        callbacks: the usual callbacks (progress, history...); a commit is added.
        run_dir: where rank 0 writes checkpoints.

    Returns:
        The final TrainState, and one record per reset (when, sizes, new peak LR).
    """
    t = trainer.cfg
    shared = trainer.model.trainable_variables + list(trainer.optimizer.variables)
    local = trainer.model.variables + list(trainer.optimizer.variables)
    elastic = distributed.elastic_state(shared, local, state)
    resets: list[dict[str, Any]] = []
    seen = {"resets": 0, "size": distributed.world().size}

    def train(elastic: Any) -> TrainState:
        world = distributed.world()
        progress: TrainState = elastic.progress  # the last commit, from rank 0
        train_shards, val_shards = task.shards("train"), task.shards("val")
        steps_per_epoch = min(
            train_shards.steps_per_epoch, t.steps_per_epoch or train_shards.steps_per_epoch
        )
        # The position in the epoch is kept as samples: the step depends on the global batch.
        progress.step_in_epoch = min(
            resume_step(progress.samples_in_epoch, train_shards.global_batch), steps_per_epoch
        )
        if elastic.resets != seen["resets"]:
            event: dict[str, Any] = {
                "reset": elastic.resets,
                "time": time.time(),
                "from_size": seen["size"],
                "to_size": world.size,
                "epoch": progress.epoch + 1,
                "step_in_epoch": progress.step_in_epoch,
                "global_step": progress.global_step,
            }
            if world.size != seen["size"]:
                event["peak_lr"] = _rescale_schedule(trainer, progress, steps_per_epoch)
                # Trace the steps again: the LR schedule's constants are baked into the graph.
                trainer.build_steps()
            resets.append(event)
            seen.update(resets=elastic.resets, size=world.size)
            distributed.print0(
                f"elastic: reset {elastic.resets}: world size {event['from_size']} -> "
                f"{world.size}; continuing at epoch {event['epoch']} step "
                f"{progress.step_in_epoch}/{steps_per_epoch} (global step {progress.global_step}) "
                f"from the last commit"
            )
        commit = ElasticCommit(elastic, t.commit_every or t.checkpoint_every, steps_per_epoch)
        done = trainer.fit(
            train_shards, val_shards, progress, steps_per_epoch, [*callbacks, commit], run_dir
        )
        # A last collective inside the elastic loop: a peer lost after the last step is
        # noticed here (and the job goes on) rather than failing the job at exit.
        elastic.commit()
        return done

    final = distributed.run_elastic(train, elastic)
    return final, resets
