"""The gateway labels its own traffic: shadow calls to the other backend of a small/large pair
and a judge (or a known reference answer) saying whether the large answer was better.

- :mod:`router.labelling.labeller`: sampling on the request path, the bounded queue, the rate
  limit and token budget, and the worker task that writes :class:`~router.events.LabelEvent`
  records;
- :mod:`router.labelling.judge`: the pairwise judge prompt, verdict parsing, combining the two
  position-swapped verdicts;
- :mod:`router.labelling.reference`: labels from an expected answer the request carries.

Configured by the ``labelling:`` section (:mod:`policies.schema.labelling`); docs/learning.md
describes what is sampled, the budgets, the prompt and the privacy settings.
"""

from __future__ import annotations

from router.labelling.labeller import LabelCapture, LabelJob, Labeller

__all__ = ["LabelCapture", "LabelJob", "Labeller"]
