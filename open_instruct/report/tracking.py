"""Where metrics go: the console, ``<output_dir>/metrics.jsonl`` (always), and wandb (``--with_tracking``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # in the output folder: every logged row, read back by the plot and the run summary


def console_line(metrics: dict[str, Any]) -> str:
    """``step=100 loss=0.4523 accuracy=72.50% lr=5.000e-06`` (fields missing from ``metrics`` are left out)."""
    parts = [f"step={metrics['training_step']}"]
    if "train_loss" in metrics:
        parts.append(f"loss={metrics['train_loss']:.4f}")
    if "rewards/accuracy" in metrics:
        parts.append(f"accuracy={100 * metrics['rewards/accuracy']:.2f}%")
    if "learning_rate" in metrics:
        parts.append(f"lr={metrics['learning_rate']:.3e}")
    return " ".join(parts)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _row_step(line: str) -> float:
    """The row's training_step; a line a kill cut short counts as after every step (dropped)."""
    try:
        return json.loads(line).get("training_step", 0)
    except json.JSONDecodeError:
        return math.inf


class MetricsLogger:
    """Writes each metrics dict once, from the main process only."""

    def __init__(self, accelerator: Any, output_dir: str | Path, use_wandb: bool) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self.use_wandb = use_wandb

    def log(self, metrics: dict[str, Any], console: bool = True) -> None:
        """Append one line to metrics.jsonl, print the console line, send to the trackers."""
        if not self.accelerator.is_main_process:
            return
        row = {k: _plain(v) for k, v in metrics.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if console:
            self.accelerator.print(console_line(row))
        if self.use_wandb:
            self.accelerator.log(row, step=row["training_step"])

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after optimizer step ``step`` (a resumed run logs them again); atomic rewrite."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
