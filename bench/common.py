"""What every benchmark shares: the reference data and config, timing, FLOPs, the matmul peak."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"  # one folder per CPU kind

# The reference configuration (the issue's, and nanoGPT's shakespeare-char shape):
# GPT 4 layers, 4 heads, width 128, FFN 512, block 64, batch 12 per rank,
# character vocabulary of 96, AdamW.
REFERENCE = {
    "n_layers": 4,
    "n_heads": 4,
    "d_model": 128,
    "d_ff": 512,
    "seq_len": 64,
    "dropout": 0.0,
}
REFERENCE_BATCH = 12
CHAR_VOCAB = 96  # id 0 is padding (never occurs); 1..95 are printable ASCII 32..126


def char_tokens(max_chars: int = 2_000_000) -> np.ndarray:
    """The built-in corpus (stdlib docstrings), cleaned, as character ids 1..95.

    Parsing the standard library takes about 8 s, in every benchmark process
    (a quick `python -m bench` starts a dozen), so the ids are kept under the
    prepared-data directory, keyed like `main.py`'s prepared data: by the
    sources' bytes, `max_chars` and data/prepare.py's PREP_VERSION.
    """
    import hashlib

    from data.prepare import PREP_VERSION
    from data.sources import StdlibDocstrings
    from utils.config import DataConfig
    from utils.io import build_once

    source = StdlibDocstrings()
    settings = json.dumps([PREP_VERSION, source.fingerprint(), max_chars]).encode()
    key = hashlib.sha256(settings).hexdigest()[:12]
    out = pathlib.Path(DataConfig().prepared_dir) / f"bench-char-tokens-{key}"
    out, _ = build_once(
        out,
        lambda tmp: np.save(tmp / "tokens.npy", _char_ids(source, max_chars)),
        complete="tokens.npy",
    )
    return np.load(out / "tokens.npy")


def _char_ids(source, max_chars: int) -> np.ndarray:
    """`source`'s cleaned documents, at least `max_chars` characters, as ids 1..95."""
    from data.clean import clean_text

    pieces, total = [], 0
    for doc in source.documents():
        text = clean_text(doc.text) + "\n"
        pieces.append(text)
        total += len(text)
        if total >= max_chars:
            break
    codes = np.frombuffer("".join(pieces).encode("ascii", "replace"), dtype=np.uint8).astype(
        np.int64
    )
    codes = np.where(
        (codes >= 32) & (codes <= 126), codes - 31, ord("?") - 31
    )  # newline and others -> "?"
    return codes.astype(np.uint16)


def model_and_data(name: str, batch: int):
    """(ModelConfig, per-rank batch, token array, vocabulary size) for a benchmark model.

    `reference` is the character-level config above; `tiny` and `small` are the presets, on
    the built-in corpus prepared as `main.py` prepares it (no TensorFlow imported: the
    PyTorch reference uses it too).
    """
    from utils.config import ModelConfig, resolve

    if name == "reference":
        return ModelConfig(**REFERENCE), batch or REFERENCE_BATCH, char_tokens(), CHAR_VOCAB
    from data.prepare import prepare

    config = resolve(name, None, {})
    prepared = prepare(config.data, progress=False, log=lambda *_: None)
    return (
        config.model,
        batch or config.train.batch_size,
        prepared.tokens("train"),
        prepared.vocab_size,
    )


