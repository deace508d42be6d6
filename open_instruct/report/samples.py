"""Sample answers on disk and in the trackers: ``<output_dir>/samples.jsonl``, its wandb table and tensorboard text,
the ``--sample_prompts`` file, and :func:`side_by_side` (each prompt's answer at the start and at the end).

A row is ``{"step": "start" | N | "final", "prompt_index", "prompt", "answer", "tokens", "seconds"}``. An occasion's
rows go to the file in one write (and flush), and a reader skips a line a kill cut short, so a preempted run leaves
no half row behind that anything reads. :mod:`open_instruct.training.samples` generates the answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from open_instruct.errors import UserError
from open_instruct.files import read_jsonl, write_text_atomic

SAMPLES_FILE = "samples.jsonl"
COLUMNS = ("step", "prompt_index", "prompt", "answer", "tokens", "seconds")
_FLAG = "--sample_prompts"


def _messages_of(row: Any, where: str) -> list[dict[str, str]]:
    """One ``.jsonl`` row's chat: its ``prompt`` as one user message, or its ``messages`` checked."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with a 'prompt' or 'messages' field")
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise UserError(f"{where}: field 'prompt' must be a non-empty string")
        return [{"role": "user", "content": row["prompt"]}]
    if "messages" not in row:
        raise UserError(f"{where}: no 'prompt' (string) or 'messages' (chat list) field")
    messages = row["messages"]
    ok = isinstance(messages, list) and bool(messages)
    ok = ok and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ok = ok and all(isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} strings")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_prompt_file(path: str | Path) -> list[list[dict[str, str]]]:
    """The chats of a ``--sample_prompts`` file: ``.txt`` (one prompt per line, blank lines skipped) or ``.jsonl``
    (a ``prompt`` string or a ``messages`` chat list per line). A bad row is a :class:`UserError` naming the file,
    its 1-based line and the field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{_FLAG}: file not found: {path}" if not path.exists() else f"{_FLAG} {path} is not a file")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"{_FLAG} {path}: unsupported file type; use .txt (one prompt per line) or .jsonl")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{_FLAG} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    chats = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            chats.append([{"role": "user", "content": line}])
            continue
        where = f"{_FLAG} {path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        chats.append(_messages_of(row, where))
    if not chats:
        raise UserError(f"{_FLAG} {path}: holds no prompt")
    return chats


def _jsonl(rows: list[dict[str, Any]]) -> str:
    """The rows as JSON lines, non-ASCII text kept as written (the file is UTF-8)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def append_rows(output_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """One occasion's rows appended with a single write and flush (a kill leaves at most one cut line, skipped)."""
    if not rows:
        return
    with (Path(output_dir) / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
        handle.write(_jsonl(rows))
        handle.flush()
        os.fsync(handle.fileno())


def read_rows(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``samples.jsonl`` (none when it is missing); a line cut short by a kill is skipped."""
    return read_jsonl(Path(output_dir) / SAMPLES_FILE)


def keep_rows(output_dir: str | Path, keep: Any) -> list[dict[str, Any]]:
    """Rewrite ``samples.jsonl`` atomically with the rows ``keep(row)`` accepts; returns them."""
    path = Path(output_dir) / SAMPLES_FILE
    rows = [row for row in read_rows(output_dir) if keep(row)]
    if path.is_file():
        write_text_atomic(path, _jsonl(rows))
    return rows


def _cell(text: Any) -> str:
    """Text for one markdown table cell: no line breaks or pipes to break the table."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (tensorboard renders text summaries as markdown)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines)


def log_to_trackers(
    accelerator: Any, rows: list[dict[str, Any]], occasions: list[tuple[int, list]], step: int
) -> None:
    """wandb: every row so far as one ``samples`` table at ``step``; tensorboard: each pending occasion's rows as a
    markdown text summary at its own step (``occasions``: (step, rows) pairs)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            import wandb  # optional package: only a run that reports to wandb gets here

            table = wandb.Table(columns=list(COLUMNS), data=[[str(r[c]) for c in COLUMNS] for r in rows])
            tracker.log({"samples": table}, step=step)
        elif tracker.name == "tensorboard":
            for at, occasion_rows in occasions:
                tracker.log({"samples": markdown_table(occasion_rows)}, step=at)


def _indented(text: str) -> str:
    return "\n".join("      " + line for line in (text.strip() or "(empty)").splitlines())


def side_by_side(output_dir: str | Path) -> tuple[str, str] | None:
    """The run summary's section (title, text): each sample prompt with its answer at the start of the run and at the
    end; None when the run sampled nothing."""
    by_occasion: dict[Any, dict[int, dict[str, Any]]] = {}
    for row in read_rows(output_dir):
        by_occasion.setdefault(row["step"], {})[row["prompt_index"]] = row
    if not by_occasion:
        return None
    start, final = by_occasion.get("start", {}), by_occasion.get("final", {})
    parts = []
    for index in sorted(set(start) | set(final)):
        prompt = (start.get(index) or final.get(index))["prompt"]
        parts.append(f"[{index}] prompt:\n{_indented(prompt)}")
        for label, table in (("before", start), ("after ", final)):
            answer = table[index]["answer"] if index in table else "(not sampled)"
            parts.append(f"  {label}:\n{_indented(answer)}")
    return f"sample answers, greedy (every occasion: {Path(output_dir) / SAMPLES_FILE})", "\n".join(parts)
