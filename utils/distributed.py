"""Horovod for Keras 3, on `horovod.tensorflow` ops. All Horovod code lives here.

Horovod 0.28.1's Keras layer does not work with Keras 3: its
`DistributedOptimizer` hooks methods Keras 3 never calls (gradients are
silently NOT averaged) and its callbacks fail on Keras 3 variables. So this
module supplies the integration from Horovod's core ops, which do work:

- `init()`: start Horovod, give each rank its share of CPU threads, pin one
  GPU per local rank where GPUs exist;
- `allreduce_gradients()`: average gradients across ranks (one grouped,
  fused allreduce) between computing and applying them;
- `broadcast_variables()`: copy rank 0's model and optimizer state to all;
- `allreduce_sums()`: exact cross-rank metrics (sum values and counts, then
  divide, never a mean of per-rank means);
- `broadcast_object()`, `allgather_object()`, `any_rank()`, `barrier()`;
- `is_chief()` / `print0()`: rank 0 alone prints, checkpoints and plots;
- `elastic_state()` / `run_elastic()`: Horovod elastic training (--elastic
  under `horovodrun --min-np ...`): the job goes on when a worker is lost.

Without Horovod installed (or with `use_horovod=False`) every function is
the single-process identity, so the same training code runs either way.
Horovod ops have no XLA kernels: never call these inside a function compiled
with `jit_compile=True`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from utils.errors import UserError

hvd = None  # horovod.tensorflow once imported by init(); optional


def horovod_available() -> bool:
    """Whether Horovod's TensorFlow binding is installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("horovod.tensorflow") is not None
    except ImportError:
        return False


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process sits among the workers."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cross_size: int = 1  # number of hosts
    horovod: bool = False  # whether Horovod is active (even at size 1)
    intra_op_threads: int = 0
    elastic: bool = False  # horovodrun elastic mode and --elastic: the size may change

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


_world = World()


def init(threads: int = 0, use_horovod: bool | None = None, elastic: bool = False) -> World:
    """Start Horovod (if available) and configure TensorFlow for this rank.

    Call once, before TensorFlow runs any op.

    Args:
        threads: intra-op threads for this rank; 0 shares this host's CPU
            cores evenly among its ranks (oversubscription costs more than
            it gives).
        use_horovod: force Horovod on or off; default: on when installed.
        elastic: train elastically (--elastic); it takes effect only when
            horovodrun started this process in elastic mode (HOROVOD_ELASTIC=1).
    """
    global _world, hvd
    from utils.tf_env import import_tensorflow, quiet_native_logs

    tf = import_tensorflow()
    use_horovod = horovod_available() if use_horovod is None else use_horovod
    if use_horovod:
        if os.environ.get("HOROVOD_SIZE") == "1" and not elastic:
            # One rank never calls a collective here (they are all skipped at size 1),
            # but Horovod's background thread still wakes every cycle (1 ms by default)
            # and steals time from TensorFlow's threads: let it sleep.
            os.environ.setdefault("HOROVOD_CYCLE_TIME", "100")
        with quiet_native_logs():
            import horovod.tensorflow

            hvd = horovod.tensorflow
        # Not inside quiet_native_logs: when init aborts the process (a Gloo
        # connection refused, say), its message must reach the terminal.
        hvd.init()
        world = World(
            hvd.rank(),
            hvd.size(),
            hvd.local_rank(),
            hvd.local_size(),
            hvd.cross_size(),
            True,
            elastic=elastic and os.environ.get("HOROVOD_ELASTIC") == "1",
        )
    else:
        world = World()
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    intra = threads or max(1, cores // world.local_size)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, intra))
    except RuntimeError:  # TensorFlow already started (e.g. init() called twice in tests)
        intra = tf.config.threading.get_intra_op_parallelism_threads()
    # Horovod: pin one GPU per local rank, and let memory grow instead of grabbing all.
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        gpu = gpus[world.local_rank % len(gpus)]
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")
    _world = dataclasses.replace(world, intra_op_threads=intra)
    return _world


def world() -> World:
    return _world


def is_chief() -> bool:
    return _world.rank == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only; flushed, since horovodrun pipes the output."""
    if is_chief():
        print(*args, **kwargs, flush=True)


def _active() -> bool:
    # Elastic: collectives stay in (and in traced steps) at size 1, since workers may come and go.
    return _world.horovod and (_world.size > 1 or _world.elastic)


def averaging() -> bool:
    """Whether training steps must average across ranks (several ranks, or elastic mode)."""
    return _active()


def allreduce_gradients(grads: Sequence, compression: str = "none") -> list:
    """Average gradients across ranks with one grouped allreduce.

    Meant for the inside of a (non-XLA) `tf.function`, between computing
    gradients and applying them. At world size 1 it is skipped (nothing to
    average; it would only cost Horovod's cycle time).

    Args:
        grads: one dense gradient per trainable variable.
        compression: "none", or "fp16" to send half-precision values.
    """
    if not _active():
        return list(grads)
    import tensorflow as tf

    grads = [tf.convert_to_tensor(g) for g in grads]  # IndexedSlices -> dense: one fused buffer
    codec = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
    return list(hvd.grouped_allreduce(grads, op=hvd.Average, compression=codec))


def broadcast_variables(variables: Sequence, root_rank: int = 0) -> None:
    """Overwrite `variables` (Keras or tf.Variables) with root_rank's values.

    Call after the optimizer has built its slots (they exist only then) and
    after any checkpoint was restored on the root.
    """
    if not _active() or not variables:
        return
    # Keras 3 variables wrap a tf.Variable in `.value`; Horovod needs the latter.
    hvd.broadcast_variables([getattr(v, "value", v) for v in variables], root_rank=root_rank)


def allreduce_sums(values: dict[str, Any]) -> dict[str, Any]:
    """Sum each value across ranks, in one float64 allreduce.

    Values are numbers (loss sums, token counts) or numpy arrays (per-class
    counts, a confusion matrix); each comes back with its own shape.
    Every rank must pass the same keys and shapes.
    """
    arrays = {k: np.asarray(values[k], dtype=np.float64) for k in sorted(values)}
    if _active():
        import tensorflow as tf

        flat = np.concatenate([a.ravel() for a in arrays.values()]) if arrays else np.zeros(0)
        summed = hvd.allreduce(tf.constant(flat), op=hvd.Sum, name="allreduce_sums").numpy()
        cuts = np.cumsum([a.size for a in arrays.values()])[:-1]
        arrays = {
            k: part.reshape(a.shape)
            for (k, a), part in zip(arrays.items(), np.split(summed, cuts), strict=True)
        }
    return {k: float(a) if a.ndim == 0 else a for k, a in arrays.items()}


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """root_rank's (picklable) `obj` on every rank."""
    if not _active():
        return obj
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)


def allgather_object(obj: Any, name: str | None = None) -> list:
    """Every rank's `obj`, as a list indexed by rank."""
    if not _active():
        return [obj]
    return hvd.allgather_object(obj, name=name)


def any_rank(flag: bool, name: str = "any_rank") -> bool:
    """True on every rank if `flag` is true on any: for decisions all must share."""
    return bool(allreduce_sums({name: float(flag)})[name] > 0)


def barrier() -> None:
    """Wait until every rank gets here."""
    allreduce_sums({"barrier": 0.0})


def chief_runs(fn: Callable[[], Any], name: str) -> Any:
    """Run `fn` on rank 0 only; its result, or the UserError it raised, reaches every rank.

    For work one rank does for all (choosing and creating the run directory):
    a bad-input error must stop every rank, not leave the others waiting.
    """
    outcome = None
    if is_chief():
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome, name=name)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


