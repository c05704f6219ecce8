"""The package's CPU kernels (model/cpu_kernels.py) as a user meets them: LLAMA_PKG_CPU_KERNELS chooses,
`auto` falls back to ATen's kernels with a warning that says why, `on` fails saying why, `off` never builds;
the build is reused; the decode step's two builds agree. The products' numbers: tests/test_batch_invariance.py."""

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


def test_both_builds_of_the_decode_step_give_the_same_bits(test_model):
    """The decode step's AVX2 build (what a CPU without AVX-512 VNNI runs) against the VNNI one, on the tiny
    model over 40 positions of 3 rows: the same hidden states bit for bit (on a CPU without VNNI only the
    AVX2 build can run: checked to run alone)."""
    import torch

    from llama_pkg.engine.llm_engine import LLMEngine
    from llama_pkg.model.llama import KVCache

    engine = LLMEngine(str(test_model), 4096)
    try:
        own, model = engine.runner.step.kernels, engine.model
        builds = ["avx2", "vnni"][:1 + own.lib.cpu_kernels_has_vnni()]
        bs, blocks = 16, 3 * 3
        tables = torch.arange(blocks, dtype=torch.int32).view(3, 3)
        ids = torch.randint(3, model.config.vocab_size, (40, 3), generator=torch.Generator().manual_seed(0))
        outs = []
        for isa in builds:
            step = cpu_kernels.DecodeStep(cpu_kernels.Kernels(own.lib._name, isa), model,
                                          KVCache(model.config, blocks, bs, "cpu", torch.bfloat16))
            rows = torch.arange(3)
            with torch.inference_mode():
                outs.append(torch.stack([step(ids[p], torch.full((3,), p), rows * 3 * bs + p, tables, rows, bs)
                                         for p in range(40)]))
        assert all(torch.equal(o, outs[0]) for o in outs) and outs[0].abs().max() > 0
        assert not torch.equal(outs[0][:, 0], outs[0][:, 1])  # the rows are their own sequences
    finally:
        engine.close()
