"""The benchmark suite runs end to end (few steps: this checks the code, not the speed)."""

import importlib.util
import json
import os
import subprocess

import pytest

from tests.conftest import CHILD_ENV, PYTHON, ROOT, horovodrun, requires_horovod

pytestmark = [requires_horovod, pytest.mark.slow]

SUITES = ("throughput", "keras", "torch", "overhead", "scaling", "pipeline", "options")


def run_module(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """`python -m args...` from the repository root; asserts that it succeeded."""
    result = subprocess.run(
        [PYTHON, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CHILD_ENV},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_module("bench", "--quick", "--out", str(out), timeout=1200)
    return out


def test_every_suite_runs_and_reports(quick_bench):
    report = (quick_bench / "report.md").read_text()
    for suite in SUITES:
        data = json.loads((quick_bench / f"{suite}.json").read_text())
        assert data["rows"], suite
        assert f"## {suite}" in report
        assert data["machine"]["cpu_kind"] in report  # every figure with its CPU
        for row in data["rows"]:
            rates = [v for k, v in row.items() if k.endswith("tokens_per_sec")]
            assert rates and all(v > 0 for v in rates), row
    scaling = json.loads((quick_bench / "scaling.json").read_text())
    assert [row["world_size"] for row in scaling["rows"]] == [1, 2, 1, 1]
    assert scaling["rows"][1]["allreduce_skipped"] is False  # np=2 really averages
    apart = scaling["rows"][2]  # the baseline: two processes at once, no communication
    assert apart["copies"] == 2 and apart["horovod"] is False
    assert len(apart["tokens_per_sec_each"]) == 2 and min(apart["tokens_per_sec_each"]) > 0
    keras_rows = json.loads((quick_bench / "keras.json").read_text())["rows"]
    assert keras_rows[0]["parameters"] == keras_rows[1]["parameters"]  # the same model
    throughput = json.loads((quick_bench / "throughput.json").read_text())
    assert 0 < throughput["rows"][0]["mfu"] < 1.5


requires_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="PyTorch is not installed: the PyTorch rows need the bench extra "
    "(EXTRAS=dev,horovod,bench bash scripts/setup.sh)",
)


@requires_torch
def test_the_pytorch_reference_is_the_same_model(quick_bench):
    torch = json.loads((quick_bench / "torch.json").read_text())
    assert len(torch["rows"]) == 3  # Keras float32 (bfloat16 is not in --quick), torch eager
    assert "torch.compile" in torch["rows"][2]["framework"]  # and compiled
    assert {row["parameters"] for row in torch["rows"]} == {torch["rows"][0]["parameters"]}


# In a child process: PyTorch and TensorFlow are not loaded into one process.
TORCH_SMALL = """
import json, sys, torch
from bench.torch_gpt import build_gpt
shape = json.loads(sys.argv[1])
x = torch.randint(0, 4000, (2, shape["seq_len"]), generator=torch.Generator().manual_seed(0))
out = {}
for dropout in (0.0, 0.1):
    torch.manual_seed(0)
    gpt = build_gpt(4000, **shape, dropout=dropout)
    out["parameters"] = sum(p.numel() for p in gpt.parameters())
    gpt.train()
    out[f"train_{dropout}"] = [gpt(x, x).item() for _ in range(2)]
    gpt.eval()
    out[f"eval_{dropout}"] = [gpt(x, x).item() for _ in range(2)]
print(json.dumps(out))
"""


@requires_torch
def test_the_pytorch_small_model_is_the_default_jobs_model():
    """`bench.torch_gpt --model small` builds the `small` preset's model (same parameter count
    as Keras's) with dropout where it acts in training only."""
    from models.transformer import build_causal_lm, count_params
    from utils.config import resolve

    model_cfg = resolve("small", None, {}).model
    shape = {
        k: getattr(model_cfg, k) for k in ("n_layers", "n_heads", "d_model", "d_ff", "seq_len")
    }
    result = subprocess.run(
        [PYTHON, "-c", TORCH_SMALL, json.dumps(shape)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **CHILD_ENV},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["parameters"] == count_params(build_causal_lm(model_cfg, 4000))
    assert out["train_0.0"][0] == out["train_0.0"][1]  # no dropout: deterministic
    assert out["train_0.1"][0] != out["train_0.1"][1]  # dropout draws new masks each call
    assert out["eval_0.1"][0] == out["eval_0.1"][1]  # and is off in evaluation


def test_profile_reads_the_kernels_from_the_trace():
    result = run_module(
        "bench.profile", "--model", "reference", "--steps", "3", "--top", "3", timeout=600
    )
    lines = result.stdout.splitlines()
    dot = next(line for line in lines if line.strip().endswith(" dot"))
    assert float(dot.split()[0]) > 0  # the matrix products were found in the trace, with a time
    assert any("costliest kernels" in line for line in lines)


def test_idle_ranks_get_the_cpu_cycle_time_even_when_it_is_set_empty(tmp_path):
    # Horovod reads HOROVOD_CYCLE_TIME="" as 0 ms, a busy loop; init must treat it as unset.
    out = tmp_path / "idle.json"
    result = horovodrun(
        2,
        PYTHON,
        "-m",
        "bench.horovod_idle",
        "--seconds",
        "1",
        "--out",
        str(out),
        cwd=ROOT,
        timeout=300,
        env={"HOROVOD_CYCLE_TIME": ""},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    idle = json.loads(out.read_text())
    assert (idle["world_size"], idle["cycle_time_ms"]) == (2, "5")
    assert len(idle["cpu_per_second_each_rank"]) == 2
    assert all(len(w) == 2 for w in idle["wakeups_per_second_each_rank"])
