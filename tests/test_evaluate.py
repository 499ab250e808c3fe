"""evaluate.py, generation and the training-curve notebook, on a finished tiny run."""

import csv
import json
import math
import os
import shutil

import pytest

from tests.conftest import ROOT, run_cli, write_corpus


def _copy(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def test_evaluate_prints_and_merges(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    before = json.loads((run_dir / "metrics.json").read_text())
    result = run_cli("evaluate", "--run-dir", str(run_dir), "--split", "val", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((run_dir / "metrics.json").read_text())
    assert {k: after[k] for k in before} == before  # training's keys stay
    for key in (
        "val_loss",
        "val_perplexity",
        "val_accuracy",
        "val_top5_accuracy",
        "val_macro_f1",
        "val_weighted_f1",
        "val_vocabulary_coverage",
        "val_bleu",
        "val_rouge_l_f1",
    ):
        assert key in after and key in result.stdout
    assert after["val_perplexity"] == pytest.approx(math.exp(after["val_loss"]))
    assert 0 <= after["val_accuracy"] <= after["val_top5_accuracy"] <= 1
    assert 0 < after["val_vocabulary_coverage"] <= 1 and 0 <= after["val_bleu"] <= 1


def test_evaluate_other_text_with_the_runs_tokenizer(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    corpus = write_corpus(tmp_path / "other.txt", paragraphs=300, seed=4)
    result = run_cli("evaluate", "--run-dir", str(run_dir), "--data", str(corpus), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["test_tokens"] > 0


@pytest.mark.slow
def test_evaluate_errors(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    # a tokenizer from another vocabulary size
    other = tmp_path / "other"
    corpus = write_corpus(tmp_path / "c.txt", paragraphs=300)
    made = run_cli(
        "prepare",
        "--data",
        str(corpus),
        "--data.vocab_size=100",
        "--data.prepared_dir",
        str(other),
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    shutil.copy(next(other.glob("*/tokenizer.model")), run_dir / "tokenizer.model")
    result = run_cli("evaluate", "--run-dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the tokenizer does not belong to this model" in result.stderr
    # a split too short to evaluate
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"para {i} alpha" for i in range(30)))
    result = run_cli(
        "evaluate",
        "--run-dir",
        str(_copy(tiny_run, tmp_path / "b")),
        "--data",
        str(small),
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "nothing to evaluate" in result.stderr, result.stderr[-2000:]


def test_generation_is_deterministic_for_a_seed(tiny_run):
    from models.inference import generate, load_run

    run = load_run(tiny_run)
    greedy = generate(run, ["Return the"], max_new_tokens=12)
    assert greedy == generate(run, ["Return the"], max_new_tokens=12)
    sampled = [
        generate(run, ["Return the"], max_new_tokens=12, sampler=name, temperature=2.0, seed=seed)[
            0
        ]
        for name, seed in (("top_k", 1), ("top_k", 1), ("top_k", 2), ("top_p", 3), ("top_p", 3))
    ]
    assert sampled[0] == sampled[1] and sampled[3] == sampled[4]
    assert len(set(sampled)) > 1  # other seeds give other text


def test_generate_command(tiny_run, tmp_path):
    args = (
        "generate",
        "--run-dir",
        str(tiny_run),
        "--prompt",
        "Return the",
        "--prompt",
        "The file",
    )
    result = run_cli(
        *args, "--sampler", "top_k", "--seed", "5", "--max-new-tokens", "8", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Return the") and lines[1].startswith("The file")


def test_generate_errors(tiny_run, tmp_path):
    result = run_cli(
        "generate", "--run-dir", str(tiny_run), "--prompt", "x", "--temperature", "0", cwd=tmp_path
    )
    assert result.returncode == 2 and "--temperature must be > 0" in result.stderr


def test_notebook_plots_the_history(tiny_run):
    """Execute the notebook headless and read its figure's line data back."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "training_curves.ipynb", as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import json\n"
            "print(json.dumps([[[float(v) for v in line.get_ydata()] for line in ax.lines] for ax in fig.axes]))"
        )
    )
    os.environ["RUN_DIRS"] = str(tiny_run)
    try:
        NotebookClient(
            nb,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
    finally:
        del os.environ["RUN_DIRS"]
    outputs = nb.cells[-1].outputs
    lines = json.loads("".join(o.get("text", "") for o in outputs if o.output_type == "stream"))
    with open(tiny_run / "history.csv") as f:
        history = list(csv.DictReader(f))
    column = lambda key: [float(r[key]) for r in history]  # noqa: E731
    assert lines[0] == [pytest.approx(column("loss")), pytest.approx(column("val_loss"))]
    assert lines[1] == [pytest.approx(column("accuracy")), pytest.approx(column("val_accuracy"))]
    assert lines[2] == [pytest.approx(column("tokens_per_sec"))]
    assert any(
        o.output_type == "display_data" and "image/png" in o.data for o in nb.cells[2].outputs
    )
    metrics_text = "".join(o.get("text", "") for o in nb.cells[4].outputs)
    assert "test_perplexity" in metrics_text


def test_plots_command(tiny_run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "c.png"
    result = subprocess.run(
        [sys.executable, "-m", "utils.plots", str(tiny_run), str(tiny_run), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tiny_run / "curves.png").is_file()  # main.py drew the run's own
