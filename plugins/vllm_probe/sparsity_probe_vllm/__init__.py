"""vLLM plugin of sparsity-router: registers the feature probe's pooling architecture.

vLLM calls :func:`register` in every process it starts (the ``vllm.general_plugins`` entry
point). The model class is registered by name and imported lazily, when a served folder's
``config.json`` asks for it.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURE", "register"]

#: Must equal probes.served.FEATURE_ARCHITECTURE (checked by the model module at import).
ARCHITECTURE = "SparsityProbeForFeatures"


def register() -> None:
    """Register :class:`sparsity_probe_vllm.model.SparsityProbeForFeatures` with vLLM."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "sparsity_probe_vllm.model:" + ARCHITECTURE)
