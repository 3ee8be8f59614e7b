"""Probe model, sparsity metrics and calibration: the measurement sparsity-router routes on.

Knows nothing of HTTP or YAML. Only measuring needs torch and transformers
(:mod:`probes.probe`, :mod:`probes.metrics`, :mod:`probes.model`, :mod:`probes.pooling`,
:mod:`probes.features`); the values that cross into the gateway and the policies import without
them: :mod:`probes.types` (settings, inputs, results, fingerprint), :mod:`probes.metric_names`,
:mod:`probes.feature_names`, :mod:`probes.feature_table`, :mod:`probes.catalog`,
:mod:`probes.cache`, :mod:`probes.errors`, :mod:`probes.answers`, and the fitted models that
read results (:mod:`probes.calibration`, :mod:`probes.supervised`, :mod:`probes.neighbours`).
"""

from __future__ import annotations

__all__: list[str] = []
