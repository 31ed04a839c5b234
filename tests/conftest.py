"""Shared fixtures: small models built from code, and a registry that tests may change safely.

Also a guard against a broken install hiding as skips: a test (or module) skipped by
``pytest.importorskip`` of a library the test extras install (bitsandbytes, hqq, optimum.quanto,
mlx on Linux and Apple arm64, peft, transformers, accelerate, trl, datasets, mlx_lm, safetensors)
fails the session, naming the module and its import error. Other skips (no CUDA, running as root,
an optional demo checkpoint) stay skips.

Environment variables:
    QW_ALLOW_MISSING_BACKENDS=1: allow such skips, for a partial install.
    QW_REQUIRED_TEST_MODULES=a,b.c: replace the list of required modules (a module counts when it
        is one of them or inside one); for testing the guard itself.
"""

from __future__ import annotations

import importlib
import linecache
import os
import platform
import re
import sys
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


# ---------------------------------------------------------------------- required libraries
_REQUIRED_TEST_MODULES = ("bitsandbytes", "hqq", "optimum.quanto", "peft", "transformers", "accelerate", "trl",
                          "datasets", "safetensors")
_MLX_MODULES = ("mlx", "mlx_lm")  # installed by the extras on Linux and Apple arm64 only
_DEFAULT_REASON = re.compile(r"^could not import '([\w.]+)'|^module '([\w.]+)' has __version__")
_IMPORTORSKIP_CALL = re.compile(r"importorskip\(\s*(?:modname\s*=\s*)?[\"']([\w.]+)[\"']")


def required_test_modules() -> tuple[str, ...]:
    """The modules whose importorskip-skip fails the session (``QW_REQUIRED_TEST_MODULES`` overrides)."""
    override = os.environ.get("QW_REQUIRED_TEST_MODULES")
    if override is not None:
        return tuple(name.strip() for name in override.split(",") if name.strip())
    mlx = sys.platform == "linux" or (sys.platform == "darwin" and platform.machine() == "arm64")
    return _REQUIRED_TEST_MODULES + (_MLX_MODULES if mlx else ())


def _skipped_import(report) -> tuple[str, str, str] | None:
    """``(module, location, reason)`` when ``report`` is a skip raised by ``pytest.importorskip``.

    The default reason names the module; a custom reason does not, so the skip's location (the
    line that called importorskip: pytest hides importorskip's own frame) is read instead.
    """
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    path, lineno, reason = report.longrepr
    reason = reason.removeprefix("Skipped: ")
    match = _DEFAULT_REASON.match(reason)
    if match is None and lineno is not None:
        match = _IMPORTORSKIP_CALL.search(linecache.getline(str(path), lineno))
    if match is None:
        return None
    module = next(group for group in match.groups() if group)
    return module, f"{path}:{lineno}", reason


def _import_error(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure is the answer here
        return f"{type(e).__name__}: {e}"
    return "imports now (was it missing in a worker or an older version?)"


class _MissingLibraryGuard:
    """Collects importorskip-skips of required modules; fails the session when there are any."""

    def __init__(self):
        self.missing: dict[str, tuple[str, str]] = {}  # module -> (location, reason) of its first skip
        self.required = required_test_modules()
        self.allowed = os.environ.get("QW_ALLOW_MISSING_BACKENDS") == "1"

    def _record(self, report) -> None:
        found = _skipped_import(report)
        if found is None:
            return
        module, location, reason = found
        if any(module == name or module.startswith(name + ".") for name in self.required):
            self.missing.setdefault(module, (location, reason))

    def pytest_collectreport(self, report):
        self._record(report)

    def pytest_runtest_logreport(self, report):
        self._record(report)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.missing and not self.allowed and exitstatus in (pytest.ExitCode.OK,
                                                                 pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if not self.missing or self.allowed:
            return
        terminalreporter.section("missing test libraries", sep="=", red=True, bold=True)
        terminalreporter.line("tests were skipped because a library the test extras install cannot be imported:",
                              red=True)
        for module, (location, reason) in sorted(self.missing.items()):
            terminalreporter.line(f"  {module} ({location}: {reason}): {_import_error(module)}", red=True)
        terminalreporter.line("Install the extras (pip install -e '.[all,test]'), or set "
                              "QW_ALLOW_MISSING_BACKENDS=1 to accept the skips for a partial install.", red=True)


def pytest_configure(config):
    config.pluginmanager.register(_MissingLibraryGuard(), "qw-missing-library-guard")
