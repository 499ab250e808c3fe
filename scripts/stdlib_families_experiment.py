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
   same training split (deterministic: one figure for all seeds).

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
