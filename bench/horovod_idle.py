"""What Horovod ranks cost while they have nothing to reduce.

    horovodrun -np 4 -H localhost:4 --gloo python -m bench.horovod_idle --seconds 20
    HOROVOD_CYCLE_TIME=20 horovodrun -np 4 -H localhost:4 --gloo python -m bench.horovod_idle

Horovod's background thread meets the other ranks once per cycle
(HOROVOD_CYCLE_TIME), whether or not any tensor is ready, so ranks that share
CPU cores pay for it while TensorFlow computes. Every rank starts as main.py
does (`utils.distributed.init`, so the project's default cycle time), makes
one allreduce, then sleeps: the CPU its threads use meanwhile is the price of
the meetings alone. Rank 0 prints one JSON line: per rank, the CPU seconds
used per second (1.0 = one core) and the wake-ups per second of its two
busiest threads (Horovod's background thread and Gloo's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import emit

HZ = os.sysconf("SC_CLK_TCK")


def thread_times() -> dict[str, tuple[int, int]]:
    """Per thread of this process: (CPU clock ticks, voluntary context switches)."""
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/status") as f:
                status = f.read()
        except OSError:  # the thread ended
            continue
        switches = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        times[tid] = (int(fields[11]) + int(fields[12]), switches)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.horovod_idle", description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="how long the ranks sleep")
    p.add_argument("--out", default="", help="also write the JSON result here")
    args = p.parse_args(argv)
    from utils import distributed

    world = distributed.init(threads=1)
    distributed.allreduce(1.0, name="horovod_idle.warmup")  # the background thread is up
    before, start = thread_times(), time.perf_counter()
    time.sleep(args.seconds)
    after, seconds = thread_times(), time.perf_counter() - start
    ticks = {t: after[t][0] - before[t][0] for t in after if t in before}
    wakeups = sorted(
        ((after[t][1] - before[t][1]) / seconds for t in after if t in before), reverse=True
    )
    mine = {
        "cpu_per_second": sum(ticks.values()) / HZ / seconds,
        "busiest_threads_wakeups_per_second": [round(w) for w in wakeups[:2]],
    }
    ranks = distributed.allgather_object(mine, name="horovod_idle.gather")
    result = {
        "world_size": world.size,
        "horovod": world.horovod,
        "cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME", ""),
        "seconds": round(seconds, 1),
        "cpu_per_second_each_rank": [round(r["cpu_per_second"], 4) for r in ranks],
        "cpu_per_second_all_ranks": round(sum(r["cpu_per_second"] for r in ranks), 4),
        "wakeups_per_second_each_rank": [r["busiest_threads_wakeups_per_second"] for r in ranks],
    }
    if world.is_chief:
        emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
