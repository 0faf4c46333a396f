"""Shared fixtures: a tiny random model (fast unit tests) and the embedded SmolLM2 (end-to-end)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An nlakit cache of the test's own (label database, hash memos); opt in per module with
    ``pytestmark = pytest.mark.usefixtures("private_cache")``."""
    monkeypatch.setenv("NLAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from nlakit.model.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny random Llama (4 blocks, d=64)."""
    from nlakit import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_store(tiny, tmp_path_factory):
    """An activation store of the tiny model over 40 built-in documentation documents."""
    from nlakit.corpus.load import load_corpus
    from nlakit.extract.extraction import ExtractConfig, extract

    corpus = load_corpus("builtin:docs", tokenizer=tiny[1], max_docs=40)
    cfg = ExtractConfig(positions_per_doc=5, min_position=20, max_tokens_per_doc=256)
    return extract(tiny, corpus, tmp_path_factory.mktemp("store") / "acts", cfg, layer=2,
                   progress=False)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (dequantized once into the nlakit cache)."""
    from nlakit import load_model

    return load_model("smollm2-135m")
