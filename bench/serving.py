"""Serving throughput: 32 concurrent clients against one, on `python main.py serve`.

    python -m bench.serving                       # trains and exports a tiny run first (~1 min)
    python -m bench.serving --export RUN/export   # an existing export
    python -m bench.serving --clients 32 --requests 8 --max-new-tokens 16

The same one-row `generate` requests (varied prompts, greedy and seeded
sampling, fixed max_new_tokens) are sent by one client, one after another,
then by many clients at once, each on its own keep-alive connection. The
server batches the concurrent rows into shared model calls; the ratio of the
two throughputs is what dynamic batching buys (target: 4x). Latency
percentiles are per request, as the client sees them. The clients run on the
same machine as the server and take some of its cores.

Results: printed, and written to bench/results/<CPU kind>/serving.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench.common import RESULTS, cpu, table

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [
    "Return the number of",
    "Parse an email message",
    "Raise ValueError if",
    "The default is",
    "Open a file and",
    "Create a new",
    "If the value is",
    "This module provides",
]


def make_export(work: pathlib.Path, preset: str) -> pathlib.Path:
    """Train a run of `preset` in `work` and export it; the export's directory."""
    run_dir, out = work / "run", work / "export"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for args in (
        ["--preset", preset, "--run-dir", str(run_dir)],
        ["export", "--run-dir", str(run_dir), "--out", str(out)],
    ):
        print(f"[bench] python main.py {' '.join(args)}", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *args],
            cwd=work,
            env=env,
            check=True,
            capture_output=True,
            timeout=1800,
        )
    return out


@contextlib.contextmanager
def server(export: pathlib.Path, options: list[str]):
    """`python main.py serve` on a free port; yields the port, stops it with SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(ROOT / "main.py"), "serve", "--export", str(export)]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--model-name", "lm", *options],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"[bench] server exited: {proc.communicate()[1][-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("[bench] server not healthy within 180 s")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def body(i: int, max_new_tokens: int) -> bytes:
    """Request i: one row; even requests greedy, odd ones sampled with seed i."""
    row = {"prompts": PROMPTS[i % len(PROMPTS)], "max_new_tokens": max_new_tokens}
    row["seed"] = -1 if i % 2 == 0 else i
    return json.dumps({"signature_name": "generate", "instances": [row]}).encode()


def client(port: int, bodies: list[bytes], latencies: list[float], tokens: list[int]) -> None:
    """Send `bodies` one after another on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    try:
        for data in bodies:
            start = time.perf_counter()
            conn.request("POST", "/v1/models/lm:predict", body=data, headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {answer}")
            tokens.append(sum(t >= 0 for t in answer["predictions"][0]["token_ids"]))
    finally:
        conn.close()


def measure(port: int, clients: int, per_client: int, max_new_tokens: int) -> dict[str, Any]:
    """`clients` clients at once, `per_client` requests each: throughput and latency percentiles."""
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    def run(c: int) -> None:
        bodies = [body(c * per_client + i, max_new_tokens) for i in range(per_client)]
        try:
            client(port, bodies, latencies, tokens)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    before = health(port)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    seconds = time.perf_counter() - start
    after = health(port)
    if errors or any(t.is_alive() for t in threads):
        raise SystemExit(f"[bench] requests failed: {errors[:3]}")
    ms = sorted(1000 * x for x in latencies)
    quantile = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "clients": clients,
        "requests": len(ms),
        "seconds": round(seconds, 3),
        "requests_per_sec": len(ms) / seconds,
        "tokens_per_sec": sum(tokens) / seconds,
        "p50_ms": quantile[49],
        "p90_ms": quantile[89],
        "p99_ms": quantile[98],
        "mean_ms": statistics.fmean(ms),
        "model_calls": after["model_calls"] - before["model_calls"],
        "rows_per_call": (after["rows"] - before["rows"])
        / max(1, after["model_calls"] - before["model_calls"]),
    }


def health(port: int) -> dict[str, Any]:
    """The server's /healthz counters (model calls and rows so far)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def median_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the median requests/s, with every trial's requests/s beside it."""
    ranked = sorted(trials, key=lambda t: t["requests_per_sec"])
    each = [round(t["requests_per_sec"], 1) for t in ranked]
    return {**ranked[len(ranked) // 2], "requests_per_sec_each_trial": each}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--export", help="an export to serve (default: train and export --preset)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=8, help="per concurrent client")
    p.add_argument("--sequential", type=int, default=64, help="requests of the one client")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--trials", type=int, default=3, help="alternated runs of each; medians")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument(
        "--out", default="", help="JSON result (default: bench/results/<CPU kind>/serving.json)"
    )
    args = p.parse_args(argv)
    machine = cpu()
    load_before = os.getloadavg()[0]  # other work on a shared machine moves the figures
    with tempfile.TemporaryDirectory() as tmp:
        export = (
            pathlib.Path(args.export)
            if args.export
            else make_export(pathlib.Path(tmp), args.preset)
        )
        meta = json.loads((export / "serving.json").read_text())
        options = [
            "--max-batch",
            str(args.max_batch),
            "--batch-timeout-ms",
            str(args.batch_timeout_ms),
        ]
        with server(export, options) as port:
            measure(port, 4, 4, args.max_new_tokens)  # warm-up: connections, batch shapes
            ones, manys = [], []
            for _ in range(args.trials):  # alternated: a shared machine's speed drifts
                ones.append(measure(port, 1, args.sequential, args.max_new_tokens))
                manys.append(measure(port, args.clients, args.requests, args.max_new_tokens))
    one, many = median_trial(ones), median_trial(manys)
    ratio = many["requests_per_sec"] / one["requests_per_sec"]
    rows = [
        {**one, "mode": "sequential (1 client)"},
        {**many, "mode": f"concurrent ({args.clients} clients)"},
    ]
    columns = [
        "mode",
        "clients",
        "requests",
        "requests_per_sec",
        "tokens_per_sec",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "rows_per_call",
    ]
    report = (
        f"CPU: {machine['cpu']} (flags: {', '.join(machine['cpu_flags'])}; {os.cpu_count()} cores)\n"
        f"model: {'an existing export' if args.export else 'preset ' + args.preset}, "
        f"task {meta.get('task')}, quantize {meta.get('quantize')}; one-row generate requests, "
        f"max_new_tokens {args.max_new_tokens}, half greedy, half sampled\n\n"
        + table(rows, columns)
        + f"\n\nconcurrent / sequential requests/s (medians of {args.trials} alternated trials): "
        f"**{ratio:.2f}x** (target >= 4x); requests/s of each trial: "
        f"{one['requests_per_sec_each_trial']} and {many['requests_per_sec_each_trial']}"
    )
    print(report, flush=True)
    result = {
        "suite": "serving",
        "rows": rows,
        "concurrent_over_sequential": ratio,
        "target": 4.0,
        "met": ratio >= 4.0,
        "machine": {**machine, "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("export", "out")},
        "table": report,
        "command": "python -m bench.serving" + (" --export EXPORT" if args.export else ""),
    }
    out = pathlib.Path(args.out) if args.out else RESULTS / machine["cpu_kind"] / "serving.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
