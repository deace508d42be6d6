# A cluster node image: CUDA PyTorch, DeepSpeed (CPU Adam prebuilt for --offload_optimizer), optional flash-attention,
# and this project. Build from the repository root:
#   docker build -t open-instruct-dpo .
#   docker build -t open-instruct-dpo --build-arg FLASH_ATTN=1 .      # also build flash-attention (slow)
# Run one node of a job (the launch scripts read NUM_NODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE):
#   docker run --gpus all --ipc=host --network=host -e NUM_NODES=4 -e NODE_RANK=0 -e MASTER_ADDR=node0 \
#       -v /data/hf:/root/.cache/huggingface open-instruct-dpo bash scripts/train/tulu3/dpo_8b.sh
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG FLASH_ATTN=0
# GPU architectures the compiled DeepSpeed ops and flash-attention target (A100, H100).
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    HF_HUB_ENABLE_HF_TRANSFER=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common git curl ca-certificates ninja-build build-essential libaio-dev pdsh openssh-client \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python${PYTHON_VERSION} python${PYTHON_VERSION}-dev python${PYTHON_VERSION}-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python${PYTHON_VERSION} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel \
    && pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"

WORKDIR /workspace/open_instruct_dpo
# Dependencies first (cached layer), then the code.
COPY pyproject.toml ./
RUN mkdir -p open_instruct && touch README.md \
    && pip install -e ".[dev]" hf_transfer \
    && rm -rf open_instruct README.md

# DeepSpeed's CPU Adam (used when the optimizer is offloaded) is compiled now rather than on every node at start-up.
# DS_ACCELERATOR: the build machine has no GPU, the nodes do.
RUN DS_ACCELERATOR=cuda DS_BUILD_CPU_ADAM=1 DS_BUILD_OPS=0 \
        pip install --force-reinstall --no-deps --no-build-isolation "deepspeed>=0.15"

RUN if [ "${FLASH_ATTN}" = "1" ]; then MAX_JOBS=8 pip install flash-attn --no-build-isolation; fi

COPY . .
RUN pip install --no-deps -e . && python -c "import open_instruct.dpo_tune_cache"

CMD ["bash"]
