"""The ``tracing:`` section: OpenTelemetry spans of every request (the ``otel`` extra).

Off by default; with it off the gateway never imports OpenTelemetry. What the spans hold is
described in docs/operations.md ("Tracing"); the tracer itself is :mod:`router.tracing`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from policies.schema.common import ConfigModel, SchemaProblems, check_http_url

__all__ = ["TracingSettings"]


class TracingSettings(ConfigModel):
    """OpenTelemetry traces: a span per request (GenAI semantic conventions) with child spans
    for the probe and each upstream attempt; the W3C ``traceparent`` is continued from the
    client and sent on to the upstream.

    Needs the ``otel`` extra (``pip install 'sparsity-router[otel]'``); ``exporter: otlp``
    also needs ``opentelemetry-exporter-otlp-proto-http``. The gateway refuses to start when
    tracing is enabled and a package it needs is missing.
    """

    enabled: bool = Field(False, description="trace requests; false: no OpenTelemetry at all")
    service_name: str = Field(
        "sparsity-router", min_length=1, description="the resource's service.name"
    )
    exporter: Literal["otlp", "console", "none"] = Field(
        "otlp",
        description="otlp: OTLP over HTTP/protobuf (needs opentelemetry-exporter-otlp-proto-http); "
        "console: spans printed to stdout; none: spans are made and propagated, not exported",
    )
    endpoint: str | None = Field(
        None,
        description="otlp: the collector's traces URL, e.g. http://collector:4318/v1/traces; "
        "null: the exporter's default (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else "
        "http://localhost:4318/v1/traces)",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of new traces recorded; a request with a traceparent follows "
        "its caller's sampling decision",
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        return None if v is None else check_http_url(v)

    @model_validator(mode="after")
    def _endpoint_needs_otlp(self) -> TracingSettings:
        if self.endpoint is not None and self.exporter != "otlp":
            raise SchemaProblems(
                [(("endpoint",), f"endpoint is for exporter: otlp, not exporter: {self.exporter}")]
            )
        return self