def flops_per_token(params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters plus the attention term 12 x layers x width x context."""
    return 6.0 * params + 12.0 * n_layers * d_model * seq_len


def matmul_peaks(size: int = 2048, seconds: float = 3.0) -> dict[str, float]:
    """GFLOP/s of a float32 size^3 matmul on this process's threads, without and with XLA.

    The MFU denominator is the higher of the two (on the AVX2 machine XLA's
    reaches about 170, TensorFlow's oneDNN kernel about 175).
    """
    import tensorflow as tf

    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))
    peaks = {}
    for name, jit in (("tensorflow", False), ("xla", True)):
        matmul = tf.function(lambda a, b: tf.matmul(a, b), jit_compile=jit)
        matmul(a, b).numpy()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            matmul(a, b).numpy()
            runs += 1
        peaks[name] = 2 * size**3 * runs / (time.perf_counter() - start) / 1e9
    return peaks


def timing_arguments(parser, warmup: int = 30, steps: int = 40, repeats: int = 5) -> None:
    """The options every measurement takes: warm-up, block size, blocks, and where the JSON goes."""
    parser.add_argument("--warmup", type=int, default=warmup, help="steps before timing")
    parser.add_argument("--steps", type=int, default=steps, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed blocks (median)")
    parser.add_argument("--out", default="", help="also write the JSON result here")


def median_time(
    step: Callable[[], Any], warmup: int, steps: int, repeats: int
) -> tuple[float, list[float]]:
    """Median seconds per step over `repeats` blocks of `steps`, after `warmup` steps."""
    for _ in range(warmup):
        step()
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - start) / steps)
    return statistics.median(blocks), blocks


# The CPU features that change which kernels TensorFlow, XLA and PyTorch use.
KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu() -> dict[str, Any]:
    """The CPU's model name and its key SIMD flags (as `lscpu` shows them), and a kind for
    filing results: amx, avx512-bf16, avx512, avx2 or other."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    present = [f for f in KEY_FLAGS if f in flags]
    if "amx_bf16" in flags:
        kind = "amx"
    elif "avx512_bf16" in flags:
        kind = "avx512-bf16"
    elif "avx512f" in flags:
        kind = "avx512"
    elif "avx2" in flags:
        kind = "avx2"
    else:
        kind = "other"
    return {"cpu": model, "cpu_flags": present, "cpu_kind": kind}


def lscpu_cpu() -> dict[str, Any]:
    """`cpu()`, plus `lscpu`'s model name when lscpu is there (what results are filed with)."""
    import contextlib
    import subprocess

    found = cpu()
    with contextlib.suppress(OSError, StopIteration):
        listing = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        found["lscpu_model_name"] = next(
            line.split(":", 1)[1].strip()
            for line in listing.splitlines()
            if line.startswith("Model name")
        )
    return found


def result_header() -> dict[str, Any]:
    """What every benchmark's result file starts with: the date, the CPU (`lscpu_cpu`), cores."""
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **lscpu_cpu(),
        "cores": os.cpu_count(),
    }


def horovodrun_json(
    module_args: list[str], np: int = 2, env: dict[str, str] | None = None, max_load: float = 0.0
) -> dict[str, Any]:
    """`horovodrun -np np python -m module_args --out F` on localhost; the JSON it wrote to F.

    Waits (up to 10 minutes) for the 1-minute load average to fall below
    `max_load` first (0: does not wait); the result gets `load_before`,
    `load_after` and `launch_seconds`. A failed launch ends the benchmark
    with the end of its stderr.
    """
    import subprocess
    import sys
    import tempfile

    deadline = time.monotonic() + 600
    while max_load and os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    load = os.getloadavg()[0]
    horovodrun = str(pathlib.Path(sys.executable).parent / "horovodrun")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [horovodrun, "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
        command += [sys.executable, "-m", *module_args, "--out", out]
        started = time.perf_counter()
        done = subprocess.run(
            command,
            cwd=pathlib.Path(__file__).resolve().parent.parent,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(pathlib.Path(out).read_text())
    return {
        **result,
        "launch_seconds": time.perf_counter() - started,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def machine() -> dict[str, Any]:
    import tensorflow as tf

    return {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        **cpu(),
    }


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of `rows` (floats with 3 significant decimals)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def endless_batches(shards):
    """An iterator over a Shards' training batches, epoch after epoch."""

    def batches():
        epoch = 0
        while True:
            yield from shards.train_dataset(epoch, seed=0)
            epoch += 1

    return iter(batches())


def emit(result: dict[str, Any], out: str) -> None:
    """Print `result` as one JSON line, and write it to `out` (when given)."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
