"""Launch the multi-process tests under `horovodrun -np 2` (Gloo on localhost)."""

import json

import pytest

from tests.conftest import PYTHON, ROOT, horovodrun, requires_horovod


@pytest.mark.slow
@requires_horovod
def test_multiprocess_group_passes_on_both_ranks(tmp_path):
    """One horovodrun launch runs every `multiprocess` test on 2 ranks; none may skip."""
    result = horovodrun(
        2,
        PYTHON,
        "-m",
        "pytest",
        "-m",
        "multiprocess",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests"),
        cwd=ROOT,
        env={"KHL_RANK_REPORT_DIR": str(tmp_path)},
        timeout=900,
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["failed"] == report["error"] == report["skipped"] == 0, (report, output)
        assert report["passed"] >= 6, report
    assert reports[0]["passed"] == reports[1]["passed"]
