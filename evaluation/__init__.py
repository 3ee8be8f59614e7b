"""Offline evaluation: outcome data, routing metrics, baselines, cross-validated routers, the
supervised calibration's fitting and the A/B experiments report.

Reads what the gateway records (:mod:`router.events`), the configuration (:mod:`policies`) and
the probe (:mod:`probes`); nothing there imports this package.
"""

from __future__ import annotations

__all__: list[str] = []
