"""The summary at the end of a run: one block on the console and ``<output_dir>/summary.json`` with the same facts.

What it cost (wall time by phase, tokens per second, MFU), how it went (final train loss, final and best held-out
figures with their steps, steps done of the total, how it ended), where everything went (every entry of the output
folder with its size, the caches used) and what to run next (resume, push later, plan on a cluster).

The figures are read back from ``metrics.jsonl`` and ``run_config.json``, so a run resumed after a preemption sums up
the whole run, not only its last part; the phases are this process's (:mod:`open_instruct.report.phases`).
Other modules add their own text with ``sections``: ``(title, text)`` pairs printed after the standard ones and kept
under ``"sections"`` in the JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from open_instruct.files import read_jsonl, write_text_atomic
from open_instruct.report.phases import phase_seconds
from open_instruct.report.tracking import METRICS_FILE

SUMMARY_NAME = "summary.json"
TRAIN_LOSS = "train_loss"
# Held-out figures and which way is better: DPO logs reward accuracy and loss, SFT and pretraining the loss.
EVAL_FIGURES = {"accuracy": ("eval/rewards/accuracy", max), "loss": ("eval/loss", min)}
OTHER_LABEL = "other (tokenizer and model load)"  # what no phase covers: mostly loading, and importing transformers
NO_PEAK = "no peak FLOP/s known for this device (CPU, or a GPU missing from open_instruct/plan/gpus.py)"


def read_rows(output_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (none when absent; a line a kill cut short is skipped)."""
    return read_jsonl(output_dir / METRICS_FILE)


