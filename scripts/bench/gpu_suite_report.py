"""Part 4 of the GPU suite (scripts/bench/gpu_suite.py): the report, ``suite.json`` and ``suite.md``, rebuilt from every
part's ``part_<name>.json``, with the versions, a bf16 matmul rate measured here, and MFU against it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def environment() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for name in ("transformers", "accelerate", "deepspeed", "liger_kernel", "trl", "triton", "flash_attn"):
        try:
            from importlib.metadata import version

            info[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            info[name] = None
    return info


def matmul_tflops() -> float | None:
    """The bf16 rate a plain 8192^3 matrix product reaches here (median of 10 after 3 warm-ups, random data): the
    practical ceiling MFU is also reported against."""
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(suite: dict) -> str:
    env, matmul = suite["environment"], suite.get("matmul_tflops")
    measured = f"{matmul:.0f}" if matmul else "-"
    lines = [
        f"GPU suite on {env['device']} (torch {env['torch']}, transformers {env['transformers']}, "
        f"deepspeed {env['deepspeed']}, liger {env['liger_kernel']}, trl {env['trl']}); model {suite['model']}",
        "",
        f"GPU tests: {suite.get('tests', {}).get('summary', 'not run')}",
        f"bf16 8192^3 matmul here: {measured} TFLOP/s. MFU: against the datasheet's 989 TFLOP/s "
        f"(perf/mfu_step), and against this measured rate.",
        "",
        "| run | tokens/step | layout | liger | engine | tokens/s | MFU % | MFU % of matmul | peak GiB | ref pairs/s |"
        " steps |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in {**suite.get("train", {}), **suite.get("trl", {})}.items():
        if not isinstance(r, dict) or "error" in r or "skipped" in r:
            lines.append(f"| {name} | | | | | {('FAILED' if isinstance(r, dict) and 'error' in r else 'skipped')} |")
            continue
        of_matmul = r["mfu"] * 989 / matmul * 100 if r.get("mfu") and matmul else None
        lines.append(
            f"| {name} | {r.get('budget', '-')} | {r.get('layout', '-')} | {r.get('liger', '-')} | "
            f"{r.get('engine', '-')} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')} | "
            f"{fmt(of_matmul, '.1f')} | {fmt(r['peak_memory_gib'], '.1f')} | "
            f"{fmt(r['reference_pairs_per_s'], '.1f')} | {r['steps']} |"
        )
    return "\n".join(lines) + "\n"


def part_report(out: Path, cfg: dict) -> dict:
    suite = {"environment": environment(), "model": cfg["shape"], "matmul_tflops": matmul_tflops()}
    for part in ("tests", "train", "trl"):
        path = out / f"part_{part}.json"
        if path.exists():
            suite[part] = json.loads(path.read_text())
    (out / "suite.json").write_text(json.dumps(suite, indent=2))
    table = markdown(suite)
    (out / "suite.md").write_text(table)
    print(table)
    return suite
