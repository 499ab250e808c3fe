"""What quantization buys and costs, besides quality: weight bytes and call latency.

Used by `main.py evaluate --quantize MODE` (evaluate.compare_quantized).
"""

from __future__ import annotations

import os
import pathlib
import platform
import tempfile
import time
from typing import Any

import numpy as np

LATENCY_BATCHES = (1, 32)


def weight_bytes(model: Any) -> int:
    """Size of the model's weights saved as a Keras .weights.h5 file (what a deployment ships)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.weights.h5"
        model.save_weights(path)
        return path.stat().st_size


def copy_model(model: Any) -> Any:
    """An independent copy (through a .keras file), so one copy can be quantized."""
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "copy.keras"
        model.save(path)
        return keras.saving.load_model(path, compile=False)


def latency(models: dict[str, Any], seq_len: int, rounds: int = 15) -> dict[str, dict[str, float]]:
    """Median milliseconds of one forward pass over full `seq_len` windows, per model and batch.

    One `tf.function` call of each model (no XLA, as the export runs it) on
    random token ids; for a causal LM this is the cost of one generated
    token without a cache, for a classifier the whole request minus
    tokenization. The models take turns, round after round, so that load
    from other processes falls on all of them alike. Also given per row.
    """
    import tensorflow as tf

    calls = {
        name: tf.function(
            lambda ids, m=m: m(
                {"token_ids": ids, "padding_mask": tf.ones_like(ids)}, training=False
            )
        )
        for name, m in models.items()
    }
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch in LATENCY_BATCHES:
        ids = tf.constant(rng.integers(4, 100, (batch, seq_len)), tf.int32)
        times: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(rounds + 1):
            for name, call in calls.items():
                for _ in range(3):
                    start = time.perf_counter()
                    call(ids).numpy()
                    if round_:  # round 0 traces and warms up
                        times[name].append(time.perf_counter() - start)
        for name in models:
            ms = 1000 * float(np.median(times[name]))
            out[name][f"latency_ms_batch{batch}"] = ms
            out[name][f"latency_ms_per_row_batch{batch}"] = ms / batch
    return out


def describe_machine() -> dict[str, Any]:
    """When and where: the date, the CPU model and its vector/matrix extensions, threads."""
    import tensorflow as tf

    name, flags = platform.processor(), set()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    extensions = sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx", "avx_vnni")))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": name,
        "cpu_extensions": extensions,
        "cpus": os.cpu_count(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes competing for the CPUs
        "tensorflow": tf.__version__,
    }


def format_comparison(result: dict[str, Any], mode: str) -> str:
    """float32 and `mode` side by side, with the relative change."""
    base, quant = result["float32"], result[mode]
    lines = [f"{result['split'] + ' split':<28}{'float32':>14}{mode:>14}{'change':>10}"]
    for key, value in base.items():
        other = quant[key]
        change = f"{100 * (other - value) / value:+.1f}%" if value else ""
        fmt = "{:>14,.0f}" if key == "weight_bytes" else "{:>14,.4f}"
        lines.append(f"{key:<28}{fmt.format(value)}{fmt.format(other)}{change:>10}")
    layers = ", ".join(f"{n} x{c}" for n, c in result["quantized_layers"].items())
    lines.append(f"quantized layers: {layers}")
    lines.append(
        f"measured {result['date']} on {result['cpu']} ({result['cpus']} CPUs, "
        f"load average {result['load_average_1min']:.1f})"
    )
    return "\n".join(lines)
