"""The ``probe:``, ``calibration:`` and ``cache:`` sections: how requests are measured, how a raw
score becomes a percentile, and where measured results are kept.

``probe`` is :class:`probes.types.ProbeSettings` (model, layers, metrics, ...) plus the
gateway's own keys: a deadline, micro-batching, warm-up and the backend that runs the probe
(in-process, or a vLLM pooling server).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from policies.schema.common import (
    ConfigModel,
    SchemaProblems,
    check_http_url,
    check_redis_url,
)
from probes.types import ProbeSettings

__all__ = [
    "BatchingSettings",
    "CacheSettings",
    "CalibrationSettings",
    "MemoryCacheSettings",
    "ProbeSection",
    "RedisCacheSettings",
    "VllmProbeSettings",
]


class BatchingSettings(ConfigModel):
    """``probe.batching``: how the probe's worker thread schedules forward passes.

    Distinct requests arriving within ``window_ms`` (or until ``max_batch`` are waiting) share
    one forward pass. Inputs longer than ``long_tokens`` queue apart from shorter ones and the
    worker takes turns between the two queues, and one pass holds at most ``max_batch_tokens``
    padded tokens: a short prompt waits for at most one bounded pass of long ones
    (docs/operations.md). The queues and the bound apply with ``enabled: false`` too."""

    enabled: bool = Field(True, description="false: one forward pass per request")
    max_batch: int = Field(16, ge=1, le=1024, description="requests per forward pass at most")
    window_ms: float = Field(
        5.0, ge=0, le=1000, description="how long a batch collects while the probe is idle"
    )
    long_tokens: int | None = Field(
        128,
        ge=1,
        description="inputs of more tokens queue apart from shorter ones; while both queues "
        "wait, passes alternate between them, so short prompts are not stuck behind long "
        "ones; null: one queue, first come first served",
    )
    max_batch_tokens: int | None = Field(
        512,
        ge=1,
        description="padded tokens per forward pass at most (requests x the longest one; a "
        "longer single input runs alone): bounds how long one pass holds the probe; null: "
        "no bound",
    )


class VllmProbeSettings(ConfigModel):
    """Where the remote probe (``probe.backend: vllm``) finds its vLLM pooling server.

    The server runs the folder ``sparsity-router derive-probe CONFIG`` prints, served under the
    name ``--name`` prints (the default for ``model``): for one layer read at the last token, a
    stock vLLM; for more (several layers, token means, hidden vectors: the supervised recipes),
    vLLM with the project's plugin (``plugins/vllm_probe``). See README "vLLM backends".
    """

    base_url: str = Field(description="the server's …/v1 URL")
    model: str | None = Field(None, description="served model name; null: the derived name")
    timeout_s: float = Field(5.0, gt=0, description="per HTTP request to the server, seconds")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return check_http_url(v).rstrip("/")


class ProbeSection(ProbeSettings):
    """The ``probe:`` section: :class:`probes.types.ProbeSettings` plus the gateway's deadline,
    micro-batching, warm-up and probe backend.

    ``timeout_s`` bounds one probe measurement as seen by the gateway (queueing in the
    micro-batcher included); past it the request goes to the policy's ``on_probe_error``.
    A calibration is fitted for one probe configuration: refit it after changing the model,
    layers, metrics, score or token settings.
    """

    timeout_s: float = Field(
        2.0,
        gt=0,
        description="gateway-side deadline for one probe, seconds; past it, the policy's "
        "on_probe_error answers",
    )
    batching: BatchingSettings = Field(
        BatchingSettings(),
        description="micro-batching: distinct requests arriving together share a forward pass",
    )
    warm_up: bool = Field(
        True, description="run one probe pass at start-up, before /readyz reports ready"
    )
    backend: Literal["local", "vllm"] = Field(
        "local", description="local: in-process forward pass; vllm: a vLLM pooling server"
    )
    vllm: VllmProbeSettings | None = Field(
        None, description="the pooling server, required by backend: vllm"
    )

    def probe_settings(self) -> ProbeSettings:
        """The plain :class:`ProbeSettings` (what ``SparsityProbe`` and calibrations compare)."""
        return ProbeSettings(
            **self.model_dump(exclude={"timeout_s", "batching", "warm_up", "backend", "vllm"})
        )

    @model_validator(mode="after")
    def _remote_probe_fits(self) -> ProbeSection:
        """A vLLM probe needs its server's address; one layer at the last token is served by a
        stock vLLM, anything more by the feature model of the project's plugin."""
        if self.backend == "vllm" and self.vllm is None:
            raise SchemaProblems(
                [(("vllm",), "backend: vllm needs a `vllm:` section with base_url (and model)")]
            )
        return self


class CalibrationSettings(ConfigModel):
    """Where the calibration (raw score -> percentile) lives.

    A relative path is resolved against the folder of the config file. Without a calibration,
    results carry no percentile and rules using ``percentile``, ``share`` or ``p_large`` are
    rejected. Fit one with ``sparsity-router calibrate``.
    """

    path: str | None = Field(
        None,
        description="calibration JSON turning the probe's raw score into a percentile of "
        "reference traffic (and, fitted with --labels, into p_large); null or empty: none",
    )
    answer_path: str | None = Field(
        None,
        description="a supervised calibration fitted on prompts plus the small model's answers "
        "(calibrate --labels --answer-column): what a policy's cascade reads",
    )

    @field_validator("path", "answer_path")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        return v


class MemoryCacheSettings(ConfigModel):
    """Probe results in the gateway's memory, least recently used dropped first."""

    max_entries: int = Field(10_000, ge=0, description="results kept; 0 disables the memory cache")
    ttl_s: float = Field(3600.0, gt=0, description="how long a result stays valid, seconds")


class RedisCacheSettings(ConfigModel):
    """Probe results shared by every gateway on one Redis. A Redis error or timeout is a cache
    miss, never a failed request."""

    url: str = Field(description="redis://host:port/db (rediss:// for TLS, unix:// for a socket)")
    ttl_s: float = Field(86_400.0, gt=0, description="how long a result stays valid, seconds")
    timeout_s: float = Field(0.05, gt=0, description="per call; a slow Redis is a cache miss")
    key_prefix: str = Field("sparsity-router:", description="prepended to every cache key")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return check_redis_url(v)


class CacheSettings(ConfigModel):
    """Probe results are cached by the probed text: memory first, then Redis when configured."""

    memory: MemoryCacheSettings = Field(
        MemoryCacheSettings(), description="the in-process cache, in front of Redis"
    )
    redis: RedisCacheSettings | None = Field(None, description="a shared cache; null: none")
