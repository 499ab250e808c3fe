"""The benchmark suite: every measurement behind docs/benchmarks.md.

    python -m bench                         # all suites (most of an hour on 2 cores)
    python -m bench --suite scaling options # some of them
    python -m bench --quick                 # a smoke run (the tests use it)

Each measurement runs in a fresh process (threads are fixed at start-up,
horovodrun launches its own), is printed as it finishes, and lands in
`<out>/<suite>.json` with the exact command and the machine (CPU model
and SIMD flags); `<out>/report.md` gathers the tables. Results are kept per
CPU kind (bench/results/avx2, avx512-bf16, ...): the verdicts differ between them. Suites:

- throughput: ms/step and tokens/s of the reference config and the presets,
  one process on all cores, after warm-up, median of repeated blocks; MFU;
- keras: the project's train function against a stock Keras
  `model.fit(jit_compile=True)` of the same model (bench/keras_fit.py);
- torch: the same reference config and `small` preset in PyTorch (nanoGPT's
  model and loop, eager and `torch.compile` + fused AdamW);
- overhead: horovodrun -np 1 against one process without Horovod;
- scaling: np=2 x 1 thread against np=1 x 1 thread, and against one
  process on both cores;
- pipeline: what data/load.py delivers alone, against what training takes;
- options: fp16 compression, gradient accumulation, Horovod fusion
  threshold and cycle time, XLA, mixed bfloat16, at np=2 (and np=1).

Measurements outside the suites, run by hand (each module's docstring has
its command): bench.overlap (allreduce overlap, np=2 losses), bench.profile
(kernel times), bench.horovod_idle (what idle ranks cost per cycle time),
bench.parallel, bench.serving.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

from bench.common import RESULTS
from bench.runner import Runner
from bench.suites import SUITE_FUNCTIONS

SUITES = tuple(SUITE_FUNCTIONS)


def write_report(out: pathlib.Path) -> None:
    """report.md from every suite's JSON in `out` (suites may be rerun one at a time)."""
    sections = []
    for suite in SUITES:
        path = out / f"{suite}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        commands = dict.fromkeys(
            row["command"] for row in result["rows"] if isinstance(row.get("command"), str)
        )
        sections.append(
            f"## {suite}\n\nMachine: {json.dumps(result['machine'])}\n\n{result['table']}\n\n"
            "Commands:\n\n" + "\n".join(f"    {c}" for c in commands)
        )
    (out / "report.md").write_text("\n\n".join(sections) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES))
    p.add_argument("--quick", action="store_true", help="few steps: checks the code, not speed")
    p.add_argument(
        "--out",
        default="",
        help="where the JSON and report.md go (default: bench/results/<CPU kind>)",
    )
    args = p.parse_args(argv)
    from bench.common import cpu

    out = pathlib.Path(args.out or RESULTS / cpu()["cpu_kind"])
    out.mkdir(parents=True, exist_ok=True)
    from bench.common import machine

    runner = Runner(args.quick)
    info = machine()
    for suite in args.suite:
        result = SUITE_FUNCTIONS[suite](runner)
        result.update(
            {
                "suite": suite,
                "machine": info,
                "quick": args.quick,
                "command": shlex.join(argv or []),
            }
        )
        (out / f"{suite}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n## {suite}\n\n{result['table']}\n", flush=True)
    write_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
