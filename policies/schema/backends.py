"""The ``backends:`` section: name -> an ``openai``, ``local`` or ``human`` backend.

Each backend may name ``fallback`` backends that answer, in order, when it fails or times
out; cycles and unknown names are rejected by the root's cross-checks
(:mod:`policies.schema.checks`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from policies.schema.common import (
    ConfigModel,
    SchemaProblems,
    as_tuple,
    check_http_url,
    is_env_name,
)

__all__ = [
    "CAPABILITIES",
    "Backend",
    "Backoff",
    "Breaker",
    "Capability",
    "HumanBackend",
    "LocalBackend",
    "OpenAIBackend",
    "Price",
    "RoutableBackend",
    "Timeouts",
]

_FALLBACK = "backends that answer, in order, when this one fails or times out"

#: What a request may need of a backend: ``tools`` (a non-empty ``tools`` or ``functions``),
#: ``vision`` (an ``image_url`` or ``input_image`` part), ``json`` (``response_format`` of type
#: ``json_object`` or ``json_schema``).
Capability = Literal["tools", "vision", "json"]
CAPABILITIES: tuple[Capability, ...] = ("tools", "vision", "json")
_CAPABILITIES = (
    "what the backend can serve, of tools, vision and json; a request needing one it lacks "
    "goes to the first backend of its chain that has it (else a 400)"
)


def _capabilities(v: Any) -> Any:
    """One name or a list; repeats dropped."""
    v = as_tuple(v)
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
        return tuple(dict.fromkeys(v))
    return v


class RoutableBackend(ConfigModel):
    """What every backend type reads the same way: its ``fallback`` chain and its
    ``capabilities``, each given as one name or a list (each type declares the fields)."""

    @field_validator("fallback", mode="before", check_fields=False)
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return as_tuple(v)

    @field_validator("capabilities", mode="before", check_fields=False)
    @classmethod
    def _capability_list(cls, v: Any) -> Any:
        return _capabilities(v)


class Timeouts(ConfigModel):
    """Deadlines for one upstream request, in seconds."""

    connect_s: float = Field(5.0, gt=0, description="opening a connection")
    read_s: float = Field(60.0, gt=0, description="longest gap between two chunks")
    total_s: float = Field(600.0, gt=0, description="whole upstream request")


class Backoff(ConfigModel):
    """The wait before retrying a replica that failed without a ``retry-after``: exponential
    with full jitter, uniform in ``[0, min(max_s, base_s * 2**n)]`` for its n-th retry (n from
    0), never past the backend's ``timeouts.total_s``."""

    base_s: float = Field(0.1, gt=0, description="the first retry's longest wait")
    max_s: float = Field(2.0, gt=0, description="no retry waits longer than this")

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.max_s < self.base_s:
            raise SchemaProblems(
                [(("max_s",), f"must be at least base_s ({self.base_s:g}), got {self.max_s:g}")]
            )
        return self


class Breaker(ConfigModel):
    """A circuit breaker per replica: after ``failures`` failed tries in a row (connect
    errors, timeouts, statuses of ``retry_on``) the replica is skipped, with no connection
    attempted, for ``cooldown_s``; then one trial request goes through: its success closes the
    breaker, its failure skips the replica for another ``cooldown_s``. A backend whose every
    replica is skipped fails at once (its fallbacks answer)."""

    failures: int = Field(5, ge=1, description="failed tries in a row that open the breaker")
    cooldown_s: float = Field(
        10.0, gt=0, description="how long an open breaker skips its replica before a trial"
    )


