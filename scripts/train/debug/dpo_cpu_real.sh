#!/usr/bin/env bash
# The real-model demo (make demo-real): SmolLM2-135M-Instruct (make real-model) trained with DPO on 48 real HH-RLHF
# pairs on CPU. Prints the held-out preference accuracy and one greedy answer before and after, and the training
# pairs' reward accuracy (48 pairs barely move a held-out accuracy; the training pairs show that DPO learned).
set -euo pipefail
cd "$(dirname "$0")/../../.."
MODEL=${REAL_MODEL_DIR:-models/SmolLM2-135M-Instruct}
DEMO_DIR=${DEMO_DIR:-.demo_real}
OUTPUT_DIR=${OUTPUT_DIR:-$DEMO_DIR/output}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
export REFERENCE_LOGPROBS_CACHE_PATH=${REFERENCE_LOGPROBS_CACHE_PATH:-$DEMO_DIR/reference_cache}
[ -f "$MODEL/config.json" ] || { echo "error: $MODEL: no model there; run make real-model" >&2; exit 2; }
start=$(date +%s)
cmd=(python open_instruct/dpo_tune_cache.py
    --exp_name dpo_cpu_real_demo
    --model_name_or_path "$MODEL"
    --mixer_list "$DEMO_DIR/data/train.jsonl" 1.0
    --max_seq_length 512
    --per_device_train_batch_size 8
    --gradient_accumulation_steps 1
    --learning_rate 1e-5
    --lr_scheduler_type linear
    --warmup_ratio 0.1
    --num_epochs 2
    --loss_type dpo_norm
    --beta 5
    --logging_steps 1
    --seed 1
    --output_dir "$OUTPUT_DIR"
    --dataset_local_cache_dir "$DEMO_DIR/dataset_cache"
    --sample_prompts "$DEMO_DIR/data/prompts.txt"
    --sample_max_new_tokens 40
    "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
python scripts/real_model/demo_tools.py split "$DEMO_DIR/data"
python -m open_instruct.evaluate --model_name_or_path "$MODEL" --data "$DEMO_DIR/data/test.jsonl" \
    --label "held-out preference accuracy before DPO"
"${cmd[@]}"
python -m open_instruct.evaluate --model_name_or_path "$OUTPUT_DIR" --data "$DEMO_DIR/data/test.jsonl" \
    --label "held-out preference accuracy after DPO"
python scripts/real_model/demo_tools.py rewards "$OUTPUT_DIR"
echo "demo wall time: $(( $(date +%s) - start ))s"
