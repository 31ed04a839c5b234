"""Tests for backend_manager: detection by monkeypatching, real library status on this machine."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed

import backend_manager
from backend_manager import (
    BACKEND_ENV_VAR,
    Backend,
    BackendManager,
    available_backends,
    clear_caches,
    detect_backend,
    get_import_status,
    get_library_status,
    is_library_usable,
    report_import_status,
)
from backend_manager import capabilities as caps
from backend_manager import imports

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
_real_find_spec = importlib.util.find_spec


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    clear_caches()
    yield
    clear_caches()


def fake_machine(monkeypatch, *, cuda=False, mps=False, system="Linux", arch="x86_64", mlx=False,
                 bf16=True, nccl=True):
    """Make torch/platform/find_spec describe a machine; CUDA figures are a fake 80 GB GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr("platform.system", lambda: system)
    monkeypatch.setattr("platform.machine", lambda: arch)
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: (object() if mlx else None) if name == "mlx" else _real_find_spec(name, *a),
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"NVIDIA Fake {i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (30 * GB, 80 * GB))
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    # quantization_wrapper's matrix is tested there; here only its result is passed through.
    monkeypatch.setattr(caps, "_usable_methods", lambda backend: ["none", f"for-{backend.value}"])


SCENARIOS = {
    "cuda-box": (dict(cuda=True), [Backend.CUDA, Backend.CPU]),
    "apple-silicon-with-mlx": (dict(mps=True, system="Darwin", arch="arm64", mlx=True),
                               [Backend.MLX, Backend.MPS, Backend.CPU]),
    "apple-without-mlx": (dict(mps=True, system="Darwin", arch="arm64"), [Backend.MPS, Backend.CPU]),
    "linux-mlx-cpu": (dict(mlx=True), [Backend.CPU]),
    "plain-cpu": (dict(), [Backend.CPU]),
}


@pytest.mark.parametrize("machine", SCENARIOS, ids=list(SCENARIOS))
def test_priority_order(monkeypatch, machine):
    kwargs, expected = SCENARIOS[machine]
    fake_machine(monkeypatch, **kwargs)
    assert available_backends() == expected
    assert detect_backend() is expected[0]
    assert BackendManager().backend is expected[0]


def test_backend_parse_and_str():
    assert Backend.parse(" CUDA ") is Backend.CUDA
    assert Backend.parse(Backend.MLX) is Backend.MLX
    assert f"{Backend.MPS}" == "mps"
    with pytest.raises(ValueError, match=r"backend='xyz' is not a backend; allowed: cuda, mps, mlx, cpu"):
        Backend.parse("xyz")
    with pytest.raises(ValueError, match="allowed"):
        Backend.parse(3)


def test_env_var_overrides_detection(monkeypatch):
    fake_machine(monkeypatch, cuda=True)
    monkeypatch.setenv(BACKEND_ENV_VAR, "CPU")
    assert detect_backend() is Backend.CPU
    assert BackendManager().backend is Backend.CPU


def test_env_var_invalid_value(monkeypatch):
    fake_machine(monkeypatch)
    monkeypatch.setenv(BACKEND_ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=rf"{BACKEND_ENV_VAR}='tpu'.*allowed: cuda, mps, mlx, cpu"):
        detect_backend()


def test_env_var_backend_not_present(monkeypatch):
    fake_machine(monkeypatch)
    monkeypatch.setenv(BACKEND_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=rf"{BACKEND_ENV_VAR}='cuda'.*not available.*available: cpu"):
        detect_backend()


def test_manager_rejects_absent_and_invalid_backend(monkeypatch):
    fake_machine(monkeypatch)
    with pytest.raises(ValueError, match=r"backend 'cuda' was requested but is not available on this "
                                         r"machine; available: cpu"):
        BackendManager("cuda")
    with pytest.raises(ValueError, match="allowed: cuda, mps, mlx, cpu"):
        BackendManager("gpu")


def test_manager_accepts_string(monkeypatch):
    fake_machine(monkeypatch, mps=True, system="Darwin", arch="arm64", mlx=True)
    assert BackendManager("MPS").backend is Backend.MPS
    assert BackendManager(Backend.CPU).backend is Backend.CPU
    assert repr(BackendManager("mlx")) == "BackendManager(backend='mlx', device='mps')"


