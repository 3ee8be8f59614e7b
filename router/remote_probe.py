"""The probe on a vLLM pooling server (``probe.backend: vllm``), interchangeable with the local one.

The gateway tokenises the request exactly as :class:`probes.probe.SparsityProbe` does (same
:class:`probes.encoding.PromptEncoder`, tokenizer only: no weights are loaded) and sends the token
ids to the server's ``/v1/embeddings``. Two kinds of server (:func:`probes.derived.needs_features`):

* **layer mode** (one layer read at the last token, no token means, no hidden vectors): a stock
  vLLM runs the derived folder of :func:`probes.derived.derive_probe_model`, the probe model cut
  after the probe's layer, final norm a pure rescaling, so its last-token "embedding" is the probe
  layer's hidden state up to a positive factor; the gateway computes the metrics on it (all
  scale invariant: they match the local probe's within float rounding).
* **feature mode** (anything more: the supervised recipes' layers, token means and hidden
  vectors): vLLM with the project's plugin (``plugins/vllm_probe``) runs the folder of
  :func:`probes.derived.derive_feature_model` and returns, in one answer, every metric and vector
  the local probe would compute, laid out as :class:`probes.served.FeatureLayout` says.

Results, fingerprint and calibrations are the local probe's, so the two backends can be swapped
under one calibration and one cache. ``sparsity-router derive-probe CONFIG --command`` prints the
``vllm serve`` command for a configuration (``scripts/vllm_serve.sh probe|features PORT`` runs
it)::

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
from probes.derived import (
    derived_name,
    feature_model_name,
    needs_features,
    read_config,
    resolve_layer,
)
from probes.encoding import PromptEncoder
from probes.errors import ProbeError
from probes.metric_names import sparsity
from probes.metrics import compute_all
from probes.model import load_tokenizer, model_dir, resolve_dtype
from probes.served import FeatureLayout
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
        layer = settings.score_layer_spec
        # Feature mode: the server returns every feature; layer mode: one layer's vector.
        self.layout: FeatureLayout | None = None
        if needs_features(settings):
            try:
                self.layout = FeatureLayout.for_settings(settings, self.n_layers, self.hidden_size)
            except ValueError as exc:
                raise RemoteProbeError(f"probe: {exc}") from None
            if self.layout.deepest == 0:
                raise RemoteProbeError(
                    "probe.layers: a vLLM probe reading only layer 0 (the embeddings) has no "
                    "layer to run: add a layer >= 1, or use backend: local"
                )
            # in range (the layout checked it); layer 0, the embeddings, is a feature too
            self.score_layer = layer if layer >= 0 else self.n_layers + 1 + layer
            self.layers: tuple[int, ...] = self.layout.layers
            self.state_layers: tuple[int, ...] = self.layout.state_layers
            self.model_name = remote.model or feature_model_name(source, self.layout)
        else:
            self.score_layer = resolve_layer(layer, self.n_layers)
            self.layers = (self.score_layer,)
            self.state_layers = ()
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
            if self.layout is not None:
                what = f"the features {self.layout.describe()} of {s.model}"
                fix = (
                    "serve the folder `sparsity-router derive-probe CONFIG` prints with vLLM and "
                    "the project's plugin (`sparsity-router derive-probe CONFIG --command`, or "
                    "scripts/vllm_serve.sh features PORT)"
                )
            else:
                what = f"layer {self.score_layer} of {s.model}"
                fix = (
                    f"serve the folder `python -m probes.derived --model {s.model} --layer "
                    f"{self.score_layer}` prints, with --served-model-name set to what it prints "
                    "with --name"
                )
            raise RemoteProbeError(
                f"vLLM probe server {self._url} serves {sorted(models) or 'no model'}, not "
                f"{self.model_name!r} ({what}). Fix: {fix} (see README, vLLM backends), or set "
                "probe.vllm.model to the name you serve"
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
        width = self.layout.width if self.layout is not None else self.hidden_size
        if not isinstance(vector, list) or len(vector) != width:
            got = len(vector) if isinstance(vector, list) else type(vector).__name__
            raise RemoteProbeError(
                f"vLLM probe server {self._url} returned a vector of width {got}, expected "
                f"{width}: it does not run the probe model it names (or reduces dimensions)"
            )
        if counted is not None and counted != len(ids):
            raise RemoteProbeError(
                f"vLLM probe server {self._url} counted {counted} prompt tokens for the "
                f"{len(ids)} sent: it altered the input (special tokens or truncation)"
            )
        s = self.settings
        if self.layout is not None:
            last, mean, states = self.layout.unpack(vector)
            table = last if s.score_position == "last" else mean
            assert table is not None  # the layout has token means when the score reads them
            return ProbeResult(
                n_tokens=len(ids),
                score=sparsity(s.score_metric, table[self.score_layer][s.score_metric]),
                metrics=last,
                metrics_mean=mean,
                truncated=truncated,
                states=states,
            )
        h = torch.tensor(vector, dtype=torch.float32)
        values = {k: float(v) for k, v in compute_all(h, s.metrics).items()}
        return ProbeResult(
            n_tokens=len(ids),
            score=sparsity(s.score_metric, values[s.score_metric]),
            metrics={self.score_layer: values},
            truncated=truncated,
        )
