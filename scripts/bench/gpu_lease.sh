#!/usr/bin/env bash
# The GPU suite as one call on a short-lived GPU machine (a lease of minutes): the parts in order of value, each
# under its own time cap so one stuck part cannot eat the others, and the small results copied to DEST.
#   bash scripts/bench/gpu_lease.sh DEST [SUITE FLAGS]   # DEST: a folder that outlives the machine
#   bash scripts/bench/gpu_lease.sh /tmp/lease --tiny    # the same plumbing on CPU
# Needs the wheels of scripts/bench/gpu_wheels.sh in .whl/ when deepspeed, liger-kernel, datasets or trl are missing.
set -uo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:?usage: gpu_lease.sh DEST [SUITE FLAGS]}
shift
mkdir -p "$DEST"
nvidia-smi >"$DEST/nvidia-smi.txt" 2>&1
export PYTHONPATH="${GPU_SITE:-/tmp/gpu_suite_site}:${PYTHONPATH:-}"
bash scripts/bench/gpu_wheels.sh ensure || exit 3  # once here, not in each part's gpu_suite.sh
export PYTHONUNBUFFERED=1
suite() { timeout "$1" bash scripts/bench/gpu_suite.sh --only "$2" "${@:3}" 2>&1 | tee -a "$DEST/suite.log"; }
suite 420 train "$@"
suite 100 trl "$@"
suite 90 tests "$@"
out=gpu_suite_out
[[ " $* " == *" --tiny "* ]] && out=gpu_suite_tiny
cp "$out/suite.md" "$out/suite.json" "$DEST/"
cp "$out"/*/out/profile/top_ops_rank0.txt "$DEST/" 2>/dev/null
tar czf "$DEST/logs.tgz" "$out"/*.log "$out"/*/out/metrics.jsonl "$out"/*/child.json "$out"/*/out/*.txt 2>/dev/null
ls -la "$DEST"
