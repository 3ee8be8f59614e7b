"""Feature vectors from hidden states, as a feature probe serves them.

:func:`feature_vectors` is what the vLLM plugin's pooler (``plugins/vllm_probe``) runs on the
prompts a step finished, with the local probe's own code (:func:`probes.metrics.compute_all`,
and the token weights of :func:`probes.pooling.mean_weights`: every token but the first, unless
it is the only one), so that :meth:`probes.served.FeatureLayout.unpack` of a row equals what
:class:`probes.probe.SparsityProbe` reports for the same prompt. All prompts of a step are
computed together: one metric pass over their tokens, then per-prompt sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from probes.metrics import compute_all
from probes.served import FeatureLayout

__all__ = ["feature_vector", "feature_vectors"]


def feature_vectors(
    layout: FeatureLayout, states: Mapping[int, torch.Tensor], lengths: Sequence[int]
) -> torch.Tensor:
    """``states[layer]``: the (N, d) hidden states at each captured layer (layer ``n`` after the
    final norm) of prompts laid end to end, ``lengths`` tokens each (summing to N); returns
    their (len(lengths), layout.width) vectors, float32."""
    first = next(iter(states.values()))
    device = first.device
    n_seq = len(lengths)
    sizes = torch.tensor(list(lengths), dtype=torch.long, device=device)
    ends = sizes.cumsum(0)
    starts = ends - sizes
    segment = torch.repeat_interleave(torch.arange(n_seq, device=device), sizes)
    # mean weights: 1/(T-1) for every token but each prompt's first; a one-token prompt: 1
    kept = (sizes - 1).clamp_min(1).float()
    weights = (1.0 / kept)[segment]
    weights[starts[sizes > 1]] = 0.0
    last = ends - 1
    stacked = torch.stack([states[layer].float() for layer in layout.layers], dim=1)  # (N, L, d)
    values = compute_all(stacked, layout.metrics)  # name -> (N, L)
    table = torch.stack([values[name] for name in layout.metrics], dim=-1)  # (N, L, M)
    parts = [table[last].reshape(n_seq, -1)]
    if layout.token_mean:
        means = table.new_zeros((n_seq, *table.shape[1:]))
        means.index_add_(0, segment, table * weights[:, None, None])
        parts.append(means.reshape(n_seq, -1))
    for layer in layout.state_layers:
        state = states[layer].float()
        parts.append(state[last])
        pooled = state.new_zeros((n_seq, state.shape[-1]))
        pooled.index_add_(0, segment, state * weights[:, None])
        parts.append(pooled)
    return torch.cat(parts, dim=1)


def feature_vector(layout: FeatureLayout, states: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """One prompt's vector from its (T, d) states per captured layer."""
    n_tokens = next(iter(states.values())).shape[0]
    return feature_vectors(layout, states, [n_tokens])[0]
