"""The ``escalation:`` and ``events:`` sections: the human-escalation queue (store, lease,
expiry, webhook, reviewer keys) and the per-request event records (sink, queue, usage).

Whether an escalation store has the Redis it needs (``cache.redis`` may stand in for
``escalation.redis_url``) is the root's cross-check (:mod:`policies.schema.checks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from policies.schema.common import (
    ConfigModel,
    SchemaProblems,
    check_http_url,
    check_redis_url,
    key_list,
)

__all__ = ["EscalationSettings", "EventsSettings", "WebhookSettings"]


class WebhookSettings(ConfigModel):
    """POSTed a JSON summary of every new escalation (never blocks the request)."""

    url: str = Field(description="http:// or https:// URL receiving the POST")
    timeout_s: float = Field(5.0, gt=0, description="per attempt, seconds")
    retries: int = Field(3, ge=0, le=10, description="retries after the first try, with backoff")
    secret: str | None = Field(
        None,
        description="HMAC-SHA256 signing secret (use ${ENV}); the receiver checks "
        "x-router-signature = sha256=hex(HMAC(secret, timestamp + '.' + body)); "
        "empty: unsigned",
    )

    @field_validator("secret")
    @classmethod
    def _no_blank_secret(cls, v: str | None) -> str | None:
        return v or None  # "${WEBHOOK_SECRET:-}" unset: unsigned

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return check_http_url(v)


class EscalationSettings(ConfigModel):
    """Human escalation: a durable queue of requests waiting for a reviewer's answer.

    ``store: sqlite`` (embedded, one gateway process or several on one host) keeps it in
    ``path`` (relative to the config file); ``store: redis`` shares it between gateway
    processes (``redis_url``, else ``cache.redis.url``). A reviewer's claim holds for
    ``lease_s``; an escalation nobody answered within ``expire_s`` expires. Reviewers use keys
    with scope ``reviewer`` or ``admin`` (``auth.keys``) or the plain ``reviewer_keys`` here.
    Used only when a backend has ``type: human`` (all defaults when the section is absent).
    """

    store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="sqlite: a file on this host; redis: shared between gateways"
    )
    path: str = Field(
        "escalations.sqlite", description="sqlite: the database file (relative: to the config)"
    )
    redis_url: str | None = Field(None, description="redis: the server; null: cache.redis.url")
    key_prefix: str = Field(
        "sparsity-router:escalations:", description="redis: prepended to every key"
    )
    lease_s: float = Field(300.0, gt=0, description="how long a reviewer's claim holds")
    expire_s: float = Field(86_400.0, gt=0, description="unanswered escalations expire after")
    retention_s: float | None = Field(
        30 * 86_400.0,
        gt=0,
        description="closed escalations (answered, rejected, expired) created longer ago are "
        "deleted; null keeps them forever",
    )
    webhook: WebhookSettings | None = Field(
        None, description="notified of every new escalation; null: none"
    )
    reviewer_keys: tuple[str, ...] = Field(
        (), repr=False, description="keys with scope reviewer (plain, ${ENV} or sha256:<hex>)"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        return None if v is None else check_redis_url(v)

    @field_validator("reviewer_keys", mode="before")
    @classmethod
    def _drop_empty(cls, v: Any) -> Any:
        return key_list(v)


class EventsSettings(ConfigModel):
    """One record per request (decision, score, latency, tokens, status, cost) written to a sink.

    ``sink``: ``sqlite`` (the file ``path``), ``jsonl`` (the file ``path``), ``redis`` (a stream
    ``stream`` at ``redis_url``, trimmed to about ``max_len`` entries) or ``none``. Records go
    through a bounded in-memory queue of ``queue_size`` to a writer thread; a full queue or a
    failing sink drops records (counted in ``sparsity_router_events_dropped``), never a request.
    Without an ``events:`` section nothing is recorded.
    """

    sink: Literal["sqlite", "jsonl", "redis", "none"] = Field(
        "sqlite", description="where records go; none: nowhere"
    )
    path: str = Field(
        "events.sqlite",
        description="sqlite and jsonl: the file (relative: to the config); default for jsonl: "
        "events.jsonl",
    )
    redis_url: str | None = Field(None, description="redis: the server (required)")
    stream: str = Field("sparsity-router:events", description="redis: the stream's key")
    max_len: int = Field(100_000, ge=1, description="redis: the stream is trimmed to about this")
    queue_size: int = Field(10_000, ge=1, description="records waiting for the writer at most")
    batch_size: int = Field(256, ge=1, description="records per write")
    usage: Literal["inject", "passive"] = Field(
        "inject",
        description="streams: inject: ask upstream for usage and strip the usage-only chunk "
        "the client did not ask for; passive: record tokens only when the client asked",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, v: Any) -> Any:
        if isinstance(v, Mapping) and "path" not in v and v.get("sink") == "jsonl":
            return {**v, "path": "events.jsonl"}
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        return None if v is None else check_redis_url(v)

    @model_validator(mode="after")
    def _redis_needs_url(self) -> EventsSettings:
        if self.sink == "redis" and not self.redis_url:
            raise SchemaProblems(
                [(("redis_url",), "sink 'redis' needs redis_url (e.g. redis://127.0.0.1:6379/0)")]
            )
        return self
