"""The ``labelling:`` section: the gateway labels a sample of its own traffic.

For a sampled share of the requests one backend of the ``small``/``large`` pair answered, the
gateway asks the other backend the same request (a *shadow* call, after the client has its
answer) and a ``judge`` backend which answer is better, or checks both answers against a known
answer carried by the request (``reference``). The labels become event records (kind ``label``)
that ``sparsity-router learn`` reads; docs/learning.md describes it all. Whether the named
backends exist, and the ``events`` section that stores the labels, is the root's cross-check
(:mod:`policies.schema.checks`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from policies.schema.common import ConfigModel, Problem, SchemaProblems, as_tuple

__all__ = ["LabellingSettings", "ReferenceSettings"]


class ReferenceSettings(ConfigModel):
    """Tasks with a known answer: the request body carries the expected answer (e.g. in
    ``metadata.reference``), and both answers are checked against it without a judge call."""

    field: str = Field(
        "metadata.reference",
        min_length=1,
        description="dotted path of the expected answer in the request body (e.g. "
        "metadata.reference); a request without it is judged instead",
    )
    extract: Literal["last_number", "choice_letter", "exact"] = Field(
        "last_number",
        description="how an answer is compared with the expected one: last_number (the last "
        "number in the text, numerically), choice_letter (the chosen letter A-J of a multiple "
        "choice), exact (the whole text, case and surrounding whitespace ignored)",
    )


class LabellingSettings(ConfigModel):
    """Collect labels from live traffic: shadow calls to the backend that did not answer, and a
    judge (or a reference answer) deciding whether the large backend's answer was better.

    Off by default. The request path only samples and queues (never adding latency or
    failures); one background worker makes the shadow and judge calls, within
    ``max_shadow_per_s`` and ``daily_token_budget``. Labels are stored through the ``events``
    sink (kind ``label``), so labelling needs an ``events`` section. Changing this section
    needs a restart.
    """

    enabled: bool = Field(False, description="collect labels; false: no shadow or judge calls")
    sample: float = Field(
        0.02, ge=0.0, le=1.0, description="share of the eligible requests that are labelled"
    )
    policies: tuple[str, ...] = Field(
        (), description="label only requests routed by these policies; empty: every policy"
    )
    models: tuple[str, ...] = Field(
        (),
        description="label only requests for these (virtual) models; empty: every model",
    )
    small: str = Field(
        "small",
        description="the small backend of the pair: a request it answered is shadowed on large",
    )
    large: str = Field(
        "large",
        description="the large backend of the pair: a request it answered is shadowed on small",
    )
    judge: str | None = Field(
        None,
        description="the backend that compares the two answers (any configured backend); "
        "required when enabled",
    )
    judge_max_tokens: int = Field(
        512, ge=1, description="max_tokens of each judge call (its reasoning plus the verdict)"
    )
    max_shadow_per_s: float = Field(
        1.0,
        gt=0,
        description="shadow calls per second at most (a token bucket with a burst of "
        "max(1, this)); a job over the rate is dropped",
    )
    daily_token_budget: int | None = Field(
        1_000_000,
        ge=1,
        description="tokens (prompt + completion, from the upstreams' usage) that shadow and "
        "judge calls may spend per UTC day; once spent, jobs are dropped until UTC midnight; "
        "null: no limit",
    )
    queue: int = Field(
        100, ge=1, description="jobs waiting for the worker at most; a full queue drops the job"
    )
    store_text: bool = Field(
        False,
        description="keep the prompt, both answers and the judge's full verdict texts in the "
        "label records (after redact); false: only the numbers and the verdict markers",
    )
    retention_s: float = Field(
        2_592_000.0,
        gt=0,
        description="labels older than this are deleted from a sqlite events sink (at most "
        "once a minute); jsonl files are append-only and keep them",
    )
    redact: tuple[str, ...] = Field(
        (),
        description="regular expressions (Python syntax); every match in the stored prompt, "
        "answers and verdicts is replaced by [REDACTED]",
    )
    reference: ReferenceSettings | None = Field(
        None,
        description="label requests that carry a known answer by checking both answers "
        "against it, without a judge call; null: always judge",
    )

    @field_validator("policies", "models", "redact", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return as_tuple(v)

    @model_validator(mode="after")
    def _check_regexes(self) -> LabellingSettings:
        problems: list[Problem] = []
        for i, pattern in enumerate(self.redact):
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(
                    (("redact", i), f"not a valid regular expression ({exc}): {pattern!r}")
                )
        if problems:
            raise SchemaProblems(problems)
        return self
