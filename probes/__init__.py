"""Probe model, sparsity metrics and calibration: the measurement sparsity-router routes on.

Knows torch and transformers; knows nothing of HTTP or YAML.
"""

from __future__ import annotations

__all__: list[str] = []
