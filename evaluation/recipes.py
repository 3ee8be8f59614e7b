"""The supervised router's default recipes: which probe features it reads, and where its
nearest-neighbour votes look.

- The *prompt recipe* (:func:`supervised_features`, :func:`neighbour_blocks`): sparsity metrics
  over the last third of the layers, the last layer's hidden vectors, and a vote on the token
  mean at 40% of the depth (plus one at 60% from :data:`SECOND_VOTE_FROM` labelled prompts on).
- The *answer recipe* (:func:`answer_features`), when the probe reads the prompt plus the small
  model's answer (a cascade's check): layers 2 to 40% of the depth, that layer's vectors, one
  vote there.

:func:`default_recipe` picks one. The choices are measured in bench/results/routing_eval.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from probes.feature_names import STATE

__all__ = [
    "SECOND_VOTE_FROM",
    "SUPERVISED_FEATURES",
    "Recipe",
    "answer_features",
    "answer_layer",
    "answer_sparsity_features",
    "default_recipe",
    "neighbour_blocks",
    "neighbour_layers",
    "sparsity_features",
    "supervised_features",
]

_RECIPE_METRICS: Final = ("top1_energy", "top10_energy", "effective_rank", "gini", "outlier_frac")


def sparsity_features(n_layers: int) -> tuple[str, ...]:
    """The sparsity part of the recipe for a model of ``n_layers`` layers (chosen in
    bench/results/routing_eval.md): the last third of the layers (20-30 of 30), five metrics,
    last token and token mean."""
    return _metric_features(range(max(1, math.ceil(2 * n_layers / 3)), n_layers + 1))


def _metric_features(layers: range) -> tuple[str, ...]:
    """The recipe's five metrics at ``layers``, last token then token mean."""
    return tuple(
        f"L{layer}.{metric}.{pos}"
        for pos in ("last", "mean")
        for layer in layers
        for metric in _RECIPE_METRICS
    )


def supervised_features(n_layers: int) -> tuple[str, ...]:
    """The supervised router's default probe features: :func:`sparsity_features` plus the
    probe's hidden vectors at its last layer, last token and token mean (blocks, spelled out by
    :func:`probes.feature_names.expand_features`); bench/results/routing_eval.md, follow-up 2."""
    return (
        *sparsity_features(n_layers),
        f"L{n_layers}.{STATE}.last",
        f"L{n_layers}.{STATE}.mean",
    )


#: The recipe for the bundled 30-layer probe model.
SUPERVISED_FEATURES: tuple[str, ...] = supervised_features(30)


def answer_layer(n_layers: int) -> int:
    """The deepest layer the answer recipe reads: 40% of the depth (12 of 30)."""
    return max(1, round(0.4 * n_layers))


def answer_sparsity_features(n_layers: int) -> tuple[str, ...]:
    """The sparsity part of the answer recipe: layers 2 to :func:`answer_layer`, five metrics,
    last token and token mean."""
    top = answer_layer(n_layers)
    return _metric_features(range(min(2, top), top + 1))


def answer_features(n_layers: int) -> tuple[str, ...]:
    """The default recipe when the probe reads the prompt plus the small model's answer (a
    cascade's check): :func:`answer_sparsity_features` and the hidden vectors at
    :func:`answer_layer`. On RouteLLM's GSM8K it beats the prompt recipe read on the same
    conversations, 0.774-0.785 against 0.724-0.739 APGR over three fold splits, and the probe's
    forward pass stops at 40% of the depth (bench/results/routing_eval.md, follow-up 7)."""
    top = answer_layer(n_layers)
    return (*answer_sparsity_features(n_layers), f"L{top}.{STATE}.last", f"L{top}.{STATE}.mean")


@dataclass(frozen=True, slots=True)
class Recipe:
    """The default supervised recipe for what the probe reads: the sparsity features, the
    regression's features (those plus hidden vectors) and the neighbour votes' blocks."""

    sparsity: tuple[str, ...]
    features: tuple[str, ...]
    votes: tuple[str, ...]


def default_recipe(n_layers: int, n_labelled: int | None, *, answers: bool) -> Recipe:
    """The prompt recipe (:func:`supervised_features`, :func:`neighbour_blocks`), or with
    ``answers`` the answer recipe (:func:`answer_features`, one vote at :func:`answer_layer`)."""
    if answers:
        vote = f"L{answer_layer(n_layers)}.{STATE}.mean"
        return Recipe(answer_sparsity_features(n_layers), answer_features(n_layers), (vote,))
    return Recipe(
        sparsity_features(n_layers),
        supervised_features(n_layers),
        neighbour_blocks(n_layers, n_labelled),
    )


#: Labelled prompts from which the default stacks a second neighbour vote (see
#: :func:`neighbour_blocks`).
SECOND_VOTE_FROM: Final = 2500


def neighbour_blocks(n_layers: int, n_labelled: int | None = None) -> tuple[str, ...]:
    """The hidden vectors the default neighbour votes compare, for ``n_labelled`` labelled
    prompts (None: every block the default may use): the token mean at 40% of the depth (layer
    12 of 30), and from :data:`SECOND_VOTE_FROM` labelled prompts on also the one at 60% (layer
    18). bench/routing_states.py found layer 12 the best single vote of 6, 12, 18, 24, 30; the
    second vote adds on MMLU with 3,000 labelled prompts and more (+0.004 to +0.016 APGR), and
    costs a little with 1,319 (GSM8K) and 2,000 (bench/results/routing_eval.md, follow-up 6)."""
    return tuple(f"L{layer}.{STATE}.mean" for layer in neighbour_layers(n_layers, n_labelled))


def neighbour_layers(n_layers: int, n_labelled: int | None = None) -> tuple[int, ...]:
    """The layers of :func:`neighbour_blocks`."""
    shares = (0.4,) if n_labelled is not None and n_labelled < SECOND_VOTE_FROM else (0.4, 0.6)
    return tuple(dict.fromkeys(max(1, round(f * n_layers)) for f in shares))
