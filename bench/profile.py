"""Where the training step's time goes: the TF profiler's trace of the XLA kernels, summed.

    python -m bench.profile --model reference            # table of kernel classes
    python -m bench.profile --model small --top 30       # the 30 costliest kernels
    TF_ENABLE_ONEDNN_OPTS=0 python -m bench.profile      # compare with oneDNN off

Times the same train function as bench/step.py, then records `--steps`
steps with `tf.profiler` and reads the trace (XSpace protobuf): every XLA
CPU kernel (a "thunk": a dot, a loop fusion, a reduction) is one event on
the thread that ran it. Printed per step: kernel time summed by class (dots
against everything else), the costliest kernels, and how much of the wall
time neither, one or both threads were running a kernel. The full XLA dump
(HLO after optimization, each kernel's LLVM IR) comes with
`XLA_FLAGS=--xla_dump_to=DIR`; the kernel names match.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import tempfile
import time

_RUNTIME = {  # scheduling events that enclose the kernels
    "ThunkExecutor::Execute",
    "ExecutorState::Process",
    "ExecutorState::ProcessAsync::Start",
    "CpuExecutable::ExecuteAsyncOnStream",
    "BlockUntilReady",
    "SlinkyThreadPool::Await",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", choices=("reference", "tiny", "small"), default="reference")
    p.add_argument("--xla", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--top", type=int, default=15, help="costliest kernels to list")
    return p.parse_args(argv)


def kernel_events(logdir: str) -> list[tuple[str, str, int, int]]:
    """(thread, kernel name, start ps, duration ps) of every XLA kernel in the trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = next(pathlib.Path(logdir).rglob("*.xplane.pb"))
    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    host = next(p for p in space.planes if p.name == "/host:CPU")
    names = {k: v.name for k, v in host.event_metadata.items()}
    events = []
    for line in host.lines:
        if "Eigen" not in line.name:  # XLA's kernels run on the intra-op pool
            continue
        for ev in line.events:
            name = names.get(ev.metadata_id, "?")
            if name in _RUNTIME or name.startswith("end:"):
                continue
            events.append(
                (line.name, name, line.timestamp_ns * 1000 + ev.offset_ps, ev.duration_ps)
            )
    return events


def busy_threads(events: list[tuple[str, str, int, int]]) -> list[float]:
    """Picoseconds during which 0, 1 and 2+ threads were running a kernel."""
    points = sorted(
        [(start, 1) for _, _, start, _ in events] + [(s + d, -1) for _, _, s, d in events]
    )
    busy, level, last = [0.0, 0.0, 0.0], 0, points[0][0]
    for t, delta in points:
        busy[min(level, 2)] += t - last
        level, last = level + delta, t
    return busy


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from bench.step import build_step

    step, info = build_step(args.model, xla=bool(args.xla))
    import tensorflow as tf

    for _ in range(30):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(args.steps):
            step()
        tf.profiler.experimental.stop()
        events = kernel_events(logdir)
    per_step = 1e9 * args.steps  # ps -> ms per step
    by_kernel, by_class = collections.Counter(), collections.Counter()
    for _, name, _, duration in events:
        by_kernel[name] += duration / per_step
        kind = re.sub(r"\.\d+$", "", name)
        by_class["dot" if re.match(r"(dot|MatMul\w*)$", kind) else kind] += duration / per_step
    idle, one, both = (b / per_step for b in busy_threads(events))
    print(f"{info}: {ms:.1f} ms/step unprofiled; per step while profiled:")
    print(f"  wall with no kernel running {idle:.1f} ms, one thread {one:.1f}, both {both:.1f}")
    print(f"  kernel time summed over threads {sum(by_class.values()):.1f} ms, by class:")
    for kind, t in by_class.most_common(12):
        print(f"    {t:7.2f} ms  {kind}")
    print("  costliest kernels (names as in XLA's dump):")
    for name, t in by_kernel.most_common(args.top):
        print(f"    {t:7.3f} ms  {name}")
    return {"ms_per_step": ms, "by_class": dict(by_class), "idle_ms": idle}


if __name__ == "__main__":
    main(sys.argv[1:])
