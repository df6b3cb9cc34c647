# syntax=docker/dockerfile:1
# A worker for NVIDIA GPUs: vLLM 0.27.1's own CUDA image (its torch, CUDA and vLLM), with
# charter and the pinned TRL stack on top. It claims jobs and runs each in its own process;
# the policy's vLLM server runs inside it, the judge is a separate server (compose.yaml).
#   docker build -f docker/worker-gpu.Dockerfile -t charter-worker-gpu .
FROM vllm/vllm-openai:v0.27.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY charter ./charter
COPY examples ./examples
# The gpu extra pins vllm==0.27.1, which the base image already has: pip keeps its torch.
# DL3013 (pin versions) is met by pyproject.toml, which pins every dependency with ==.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir '.[gpu,postgres]' \
    && useradd --create-home --uid 10001 charter \
    && mkdir -p /data \
    && chown charter /data

USER 10001
ENV CHARTER_HOME=/data \
    HF_HOME=/data/hf
HEALTHCHECK NONE
ENTRYPOINT ["charter"]
CMD ["worker"]
