"""Is pretraining worth it? Classify stdlib docstrings by module family, three ways.

    python scripts/stdlib_families_experiment.py [--seeds 0 1 2] [--workdir runs/experiment]

For each seed, through the real command line (`python main.py ...`):

1. a classifier trained from scratch on the default labelled dataset
   (`--task classify`);
2. a BERT-style encoder pretrained by masked-LM (`--task mlm`) on standard-
   library docstrings from every source file that is NOT in the
   classification validation or test split (so no held-out text is seen in
   pretraining), then fine-tuned (`--task classify --init-from`);
3. the TF-IDF + logistic-regression baseline that evaluate.py fits on the
   same training split (deterministic: one figure for all seeds);
4. with `--preset-row` (alone: the other rows and the pretraining are not
   run again), a classifier fine-tuned from a keras-hub preset created here
   (`--init-from-preset`) under `horovodrun -np 2`: a BERT backbone of
   bert_tiny_en_uncased's shape with *random* weights and a WordPiece
   vocabulary learned from the training split, saved by `save_to_preset`.
   It shows the preset -> fine-tuning -> evaluation pipeline under Horovod
   (the np=2 run's test figures equal a one-process `evaluate` of it) and
   its cost per step, not pretrained quality.

Prints a table of test macro-F1 and accuracy (mean and standard deviation
over the seeds) and writes it, with every run's figures, to
`<workdir>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's code runs from the checkout


def main_py(*args: str, log: pathlib.Path) -> None:
    """Run `python main.py ARGS`, its output to `log`; stop on failure."""
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *args], stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): main.py {' '.join(args)}; see {log}")


def pretraining_corpus(prepared_dir: pathlib.Path, out: pathlib.Path) -> int:
    """Every stdlib docstring except those of held-out classification files, as JSONL."""
    from data.sources import StdlibDocstrings

    held_out = set()
    for split in ("val", "test"):
        with open(prepared_dir / f"{split}.jsonl", encoding="utf-8") as f:
            held_out.update(json.loads(line)["group"] for line in f)
    count = 0
    with open(out, "w", encoding="utf-8") as f:
        for doc in StdlibDocstrings().documents():
            if doc.group not in held_out:
                f.write(json.dumps({"text": doc.text}) + "\n")
                count += 1
    return count


def local_bert_preset(prepared_dir: pathlib.Path, out: pathlib.Path, seed: int) -> pathlib.Path:
    """A BERT preset of bert_tiny_en_uncased's shape (2 layers, width 128, 2 heads, FFN 512),
    random weights, WordPiece vocabulary learned from the classification training split."""
    from models.presets import save_bert_preset

    with open(prepared_dir / "train.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return save_bert_preset(texts, out, vocabulary_size=8000, seed=seed)


def ms_per_step(run: pathlib.Path) -> float:
    """Median wall time of a training step over the epochs after the first (which compiles)."""
    import csv

    steps = json.loads((run / "config.json").read_text())["steps_per_epoch"]
    with open(run / "history.csv", newline="") as f:
        seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(f)][1:]
    return 1000 * statistics.median(seconds) / steps if seconds else float("nan")


def preset_row(work: pathlib.Path, prepared: pathlib.Path, seeds: list[int], extra: str) -> None:
    """Row 4: fine-tune from a locally created preset under horovodrun -np 2, per seed."""
    import shutil

    horovodrun = shutil.which("horovodrun", path=str(pathlib.Path(sys.executable).parent))
    runs = []
    for seed in seeds:
        preset = local_bert_preset(prepared, work / f"bert-preset-seed{seed}", seed)
        run = work / f"preset-finetuned-seed{seed}"
        log = work / f"{run.name}.log"
        launch = [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo"] if horovodrun else []
        with open(log, "w") as out:
            command = [*launch, sys.executable, str(ROOT / "main.py"), "--task", "classify"]
            command += [f"--train.seed={seed}", "--init-from-preset", str(preset), *extra.split()]
            if subprocess.run([*command, "--run-dir", str(run)], stdout=out, stderr=out).returncode:
                raise SystemExit(f"failed: {' '.join(command)}; see {log}")
        trained = json.loads((run / "metrics.json").read_text())
        main_py("evaluate", "--run-dir", str(run), log=work / f"{run.name}-evaluate.log")
        evaluated = json.loads((run / "metrics.json").read_text())
        record = json.loads((run / "config.json").read_text())
        runs.append(
            {
                "seed": seed,
                "run": str(run),
                "ranks": record["world"]["size"],
                "parameters": record["parameters"],
                "preset": record["init_from_preset"],
                "macro_f1": trained["test_macro_f1"],
                "accuracy": trained["test_accuracy"],
                "one_process_evaluate": {
                    "macro_f1": evaluated["test_macro_f1"],
                    "accuracy": evaluated["test_accuracy"],
                },
                "best_epoch": trained["best_epoch"],
                "ms_per_step": ms_per_step(run),
                "global_batch": record["global_batch"],
            }
        )
        print(
            f"seed {seed} preset: macro-F1 {trained['test_macro_f1']:.4f} (one-process evaluate "
            f"{evaluated['test_macro_f1']:.4f}), accuracy {trained['test_accuracy']:.4f}, "
            f"{runs[-1]['ms_per_step']:.1f} ms/step at np={runs[-1]['ranks']}",
            flush=True,
        )
    results = {
        "python": sys.version.split()[0],
        "classify_args": extra,
        "macro_f1": summary([r["macro_f1"] for r in runs]),
        "accuracy": summary([r["accuracy"] for r in runs]),
        "runs": runs,
    }
    (work / "results_preset.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {work / 'results_preset.json'}")


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="runs/experiment")
    parser.add_argument(
        "--mlm-args",
        default="--train.epochs=12 --train.lr=3e-3 --train.warmup_steps=200",
        help="extra main.py flags for the pretraining runs (default: %(default)s)",
    )
    parser.add_argument(
        "--classify-args", default="", help="extra main.py flags for the classification runs"
    )
    parser.add_argument(
        "--preset-row",
        action="store_true",
        help="only the row fine-tuned from a locally created keras-hub preset (under np=2)",
    )
    args = parser.parse_args()
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    main_py("prepare", "--task", "classify", log=work / "prepare.log")
    prepared = pathlib.Path(
        next(
            line.split(": ", 1)[1]
            for line in (work / "prepare.log").read_text().splitlines()
            if line.startswith("prepared: ")
        )
    )
    if args.preset_row:
        preset_row(work, prepared, args.seeds, args.classify_args)
        return
    documents = pretraining_corpus(prepared, work / "pretrain.jsonl")
    print(
        f"classification data: {prepared}; pretraining corpus: {documents} docstrings", flush=True
    )

    runs: dict[str, list[dict]] = {"scratch": [], "pretrained": []}
    for seed in args.seeds:
        scratch, mlm, tuned = (
            work / f"{name}-seed{seed}" for name in ("scratch", "mlm", "finetuned")
        )
        classify = ("--task", "classify", f"--train.seed={seed}", *args.classify_args.split())
        main_py(*classify, "--run-dir", str(scratch), log=work / f"{scratch.name}.log")
        pretrain = ("--task", "mlm", "--data", str(work / "pretrain.jsonl"), f"--train.seed={seed}")
        main_py(
            *pretrain, *args.mlm_args.split(), "--run-dir", str(mlm), log=work / f"{mlm.name}.log"
        )
        main_py(
            *classify,
            "--init-from",
            str(mlm),
            "--run-dir",
            str(tuned),
            log=work / f"{tuned.name}.log",
        )
        for name, run in (("scratch", scratch), ("pretrained", tuned)):
            metrics = json.loads((run / "metrics.json").read_text())
            runs[name].append(
                {
                    "seed": seed,
                    "run": str(run),
                    "macro_f1": metrics["test_macro_f1"],
                    "accuracy": metrics["test_accuracy"],
                    "best_epoch": metrics["best_epoch"],
                    "baseline": metrics["test_baseline_tfidf"],
                }
            )
            print(
                f"seed {seed} {name}: macro-F1 {metrics['test_macro_f1']:.4f} accuracy "
                f"{metrics['test_accuracy']:.4f}",
                flush=True,
            )
        mlm_metrics = json.loads((mlm / "metrics.json").read_text())
        runs.setdefault("mlm", []).append(
            {
                "seed": seed,
                "test_loss": mlm_metrics["test_loss"],
                "test_accuracy": mlm_metrics["test_accuracy"],
            }
        )

    baseline = runs["scratch"][0]["baseline"]
    results = {
        "python": sys.version.split()[0],
        "mlm_args": args.mlm_args,
        "classify_args": args.classify_args,
        "classification_data": {
            k: v
            for k, v in json.loads((prepared / "meta.json").read_text()).items()
            if k in ("key", "text_sha256", "labels", "documents", "class_counts", "warnings")
        },
        "pretraining_docstrings": documents,
        "tfidf_baseline": {"macro_f1": baseline["macro_f1"], "accuracy": baseline["accuracy"]},
        **{
            name: {
                "macro_f1": summary([r["macro_f1"] for r in runs[name]]),
                "accuracy": summary([r["accuracy"] for r in runs[name]]),
                "runs": runs[name],
            }
            for name in ("scratch", "pretrained")
        },
        "mlm": runs["mlm"],
    }
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'model':<34}{'test macro-F1':>22}{'test accuracy':>22}")
    print(
        f"{'TF-IDF + logistic regression':<34}{baseline['macro_f1']:>22.4f}{baseline['accuracy']:>22.4f}"
    )
    for name, label in (
        ("scratch", "Transformer from scratch"),
        ("pretrained", "MLM-pretrained, fine-tuned"),
    ):
        f1, acc = results[name]["macro_f1"], results[name]["accuracy"]
        print(
            f"{label:<34}{f1['mean']:>14.4f} ± {f1['std']:.4f}{acc['mean']:>14.4f} ± {acc['std']:.4f}"
        )
    print(f"\nwrote {work / 'results.json'}")


if __name__ == "__main__":
    main()