@pytest.mark.parametrize(
    "machine, backend, local_rank, expected",
    [
        ("cuda-box", "cuda", None, "cuda:0"),
        ("cuda-box", "cuda", "1", "cuda:1"),
        ("apple-silicon-with-mlx", "mlx", None, "mps"),
        ("apple-silicon-with-mlx", "mps", None, "mps"),
        ("plain-cpu", "cpu", "3", "cpu"),
    ],
    ids=["cuda-default", "cuda-local-rank-1", "mlx", "mps", "cpu-ignores-rank"],
)
def test_device(monkeypatch, machine, backend, local_rank, expected):
    fake_machine(monkeypatch, **SCENARIOS[machine][0])
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert BackendManager(backend).device == torch.device(expected)


def test_bad_local_rank(monkeypatch):
    fake_machine(monkeypatch, cuda=True)
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match="LOCAL_RANK='first'"):
        BackendManager("cuda").device


@pytest.mark.parametrize(
    "machine, backend, bf16, preferred, not_preferred",
    [
        ("cuda-box", "cuda", True, torch.bfloat16, torch.float16),
        ("cuda-box", "cuda", False, torch.float16, torch.float16),
        ("apple-silicon-with-mlx", "mlx", True, torch.float16, torch.float16),
        ("apple-without-mlx", "mps", True, torch.float16, torch.float16),
        ("plain-cpu", "cpu", True, torch.bfloat16, torch.float32),
    ],
    ids=["cuda-ampere", "cuda-no-bf16", "mlx", "mps", "cpu"],
)
def test_get_dtype(monkeypatch, machine, backend, bf16, preferred, not_preferred):
    fake_machine(monkeypatch, bf16=bf16, **SCENARIOS[machine][0])
    manager = BackendManager(backend)
    assert manager.get_dtype() == preferred
    assert manager.get_dtype(prefer_bfloat16=False) == not_preferred
    assert manager.capabilities.supports_bf16 is (preferred == torch.bfloat16)
    assert manager.capabilities.supports_fp16 is True


@pytest.mark.parametrize("backend", ["cpu", "mps", "mlx"])
def test_memory_matches_psutil(monkeypatch, backend):
    fake_machine(monkeypatch, **SCENARIOS["apple-silicon-with-mlx" if backend != "cpu" else "plain-cpu"][0])
    info = BackendManager(backend).get_memory_info()
    vm = psutil.virtual_memory()
    assert info["source"] == "psutil"
    assert info["total_gb"] == pytest.approx(vm.total / GB, rel=1e-12)
    assert info["available_gb"] == pytest.approx(vm.available / GB, abs=0.5)
    assert info["used_gb"] == pytest.approx(info["total_gb"] - info["available_gb"])
    assert info["percent_used"] == pytest.approx(100 * info["used_gb"] / info["total_gb"])
    assert 0 < info["available_gb"] <= info["total_gb"]
    # The design document's byte keys: ints, the same reading as the GB keys.
    assert info["total_memory"] == vm.total
    assert all(type(info[k]) is int for k in ("total_memory", "available_memory", "used_memory"))
    for key in ("total", "available", "used"):
        assert info[f"{key}_memory"] == round(info[f"{key}_gb"] * GB)
    assert info["used_memory"] == info["total_memory"] - info["available_memory"]


class _VM:
    total = 16 * GB + 123
    available = 5 * GB + 7


def test_memory_bytes_and_gb_agree(monkeypatch):
    fake_machine(monkeypatch, mps=True, system="Darwin", arch="arm64")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _VM)
    info = BackendManager(backend="mps").get_memory_info()
    assert (info["total_memory"], info["available_memory"], info["used_memory"]) == (
        16 * GB + 123, 5 * GB + 7, 11 * GB + 116)
    assert info["total_gb"] * 2**30 == info["total_memory"]  # exact: dividing by 2**30 is exact
    assert info["available_gb"] * 2**30 == info["available_memory"]
    assert info["used_gb"] * 2**30 == info["used_memory"]