def local_chief_runs(fn: Callable[[], Any], name: str) -> list[Any]:
    """Run `fn` on local rank 0 of every host; all ranks get every host's result.

    For per-host work on hosts that may not share a filesystem (preparing
    data); the other ranks wait here. A UserError on any host stops all ranks.
    """
    outcome = None
    if _world.local_rank == 0:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", str(e))
    outcomes = allgather_object(outcome, name=name)
    for o in outcomes:
        if o is not None and o[0] == "error":
            raise UserError(o[1])
    return [o[1] for o in outcomes if o is not None]


# --- elastic training ------------------------------------------------------
#
# Horovod 0.28.1's elastic helpers do not fit Keras 3 (see docs/elastic.md):
# TensorFlowKerasState calls `optimizer.variables()` (a list in Keras 3),
# TensorFlowState broadcasts in its constructor and not in TF2's sync(), and
# hvd.elastic.run silently swallows the error of a failed grouped allreduce
# (it only recognises messages naming HorovodAllreduce/Allgather/Broadcast),
# returning None as if training had finished. So the state object and the
# error mapping below are the project's own.


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
    if "horovod" in text.lower() or "gloo" in text.lower():
        return HorovodInternalError(text)
    if isinstance(error, tf.errors.UnknownError):
        return RuntimeError(f"TensorFlow error: {text}")
    return error


def _refresh_world() -> World:
    """Read rank and size again after Horovod re-formed the ranks (local calls only)."""
    global _world
    _world = dataclasses.replace(
        _world,
        rank=hvd.rank(),
        size=hvd.size(),
        local_rank=hvd.local_rank(),
        local_size=hvd.local_size(),
        cross_size=hvd.cross_size(),
    )
    return _world


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
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
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
                    hvd.broadcast_variables(self._shared, root_rank=0)
                self.progress = hvd.broadcast_object(
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
            _refresh_world()
            self.resets += 1

    return KerasElasticState()


def run_elastic(fn: Callable[[Any], Any], state: Any) -> Any:
    """`fn(state)` under hvd.elastic.run: re-entered, from the last commit, after a lost worker.

    `fn` must take rank, size, data shards and anything traced with them
    afresh on every entry (see `world()`), and end with `state.commit()` so
    that a peer lost after its last step is still noticed inside.
    """

    def guarded(state: Any) -> Any:
        _refresh_world()
        try:
            return fn(state)
        except Exception as e:
            failure = _failure(e)
            if failure is e:
                raise
            raise failure from e

    return hvd.elastic.run(guarded)(state)


def scaled_learning_rate(lr: float, enabled: bool = True) -> float:
    """Horovod's convention: the global batch grows with the ranks, so does the LR."""
    return lr * _world.size if enabled else lr


def shutdown() -> None:
    if _world.horovod and hvd is not None:
        hvd.shutdown()


def describe() -> dict[str, Any]:
    """Versions and topology for config.json."""
    info = dataclasses.asdict(_world)
    info["horovod_version"] = getattr(sys.modules.get("horovod"), "__version__", None)
    return info
