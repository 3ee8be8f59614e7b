"""Cross-checks between sections: what no single section can check on its own.

Unknown backends and policies, fallback cycles, rules whose condition implies a capability
(``has_tools: true``) that no backend of their chain has, human backends used as fallbacks,
percentile rules without a calibration, metrics the probe does not measure, cascades without an
answer calibration, direct models clashing with virtual ones, experiments on unknown models,
labelling's backends and filters (and the events sink that stores its labels).
Every problem is a ``(loc, message)`` pair with ``loc`` from the root of the file;
:class:`~policies.schema.settings.Settings` raises them all at once as
:class:`~policies.schema.common.SchemaProblems`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from policies.schema.backends import HumanBackend, LocalBackend, OpenAIBackend
from policies.schema.common import NAME_PATTERN, Loc, Problem, known_names
from policies.schema.escalation import EscalationSettings, EventsSettings
from policies.schema.experiments import Experiment
from policies.schema.labelling import LabellingSettings
from policies.schema.probe import CacheSettings, CalibrationSettings, ProbeSection
from policies.schema.rules import BestOf, Cascade, Policy, Rule, VirtualModel

__all__ = ["cross_check"]

_AnyBackend = OpenAIBackend | LocalBackend | HumanBackend


def cross_check(
    *,
    probe: ProbeSection,
    calibration: CalibrationSettings,
    cache: CacheSettings,
    backends: Mapping[str, _AnyBackend],
    virtual_models: Mapping[str, VirtualModel],
    virtual_models_given: bool,
    policies: Mapping[str, Policy],
    experiments: Sequence[Experiment],
    escalation: EscalationSettings | None,
    labelling: LabellingSettings | None = None,
    events: EventsSettings | None = None,
) -> list[Problem]:
    """Every problem between these sections, in a stable order (backends, policies, virtual
    models, experiments). ``virtual_models_given``: whether the file set ``virtual_models``
    (else the built-in default applies, which an error message explains); ``labelling`` is
    checked against the backends, policies, virtual models and ``events``."""
    checker = _Checker(
        probe=probe,
        calibration=calibration,
        cache=cache,
        backends=backends,
        virtual_models=virtual_models,
        virtual_models_given=virtual_models_given,
        policies=policies,
        experiments=experiments,
        escalation=escalation,
    )
    return [
        *checker.check_backends(),
        *checker.check_policies(),
        *checker.check_models(),
        *checker.check_experiments(),
        *(checker.check_labelling(labelling, events) if labelling and labelling.enabled else []),
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Checker:
    probe: ProbeSection
    calibration: CalibrationSettings
    cache: CacheSettings
    backends: Mapping[str, _AnyBackend]
    virtual_models: Mapping[str, VirtualModel]
    virtual_models_given: bool
    policies: Mapping[str, Policy]
    experiments: Sequence[Experiment]
    escalation: EscalationSettings | None

    def unknown_backend(self, name: str) -> str:
        return f"unknown backend {name!r}; known: {known_names(self.backends)}"

    def check_backends(self) -> list[Problem]:
        problems: list[Problem] = []
        for name, backend in self.backends.items():
            if not NAME_PATTERN.match(name):
                problems.append(
                    (
                        ("backends", name),
                        f"bad backend name {name!r}: use letters, digits, '_', '.' and '-'",
                    )
                )
            if isinstance(backend, HumanBackend):
                problems.extend(self.check_human(name, backend))
            for i, target in enumerate(backend.fallback):
                if target not in self.backends:
                    loc: Loc = ("backends", name, "fallback", i)
                    problems.append((loc, self.unknown_backend(target)))
        problems.extend(self.check_fallback_cycles())
        problems.extend(self.check_human_fallbacks())
        return problems

    def check_human(self, name: str, backend: HumanBackend) -> list[Problem]:
        problems: list[Problem] = []
        target = backend.on_timeout
        if target != "ticket":
            if target not in self.backends:
                problems.append(
                    (
                        ("backends", name, "on_timeout"),
                        f"{self.unknown_backend(target)} (or 'ticket' to answer with a ticket)",
                    )
                )
            elif isinstance(self.backends[target], HumanBackend):
                problems.append(
                    (
                        ("backends", name, "on_timeout"),
                        f"on_timeout {target!r} is a human backend; name an openai or local "
                        "backend, or 'ticket'",
                    )
                )
        esc = self.escalation
        expire_s = (esc or EscalationSettings()).expire_s
        if backend.mode == "hold" and backend.wait_s >= expire_s:
            problems.append(
                (
                    ("backends", name, "wait_s"),
                    f"a hold of {backend.wait_s:g} s outlives escalation.expire_s "
                    f"({expire_s:g} s): the escalation would expire before on_timeout answers. "
                    "Fix: make wait_s shorter than expire_s",
                )
            )
        if esc is not None and esc.store == "redis" and esc.redis_url is None:
            if self.cache.redis is None:
                problems.append(
                    (
                        ("escalation", "redis_url"),
                        "store 'redis' needs escalation.redis_url (or cache.redis.url)",
                    )
                )
        return problems

    def check_human_fallbacks(self) -> list[Problem]:
        """A human backend answers only as a decision's own backend, never as a fallback."""
        problems: list[Problem] = []
        humans = {n for n, b in self.backends.items() if isinstance(b, HumanBackend)}
        msg = (
            "{t!r} is a human backend and cannot be a fallback; route to it with a rule "
            "(route:) instead"
        )
        for name, backend in self.backends.items():
            for i, target in enumerate(backend.fallback):
                if target in humans:
                    problems.append((("backends", name, "fallback", i), msg.format(t=target)))
        for pname, policy in self.policies.items():
            for i, rule in enumerate(policy.rules):
                for j, target in enumerate(rule.fallback or ()):
                    if target in humans:
                        loc: Loc = ("policies", pname, "rules", i, "fallback", j)
                        problems.append((loc, msg.format(t=target)))
            actions = (("default", policy.default), ("on_no_text", policy.on_no_text))
            for action_name, action in actions:
                fallback = action.fallback if action is not None else None
                for j, target in enumerate(fallback or ()):
                    if target in humans:
                        loc = ("policies", pname, action_name, "fallback", j)
                        problems.append((loc, msg.format(t=target)))
        return problems

    def check_fallback_cycles(self) -> list[Problem]:
        """Every cycle of the backends' fallback graph, reported once, at its first backend."""
        problems: list[Problem] = []
        order = {name: i for i, name in enumerate(self.backends)}
        seen_cycles: set[tuple[str, ...]] = set()
        done: set[str] = set()

        def visit(node: str, stack: list[str]) -> None:
            if node in stack:
                cycle = stack[stack.index(node) :]
                start = min(range(len(cycle)), key=lambda k: order[cycle[k]])
                cycle = cycle[start:] + cycle[:start]
                key = tuple(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    head, nxt = cycle[0], cycle[1 % len(cycle)]
                    index = self.backends[head].fallback.index(nxt)
                    shown = " → ".join([*cycle, cycle[0]])
                    problems.append(
                        (("backends", head, "fallback", index), f"fallback cycle {shown}")
                    )
                return
            if node in done or node not in self.backends:
                return
            stack.append(node)
            for nxt in self.backends[node].fallback:
                visit(nxt, stack)
            stack.pop()
            done.add(node)

        for name in self.backends:
            visit(name, [])
        return problems

    def check_action(self, loc: Loc, route: str, fallback: tuple[str, ...] | None) -> list[Problem]:
        problems: list[Problem] = []
        if route not in self.backends:
            problems.append(((*loc, "route"), self.unknown_backend(route)))
        for i, target in enumerate(fallback or ()):
            if target not in self.backends:
                problems.append(((*loc, "fallback", i), self.unknown_backend(target)))
            elif target == route:
                problems.append(
                    (
                        (*loc, "fallback", i),
                        f"fallback cycle {route} → {route}: a backend cannot be its own fallback",
                    )
                )
        return problems

    def check_best_of(
        self, loc: Loc, best: BestOf, fallback: tuple[str, ...] | None
    ) -> list[Problem]:
        """A ``best_of`` route: known, non-human backends, and a calibration to predict with
        (its N-way model is checked against them when the gateway loads it)."""
        problems: list[Problem] = []
        for j, name in enumerate(best.best_of):
            where: Loc = (*loc, "route", "best_of", j)
            if name not in self.backends:
                problems.append((where, self.unknown_backend(name)))
            elif isinstance(self.backends[name], HumanBackend):
                problems.append(
                    (where, f"{name!r} is a human backend; best_of picks among model backends")
                )
        if self.calibration.path is None:
            problems.append(
                (
                    (*loc, "route"),
                    "best_of needs a calibration with an N-way model: set calibration.path to "
                    "one fitted with sparsity-router calibrate --labels FILE --models a,b,c",
                )
            )
        for i, target in enumerate(fallback or ()):
            if target not in self.backends:
                problems.append(((*loc, "fallback", i), self.unknown_backend(target)))
        return problems

    def chain(self, route: str, fallback: tuple[str, ...] | None) -> list[str]:
        """``route`` and every backend its fallbacks (``fallback``, else its own) reach,
        depth-first; unknown names are skipped (reported elsewhere)."""
        out: list[str] = []

        def walk(name: str) -> None:
            if name in out or name not in self.backends:
                return
            out.append(name)
            for nxt in self.backends[name].fallback:
                walk(nxt)

        if route in self.backends:
            out.append(route)
            for name in self.backends[route].fallback if fallback is None else fallback:
                walk(name)
        return out

    def check_rule_capabilities(self, loc: Loc, rule: Rule) -> list[Problem]:
        """A rule whose condition implies a capability (``has_tools: true``: tools,
        ``has_images: true``: vision, ``response_format`` of JSON types only: json) must reach
        a backend that has it, else every request it matches would be refused."""
        when = rule.when
        implied: list[tuple[str, str]] = []
        if when.has_tools:
            implied.append(("has_tools", "tools"))
        if when.has_images:
            implied.append(("has_images", "vision"))
        if when.response_format is not None and "text" not in when.response_format:
            implied.append(("response_format", "json"))
        routes = rule.route.best_of if isinstance(rule.route, BestOf) else (rule.route,)
        chain = list(dict.fromkeys(b for r in routes for b in self.chain(r, rule.fallback)))
        if not chain:
            return []
        problems: list[Problem] = []
        for field, capability in implied:
            if not any(capability in self.backends[b].capabilities for b in chain):
                problems.append(
                    (
                        (*loc, "when", field),
                        f"every request this rule matches needs {capability!r}, but no backend "
                        f"of its chain ({', '.join(chain)}) lists it in capabilities: route it "
                        f"to a backend with {capability}",
                    )
                )
        return problems

    def check_policies(self) -> list[Problem]:
        problems: list[Problem] = []
        measured = set(self.probe.metrics)
        token_mean = self.probe.token_mean or self.probe.score_position == "mean"
        for pname, policy in self.policies.items():
            base: Loc = ("policies", pname)
            if not NAME_PATTERN.match(pname):
                problems.append(
                    (base, f"bad policy name {pname!r}: use letters, digits, '_', '.' and '-'")
                )
            for i, rule in enumerate(policy.rules):
                loc: Loc = (*base, "rules", i)
                if isinstance(rule.route, BestOf):
                    problems.extend(self.check_best_of(loc, rule.route, rule.fallback))
                else:
                    problems.extend(self.check_action(loc, rule.route, rule.fallback))
                problems.extend(self.check_rule_capabilities(loc, rule))
                when = rule.when
                for field in ("percentile", "share", "p_large"):
                    if getattr(when, field) is not None and self.calibration.path is None:
                        problems.append(
                            (
                                (*loc, "when", field),
                                f"{field} conditions need a calibration: set calibration.path "
                                "(or use score, which needs none)",
                            )
                        )
                metric = when.metric
                if metric is not None:
                    if metric.name not in measured:
                        problems.append(
                            (
                                (*loc, "when", "metric", "name"),
                                f"metric {metric.name!r} is not measured by the probe; "
                                f"probe.metrics: {', '.join(self.probe.metrics)}",
                            )
                        )
                    if metric.position == "mean" and not token_mean:
                        problems.append(
                            (
                                (*loc, "when", "metric", "position"),
                                "position 'mean' needs token-mean metrics: set probe.token_mean: "
                                "true",
                            )
                        )
            problems.extend(
                self.check_action((*base, "default"), policy.default.route, policy.default.fallback)
            )
            if policy.on_no_text is not None:
                no_text = policy.on_no_text
                problems.extend(
                    self.check_action((*base, "on_no_text"), no_text.route, no_text.fallback)
                )
            if policy.on_probe_error not in self.backends:
                problems.append(
                    ((*base, "on_probe_error"), self.unknown_backend(policy.on_probe_error))
                )
            if policy.cascade is not None:
                problems.extend(self.check_cascade((*base, "cascade"), policy.cascade))
        return problems

    def check_cascade(self, loc: Loc, cascade: Cascade) -> list[Problem]:
        problems: list[Problem] = []
        for field in ("backend", "escalate_to"):
            name = getattr(cascade, field)
            if name not in self.backends:
                problems.append(((*loc, field), self.unknown_backend(name)))
            elif isinstance(self.backends[name], HumanBackend):
                problems.append(
                    (
                        (*loc, field),
                        f"{name!r} is a human backend; a cascade checks and escalates between "
                        "model backends (route to a human with a rule instead)",
                    )
                )
        if cascade.backend == cascade.escalate_to:
            problems.append(
                ((*loc, "escalate_to"), "escalate_to must differ from the checked backend")
            )
        if self.calibration.answer_path is None:
            problems.append(
                (
                    loc,
                    "a cascade needs an answer calibration: set calibration.answer_path to a "
                    "file from `sparsity-router calibrate --labels FILE --answer-column NAME`",
                )
            )
        return problems

    def check_models(self) -> list[Problem]:
        problems: list[Problem] = []
        for model, virtual in self.virtual_models.items():
            if virtual.policy not in self.policies:
                hint = (
                    ""
                    if self.virtual_models_given
                    else " (virtual_models is not set, so the built-in `auto: {policy: default}` "
                    "applies: name a policy 'default' or set virtual_models)"
                )
                problems.append(
                    (
                        ("virtual_models", model, "policy"),
                        f"unknown policy {virtual.policy!r}; known: "
                        f"{known_names(self.policies)}{hint}",
                    )
                )
        direct: dict[str, str] = {}
        for name, backend in self.backends.items():
            if not isinstance(backend, OpenAIBackend):
                continue
            for i, model in enumerate(backend.models):
                loc: Loc = ("backends", name, "models", i)
                if model in self.virtual_models:
                    problems.append(
                        (loc, f"model {model!r} is also a virtual model; rename one of them")
                    )
                elif model in direct and direct[model] != name:
                    problems.append(
                        (loc, f"model {model!r} is also served by backend {direct[model]!r}")
                    )
                direct.setdefault(model, name)
        return problems

    def check_experiments(self) -> list[Problem]:
        problems: list[Problem] = []
        names: dict[str, int] = {}
        models: dict[str, int] = {}
        for i, exp in enumerate(self.experiments):
            base: Loc = ("experiments", i)
            if not NAME_PATTERN.match(exp.name):
                problems.append(
                    (
                        (*base, "name"),
                        f"bad experiment name {exp.name!r}: use letters, digits, '_', '.' and '-'",
                    )
                )
            elif exp.name in names:
                problems.append(
                    (
                        (*base, "name"),
                        f"duplicate experiment name {exp.name!r} "
                        f"(see experiments[{names[exp.name]}])",
                    )
                )
            names.setdefault(exp.name, i)
            if exp.model not in self.virtual_models:
                problems.append(
                    (
                        (*base, "model"),
                        f"{exp.model!r} is not a virtual model; "
                        f"known: {known_names(self.virtual_models)}",
                    )
                )
            elif exp.model in models:
                problems.append(
                    (
                        (*base, "model"),
                        f"virtual model {exp.model!r} already has an experiment "
                        f"(experiments[{models[exp.model]}]); one experiment per virtual model: "
                        "set enabled: false on the old one or remove it",
                    )
                )
            models.setdefault(exp.model, i)
            for j, arm in enumerate(exp.arms):
                if arm.policy not in self.policies:
                    problems.append(
                        (
                            (*base, "arms", j, "policy"),
                            f"unknown policy {arm.policy!r}; known: {known_names(self.policies)}",
                        )
                    )
                elif arm.calibration is not None:
                    problems.extend(self.check_arm_calibration((*base, "arms", j), arm.policy))
        return problems

    def check_arm_calibration(self, loc: Loc, policy_name: str) -> list[Problem]:
        """An arm's calibration is applied to the probe's reading: its policy must probe and
        route on what a calibration gives (percentile, share, p_large, best_of)."""
        rules = self.policies[policy_name].rules
        if any(r.when.needs_calibration or isinstance(r.route, BestOf) for r in rules):
            return []
        probes = any(r.when.needs_probe for r in rules)
        why = (
            "reads only the raw probe reading (score, metric, n_tokens)"
            if probes
            else "never runs the probe"
        )
        return [
            (
                (*loc, "calibration"),
                f"an arm calibration needs the probe and a policy routing on it: policy "
                f"{policy_name!r} {why}, so the calibration would change nothing. Fix: give "
                "the arm a policy with a percentile, share, p_large or best_of rule, or remove "
                "calibration",
            )
        ]

    def check_labelling(
        self, labelling: LabellingSettings, events: EventsSettings | None
    ) -> list[Problem]:
        """Enabled labelling: the pair and the judge are model backends, the pair two different
        ones, the filters name known policies and models, an events sink stores the labels."""
        problems: list[Problem] = []
        base: Loc = ("labelling",)
        for field in ("small", "large", "judge"):
            name = getattr(labelling, field)
            if name is None:
                continue
            if name not in self.backends:
                problems.append(
                    (
                        (*base, field),
                        f"no backend named {name!r}; known: {known_names(self.backends)}",
                    )
                )
            elif isinstance(self.backends[name], HumanBackend):
                problems.append(
                    (
                        (*base, field),
                        f"{name!r} is a human backend; shadow and judge calls go to model "
                        "backends (openai or local)",
                    )
                )
        if labelling.small == labelling.large:
            problems.append(
                (
                    (*base, "large"),
                    f"large must differ from small (both are {labelling.small!r}): the shadow "
                    "call goes to the backend of the pair that did not answer",
                )
            )
        for i, policy in enumerate(labelling.policies):
            if policy not in self.policies:
                problems.append(
                    (
                        (*base, "policies", i),
                        f"unknown policy {policy!r}; known: {known_names(self.policies)}",
                    )
                )
        for i, model in enumerate(labelling.models):
            if model not in self.virtual_models:
                problems.append(
                    (
                        (*base, "models", i),
                        f"{model!r} is not a virtual model; known: "
                        f"{known_names(self.virtual_models)}",
                    )
                )
        if labelling.judge is None:
            problems.append(
                (
                    (*base, "judge"),
                    "enabled labelling needs a judge: name the backend that compares the "
                    "two answers",
                )
            )
        if events is None or events.sink == "none":
            problems.append(
                (
                    (*base, "enabled"),
                    "labels are stored as event records: add an events section with a "
                    "sink (e.g. events: {sink: sqlite, path: events.sqlite})",
                )
            )
        return problems
