"""Preparing preference data at Tulu 3 scale: wall time and peak memory of preparation, and a training process's data
memory once the prepared cache exists.

    OMP_NUM_THREADS=1 python scripts/bench/bench_data_scale.py --sizes 10000 100000 --workers 1 2 [--sets hh multiturn]

Sets (written into a scratch folder; nothing is downloaded and nothing outside the repository is read):
- ``hh``: the shipped real HH-RLHF rows (tests/fixtures) repeated with a distinct ending per repeat, raw transcripts;
- ``multiturn``: synthetic Tulu-like pairs in the messages format, 1 to 4 turns, hundreds of tokens per side.
Tokenizer: a byte-level BPE with an 8,000-token vocabulary trained on the HH rows, Tulu chat template.

Preparation runs as a user runs it, ``dpo_tune_cache.py --cache_dataset_only`` in a fresh process and a fresh cache
folder; its peak memory: the largest process's peak RSS (``ru_maxrss``), and the summed RSS and PSS of the process and
its workers sampled every 50 ms (forked workers share pages: RSS counts them in each, PSS splits them).
The training-process figure loads the prepared cache in a fresh process as ``dpo_tune_cache.py`` does (prepare: a cache
hit, the reference fingerprint, the length-grouped sampler, 50 padded batches) and reports the RSS it added over the
same process with torch/transformers imported and the tokenizer loaded. ``--code_root`` measures another checkout (e.g.
the code before streaming) with the same data and tokenizer (``--workers`` must then be 1: the flag is passed only when
N > 1). Prints a Markdown table and one line per run; ``--json`` saves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.scale_data import hh_rows, write_hh_scaled, write_multiturn  # noqa: E402

TRAINING_PROBE = r"""
import json, sys, psutil
from open_instruct.config import TrainArguments
from open_instruct.data.prepare import prepare_preference_data
from open_instruct.data.sampler import pair_dataloader
try:
    from open_instruct.training.reference_cache import dataset_fingerprint
except ImportError:  # --code_root of a checkout from before the package layout (df0fd5e)
    from open_instruct.reference_cache import dataset_fingerprint
try:
    from open_instruct.settings import DataSettings
except ImportError:  # a checkout from before the settings objects: preparation takes the arguments
    DataSettings = None
from transformers import AutoTokenizer
def mem():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
before = mem()
args = TrainArguments(model_name_or_path="unused", mixer_list=[sys.argv[2], "1.0"], skip_invalid_rows=True,
                    max_seq_length=int(sys.argv[4]), dataset_local_cache_dir=sys.argv[3], per_device_train_batch_size=8)
data = prepare_preference_data(DataSettings.of(args) if DataSettings else args, tokenizer)
assert data.statistics["cache"]["status"] == "loaded"
fingerprint = dataset_fingerprint(data.records)
loader = pair_dataloader(data.records, tokenizer.pad_token_id, 8, seed=1, group_by_length=True)
for step, batch in enumerate(loader):
    if step == 50:
        break
