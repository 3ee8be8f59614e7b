"""Everything a running gateway holds, built in the app's lifespan and closed in it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio.to_thread

from policies.engine import PolicyEngine, best_of_problems
from policies.loader import env_value
from policies.schema import HumanBackend as HumanBackendSettings
from policies.schema import LocalBackend as LocalBackendSettings
from policies.schema import OpenAIBackend as OpenAIBackendSettings
from policies.schema import Settings
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.model import LoadedModel, load_model
from probes.probe import SparsityProbe
from probes.supervised import SupervisedModel
from router.auth import Caller, KeyRing
from router.auth import Scope as KeyScope
from router.backends.base import Backend
from router.backends.local import LocalBackend
from router.backends.openai import OpenAIBackend
from router.cache import MemoryCache, RedisCache, TieredCache
from router.escalations.config import build_escalations, reviewer_keys
from router.escalations.metrics import EscalationMetrics
from router.escalations.service import EscalationService
from router.events import EventLog, open_sink
from router.labelling import Labeller
from router.metrics import GatewayMetrics
from router.probing import BatchingConfig, ProbeService
from router.ratelimit import RateLimiter, build_rate_limiter
from router.remote_probe import RemoteProbe
from router.retry import RetryPolicy
from router.tracing import DISABLED, Tracing

__all__ = [
    "ArmKey",
    "GatewayState",
    "build_state",
    "load_arm_calibrations",
    "load_calibrations",
    "probe_needed",
]

#: (experiment, arm): an arm whose ``calibration`` replaces the gateway's for its requests.
ArmKey = tuple[str, str]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    engine: PolicyEngine
    backends: dict[str, Backend]
    metrics: GatewayMetrics
    probe: ProbeService | None
    direct_models: dict[str, str] = field(default_factory=dict)  # model name -> backend
    api_keys: tuple[bytes, ...] = ()
    keys: KeyRing = field(default_factory=KeyRing)
    rate_limiter: RateLimiter | None = None
    events: EventLog | None = None
    escalations: EscalationService | None = None  # human backends: router/escalations
    answer_calibration: Calibration | None = None  # what policies' cascades read
    #: the prompt calibration (calibration.path) the routes apply; a reload swaps it with the
    #: state, so a request keeps the one it started with
    calibration: Calibration | None = None
    #: experiment arms carrying ``calibration``: their requests apply it instead (swapped by a
    #: reload with the state, as ``calibration`` is)
    arm_calibrations: dict[ArmKey, Calibration] = field(default_factory=dict)
    tracing: Tracing = DISABLED  # router/tracing.py; set by the app's lifespan
    labeller: Labeller | None = None  # labelling: router/labelling; started by the lifespan

    def calibration_ids(self) -> dict[str, str | None]:
        """The ids of the calibrations serving, by kind (prompt, answer; None: not loaded;
        then ``arm:<experiment>/<arm>`` for each arm carrying its own)."""
        return {
            "prompt": self.calibration.id if self.calibration is not None else None,
            "answer": self.answer_calibration.id if self.answer_calibration is not None else None,
            **{f"arm:{e}/{a}": c.id for (e, a), c in self.arm_calibrations.items()},
        }

    def prompt_calibration(self, experiment: str | None, arm: str | None) -> Calibration | None:
        """The prompt calibration a request of this experiment arm applies: the arm's own,
        else the gateway's (``calibration``)."""
        if experiment is not None and arm is not None:
            own = self.arm_calibrations.get((experiment, arm))
            if own is not None:
                return own
        return self.calibration

    def authorized(self, header: bytes | None) -> bool:
        """Whether ``header`` carries a client-scoped (or admin) key; True with auth off."""
        entry = self.keys.identify(header)
        return not self.keys.enabled or (entry is not None and entry.scope in ("client", "admin"))

    def caller(self, header: bytes | None, scope: KeyScope, fallback_name: str = "") -> Caller:
        """Who calls (for logs and rate limits); 401/403 per :meth:`KeyRing.check`."""
        return self.keys.check(header, scope, fallback_name=fallback_name)

    async def aclose(self) -> None:
        if self.events is not None:
            events = self.events
            await anyio.to_thread.run_sync(events.close)
        if self.escalations is not None:
            try:
                await self.escalations.aclose()
            except Exception:
                logger.exception("closing the escalation queue failed")
        if self.rate_limiter is not None:
            await self.rate_limiter.aclose()
        if self.probe is not None:
            try:
                await self.probe.aclose()
            except Exception:
                logger.exception("closing the probe service failed")
        for backend in self.backends.values():
            try:
                await backend.aclose()
            except Exception:
                logger.exception("closing backend %s failed", backend.name)
        if self.tracing.enabled:  # after the backends: their last spans are exported too
            try:
                await anyio.to_thread.run_sync(self.tracing.shutdown)
            except Exception:
                logger.exception("shutting the tracer down failed")


