"""Horovod elastic training for Keras 3: the state object and the re-entry loop.

Under `horovodrun --min-np ... --host-discovery-script ...` and `--elastic`,
training runs inside `run_elastic`: when a worker is lost, the survivors go
back to the last commit, Horovod re-forms the ranks, and the training
function is entered again at the new world size.

Horovod 0.28.1's elastic helpers do not fit Keras 3 (see docs/elastic.md):
TensorFlowKerasState calls `optimizer.variables()` (a list in Keras 3),
TensorFlowState broadcasts in its constructor and not in TF2's sync(), and
hvd.elastic.run silently swallows the error of a failed grouped allreduce
(it only recognises messages naming HorovodAllreduce/Allgather/Broadcast),
returning None as if training had finished. So the state object and the
error mapping below are the project's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from utils.distributed import core
from utils.errors import is_lost_peer


def _failure(error: Exception) -> Exception:
    """The exception hvd.elastic.run must see for a TensorFlow error inside it.

    A collective that failed because a peer is gone (Gloo lost the
    connection, Horovod shut down) becomes HorovodInternalError: restore the
    last commit, re-form the ranks, go on. Any other UnknownError becomes a
    RuntimeError, which Horovod's wrapper would otherwise swallow. Other
    errors (not TensorFlow's) come back unchanged.
    """
    import tensorflow as tf
    from horovod.common.exceptions import HorovodInternalError

    if not isinstance(error, tf.errors.OpError):
        return error
    text = str(error)
    if is_lost_peer(error):
        return HorovodInternalError(text)
    if isinstance(error, tf.errors.UnknownError):
        return RuntimeError(f"TensorFlow error: {text}")
    return error


def elastic_state(shared: Sequence, local: Sequence, progress: Any) -> Any:
    """A `horovod.common.elastic.State` for Keras 3 variables and a progress object.

    - `commit()` (every N steps and at epoch ends) keeps host copies of the
      variables and a deep copy of `progress`, then asks the driver whether
      hosts changed (one small broadcast, which also finds a lost peer);
    - `restore()`, after a lost peer, puts the last commit back;
    - `sync()`, on entry and after every reset, broadcasts `shared` and
      `progress` from the (new) rank 0.

    Its constructor runs no collective: Horovod forbids collectives outside
    `run_elastic`. `state.resets` counts the resets this process went through.

    Args:
        shared: variables every rank must hold alike: trainable weights and
            optimizer slots (not the dropout seed state, which stays per rank).
        local: every variable to restore after a failure (a superset of shared).
        progress: a picklable object (the TrainState), replaced as a whole on
            restore and sync: read it back as `state.progress` after a reset.
    """
    import copy

    from horovod.common.elastic import State

    class KerasElasticState(State):
        def __init__(self) -> None:
            super().__init__(bcast_object=core.hvd.broadcast_object, get_rank=core.hvd.rank)
            # Keras 3 variables wrap a tf.Variable in `.value`; Horovod and numpy need the latter.
            self._shared = [getattr(v, "value", v) for v in shared]
            self._local = [getattr(v, "value", v) for v in local]
            self.progress = progress
            self.resets = 0
            self.save()

        def save(self) -> None:
            self._saved = [v.numpy() for v in self._local]
            self._saved_progress = copy.deepcopy(self.progress)

        def restore(self) -> None:
            for variable, value in zip(self._local, self._saved, strict=True):
                variable.assign(value)
            self.progress = copy.deepcopy(self._saved_progress)

        def sync(self) -> None:
            try:
                if self._shared:
                    core.hvd.broadcast_variables(self._shared, root_rank=0)
                self.progress = core.hvd.broadcast_object(
                    self.progress, root_rank=0, name="elastic_progress"
                )
            except Exception as e:  # a peer lost during sync: run_fn resets on this only
                failure = _failure(e)
                if failure is e:
                    raise
                raise failure from e
            self.save()

        def reset(self) -> None:
            # After hvd.shutdown(); hvd.init(): the ranks are re-formed. No collective here.
            core.refresh_world()
            self.resets += 1

    return KerasElasticState()


def run_elastic(fn: Callable[[Any], Any], state: Any) -> Any:
    """`fn(state)` under hvd.elastic.run: re-entered, from the last commit, after a lost worker.

    `fn` must take rank, size, data shards and anything traced with them
    afresh on every entry (see `world()`), and end with `state.commit()` so
    that a peer lost after its last step is still noticed inside.
    """

    def guarded(state: Any) -> Any:
        core.refresh_world()
        try:
            return fn(state)
        except Exception as e:
            failure = _failure(e)
            if failure is e:
                raise
            raise failure from e

    return core.hvd.elastic.run(guarded)(state)
