"""What every section of the configuration schema shares: the strict base model, problem
locations (:data:`Loc`, :func:`format_loc`, :class:`SchemaProblems`) and small validators.

A location is relative to the model that raised it, so that :mod:`policies.loader` can join it
to the place pydantic reports and point at the offending line of the YAML file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

__all__ = [
    "NAME_PATTERN",
    "ConfigModel",
    "Loc",
    "Problem",
    "SchemaProblems",
    "as_tuple",
    "check_http_url",
    "check_redis_url",
    "format_loc",
    "is_env_name",
    "key_list",
    "known_names",
]

Loc = tuple[str | int, ...]
#: One cross-check failure: where (relative to the model that found it) and what.
Problem = tuple[Loc, str]

#: What names of backends, policies and experiments may look like.
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ENV_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigModel(BaseModel):
    """The base of every configuration model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def format_loc(loc: Loc) -> str:
    """``("policies", "default", "rules", 2, "route")`` -> ``policies.default.rules[2].route``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class SchemaProblems(ValueError):
    """Cross-check failures, each with its location relative to the model that raised it."""

    def __init__(self, problems: list[Problem]):
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(
            "\n".join(f"{format_loc(loc)}: {msg}" if loc else msg for loc, msg in self.problems)
        )


def known_names(names: Iterable[object]) -> str:
    """``b, a`` -> ``"a, b"``; ``"(none)"`` when there are none (for "known: ..." hints)."""
    return ", ".join(sorted(str(n) for n in names)) or "(none)"


def is_env_name(name: str) -> bool:
    """Whether ``name`` can be the name of an environment variable."""
    return _ENV_NAME.match(name) is not None


def as_tuple(value: Any) -> Any:
    """Let a single string stand for a one-element list."""
    return (value,) if isinstance(value, str) else value


def key_list(value: Any) -> Any:
    """A list of keys: one string stands for a list of one; entries stripped, empty ones (an
    unset ``${VAR:-}``) dropped."""
    value = as_tuple(value)
    if isinstance(value, list | tuple):
        return tuple(k.strip() if isinstance(k, str) else k for k in value if k != "")
    return value


def check_http_url(url: str) -> str:
    """``url`` unchanged when it is an http:// or https:// URL with a host; else ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url


def check_redis_url(url: str) -> str:
    """``url`` unchanged when it is a redis://, rediss:// or unix:// URL; else ValueError."""
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return url
