# Shared by the launch scripts (sourced, not run): starts open_instruct/dpo_tune_cache.py on this node of a
# NUM_NODES-node job with accelerate's standard multi-node launcher and DeepSpeed (or FSDP2: ENGINE=fsdp2).
#
# Environment (defaults: one node):
#   NUM_NODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   GPUS_PER_NODE  (the GPUs nvidia-smi lists, else $DEFAULT_GPUS_PER_NODE set by the script)
#   DEEPSPEED_CONFIG (set by the script: a configs/ds_configs file; empty: no DeepSpeed)   MIXED_PRECISION (bf16)
#   ENGINE         deepspeed (the script's DEEPSPEED_CONFIG) or fsdp2 (configs/accelerate_configs/fsdp2.yaml: FSDP2 per
#                  decoder layer; add --fsdp_shard_degree GPUS_PER_NODE at the end for HSDP across nodes)
#   DRY_RUN=1      print the command instead of running it
#   PUSH_TO_HUB=0  keep the model local: the reproduction scripts push it to the Hub by default (push_to_hub_by_default)
#   PLAN=1         run the recipe's --dry_run for this cluster instead: check every input, print memory per GPU and
#                  time (no weights loaded, no GPU touched, nothing written); PLAN_GPU names the GPU (default H100-80GB)
# The script sets GLOBAL_BATCH_SIZE and PER_DEVICE_BATCH_SIZE; gradient accumulation is derived so the global batch
# stays the same on any number of nodes (an error when it does not divide evenly).

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
ENGINE=${ENGINE:-deepspeed}
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=${DEFAULT_GPUS_PER_NODE:-8}
fi
NUM_PROCESSES=$((NUM_NODES * GPUS_PER_NODE))

# Accumulation steps that make PER_DEVICE_BATCH_SIZE x steps x NUM_PROCESSES equal GLOBAL_BATCH_SIZE.
gradient_accumulation_steps() {
    local per_step=$((PER_DEVICE_BATCH_SIZE * NUM_PROCESSES))
    if [ $((GLOBAL_BATCH_SIZE % per_step)) -ne 0 ]; then
        echo "error: global batch $GLOBAL_BATCH_SIZE is not a multiple of $PER_DEVICE_BATCH_SIZE per device x" \
             "$NUM_PROCESSES processes ($NUM_NODES nodes x $GPUS_PER_NODE GPUs)" >&2
        return 1
    fi
    echo $((GLOBAL_BATCH_SIZE / per_step))
}

# push_to_hub_by_default: PUSH_FLAGS=(--push_to_hub) unless PUSH_TO_HUB=0, and one stderr line saying so. A reproduction
# is for keeping: its model goes to the Hub (owner: --hf_entity or the token's user; the token from HF_TOKEN or
# `hf auth login`, checked before any work). Debug and CPU scripts do not call this: they stay offline.
push_to_hub_by_default() {
    PUSH_FLAGS=()
    case "${PUSH_TO_HUB:-1}" in
        0) return 0 ;;
        1) ;;
        *) echo "error: PUSH_TO_HUB must be 0 or 1, got '$PUSH_TO_HUB'" >&2; return 2 ;;
    esac
    PUSH_FLAGS=(--push_to_hub)
    echo "note: the final model goes to the Hugging Face Hub (--push_to_hub); PUSH_TO_HUB=0 bash $0 to keep the model local" >&2
}

# launch_dpo FLAG... : run (or, with DRY_RUN=1, print) the accelerate command with these recipe flags.
launch_dpo() {
    local cmd=(accelerate launch
        --mixed_precision "$MIXED_PRECISION"
        --num_machines "$NUM_NODES"
        --machine_rank "$NODE_RANK"
        --num_processes "$NUM_PROCESSES"
        --main_process_ip "$MASTER_ADDR"
        --main_process_port "$MASTER_PORT")
    if [ "$ENGINE" = fsdp2 ]; then
        cmd+=(--config_file configs/accelerate_configs/fsdp2.yaml)
    elif [ "$ENGINE" != deepspeed ]; then
        echo "error: ENGINE must be deepspeed or fsdp2, got '$ENGINE'" >&2
        return 2
    elif [ -n "${DEEPSPEED_CONFIG:-}" ]; then  # empty: plain accelerate (one GPU)
        cmd+=(--use_deepspeed --deepspeed_config_file "$DEEPSPEED_CONFIG" --deepspeed_multinode_launcher standard)
    fi
    cmd+=(open_instruct/dpo_tune_cache.py "$@")
    if [ "${PLAN:-0}" = 1 ]; then  # the same recipe and engine, planned in one process for the whole cluster
        local plan=(python open_instruct/dpo_tune_cache.py --dry_run --dry_run_gpu "${PLAN_GPU:-H100-80GB}"
            --dry_run_num_nodes "$NUM_NODES" --dry_run_num_processes "$NUM_PROCESSES"
            --mixed_precision "$MIXED_PRECISION")
        if [ "$ENGINE" = fsdp2 ]; then
            plan+=(--fsdp)
        elif [ -n "${DEEPSPEED_CONFIG:-}" ]; then
            plan+=(--deepspeed_config "$DEEPSPEED_CONFIG")
        fi
        "${plan[@]}" "$@"
        return
    fi
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    "${cmd[@]}"
}
