"""The ``sparsity-router`` command line: :mod:`cli.main` builds the parser from one module per
command; shared options live in :mod:`cli.options`.

Imports nothing heavy: torch and transformers load only in the handlers that run the probe.
"""

from __future__ import annotations

__all__: list[str] = []
