#!/usr/bin/env bash
# Reproduces allenai/OLMo-2-1124-13B-DPO (OLMo 2's DPO stage), ZeRO-3, built for 2 nodes x 8 GPUs (NUM_NODES=2).
# Where each value comes from (open-instruct's scripts/train/olmo2/dpo_13b.sh, which its docs/algorithms/dpo.md
# names for reproducing this model):
#   model     allenai/OLMo-2-1124-13B-SFT, its own tokenizer; OLMo 2 instruct is the tulu template behind a BOS
#             (--chat_template_name tulu --add_bos)
#   data      allenai/olmo-2-1124-13b-preference-mix, all of it, 2048 tokens
#   batch     global 128 pairs: 1 pair per device (there: 4 nodes x 8 GPUs x accumulation 4); derived here
#   optimizer lr 8e-7, linear decay, warmup ratio 0.1, weight decay 0, 1 epoch; loss dpo_norm, beta 5
#   seed      8 (that script)
#   kernels   Liger (our choice): --use_liger_kernel, the fused log-probs run as the output layer's
#             own forward (ZeRO-3 gathers it there); without CUDA one note: line and the chunked path, same values
#   [NUM_NODES=.. NODE_RANK=.. MASTER_ADDR=..] bash scripts/train/olmo2/dpo_13b.sh [extra flags]
# Pushes the final model to the Hub by default (--push_to_hub, needs HF_TOKEN); PUSH_TO_HUB=0 keeps it local.
# Same recipe as YAML: configs/train_configs/olmo2/dpo_13b.yaml. DRY_RUN=1 prints the command.
set -euo pipefail
DEFAULT_GPUS_PER_NODE=8
DEEPSPEED_CONFIG=configs/ds_configs/stage3_no_offloading_accelerate.conf
GLOBAL_BATCH_SIZE=128
PER_DEVICE_BATCH_SIZE=1
source "$(dirname "$0")/../launch.sh"
push_to_hub_by_default
GRAD_ACCUM=$(gradient_accumulation_steps)
MODEL=${MODEL:-allenai/OLMo-2-1124-13B-SFT}

launch_dpo \
    --exp_name olmo2_13b_dpo \
    --model_name_or_path "$MODEL" \
    --tokenizer_name_or_path "$MODEL" \
    --mixer_list allenai/olmo-2-1124-13b-preference-mix 1.0 \
    --chat_template_name tulu \
    --add_bos \
    --max_seq_length 2048 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate 8e-7 \
    --lr_scheduler_type linear \
    --warmup_ratio 0.1 \
    --weight_decay 0.0 \
    --num_epochs 1 \
    --loss_type dpo_norm \
    --beta 5 \
    --gradient_checkpointing \
    --use_liger_kernel \
    --logging_steps 1 \
    --seed 8 \
    --output_dir "${OUTPUT_DIR:-output/olmo2_13b_dpo}" \
    "${PUSH_FLAGS[@]}" "$@"
