"""The benchmark suite runs end to end (few steps: this checks the code, not the speed)."""

import json
import os
import subprocess

from tests.conftest import CHILD_ENV, PYTHON, ROOT, requires_horovod


@requires_horovod
def test_every_suite_runs_and_reports(tmp_path):
    result = subprocess.run(
        [PYTHON, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, **CHILD_ENV},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for suite in ("throughput", "torch", "overhead", "scaling", "pipeline", "options"):
        data = json.loads((tmp_path / f"{suite}.json").read_text())
        assert data["rows"], suite
        assert f"## {suite}" in report
        for row in data["rows"]:
            rates = [v for k, v in row.items() if k.endswith("tokens_per_sec")]
            assert rates and all(v > 0 for v in rates), row
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    assert [row["world_size"] for row in scaling["rows"]] == [1, 2, 1]
    assert scaling["rows"][1]["allreduce_skipped"] is False  # np=2 really averages
    torch = json.loads((tmp_path / "torch.json").read_text())
    assert len(torch["rows"]) == 3, "PyTorch reference missing: pip install -e '.[bench]'"
    assert torch["rows"][0]["parameters"] == torch["rows"][2]["parameters"]  # the same model
    throughput = json.loads((tmp_path / "throughput.json").read_text())
    assert 0 < throughput["rows"][0]["mfu"] < 1.5
