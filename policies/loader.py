"""YAML -> :class:`~policies.schema.Settings`, with environment interpolation and errors that
point at the offending line. What each key means: ``docs/configuration.md`` (generated from the
schema by :mod:`policies.reference`).

Interpolation applies to every scalar *value* (not to keys) before validation:

``${VAR}``
    the value of ``VAR``; an error naming the variable and the YAML path when it is unset.
``${VAR:-default}``
    the value of ``VAR``, or ``default`` when it is unset or empty.
``$${``
    a literal ``${``.

The project's own variables are named ``SPARSITY_ROUTER_*``. For one release a reference to one
of them that is unset falls back to its old name (:data:`DEPRECATED_ALIASES`), with one
deprecation WARNING per old name per load. ``SPARSITY_ROUTER_CONFIG`` names the config file
used when a command is given none (:func:`resolve_config_path`).

The result is a string; validation converts it where a number or a boolean is expected
(``port: ${PORT:-8080}``).

Every problem becomes one line of the :class:`~policies.errors.ConfigError` message::

    config.yaml:12: policies.default.rules[2].route: unknown backend 'lage'; known: large, small
    config.yaml:4:9: YAML syntax error: mapping values are not allowed here
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policies.errors import ConfigError, ConfigProblem
from policies.schema import Loc, SchemaProblems, Settings, format_loc

__all__ = [
    "CONFIG_ENV",
    "DEPRECATED_ALIASES",
    "default_config_path",
    "env_value",
    "interpolate",
    "load_settings",
    "parse_settings",
    "resolve_config_path",
]

logger = logging.getLogger(__name__)

#: The variable naming the config file when a command is given none.
CONFIG_ENV = "SPARSITY_ROUTER_CONFIG"

#: New variable name -> the old names still read (in this order) when it is unset. Drop after
#: one release.
DEPRECATED_ALIASES: Mapping[str, tuple[str, ...]] = {
    "SPARSITY_ROUTER_API_KEY": ("ROUTER_API_KEY",),
    "SPARSITY_ROUTER_REVIEWER_KEY": ("ROUTER_REVIEWER_KEY",),
    "SPARSITY_ROUTER_ADMIN_KEY": ("ROUTER_ADMIN_KEY",),
    "SPARSITY_ROUTER_HOST": ("ROUTER_HOST",),
    "SPARSITY_ROUTER_PORT": ("ROUTER_PORT",),
    "SPARSITY_ROUTER_EVENTS_PATH": ("ROUTER_EVENTS_PATH", "EVENTS_PATH"),
    "SPARSITY_ROUTER_SMALL_URLS": ("SMALL_URLS", "SMALL_URL"),
    "SPARSITY_ROUTER_LARGE_URLS": ("LARGE_URLS", "LARGE_URL", "LARGE_BASE_URL"),
    "SPARSITY_ROUTER_LARGE_MODEL": ("LARGE_MODEL",),
    "SPARSITY_ROUTER_LARGE_API_KEY": ("LARGE_API_KEY",),
    "SPARSITY_ROUTER_REDIS_URL": ("REDIS_URL",),
    "SPARSITY_ROUTER_PROBE_URL": ("PROBE_URL",),
    "SPARSITY_ROUTER_CALIBRATION_PATH": ("CALIBRATION_PATH",),
    "SPARSITY_ROUTER_ANSWER_CALIBRATION_PATH": ("ANSWER_CALIBRATION_PATH",),
}

#: Old names :func:`env_value` has warned about in this process.
_WARNED: set[str] = set()

_STR_TAG = "tag:yaml.org,2002:str"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def default_config_path() -> Path:
    """``config/default.yaml`` of this source tree (the embedded default configuration)."""
    return Path(__file__).resolve().parent.parent / "config" / "default.yaml"


def resolve_config_path(
    given: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None = None
) -> Path:
    """The config file a command uses: ``given``, else ``$SPARSITY_ROUTER_CONFIG`` when set and
    not empty, else the embedded :func:`default_config_path`."""
    if given:
        return Path(given)
    named = (os.environ if env is None else env).get(CONFIG_ENV, "").strip()
    return Path(named).expanduser() if named else default_config_path()


def _lookup(name: str, env: Mapping[str, str], used: set[tuple[str, str]] | None) -> str | None:
    """``env[name]``, or the value of its first deprecated alias that is set (noted in
    ``used`` as ``(old, new)``)."""
    found = env.get(name)
    if found is not None:
        return found
    for old in DEPRECATED_ALIASES.get(name, ()):
        value = env.get(old)
        if value is not None:
            if used is not None:
                used.add((old, name))
            return value
    return None


def _warn_deprecated(old: str, new: str) -> None:
    logger.warning(
        "environment variable %s is deprecated and will stop being read in the next release: "
        "rename it to %s",
        old,
        new,
    )


def env_value(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The variable ``name`` (``os.environ`` by default), or its deprecated alias's value (see
    :data:`DEPRECATED_ALIASES`; one WARNING per old name per process); None when unset."""
    used: set[tuple[str, str]] = set()
    value = _lookup(name, os.environ if env is None else env, used)
    for old, new in used:
        if old not in _WARNED:
            _WARNED.add(old)
            _warn_deprecated(old, new)
    return value


