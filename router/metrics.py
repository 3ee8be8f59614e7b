"""Prometheus metrics, one registry per app (no process globals)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.probing import ProbeOutcome

__all__ = ["BREAKER_STATES", "GatewayMetrics"]

#: ``sparsity_router_breaker_state``'s value for each breaker state.
BREAKER_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


@dataclass(slots=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    probe_seconds: Histogram
    probe_errors: Counter
    probe_cache: Counter
    upstream_seconds: Histogram
    ttft_seconds: Histogram
    fallbacks: Counter
    cache_lookups: Counter
    rate_limited: Counter
    rate_limit_redis_errors: Counter
    config_reloads: Counter
    events_written: Counter
    events_dropped: Counter
    cascades: Counter
    upstream_retries: Counter
    upstream_failures: Counter
    breaker_state: Gauge
    breaker_opens: Counter
    capability_fallbacks: Counter
    calibration_info: Gauge
    calibration_reload_failures: Counter
    shadow_calls: Counter
    shadow_dropped: Counter
    shadow_cost_tokens: Counter
    judge_verdicts: Counter
    labels_stored: Counter

    @classmethod
    def create(cls) -> GatewayMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter(
                "sparsity_router_requests",
                "Requests answered, by backend, rule and HTTP status",
                ["backend", "rule", "status"],
                registry=r,
            ),
            probe_seconds=Histogram(
                "sparsity_router_probe_seconds",
                "Time to a probe result, by where it came from: hit, miss, shared (waited for an "
                "identical request's lookup or pass), off (no cache)",
                ["cache"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            probe_errors=Counter(
                "sparsity_router_probe_errors",
                "Probe failures that sent a request to on_probe_error",
                ["reason"],
                registry=r,
            ),
            probe_cache=Counter(
                "sparsity_router_probe_cache",
                "Probe results by where they came from: hit (the cache), miss (a probe pass), "
                "shared (an identical concurrent request's lookup or pass: single flight), off "
                "(no cache configured)",
                ["result"],
                registry=r,
            ),
            upstream_seconds=Histogram(
                "sparsity_router_upstream_seconds",
                "Upstream time until the answer was committed (non-streaming: whole body)",
                ["backend"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            ttft_seconds=Histogram(
                "sparsity_router_time_to_first_token_seconds",
                "Streaming: time from request to the first upstream chunk",
                ["backend"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            fallbacks=Counter(
                "sparsity_router_fallbacks",
                "Requests answered by a fallback after a backend failed",
                ["failed", "answered"],
                registry=r,
            ),
            cache_lookups=Counter(
                "sparsity_router_cache_lookups",
                "Probe-cache lookups per tier (memory, redis) and result: hit, miss, invalid "
                "(a foreign or corrupt value), error (Redis failed or timed out), skipped "
                "(Redis down, waiting before the next try)",
                ["tier", "result"],
                registry=r,
            ),
            rate_limited=Counter(
                "sparsity_router_rate_limited",
                "Requests refused with a 429",
                ["caller"],
                registry=r,
            ),
            rate_limit_redis_errors=Counter(
                "sparsity_router_rate_limit_redis_errors",
                "Rate-limit Redis calls that failed (the request was limited in memory)",
                registry=r,
            ),
            config_reloads=Counter(
                "sparsity_router_config_reloads",
                "Configuration reloads (SIGHUP, POST /admin/reload), by result",
                ["result"],
                registry=r,
            ),
            events_written=Counter(
                "sparsity_router_events_written", "Event records written to the sink", registry=r
            ),
            events_dropped=Counter(
                "sparsity_router_events_dropped",
                "Event records dropped: queue_full (the writer fell behind) or sink_error",
                ["reason"],
                registry=r,
            ),
            cascades=Counter(
                "sparsity_router_cascades",
                "Answers a policy's cascade checked, by verdict: kept, escalated, skipped "
                "(not one plain text), escalation_failed (the first answer was returned)",
                ["verdict"],
                registry=r,
            ),
            upstream_retries=Counter(
                "sparsity_router_upstream_retries",
                "Upstream attempts that followed a failed one on the same backend, by the "
                "failure: an HTTP status (429, 503, ...), connect, timeout or error",
                ["backend", "reason"],
                registry=r,
            ),
            upstream_failures=Counter(
                "sparsity_router_upstream_failures",
                "Failed upstream attempts before the first byte (retried or not), by reason: "
                "an HTTP status in retry_on, connect, timeout, error, or breaker_open (every "
                "replica skipped)",
                ["backend", "reason"],
                registry=r,
            ),
            breaker_state=Gauge(
                "sparsity_router_breaker_state",
                "Circuit breaker of each upstream replica: 0 closed, 1 half-open (one trial "
                "request), 2 open (skipped)",
                ["backend", "replica"],
                registry=r,
            ),
            breaker_opens=Counter(
                "sparsity_router_breaker_opens",
                "Times a replica's circuit breaker opened (consecutive failures, or a failed "
                "half-open trial)",
                ["backend", "replica"],
                registry=r,
            ),
            capability_fallbacks=Counter(
                "sparsity_router_capability_fallbacks",
                "Requests passed over the chosen backend because it lacks a capability they "
                "need (tools, vision, json), by that backend, the capability and the backend "
                "chosen instead",
                ["backend", "capability", "answered"],
                registry=r,
            ),
            calibration_info=Gauge(
                "sparsity_router_calibration_info",
                "The calibrations serving: 1 for the id (x-router-calibration) of each kind, "
                "prompt (calibration.path), answer (calibration.answer_path) and "
                "arm:<experiment>/<arm> (an experiment arm's calibration)",
                ["id", "kind"],
                registry=r,
            ),
            calibration_reload_failures=Counter(
                "sparsity_router_calibration_reload_failures",
                "Reloads refused because a calibration file was missing, corrupt or did not "
                "fit the probe (the previous calibration kept serving)",
                registry=r,
            ),
            shadow_calls=Counter(
                "sparsity_router_shadow_calls",
                "Labelling jobs (labelling:) by outcome: sent (the shadow call to the other "
                "backend of the pair answered), dropped (never sent: see "
                "sparsity_router_shadow_dropped), failed (the shadow call failed or its "
                "answer was not one plain text)",
                ["outcome"],
                registry=r,
            ),
            shadow_dropped=Counter(
                "sparsity_router_shadow_dropped",
                "Labelling jobs dropped before their shadow call: queue_full, rate "
                "(labelling.max_shadow_per_s), budget (labelling.daily_token_budget spent), "
                "no_text (the answer was not one plain text)",
                ["reason"],
                registry=r,
            ),
            shadow_cost_tokens=Counter(
                "sparsity_router_shadow_cost_tokens",
                "Tokens (prompt + completion) spent by shadow and judge calls",
                registry=r,
            ),
            judge_verdicts=Counter(
                "sparsity_router_judge_verdicts",
                "Judge answers by verdict: large, small or tie (which answer the judge "
                "preferred), unparsed (no verdict found in its text), failed (the call failed)",
                ["verdict"],
                registry=r,
            ),
            labels_stored=Counter(
                "sparsity_router_labels_stored",
                "Label records handed to the events sink (judge or reference labels)",
                registry=r,
            ),
        )

    def record_probe(self, outcome: ProbeOutcome) -> None:
        self.probe_seconds.labels(outcome.cache).observe(outcome.seconds)
        self.probe_cache.labels(outcome.cache).inc()
        if outcome.error is not None:
            self.probe_errors.labels(outcome.error).inc()

    def record_cache(self, tier: str, result: str) -> None:
        self.cache_lookups.labels(tier, result).inc()

    def record_retry(self, backend: str, reason: str) -> None:
        self.upstream_retries.labels(backend, reason).inc()

    def record_upstream_failure(self, backend: str, reason: str) -> None:
        self.upstream_failures.labels(backend, reason).inc()

    def record_breaker(self, backend: str, replica: str, state: str) -> None:
        self.breaker_state.labels(backend, replica).set(BREAKER_STATES[state])
        if state == "open":
            self.breaker_opens.labels(backend, replica).inc()

    def record_calibrations(self, serving: Mapping[str, str | None]) -> None:
        """Show the calibration ids serving now (kind -> id, None: none of that kind), the
        label sets of the ones they replace, and of kinds no longer given (an experiment arm
        removed), removed."""
        stale = [
            labels
            for labels in _label_sets(self.calibration_info)
            if serving.get(labels[1]) != labels[0]
        ]
        for labels in stale:
            self.calibration_info.remove(*labels)
        for kind, ident in serving.items():
            if ident is not None:
                self.calibration_info.labels(ident, kind).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label_sets(metric: Gauge) -> list[tuple[str, ...]]:
    """The label values of every child of a labelled metric."""
    return [
        tuple(sample.labels[name] for name in ("id", "kind"))
        for family in metric.collect()
        for sample in family.samples
    ]