def probe_needed(settings: Settings, engine: PolicyEngine) -> bool:
    return any(
        engine.needs_probe(name) or policy.cascade is not None
        for name, policy in settings.policies.items()
    )


def _event_log(settings: Settings, metrics: GatewayMetrics) -> EventLog | None:
    events = settings.events
    if events is None or events.sink == "none":
        return None
    sink = open_sink(
        events.sink,
        path=settings.resolve_path(events.path),
        redis_url=events.redis_url,
        stream=events.stream,
        max_len=events.max_len,
        label_retention_s=settings.labelling.retention_s if settings.labelling.enabled else None,
    )
    return EventLog(
        sink,
        queue_size=events.queue_size,
        batch_size=events.batch_size,
        on_drop=lambda reason, n: metrics.events_dropped.labels(reason).inc(n),
        on_written=metrics.events_written.inc,
    )


def _check_supervised(
    settings: Settings, calibration: Calibration, probe: SparsityProbe | RemoteProbe, source: str
) -> None:
    """Refuse a p_large rule without a supervised model, or a probe that cannot feed it."""
    uses = any(r.when.p_large is not None for p in settings.policies.values() for r in p.rules)
    model = calibration.supervised
    if model is None:
        if uses:
            raise CalibrationError(
                f"calibration {source} has no supervised model, which p_large rules need. Fix: "
                "refit it with sparsity-router calibrate --labels FILE"
            )
        return
    if model.reads == "answer":
        raise CalibrationError(
            f"calibration {source} was fitted on prompts plus the small model's answers "
            "(--answer-column): it checks answers and cannot route prompts. Fix: name it in "
            "calibration.answer_path for a policy's cascade, and give calibration.path a "
            "calibration fitted without --answer-column"
        )
    _check_feeds(model, probe, source)


def load_calibrations(
    settings: Settings, probe: SparsityProbe | RemoteProbe
) -> tuple[Calibration | None, Calibration | None]:
    """The prompt calibration (``calibration.path``) and the cascades' answer calibration
    (``calibration.answer_path``), each checked against ``probe`` (fingerprint, what a supervised
    model reads, what the policies need of it); CalibrationError names the problem."""
    calibration = None
    path = settings.calibration_path()
    if path is not None:
        calibration = Calibration.load(path, expect_fingerprint=probe.fingerprint())
        _check_supervised(settings, calibration, probe, str(path))
        _check_nway(settings, calibration, probe, str(path))
    return calibration, _load_answer_calibration(settings, probe)


