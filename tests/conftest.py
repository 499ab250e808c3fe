"""Shared fixtures: small corpora, a command-line runner, Horovod launch helpers."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from utils.tf_env import import_tensorflow

import_tensorflow()  # quietly, before any test module imports TensorFlow

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HOROVODRUN = shutil.which("horovodrun", path=str(pathlib.Path(PYTHON).parent)) or shutil.which(
    "horovodrun"
)

# Environment for child processes: quiet TensorFlow, Horovod that gives up
# instead of hanging if ranks ever disagree on the collectives they run.
CHILD_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "HOROVOD_STALL_CHECK_TIME_SECONDS": "20",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "60",
    "PYTHONPATH": str(ROOT),
}

requires_horovod = pytest.mark.skipif(
    HOROVODRUN is None, reason="Horovod is not installed (scripts/setup.sh)"
)

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n"
    "Return the number of items in a container. Raise ValueError if the value is not present.\n"
)


def run_cli(
    *args: str, cwd: pathlib.Path, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python main.py ARGS` in `cwd`, capturing output."""
    return subprocess.run(
        [PYTHON, str(ROOT / "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CHILD_ENV, **(env or {})},
    )


def horovodrun(
    np: int,
    *command: str,
    cwd: pathlib.Path,
    timeout: float = 900,
    env: dict | None = None,
    hosts: str | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`horovodrun -np N --gloo [EXTRA] COMMAND` on localhost (or `hosts`), capturing output."""
    launcher = [HOROVODRUN, "-np", str(np), "-H", hosts or f"localhost:{np}", "--gloo", *extra]
    return subprocess.run(
        [*launcher, *command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CHILD_ENV, **(env or {})},
    )


def write_corpus(path: pathlib.Path, paragraphs: int = 400, seed: int = 0) -> pathlib.Path:
    """A plain-text corpus of `paragraphs` varied paragraphs (deterministic)."""
    import random

    rng = random.Random(seed)
    syllables = [
        "ka",
        "lo",
        "mi",
        "re",
        "su",
        "ta",
        "ne",
        "po",
        "vi",
        "da",
        "fe",
        "gu",
        "ho",
        "ji",
        "ly",
        "mo",
    ]
    words = sorted({"".join(random.Random(i).choices(syllables, k=1 + i % 3)) for i in range(600)})
    paras = [
        " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))).capitalize() + "."
        for _ in range(paragraphs)
    ]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_corpus(tmp_path / "corpus.txt")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under horovodrun, each rank reports its outcome counts for the launching test."""
    report_dir = os.environ.get("KHL_RANK_REPORT_DIR")
    if not report_dir:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    counts = {k: len(reporter.stats.get(k, [])) for k in ("passed", "failed", "skipped", "error")}
    rank = os.environ.get("HOROVOD_RANK", "0")
    out = pathlib.Path(report_dir) / f"rank-{rank}.json"
    out.write_text(json.dumps({"exitstatus": int(exitstatus), **counts}))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    """A finished `--preset tiny` run (2 epochs), shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("tiny_run")
    run_dir = work / "runs" / "tiny"
    result = run_cli("--preset", "tiny", "--train.epochs=2", "--run-dir", str(run_dir), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


class InMemoryData:
    """What a task reads of data/prepare.Prepared, for token splits held in memory."""

    def __init__(self, vocab_size: int, **splits):
        self.vocab_size, self.splits = vocab_size, splits
        self.meta = {"labels": [], "class_weights": []}

    def tokens(self, split: str):
        return self.splits[split]
