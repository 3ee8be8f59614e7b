"""The policy engine: a probe result and a request's context in, a routing :class:`Decision` out.

``PolicyEngine(settings)`` compiles every policy once (share -> percentile thresholds,
fallback chains); :meth:`PolicyEngine.decide` is then pure and never raises for any probe
result or context (only for an unknown policy name, a programming error).

How a policy decides:

1. Rules are tried in order; the first whose conditions all hold wins (:class:`Decision.rule`
   is its name). Conditions on the request (model, user, header, metadata, always) are checked
   first; a rule that also needs the probe (percentile, share, score, metric, n_tokens) and
   whose request conditions hold, when there is no probe result (the probe failed, timed out
   or was not run), sends the request to the policy's ``on_probe_error`` backend
   (rule ``"on_probe_error"``). So request-only rules placed first still apply when the probe
   fails.
2. A condition that cannot be evaluated (no percentile because no calibration was loaded, a
   metric the result lacks, NaN) does not match.
3. No rule matched: the policy's ``default`` (rule ``"default"``).
4. A request with no readable text (``RequestContext.has_text`` false: only image, audio or
   file parts, or blank text) is never probed and never a probe error: its request-side
   conditions (``has_text: false`` among them) are checked as usual, and the first rule that
   would need the probe, or the end of the rules, sends it to the policy's ``on_no_text``
   action (default: its ``default`` action), rule ``"no_text"``.

5. Conditions on the request's shape (``has_tools``, ``has_images``, ``response_format``,
   ``n_messages``) are request conditions: they need no probe.

6. A rule routing to ``best_of`` several backends (N-way routing) needs the probe: of its
   backends within the cost cap, the one whose model has the highest ``predicted quality -
   willingness_to_pay * cost`` answers (:func:`probes.nway.pick`; ties to the cheaper), the
   others, best first, are its fallbacks. The predictions and costs come on the probe result
   (``ProbeResult.qualities``, from the calibration's N-way model); a result without them (or
   without a model of the rule) does not match. :attr:`Decision.model` and
   :attr:`Decision.predicted_quality` record the choice. A backend's model is its ``model``,
   else its name (:func:`backend_model`); :func:`best_of_problems` checks them against a
   calibration's N-way model when the gateway starts.

Capabilities: after the decision, :meth:`PolicyEngine.select` cuts the decision's chain
(``backend`` then ``fallbacks``) to the backends having every capability the request needs
(``tools``, ``vision``, ``json``: a backend's ``capabilities``). When the chosen backend lacks
one, the first capable backend of its chain answers (``Decision.capability_fallback`` says
``"<backend>:<missing>"``); when none has them, :class:`MissingCapability` is raised (the
gateway answers 400), so a request's tools are never silently dropped.

``share: s`` rules match ``percentile >= threshold_for_share(cumulative share)``, by default
``1 - cumulative share``: shares 0.02 then 0.28 give thresholds 0.98 and 0.70.

The fallback chain of a decision is the rule's ``fallback`` (else its backend's), each entry
followed depth-first by its own backend's fallbacks, without the chosen backend and without
repeats: ``large -> [medium, small]`` with ``medium -> [small, tiny]`` gives
``(medium, small, tiny)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from policies.errors import PolicyError
from policies.experiments import ExperimentRouter
from policies.schema import Condition, Settings
from policies.schema.backends import CAPABILITIES
from policies.schema.rules import BestOf
from probes.nway import pick
from probes.types import ProbeResult

__all__ = [
    "DEFAULT_RULE",
    "NO_TEXT_RULE",
    "ON_PROBE_ERROR_RULE",
    "Decision",
    "MissingCapability",
    "PolicyEngine",
    "RequestContext",
    "backend_model",
    "best_of_problems",
]

#: ``Decision.rule`` when no rule matched / when the probe result a rule needed was missing /
#: when the request held no text to probe.
DEFAULT_RULE = "default"
ON_PROBE_ERROR_RULE = "on_probe_error"
NO_TEXT_RULE = "no_text"

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the gateway knows about a request besides its probe result.

    ``headers`` names are lower-cased on construction (any mapping is accepted, e.g.
    starlette's ``Headers``); ``metadata`` is the request body's ``metadata`` object.
    ``has_text``: the request holds readable text (False: only image, audio or file parts, or
    blank text; there is nothing to probe). ``has_tools``: a non-empty ``tools`` or
    ``functions``; ``has_images``: an ``image_url`` or ``input_image`` part;
    ``response_format``: its ``type`` (``text`` when absent); ``n_messages``: the number of
    chat messages (None: unknown, so an ``n_messages`` condition does not match).
    """

    model: str | None = None
    user: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    has_text: bool = True
    has_tools: bool = False
    has_images: bool = False
    response_format: str = "text"
    n_messages: int | None = None

    def __post_init__(self) -> None:
        headers = MappingProxyType({str(k).lower(): v for k, v in self.headers.items()})
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why.

    ``fallbacks``: backends to try, in order, when ``backend`` fails. ``rule``: the matching
    rule's name, ``"default"``, ``"on_probe_error"`` or ``"no_text"``. ``probe_error``: the
    policy needed a probe result and had none (the probe failed, timed out or was not run).
    """

    backend: str
    fallbacks: tuple[str, ...]
    rule: str
    policy: str
    reason: str
    probe_error: bool = False
    experiment: str | None = None  # the A/B experiment and arm that chose ``policy``
    arm: str | None = None
    #: ``"<backend>:<missing>"`` when the chosen backend lacked a capability the request needs
    #: and ``backend`` is the first of its chain that has them (:meth:`PolicyEngine.select`).
    capability_fallback: str | None = None
    #: a ``best_of`` rule's choice: the chosen backend's model and its predicted quality
    model: str | None = None
    predicted_quality: float | None = None


class MissingCapability(Exception):
    """No backend of a decision's chain has every capability the request needs.

    ``missing``: the capabilities no backend of ``chain`` has (all of the needed ones when
    each is found somewhere but never together), in ``tools, vision, json`` order.
    """

    def __init__(self, missing: tuple[str, ...], chain: tuple[str, ...]) -> None:
        self.missing = missing
        self.chain = chain
        super().__init__(
            f"no backend of {', '.join(chain)} has the capabilities {', '.join(missing)}"
        )


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    route: str
    fallbacks: tuple[str, ...]
    when: Condition
    needs_probe: bool
    threshold: float | None  # share rules: the percentile threshold
    share: float | None  # share rules: the cumulative share
    best_of: BestOf | None = None  # N-way rules: the candidates ...
    models: tuple[str, ...] = ()  # ... and their backends' models
    override: tuple[str, ...] | None = None  # N-way rules: the rule's own fallback

    def decision(self, policy: str, why: list[str], *, probe_error: bool = False) -> Decision:
        """This rule matched, for the reasons ``why``."""
        return Decision(
            backend=self.route,
            fallbacks=self.fallbacks,
            rule=self.name,
            policy=policy,
            reason=f"rule {self.name}: " + "; ".join(why),
            probe_error=probe_error,
        )


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str
    rules: tuple[_Rule, ...]
    default: str
    default_fallbacks: tuple[str, ...]
    on_probe_error: str
    on_probe_error_fallbacks: tuple[str, ...]
    on_no_text: str
    on_no_text_fallbacks: tuple[str, ...]
    needs_probe: bool


def _one_minus(share: float) -> float:
    return 1.0 - share


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class PolicyEngine:
    """Decides, per request, which backend serves it (see the module docstring).

    ``n_layers``: the probe model's layer count, to resolve negative layers of ``metric``
    conditions (``-1`` = the last) against the non-negative keys of ``ProbeResult.metrics``;
    without it, negative layers never match. ``threshold_for_share``: maps a cumulative share
    to a percentile threshold (default ``1 - share``; pass a calibration's
    ``threshold_for_share`` to use its definition).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        n_layers: int | None = None,
        threshold_for_share: Callable[[float], float] | None = None,
    ) -> None:
        self.settings = settings
        self.n_layers = n_layers
        self._threshold = threshold_for_share or _one_minus
        self._backend_fallbacks = {
            name: tuple(backend.fallback) for name, backend in settings.backends.items()
        }
        self._capabilities = {
            name: frozenset(backend.capabilities) for name, backend in settings.backends.items()
        }
        self._policies = {name: self._compile(name) for name in settings.policies}
        self._direct = settings.direct_models()
        self.experiments = ExperimentRouter(settings.experiments)

    # -- compilation -------------------------------------------------------------------------

    def _compile(self, name: str) -> _Policy:
        policy = self.settings.policies[name]
        cumulative = policy.share_thresholds()
        rules = []
        for i, rule in enumerate(policy.rules):
            rule_name = rule.name or f"rules[{i}]"
            share = cumulative.get(rule_name) if rule.when.share is not None else None
            threshold = None if share is None else self._share_threshold(name, rule_name, share)
            best = rule.route if isinstance(rule.route, BestOf) else None
            route = best.best_of[0] if best is not None else str(rule.route)
            rules.append(
                _Rule(
                    name=rule_name,
                    route=route,
                    fallbacks=self.fallback_chain(route, rule.fallback),
                    when=rule.when,
                    needs_probe=rule.when.needs_probe or best is not None,
                    threshold=threshold,
                    share=share,
                    best_of=best,
                    models=()
                    if best is None
                    else tuple(backend_model(self.settings, b) for b in best.best_of),
                    override=rule.fallback,
                )
            )
        default = policy.default
        no_text = policy.on_no_text or default
        return _Policy(
            name=name,
            rules=tuple(rules),
            default=default.route,
            default_fallbacks=self.fallback_chain(default.route, default.fallback),
            on_probe_error=policy.on_probe_error,
            on_probe_error_fallbacks=self.fallback_chain(policy.on_probe_error),
            on_no_text=no_text.route,
            on_no_text_fallbacks=self.fallback_chain(no_text.route, no_text.fallback),
            needs_probe=any(r.needs_probe for r in rules),
        )

    def _share_threshold(self, policy: str, rule: str, share: float) -> float:
        try:
            value = float(self._threshold(share))
        except Exception as exc:
            raise PolicyError(
                f"policies.{policy}: threshold_for_share({share:g}) for rule {rule!r} failed: {exc}"
            ) from exc
        if not 0.0 <= value <= 1.0:
            raise PolicyError(
                f"policies.{policy}: threshold_for_share({share:g}) for rule {rule!r} gave "
                f"{value!r}; a percentile threshold must lie in [0, 1]"
            )
        # 1 - (0.02 + 0.28) is 0.6999999999999999: round off float noise, keep real digits.
        return round(value, 12)

    def fallback_chain(
        self, backend: str, override: tuple[str, ...] | None = None
    ) -> tuple[str, ...]:
        """Backends to try after ``backend`` fails: ``override`` (else ``backend``'s own
        fallbacks), each followed depth-first by its fallbacks; no repeats, never ``backend``
        (whose fallbacks are still followed when the chain passes through it)."""
        out: list[str] = []
        seen: set[str] = set()

        def walk(names: tuple[str, ...]) -> None:
            for name in names:
                if name in seen or name not in self._backend_fallbacks:
                    continue
                seen.add(name)
                if name != backend:  # reached again through others: walk on, do not list it
                    out.append(name)
                walk(self._backend_fallbacks[name])

        walk(self._backend_fallbacks.get(backend, ()) if override is None else override)
        return tuple(out)

    # -- queries -----------------------------------------------------------------------------

    @property
    def policy_names(self) -> tuple[str, ...]:
        return tuple(self._policies)

    def policy_for_model(self, model_name: str) -> str | None:
        """The policy routing a virtual model (``auto``), or None when it is not one."""
        virtual = self.settings.virtual_models.get(model_name)
        return None if virtual is None else virtual.policy

    def direct_backend(self, model_name: str) -> str | None:
        """The backend serving ``model_name`` by direct pass-through (a name it lists under
        ``models``), or None (also when ``server.passthrough_direct_models`` is off)."""
        return self._direct.get(model_name)

    def lacking(self, backend: str, needs: Collection[str]) -> tuple[str, ...]:
        """The capabilities of ``needs`` that ``backend`` lacks (an unknown backend lacks
        all), in ``tools, vision, json`` order."""
        have = self._capabilities.get(backend, frozenset())
        return tuple(c for c in CAPABILITIES if c in needs and c not in have)

    def select(self, decision: Decision, needs: Collection[str]) -> Decision:
        """``decision`` with its chain cut to the backends having every capability in
        ``needs``; when its backend lacks one, the first capable backend of the chain becomes
        the backend (``capability_fallback`` names the skipped one and what it lacks).

        Raises :class:`MissingCapability` when no backend of the chain has them all."""
        if not needs:
            return decision
        chain = (decision.backend, *decision.fallbacks)
        capable = tuple(b for b in chain if not self.lacking(b, needs))
        if not capable:
            nowhere = tuple(
                c for c in CAPABILITIES if c in needs and all(self.lacking(b, (c,)) for b in chain)
            )
            wanted = tuple(c for c in CAPABILITIES if c in needs)
            raise MissingCapability(nowhere or wanted, chain)
        if capable == chain:
            return decision
        if capable[0] == decision.backend:
            return replace(decision, fallbacks=capable[1:])
        missing = ",".join(self.lacking(decision.backend, needs))
        return replace(
            decision,
            backend=capable[0],
            fallbacks=capable[1:],
            reason=f"{decision.reason}; {decision.backend} lacks {missing}, so {capable[0]} "
            "answers",
            capability_fallback=f"{decision.backend}:{missing}",
        )

    def needs_probe(self, policy_name: str) -> bool:
        """Whether any rule of the policy looks at the probe (percentile, share, score, metric,
        n_tokens); when not, the gateway can skip probing."""
        return self._policy(policy_name).needs_probe

    def thresholds(self, policy_name: str) -> dict[str, float]:
        """Rule name -> percentile threshold, for the policy's ``share`` rules."""
        return {
            r.name: r.threshold for r in self._policy(policy_name).rules if r.threshold is not None
        }

    def _policy(self, name: str) -> _Policy:
        try:
            return self._policies[name]
        except KeyError:
            known = ", ".join(sorted(self._policies))
            raise PolicyError(f"unknown policy {name!r}; known: {known}") from None

    # -- deciding ----------------------------------------------------------------------------

    def decide(
        self,
        policy_name: str,
        result: ProbeResult | None,
        context: RequestContext,
        *,
        probe_failed: bool = False,
    ) -> Decision:
        """Route one request. Pure; raises only :class:`PolicyError` for an unknown policy."""
        policy = self._policy(policy_name)
        if not context.has_text:
            return self._decide_no_text(policy, context)
        probe = None if probe_failed else result
        missing = probe is None and policy.needs_probe
        for rule in policy.rules:
            why = _context_reasons(rule.when, context)
            if why is None:
                continue
            if rule.needs_probe:
                if probe is None:
                    cause = "the probe failed" if probe_failed else "there is no probe result"
                    return Decision(
                        backend=policy.on_probe_error,
                        fallbacks=policy.on_probe_error_fallbacks,
                        rule=ON_PROBE_ERROR_RULE,
                        policy=policy.name,
                        reason=f"{cause} and rule {rule.name} needs it",
                        probe_error=True,
                    )
                probe_why = self._probe_reasons(rule, probe)
                if probe_why is None:
                    continue
                why += probe_why
                if rule.best_of is not None:
                    try:
                        chosen = self._best_of(rule, probe, policy.name, why)
                    except (TypeError, ValueError, KeyError, IndexError):
                        chosen = None  # malformed predictions match nothing
                    if chosen is None:
                        continue
                    return chosen
            return rule.decision(policy.name, why, probe_error=missing)
        return Decision(
            backend=policy.default,
            fallbacks=policy.default_fallbacks,
            rule=DEFAULT_RULE,
            policy=policy.name,
            reason="no rule matched",
            probe_error=missing,
        )

    def _decide_no_text(self, policy: _Policy, context: RequestContext) -> Decision:
        """A request with nothing to probe: request-side rules, then ``on_no_text``."""
        cause = "no rule matched"
        for rule in policy.rules:
            why = _context_reasons(rule.when, context)
            if why is None:
                continue
            if rule.needs_probe:
                cause = f"rule {rule.name} needs the probe"
                break
            return rule.decision(policy.name, why)
        return Decision(
            backend=policy.on_no_text,
            fallbacks=policy.on_no_text_fallbacks,
            rule=NO_TEXT_RULE,
            policy=policy.name,
            reason=f"the request holds no text to probe (only image, audio or file parts, or "
            f"blank text) and {cause}",
        )

    def _best_of(
        self, rule: _Rule, result: ProbeResult, policy: str, why: list[str]
    ) -> Decision | None:
        """The decision of a ``best_of`` rule whose conditions hold (None: the result carries
        no prediction for one of its models)."""
        best = rule.best_of
        assert best is not None
        predicted = result.qualities
        if predicted is None or any(_number(predicted[m][0]) is None for m in rule.models):
            return None
        quality = {
            b: float(predicted[m][0]) for b, m in zip(best.best_of, rule.models, strict=True)
        }
        cost = {b: float(predicted[m][1]) for b, m in zip(best.best_of, rule.models, strict=True)}
        cap = best.max_cost
        allowed = [b for b in best.best_of if cap is None or cost[b] <= cap[0]]
        if not allowed:  # every backend costs more than the cap: the cheapest
            allowed = [min(best.best_of, key=lambda b: cost[b])]
        lam = best.willingness_to_pay
        chosen = pick(quality, cost, willingness_to_pay=lam, allowed=allowed)
        ranked = sorted(
            (b for b in best.best_of if b != chosen),
            key=lambda b: (-(quality[b] - lam * cost[b]), cost[b]),
        )
        override = rule.override if rule.override is not None else tuple(ranked)
        model = rule.models[best.best_of.index(chosen)]
        return Decision(
            backend=chosen,
            fallbacks=self.fallback_chain(chosen, override),
            rule=rule.name,
            policy=policy,
            reason=f"rule {rule.name}: "
            + "; ".join(
                [
                    *why,
                    f"best of {', '.join(best.best_of)}: {chosen} ({model}) predicted quality "
                    f"{_fmt(quality[chosen])}, cost {_fmt(cost[chosen])}"
                    + (f", willingness to pay {_fmt(lam)}" if lam else ""),
                ]
            ),
            model=model,
            predicted_quality=quality[chosen],
        )

    def _probe_reasons(self, rule: _Rule, result: ProbeResult) -> list[str] | None:
        try:
            return self._probe_reasons_unchecked(rule, result)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError):
            return None  # a malformed result matches nothing

    def _probe_reasons_unchecked(self, rule: _Rule, result: ProbeResult) -> list[str] | None:
        when = rule.when
        why: list[str] = []
        if rule.threshold is not None:
            p = _number(result.percentile)
            if p is None or not p >= rule.threshold:
                return None
            why.append(
                f"percentile {_fmt(p)} >= {_fmt(rule.threshold)} "
                f"(share {_fmt(when.share or 0.0)}, cumulative {_fmt(rule.share or 0.0)})"
            )
        if when.percentile is not None:
            p = _number(result.percentile)
            if p is None or not when.percentile.contains(p):
                return None
            why.append(f"percentile {_fmt(p)} in {when.percentile.describe()}")
        if when.p_large is not None:
            p = _number(result.p_large)
            if p is None or not when.p_large.contains(p):
                return None
            why.append(f"p_large {_fmt(p)} in {when.p_large.describe()}")
        if when.score is not None:
            s = _number(result.score)
            if s is None or not when.score.contains(s):
                return None
            why.append(f"score {_fmt(s)} in {when.score.describe()}")
        if when.n_tokens is not None:
            n = result.n_tokens
            if not isinstance(n, int) or not when.n_tokens.contains(n):
                return None
            why.append(f"n_tokens {n} in {when.n_tokens.describe()}")
        metric = when.metric
        if metric is not None:
            layer = metric.layer
            if layer < 0 and self.n_layers is not None:
                layer = self.n_layers + 1 + layer
            table = result.metrics if metric.position == "last" else result.metrics_mean
            if table is None or layer not in table:
                return None
            value = _number(table[layer].get(metric.name))
            if value is None or not metric.contains(value):
                return None
            why.append(
                f"{metric.name}@L{layer}/{metric.position} {_fmt(value)} in {metric.describe()}"
            )
        return why


