#!/usr/bin/env bash
# Create (once) a separate, cached virtual environment with LiteLLM's proxy for
# bench/proxy_overhead.py, and print the path of its `litellm` executable.
#
#   bench/litellm_venv.sh [VENV_DIR]     (default: ~/.cache/sparsity-router/venv-litellm)
#
# LiteLLM pulls in many dependencies that must not enter the project's .venv, hence its own
# venv. Packages come from PyPI only (pip's default index). Set LITELLM_SPEC to pin a version,
# e.g. LITELLM_SPEC='litellm[proxy]==1.55.0'. Re-running with the venv in place does nothing.
set -euo pipefail

VENV="${1:-${HOME}/.cache/sparsity-router/venv-litellm}"
SPEC="${LITELLM_SPEC:-litellm[proxy]}"
# httptools: uvicorn's fast HTTP parser, as the gateway uses; litellm[proxy] does not pull it.
EXTRA="${LITELLM_EXTRA-httptools}"
PYTHON="${PYTHON:-python3}"
STAMP="${VENV}/.installed"

if [[ ! -f "${STAMP}" ]]; then
    mkdir -p "$(dirname "${VENV}")"
    test -x "${VENV}/bin/python" || "${PYTHON}" -m venv "${VENV}"
    "${VENV}/bin/python" -m pip install --quiet --upgrade pip >&2
    "${VENV}/bin/python" -m pip install --quiet "${SPEC}" ${EXTRA} >&2
    "${VENV}/bin/python" -c 'import litellm.proxy.proxy_server' >&2
    touch "${STAMP}"
fi
echo "${VENV}/bin/litellm"
