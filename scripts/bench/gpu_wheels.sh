#!/usr/bin/env bash
# Wheels for a GPU box that has its own torch (and must keep it) but no deepspeed, liger-kernel, datasets or trl,
# and no network. Two steps:
#   here, with PyPI:      bash scripts/bench/gpu_wheels.sh download     # fills .whl/ (git-ignored), ~15 MB
#   there, offline:       bash scripts/bench/gpu_wheels.sh install      # into $GPU_SITE (default /tmp/gpu_suite_site)
#                         export PYTHONPATH=/tmp/gpu_suite_site:$PYTHONPATH
#   or:                   bash scripts/bench/gpu_wheels.sh ensure       # install only when a package is missing and
#                                                                       # .whl/ has wheels (the suite's scripts)
# `install` never touches torch: --no-deps --target installs only these wheels beside the machine's own packages.
# Versions are the ones this project is tested with (pyproject / the dev venv); the GPU image is Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${WHEELS:-.whl}
SITE=${GPU_SITE:-/tmp/gpu_suite_site}
PY=${PYTHON:-python3}
# What the GPU image lacks (its package list: the device README's KINDS.md), and what those need that it also lacks.
PACKAGES=(liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
          hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
          typing-extensions==4.16.0)
DEEPSPEED=deepspeed==0.19.8

case "${1:-}" in
download)
    mkdir -p "$WHEELS"
    for package in "${PACKAGES[@]}"; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$package"
    done
    # DeepSpeed publishes no wheel: build a pure-Python one (its C++/CUDA ops compile just in time, if ever used).
    DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$DEEPSPEED"
    ls -la "$WHEELS"
    ;;
ensure)
    # PYTHONPATH must already name $SITE, so that a second call finds the first one's install.
    if ! $PY -c "import deepspeed, liger_kernel, datasets, trl" >/dev/null 2>&1 && compgen -G "$WHEELS/*.whl" >/dev/null; then
        exec bash "$0" install
    fi
    ;;
install)
    ls "$WHEELS"/*.whl >/dev/null
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    echo "installed into $SITE; use: export PYTHONPATH=$SITE:\$PYTHONPATH"
    ;;
*)
    echo "usage: $0 download|install|ensure" >&2
    exit 2
    ;;
esac