def backend_model(settings: Settings, backend: str) -> str:
    """The model a backend serves, as an N-way model names it: its ``model``, else its name."""
    model = getattr(settings.backends.get(backend), "model", None)
    return model if isinstance(model, str) and model else backend


def best_of_problems(
    settings: Settings, models: Collection[str] | None, cost_unit: str | None
) -> list[str]:
    """What stops the ``best_of`` rules of ``settings`` from using an N-way model with
    ``models`` (None: there is none) and costs in ``cost_unit``; each problem names its YAML
    path."""
    problems: list[str] = []
    for pname, policy in settings.policies.items():
        for i, rule in enumerate(policy.rules):
            best = rule.route
            if not isinstance(best, BestOf):
                continue
            loc = f"policies.{pname}.rules[{i}].route"
            if models is None:
                problems.append(
                    f"{loc}: best_of needs the calibration's N-way model, and it has none. Fix: "
                    "fit one with sparsity-router calibrate --labels FILE --models a,b,c"
                )
                continue
            for j, backend in enumerate(best.best_of):
                model = backend_model(settings, backend)
                if model not in models:
                    problems.append(
                        f"{loc}.best_of[{j}]: backend {backend!r} serves model {model!r}, which "
                        f"the calibration's N-way model does not predict (it has "
                        f"{', '.join(sorted(models))}). Fix: set the backend's model to one of "
                        "them, or refit with --models naming it"
                    )
            cap = best.max_cost
            if cap is not None and cap[1] != cost_unit:
                field = "max_cost_per_mtok" if cap[1] == "usd_per_mtok" else "max_cost_per_request"
                problems.append(
                    f"{loc}.{field}: the calibration's costs are in {cost_unit}, not {cap[1]}. "
                    "Fix: use the other cap, or refit with the other kind of cost"
                )
    return problems


