"""``sparsity-router derive-probe``: the folder, name and vLLM command for a config's probe."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from cli.main import main
from probes.derived import derived_name
from probes.served import CONFIG_KEY, FEATURE_ARCHITECTURE

CONFIG = """
probe:
  model: "{model}"
  backend: vllm
  vllm: {{base_url: "http://127.0.0.1:9/v1"}}
  layers: {layers}
  token_mean: {token_mean}
backends:
  small: {{type: openai, base_urls: ["http://127.0.0.1:9/v1"], model: m}}
policies:
  default: {{default: small, on_probe_error: small}}
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPARSITY_ROUTER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _config(tmp_path: Path, model: Path, layers: str, token_mean: bool) -> Path:
    path = tmp_path / "gateway.yaml"
    text = CONFIG.format(model=model, layers=layers, token_mean=str(token_mean).lower())
    path.write_text(text)
    return path


def test_one_layer_gives_the_stock_vllm_folder(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tiny_model_dir, "[2]", token_mean=False)
    assert main(["derive-probe", str(config), "--name"]) == 0
    assert capsys.readouterr().out.strip() == derived_name(tiny_model_dir, 2)
    assert main(["derive-probe", str(config), "--command"]) == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[:2] == ["vllm", "serve"] and "--convert" in command
    assert "--no-enable-prefix-caching" not in command


def test_more_gives_the_feature_folder_and_its_vllm_command(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tiny_model_dir, "[1, 2, 4]", token_mean=True)
    assert main(["derive-probe", "--config", str(config)]) == 0
    folder = Path(capsys.readouterr().out.strip())
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == [FEATURE_ARCHITECTURE]
    assert written[CONFIG_KEY]["layers"] == [1, 2, 4] and written[CONFIG_KEY]["token_mean"]
    assert main(["derive-probe", str(config), "--command"]) == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[2] == str(folder)
    assert command[command.index("--served-model-name") + 1] == folder.name
    assert "--no-enable-prefix-caching" in command and "--no-enable-chunked-prefill" in command
    assert json.loads(command[command.index("--pooler-config") + 1])["pooling_type"] == "MEAN"
