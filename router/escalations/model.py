"""The escalation record and its life: pending → claimed (lease) → answered | rejected | expired.

A claim whose lease has run out reads as ``pending`` again (any reviewer may claim it). Answer
and reject are idempotent for the same reviewer and text; anything else on a closed escalation,
or on one claimed by someone else, is a :class:`StoreConflict`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CLOSED",
    "Escalation",
    "NewEscalation",
    "Op",
    "Status",
    "StoreConflict",
    "StoreMissing",
    "decide",
    "new_id",
]

Status = Literal["pending", "claimed", "answered", "rejected", "expired"]
Op = Literal["claim", "answer", "reject", "expire"]
CLOSED: frozenset[str] = frozenset({"answered", "rejected", "expired"})


def new_id() -> str:
    """``esc_`` + 24 hex digits: unguessable (96 bits), safe in URLs and HTML ids."""
    return "esc_" + secrets.token_hex(12)


class StoreMissing(LookupError):
    """No escalation with this id."""


class StoreConflict(Exception):
    """The transition is not allowed from the escalation's current state."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class NewEscalation:
    """What the request path knows when it escalates (immutable afterwards)."""

    endpoint: str
    request: dict[str, Any]  # messages (or prompt), model, user, metadata, stream
    probe: dict[str, Any] | None  # score, percentile, n_tokens
    rule: str
    policy: str
    backend: str
    mode: str
    owner: str | None  # sha256 hex of the client's API key; None with auth off
    id: str = field(default_factory=new_id)

    def data_json(self) -> str:
        return json.dumps(
            {
                "endpoint": self.endpoint,
                "request": self.request,
                "probe": self.probe,
                "rule": self.rule,
                "policy": self.policy,
                "backend": self.backend,
                "mode": self.mode,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class Escalation:
    id: str
    status: Status
    created: float
    updated: float
    endpoint: str
    request: dict[str, Any]
    probe: dict[str, Any] | None
    rule: str
    policy: str
    backend: str
    mode: str
    owner: str | None
    claimed_by: str | None = None
    lease_until: float | None = None
    answer: str | None = None
    answered_by: str | None = None
    reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.status in CLOSED

    @classmethod
    def from_parts(
        cls,
        *,
        id: str,
        status: str,
        created: float,
        updated: float,
        data: str,
        owner: str | None,
        claimed_by: str | None,
        lease_until: float | None,
        answer: str | None,
        answered_by: str | None,
        reason: str | None,
        now: float,
    ) -> Escalation:
        d = json.loads(data)
        if status == "claimed" and (lease_until is None or lease_until <= now):
            status, claimed_by, lease_until = "pending", None, None  # the lease ran out
        assert status in ("pending", "claimed", "answered", "rejected", "expired")
        return cls(
            id=id,
            status=status,  # type: ignore[arg-type]
            created=created,
            updated=updated,
            endpoint=d["endpoint"],
            request=d["request"],
            probe=d["probe"],
            rule=d["rule"],
            policy=d["policy"],
            backend=d["backend"],
            mode=d["mode"],
            owner=owner or None,
            claimed_by=claimed_by or None,
            lease_until=lease_until,
            answer=answer,
            answered_by=answered_by or None,
            reason=reason,
        )

    def reviewer_view(self) -> dict[str, Any]:
        """Everything a reviewer sees (never the owner's key hash)."""
        probe = self.probe or {}
        return {
            "id": self.id,
            "object": "escalation",
            "status": self.status,
            "created": self.created,
            "updated": self.updated,
            "endpoint": self.endpoint,
            "model": self.request.get("model"),
            "user": self.request.get("user"),
            "metadata": self.request.get("metadata") or {},
            "messages": self.request.get("messages"),
            "prompt": self.request.get("prompt"),
            "score": probe.get("score"),
            "percentile": probe.get("percentile"),
            "n_tokens": probe.get("n_tokens"),
            "rule": self.rule,
            "policy": self.policy,
            "backend": self.backend,
            "mode": self.mode,
            "claimed_by": self.claimed_by,
            "lease_until": self.lease_until,
            "answer": self.answer,
            "answered_by": self.answered_by,
            "reason": self.reason,
        }


def decide(
    current: Escalation, op: Op, who: str, text: str
) -> Literal["apply", "same"] | StoreConflict:
    """Whether ``op`` by ``who`` applies to ``current`` (already lease-adjusted), is a repeat of
    what was done (idempotent), or conflicts. The Redis store runs the same rules in Lua."""
    status = current.status
    if op in ("answer", "reject"):
        target = "answered" if op == "answer" else "rejected"
        if status == target and current.answered_by == who:
            same = current.answer == text if op == "answer" else current.reason == text
            if same:
                return "same"
    if current.closed:
        return StoreConflict(f"escalation {current.id} is already {status}", status)
    if op == "expire":
        return "apply"
    if status == "claimed" and current.claimed_by != who:
        return StoreConflict(
            f"escalation {current.id} is claimed by {current.claimed_by} until its lease ends",
            status,
        )
    return "apply"