def _number(value: object) -> float | None:
    """A real number, or None (None, NaN, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    x = float(value)
    return None if math.isnan(x) else x


def _context_reasons(when: Condition, context: RequestContext) -> list[str] | None:
    """Reasons the request-side conditions hold, or None when one does not."""
    why: list[str] = []
    if when.always:
        why.append("always")
    if when.has_text is not None:
        if when.has_text != context.has_text:
            return None
        why.append("has text" if context.has_text else "no text")
    if when.has_tools is not None:
        if when.has_tools != context.has_tools:
            return None
        why.append("has tools" if context.has_tools else "no tools")
    if when.has_images is not None:
        if when.has_images != context.has_images:
            return None
        why.append("has images" if context.has_images else "no images")
    if when.response_format is not None:
        if context.response_format not in when.response_format:
            return None
        why.append(f"response_format {context.response_format}")
    if when.n_messages is not None:
        n = context.n_messages
        if n is None or not when.n_messages.contains(n):
            return None
        why.append(f"n_messages {n} in {when.n_messages.describe()}")
    if when.model is not None:
        if context.model is None or context.model not in when.model:
            return None
        why.append(f"model {context.model!r}")
    if when.user is not None:
        if context.user is None or context.user not in when.user:
            return None
        why.append(f"user {context.user!r}")
    for source, wanted in (("header", when.header), ("metadata", when.metadata)):
        if wanted is None:
            continue
        have = context.headers if source == "header" else context.metadata
        for key, values in wanted.items():
            value = have.get(key)
            if value is None or str(value) not in values:
                return None
            why.append(f"{source} {key}={str(value)!r}")
    return why