def throughput(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Tokens per second and MFU over every logged training interval, each interval weighted by its time (its tokens
    over its tokens per second): total tokens over total time, total FLOPs over total peak. MFU is None, with a note,
    when an interval logged none (the device's peak is unknown)."""
    tokens = seconds = mfu_seconds = 0.0
    seen, every_mfu, before = 0, True, 0
    for row in rows:
        if "perf/tokens_per_second_step" not in row:
            continue
        total = row.get("token_count", before)  # cumulative over the run, resumed parts included
        count, before = total - before, total
        rate = row["perf/tokens_per_second_step"]
        if not (isinstance(rate, float | int) and rate > 0 and count > 0):
            continue
        seen += 1
        tokens, seconds = tokens + count, seconds + count / rate
        every_mfu = every_mfu and isinstance(row.get("perf/mfu_step"), float | int)
        mfu_seconds += row.get("perf/mfu_step", 0.0) * count / rate if every_mfu else 0.0
    if not seen:
        return {"tokens_per_second": None, "mfu": None, "mfu_note": "no training interval was logged"}
    mfu = mfu_seconds / seconds if every_mfu else None
    return {"tokens_per_second": tokens / seconds, "mfu": mfu, "mfu_note": None if every_mfu else NO_PEAK}


def _figure(rows: Sequence[dict[str, Any]], key: str, better: Any) -> dict[str, Any] | None:
    """Final value and step of ``key``, and the best (``better``: max or min; the earliest step on a tie)."""
    found = [(row[key], row["training_step"]) for row in rows if isinstance(row.get(key), float | int)]
    if not found:
        return None
    best = better(found, key=lambda pair: (pair[0], -pair[1]) if better is max else (pair[0], pair[1]))
    return {"final": found[-1][0], "final_step": found[-1][1], "best": best[0], "best_step": best[1]}


def metrics_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Final train loss (and its step), the held-out figures, the last step logged."""
    loss = _figure(rows, TRAIN_LOSS, min)
    held_out = {name: _figure(rows, key, better) for name, (key, better) in EVAL_FIGURES.items()}
    steps = [row["training_step"] for row in rows if "training_step" in row]
    return {
        "train_loss": None if loss is None else {"final": loss["final"], "step": loss["final_step"]},
        "eval": {name: figure for name, figure in held_out.items() if figure is not None} or None,
        "last_logged_step": max(steps) if steps else 0,
    }


def folder_entries(output_dir: Path) -> list[dict[str, Any]]:
    """Each entry of the output folder: ``{"path", "bytes"}`` for a file, plus ``"files"`` (its count) for a
    folder (a checkpoint ``step_N``, ``profile/``), whose bytes are those of every file below it."""
    entries = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            entries.append({"path": path.name, "bytes": sum(p.stat().st_size for p in files), "files": len(files)})
        elif path.is_file():
            entries.append({"path": path.name, "bytes": path.stat().st_size})
    return entries


def build_summary(
    output_dir: Path, ending: dict[str, Any], timing: tuple[dict[str, float], float], context: dict[str, Any]
) -> dict[str, Any]:
    """The summary of the run in ``output_dir``. ``ending``: ``{"status": finished | preempted | cached_data |
    cached_logprobs, "step": the step it stopped at or None, "detail": text}``. ``timing``: (seconds by phase, total).
    ``context``: ``stage``, ``caches`` (name -> path), ``commands`` (name -> command text or None), ``cwd``."""
    rows = read_rows(output_dir)
    config_path = output_dir / "run_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    figures = metrics_summary(rows)
    last_logged = figures.pop("last_logged_step")
    done = ending["step"] if ending.get("step") is not None else last_logged
    phases, total = timing
    wall = {name: round(seconds, 3) for name, seconds in phases.items()}
    wall["other"] = round(max(total - sum(phases.values()), 0.0), 3)  # start-up, model load, what no phase covers
    wall["total"] = round(total, 3)
    return {
        "output_dir": str(output_dir.resolve()),
        "stage": context.get("stage", "dpo"),
        "ended": ending,
        "steps": {"done": done, "total": config.get("total_optimizer_steps")},
        "wall_seconds": wall,
        "throughput": throughput(rows),
        **figures,
        "caches": context.get("caches", {}),
        "commands": {"cwd": context.get("cwd"), **context.get("commands", {})},
        "files": folder_entries(output_dir),
    }


def write_summary(
    output_dir: Path, summary: dict[str, Any], sections: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """Write ``summary`` (plus ``sections``) as ``<output_dir>/summary.json`` atomically; returns what was written. The
    file lists itself with its own size: the text is rebuilt until the size it states is the size it has."""
    summary = {**summary, "sections": {title: text for title, text in sections}}
    entries = [e for e in summary["files"] if e["path"] != SUMMARY_NAME]
    size, text = 0, ""
    for _ in range(8):
        listed = sorted([*entries, {"path": SUMMARY_NAME, "bytes": size}], key=lambda e: e["path"])
        text = json.dumps({**summary, "files": listed}, indent=2, default=str) + "\n"
        if len(text.encode()) == size:
            break
        size = len(text.encode())
    write_text_atomic(output_dir / SUMMARY_NAME, text)
    return {**summary, "files": listed}


def human_bytes(count: int) -> str:
    """``512 B``, ``1.5 KB``, ``2.3 MB``, ``4.0 GB`` (powers of 1024)."""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def human_seconds(seconds: float) -> str:
    """``0.8s``, ``42.1s``, ``12m 05s``, ``3h 07m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m {int(seconds % 60):02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def ending_line(summary: dict[str, Any]) -> str:
    """``finished: 8 of 8 steps`` / ``preempted at step 2 of 8 (saved: rerun the same command to resume)``."""
    ended, steps = summary["ended"], summary["steps"]
    of = f"{steps['done']} of {steps['total']} steps" if steps["total"] is not None else f"{steps['done']} steps"
    if ended["status"] == "finished":
        return f"finished: {of}"
    if ended["status"] == "preempted":
        where = f"at step {ended['step']}" if ended.get("step") is not None else f"({ended.get('detail', '')})"
        return f"preempted {where}: {of} done and saved; rerun the same command to resume"
    return f"{ended.get('detail') or ended['status']}: no training in this run"


def _eval_lines(summary: dict[str, Any]) -> list[str]:
    held_out = summary.get("eval") or {}
    lines = []
    for name, figure in held_out.items():
        show = (lambda v: f"{100 * v:.2f}%") if name == "accuracy" else (lambda v: f"{v:.4f}")
        lines.append(
            f"  held-out {name}: final {show(figure['final'])} (step {figure['final_step']}), "
            f"best {show(figure['best'])} (step {figure['best_step']})"
        )
    return lines or ["  held-out: no evaluation split (--eval_mixer_list / --eval_fraction)"]


def _cost_lines(summary: dict[str, Any]) -> list[str]:
    wall = summary["wall_seconds"]
    named = {OTHER_LABEL if name == "other" else name: s for name, s in wall.items() if name != "total"}
    phases = ", ".join(f"{name} {human_seconds(s)}" for name, s in named.items())
    perf = summary["throughput"]
    rate = perf["tokens_per_second"]
    mfu = perf["mfu"]
    return [
        f"  wall time: {human_seconds(wall['total'])} ({phases})",
        f"  throughput: {'n/a' if rate is None else f'{rate:,.0f} tokens/s'}; MFU "
        + (f"{100 * mfu:.1f}%" if mfu is not None and math.isfinite(mfu) else f"n/a: {perf['mfu_note']}"),
    ]


def format_summary(summary: dict[str, Any], sections: Sequence[tuple[str, str]] = ()) -> str:
    """The console block of ``summary``, then each extra ``(title, text)`` section."""
    loss = summary.get("train_loss")
    lines = [f"=== run summary ({summary['stage']}): {ending_line(summary)} ===", *_cost_lines(summary)]
    lines.append(f"  final train loss: {loss['final']:.4f} (step {loss['step']})" if loss else "  no training step")
    lines += _eval_lines(summary)
    lines.append(f"output folder {summary['output_dir']}:")
    for entry in summary["files"]:
        count = f" ({entry['files']} files)" if "files" in entry else ""
        lines.append(f"  {entry['path'] + ('/' if 'files' in entry else ''):<28} {human_bytes(entry['bytes'])}{count}")
    lines += [f"{name} cache: {path}" for name, path in summary["caches"].items() if path]
    commands = summary["commands"]
    lines.append(f"commands (from {commands['cwd']}):")
    lines += [f"  {name}: {text}" for name, text in commands.items() if name != "cwd" and text]
    for title, text in sections:
        lines += [f"{title}:", *(f"  {line}" for line in text.splitlines())]
    return "\n".join(lines)


def prepared_data_cache(output_dir: Path) -> str | None:
    """The prepared-data cache entry the run used, as ``dataset_statistics.json`` records it (made absolute: the
    data layer records it as given, relative to the folder the run started in)."""
    path = output_dir / "dataset_statistics.json"
    try:
        entry = json.loads(path.read_text()).get("cache", {}).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(Path(entry).resolve()) if entry else None


def summarize_run(
    output_dir: Path, ending: dict[str, Any], context: dict[str, Any], sections: Sequence[tuple[str, str]] = ()
) -> str:
    """Build the summary of the run in ``output_dir`` (see :func:`build_summary`), write ``summary.json``, return the
    console block."""
    summary = write_summary(output_dir, build_summary(output_dir, ending, phase_seconds(), context), sections)
    return format_summary(summary, sections)
