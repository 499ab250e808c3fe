"""Training curves from run directories: loss, accuracy and throughput per epoch.

    python -m utils.plots runs/a runs/b --out curves.png

Reads only each run's history.csv and config.json (for the legend), so it
works on any machine that has the files. Several runs are overlaid, e.g. the
same job at np=1 and np=4. The notebook notebooks/training_curves.ipynb calls
the same functions.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys

PANELS = (
    ("loss", "val_loss", "cross-entropy loss"),
    ("accuracy", "val_accuracy", "next-token accuracy"),
    ("tokens_per_sec", None, "training tokens / s"),
)


def read_history(run_dir: str | pathlib.Path) -> dict[str, list[float]]:
    """history.csv as columns of floats (empty cells become NaN)."""
    path = pathlib.Path(run_dir) / "history.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no history.csv (not a run directory, or no epoch finished)"
        )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(
                float(value) if value not in ("", None) else float("nan")
            )
    return columns


def run_label(run_dir: str | pathlib.Path) -> str:
    """Run name and world size, from config.json when there is one."""
    run_dir = pathlib.Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        return f"{run_dir.name} (np={config['world']['size']})"
    except (OSError, KeyError, ValueError):
        return run_dir.name


def plot_runs(run_dirs: list[str | pathlib.Path], out: str | pathlib.Path | None = None):
    """One figure, three panels (loss, accuracy, tokens/s per epoch), runs overlaid.

    Training curves are solid, validation curves dashed. Returns the figure;
    writes it to `out` (PNG) when given.
    """
    import matplotlib

    if out is not None and matplotlib.get_backend().lower() not in (
        "agg",
        "module://matplotlib_inline.backend_inline",
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for index, run_dir in enumerate(run_dirs):
        history = read_history(run_dir)
        # CSVLogger counts epochs from 0, the progress bar from 1.
        epochs = [e + 1 for e in history["epoch"]]
        color = f"C{index}"
        label = run_label(run_dir)
        for ax, (train_key, val_key, title) in zip(axes, PANELS, strict=True):
            ax.plot(
                epochs,
                history[train_key],
                color=color,
                marker="o",
                label=f"{label} train",
            )
            if val_key:
                ax.plot(
                    epochs,
                    history[val_key],
                    color=color,
                    marker="o",
                    linestyle="--",
                    label=f"{label} val",
                )
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def plot_confusion(
    confusion: list[list[int]], labels: list[str], path: pathlib.Path, title: str
) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.asarray(confusion)
    size = 1.5 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), constrained_layout=True)
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
            fontsize=8,
        )
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m utils.plots", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dirs", nargs="+", metavar="DIR", help="run directories to overlay")
    parser.add_argument("--out", default="curves.png", help="output PNG (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.run_dirs, args.out)
    except OSError as e:  # a missing history.csv, or an output that cannot be written
        print(f"python -m utils.plots: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
