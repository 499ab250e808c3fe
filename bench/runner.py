"""Runs each benchmark measurement in a fresh process and keeps its result and command.

Threads are fixed when TensorFlow starts and horovodrun launches its own
processes, so every measurement is a process of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent


class Runner:
    """Runs one measurement per process and keeps its result and command."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.cache: dict[str, dict[str, Any]] = {}

    def _timing(self, module: str) -> list[str]:
        if not self.quick:
            return []
        if module == "bench.pipeline":
            return ["--warmup", "5", "--steps", "20", "--repeats", "2"]
        quick = ["--warmup", "3", "--steps", "3", "--repeats", "2"]
        return quick + ["--peak-seconds", "0.3"] * (module == "bench.step")

    def run(
        self,
        module: str,
        args: list[str],
        np: int = 0,
        env: dict[str, str] | None = None,
        trial: int = 0,
        copies: int = 1,
    ) -> dict[str, Any]:
        """`python -m module args` (under `horovodrun -np np` when np > 0); its JSON result.

        `copies` > 1 starts that many identical processes at once, which do not
        communicate; the result is the first one's, with their summed
        `tokens_per_sec` (the baseline that isolates Horovod's communication
        from processes sharing the cores). The same command runs once per suite
        run (later calls reuse its result), unless `trial` asks for another
        measurement of it.
        """
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            python = [sys.executable, "-m", module, *args, *self._timing(module)]
            launcher = []
            if np:
                horovodrun = str(BIN / "horovodrun")
                launcher = [horovodrun, "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
            command = [*launcher, *python, "--out", out]
            shown = " ".join(
                [f"{k}={v}" for k, v in (env or {}).items()]
                + ["horovodrun"] * bool(np)
                + launcher[1:]
                + ["python", "-m", module, *args]
            ) + (f" (x{copies} at once)" if copies > 1 else "")
            key = f"{shown} #{trial}"
            if key in self.cache:
                return self.cache[key]
            print(f"[bench] {shown}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            outs = [out] + [os.path.join(tmp, f"result{i}.json") for i in range(1, copies)]
            procs = [
                subprocess.Popen(
                    [*command[:-1], path],
                    cwd=ROOT,
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for path in outs
            ]
            results = []
            for proc, path in zip(procs, outs, strict=True):
                stdout, stderr = proc.communicate(timeout=1800)
                if proc.returncode != 0 or not os.path.exists(path):
                    sys.stderr.write(stdout[-3000:] + stderr[-3000:])
                    raise SystemExit(f"[bench] failed ({proc.returncode}): {shown}")
                with open(path) as f:
                    results.append(json.load(f))
            result = results[0]
            if copies > 1:
                result["copies"] = copies
                result["tokens_per_sec_each"] = [r["tokens_per_sec"] for r in results]
                result["tokens_per_sec"] = sum(result["tokens_per_sec_each"])
        result["command"] = shown
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        self.cache[key] = result
        print(
            f"[bench]   -> {result.get('ms_per_step', result.get('ms_per_batch')):.2f} ms, "
            f"{result['tokens_per_sec']:,.0f} tokens/s",
            file=sys.stderr,
            flush=True,
        )
        return result
