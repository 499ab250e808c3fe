"""The command line: bad input (one line, exit code 2, nothing left behind), help, runs."""

import csv
import json
import math

import pytest

from tests.conftest import ROOT, horovodrun_cli, requires_horovod, run_cli, write_corpus


def _assert_clean_error(result, message, run_dir=None):
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("main.py: error: ") and message in lines[-1], result.stderr
    if run_dir is not None:
        assert not run_dir.exists()


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00" * 100)
    (tmp_path / "latin1.txt").write_bytes("déjà vu, naïve café\n".encode("latin-1") * 50)
    with open(tmp_path / "nocol.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "body"], [1, "some text"]])
    (tmp_path / "cfg.yaml").write_text("model:\n  n_layer: 3\n")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "missing.txt"], "missing.txt: no such file or folder"),
        (["--data", "empty.txt"], "empty.txt: the file is empty"),
        (["--data", "binary.bin"], "binary.bin: looks like a binary file"),
        (["--data", "latin1.txt"], "latin1.txt: not UTF-8 text (byte 0xe9"),
        (["--data", "nocol.csv"], "nocol.csv:1: no 'text' column (columns: id, body)"),
        (
            ["--model.n_layer=3"],
            "unknown option --model.n_layer; valid model options: --model.n_layers, --model.n_heads",
        ),
        (["--config", "cfg.yaml"], "unknown key 'model.n_layer' (did you mean 'model.n_layers'?)"),
        (
            ["--model.d_model=100", "--model.n_heads=3"],
            "model.d_model (100) must be divisible by model.n_heads (3)",
        ),
        (["--train.epochs=many"], "train.epochs: expected an integer, got 'many'"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["--resume"], "--resume needs --run-dir DIR"),
        (["--resume", "--run-dir", "nowhere"], "nowhere: not a run directory (no config.json)"),
        (["stray"], "unrecognized argument 'stray'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(bad_inputs, args, message):
    run_dir = bad_inputs / "runs" / "r"
    extra = [] if "--run-dir" in args or "--resume" in args else ["--run-dir", str(run_dir)]
    result = run_cli(*args, *extra, cwd=bad_inputs, timeout=60)
    _assert_clean_error(result, message, run_dir)
    assert "tensorflow" not in result.stderr.lower()  # failed before TensorFlow was needed


def test_seq_len_longer_than_the_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", paragraphs=200)
    run_dir = tmp_path / "run"
    result = run_cli(
        "--preset",
        "tiny",
        "--data",
        str(corpus),
        "--data.vocab_size=100",
        "--model.seq_len=100000",
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
    )
    _assert_clean_error(result, "model.seq_len=100000 is longer than the", run_dir)


def test_evaluate_needs_a_run_directory(tmp_path):
    result = run_cli("evaluate", "--run-dir", str(tmp_path / "none"), cwd=tmp_path, timeout=60)
    _assert_clean_error(result, "not a run directory (no config.json)")


def test_help_lists_every_option_with_its_default(tmp_path):
    result = run_cli("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    for flag in (
        "--model.n_layers",
        "--train.batch_size",
        "--data.vocab_size",
        "--train.scale_lr",
        "--resume",
    ):
        assert flag in result.stdout
    assert "(default: 4)" in result.stdout and "horovodrun -np 4 python main.py" in result.stdout
    assert run_cli("evaluate", "--help", cwd=tmp_path, timeout=60).returncode == 0


def _check_run(run_dir, world_size, vocab):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world"]["size"] == world_size
    assert config["global_batch"] == config["batch_size_per_rank"] * world_size
    assert config["learning_rate"]["peak"] == pytest.approx(
        config["learning_rate"]["base"] * world_size
    )
    assert len(config["data"]["text_sha256"]) == 64 and config["versions"]["python"]
    with open(run_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == list(range(len(history)))  # Keras counts from 0
    val = [float(r["val_loss"]) for r in history]
    assert val[-1] < val[0] and val[-1] < math.log(vocab)
    assert all(float(r["tokens_per_sec"]) > 0 for r in history)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert {"model.keras", "tokenizer.model", "data.json", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()
    }
    return history, metrics


@pytest.mark.slow
def test_tiny_run_single_process_then_resume_and_evaluate(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    # Stop in the middle of epoch 2 (40 steps per epoch)...
    first = run_cli(
        "--preset",
        "tiny",
        "--train.epochs=3",
        "--train.max_steps=50",
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    with open(run_dir / "history.csv") as f:
        assert [(r["epoch"], r["step"]) for r in csv.DictReader(f)] == [("0", "40"), ("1", "50")]
    # ...and continue from that step: the partial epoch's row is replaced by the whole epoch's.
    again = run_cli("--run-dir", str(run_dir), "--resume", "--train.max_steps=0", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at epoch 2 step 10" in again.stdout
    history, metrics = _check_run(run_dir, 1, 512)
    assert [(int(r["epoch"]), int(r["step"])) for r in history] == [(0, 40), (1, 80), (2, 120)]
    evaluated = run_cli("evaluate", "--run-dir", str(run_dir), "--split", "val", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "val_perplexity" in evaluated.stdout
    merged = json.loads((run_dir / "metrics.json").read_text())
    assert (
        set(metrics) <= set(merged) and merged["test_loss"] == metrics["test_loss"]
    )  # merged, nothing dropped
    assert merged["val_tokens"] > 0 and merged["val_perplexity"] == pytest.approx(
        math.exp(merged["val_loss"])
    )


@pytest.mark.slow
def test_runs_without_horovod_installed(tmp_path):
    """Hide Horovod from the interpreter: the same command runs as one process."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoHorovod:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'horovod' or name.startswith('horovod.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _NoHorovod())\n"
    )
    run_dir = tmp_path / "run"
    result = run_cli(
        "--preset",
        "tiny",
        "--train.epochs=1",
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
        env={"PYTHONPATH": f"{hide}:{ROOT}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world"]["horovod"] is False and config["world"]["size"] == 1


@pytest.mark.slow
@requires_horovod
def test_tiny_run_under_horovodrun_np2_and_exact_evaluation(tmp_path):
    run_dir = tmp_path / "runs" / "np2"
    result = horovodrun_cli(2, "--preset", "tiny", "--run-dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _check_run(run_dir, 2, 512)
    # rank 0 alone prints
    assert "[1]<stdout>:" not in result.stdout and "[0]<stdout>:test_perplexity" in result.stdout
    # The test metrics computed by 2 ranks (183 windows: shards of 92 and 91, batches padded)
    # equal those of one process.
    at_np2 = json.loads((run_dir / "metrics.json").read_text())
    single = run_cli("evaluate", "--run-dir", str(run_dir), cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    at_np1 = json.loads((run_dir / "metrics.json").read_text())
    assert at_np2["test_tokens"] == at_np1["test_tokens"] == 183 * 32
    for key in (
        "test_loss",
        "test_accuracy",
        "test_top5_accuracy",
        "test_macro_precision",
        "test_macro_recall",
        "test_macro_f1",
        "test_weighted_f1",
        "test_vocabulary_coverage",
        "test_bleu",
        "test_rouge_l_f1",
    ):
        assert at_np2[key] == pytest.approx(at_np1[key], rel=1e-5, abs=1e-7), key
