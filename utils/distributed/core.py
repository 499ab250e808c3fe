"""Horovod's core for this project: start-up, the world, and collectives.

`init()` starts Horovod (when installed), gives each rank its share of CPU
threads and pins one GPU per local rank. The collectives below are what the
rest of the project uses; each is the single-process identity when Horovod
is absent or the world has one rank, so the same code runs either way:

- `allreduce()`, `allreduce_gradients()`: Horovod's allreduce on tensors and
  arrays (one grouped, fused allreduce for gradients);
- `broadcast_variables()`: copy rank 0's model and optimizer state to all;
- `allreduce_sums()`: exact cross-rank metrics (sum values and counts, then
  divide, never a mean of per-rank means);
- `broadcast_object()`, `allgather_object()`, `any_rank()`, `barrier()`;
- `ProcessGroup` / `process_set()`: a subset of ranks (tensor parallelism's
  groups) and the Horovod process set that `init(process_sets=...)` made for it;
- `is_chief()` / `print0()`: rank 0 alone prints, checkpoints and plots.

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


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """A set of global ranks that run collectives together (sorted, as Horovod keeps them).

    Process sets exist only for groups of two or more ranks that are not the
    whole world: a one-rank group's collectives are the identity, and the
    whole world is Horovod's global process set.
    """

    ranks: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    def rank_of(self, global_rank: int) -> int:
        """Position of `global_rank` in the group (its rank within the process set)."""
        return self.ranks.index(global_rank)


# Horovod ProcessSet objects made by init(process_sets=...), keyed by their sorted ranks.
_process_sets: dict[tuple[int, ...], Any] = {}
_tensor_size = 1  # tensor-parallel shards per replica (set_tensor_size)


def init(
    threads: int = 0,
    use_horovod: bool | None = None,
    elastic: bool = False,
    process_sets: Sequence[Sequence[int]] = (),
) -> World:
    """Start Horovod (if available) and configure TensorFlow for this rank.

    Call once, before TensorFlow runs any op.

    Args:
        threads: intra-op threads for this rank; 0 shares this host's CPU
            cores evenly among its ranks (oversubscription costs more than
            it gives).
        use_horovod: force Horovod on or off; default: on when installed.
        elastic: train elastically (--elastic); it takes effect only when
            horovodrun started this process in elastic mode (HOROVOD_ELASTIC=1).
        process_sets: groups of global ranks that will run collectives of
            their own (tensor parallelism). Horovod needs every rank to pass
            the same list, here at init; neither the whole world nor a
            duplicate may be in it (see `process_set`).
    """
    global _world, hvd
    from utils.tf_env import import_tensorflow, quiet_native_logs

    tf = import_tensorflow()
    use_horovod = horovod_available() if use_horovod is None else use_horovod
    if use_horovod:
        if not os.environ.get("HOROVOD_CYCLE_TIME"):
            # Unset, or set empty, which Horovod reads as 0 ms: a busy loop that costs a
            # quarter to half of a core per idle rank (`python -m bench.horovod_idle`).
            os.environ["HOROVOD_CYCLE_TIME"] = _default_cycle_time(
                os.environ.get("HOROVOD_SIZE", "1") == "1" and not elastic,
                bool(tf.config.list_physical_devices("GPU")),
            )
        with quiet_native_logs():
            import horovod.tensorflow

            hvd = horovod.tensorflow
        # Not inside quiet_native_logs: when init aborts the process (a Gloo
        # connection refused, say), its message must reach the terminal.
        sets = {tuple(sorted(ranks)): hvd.ProcessSet(sorted(ranks)) for ranks in process_sets}
        if sets:
            hvd.init(process_sets=list(sets.values()))
            _process_sets.update(sets)
        else:
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


def _default_cycle_time(one_rank: bool, gpu: bool) -> str:
    """HOROVOD_CYCLE_TIME (ms) when the environment does not set it.

    Horovod's background thread meets the other ranks every cycle, with or
    without tensors to reduce: at np=4 on 2 cores an idle rank costs 9-20% of
    a core at 1 ms (Horovod's default), 2-5% at 5 ms, 0.3% at 100 ms
    (`python -m bench.horovod_idle`, docs/performance.md).
    """
    if one_rank:
        # One rank never calls a collective here (they are all skipped at size 1):
        # let the thread sleep.
        return "100"
    if not gpu:
        # Ranks sharing CPU cores: 5 ms leaves the cores to TensorFlow between meetings;
        # measured 3-10% off the step at np=2 and np=4 on 2 cores (docs/performance.md).
        return "5"
    return "1"  # Horovod's own default, for GPU hosts


def world() -> World:
    return _world


def rank() -> int:
    """This process's rank (0 without Horovod)."""
    return _world.rank


def size() -> int:
    """Number of ranks (1 without Horovod or outside horovodrun)."""
    return _world.size


def local_rank() -> int:
    """This process's rank among the ranks of its host."""
    return _world.local_rank


def local_size() -> int:
    """Number of ranks on this host."""
    return _world.local_size


def refresh_world() -> World:
    """Read rank and size again after Horovod re-formed the ranks (elastic; local calls only)."""
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


class Compression:
    """How gradients travel between ranks: Horovod's choices, named without Horovod installed.

    `DistributedOptimizer(compression=...)` also takes Horovod's own
    `horovod.tensorflow.Compression.fp16` / `.none`.
    """

    none = "none"
    fp16 = "fp16"


def _codec(compression: Any) -> Any:
    """Horovod's compressor for "none"/"fp16" or for one of Horovod's Compression classes."""
    name = compression if isinstance(compression, str) else getattr(compression, "__name__", "")
    name = name.lower().removesuffix("compressor")  # Horovod's NoneCompressor, FP16Compressor
    if name == "none":
        return hvd.Compression.none
    if name == "fp16":
        return hvd.Compression.fp16
    raise ValueError(
        f"unknown compression {compression!r}: use Compression.none or Compression.fp16"
    )


def process_set(group: ProcessGroup) -> Any:
    """The Horovod process set of `group`: the global one for the whole world.

    Raises UserError when `init(process_sets=...)` did not create it.
    """
    if group.ranks == tuple(range(_world.size)):
        return hvd.global_process_set
    found = _process_sets.get(group.ranks)
    if found is None:
        raise UserError(
            f"no Horovod process set for ranks {list(group.ranks)}: pass it to "
            "utils.distributed.init(process_sets=...) on every rank"
        )
    return found


def allreduce_gradients(
    grads: Sequence, compression: Any = "none", group: ProcessGroup | None = None
) -> list:
    """Average gradients across ranks (or across `group`) with one grouped allreduce.

    Meant for the inside of a (non-XLA) `tf.function`, between computing
    gradients and applying them. At world size 1 it is skipped (nothing to
    average; it would only cost Horovod's cycle time). `None` entries
    (variables the loss does not reach) stay `None`.

    Args:
        grads: one gradient (dense or IndexedSlices) per trainable variable.
        compression: `Compression.none`, or `Compression.fp16` to send
            half-precision values.
        group: average over these ranks only (tensor parallelism's
            data-parallel group); None: over every rank. A one-rank group
            averages nothing.
    """
    grads = list(grads)
    if not _active() or (group is not None and group.size == 1):
        return grads
    import tensorflow as tf

    present = [i for i, g in enumerate(grads) if g is not None]
    # IndexedSlices -> dense: one fused buffer (Horovod's sparse_as_dense).
    dense = [tf.convert_to_tensor(grads[i]) for i in present]
    where = {} if group is None else {"process_set": process_set(group)}
    reduced = hvd.grouped_allreduce(dense, op=hvd.Average, compression=_codec(compression), **where)
    for i, g in zip(present, reduced, strict=True):
        grads[i] = g
    return grads


def allreduce_each(grads: Sequence, compression: Any = "none") -> list:
    """Average gradients across ranks with one allreduce per tensor, not one group.

    A grouped allreduce starts when its last tensor is ready; separate ones
    let Horovod send each gradient as soon as the backward pass has made it
    (and fuse whatever is ready in one cycle), so that the communication can
    overlap the rest of the backward pass when that pass is not one XLA
    computation. Used by `python -m bench.overlap`, which measures that
    overlap against `allreduce_gradients`. At world size 1 it is skipped.
    """
    grads = list(grads)
    if not _active():
        return grads
    import tensorflow as tf

    return [
        None
        if g is None
        else hvd.allreduce(tf.convert_to_tensor(g), op=hvd.Average, compression=_codec(compression))
        for g in grads
    ]


def allreduce(value: Any, average: bool = True, name: str | None = None) -> Any:
    """The mean (or with `average=False` the sum) of `value` over ranks.

    Takes a number, a numpy array or a tensor and returns the same kind, so it
    serves eager code (callbacks, evaluation) as well as graphs.
    """
    if not _active():
        return value
    import tensorflow as tf

    op = hvd.Average if average else hvd.Sum
    if tf.is_tensor(value):
        return hvd.allreduce(value, op=op, name=name)
    array = np.asarray(value)
    out = hvd.allreduce(tf.constant(array), op=op, name=name).numpy()
    return out if array.ndim else out.item()


def broadcast_variables(variables: Sequence, root_rank: int = 0) -> None:
    """Overwrite `variables` (Keras or tf.Variables) with root_rank's values.

    Call after the optimizer has built its slots (they exist only then) and
    after any checkpoint was restored on the root.
    """
    if not _active() or not variables:
        return
    # Keras 3 variables wrap a tf.Variable in `.value`; Horovod needs the latter.
    hvd.broadcast_variables([getattr(v, "value", v) for v in variables], root_rank=root_rank)


def allreduce_sums(values: dict[str, Any], every_rank: bool = False) -> dict[str, Any]:
    """Sum each value across data-parallel replicas, in one float64 allreduce.

    Values are numbers (loss sums, token counts) or numpy arrays (per-class
    counts, a confusion matrix); each comes back with its own shape.
    Every rank must pass the same keys and shapes.

    With tensor parallelism the T shards of a replica read the same rows and
    compute the same figures, so only tensor rank 0 of each replica adds its
    values (the others send zeros): each replica counts once. `every_rank`
    adds every rank's values (flags, barriers).
    """
    arrays = {k: np.asarray(values[k], dtype=np.float64) for k in sorted(values)}
    if not every_rank and tensor_rank() != 0:
        arrays = {k: np.zeros_like(a) for k, a in arrays.items()}
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
    return bool(allreduce_sums({name: float(flag)}, every_rank=True)[name] > 0)


def barrier() -> None:
    """Wait until every rank gets here."""
    allreduce_sums({"barrier": 0.0}, every_rank=True)


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


def set_tensor_size(tensor: int) -> None:
    """Record T, the tensor-parallel shards per replica (utils/distributed/tensor_parallel.py).

    The data-parallel view below (`data_rank`, `data_size`) and the
    replica-once sums of `allreduce_sums` follow it.
    """
    global _tensor_size
    _tensor_size = tensor


def tensor_size() -> int:
    """T: the shards of one data-parallel replica (1 without tensor parallelism)."""
    return _tensor_size


def tensor_rank() -> int:
    """This rank's position in its tensor group (0 without tensor parallelism)."""
    return _world.rank % _tensor_size


def data_rank() -> int:
    """This rank's data-parallel replica: which rows of each global batch it reads."""
    return _world.rank // _tensor_size


def data_size() -> int:
    """The number of data-parallel replicas: ranks / T."""
    return _world.size // _tensor_size


def scaled_learning_rate(lr: float, enabled: bool = True) -> float:
    """Horovod's convention: the global batch grows with the replicas, so does the LR.

    Replicas, not ranks: the T shards of a tensor-parallel replica read the same rows.
    """
    return lr * data_size() if enabled else lr


def shutdown() -> None:
    """Stop Horovod. Under tensor parallelism every rank waits for the others first: a
    group that shut down while another still gathered weights made that gather fail."""
    if _world.horovod and hvd is not None:
        if _tensor_size > 1 and _active():
            barrier()
        hvd.shutdown()


def describe() -> dict[str, Any]:
    """Versions and topology for config.json."""
    info = dataclasses.asdict(_world)
    info["horovod_version"] = getattr(sys.modules.get("horovod"), "__version__", None)
    return info
