"""The probe on a vLLM pooling server (``probe.backend: vllm``), interchangeable with the local one.

The gateway tokenises the request exactly as :class:`probes.probe.SparsityProbe` does (same
:class:`probes.encoding.PromptEncoder`, tokenizer only: no weights are loaded), sends the token
ids to the server's ``/v1/embeddings``, and computes the configured metrics on the returned
vector. The server runs the derived folder of :mod:`probes.derived`: the probe model cut after
the probe's layer, final norm a pure rescaling, so its last-token "embedding" is the probe
layer's hidden state up to a positive factor, and every metric (all scale invariant) matches the
local probe's within float rounding. Results, fingerprint and calibrations are the local
probe's, so the two backends can be swapped under one calibration and one cache.

Start the server on the folder and name that ``python -m probes.derived --model M --layer L``
prints (path, then ``--name``)::

    vllm serve PATH --served-model-name NAME --runner pooling --convert embed --dtype float32 \\
        --pooler-config '{"pooling_type": "LAST", "use_activation": false}'

Before its first measurement the probe checks the server: it must list the expected model name
(which encodes the source model's content digest and the layer) and accept prompts of
``max_tokens``; each answer must have the model's width and count exactly the tokens sent.
A mismatch is a :class:`RemoteProbeError` saying how to fix it; like a server that is down or
slow, it sends the request to the policy's ``on_probe_error`` backend.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import torch

from policies.schema import ProbeSection, VllmProbeSettings
from probes.derived import derived_name, read_config, resolve_layer
from probes.encoding import PromptEncoder
from probes.errors import ProbeError
from probes.metric_names import sparsity
from probes.metrics import compute_all
from probes.model import load_tokenizer, model_dir, resolve_dtype
from probes.types import ProbeInput, ProbeResult, ProbeSettings, probe_fingerprint

__all__ = ["RemoteProbe", "RemoteProbeError"]

logger = logging.getLogger(__name__)


class RemoteProbeError(ProbeError):
    """The vLLM probe server is unreachable, answered badly, or runs the wrong model."""


class RemoteProbe:
    """Measures requests on a vLLM pooling server; same results as ``SparsityProbe``."""

    def __init__(self, settings: ProbeSettings, remote: VllmProbeSettings) -> None:
        self.settings = settings
        self.remote = remote
        source = model_dir(settings.model)
        tokenizer = load_tokenizer(str(source))
        self.encoder = PromptEncoder(settings, tokenizer)
        config = read_config(source)
        self.n_layers = int(config["num_hidden_layers"])
        self.hidden_size = int(config["hidden_size"])
        layer = settings.layers[-1] if settings.score_layer is None else settings.score_layer
        self.score_layer = resolve_layer(layer, self.n_layers)
        self.layers = (self.score_layer,)
        self.model_name = remote.model or derived_name(source, self.score_layer)
        self._url = remote.base_url
        self._verified = False
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_section(cls, section: ProbeSection) -> RemoteProbe:
        if section.vllm is None:  # the schema rejects this; kept for direct callers
            raise RemoteProbeError("probe.vllm: backend vllm needs base_url")
        return cls(section.probe_settings(), section.vllm)

    def fingerprint(self) -> dict[str, Any]:
        """The local probe's fingerprint for the same settings (calibrations carry over)."""
        return probe_fingerprint(
            self.settings,
            n_layers=self.n_layers,
            hidden_size=self.hidden_size,
            dtype=resolve_dtype(self.settings.dtype, torch.device("cpu")),
            score_layer=self.score_layer,
        )

    # -- measurement ---------------------------------------------------------------------
    async def ameasure_one(self, item: ProbeInput) -> ProbeResult:
        """Probe one input on the server (the gateway's path: no thread, no lock)."""
        ids, truncated = self.encoder.encode(item)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.remote.timeout_s)
        client = self._client
        if not self._verified:
            self._check_models(await self._aget(client, "/models"))
            self._verified = True
        answer = await self._apost(client, "/embeddings", self._payload(ids))
        return self._result(ids, truncated, answer)

    def measure_one(self, item: ProbeInput) -> ProbeResult:
        """Blocking variant (CLI, tests)."""
        ids, truncated = self.encoder.encode(item)
        with httpx.Client(timeout=self.remote.timeout_s) as client:
            if not self._verified:
                self._check_models(self._call(lambda: client.get(self._url + "/models")))
                self._verified = True
            answer = self._call(
                lambda: client.post(self._url + "/embeddings", json=self._payload(ids))
            )
        return self._result(ids, truncated, answer)

    def measure(self, inputs: list[ProbeInput]) -> list[ProbeResult]:
        return [self.measure_one(item) for item in inputs]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- HTTP ----------------------------------------------------------------------------
    def _payload(self, ids: list[int]) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "input": ids,
            "encoding_format": "float",
            "use_activation": False,  # no L2 normalisation (the metrics would not mind)
            "add_special_tokens": False,
        }

    async def _aget(self, client: httpx.AsyncClient, path: str) -> Any:
        return await self._acall(client.get(self._url + path))

    async def _apost(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
        return await self._acall(client.post(self._url + path, json=body))

    async def _acall(self, request: Any) -> Any:
        try:
            response: httpx.Response = await request
        except httpx.TimeoutException as exc:
            raise RemoteProbeError(self._down(f"timed out ({type(exc).__name__})")) from exc
        except httpx.HTTPError as exc:
            raise RemoteProbeError(self._down(f"{type(exc).__name__}: {exc}")) from exc
        return self._json(response)

    def _call(self, send: Any) -> Any:
        try:
            response: httpx.Response = send()
        except httpx.TimeoutException as exc:
            raise RemoteProbeError(self._down(f"timed out ({type(exc).__name__})")) from exc
        except httpx.HTTPError as exc:
            raise RemoteProbeError(self._down(f"{type(exc).__name__}: {exc}")) from exc
        return self._json(response)

    def _down(self, what: str) -> str:
        return (
            f"vLLM probe server {self._url}: {what}. Fix: check that it runs and that "
            "probe.vllm.base_url points at its /v1 URL (raise probe.vllm.timeout_s if it is slow)"
        )

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code != 200:
            raise RemoteProbeError(
                f"vLLM probe server {self._url} answered HTTP {response.status_code}: "
                f"{response.text[:300]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise RemoteProbeError(f"vLLM probe server {self._url} sent invalid JSON") from exc

    # -- checks --------------------------------------------------------------------------
    def _check_models(self, listing: Any) -> None:
        models = {
            str(m.get("id")): m
            for m in (listing.get("data") or [] if isinstance(listing, dict) else [])
            if isinstance(m, dict)
        }
        s = self.settings
        if self.model_name not in models:
            raise RemoteProbeError(
                f"vLLM probe server {self._url} serves {sorted(models) or 'no model'}, not "
                f"{self.model_name!r} (layer {self.score_layer} of {s.model}). Fix: serve the "
                f"folder `python -m probes.derived --model {s.model} --layer {self.score_layer}` "
                "prints, with --served-model-name set to what it prints with --name (see "
                "README, vLLM backends), or set probe.vllm.model to the name you serve"
            )
        max_len = models[self.model_name].get("max_model_len")
        if isinstance(max_len, int) and max_len < s.max_tokens:
            raise RemoteProbeError(
                f"vLLM probe server {self._url} accepts {max_len} tokens but probe.max_tokens "
                f"is {s.max_tokens}. Fix: start it with --max-model-len {s.max_tokens} or more"
            )

    def _result(self, ids: list[int], truncated: bool, answer: Any) -> ProbeResult:
        try:
            vector = answer["data"][0]["embedding"]
            counted = (answer.get("usage") or {}).get("prompt_tokens")
        except (KeyError, IndexError, TypeError) as exc:
            raise RemoteProbeError(
                f"vLLM probe server {self._url}: unexpected embeddings answer"
            ) from exc
        if not isinstance(vector, list) or len(vector) != self.hidden_size:
            got = len(vector) if isinstance(vector, list) else type(vector).__name__
            raise RemoteProbeError(
                f"vLLM probe server {self._url} returned a vector of width {got}, expected "
                f"{self.hidden_size}: it does not run the probe model (or reduces dimensions)"
            )
        if counted is not None and counted != len(ids):
            raise RemoteProbeError(
                f"vLLM probe server {self._url} counted {counted} prompt tokens for the "
                f"{len(ids)} sent: it altered the input (special tokens or truncation)"
            )
        h = torch.tensor(vector, dtype=torch.float32)
        names = self.settings.metrics
        values = {k: float(v) for k, v in compute_all(h, names).items()}
        raw = values[self.settings.score_metric]
        return ProbeResult(
            n_tokens=len(ids),
            score=sparsity(self.settings.score_metric, raw),
            metrics={self.score_layer: values},
            truncated=truncated,
        )
