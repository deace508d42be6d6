"""Training curves from ``<output_dir>/metrics.jsonl`` into a PNG.

python -m open_instruct.report.plot OUTPUT_DIR [--out curves.png]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from open_instruct.files import atomic_write, read_jsonl
from open_instruct.report.tracking import METRICS_FILE

# (metric, panel title); a panel whose metric was never logged says so instead of drawing an empty axis.
PANELS = (
    ("train_loss", "loss"),
    ("rewards/accuracy", "reward accuracy"),
    ("rewards/margin", "reward margin"),
    (("rewards/chosen", "rewards/rejected"), "chosen / rejected rewards"),
    ("learning_rate", "learning rate"),
    ("logps/chosen", "policy log-prob (chosen)"),
)


CURVES = "curves.png"  # written beside metrics.jsonl


def read_rows(output_dir: str | Path) -> list[dict]:
    """Training rows of metrics.jsonl (one per logged step; the last one wins if a step repeats)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    rows: dict[int, dict] = {}
    for row in read_jsonl(path):
        if isinstance(row, dict) and "training_step" in row and "train_loss" in row:
            rows[int(row["training_step"])] = row
    return [rows[s] for s in sorted(rows)]


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["training_step"], float(r[name])) for r in rows if isinstance(r.get(name), int | float)]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def plot(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss, accuracy, margin, chosen/rejected rewards, learning rate and chosen log-prob against step."""
    # matplotlib is slow to import and only the final curves need it
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib is slow to import and only the final curves need it
    import matplotlib.pyplot as plt

    rows = read_rows(output_dir)
    if not rows:
        raise SystemExit(f"error: no training rows in {Path(output_dir) / METRICS_FILE}")
    out = Path(out) if out else Path(output_dir) / CURVES
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    # Fixed margins: matplotlib's constrained layout measured every tick label first, half of the plot's 1.2 s.
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.9, wspace=0.22, hspace=0.32)
    for ax, (names, title) in zip(axes.flat, PANELS):
        for name in (names,) if isinstance(names, str) else names:
            steps, values = _series(rows, name)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        if ax.lines:
            if len(ax.lines) > 1:
                ax.legend()
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"training: {Path(output_dir).resolve().name} ({len(rows)} logged steps)")
    with atomic_write(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def write_curves(output_dir: str | Path) -> Path | None:
    """``<output_dir>/curves.png`` at the end of a run (None when nothing was logged)."""
    return plot(output_dir) if read_rows(output_dir) else None


def main(argv: list[str] | None = None) -> None:
    """Command line: write the PNG and print its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a training output folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help=f"PNG path (default: OUTPUT_DIR/{CURVES})")
    ns = parser.parse_args(argv)
    print(plot(ns.output_dir, ns.out))


if __name__ == "__main__":
    main()
