"""Pooling a left-padded batch of hidden states into one vector per prompt.

The probe (:mod:`probes.probe`) and feature extraction (:mod:`probes.features`) both read a
prompt's hidden state at its last token and averaged over its tokens. The average leaves out each
prompt's first token, an attention sink with outsized activations (:func:`mean_weights`), unless
the prompt has only that one token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from probes.feature_names import state_block

__all__ = ["mean_weights", "pooled_states"]


def mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) weights averaging over real tokens, leaving out each row's first (sink) token.

    ``mask`` is the (B, T) attention mask of a left-padded batch (1 for real tokens).
    """
    m = mask.float()
    first = torch.zeros_like(m)
    first.scatter_(1, (mask == 0).sum(-1, keepdim=True).clamp_max(mask.shape[1] - 1), 1.0)
    keep = m - first
    single = keep.sum(-1, keepdim=True) == 0  # one-token prompts: use that token
    keep = torch.where(single, m, keep)
    return keep / keep.sum(-1, keepdim=True)


def pooled_states(
    states: Mapping[int, torch.Tensor], weights: torch.Tensor, layers: Iterable[int]
) -> dict[str, torch.Tensor]:
    """``{"L<layer>.last": (B, d), "L<layer>.mean": (B, d)}``: each layer's hidden vector at the
    last prompt token and averaged over tokens with ``weights`` (:func:`mean_weights`), float32."""
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        h = states[layer].float()
        out[state_block(layer, "last")] = h[:, -1, :]
        out[state_block(layer, "mean")] = (h * weights[..., None]).sum(1)
    return out
