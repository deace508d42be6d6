#!/usr/bin/env bash
# Does a change keep training the same on a GPU? The same short DPO runs (the CUDA default layout, Liger, padded
# batches, FSDP2 on one process) with this checkout and with an older tree, their per-step metrics compared; then the
# GPU tests. For a refactor that must not change behaviour.
#   git archive REV open_instruct | (mkdir -p .gpu_base && tar -x -C .gpu_base)    # here: the older tree
#   bash scripts/bench/gpu_same_as.sh .gpu_base OUT_DIR                             # there (carry .gpu_base, .whl)
# Writes OUT_DIR/same_as.md (a table: run, steps, largest loss difference, tokens/s of each) and each run's log.
set -uo pipefail
cd "$(dirname "$0")/../.."
BASE=${1:?usage: gpu_same_as.sh OLDER_TREE OUT_DIR}
OUT=${2:?usage: gpu_same_as.sh OLDER_TREE OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="${GPU_SITE:-/tmp/gpu_suite_site}:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export REFERENCE_LOGPROBS_CACHE_PATH=/tmp/same_as/reference_cache HF_HUB_OFFLINE=1
bash scripts/bench/gpu_wheels.sh ensure || exit 3
WORK=/tmp/same_as
python -m open_instruct.data.synthetic "$WORK/task" --n_train 512 --n_test 64 >/dev/null || exit 4
common=(--model_name_or_path "$WORK/task/model" --mixer_list "$WORK/task/data/train.jsonl" 1.0
        --max_seq_length 64 --per_device_train_batch_size 16 --learning_rate 1e-3 --max_train_steps 12
        --mixed_precision bf16 --seed 1 --logging_steps 1 --dataset_local_cache_dir "$WORK/dataset_cache")
declare -A RUNS=(
    [default]=""
    [liger]="--use_liger_kernel"
    [padded]="--packing false"
    [fsdp2]="--fsdp --use_liger_kernel"
)
for name in default liger padded fsdp2; do
    for side in base head; do
        entry=open_instruct/dpo_tune_cache.py
        [ "$side" = base ] && entry="$BASE/open_instruct/dpo_tune_cache.py"
        # shellcheck disable=SC2086  # the run's flags split on spaces
        timeout 150 python "$entry" "${common[@]}" ${RUNS[$name]} --output_dir "$WORK/$name-$side" \
            >"$OUT/$name-$side.log" 2>&1
        echo "$name $side: exit $?"
    done
done
python - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def rows(run):
    path = work / run / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in lines if "train_loss" in r]
table = ["| run | steps (base, head) | largest train_loss difference | tokens/s base | tokens/s head |", "|---|---|---|---|---|"]
for name in ("default", "liger", "padded", "fsdp2"):
    base, head = rows(f"{name}-base"), rows(f"{name}-head")
    diff = max((abs(a["train_loss"] - b["train_loss"]) for a, b in zip(base, head)), default=float("nan"))
    speed = lambda r: r[-1].get("perf/tokens_per_second_avg", float("nan")) if r else float("nan")
    table.append(f"| {name} | {len(base)}, {len(head)} | {diff:.3g} | {speed(base):,.0f} | {speed(head):,.0f} |")
(out / "same_as.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
EOF
timeout 120 python -m pytest -q -m gpu -rs tests/model/test_gpu_paths.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
