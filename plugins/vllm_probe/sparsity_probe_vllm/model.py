"""The feature probe as a vLLM pooling model: every feature of a :class:`FeatureLayout` from one
prefill.

:class:`SparsityProbeForFeatures` is the source Llama model (cut after the deepest layer read,
see ``probes/derived.py``) whose forward returns, per token, the hidden states of every layer the
layout reads side by side: decoder layer ``i``'s output is the residual stream after it (vLLM's
``hidden_states + residual``, what transformers reports as ``hidden_states[i]``), layer 0 the
embeddings, and the source's last layer is read after the final norm, as the local probe reads
it. :class:`FeaturePooler` then takes each finished prompt's rows and computes what the gateway's
local probe computes, with the same code (``probes.feature_vector.feature_vectors``, on
``probes.metrics`` and ``probes.pooling``): metrics at the last token, metrics averaged over
tokens, and pooled vectors, laid out as ``probes.served.FeatureLayout`` says.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

import torch

try:
    from probes.feature_vector import feature_vectors
    from probes.served import CONFIG_KEY, FEATURE_ARCHITECTURE, FeatureLayout
except ImportError as exc:  # pragma: no cover - a deployment error, said plainly
    raise ImportError(
        "sparsity_probe_vllm needs the sparsity-router checkout's `probes` package: start vLLM "
        "with PYTHONPATH=/path/to/sparsity-router (scripts/vllm_serve.sh does)"
    ) from exc
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler.abstract import Pooler
from vllm.model_executor.models.adapters import as_embedding_model
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.tasks import PoolingTask
from vllm.v1.pool.metadata import PoolingMetadata

from sparsity_probe_vllm import ARCHITECTURE

__all__ = ["FeaturePooler", "SparsityProbeForFeatures", "layout_of"]

if ARCHITECTURE != FEATURE_ARCHITECTURE:  # pragma: no cover - plugin and checkout disagree
    raise ImportError(
        f"plugin architecture {ARCHITECTURE!r} != the checkout's {FEATURE_ARCHITECTURE!r}: "
        "reinstall the plugin from this checkout (scripts/vllm_venv.sh)"
    )


def layout_of(vllm_config: VllmConfig) -> FeatureLayout:
    """The layout recorded in the served folder's config.json."""
    hf_config = vllm_config.model_config.hf_config
    raw = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(raw, dict):
        raise ValueError(
            f"{FEATURE_ARCHITECTURE} needs `{CONFIG_KEY}` in config.json: serve a folder built "
            "by `python -m probes.derived --layers ...` (or sparsity-router derive-probe)"
        )
    return FeatureLayout.from_json(raw)


class FeaturePooler(Pooler):
    """Per finished prompt: the layout's features from its rows of captured hidden states."""

    def __init__(self, layout: FeatureLayout) -> None:
        super().__init__()
        self.layout = layout

    def get_supported_tasks(self) -> Set[PoolingTask]:
        return {"embed"}

    def forward(
        self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata
    ) -> list[torch.Tensor]:
        cursor = pooling_metadata.get_pooling_cursor()
        if cursor.is_partial_prefill():
            raise RuntimeError(
                f"{FEATURE_ARCHITECTURE} needs whole prompts in one step: start vLLM without "
                "chunked prefill and prefix caching (--no-enable-chunked-prefill "
                "--no-enable-prefix-caching), as scripts/vllm_serve.sh features does"
            )
        lengths = cursor.num_scheduled_tokens_cpu.tolist()
        layout = self.layout
        h = hidden_states.float().reshape(
            hidden_states.shape[0], len(layout.captured), layout.hidden_size
        )
        states = {layer: h[:, i, :] for i, layer in enumerate(layout.captured)}
        return list(feature_vectors(layout, states, lengths).unbind(0))


class SparsityProbeForFeatures(as_embedding_model(LlamaForCausalLM)):  # type: ignore[misc]
    """A Llama probe model whose pooling output is a :class:`FeatureLayout`'s vector."""

    # MEAN by default: vLLM then turns off chunked prefill and prefix caching, so every
    # prompt token is computed in one step (the pooler needs them all).
    default_seq_pooling_type = "MEAN"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
        layout = layout_of(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.layout = layout
        n_here = int(vllm_config.model_config.hf_config.num_hidden_layers)
        # The source's last layer is read after the final norm (the model's own output); every
        # other captured layer is an auxiliary hidden state (residual stream after the layer).
        self._final = layout.source_layers if n_here == layout.source_layers else None
        self._aux = tuple(layer for layer in layout.captured if layer != self._final)
        self.model._set_aux_hidden_state_layers(self._aux)

    def _init_pooler(self, vllm_config: VllmConfig, prefix: str = "") -> Pooler:
        return FeaturePooler(layout_of(vllm_config))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        final, aux = out if isinstance(out, tuple) else (out, [])
        if len(aux) != len(self._aux):
            raise RuntimeError(
                f"captured {len(aux)} hidden states, expected {len(self._aux)} "
                f"(layers {self._aux}): this vLLM's Llama model does not report them"
            )
        by_layer = dict(zip(self._aux, aux, strict=True))
        if self._final is not None:
            by_layer[self._final] = final
        return torch.cat([by_layer[layer] for layer in self.layout.captured], dim=-1)