def load_arm_calibrations(
    settings: Settings, probe: SparsityProbe | RemoteProbe
) -> dict[ArmKey, Calibration]:
    """The calibrations of the experiment arms that carry one, each checked against ``probe``
    as :func:`load_calibrations` checks ``calibration.path`` (against the arm's policy);
    CalibrationError names the arm, its YAML path and the file."""
    loaded: dict[ArmKey, Calibration] = {}
    for i, experiment in enumerate(settings.experiments):
        for j, arm in enumerate(experiment.arms):
            if arm.calibration is None:
                continue
            path = settings.resolve_path(arm.calibration)
            where = f"experiments[{i}].arms[{j}].calibration (arm {experiment.name}/{arm.name})"
            scoped = settings.model_copy(
                update={"policies": {arm.policy: settings.policies[arm.policy]}}
            )
            try:
                calibration = Calibration.load(path, expect_fingerprint=probe.fingerprint())
                _check_supervised(scoped, calibration, probe, str(path))
                _check_nway(scoped, calibration, probe, str(path))
            except CalibrationError as exc:
                raise CalibrationError(f"{where}: {exc}") from None
            loaded[(experiment.name, arm.name)] = calibration
    return loaded


def _check_nway(
    settings: Settings, calibration: Calibration, probe: SparsityProbe | RemoteProbe, source: str
) -> None:
    """Refuse best_of rules the calibration's N-way model cannot serve, or a probe that cannot
    feed it."""
    model = calibration.nway
    models, unit = (None, None) if model is None else (model.models, model.cost_unit)
    problems = best_of_problems(settings, models, unit)
    if problems:
        raise CalibrationError(f"calibration {source}: " + "; ".join(problems))
    if model is not None:
        _check_feeds(model.as_supervised(), probe, source)


def _load_answer_calibration(
    settings: Settings, probe: SparsityProbe | RemoteProbe
) -> Calibration | None:
    """The cascades' calibration: a supervised model fitted on prompt-plus-answer inputs."""
    path = settings.answer_calibration_path()
    if path is None:
        return None
    calibration = Calibration.load(path, expect_fingerprint=probe.fingerprint())
    model = calibration.supervised
    if model is None or model.reads != "answer":
        raise CalibrationError(
            f"calibration.answer_path {path} was not fitted on the small model's answers, so "
            "it cannot check them. Fix: sparsity-router calibrate --labels FILE "
            "--answer-column NAME (the column holding the small model's answer text)"
        )
    _check_feeds(model, probe, str(path))
    return calibration


def _check_feeds(model: SupervisedModel, probe: SparsityProbe | RemoteProbe, source: str) -> None:
    """Refuse a probe that does not measure what ``model`` reads."""
    try:
        token_mean = probe.settings.token_mean or probe.settings.score_position == "mean"
        model.check_probe(
            probe.layers,
            token_mean,
            probe.settings.metrics,
            state_layers=probe.state_layers,
        )
    except ValueError as exc:
        raise CalibrationError(f"calibration {source}: {exc}") from None


