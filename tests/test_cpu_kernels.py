"""The package's CPU kernels (model/cpu_kernels.py) as a user meets them: LLAMA_PKG_CPU_KERNELS chooses,
`auto` falls back to ATen's kernels with a warning that says why, `on` fails saying why, `off` never builds;
the build is reused. Their numbers: tests/test_batch_invariance.py."""

import logging

import pytest

from conftest import ROOT
from llama_pkg.model import cpu_kernels


@pytest.fixture
def unbuildable(monkeypatch):
    def build(where=None):
        raise cpu_kernels.Unavailable("no C++ compiler found (g++, c++ or clang++; or set CXX)")

    monkeypatch.setattr(cpu_kernels, "build", build)
    monkeypatch.setattr(cpu_kernels, "_LOADED", {})


def test_auto_falls_back_to_atens_kernels_saying_why(unbuildable, caplog):
    with caplog.at_level(logging.WARNING, logger="llama_pkg"):
        assert cpu_kernels.load("auto") is None
    assert "no C++ compiler found" in caplog.text and "ATen's 4-bit kernel runs instead" in caplog.text


def test_on_fails_naming_the_setting_and_the_reason(unbuildable):
    with pytest.raises(cpu_kernels.Unavailable, match=r"LLAMA_PKG_CPU_KERNELS=on: no C\+\+ compiler found"):
        cpu_kernels.load("on")


def test_off_builds_nothing(unbuildable):
    assert cpu_kernels.load("off") is None


def test_a_bad_value_names_the_variable(monkeypatch, test_model):
    from llama_pkg.engine.llm_engine import LLMEngine

    monkeypatch.setenv("LLAMA_PKG_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="LLAMA_PKG_CPU_KERNELS='yes': must be one of auto, on, off"):
        LLMEngine(str(test_model), 4096)


def test_the_engine_runs_atens_kernels_when_off_and_the_packages_by_default(monkeypatch, test_model):
    from llama_pkg.engine.llm_engine import LLMEngine

    for mode, own in (("off", False), ("auto", True)):
        monkeypatch.setenv("LLAMA_PKG_CPU_KERNELS", mode)
        engine = LLMEngine(str(test_model), 4096)
        try:
            assert (engine.runner.step is not None) == own
            assert (engine.model.layers[0]["qkv"].kernels is not None) == own
        finally:
            engine.close()


def test_the_build_is_reused_and_named_by_its_inputs(tmp_path):
    first = cpu_kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
    kernels = cpu_kernels.Kernels(first)
    assert kernels.isa in ("avx2", "vnni")
    assert cpu_kernels.SOURCE.parent == ROOT / "llama_pkg" / "model"
