"""Shared fixtures and helpers: small corpora, a command-line runner, Horovod launch helpers."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

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


def main_command(*args: str) -> list[str]:
    """The command line `python main.py ARGS`, with this interpreter."""
    return [PYTHON, str(ROOT / "main.py"), *args]


def run_cli(
    *args: str, cwd: pathlib.Path, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python main.py ARGS` in `cwd`, capturing output."""
    return subprocess.run(
        main_command(*args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CHILD_ENV, **(env or {})},
    )


def horovodrun_command(
    np: int, *command: str, hosts: str | None = None, extra: tuple[str, ...] = ()
) -> list[str]:
    """The command line `horovodrun -np N -H HOSTS --gloo [EXTRA] COMMAND` (HOSTS: localhost:N)."""
    launcher = [HOROVODRUN, "-np", str(np), "-H", hosts or f"localhost:{np}", "--gloo", *extra]
    return [*launcher, *command]


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
    return subprocess.run(
        horovodrun_command(np, *command, hosts=hosts, extra=extra),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CHILD_ENV, **(env or {})},
    )


def horovodrun_cli(np: int, *args: str, cwd: pathlib.Path, **kwargs) -> subprocess.CompletedProcess:
    """`horovodrun -np N ... python main.py ARGS` (keyword arguments as for `horovodrun`)."""
    return horovodrun(np, *main_command(*args), cwd=cwd, **kwargs)


def start_process(*command: str, cwd: pathlib.Path) -> subprocess.Popen:
    """Start `command` in a session of its own (so `os.killpg` ends all it started).

    Its stdout and stderr come merged, as text, through `process.stdout`.
    """
    return subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **CHILD_ENV},
        start_new_session=True,
    )


def wait_for_checkpoint(
    run_dir: pathlib.Path, at_least: int, process: subprocess.Popen, timeout: float = 300
) -> int:
    """Wait until `run_dir` holds a checkpoint at step `at_least` or later; return its step.

    Fails if `process` (the run) ends first, or after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [
            int(p.name.split("-")[1])
            for p in (run_dir / "checkpoints").glob("step-*")
            if p.is_dir()
        ]
        if steps and max(steps) >= at_least:
            return max(steps)
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended before step {at_least}: {process.stdout.read()[-3000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {at_least} within {timeout} s")


def rank_pid(rank: int, marker: str) -> int | None:
    """PID of the python worker of `rank` whose command line contains `marker`."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"HOROVOD_RANK={rank}".encode() in environ
            and marker.encode() in cmdline
            and b"/bin/sh" not in cmdline[0]
        ):
            return int(proc.name)
    return None


def world_shape(run_dir: pathlib.Path) -> tuple[int, int, int]:
    """(size, cross_size, local_size) of the world a run recorded in its config.json."""
    world = json.loads((run_dir / "config.json").read_text())["world"]
    return world["size"], world["cross_size"], world["local_size"]


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


# Three topics of distinct words: a classifier can learn them in a few steps.
TOPICS = {
    "mail": "message header address sender inbox reply attachment".split(),
    "loop": "coroutine task future event await callback schedule".split(),
    "file": "path directory read write open close buffer".split(),
}


def write_labeled(
    path: pathlib.Path, per_class: int = 120, seed: int = 0, fmt: str = "jsonl", extra=()
) -> pathlib.Path:
    """A small labelled dataset (JSONL, or CSV with fmt="csv"); the label is its words' topic.

    `per_class` rows of each of TOPICS, then the rows of `extra` ({"text", "label"} dicts).
    """
    import numpy as np  # not at the top: there, `np` names a process count (horovodrun)

    rng = np.random.default_rng(seed)
    rows = [
        {"text": " ".join(rng.choice(words, size=rng.integers(5, 15))) + f" {i}", "label": label}
        for label, words in TOPICS.items()
        for i in range(per_class)
    ] + list(extra)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["label", "text"])
            writer.writeheader()
            writer.writerows(rows)
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
