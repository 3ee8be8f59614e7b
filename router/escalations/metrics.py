"""Prometheus metrics of the escalation queue, registered in the gateway's registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["EscalationMetrics"]


@dataclass(slots=True)
class EscalationMetrics:
    created: Counter
    closed: Counter
    open: Gauge
    webhook: Counter
    store_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> EscalationMetrics:
        return cls(
            created=Counter(
                "sparsity_router_escalations_created",
                "Requests escalated to a human, by backend and mode",
                ["backend", "mode"],
                registry=registry,
            ),
            closed=Counter(
                "sparsity_router_escalations_closed",
                "Escalations closed, by status (answered, rejected, expired)",
                ["status"],
                registry=registry,
            ),
            open=Gauge(
                "sparsity_router_escalations_pending",
                "Escalations waiting for a reviewer (pending or claimed)",
                registry=registry,
            ),
            webhook=Counter(
                "sparsity_router_escalation_webhook",
                "Webhook deliveries of new escalations, by result (delivered, failed)",
                ["result"],
                registry=registry,
            ),
            store_errors=Counter(
                "sparsity_router_escalation_store_errors",
                "Escalation store calls that failed (the request went to its fallbacks)",
                registry=registry,
            ),
        )