def test_cuda_memory_and_capabilities(monkeypatch):
    fake_machine(monkeypatch, cuda=True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: calls.append(i) or (30 * GB, 80 * GB))
    manager = BackendManager()
    assert manager.get_memory_info() == {
        "total_gb": 80.0, "available_gb": 30.0, "used_gb": 50.0, "percent_used": 62.5,
        "device": "cuda:1", "source": "torch.cuda.mem_get_info",
        "total_memory": 80 * GB, "available_memory": 30 * GB, "used_memory": 50 * GB,
    }
    assert calls == [1]
    c = manager.capabilities
    assert c.to_dict() == {
        "backend": "cuda", "device_name": "NVIDIA Fake 1", "total_memory_gb": 80.0,
        "available_memory_gb": 30.0, "supports_bf16": True, "supports_fp16": True,
        "compute_capability": [8, 0], "distributed_backend": "nccl", "supports_fsdp": True,
        "quantization_methods": ["none", "for-cuda"], "device_count": 2, "supports_distributed": True,
    }
    assert manager.capabilities is c  # cached
    json.dumps(c.to_dict())


@pytest.mark.parametrize(
    "machine, backend, nccl, dist_ok, expected, fsdp",
    [
        ("cuda-box", "cuda", True, True, "nccl", True),
        ("cuda-box", "cuda", False, True, "gloo", True),
        ("apple-silicon-with-mlx", "mlx", True, True, "gloo", False),
        ("apple-without-mlx", "mps", True, True, "gloo", False),
        ("plain-cpu", "cpu", True, True, "gloo", True),
        ("plain-cpu", "cpu", True, False, None, False),
    ],
    ids=["cuda-nccl", "cuda-no-nccl", "mlx", "mps", "cpu", "no-torch-distributed"],
)
def test_distributed_backend(monkeypatch, machine, backend, nccl, dist_ok, expected, fsdp):
    fake_machine(monkeypatch, nccl=nccl, **SCENARIOS[machine][0])
    monkeypatch.setattr(torch.distributed, "is_available", lambda: dist_ok)
    manager = BackendManager(backend)
    assert manager.get_distributed_backend() == expected
    assert manager.capabilities.distributed_backend == expected
    assert manager.capabilities.supports_fsdp is fsdp
    assert manager.capabilities.compute_capability == ((8, 0) if backend == "cuda" else None)
    assert manager.capabilities.supports_distributed is (manager.get_distributed_backend() is not None)
    assert manager.capabilities.supports_distributed is (expected is not None)
    assert caps.supports_distributed(Backend(backend)) is (expected is not None)
    assert manager.capabilities.to_dict()["supports_distributed"] is (expected is not None)


def test_detection_is_cached(monkeypatch):
    fake_machine(monkeypatch)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or False)
    for _ in range(3):
        detect_backend()
        available_backends()
        BackendManager()
    assert len(calls) == 1
    clear_caches()
    detect_backend()
    assert len(calls) == 2


def test_available_backends_returns_a_copy(monkeypatch):
    fake_machine(monkeypatch)
    available_backends().append(Backend.CUDA)
    assert available_backends() == [Backend.CPU]


