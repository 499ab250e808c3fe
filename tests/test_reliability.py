"""Faults through the real command line: kill -9 and resume, a dead rank, a change of world size."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import (
    CHILD_ENV,
    horovodrun_cli,
    horovodrun_command,
    main_command,
    rank_pid,
    requires_horovod,
    run_cli,
    start_process,
    wait_for_checkpoint,
    world_shape,
    write_corpus,
)

pytestmark = pytest.mark.slow

# A tiny run slow enough to be interrupted mid-epoch: 6 epochs x 40 steps, a checkpoint every 10.
RUN = (
    "--preset",
    "tiny",
    "--model.d_model=64",
    "--model.d_ff=128",
    "--model.seq_len=64",
    "--train.epochs=6",
    "--train.checkpoint_every=10",
    "--train.keep_checkpoints=2",
)


def _weights(run_dir: pathlib.Path) -> list[np.ndarray]:
    from models.inference import load_run

    return [np.asarray(w) for w in load_run(run_dir).model.get_weights()]


def test_kill_9_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
    whole = run_cli(*RUN, "--run-dir", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run_dir = tmp_path / "killed"
    with start_process(*main_command(*RUN, "--run-dir", str(run_dir)), cwd=tmp_path) as process:
        step = wait_for_checkpoint(run_dir, 50, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL and not (run_dir / "model.keras").exists()
    assert step % 40, "the kill should land mid-epoch"  # steps 50, 60, 70 are inside epoch 2
    resumed = run_cli("--run-dir", str(run_dir), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stdout
    for a, b in zip(_weights(tmp_path / "whole"), _weights(run_dir), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rows = (run_dir / "history.csv").read_text().splitlines()[1:]
    # The interrupted epoch once (Keras's CSVLogger counts epochs from 0).
    assert [row.split(",")[0] for row in rows] == ["0", "1", "2", "3", "4", "5"]


@requires_horovod
def test_a_dead_rank_ends_the_job_quickly_and_the_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / "np2"
    launch = horovodrun_command(2, *main_command(*RUN, "--run-dir", str(run_dir)))
    with start_process(*launch, cwd=tmp_path) as process:
        try:
            wait_for_checkpoint(run_dir, 20, process)
            victim = rank_pid(1, str(run_dir))
            assert victim is not None, "rank 1's process was not found"
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            output, _ = process.communicate(timeout=60)
            elapsed = time.monotonic() - killed_at
        except subprocess.TimeoutExpired:
            raise AssertionError("the job did not end within 60 s of a rank's death") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0, output[-3000:]
    # The survivor says why in one line, unless horovodrun's SIGTERM beats it to
    # it; then horovodrun's own report names rank 1. Never a worker's traceback.
    assert "another rank stopped" in output or "Process name: 1" in output, output[-3000:]
    assert "[0]<stderr>:Traceback" not in output, output[-3000:]
    # The newest checkpoint is whole: a single process finishes the run from it.
    resumed = run_cli("--run-dir", str(run_dir), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "model.keras").is_file()
    print(f"job ended {elapsed:.1f} s after the kill")


@requires_horovod
def test_np2_resumes_at_np1_from_the_same_sample(tmp_path):
    run_dir = tmp_path / "np2to1"
    # 40 steps per epoch at np=2 (global batch 32); stop 10 steps into epoch 2.
    first = horovodrun_cli(
        2,
        "--preset",
        "tiny",
        "--train.epochs=2",
        "--train.max_steps=50",
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads(
        (sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "state.json").read_text()
    )
    assert (state["epoch"], state["step_in_epoch"], state["samples_in_epoch"]) == (1, 10, 10 * 32)
    # One rank, the same per-rank batch: the global batch halves, so the epoch goes on at step 20.
    second = run_cli("--run-dir", str(run_dir), "--resume", "--train.max_steps=0", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at epoch 2 step 20" in second.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world"]["size"] == 1 and config["global_batch"] == 16


@pytest.mark.parametrize("hosts", ["localhost:1,127.0.0.1:1"])
@requires_horovod
def test_two_host_names_give_cross_size_2(tmp_path, hosts):
    run_dir = tmp_path / "hosts"
    result = horovodrun_cli(
        2,
        "--preset",
        "tiny",
        "--train.epochs=1",
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
        hosts=hosts,
        extra=("--network-interface", "lo"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert world_shape(run_dir) == (2, 2, 1)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """A file-size limit (ulimit -f) makes writes fail as on a full disk."""
    corpus = write_corpus(tmp_path / "c.txt", paragraphs=2000)
    args = ("--preset", "tiny", "--data", str(corpus), "--data.vocab_size=200")
    assert run_cli("prepare", *args, cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "run"
    command = shlex.join(main_command(*args, "--run-dir", str(run_dir)))
    # 100 KiB: the prepared data is already there; the first checkpoint is larger.
    result = subprocess.run(
        ["bash", "-c", f"ulimit -f 100; exec {command}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **CHILD_ENV},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "main.py: error: cannot write" in result.stderr and "File too large" in result.stderr
    leftovers = [p for p in run_dir.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == [] and list((run_dir / "checkpoints").glob("step-*")) == []


def test_a_10_mb_single_line_is_prepared(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(300)])
    (tmp_path / "line.txt").write_text(" ".join(rng.choice(words, 1_600_000)) + "\n")
    assert (tmp_path / "line.txt").stat().st_size > 10_000_000
    result = run_cli(
        "prepare", "--data", str(tmp_path / "line.txt"), "--data.vocab_size=300", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads(next((tmp_path / "prepared").glob("line-*/meta.json")).read_text())
    assert all(meta["tokens"][s] > 0 for s in ("train", "val", "test"))
    assert meta["documents"]["train"] > 50  # cut into documents of at most 100,000 characters
