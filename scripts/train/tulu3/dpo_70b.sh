#!/usr/bin/env bash
# Tulu 3 70B DPO: Llama-3.1-Tulu-3-70B-SFT on the Tulu 3 70B preference mixture, ZeRO-3, built for 16 nodes x 8 GPUs.
# Hyperparameters of the Tulu 3 recipe: dpo_norm, beta 5, lr 2e-7 linear, warmup 0.1, 2048 tokens, 1 epoch,
# 1 pair per device and a global batch of 128 pairs (accumulation 1 on 128 GPUs; derived, so any node count works).
#   NUM_NODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0> bash scripts/train/tulu3/dpo_70b.sh [extra flags]
# Same recipe as YAML: configs/train_configs/tulu3/dpo_70b.yaml. DRY_RUN=1 prints the command.
set -euo pipefail
DEFAULT_GPUS_PER_NODE=8
DEEPSPEED_CONFIG=configs/ds_configs/stage3_no_offloading_accelerate.conf
GLOBAL_BATCH_SIZE=128
PER_DEVICE_BATCH_SIZE=1
source "$(dirname "$0")/../launch.sh"
GRAD_ACCUM=$(gradient_accumulation_steps)
MODEL=${MODEL:-allenai/Llama-3.1-Tulu-3-70B-SFT}

launch_dpo \
    --exp_name tulu3_70b_dpo \
    --model_name_or_path "$MODEL" \
    --tokenizer_name_or_path "$MODEL" \
    --mixer_list allenai/llama-3.1-tulu-3-70b-preference-mixture 1.0 \
    --chat_template_name tulu \
    --max_seq_length 2048 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate 2e-7 \
    --lr_scheduler_type linear \
    --warmup_ratio 0.1 \
    --weight_decay 0.0 \
    --num_epochs 1 \
    --loss_type dpo_norm \
    --beta 5 \
    --gradient_checkpointing \
    --logging_steps 1 \
    --seed 123 \
    --output_dir "${OUTPUT_DIR:-output/tulu3_70b_dpo}" \
    "$@"