def load_settings(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> Settings:
    """Read, interpolate and validate a YAML config file.

    Relative paths inside it (``calibration.path``) resolve against its folder. ``env``
    defaults to ``os.environ``. Raises :class:`ConfigError`.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(ConfigProblem(source, None, "config file not found")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            ConfigProblem(source, None, f"cannot read the config file: {exc}")
        ) from None
    return parse_settings(text, source_name=source, base_dir=Path(source).resolve().parent, env=env)


def parse_settings(
    text: str,
    source_name: str = "<string>",
    base_dir: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Parse, interpolate and validate YAML text; ``source_name`` prefixes error lines.

    ``base_dir`` is where relative paths resolve (None: the working directory at use).
    Raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_syntax_problem(source_name, exc, text)) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML parse error is marked
        raise ConfigError(ConfigProblem(source_name, None, f"YAML syntax error: {exc}")) from None

    if root is None:
        raise ConfigError(
            ConfigProblem(
                source_name, 1, "the file is empty: it needs at least backends and policies"
            )
        )
    problems = _check_keys(source_name, root, ())
    used: set[tuple[str, str]] = set()
    problems += _interpolate_nodes(source_name, root, (), env, used)
    for old, new in sorted(used):
        _warn_deprecated(old, new)
    if problems:
        raise ConfigError(problems)
    if not isinstance(root, MappingNode):
        raise ConfigError(
            ConfigProblem(
                source_name,
                _line(root),
                "the top level must be a mapping of sections (server, probe, backends, "
                f"policies, ...), not {_kind(root)}",
            )
        )
    data = _construct(root)
    try:
        return Settings.model_validate(
            data, context={"base_dir": None if base_dir is None else Path(base_dir)}
        )
    except ValidationError as exc:
        raise ConfigError(_validation_problems(source_name, root, data, exc)) from None


# -- interpolation ----------------------------------------------------------------------------


def interpolate(
    value: str, env: Mapping[str, str], *, aliases_used: set[tuple[str, str]] | None = None
) -> tuple[str, list[str]]:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in ``value``.

    An unset ``VAR`` with a set deprecated alias (:data:`DEPRECATED_ALIASES`) takes the alias's
    value; ``aliases_used`` collects those ``(old, new)`` pairs. Returns the expanded string and
    the problems found (unset variables, malformed references).
    """
    problems: list[str] = []
    out: list[str] = []
    i = 0
    while True:
        j = value.find("${", i)
        if j < 0:
            out.append(value[i:])
            break
        if j > 0 and value[j - 1] == "$":  # $${ -> literal ${
            out.append(value[i : j - 1] + "${")
            i = j + 2
            continue
        out.append(value[i:j])
        m = _REF.match(value, j)
        if m is None or "${" in (m.group(2) or ""):
            end = value.find("}", j)
            ref = value[j : end + 1] if end >= 0 else value[j:]
            problems.append(
                f"malformed reference {ref!r}: write ${{NAME}} or ${{NAME:-default}} "
                "(and $${ for a literal ${)"
            )
            out.append(ref)
            i = j + len(ref)
            continue
        name, default = m.group(1), m.group(2)
        found = _lookup(name, env, aliases_used)
        if default is not None:
            out.append(found if found else default)
        elif found is not None:
            out.append(found)
        else:
            problems.append(
                f"environment variable {name} is not set (write ${{{name}:-default}} to give "
                "a default)"
            )
        i = m.end()
    return "".join(out), problems


def _interpolate_nodes(
    source: str,
    node: Node,
    path: Loc,
    env: Mapping[str, str],
    used: set[tuple[str, str]],
    seen: set[int] | None = None,
) -> list[ConfigProblem]:
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already handled
        return []
    seen.add(id(node))
    problems: list[ConfigProblem] = []
    if isinstance(node, ScalarNode):
        if node.tag == _STR_TAG and "${" in node.value:
            node.value, errors = interpolate(node.value, env, aliases_used=used)
            problems += [ConfigProblem(source, _line(node), e, format_loc(path)) for e in errors]
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            problems += _interpolate_nodes(source, value, (*path, _key_text(key)), env, used, seen)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            problems += _interpolate_nodes(source, item, (*path, i), env, used, seen)
    return problems


def _check_keys(
    source: str, node: Node, path: Loc, seen: set[int] | None = None
) -> list[ConfigProblem]:
    """Duplicate keys (PyYAML would keep the last one silently) and non-scalar keys."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return []
    seen.add(id(node))
    problems: list[ConfigProblem] = []
    if isinstance(node, MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            text = _key_text(key)
            if not isinstance(key, ScalarNode):
                problems.append(
                    ConfigProblem(source, _line(key), "keys must be plain names", format_loc(path))
                )
            elif key.tag == "tag:yaml.org,2002:merge":
                pass
            elif text in first:
                problems.append(
                    ConfigProblem(
                        source,
                        _line(key),
                        f"duplicate key {text!r} (first at line {first[text]})",
                        format_loc(path),
                    )
                )
            else:
                first[text] = _line(key)
            problems += _check_keys(source, value, (*path, text), seen)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            problems += _check_keys(source, item, (*path, i), seen)
    return problems


def _construct(root: Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


# -- error rendering ---------------------------------------------------------------------------


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _key_text(key: Node) -> str:
    return str(key.value) if isinstance(key, ScalarNode) else "?"


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return f"the scalar {node.value!r}"


def _syntax_problem(source: str, exc: yaml.MarkedYAMLError, text: str) -> ConfigProblem:
    mark = exc.problem_mark or exc.context_mark
    message = exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:
        context = exc.context
        if exc.context_mark is not None:
            context += f" at line {exc.context_mark.line + 1}"
        message += f" ({context})"
    line = None if mark is None else mark.line + 1
    column = None if mark is None else mark.column + 1
    lines = text.splitlines()
    if line is not None and line <= len(lines) and "${" in lines[line - 1]:
        message += "; inside [ ] or { } quote values that use ${...}: ['${URL}']"
    return ConfigProblem(source, line, f"YAML syntax error: {message}", column=column)


def _locate(root: Node, data: Any, loc: Loc) -> tuple[Loc, int]:
    """Map a pydantic location to (path as the user wrote it, line of the deepest node found).

    Discriminated-union tags that pydantic inserts (``backends.large.openai.model``) are
    dropped. Segments below a scalar (a bare backend name coerced to ``{route: NAME}``) are
    dropped too; segments below a missing key (a default value) are kept.
    """
    node: Node | None = root
    line = _line(root)
    path: list[str | int] = []
    for seg in loc:
        if isinstance(data, Mapping) and data.get("type") == seg and seg not in data:
            continue  # the union tag pydantic puts in the location
        if node is None:
            path.append(seg)
            continue
        if isinstance(node, ScalarNode):
            break
        path.append(seg)
        child: Node | None = None
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if _key_text(key) == str(seg):
                    child, line = value, _line(key)
                    break
        elif isinstance(node, SequenceNode) and isinstance(seg, int) and 0 <= seg < len(node.value):
            child = node.value[seg]
            line = _line(child)
        node = child
        data = _child(data, seg)
    return tuple(path), line


def _child(data: Any, seg: str | int) -> Any:
    if isinstance(data, Mapping):
        return data.get(seg)
    if isinstance(data, list) and isinstance(seg, int) and 0 <= seg < len(data):
        return data[seg]
    return None


def _model_at(data: Any, loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that validates the node at ``loc`` (to list its allowed keys)."""
    annotation: Any = Settings
    for seg in loc:
        model = _as_model(annotation, data)
        if model is not None:
            if seg not in model.model_fields:
                if isinstance(data, Mapping) and data.get("type") == seg:
                    continue  # union tag
                return None
            annotation = model.model_fields[seg].annotation
        else:
            annotation = _container_item(annotation)
            if annotation is None:
                return None
        data = _child(data, seg)
    return _as_model(annotation, data)


def _as_model(annotation: Any, data: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) == 1:
        return models[0]
    tag = data.get("type") if isinstance(data, Mapping) else None
    for model in models:
        field = model.model_fields.get("type")
        if field is not None and tag in get_args(field.annotation):
            return model
    return None


def _flatten(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    if not args or get_origin(annotation) in (dict, list, tuple):
        return [annotation]
    return [x for a in args for x in _flatten(a)]


def _container_item(annotation: Any) -> Any:
    for candidate in _flatten(annotation):
        origin, args = get_origin(candidate), get_args(candidate)
        if origin is dict and len(args) == 2:
            return args[1]
        if origin in (list, tuple) and args:
            return args[0]
    return None


def _describe_input(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _readable(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    msg = str(error["msg"])
    given = _describe_input(error.get("input"))
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping (key: value lines), got {given}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {given}"
    if kind in ("string_type",):
        return f"expected a string, got {given}"
    if kind == "union_tag_not_found":
        return "missing key 'type' (one of: human, local, openai)"
    if kind == "union_tag_invalid":
        tags = str(error.get("ctx", {}).get("expected_tags", "")).replace("'", "")
        return (
            f"unknown type {error['ctx']['tag']!r} (allowed: {', '.join(sorted(tags.split(', ')))})"
        )
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "assertion_error":
        return msg.removeprefix("Assertion failed, ")
    msg = re.sub(r"^(Input|List|Tuple|Dictionary|String|Value) should", "must", msg)
    if kind in ("too_short", "too_long"):
        return msg.replace(" after validation", "")
    return f"{msg}, got {given}"


def _validation_problems(
    source: str, root: Node, data: Any, exc: ValidationError
) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        ctx_error = error.get("ctx", {}).get("error")
        if isinstance(ctx_error, SchemaProblems):
            for sub_loc, message in ctx_error.problems:
                problems.append(_problem(source, root, data, (*loc, *sub_loc), message))
            continue
        kind = error["type"]
        if kind in ("missing", "extra_forbidden") and loc:
            parent, key = loc[:-1], loc[-1]
            if kind == "missing":
                message = f"missing required key {key!r}"
                problems.append(_problem(source, root, data, parent, message))
            else:
                model = _model_at(data, parent)
                allowed = f" (allowed: {', '.join(sorted(model.model_fields))})" if model else ""
                message = f"unknown key {key!r}{allowed}"
                path, line = _locate(root, data, loc)
                problems.append(ConfigProblem(source, line, message, format_loc(path[:-1])))
            continue
        problems.append(_problem(source, root, data, loc, _readable(error)))
    problems.sort(key=lambda p: (p.line or 0, p.path))
    return problems


def _problem(source: str, root: Node, data: Any, loc: Loc, message: str) -> ConfigProblem:
    path, line = _locate(root, data, loc)
    return ConfigProblem(source, line, message, format_loc(path))