def build_state(settings: Settings, *, probe: SparsityProbe | None = None) -> GatewayState:
    """Load the probe (unless given), the calibration and the backends described by ``settings``."""
    metrics = GatewayMetrics.create()
    probe_settings = settings.probe.probe_settings()
    needs_probe = probe_needed(settings, PolicyEngine(settings))
    needs_local_probe_model = any(
        isinstance(b, LocalBackendSettings)
        and b.share_probe_model
        and b.model in (None, probe_settings.model)
        for b in settings.backends.values()
    )
    service: ProbeService | None = None
    calibration: Calibration | None = None
    answer_calibration: Calibration | None = None
    arm_calibrations: dict[ArmKey, Calibration] = {}
    remote = None  # probe.backend: vllm measures on a pooling server (router/remote_probe.py)
    if probe is None and needs_probe and settings.probe.backend == "vllm":
        remote = RemoteProbe.from_section(settings.probe)
    if probe is None and ((needs_probe and remote is None) or needs_local_probe_model):
        probe = SparsityProbe(probe_settings)
    prober: SparsityProbe | RemoteProbe | None = remote or probe
    engine = PolicyEngine(settings, n_layers=prober.n_layers if prober is not None else None)
    if prober is not None and needs_probe:
        calibration, answer_calibration = load_calibrations(settings, prober)
        arm_calibrations = load_arm_calibrations(settings, prober)
        batching = settings.probe.batching
        service = ProbeService(
            prober,
            calibration=calibration,
            cache=None,
            timeout_s=settings.probe.timeout_s,
            on_measured=metrics.record_probe,
            batching=BatchingConfig(
                batching.max_batch if batching.enabled else 1,
                batching.window_ms / 1000 if batching.enabled else 0.0,
                long_tokens=batching.long_tokens,
                max_batch_tokens=batching.max_batch_tokens,
            ),
        )
        memory, redis = settings.cache.memory, settings.cache.redis
        service.cache = TieredCache(
            MemoryCache(memory.max_entries, memory.ttl_s, on_event=metrics.record_cache)
            if memory.max_entries > 0
            else None,
            RedisCache(
                redis.url,
                fingerprint=service.fingerprint_digest,
                ttl_s=redis.ttl_s,
                timeout_s=redis.timeout_s,
                key_prefix=redis.key_prefix,
                on_event=metrics.record_cache,
            )
            if redis is not None
            else None,
        )
        if service.cache.memory is None and service.cache.redis is None:
            service.cache = None

    backends: dict[str, Backend] = {}
    loaded_cache: dict[str, LoadedModel] = {}
    for name, spec in settings.backends.items():
        if isinstance(spec, OpenAIBackendSettings):
            api_key = env_value(spec.api_key_env) if spec.api_key_env else None
            backends[name] = OpenAIBackend(
                name,
                list(spec.base_urls),
                model=spec.model,
                api_key=api_key,
                api=spec.api,
                models=spec.models,
                connect_s=spec.timeouts.connect_s,
                read_s=spec.timeouts.read_s,
                total_s=spec.timeouts.total_s,
                max_connections=spec.max_connections,
                retry=RetryPolicy(
                    retry_on=frozenset(spec.retry_on),
                    retries=spec.retries,
                    retry_after_max_s=spec.retry_after_max_s,
                    backoff_base_s=spec.backoff.base_s,
                    backoff_max_s=spec.backoff.max_s,
                ),
                breaker_failures=spec.breaker.failures if spec.breaker is not None else None,
                breaker_cooldown_s=spec.breaker.cooldown_s if spec.breaker is not None else 0.0,
                observer=metrics,
            )
        elif isinstance(spec, LocalBackendSettings):
            model_spec = spec.model or probe_settings.model
            if probe is not None and spec.share_probe_model and model_spec == probe_settings.model:
                loaded = probe.loaded
            else:
                if model_spec not in loaded_cache:
                    loaded_cache[model_spec] = load_model(
                        model_spec, device=probe_settings.device, dtype=probe_settings.dtype
                    )
                loaded = loaded_cache[model_spec]
            backends[name] = LocalBackend(
                name, loaded, model_name=name, max_new_tokens=spec.max_new_tokens
            )
        elif isinstance(spec, HumanBackendSettings):
            continue  # answered by router/escalations, not dispatched
        else:  # pragma: no cover - the schema rejects other types
            raise TypeError(f"backend {name!r}: unsupported type {type(spec).__name__}")

    direct: dict[str, str] = {}
    if settings.server.passthrough_direct_models:
        for name, backend in backends.items():
            direct.setdefault(name, name)
            for model in backend.model_names():
                direct.setdefault(model, name)
    state = GatewayState(
        events=_event_log(settings, metrics),
        settings=settings,
        engine=engine,
        backends=backends,
        metrics=metrics,
        probe=service,
        calibration=calibration,
        answer_calibration=answer_calibration,
        arm_calibrations=arm_calibrations,
        direct_models=direct,
        api_keys=tuple(k.encode() for k in settings.auth.api_keys),
        keys=KeyRing.from_settings(settings.auth, reviewer_keys=reviewer_keys(settings)),
        escalations=build_escalations(settings, EscalationMetrics.create(metrics.registry)),
        rate_limiter=build_rate_limiter(
            settings.auth.rate_limit,
            settings.cache.redis.url if settings.cache.redis is not None else None,
            on_redis_error=metrics.rate_limit_redis_errors.inc,
        ),
    )
    metrics.record_calibrations(state.calibration_ids())
    return state
