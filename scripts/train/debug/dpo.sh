#!/usr/bin/env bash
# Debug run on one GPU: OLMo 2 1B SFT, 512 pairs of the Tulu 3 preference mixture, no DeepSpeed, a few minutes.
# GPU twin of scripts/train/debug/dpo_cpu.sh. DRY_RUN=1 prints the command.
# Same recipe as YAML: configs/train_configs/debug/dpo.yaml.
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-}
GLOBAL_BATCH_SIZE=16
PER_DEVICE_BATCH_SIZE=4
source "$(dirname "$0")/../launch.sh"
GRAD_ACCUM=$(gradient_accumulation_steps)
MODEL=${MODEL:-allenai/OLMo-2-0425-1B-SFT}

launch_dpo \
    --exp_name debug_dpo_1b \
    --model_name_or_path "$MODEL" \
    --mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 512 \
    --add_bos \
    --max_seq_length 1024 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate 5e-7 \
    --lr_scheduler_type linear \
    --warmup_ratio 0.1 \
    --num_epochs 1 \
    --loss_type dpo_norm \
    --beta 5 \
    --logging_steps 1 \
    --seed 123 \
    --output_dir "${OUTPUT_DIR:-output/debug_dpo_1b}" \
    "$@"
