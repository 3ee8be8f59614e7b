"""Errors of the ``policies`` room, hung under the shared root in :mod:`probes.errors`::

    RouterError
    ├── ConfigError      the configuration file cannot be read, parsed or validated
    │                    (one line per problem: ``FILE:LINE: dotted.path: what is wrong``)
    └── PolicyError      the policy engine was asked something it cannot answer
                         (an unknown policy name, a threshold function that misbehaves)

Every message says what went wrong and, where it can, how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.errors import RouterError

__all__ = ["ConfigError", "ConfigProblem", "PolicyError"]


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem found in a configuration file.

    ``line`` and ``column`` are 1-based (``None`` when unknown); ``path`` is the dotted path of
    the offending node (``policies.default.rules[2].route``; empty for the top level).
    """

    source: str
    line: int | None
    message: str
    path: str = ""
    column: int | None = None

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(RouterError, ValueError):
    """A configuration file cannot be read, parsed or validated.

    ``str(error)`` has one line per problem; ``error.problems`` holds them as values.
    """

    def __init__(self, problems: ConfigProblem | list[ConfigProblem] | tuple[ConfigProblem, ...]):
        items = (problems,) if isinstance(problems, ConfigProblem) else tuple(problems)
        self.problems: tuple[ConfigProblem, ...] = items
        super().__init__("\n".join(str(p) for p in items))


class PolicyError(RouterError):
    """The policy engine was asked something it cannot answer (e.g. an unknown policy)."""