def test_import_is_light():
    heavy = ["torch", "bitsandbytes", "hqq", "optimum", "mlx", "peft", "transformers", "psutil"]
    code = (
        "import json, sys, backend_manager; "
        f"print(json.dumps([m for m in sys.modules if m.split('.')[0] in {heavy!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_real_quantization_methods_from_quantization_wrapper():
    # No skip on ImportError: capabilities.quantization_methods imports this, so failing to
    # import it is the regression this test is for.
    from quantization_wrapper.compatibility import usable_methods

    methods = BackendManager("cpu").capabilities.quantization_methods
    assert methods == [str(getattr(m, "value", m)) for m in usable_methods("cpu")]
    assert "none" in methods and all(isinstance(m, str) for m in methods)


# --- the design document's / SPEC's call shapes -------------------------------------------------


def test_spec_call_shapes(monkeypatch):
    fake_machine(monkeypatch, cuda=True)
    bm = BackendManager(backend=None, verbose=False)
    assert bm.backend is Backend.CUDA and bm.verbose is False
    mem = bm.get_memory_info()
    assert (mem["total_memory"], mem["used_memory"], mem["available_memory"]) == (80 * GB, 50 * GB, 30 * GB)
    assert (mem["total_gb"], mem["available_gb"]) == (80.0, 30.0)
    assert bm.capabilities.supports_distributed is True
    assert bm.get_distributed_backend() == "nccl"
    cpu = BackendManager(backend="cpu", verbose=False)
    assert cpu.backend is Backend.CPU and cpu.get_memory_info()["total_memory"] == psutil.virtual_memory().total


def test_seed_report_import_status_call_shape():
    # The design document: ``print(report_import_status(backend='cuda'))``.
    report = report_import_status(backend='cuda')
    lines = report.splitlines()
    assert [line.split(":")[0] for line in lines] == list(LIBS)
    assert all("usable on cuda: " in line for line in lines)


@pytest.mark.parametrize("chosen, env, expected", [
    ("cpu", None, "backend cpu (requested), device cpu"),
    (None, None, "backend cuda (detected), device cuda:0"),
    (None, "cpu", f"backend cpu (${BACKEND_ENV_VAR}=cpu), device cpu"),
], ids=["requested", "detected", "env-override"])
def test_verbose_logs_one_report(monkeypatch, caplog, chosen, env, expected):
    fake_machine(monkeypatch, cuda=True)
    if env:
        monkeypatch.setenv(BACKEND_ENV_VAR, env)
    caplog.set_level(logging.INFO, logger="backend_manager")
    bm = BackendManager(backend=chosen, verbose=True)
    records = [r for r in caplog.records if r.name == "backend_manager"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO  # pytest's handlers count as configured logging
    message = records[0].getMessage()
    assert message == bm.describe()
    assert message.splitlines()[0] == f"backend_manager: {expected}"
    c = bm.capabilities
    assert f"{c.available_memory_gb:.1f} GB available of {c.total_memory_gb:.1f} GB" in message
    assert f"distributed: {c.distributed_backend} (supports_distributed=True)" in message
    assert f"quantization methods: none, for-{bm.backend.value}" in message
    caplog.clear()
    bm.get_memory_info(), bm.capabilities, bm.get_dtype()
    assert not [r for r in caplog.records if r.name == "backend_manager"]  # once, at construction


def test_not_verbose_logs_nothing(monkeypatch, caplog):
    fake_machine(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="backend_manager")
    BackendManager(backend="cpu")
    BackendManager(backend="cpu", verbose=False)
    assert [r for r in caplog.records if r.name == "backend_manager"] == []


@pytest.mark.slow  # a fresh interpreter probes the real libraries (~10 s)
def test_verbose_is_seen_without_logging_config_and_config_is_untouched():
    code = """
import logging, sys
from backend_manager import BackendManager
BackendManager(backend="cpu", verbose=True)
sys.stderr.flush()
root, ours = logging.getLogger(), logging.getLogger("backend_manager")
print("STATE", root.handlers, root.level, ours.handlers, ours.level, ours.propagate)
logging.basicConfig(level=logging.INFO, format="%(levelname)s|%(name)s|%(message)s")
BackendManager(backend="cpu", verbose=True)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    # other libraries may print on import (bitsandbytes with transformers >= 5.25's `kernels`, offline)
    err = [line for line in out.stderr.splitlines() if "backend_manager" in line or line.startswith("  ")]
    # Unconfigured: Python's last-resort handler prints the bare message (a WARNING record).
    assert err[0] == "backend_manager: backend cpu (requested), device cpu"
    assert sum(line.startswith("  quantization methods: ") for line in err) == 2
    # Configured at INFO: the same report as an INFO record on the backend_manager logger.
    assert "INFO|backend_manager|backend_manager: backend cpu (requested), device cpu" in err
    assert out.stdout.strip() == f"STATE [] {logging.WARNING} [] {logging.NOTSET} True"


# --- library status, against the real installed libraries -------------------------------------

LIBS = {name: spec.dist for name, spec in imports.KNOWN_LIBRARIES.items()}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("name", LIBS, ids=list(LIBS))
def test_real_library_usable_on_cpu(name):
    if not _installed(LIBS[name]):
        pytest.skip(f"{name} is not installed")
    status = get_library_status(name, "cpu")
    assert status.installed and status.usable, str(status)
    assert status.version == importlib.metadata.version(LIBS[name])
    assert status.reason is None
    assert status.backend is Backend.CPU
    assert is_library_usable(name, Backend.CPU)
    assert str(status) == f"{name}: installed {status.version}, usable on cpu: yes"


@pytest.mark.parametrize("backend", ["mps", "mlx"])
def test_bitsandbytes_unusable_on_apple(backend):
    if not _installed("bitsandbytes"):
        pytest.skip("bitsandbytes is not installed")
    status = get_library_status("bitsandbytes", backend)
    assert status.installed and not status.usable
    assert "no supported Apple backend" in status.reason
    assert f"usable on {backend}: no (bitsandbytes has no supported Apple backend" in str(status)


def test_bitsandbytes_error_mock_library_is_unusable(monkeypatch):
    cext = pytest.importorskip("bitsandbytes.cextension")
    monkeypatch.setattr(cext, "lib", cext.ErrorHandlerMockBNBNativeLibrary("simulated load failure"))
    status = get_library_status("bitsandbytes", "cpu")
    assert not status.usable
    assert "ErrorHandlerMockBNBNativeLibrary" in status.reason and "simulated load failure" in status.reason


def test_bitsandbytes_failing_cpu_kernel_is_unusable(monkeypatch):
    functional = pytest.importorskip("bitsandbytes.functional")

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this op")

    monkeypatch.setattr(functional, "quantize_4bit", broken)
    status = get_library_status("bitsandbytes", "cpu")
    assert not status.usable
    assert status.reason == "bitsandbytes NF4 round trip on CPU failed: RuntimeError: no kernel for this op"


def test_mlx_unusable_on_cuda():
    if not _installed("mlx"):
        pytest.skip("mlx is not installed")
    status = get_library_status("mlx", "cuda")
    assert not status.usable and "not on CUDA tensors" in status.reason
    assert status.install_hint == 'pip install "mlx[cpu]"'  # this test machine is Linux


def _fake_package(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(imports.KNOWN_LIBRARIES, name, imports.LibrarySpec(name, name, name))
    return name


def test_broken_package_reports_import_error(tmp_path, monkeypatch):
    body = "raise ImportError('simulated broken install')\n"
    name = _fake_package(tmp_path, monkeypatch, "qw_fake_broken", body)
    status = get_library_status(name, "cpu")
    assert status.installed and not status.usable and status.version is None
    assert status.reason == "ImportError: simulated broken install"
    assert name not in sys.modules


def test_module_without_distribution_is_not_usable(tmp_path, monkeypatch):
    name = _fake_package(tmp_path, monkeypatch, "qw_fake_stub", "VALUE = 1\n")
    monkeypatch.delitem(sys.modules, name, raising=False)
    status = get_library_status(name, "cpu")
    assert status.installed and not status.usable and status.version is None
    assert "found a module named qw_fake_stub but no installed distribution" in status.reason
    sys.modules.pop(name, None)


def test_missing_library_gives_install_line(monkeypatch):
    spec = imports.LibrarySpec("qw_absent_module", "qw-absent-dist", "qw-absent-dist")
    monkeypatch.setitem(imports.KNOWN_LIBRARIES, "qw-absent", spec)
    status = get_library_status("qw-absent", "cpu")
    assert (status.installed, status.usable, status.version) == (False, False, None)
    assert status.install_hint == "pip install qw-absent-dist"
    assert str(status) == "qw-absent: not installed, usable on cpu: no; fix: pip install qw-absent-dist"


def test_unknown_library_lists_known_names():
    with pytest.raises(ValueError, match=r"library='nope'.*known: bitsandbytes, hqq, optimum-quanto, mlx, "
                                         r"peft, transformers"):
        get_library_status("nope", "cpu")


def test_report_import_status_one_line_per_library(monkeypatch):
    fake_machine(monkeypatch)
    report = report_import_status()
    lines = report.splitlines()
    assert len(lines) == len(imports.KNOWN_LIBRARIES)
    for line, (name, dist) in zip(lines, LIBS.items()):
        assert line.startswith(f"{name}: ")
        assert "usable on cpu: " in line
        if _installed(dist):
            assert importlib.metadata.version(dist) in line
    assert BackendManager().report_import_status() == report
    assert list(get_import_status("cpu")) == list(LIBS)


def test_public_api():
    assert sorted(backend_manager.__all__) == sorted([
        "Backend", "BackendManager", "BackendCapabilities", "detect_backend", "available_backends",
        "report_import_status", "get_import_status", "get_library_status", "is_library_usable",
        "LibraryStatus", "clear_caches", "BACKEND_ENV_VAR",
        "KNOWN_LIBRARIES", "LibrarySpec", "register_library", "unregister_library",
    ])
    assert BACKEND_ENV_VAR == "QUANTIZATION_WRAPPER_BACKEND"
    assert issubclass(Backend, str) and Backend.CUDA == "cuda"
