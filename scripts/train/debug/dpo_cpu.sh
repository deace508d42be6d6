#!/usr/bin/env bash
# CPU twin of scripts/train/debug/dpo.sh: trains the embedded tiny model on the synthetic preference task.
# Builds the model and data under $DEMO_DIR (default .demo/) the first time; prints held-out accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DEMO_DIR=${DEMO_DIR:-.demo}
OUTPUT_DIR=${OUTPUT_DIR:-$DEMO_DIR/output}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export REFERENCE_LOGPROBS_CACHE_PATH=${REFERENCE_LOGPROBS_CACHE_PATH:-$DEMO_DIR/reference_cache}
start=$(date +%s)
cmd=(python open_instruct/dpo_tune_cache.py
    --exp_name dpo_cpu_demo
    --model_name_or_path "$DEMO_DIR/model"
    --mixer_list "$DEMO_DIR/data/train.jsonl" 1.0
    --max_seq_length 64
    --per_device_train_batch_size 16
    --gradient_accumulation_steps 1
    --learning_rate 1e-3
    --lr_scheduler_type linear
    --warmup_ratio 0.05
    --num_epochs 3
    --loss_type dpo_norm
    --beta 5
    --logging_steps 100
    --seed 1
    --output_dir "$OUTPUT_DIR"
    --dataset_local_cache_dir "$DEMO_DIR/dataset_cache"
    "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
# PLAN=1: the plan only (checks, memory, time); needs $DEMO_DIR/model/config.json and the data, writes nothing.
if [ "${PLAN:-0}" = 1 ]; then exec "${cmd[@]}" --dry_run; fi
[ -f "$DEMO_DIR/model/config.json" ] || python -m open_instruct.data.synthetic "$DEMO_DIR"
python -m open_instruct.evaluate --model_name_or_path "$DEMO_DIR/model" --data "$DEMO_DIR/data/test.jsonl" \
    --label "held-out preference accuracy before DPO"
"${cmd[@]}"
python -m open_instruct.evaluate --model_name_or_path "$OUTPUT_DIR" --data "$DEMO_DIR/data/test.jsonl" \
    --label "held-out preference accuracy after DPO"
echo "demo wall time: $(( $(date +%s) - start ))s"
