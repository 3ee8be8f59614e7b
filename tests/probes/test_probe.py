"""SparsityProbe on a tiny random-init Llama (fast) and the real bundled SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from probes.errors import ProbeInputError
from probes.metric_names import METRIC_NAMES, sparsity
from probes.metrics import compute_all
from probes.probe import SparsityProbe
from probes.types import ProbeResult, ProbeSettings

TEXTS = [
    "What is two plus two?",
    "Janet has 16 eggs; she eats 3 and bakes with 4. How many are left to sell?",
    "qz xv kk wp",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour le monde"}],
]


def _max_diff(a: list[ProbeResult], b: list[ProbeResult]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.n_tokens == y.n_tokens
        for table_x, table_y in ((x.metrics, y.metrics), (x.metrics_mean, y.metrics_mean)):
            assert table_x is not None and table_y is not None
            for layer, values in table_x.items():
                for name, v in values.items():
                    worst = max(worst, abs(v - table_y[layer][name]))
        worst = max(worst, abs(x.score - y.score))
    return worst


def test_batch_equals_alone(tiny_probe: SparsityProbe) -> None:
    together = tiny_probe.measure(TEXTS, batch_size=4)
    alone = [tiny_probe.measure_one(t) for t in TEXTS]
    assert _max_diff(together, alone) < 1e-4
    # and in a different order / batch size
    reordered = tiny_probe.measure(list(reversed(TEXTS)), batch_size=3)
    assert _max_diff(together, list(reversed(reordered))) < 1e-4


def test_matches_full_forward_hidden_states(tiny_probe: SparsityProbe) -> None:
    """Early exit reads exactly what output_hidden_states reports (last layer after the norm)."""
    model = tiny_probe.loaded.model
    for text in TEXTS:
        ids, _ = tiny_probe.encode(text)
        with torch.inference_mode():
            full = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        result = tiny_probe.measure_one(text)
        for layer in tiny_probe.layers:
            expected = compute_all(full[layer][0, -1])
            for name in METRIC_NAMES:
                assert result.metrics[layer][name] == pytest.approx(
                    float(expected[name]), abs=1e-5
                ), (layer, name)


def test_layers_resolve_and_score_is_oriented(tiny_probe: SparsityProbe) -> None:
    assert tiny_probe.n_layers == 4
    assert tiny_probe.layers == (1, 2, 4)  # -1 -> 4
    r = tiny_probe.measure_one("hello world")
    assert set(r.metrics) == {1, 2, 4}
    assert r.metrics_mean is not None and set(r.metrics_mean) == {1, 2, 4}
    s = tiny_probe.settings
    raw = r.metrics[tiny_probe.score_layer][s.score_metric]
    assert r.score == pytest.approx(sparsity(s.score_metric, raw))


def test_runs_only_up_to_the_deepest_layer(tiny_model_dir: object) -> None:
    probe = SparsityProbe(ProbeSettings(model=str(tiny_model_dir), layers=(2,), score_layer=2))
    called: list[str] = []
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: called.append(f"layer{i}"))
        for i, layer in enumerate(probe.loaded.model.model.layers, start=1)
    ]
    handles.append(
        probe.loaded.model.lm_head.register_forward_hook(lambda *_a: called.append("lm_head"))
    )
    handles.append(
        probe.loaded.model.model.norm.register_forward_hook(lambda *_a: called.append("norm"))
    )
    try:
        probe.measure_one("hello world")
    finally:
        for h in handles:
            h.remove()
    assert called == ["layer1", "layer2"]


def test_score_position_mean_and_other_metric(tiny_model_dir: object) -> None:
    probe = SparsityProbe(
        ProbeSettings(
            model=str(tiny_model_dir),
            layers=(1,),
            score_layer=-2,
            score_metric="effective_rank",
            score_position="mean",
        )
    )
    assert probe.layers == (1, 3)
    r = probe.measure_one("hello world, how are you?")
    assert r.metrics_mean is not None
    assert r.score == pytest.approx(1.0 - r.metrics_mean[3]["effective_rank"])


def test_long_input_keeps_its_tail(tiny_model_dir: object) -> None:
    probe = SparsityProbe(ProbeSettings(model=str(tiny_model_dir), layers=(-1,), max_tokens=32))
    long_text = "the quick brown fox " * 5000 + "TAIL MARKER"  # 100k characters
    assert len(long_text) >= 100_000
    ids, truncated = probe.encode(long_text)
    assert truncated and len(ids) == 32
    decoded = probe.loaded.tokenizer.decode(ids)
    assert "TAIL MARKER" in decoded and decoded.rstrip().endswith("assistant")
    r = probe.measure_one(long_text)
    assert r.truncated and r.n_tokens == 32
    short = probe.measure_one("hello")
    assert not short.truncated


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "input 0 is empty"),
        ("   \n", "input 0 is empty"),
        ([], "no message text"),
        ([{"role": "user", "content": "  "}], "no message text"),
        ([{"content": "hi"}], "'role' must be a non-empty string"),
        ([{"role": "user", "content": 42}], "'content' must be a string"),
        (["just a string"], "expected an object with role/content"),
        (42, "give a string or a list of chat messages"),
    ],
)
def test_bad_input_gives_clear_error(tiny_probe: SparsityProbe, bad: object, message: str) -> None:
    with pytest.raises(ProbeInputError, match=message):
        tiny_probe.measure([bad])  # type: ignore[list-item]


def test_content_parts_are_flattened(tiny_probe: SparsityProbe) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    assert tiny_probe.render(parts) == tiny_probe.render("hello world")


@pytest.mark.parametrize("layer", [5, -5, 99])
def test_layer_beyond_depth_is_refused(tiny_model_dir: object, layer: int) -> None:
    with pytest.raises(ProbeInputError, match=r"out of range .*4 layers.*use 0\.\.4"):
        SparsityProbe(ProbeSettings(model=str(tiny_model_dir), layers=(layer,)))


def test_settings_validate_metric_names() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        ProbeSettings(score_metric="sparseness")
    with pytest.raises(ValueError, match="must be one of metrics"):
        ProbeSettings(metrics=("hoyer",), score_metric="gini")
    with pytest.raises(ValueError, match="extra"):
        ProbeSettings(layer=3)  # type: ignore[call-arg]


def test_result_json_round_trip(tiny_probe: SparsityProbe) -> None:
    r = tiny_probe.measure_one("hello world")
    data = r.to_dict()
    assert set(data["metrics"]) == {"L1", "L2", "L4"}
    assert ProbeResult.from_dict(data) == r


def test_fingerprint_names_what_changes_numbers(tiny_probe: SparsityProbe) -> None:
    fp = tiny_probe.fingerprint()
    assert fp["layer"] == 4 and fp["metric"] == tiny_probe.settings.score_metric
    assert fp["n_layers"] == 4 and fp["dtype"] == "float32" and fp["code_version"]


@pytest.mark.slow
def test_bundled_model_gives_stable_numbers(bundled_probe: SparsityProbe) -> None:
    assert bundled_probe.n_layers == 30 and bundled_probe.loaded.hidden_size == 576
    clean = "Janet's ducks lay 16 eggs per day. How many eggs does she sell?"
    noisy = "Jxnet's dcks lqy 16 egs pr dya. Hw mnay egsg dose seh slel?"
    first = bundled_probe.measure([clean, noisy])
    again = bundled_probe.measure([noisy, clean])
    assert _max_diff(first, list(reversed(again))) < 1e-4
    for r in first:
        assert r.n_tokens > 30 and 0.0 < r.score < 1.0
        assert set(r.metrics) == {1, 8, 30}
    # The published direction: character noise reads sparser at the last layer.
    assert first[1].metrics[30]["top1_energy"] > first[0].metrics[30]["top1_energy"]


@pytest.mark.slow
def test_prefix_cache_gives_the_plain_numbers(bundled_probe: SparsityProbe) -> None:
    """The cached chat-template opening changes no metric, last token or token mean, alone or
    in a left-padded batch of different lengths (the system message case has its own opening
    and takes the plain path)."""
    cached = SparsityProbe(bundled_probe.settings.model_copy(update={"prefix_cache": True}))
    assert cached.fingerprint() == bundled_probe.fingerprint()
    plain = bundled_probe.measure(TEXTS, batch_size=4)
    assert _max_diff(cached.measure(TEXTS, batch_size=4), plain) < 1e-4
    assert _max_diff([cached.measure_one(t) for t in TEXTS], plain) < 1e-4
    prefix = cached._template_prefix()
    assert prefix is not None and len(prefix.ids) >= 10  # the system prompt really was cached


def test_state_layers_carry_the_pooled_hidden_vectors(tiny_model_dir: object) -> None:
    """state_layers: the result carries the layer's hidden vector at the last token and its
    token mean (first, sink token left out), as output_hidden_states reports them."""
    probe = SparsityProbe(
        ProbeSettings(model=str(tiny_model_dir), layers=(1,), state_layers=(2, -1), device="cpu")
    )
    assert probe.state_layers == (2, 4) and probe.deepest_layer == 4
    assert probe.layers == (1,)  # metrics only where asked
    model = probe.loaded.model
    for text, result in zip(TEXTS, probe.measure(TEXTS, batch_size=4), strict=True):
        ids, _ = probe.encode(text)
        with torch.inference_mode():
            full = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        assert result.states is not None and set(result.states) == {
            "L2.last",
            "L2.mean",
            "L4.last",
            "L4.mean",
        }
        assert set(result.metrics) == {1} and result.metrics_mean is None
        for layer in (2, 4):
            last = torch.tensor(result.states[f"L{layer}.last"], dtype=torch.float64)
            mean = torch.tensor(result.states[f"L{layer}.mean"], dtype=torch.float64)
            assert torch.allclose(last, full[layer][0, -1].double(), atol=1e-4)
            assert torch.allclose(mean, full[layer][0, 1:].mean(0).double(), atol=1e-4)
        # exact JSON round trip (float32 values, base64)
        again = ProbeResult.from_dict(json.loads(json.dumps(result.to_dict())))
        assert again == result
    plain = SparsityProbe(ProbeSettings(model=str(tiny_model_dir), layers=(1,), device="cpu"))
    assert plain.measure_one("hi").states is None
    assert "states" not in plain.measure_one("hi").to_dict()


def test_state_vectors_survive_the_prefix_cache(tiny_model_dir: object) -> None:
    settings = ProbeSettings(model=str(tiny_model_dir), layers=(1,), state_layers=(3,))
    plain = SparsityProbe(settings)
    cached = SparsityProbe(settings.model_copy(update={"prefix_cache": True}), loaded=plain.loaded)
    assert cached._template_prefix() is not None  # the cached path is the one under test
    for a, b in zip(plain.measure(TEXTS), cached.measure(TEXTS), strict=True):
        assert a.states is not None and b.states is not None
        for block in ("L3.last", "L3.mean"):
            assert torch.allclose(
                torch.tensor(a.states[block]), torch.tensor(b.states[block]), atol=1e-4
            )


def test_stored_state_vector_must_be_float32_bytes() -> None:
    data = {
        "n_tokens": 3,
        "score": 0.5,
        "metrics": {"L1": {"gini": 0.5}},
        "states": {"L1.last": "AAA="},
    }
    with pytest.raises(ValueError, match="float32"):
        ProbeResult.from_dict(data)
