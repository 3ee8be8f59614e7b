"""Everything a running gateway holds, built in the app's lifespan and closed in it."""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass, field

from policies.engine import PolicyEngine
from policies.schema import LocalBackend as LocalBackendSettings
from policies.schema import OpenAIBackend as OpenAIBackendSettings
from policies.schema import Settings
from probes.calibration import Calibration
from probes.model import LoadedModel, load_model
from probes.probe import SparsityProbe
from router.backends.base import Backend
from router.backends.local import LocalBackend
from router.backends.openai import OpenAIBackend
from router.cache import MemoryCache
from router.metrics import GatewayMetrics
from router.probing import ProbeService
from router.remote_probe import RemoteProbe

__all__ = ["GatewayState", "build_state"]

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

    def authorized(self, header: bytes | None) -> bool:
        if not self.api_keys:
            return True
        if header is None or not header.lower().startswith(b"bearer "):
            return False
        given = header[7:].strip()
        # Compare against every key so the time taken does not reveal which one matched.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(given, key)
        return matched

    async def aclose(self) -> None:
        if self.probe is not None:
            await self.probe.aclose()
        for backend in self.backends.values():
            try:
                await backend.aclose()
            except Exception:
                logger.exception("closing backend %s failed", backend.name)


def _probe_needed(settings: Settings, engine: PolicyEngine) -> bool:
    return any(engine.needs_probe(name) for name in settings.policies)


def build_state(settings: Settings, *, probe: SparsityProbe | None = None) -> GatewayState:
    """Load the probe (unless given), the calibration and the backends described by ``settings``."""
    metrics = GatewayMetrics.create()
    probe_settings = settings.probe.probe_settings()
    probe_needed = _probe_needed(settings, PolicyEngine(settings))
    needs_local_probe_model = any(
        isinstance(b, LocalBackendSettings)
        and b.share_probe_model
        and b.model in (None, probe_settings.model)
        for b in settings.backends.values()
    )
    service: ProbeService | None = None
    remote = None  # probe.backend: vllm measures on a pooling server (router/remote_probe.py)
    if probe is None and probe_needed and settings.probe.backend == "vllm":
        remote = RemoteProbe.from_section(settings.probe)
    if probe is None and ((probe_needed and remote is None) or needs_local_probe_model):
        probe = SparsityProbe(probe_settings)
    prober: SparsityProbe | RemoteProbe | None = remote or probe
    engine = PolicyEngine(settings, n_layers=prober.n_layers if prober is not None else None)
    if prober is not None and probe_needed:
        calibration = None
        path = settings.calibration_path()
        if path is not None:
            calibration = Calibration.load(path, expect_fingerprint=prober.fingerprint())
        memory = settings.cache.memory
        cache = MemoryCache(memory.max_entries, memory.ttl_s) if memory.max_entries > 0 else None
        service = ProbeService(
            prober,
            calibration=calibration,
            cache=cache,
            timeout_s=settings.probe.timeout_s,
            on_measured=metrics.record_probe,
        )

    backends: dict[str, Backend] = {}
    loaded_cache: dict[str, LoadedModel] = {}
    for name, spec in settings.backends.items():
        if isinstance(spec, OpenAIBackendSettings):
            api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
            backends[name] = OpenAIBackend(
                name,
                list(spec.base_urls),
                model=spec.model,
                api_key=api_key,
                models=spec.models,
                connect_s=spec.timeouts.connect_s,
                read_s=spec.timeouts.read_s,
                total_s=spec.timeouts.total_s,
                max_connections=spec.max_connections,
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
        else:  # pragma: no cover - the schema rejects other types
            raise TypeError(f"backend {name!r}: unsupported type {type(spec).__name__}")

    direct: dict[str, str] = {}
    if settings.server.passthrough_direct_models:
        for name, backend in backends.items():
            direct.setdefault(name, name)
            for model in backend.model_names():
                direct.setdefault(model, name)
    return GatewayState(
        settings=settings,
        engine=engine,
        backends=backends,
        metrics=metrics,
        probe=service,
        direct_models=direct,
        api_keys=tuple(k.encode() for k in settings.auth.api_keys),
    )
