"""The A/B experiments report (``sparsity-router experiments report NAME``): how the arms of an
experiment compare.

:func:`read_experiment_records` reads the event records (see :mod:`router.events`) of the
configured sink; :func:`build_report` keeps the ``request`` records of experiment NAME and joins
the ``feedback`` records to them by request id (a request's feedback score is the mean of its
scored feedback records). Per arm:

- requests, and the share answered with an error (status >= 400);
- the share of requests per backend (errors included, as backend ``-`` when none was chosen);
- latency p50/p95 (seconds, answered requests, linear interpolation between order statistics);
- cost per answered request (mean over those with a known cost: token counts and a price);
- mean feedback score with a 95% percentile-bootstrap CI (seeded, ``resamples`` resamples);
- the calibrations its requests were routed with (an arm with its own ``calibration``).

Between each arm and the control arm: Welch's t-test on the feedback scores. Across arms: a
chi-square test of independence of arm and backend (does the arm change where traffic goes?).
Output: a markdown table (:func:`to_markdown`) and a PNG (:func:`plot_report`); the statistics
are in :mod:`evaluation.stats`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.stats import TestResult, bootstrap_mean_ci, chi_square_independence, welch_t_test
from policies.loader import default_config_path, load_settings
from probes.errors import RouterError
from router.events import Event, FeedbackEvent, RequestEvent, open_sink, read_events

__all__ = [
    "ArmStats",
    "Comparison",
    "ExperimentReport",
    "ReportError",
    "build_report",
    "plot_report",
    "read_experiment_records",
    "to_markdown",
]


class ReportError(RouterError):
    """The report cannot be made (no events, unreadable sink, ...)."""


@dataclass(frozen=True, slots=True)
class ArmStats:
    arm: str
    requests: int
    errors: int
    backend_share: dict[str, float]
    backend_counts: dict[str, int]
    latency_p50: float | None
    latency_p95: float | None
    cost_per_request: float | None
    cost_known: int
    feedback_n: int
    feedback_mean: float | None
    feedback_ci: tuple[float, float] | None
    labels: dict[str, int] = field(default_factory=dict)
    #: calibration id -> requests routed with it (an arm carrying ``calibration`` has its own)
    calibrations: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Comparison:
    arm: str
    control: str
    difference: float | None  # mean feedback: arm - control
    test: TestResult


@dataclass(frozen=True, slots=True)
class ExperimentReport:
    experiment: str
    control: str
    arms: tuple[ArmStats, ...]
    comparisons: tuple[Comparison, ...]
    backends_test: TestResult
    resamples: int
    seed: int


def _quantile(values: list[float], q: float) -> float | None:
    return float(np.quantile(np.asarray(values), q)) if values else None


def build_report(
    events: Iterable[Event],
    experiment: str,
    *,
    control: str | None = None,
    arm_order: Iterable[str] = (),
    resamples: int = 2000,
    seed: int = 0,
) -> ExperimentReport:
    """Per-arm statistics of ``experiment`` from typed event records (any order).

    ``control``: the arm others are compared with (default: the first of ``arm_order``, else
    the arm names sorted). ``arm_order``: arms to list first, in this order (the config's).
    """
    requests: dict[str, RequestEvent] = {}
    scores: dict[str, list[float]] = defaultdict(list)
    labels: dict[str, list[str]] = defaultdict(list)
    for event in events:
        if isinstance(event, RequestEvent):
            if event.experiment == experiment and event.arm:
                requests[event.request_id] = event
        elif isinstance(event, FeedbackEvent):
            if event.score is not None:
                scores[event.request_id].append(event.score)
            if event.label:
                labels[event.request_id].append(event.label)
    if not requests:
        raise ReportError(
            f"no request events for experiment {experiment!r}: check the name, that "
            "the experiment is in the config and that events are recorded (events.sink)"
        )
    by_arm: dict[str, list[RequestEvent]] = defaultdict(list)
    for r in requests.values():
        by_arm[str(r.arm)].append(r)
    order = [a for a in arm_order if a in by_arm] + sorted(set(by_arm) - set(arm_order))
    control = control if control is not None else (order[0] if order else None)
    if control not in by_arm:
        raise ReportError(
            f"control arm {control!r} has no requests; arms with requests: {', '.join(order)}"
        )

    arms: list[ArmStats] = []
    feedback: dict[str, list[float]] = {}
    for i, arm in enumerate(order):
        rows = by_arm[arm]
        answered = [r for r in rows if r.status is not None and r.status < 400]
        latencies = [r.latency_s for r in answered if r.latency_s is not None]
        costs = [r.cost for r in answered if r.cost is not None]
        counts = Counter(r.backend or "-" for r in rows)
        arm_scores = [
            float(np.mean(scores[r.request_id])) for r in rows if scores.get(r.request_id)
        ]
        feedback[arm] = arm_scores
        arm_labels = Counter(label for r in rows for label in labels.get(r.request_id, ()))
        arms.append(
            ArmStats(
                arm=arm,
                requests=len(rows),
                errors=len(rows) - len(answered),
                backend_share={b: n / len(rows) for b, n in sorted(counts.items())},
                backend_counts=dict(sorted(counts.items())),
                latency_p50=_quantile(latencies, 0.5),
                latency_p95=_quantile(latencies, 0.95),
                cost_per_request=float(np.mean(costs)) if costs else None,
                cost_known=len(costs),
                feedback_n=len(arm_scores),
                feedback_mean=float(np.mean(arm_scores)) if arm_scores else None,
                feedback_ci=bootstrap_mean_ci(arm_scores, resamples=resamples, seed=seed + i),
                labels=dict(arm_labels.most_common()),
                calibrations=dict(
                    Counter(r.calibration for r in rows if r.calibration).most_common()
                ),
            )
        )
    comparisons = []
    for stats in arms:
        if stats.arm == control:
            continue
        a, c = feedback[stats.arm], feedback[control]
        diff = float(np.mean(a) - np.mean(c)) if a and c else None
        comparisons.append(Comparison(stats.arm, control, diff, welch_t_test(a, c)))
    backends = sorted({b for s in arms for b in s.backend_counts})
    table = [[s.backend_counts.get(b, 0) for b in backends] for s in arms]
    return ExperimentReport(
        experiment=experiment,
        control=control,
        arms=tuple(arms),
        comparisons=tuple(comparisons),
        backends_test=chi_square_independence(table),
        resamples=resamples,
        seed=seed,
    )


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 1e-4" if p < 1e-4 else f"{p:.4f}"


def to_markdown(report: ExperimentReport) -> str:
    """The report as markdown: a per-arm table, the tests, and how to read them."""
    out = [
        f"# Experiment `{report.experiment}`",
        "",
        f"Control arm: `{report.control}`. Feedback CI: 95% percentile bootstrap of the mean "
        f"({report.resamples} resamples, seed {report.seed}).",
        "",
        "| arm | requests | errors | backends | latency p50 (ms) | latency p95 (ms) "
        "| cost / request | feedback n | mean feedback | 95% CI |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in report.arms:
        shares = ", ".join(f"{b} {v:.1%}" for b, v in s.backend_share.items())
        ci = "n/a" if s.feedback_ci is None else f"[{s.feedback_ci[0]:.3f}, {s.feedback_ci[1]:.3f}]"
        cost = _f(s.cost_per_request, ".6f")
        if s.cost_per_request is not None and s.cost_known < s.requests - s.errors:
            cost += f" ({s.cost_known} priced)"
        out.append(
            f"| {s.arm} | {s.requests} | {s.errors} | {shares} | {_ms(s.latency_p50)} "
            f"| {_ms(s.latency_p95)} | {cost} | {s.feedback_n} | {_f(s.feedback_mean)} | {ci} |"
        )
    out += ["", "## Feedback: each arm against the control (Welch's t-test, two-sided)", ""]
    out += ["| arm | vs | difference in mean | t | df | p |", "|---|---|---:|---:|---:|---:|"]
    for c in report.comparisons:
        out.append(
            f"| {c.arm} | {c.control} | {_f(c.difference, '+.3f')} | {_f(c.test.statistic)} "
            f"| {_f(c.test.df, '.1f')} | {_p(c.test.p_value)} |"
        )
    bt = report.backends_test
    out += [
        "",
        "## Backend shares: arm × backend (chi-square test of independence)",
        "",
        f"chi² = {_f(bt.statistic)}, df = {_f(bt.df, '.0f')}, p = {_p(bt.p_value)}",
        "",
    ]
    out += _counts(
        "Calibrations (x-router-calibration): requests routed with each",
        {s.arm: s.calibrations for s in report.arms},
    )
    out += _counts("Feedback labels", {s.arm: s.labels for s in report.arms})
    return "\n".join(out)


def _counts(title: str, by_arm: dict[str, dict[str, int]]) -> list[str]:
    """A markdown section listing each arm's counts (none when no arm has any)."""
    lines = [
        f"- {arm}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        for arm, counts in by_arm.items()
        if counts
    ]
    return [f"## {title}", "", *lines, ""] if lines else []


def plot_report(report: ExperimentReport, path: str | Path, *, dpi: int = 110) -> Path:
    """A PNG with three panels per arm: mean feedback with its CI, latency p50/p95, and the
    backend shares (stacked)."""
    path = Path(path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(
            "the PNG needs matplotlib, which is not installed. Fix: pip install matplotlib "
            "(or sparsity-router[eval]), or pass --no-plot"
        ) from None
    names = [s.arm for s in report.arms]
    x = np.arange(len(names))
    fig = Figure(figsize=(12, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_fb, ax_lat, ax_be = fig.subplots(1, 3)
    means = [s.feedback_mean if s.feedback_mean is not None else np.nan for s in report.arms]
    lo = [
        m - s.feedback_ci[0] if s.feedback_ci else 0
        for m, s in zip(means, report.arms, strict=True)
    ]
    hi = [
        s.feedback_ci[1] - m if s.feedback_ci else 0
        for m, s in zip(means, report.arms, strict=True)
    ]
    ax_fb.bar(x, means, yerr=[lo, hi], capsize=6, color="C0")
    ax_fb.set(xticks=x, xticklabels=names, title="mean feedback (95% bootstrap CI)")
    p50 = [s.latency_p50 if s.latency_p50 is not None else np.nan for s in report.arms]
    p95 = [s.latency_p95 if s.latency_p95 is not None else np.nan for s in report.arms]
    ax_lat.bar(x - 0.2, p50, 0.4, label="p50")
    ax_lat.bar(x + 0.2, p95, 0.4, label="p95")
    ax_lat.set(xticks=x, xticklabels=names, title="latency (s)")
    ax_lat.legend()
    backends = sorted({b for s in report.arms for b in s.backend_share})
    bottom = np.zeros(len(names))
    for j, b in enumerate(backends):
        share = np.array([s.backend_share.get(b, 0.0) for s in report.arms])
        ax_be.bar(x, share, bottom=bottom, label=b, color=f"C{j % 10}")
        bottom += share
    ax_be.set(xticks=x, xticklabels=names, title="share of requests per backend", ylim=(0, 1))
    ax_be.legend()
    fig.suptitle(f"experiment {report.experiment} (control: {report.control})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def read_experiment_records(
    config: str | Path | None, name: str
) -> tuple[list[Event], str | None, list[str]]:
    """Typed events from the sink configured in ``config`` (default: the embedded config), and
    experiment ``name``'s control arm and arm order in that config (None and [] when the config
    does not define it)."""
    settings = load_settings(config or default_config_path())
    events = settings.events
    if events is None or events.sink == "none":
        raise ReportError(
            "the config records no events (events.sink is none or the events section is "
            "missing): there is nothing to report"
        )
    path = settings.resolve_path(events.path)
    if events.sink in ("sqlite", "jsonl") and not path.is_file():
        raise ReportError(f"no event file at {path} (events.path): has the gateway run yet?")
    try:
        sink = open_sink(
            events.sink,
            path=path,
            redis_url=events.redis_url,
            stream=events.stream,
            max_len=events.max_len,
        )
        try:
            records = list(read_events(sink))
        finally:
            sink.close()
    except ReportError:
        raise
    except Exception as exc:
        raise ReportError(f"could not read events from the {events.sink} sink: {exc}") from exc
    experiment = next((e for e in settings.experiments if e.name == name), None)
    if experiment is None:
        return records, None, []
    return records, experiment.control_arm.name, [a.name for a in experiment.arms]
