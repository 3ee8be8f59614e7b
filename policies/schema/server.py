"""The ``server:`` and ``auth:`` sections: where the gateway listens, who may call it, how often.

``auth.api_keys`` holds plain client keys; ``auth.keys`` holds scoped keys (``client``,
``reviewer``, ``metrics``, ``admin``), each the key itself, ``${ENV}`` or ``sha256:<hex>`` of it;
``auth.rate_limit`` adds a token bucket per key; ``auth.public_metrics`` opens ``/metrics``.
Who may call which route: docs/security.md.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from policies.schema.common import ConfigModel, key_list

__all__ = ["ApiKey", "AuthSettings", "RateLimitSettings", "ServerSettings"]


class ServerSettings(ConfigModel):
    """The HTTP side of the gateway."""

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on; 0: any free port")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body accepted; larger ones get a 413"
    )
    passthrough_direct_models: bool = Field(
        True,
        description="a request naming a model that a backend lists under `models` goes straight "
        "to that backend, without probe or policy",
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        description="whole-request deadline in seconds, from arrival to the last byte (probe, "
        "cascade and stream included): past it the upstream request is cancelled and the client "
        "gets a 504 timeout error, or an error event and [DONE] once a stream has begun. A human "
        "backend in hold mode adds its wait_s",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="longest wait for a request's whole body once its headers are in (at most "
        "request_timeout_s); a client that stalls gets a 408 and the connection is closed",
    )


class ApiKey(ConfigModel):
    """One scoped key (an entry of ``auth.keys``)."""

    key: str = Field(
        min_length=1,
        repr=False,
        description="the key itself (or ${ENV}), or sha256:<64 hex digits> of it",
    )
    scope: Literal["client", "reviewer", "metrics", "admin"] = Field(
        "client",
        description="client: the OpenAI routes and /openapi.json; reviewer: escalation review; "
        "metrics: /metrics (a Prometheus scraper); admin: /admin/* and every other route",
    )
    name: str | None = Field(
        None, description="shown in logs, metrics and rate limits (default: a hash prefix)"
    )

    @field_validator("key")
    @classmethod
    def _hashed_form(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", v):
            raise ValueError(
                "a hashed key is 'sha256:' followed by 64 hex digits "
                "(python -c \"import hashlib;print(hashlib.sha256(b'KEY').hexdigest())\")"
            )
        return v


class RateLimitSettings(ConfigModel):
    """A token bucket per API key (per client address without keys): ``requests_per_s`` refill,
    ``burst`` capacity. In Redis when ``redis_url`` or ``cache.redis`` is set, else in memory."""

    requests_per_s: float = Field(gt=0, description="how fast a caller's bucket refills")
    burst: int = Field(1, ge=1, description="bucket capacity: requests a caller may send at once")
    redis_url: str | None = Field(
        None, description="Redis shared by every replica (default: cache.redis.url, if any)"
    )
    per_key: dict[str, float] = Field(
        default_factory=dict, description="key name -> requests_per_s override"
    )


class AuthSettings(ConfigModel):
    """API keys clients must send as ``Authorization: Bearer KEY``.

    Empty strings are dropped, so ``["${SPARSITY_ROUTER_API_KEY:-}"]`` means "the key in
    ``$SPARSITY_ROUTER_API_KEY``, or no authentication when it is unset or empty". With no key at
    all (``api_keys``, ``keys`` or ``escalation.reviewer_keys``), authentication is off.
    """

    api_keys: tuple[str, ...] = Field(
        (),
        repr=False,
        description="client keys: plain, ${ENV} or sha256:<hex>; empty entries are dropped",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _drop_empty(cls, v: Any) -> Any:
        return key_list(v)

    @field_validator("api_keys")
    @classmethod
    def _no_blank(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(k for k in v if k)

    keys: tuple[ApiKey, ...] = Field(
        (),
        description="scoped keys; an entry whose key is an unset ${VAR:-} is dropped",
    )
    rate_limit: RateLimitSettings | None = Field(
        None, description="per-key request rate limit; null: none"
    )
    public_metrics: bool = Field(
        False,
        description="true: GET /metrics needs no key even with authentication on (a scraper "
        "inside a trusted network); false: a key with scope metrics or admin",
    )

    @field_validator("keys", mode="before")
    @classmethod
    def _drop_empty_keys(cls, v: Any) -> Any:
        # ``key: "${SPARSITY_ROUTER_ADMIN_KEY:-}"`` with the variable unset drops the entry.
        if isinstance(v, list | tuple):
            return tuple(k for k in v if not (isinstance(k, dict) and k.get("key") == ""))
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or bool(self.keys)
