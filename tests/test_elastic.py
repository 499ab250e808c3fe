"""Elastic training through the real command line: a worker killed mid-run, the job goes on."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import (
    HOROVODRUN,
    main_command,
    rank_pid,
    requires_horovod,
    run_cli,
    start_process,
    wait_for_checkpoint,
    write_corpus,
)

STEPS = 20  # per epoch, at either size (a cap): 3 epochs, a commit and a checkpoint every 5 steps
RUN = (
    "--preset",
    "tiny",
    "--data.vocab_size=200",
    "--train.epochs=3",
    f"--train.steps_per_epoch={STEPS}",
    "--train.checkpoint_every=5",
    "--train.commit_every=5",
    "--train.eval_batches=4",
)


class _Lines:
    """Collects a process's output lines, with the time each arrived."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def _kill_leftovers(marker: str) -> None:
    """SIGKILL any process whose command line contains `marker` (workers outlive a failed test)."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.mark.slow
@requires_horovod
def test_a_killed_worker_leaves_the_survivor_to_finish_at_world_size_1(tmp_path):
    started = time.monotonic()
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=1500)
    data = ("--data", str(corpus))
    # Prepared once beforehand: both "hosts" are this machine and would prepare it together.
    prepared = run_cli("prepare", *RUN, *data, cwd=tmp_path, timeout=120)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    discover = tmp_path / "discover.sh"
    # Two host names for one machine, one slot each: Horovod blacklists hosts, not slots.
    discover.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
    discover.chmod(0o755)
    run_dir = tmp_path / "elastic"
    launch = [
        HOROVODRUN,
        "-np",
        "2",
        "--min-np",
        "1",
        "--max-np",
        "2",
        "--host-discovery-script",
        str(discover),
        "--network-interface",
        "lo",
        "--elastic-timeout",
        "60",
        "--reset-limit",
        "2",
        "--gloo",
        *main_command("--elastic", *RUN, *data, "--run-dir", str(run_dir)),
    ]
    process = start_process(*launch, cwd=tmp_path)
    output = _Lines(process)
    try:
        # Mid-epoch 2: the last commit (step 25) is not at an epoch end.
        wait_for_checkpoint(run_dir, STEPS + 5, process, timeout=120)
        victim = rank_pid(1, str(run_dir))
        assert victim is not None, "rank 1's process was not found"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        process.wait(timeout=150)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job did not end: {output.text()[-4000:]}") from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _kill_leftovers(str(run_dir))
        output.thread.join(timeout=10)
        process.stdout.close()
    text = output.text()
    assert process.returncode == 0, text[-4000:]
    reset_at = output.first("elastic: reset 1: world size 2 -> 1")
    assert reset_at is not None, text[-4000:]
    with (run_dir / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # Keras's CSVLogger counts from 0
    sizes = [int(float(r["world_size"])) for r in rows]
    assert sizes == [2, 1, 1], sizes  # the 2nd epoch spans the reset: the size that finished it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 3 and metrics["world_size"] == 1
    [reset] = metrics["elastic_resets"]
    assert (reset["from_size"], reset["to_size"]) == (2, 1)
    assert reset["global_step"] >= STEPS  # from a commit inside epoch 2, not from the start
    assert (run_dir / "model.keras").is_file()
    print(
        f"reset {reset_at - killed_at:.1f} s after the kill; job ended "
        f"{time.monotonic() - killed_at:.1f} s after it; test took "
        f"{time.monotonic() - started:.1f} s; reset: {reset}"
    )