class Price(ConfigModel):
    """What a backend costs, per million tokens (any currency; the report just adds it up)."""

    input_per_mtok: float = Field(0.0, ge=0, description="per million prompt tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="per million completion tokens")

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """The cost of one request, or None when its token counts are unknown."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        return (
            prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        ) / 1e6


class OpenAIBackend(RoutableBackend):
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp, OpenAI itself) behind one or more URLs.

    Each ``base_urls`` entry may hold several URLs separated by commas or spaces, so that one
    environment variable can list replicas: ``["${SPARSITY_ROUTER_LARGE_URLS}"]``.
    """

    type: Literal["openai"] = Field(description="openai")
    base_urls: tuple[str, ...] = Field(
        min_length=1, description="…/v1 URLs of the server's replicas (a string: one entry)"
    )
    model: str | None = Field(
        None, description="rewrite the request's model to this name; null: keep it"
    )
    api_key_env: str | None = Field(
        None,
        description="NAME of the environment variable holding the upstream API key (sent when "
        "it is set)",
    )
    api: Literal["openai", "anthropic"] = Field(
        "openai",
        description="the API the server speaks: openai (chat, completions, responses, "
        "embeddings; /v1/messages is translated to chat) or anthropic (answers /v1/messages "
        "only, forwarded untouched with x-api-key and anthropic-version)",
    )
    timeouts: Timeouts = Field(Timeouts(), description="upstream deadlines")
    max_connections: int = Field(100, ge=1, description="open connections to the server at most")
    fallback: tuple[str, ...] = Field((), description=_FALLBACK)
    models: tuple[str, ...] = Field(
        (),
        description="model names served by direct pass-through (server.passthrough_direct_models)",
    )
    price: Price | None = Field(None, description="per million tokens, for event costs")
    retry_on: tuple[Annotated[int, Field(ge=400, le=599)], ...] = Field(
        (429, 500, 502, 503, 504),
        description="upstream statuses (before the first byte) retried, then failed over to "
        "the fallbacks like a connect error; any other error status is the client's answer",
    )
    retries: int = Field(
        2,
        ge=0,
        le=20,
        description="tries after every replica had one (the least busy ready replica, after "
        "a backoff or the upstream's retry-after)",
    )
    retry_after_max_s: float = Field(
        5.0,
        ge=0,
        description="longest upstream retry-after (or retry-after-ms) waited for; a replica "
        "asking for longer is not retried for that request (fail over instead)",
    )
    backoff: Backoff = Field(Backoff(), description="jittered wait between tries of a replica")
    breaker: Breaker | None = Field(
        Breaker(), description="circuit breaker per replica; null: never skip a replica"
    )
    capabilities: tuple[Capability, ...] = Field(
        CAPABILITIES, description=_CAPABILITIES + "; default: all"
    )

    @field_validator("base_urls", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        v = as_tuple(v)
        if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
            return tuple(u for x in v for u in re.split(r"[\s,]+", x) if u)
        return v

    @field_validator("base_urls")
    @classmethod
    def _http_urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_http_url(u).rstrip("/") for u in v)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not is_env_name(v):
            raise ValueError(
                f"expected the NAME of an environment variable (like LARGE_API_KEY), got {v!r}"
            )
        return v

    @field_validator("fallback", "models", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return as_tuple(v)

    @field_validator("retry_on", mode="before")
    @classmethod
    def _one_status(cls, v: Any) -> Any:
        return (v,) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("retry_on")
    @classmethod
    def _no_repeats(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(dict.fromkeys(v))


class LocalBackend(RoutableBackend):
    """A model run in-process by the gateway (the embedded default's small model)."""

    type: Literal["local"] = Field(description="local")
    model: str | None = Field(
        None, description="hub id, path or bundled:NAME; null: the probe's model"
    )
    max_new_tokens: int = Field(
        256, ge=1, description="longest answer, in tokens (caps the request's max_tokens)"
    )
    share_probe_model: bool = Field(
        True, description="reuse the probe's loaded weights when the model is the probe's"
    )
    fallback: tuple[str, ...] = Field((), description=_FALLBACK)
    price: Price | None = Field(None, description="per million tokens, for event costs")
    capabilities: tuple[Capability, ...] = Field(
        (),
        description=_CAPABILITIES + "; default: none (the local backend ignores tools and "
        "response_format and reads text parts only)",
    )

    @field_validator("capabilities")
    @classmethod
    def _served_locally(cls, v: tuple[Capability, ...]) -> tuple[Capability, ...]:
        if v:
            raise ValueError(
                f"a local backend cannot serve {', '.join(v)}: it ignores tools and "
                "response_format and reads text parts only; leave capabilities empty"
            )
        return v


class HumanBackend(RoutableBackend):
    """Escalation to a human reviewer (the ``escalation:`` section configures the queue).

    ``mode: ticket`` answers at once with ``ticket_message`` (``{id}`` is the escalation id) and
    the client polls ``GET /v1/escalations/{id}``; ``mode: hold`` keeps the request open up to
    ``wait_s`` and answers with the reviewer's reply, else ``on_timeout`` answers (a backend
    name, or ``ticket``). A human backend answers only as a rule's or default's own backend,
    never as another backend's fallback.
    """

    type: Literal["human"] = Field(description="human")
    mode: Literal["ticket", "hold"] = Field(
        "ticket",
        description="ticket: answer at once with a ticket to poll; hold: wait for the reviewer",
    )
    wait_s: float = Field(
        120.0, gt=0, description="hold: how long the request stays open (under expire_s)"
    )
    keepalive_s: float = Field(
        5.0, gt=0, description="hold + stream: ': waiting' SSE comment interval"
    )
    on_timeout: str = Field(
        "ticket", description="hold: backend answering past wait_s (not a human one), or ticket"
    )
    ticket_message: str = Field(
        "A person will answer this request. Your ticket is {id}: poll "
        "GET /v1/escalations/{id} with the same API key for the answer.",
        min_length=1,
        description="the ticket answer; {id} is the escalation id ({{ and }} for braces)",
    )
    fallback: tuple[str, ...] = Field(
        (), description="backends that answer when the escalation queue itself is unavailable"
    )
    capabilities: tuple[Capability, ...] = Field(
        CAPABILITIES, description=_CAPABILITIES + "; default: all (a person reads anything)"
    )

    @field_validator("ticket_message")
    @classmethod
    def _placeholder(cls, v: str) -> str:
        try:
            v.format(id="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"ticket_message may only use the placeholder {{id}} (write {{{{ and }}}} for "
                f"literal braces): {exc}"
            ) from None
        return v


Backend = Annotated[OpenAIBackend | LocalBackend | HumanBackend, Field(discriminator="type")]
