"""The guard in tests/conftest.py: an importorskip-skip of a library the test extras install fails
the session, unless QW_ALLOW_MISSING_BACKENDS=1; other skips stay skips."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

TESTS = '''
import pytest

def helper():
    return pytest.importorskip("definitely_missing_module", reason="a custom reason")

def test_default_reason():
    pytest.importorskip("definitely_missing_module")

def test_custom_reason_in_a_helper():
    helper()

def test_unrelated_module():
    pytest.importorskip("some_other_missing_module")

def test_legitimate_skip():
    pytest.skip("no CUDA")

def test_runs():
    assert 1 + 1 == 2
'''


@pytest.fixture
def guarded(pytester, monkeypatch):
    monkeypatch.delenv("QW_ALLOW_MISSING_BACKENDS", raising=False)
    monkeypatch.setenv("QW_REQUIRED_TEST_MODULES", "definitely_missing_module, hqq")
    pytester.makeconftest(CONFTEST)
    return pytester


def test_a_required_module_skipped_fails_the_session(guarded):
    guarded.makepyfile(test_it=TESTS)
    result = guarded.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=4)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*missing test libraries*",
        "  definitely_missing_module (*test_it.py:*): ModuleNotFoundError: No module named 'definitely_missing_module'",
        "*QW_ALLOW_MISSING_BACKENDS=1*",
    ])
    assert "some_other_missing_module (" not in result.stdout.str()


def test_a_custom_reason_is_traced_to_the_importorskip_line(guarded):
    guarded.makepyfile(test_it=TESTS.replace("def test_default_reason", "def _unused"))
    result = guarded.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["  definitely_missing_module (*test_it.py:*: a custom reason): ModuleNotFoundError*"])


def test_a_module_level_skip_of_a_submodule_fails_the_session(guarded):
    guarded.makepyfile(test_it='import pytest\nq = pytest.importorskip("hqq.definitely_missing", reason="x")\n'
                               'def test_never():\n    pass\n')
    result = guarded.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["  hqq.definitely_missing (*test_it.py:2: x): ModuleNotFoundError*"])


def test_allow_variable_accepts_the_skips(guarded, monkeypatch):
    monkeypatch.setenv("QW_ALLOW_MISSING_BACKENDS", "1")
    guarded.makepyfile(test_it=TESTS)
    result = guarded.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=4)
    assert result.ret == pytest.ExitCode.OK
    assert "missing test libraries" not in result.stdout.str()


def test_other_skips_stay_skips(guarded):
    guarded.makepyfile(test_it=TESTS.replace("definitely_missing_module", "not_ours_either"))
    result = guarded.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=4)
    assert result.ret == pytest.ExitCode.OK


def test_default_list_covers_the_extras(monkeypatch):
    from conftest import required_test_modules

    monkeypatch.delenv("QW_REQUIRED_TEST_MODULES", raising=False)
    modules = set(required_test_modules())
    assert {"bitsandbytes", "hqq", "optimum.quanto", "peft", "transformers", "trl", "datasets",
            "safetensors"} <= modules
    assert {"mlx", "mlx_lm"} <= modules  # this suite runs on Linux or Apple arm64
