"""The grammar of probe feature names, without torch.

A sparsity feature is one metric at one layer and position, ``L10.top10_energy.last`` (the last
prompt token) or ``L28.top1_energy.mean`` (the token mean); :func:`feature_value` reads one from a
:class:`~probes.types.ProbeResult`, which is how a fitted model is applied to a live request.

A pooled hidden vector is a block: ``L30.last`` is its key in ``ProbeResult.states`` and
``FeatureTable.states`` (:func:`state_block`), ``L30.state.last`` names the whole vector in a list
of features (:func:`parse_state_block`; :func:`expand_features` spells it out for a model of known
width), and ``L30.state.last.17`` is one coordinate (:func:`state_feature`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from probes.metric_names import sparsity
from probes.types import ProbeResult

__all__ = [
    "POSITIONS",
    "STATE",
    "expand_features",
    "feature_name",
    "feature_value",
    "is_state_feature",
    "parse_feature",
    "parse_state_block",
    "parse_state_feature",
    "state_block",
    "state_feature",
]

#: Where a feature is read: the last prompt token, or the mean over the prompt's tokens.
POSITIONS: Final = ("last", "mean")

#: The "metric" part of a hidden-vector coordinate's name: ``L30.state.last.17``.
STATE: Final = "state"


def feature_name(layer: int, metric: str, position: str) -> str:
    """``(10, "top10_energy", "last")`` -> ``"L10.top10_energy.last"``."""
    return f"L{layer}.{metric}.{position}"


def parse_feature(name: str) -> tuple[int, str, str]:
    """``"L10.top10_energy.last"`` -> ``(10, "top10_energy", "last")``; ValueError otherwise."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[0].startswith("L") or parts[2] not in POSITIONS:
        raise ValueError(
            f"feature {name!r} must look like 'L<layer>.<metric>.<last|mean>', "
            "e.g. 'L10.top10_energy.last'"
        )
    try:
        layer = int(parts[0][1:])
    except ValueError:
        raise ValueError(f"feature {name!r}: {parts[0]!r} is not L<layer number>") from None
    return layer, parts[1], parts[2]


def state_block(layer: int, position: str) -> str:
    """The key of one pooled vector in ``ProbeResult.states`` and ``FeatureTable.states``."""
    return f"L{layer}.{position}"


def state_feature(layer: int, position: str, index: int) -> str:
    """``(30, "last", 17)`` -> ``"L30.state.last.17"``: one coordinate of a pooled vector."""
    return f"L{layer}.{STATE}.{position}.{index}"


def is_state_feature(name: str) -> bool:
    """Whether ``name`` names a hidden-vector coordinate (``L30.state.last.17``)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[1] == STATE


def parse_state_feature(name: str) -> tuple[int, str, int]:
    """``"L30.state.mean.17"`` -> ``(30, "mean", 17)``; ValueError otherwise."""
    parts = name.split(".")
    ok = len(parts) == 4 and parts[0].startswith("L") and parts[1] == STATE
    if ok and parts[2] in POSITIONS and parts[0][1:].isdigit() and parts[3].isdigit():
        return int(parts[0][1:]), parts[2], int(parts[3])
    raise ValueError(
        f"feature {name!r} must look like 'L<layer>.state.<last|mean>.<index>', "
        "e.g. 'L30.state.last.17'"
    )


def parse_state_block(name: str) -> tuple[int, str] | None:
    """``"L30.state.last"`` (a whole hidden vector) -> ``(30, "last")``; None for other names."""
    parts = name.split(".")
    if len(parts) != 3 or parts[1] != STATE:
        return None
    layer, _, position = parse_feature(name)
    return layer, position


def expand_features(
    names: Sequence[str], width: int | Callable[[int, str], int]
) -> tuple[str, ...]:
    """``names`` with every block ``L<layer>.state.<position>`` spelled out coordinate by
    coordinate (``width`` of them, or ``width(layer, position)``); other names unchanged."""
    out: list[str] = []
    for name in names:
        block = parse_state_block(name)
        if block is None:
            out.append(name)
        else:
            n = width if isinstance(width, int) else width(*block)
            out.extend(state_feature(*block, i) for i in range(n))
    return tuple(out)


def feature_value(result: ProbeResult, layer: int, metric: str, position: str) -> float:
    """The oriented sparsity of one feature in a probe result (KeyError when not measured)."""
    table = result.metrics if position == "last" else result.metrics_mean
    if table is None:
        raise KeyError("token-mean metrics were not measured (set probe.token_mean: true)")
    return sparsity(metric, table[layer][metric])