after = mem()
print(json.dumps({"pairs": len(data.records), **{k: after[k] - before[k] for k in after}}))
"""


def _tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(summed RSS, summed PSS) of a process and its descendants: forked workers share pages, which RSS counts in
    every process and PSS splits between them."""
    rss = pss = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def _run_measured(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, dict[str, int], str]:
    """(wall seconds, CPU seconds of the process and its workers, peak memory in bytes: ``rss`` the largest single
    process's, ``tree_rss``/``tree_pss`` summed over the process tree, stdout) of one command."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        process, peak = psutil.Process(child.pid), {"tree_rss": 0, "tree_pss": 0}
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss, pss = _tree_memory(process)
                peak = {"tree_rss": max(peak["tree_rss"], rss), "tree_pss": max(peak["tree_pss"], pss)}
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        peak["rss"] = usage.ru_maxrss * 1024  # kB on Linux
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"failed ({child.returncode}): {' '.join(command)}\n{err.read()[-3000:]}")
        return wall, usage.ru_utime + usage.ru_stime, peak, out.read()


def _tokenizer(folder: Path) -> Path:
    from open_instruct.data.chat_templates import CHAT_TEMPLATES
    from tests.data_helpers import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([r[s] for r in hh_rows() for s in ("chosen", "rejected")], vocab_size=8000)
    tokenizer.chat_template = CHAT_TEMPLATES["tulu"]
    tokenizer.save_pretrained(folder)
    return folder


def _tokenizer_rss(code_root: Path, tokenizer: Path, env: dict[str, str]) -> int:
    """RSS of a process that imported the data stack and loaded the tokenizer: what preparation cannot avoid."""
    probe = (
        "import psutil, open_instruct.dpo_tune_cache, open_instruct.data.prepare; from transformers import "
        f"AutoTokenizer; AutoTokenizer.from_pretrained({str(tokenizer)!r}); print(psutil.Process().memory_info().rss)"
    )
    return int(subprocess.run([sys.executable, "-c", probe], cwd=code_root, env=env, capture_output=True,
                              text=True, check=True).stdout.split()[-1])  # fmt: skip


def main() -> None:
    """Run every (set, size, workers) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sets", nargs="+", default=["hh", "multiturn"], choices=["hh", "multiturn"])
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--code_root", type=Path, default=ROOT, help="the checkout whose preparation is measured")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args()
    work = ns.workdir or Path(tempfile.mkdtemp(prefix="bench_data_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ns.code_root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tokenizer = _tokenizer(work / "tokenizer")
    base_rss = _tokenizer_rss(ns.code_root, tokenizer, env)
    print(f"code: {ns.code_root}; {os.cpu_count()} CPUs; load average at start {os.getloadavg()}")
    print(f"process with the data stack imported and the tokenizer loaded: {base_rss / 2**20:.0f} MiB RSS")
    results = []
    for set_name in ns.sets:
        for size in ns.sizes:
            data = work / f"{set_name}_{size}.jsonl"
            (write_hh_scaled if set_name == "hh" else write_multiturn)(data, size)
            for workers in ns.workers:
                cache, out = work / f"cache_{set_name}_{size}_{workers}", work / "out"
                shutil.rmtree(cache, ignore_errors=True)
                command = [sys.executable, "-m", "open_instruct.dpo_tune_cache", "--tokenizer_name_or_path",
                           str(tokenizer), "--mixer_list", str(data), "1.0", "--skip_invalid_rows",
                           "--max_seq_length", str(ns.max_seq_length), "--cache_dataset_only",
                           "--dataset_local_cache_dir", str(cache), "--output_dir", str(out)]  # fmt: skip
                if workers > 1:
                    command += ["--preprocessing_num_workers", str(workers)]
                load = os.getloadavg()[0]
                wall, cpu, peak, _ = _run_measured(command, ns.code_root, env)
                stats = json.loads((out / "dataset_statistics.json").read_text())
                probe = [sys.executable, "-c", TRAINING_PROBE, str(tokenizer), str(data), str(cache),
                         str(ns.max_seq_length)]  # fmt: skip
                _, _, _, probe_out = _run_measured(probe, ns.code_root, env)
                train = json.loads(probe_out.strip().splitlines()[-1])
                row = {
                    "set": set_name,
                    "pairs": size,
                    "kept": stats["kept"],
                    "workers": workers,
                    "wall_s": round(wall, 1),
                    "peak_rss_mib": round(peak["rss"] / 2**20),
                    "peak_tree_rss_mib": round(peak["tree_rss"] / 2**20),
                    "peak_tree_pss_mib": round(peak["tree_pss"] / 2**20),
                    "pairs_per_s": round(size / wall),
                    "cpu_s": round(cpu, 1),
                    "pairs_per_cpu_s": round(size / cpu),
                    "train_data_rss_mib": round(train["VmRSS"] / 2**20, 1),
                    "train_data_anon_mib": round(train["RssAnon"] / 2**20, 1),
                    "load_before": round(load, 1),
                    "file_mib": round(data.stat().st_size / 2**20),
                    "cache_mib": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20),
                }
                results.append(row)
                print(
                    f"{set_name} {size} pairs ({row['file_mib']} MiB JSONL), {workers} worker(s): prepared in "
                    f"{row['wall_s']} s ({row['pairs_per_s']} pairs/s; {row['cpu_s']} CPU s, {row['pairs_per_cpu_s']} pairs per "
                    f"CPU-second), peak RSS {row['peak_rss_mib']} MiB (largest process; all processes: "
                    f"RSS {row['peak_tree_rss_mib']}, PSS {row['peak_tree_pss_mib']} MiB); "
                    f"training process +{row['train_data_rss_mib']} MiB RSS for the data "
                    f"({row['train_data_anon_mib']} MiB anonymous); load average {row['load_before']}",
                    flush=True,
                )
                shutil.rmtree(cache, ignore_errors=True)
            data.unlink()
    print(
        "\n| set | pairs | workers | prep wall s | prep CPU s | pairs per CPU-s | prep peak RSS MiB (largest process) "
        "| prep peak PSS MiB (all processes) | training data RSS MiB (anon) | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['set']} | {r['pairs']:,} | {r['workers']} | {r['wall_s']} | {r['cpu_s']} | {r['pairs_per_cpu_s']} "
            f"| {r['peak_rss_mib']} | {r['peak_tree_pss_mib']} | {r['train_data_rss_mib']} ({r['train_data_anon_mib']}) | {r['load_before']} |"
        )
    print(f"\nload average at the end {os.getloadavg()}")
    if ns.json:
        ns.json.write_text(json.dumps({"tokenizer_process_rss": base_rss, "runs": results}, indent=2))
    if ns.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
