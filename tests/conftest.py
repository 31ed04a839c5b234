"""Shared fixtures: small models built from code, and a registry that tests may change safely."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from backend_manager import clear_caches


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules training tiny models: intra-op threads only contend (on a busy 2-core machine a
    step took 60x longer). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_detection():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture
def registry():
    """The adapter registry, restored after the test (for test doubles)."""
    from quantization_wrapper.adapters.base import ADAPTER_REGISTRY

    saved = dict(ADAPTER_REGISTRY)
    yield ADAPTER_REGISTRY
    ADAPTER_REGISTRY.clear()
    ADAPTER_REGISTRY.update(saved)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(dim, dim), "v_proj": nn.Linear(dim, dim, bias=False)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(dim, hidden), "down_proj": nn.Linear(hidden, dim)})
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.norm(x)
        h = x + self.attn["q_proj"](h) + self.attn["v_proj"](h)
        return h + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](h)))


class TinyModel(nn.Module):
    """embed -> 2 blocks -> lm_head: dotted names like real transformers models."""

    def __init__(self, dim: int = 64, hidden: int = 128, vocab: int = 50, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


@pytest.fixture
def tiny_model():
    return TinyModel()


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
