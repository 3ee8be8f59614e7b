"""The exception tree shared by every room of sparsity-router.

``probes`` sits at the bottom of the dependency graph, so the root lives here and the
gateway (``router``) and ``policies`` extend it::

    RouterError                      every error we raise on purpose
    ├── ProbeError                   anything about measuring a request
    │   ├── ModelLoadError           the probe model could not be found or loaded
    │   ├── ProbeInputError          an input cannot be probed (empty, wrong type, bad file)
    │   └── CalibrationError         a calibration is malformed or does not fit the probe
    └── (router/policies add: ConfigError, PolicyError, UpstreamError, ...)

Every message says what went wrong and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ModelLoadError",
    "ProbeError",
    "ProbeInputError",
    "RouterError",
]


class RouterError(Exception):
    """Root of every error sparsity-router raises on purpose."""


class ProbeError(RouterError):
    """Measuring a request failed."""


class ModelLoadError(ProbeError):
    """The probe model could not be located or loaded."""


class ProbeInputError(ProbeError, ValueError):
    """An input cannot be probed (empty text, wrong shape, undecodable file line, bad layer)."""


class CalibrationError(ProbeError):
    """A calibration file is malformed, or was fitted for a different probe."""
