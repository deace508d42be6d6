"""Soak run: a long CPU run on the tiny model with frequent checkpoints, then the same run killed -9 again and again.

python scripts/bench/soak.py [--steps 2000 --checkpoint_every 50 --keep 2 --kills 5 --seed 0 --json soak.json]

1. An uninterrupted run of ``--steps`` optimizer steps (``--checkpointing_steps --checkpoint_every``,
   ``--keep_last_n_checkpoints --keep``), watched from outside every ``--poll`` seconds: the output folder's disk use
   (allocated blocks), the training process's resident set (``/proc/PID/statm``) and the newest step in
   ``metrics.jsonl``. Printed: least-squares slopes per 1000 steps of disk use (without ``metrics.jsonl``, the log
   that grows by design), resident set and time per step (per block of ``--checkpoint_every`` steps, the save
   included), fitted from step ``2 * --checkpoint_every`` on (the keep window full, the process warm) to the
   final save.
2. The same command on a fresh output folder, killed with SIGKILL ``--kills`` times at seeded random moments (a random
   step, then a random fraction of a second: mid-step or mid-save), rerun unchanged each time (it resumes from its
   newest complete checkpoint), then left to finish. Its final weights must be bit-identical to the uninterrupted
   run's, tensor by tensor, and its ``metrics.jsonl`` loss curve equal row for row: on CPU every kernel is
   deterministic and a checkpoint holds the optimizer, scheduler, data position and every random stream, so a resumed
   step recomputes exactly what the uninterrupted step computed. The model has attention dropout
   (``--attention_dropout``, default 0.1), so equality also shows the random streams resumed exactly.

Exit status 1 when a check fails (disk above its bound, a checkpoint count above ``--keep + 1``, a mismatch). Timings
are wall clock on whatever else shares the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The soak's sizes (defaults: the full soak of issue 32)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint_every", type=int, default=50)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument(
        "--attention_dropout", type=float, default=0.1, help="> 0: exact resume also shows the random streams restored"
    )
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def prepare(workdir: Path, attention_dropout: float) -> tuple[Path, Path]:
    """The tiny model (with that attention dropout) and the synthetic preference task (256 pairs) under ``workdir``."""
    from open_instruct.data.synthetic import write_task, write_tiny_model

    model = workdir / "model"
    if not (model / "config.json").exists():
        write_tiny_model(model, seed=0)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attention_dropout": attention_dropout}))
    train, _ = write_task(workdir / "data", n_train=256, n_test=64, seed=0)
    return model, train


def command(model: Path, train: Path, out: Path, a: argparse.Namespace) -> list[str]:
    """The training command, the same for every attempt."""
    flags = {
        "model_name_or_path": model,
        "mixer_list": f"{train} 256",
        "max_seq_length": 64,
        "per_device_train_batch_size": 8,
        "learning_rate": "1e-3",
        "warmup_ratio": 0,
        "loss_type": "dpo_norm",
        "beta": 5,
        "logging_steps": 1,
        "seed": 1,
        "max_train_steps": a.steps,
        "checkpointing_steps": a.checkpoint_every,
        "keep_last_n_checkpoints": a.keep,
        "output_dir": out,
        "num_sample_prompts": 0,  # the soak checks resumes; sample answers would only add time
    }
    argv = [sys.executable, "-m", "open_instruct.dpo_tune_cache"]
    for key, value in flags.items():
        argv += [f"--{key}", *str(value).split(" ")]
    return argv


def environment(cache: Path) -> dict[str, str]:
    """One thread, offline, quiet, this checkout first on the path, its own reference cache."""
    env = dict(os.environ)
    env.update(
        {
            "REFERENCE_LOGPROBS_CACHE_PATH": str(cache),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "TQDM_DISABLE": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env


def newest_step(metrics: Path) -> int:
    """The last ``training_step`` in ``metrics.jsonl`` (0 when none yet); reads only the file's tail."""
    try:
        with open(metrics, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = [line for line in handle.read().splitlines() if line.strip()]
        return int(json.loads(lines[-1])["training_step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):  # no file yet, or a line half written
        return 0


def disk_use(out: Path) -> tuple[int, int, int]:
    """(bytes allocated under ``out`` without ``metrics.jsonl``, those of ``metrics.jsonl``, step folders)."""
    total, log, folders = 0, 0, 0
    for folder, dirs, files in os.walk(out):
        folders += sum(name.startswith("step_") for name in dirs) if Path(folder) == out else 0
        for name in files:
            try:
                size = os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:  # pruned while walking
                continue
            if Path(folder) == out and name == "metrics.jsonl":
                log += size
            else:
                total += size
    return total, log, folders


def rss_mb(pid: int) -> float:
    """The process's resident set now, MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError):
        return 0.0


def watched_run(argv: list[str], out: Path, env: dict, log: Path, a: argparse.Namespace, kill=None) -> dict:
    """Run ``argv``, sampling (time, step, disk, log bytes, step folders, RSS) every ``--poll`` s; with ``kill`` =
    (step, delay), SIGKILL its process group ``delay`` s after ``metrics.jsonl`` reaches that step."""
    start = time.perf_counter()
    samples, killed_at = [], None
    with open(log, "a") as sink:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            step = newest_step(out / "metrics.jsonl")
            samples.append((time.perf_counter() - start, step, *disk_use(out), rss_mb(proc.pid)))
            if kill is not None and step >= kill[0]:
                time.sleep(kill[1])
                killed_at = newest_step(out / "metrics.jsonl")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(a.poll)
    return {"rc": proc.returncode, "samples": samples, "killed_at": killed_at, "seconds": time.perf_counter() - start}


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (steps), per 1000 steps."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else float("nan")


def block_times(samples: list[tuple], every: int, last: int) -> list[tuple[int, float]]:
    """(block end step, seconds per step) for each block of ``every`` steps: the first sample at or past each end."""
    first_seen: dict[int, float] = {}
    for t, step, *_ in samples:
        first_seen.setdefault(step - step % every, t)
    ends = sorted(s for s in first_seen if s > 0 and s - every in first_seen and s <= last)
    return [(s, (first_seen[s] - first_seen[s - every]) / every) for s in ends]


def steady_figures(run: dict, a: argparse.Namespace) -> dict:
    """Slopes and extremes of the uninterrupted run, from step ``2 * checkpoint_every`` to the last step's start (the
    final model's save is not a training step)."""
    warm = 2 * a.checkpoint_every
    steady = [s for s in run["samples"] if warm <= s[1] < a.steps and s[5] > 0]
    steps = [s[1] for s in steady]
    blocks = [(s, v) for s, v in block_times(run["samples"], a.checkpoint_every, a.steps) if s > warm]
    return {
        "samples": len(steady),
        "disk_mb_max": max(s[2] for s in steady) / 2**20,
        "disk_mb_mean": sum(s[2] for s in steady) / len(steady) / 2**20,
        "disk_slope_mb_per_1000": slope_per_1000(steps, [s[2] / 2**20 for s in steady]),
        "metrics_log_kb_per_1000": slope_per_1000(steps, [s[3] / 1024 for s in steady]),
        "step_folders_max": max(s[4] for s in run["samples"]),
        "rss_mb_mean": sum(s[5] for s in steady) / len(steady),
        "rss_mb_max": max(s[5] for s in steady),
        "rss_slope_mb_per_1000": slope_per_1000(steps, [s[5] for s in steady]),
        "step_ms_mean": 1000 * sum(v for _, v in blocks) / max(len(blocks), 1),
        "step_ms_slope_per_1000": slope_per_1000([s for s, _ in blocks], [1000 * v for _, v in blocks]),
        "seconds": run["seconds"],
    }


def checkpoint_size(out: Path) -> int:
    """Bytes allocated by the largest remaining step folder."""
    sizes = [disk_use(p)[0] for p in out.glob("step_*") if p.is_dir()]
    return max(sizes, default=0)


def killed_series(argv: list[str], out: Path, env: dict, log: Path, a: argparse.Namespace) -> list[dict]:
    """Kill the command ``--kills`` times at seeded random moments, rerunning it after each; then let it finish."""
    rng = random.Random(a.seed)
    targets = sorted(rng.sample(range(1, a.steps), a.kills))
    attempts = []
    for target in targets:
        run = watched_run(argv, out, env, log, a, kill=(target, rng.uniform(0.0, 0.5)))
        attempts.append({"target": target, "killed_at": run["killed_at"], "rc": run["rc"], "seconds": run["seconds"]})
        print(f"  kill -9 near step {target}: process at step {run['killed_at']}, exit {run['rc']}", flush=True)
    final = watched_run(argv, out, env, log, a)
    attempts.append({"target": None, "killed_at": None, "rc": final["rc"], "seconds": final["seconds"]})
    print(f"  last attempt ran to the end: exit {final['rc']}", flush=True)
    return attempts


def compare(reference: Path, resumed: Path) -> dict:
    """Whether the final weights are bit-identical tensor by tensor, and the loss curves equal row for row."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    same_weights = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    curves = [
        [
            (r["training_step"], r["train_loss"])
            for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
        ]
        for p in (reference, resumed)
    ]
    return {
        "weights_bit_identical": same_weights,
        "loss_curve_identical": curves[0] == curves[1],
        "rows": [len(c) for c in curves],
    }


def soak(a: argparse.Namespace, workdir: Path) -> dict:
    """Both phases; returns the figures and the checks."""
    model, train = prepare(workdir, a.attention_dropout)
    for leftover in ("uninterrupted", "killed"):  # a reused --workdir: both runs start afresh
        shutil.rmtree(workdir / leftover, ignore_errors=True)
    env = environment(workdir / "cache")
    reference = workdir / "uninterrupted"
    print(
        f"uninterrupted run: {a.steps} steps, a checkpoint every {a.checkpoint_every}, last {a.keep} kept", flush=True
    )
    run = watched_run(command(model, train, reference, a), reference, env, workdir / "uninterrupted.log", a)
    if run["rc"] != 0:
        sys.exit(f"error: the uninterrupted run failed (exit {run['rc']}); see {workdir / 'uninterrupted.log'}")
    figures = steady_figures(run, a)
    # the files outside step folders at the end (the final model: more than at any earlier moment), and keep + 1
    # checkpoints (a save before pruning); from the run's own sizes, never from how many folders it left
    steps_total = sum(disk_use(p)[0] for p in reference.glob("step_*") if p.is_dir())
    figures["disk_bound_mb"] = (
        disk_use(reference)[0] - steps_total + (a.keep + 1) * checkpoint_size(reference)
    ) / 2**20
    print(f"killed run: {a.kills} kills -9", flush=True)
    resumed = workdir / "killed"
    attempts = killed_series(command(model, train, resumed, a), resumed, env, workdir / "killed.log", a)
    checks = {
        "disk_bounded": figures["disk_mb_max"] <= figures["disk_bound_mb"] * 1.05,
        "step_folders_bounded": figures["step_folders_max"] <= a.keep + 1,
        "every_kill_killed": all(x["rc"] == -signal.SIGKILL for x in attempts[:-1]),
        "last_attempt_finished": attempts[-1]["rc"] == 0,
        **compare(reference, resumed),
    }
    return {"args": vars(a), "figures": figures, "attempts": attempts, "checks": checks}


def report(result: dict) -> bool:
    """Print the figures and checks; True when every check passed."""
    f, c = result["figures"], result["checks"]
    print(
        f"disk (without metrics.jsonl): max {f['disk_mb_max']:.2f} MB (bound {f['disk_bound_mb']:.2f}), "
        f"slope {f['disk_slope_mb_per_1000']:+.3f} MB/1000 steps; step folders at most {f['step_folders_max']}"
    )
    print(f"metrics.jsonl grows {f['metrics_log_kb_per_1000']:.0f} KB/1000 steps (the log, by design)")
    print(
        f"resident set: mean {f['rss_mb_mean']:.1f} MB, max {f['rss_mb_max']:.1f} MB, "
        f"slope {f['rss_slope_mb_per_1000']:+.2f} MB/1000 steps"
    )
    print(f"time per step: mean {f['step_ms_mean']:.1f} ms, slope {f['step_ms_slope_per_1000']:+.2f} ms/1000 steps "
          f"(uninterrupted run {f['seconds']:.0f} s)")  # fmt: skip
    for name, value in c.items():
        print(f"check {name}: {value}")
    return all(v for k, v in c.items() if k != "rows")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit status 1 when a check fails."""
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = soak(a, workdir)
    ok = report(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
