#!/usr/bin/env bash
# Start a real vLLM OpenAI server on loopback with the probe's SmolLM2-135M-Instruct, in the
# foreground (exec: signals reach vLLM itself; stop it by killing its process group).
#
#   scripts/vllm_serve.sh generate PORT [VLLM_ARGS...]   chat/completions, e.g.
#                                                        --served-model-name small large
#   scripts/vllm_serve.sh probe PORT [VLLM_ARGS...]      the remote probe's pooling server
#   scripts/vllm_serve.sh features PORT [VLLM_ARGS...]   the feature probe (the project's plugin)
#
# generate serves the converted bundled model (probes.model.model_dir); probe serves the folder
# probes.derived builds for layer $PROBE_LAYER (default 10) of $PROBE_MODEL (default the bundled
# SmolLM2) under the name the gateway's remote probe expects; features serves the folder
# `sparsity-router derive-probe $PROBE_CONFIG` builds (default config/examples/vllm-supervised.yaml:
# the supervised prompt recipe) with the plugin's pooling model. The vLLM venv is provisioned first
# when missing (scripts/vllm_venv.sh). $PYTHON is the project's Python (default: .venv's, else
# python3). float32: bfloat16 matmuls give garbage on some CPUs; the probe's numbers are float32.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:?usage: vllm_serve.sh generate|probe PORT [VLLM_ARGS...]}"
PORT="${2:?usage: vllm_serve.sh generate|probe PORT [VLLM_ARGS...]}"
shift 2
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${ROOT}/.venv/bin/python" ]]; then PYTHON="${ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
VLLM_PYTHON="$("${ROOT}/scripts/vllm_venv.sh")"
MODEL_SPEC="${PROBE_MODEL:-bundled:smollm2-135m-instruct}"

case "${MODE}" in
    generate)
        MODEL_DIR="$("${PYTHON}" -c 'import sys; from probes.model import model_dir; print(model_dir(sys.argv[1]))' "${MODEL_SPEC}")"
        MODE_ARGS=()
        ;;
    probe)
        LAYER="${PROBE_LAYER:-10}"
        MODEL_DIR="$("${PYTHON}" -m probes.derived --model "${MODEL_SPEC}" --layer "${LAYER}")"
        NAME="$(basename "${MODEL_DIR}")"   # = python -m probes.derived ... --name
        MODE_ARGS=(--served-model-name "${NAME}" --runner pooling --convert embed
            --pooler-config '{"pooling_type": "LAST", "use_activation": false}')
        ;;
    features)
        CONFIG="${PROBE_CONFIG:-${ROOT}/config/examples/vllm-supervised.yaml}"
        MODEL_DIR="$("${PYTHON}" -m cli.main derive-probe "${CONFIG}")"
        NAME="$(basename "${MODEL_DIR}")"   # = sparsity-router derive-probe CONFIG --name
        # MEAN pooling makes vLLM compute every prompt token (no prefix caching, no chunked
        # prefill): the plugin's pooler reads them all.
        MODE_ARGS=(--served-model-name "${NAME}" --runner pooling
            --no-enable-prefix-caching --no-enable-chunked-prefill
            --pooler-config '{"pooling_type": "MEAN", "use_activation": false}')
        ;;
    *)
        echo "unknown mode ${MODE}: use generate, probe or features" >&2
        exit 2
        ;;
esac

# A small KV cache (GiB) and context keep two servers within a laptop's memory; threads are
# not pinned so that servers sharing a machine do not pile onto one core.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
exec "${VLLM_PYTHON}" -m vllm.entrypoints.openai.api_server --model "${MODEL_DIR}" \
    --dtype float32 --max-model-len 2048 --host 127.0.0.1 --port "${PORT}" \
    "${MODE_ARGS[@]}" "$@"
