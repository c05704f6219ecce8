"""GPTQ v1 on CPU: packing is exact on the 4-bit grid, and a GPTQ folder runs like its float twin."""

import json

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ROOT
import model_builders
from llama_pkg import weights
from llama_pkg.model.gptq import dequantize, pack_nibbles, quantize, unpack_nibbles, unpacked_state_dict
from llama_pkg.backends.hf import TransformersBackend


def test_nibble_packing_round_trip():
    values = torch.randint(0, 16, (64, 24), generator=torch.Generator().manual_seed(0))
    for dim in (0, 1):
        assert torch.equal(unpack_nibbles(pack_nibbles(values, dim), dim), values)
    assert pack_nibbles(torch.full((8, 1), 7), 0).item() == 0x77777777


def test_layout_matches_the_gptq_v1_formula():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qweight, qzeros, scales, g_idx = quantize(w, group_size=32)
    k, n = 37, 5
    q = (int(qweight[k // 8, n]) >> (4 * (k % 8))) & 0xF
    z = (int(qzeros[g_idx[k], n // 8]) >> (4 * (n % 8))) & 0xF
    assert dequantize(qweight, qzeros, scales, g_idx)[n, k] == pytest.approx(float(scales[g_idx[k], n]) * (q - (z + 1)))
    assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16


@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, False), (128, False), (32, True)])
def test_round_trip_is_exact_on_the_grid(group_size, act_order):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(2))
    packed = quantize(w, group_size, act_order, torch.Generator().manual_seed(3))
    on_grid = dequantize(*packed)
    assert (on_grid - w).abs().max() <= packed[2].float().max() / 2 + 1e-6  # within half a step
    g_idx = packed[3]
    if act_order:
        assert not torch.equal(g_idx, torch.arange(256, dtype=torch.int32) // group_size)
    requantized = quantize(on_grid, group_size, False) if not act_order else None
    if requantized:
        assert all(torch.equal(a, b) for a, b in zip(packed, requantized))
    assert torch.equal(dequantize(*packed), on_grid)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(4, 96), group_size=64)


@pytest.fixture(scope="module")
def gptq_model(tmp_path_factory):
    return model_builders.build_gptq(tmp_path_factory.mktemp("gptq") / "tiny-gptq", group_size=32, act_order=True)


def test_gptq_folder_layout(gptq_model):
    config = json.loads((gptq_model / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4
    assert weights.inspect(gptq_model).is_gptq
    state = unpacked_state_dict(gptq_model)
    assert "model.layers.0.self_attn.q_proj.weight" in state and "lm_head.weight" in state


def test_gptq_model_and_its_float_twin_give_the_same_logits(gptq_model, tmp_path):
    twin = tmp_path / "twin"
    config = AutoConfig.from_pretrained(str(gptq_model))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(unpacked_state_dict(gptq_model))
    model.save_pretrained(twin)
    ids = [1, 518, 25580, 29962, 15043, 29991, 518, 29914, 25580, 29962]
    a = TransformersBackend(gptq_model, 4096, gptq=True).logits(ids)
    b = TransformersBackend(twin, 4096).logits(ids)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    float_model = TransformersBackend(model_builders.build(tmp_path / "float"), 4096).logits(ids)
    assert not torch.allclose(a, float_model, atol=1e-5)  # quantization did change the weights
    cosine = torch.nn.functional.cosine_similarity(a, float_model, dim=-1)
    assert cosine.min() > 0.9, cosine  # ... but 4 bits keep the model close to the float one


@pytest.mark.slow  # rebuilds models
def test_committed_gpu_reference_is_what_the_script_computes(tmp_path):
    from safetensors import safe_open

    subprocess.run([sys.executable, "scripts/make_gptq_reference.py", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    committed = sorted((ROOT / "tests" / "fixtures" / "gptq-reference").glob("*.safetensors"))
    assert [f.name for f in committed] == sorted(f.name for f in tmp_path.glob("*.safetensors"))
    for file in committed:
        with safe_open(str(tmp_path / file.name), "pt") as a, safe_open(str(file), "pt") as b:
            assert a.metadata() == b.metadata()
            for key in ("prefill", "steps"):
                assert torch.allclose(a.get_tensor(key).float(), b.get_tensor(key).float(), atol=1e-2)


def test_cpu_decode_path_agrees_with_prefill(gptq_model):
    backend = TransformersBackend(gptq_model, 4096, gptq=True)
    ids = [1, 15043, 29991, 1724, 338, 263]
    steps = backend.step_logits(ids[:3], ids[3:])
    full = backend.logits(ids)
    assert torch.allclose(steps, full[2:], atol=1e-4)


@pytest.mark.slow  # rebuilds models
def test_gpu_benchmark_checkpoint_is_a_valid_gptq_folder(tmp_path):
    from llama_pkg.pipeline import Pipeline
    from llama_pkg.params import validate

    shape = dict(layers=2, hidden=256, intermediate=512, heads=4, vocab=32000, group=128)
    folder = model_builders.write_checkpoint(tmp_path / "m", shape, device="cpu")
    engine = Pipeline.load(str(folder))
    assert engine.info.is_gptq and engine.backend.name == "batched"
    for n in (128, 300):  # the benchmark's prompts (scripts/bench_gpu.py prompt_of): BOS, "▁world", "▁hello"s
        inputs = {"prompt": " ".join(["world"] + ["hello"] * (n - 2)), "prompt_template": "{prompt}"}
        assert len(engine.prompt_ids(validate(inputs))) == n
    logits = engine.backend.logits([1, 15043, 29991])
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_every_buffer_handed_to_exllamav2_lives_as_long_as_the_model(gptq_model, monkeypatch):
    """ExLlamaV2's QMatrix keeps raw pointers to the tensors and the dequant scratch it is given
    (ext_qmatrix.cpp), so each must outlive the load: a stand-in extension records weak references to
    everything it was handed, and after the model is loaded every one is still alive."""
    import gc
    import weakref

    from llama_pkg.model import exllama_linear, llama

    given = []

    class StandIn:
        @staticmethod
        def make_q_matrix(tensors, scratch, max_dq_rows):
            given.extend(weakref.ref(t) for t in [scratch, *tensors.values()])
            return len(given)

    monkeypatch.setattr(exllama_linear, "_ext", lambda: StandIn)
    monkeypatch.setattr("llama_pkg.backends.exllamav2.require_extension", lambda: None)
    model = llama.load_quantized(gptq_model, device="cpu")
    gc.collect()
    matrices = [m for layer in model.layers for name in ("qkv", "o", "gate_up", "down")
                for m in getattr(layer[name], "parts", [layer[name]])]  # act-order: Concat of unfused parts
    assert len(given) == 5 * len(matrices)  # each: scratch, qweight, qzeros, scales, g_idx
    assert all(ref() is not None for ref in given)


@pytest.mark.parametrize("shape,problem", [
    ((4096, 4096, 32), None), ((11008, 4096, 86), None), ((4096, 12288, 1), None),  # Llama-2-7B's, ungrouped
    ((100, 64, 1), "100 input features is not a multiple of 32"),
    ((64, 30, 1), "30 output features is not a multiple of 4"),
    ((192, 64, 2), "group size 192/2 is not a power of two"),
    ((64, 64, 4), "group size 64/4 is not a power of two of at least 32"),
    ((65568, 64, 1), "65568 input features is more than 65,536"),
])
def test_layers_exllamav2_cannot_run_are_refused_naming_the_layer(shape, problem):
    from llama_pkg.model.exllama_linear import check_shape

    if problem is None:
        check_shape("model.layers.0.mlp.down_proj", *shape)
    else:
        with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.down_proj: ExLlamaV2's GPTQ kernel .*" + problem):
            check_shape("model.layers.0.mlp.down_proj", *shape)


def test_wide_batches_use_an_fp16_copy_equal_to_the_unpacked_weights(gptq_model, monkeypatch):
    """LLAMA_PKG_DENSE_WEIGHTS=1: each matrix also keeps its fp16 weight (made before ExLlamaV2 shuffles
    qweight), equal to the float weights unpacked on the CPU; more than 32 rows multiply with it, up to
    32 go to ExLlamaV2's 4-bit kernel (a stand-in that records its calls)."""
    from llama_pkg.model import exllama_linear, llama

    kernel_rows = []

    class StandIn:
        @staticmethod
        def make_q_matrix(tensors, scratch, max_dq_rows):
            return 0

        class ext_c:
            @staticmethod
            def gemm_half_q_half(x, handle, out, clear):
                kernel_rows.append(x.shape[0])

    monkeypatch.setattr(exllama_linear, "_ext", lambda: StandIn)
    monkeypatch.setattr("llama_pkg.backends.exllamav2.require_extension", lambda: None)
    monkeypatch.setenv("LLAMA_PKG_DENSE_WEIGHTS", "1")
    model = llama.load_quantized(gptq_model, device="cpu")
    unpacked = unpacked_state_dict(gptq_model)
    layer, prefix = model.layers[0], "model.layers.0."
    down = layer["down"]
    assert torch.equal(down.dense, unpacked[prefix + "mlp.down_proj.weight"].half())
    for part, name in zip(layer["qkv"].parts, "qkv"):  # act-order: q, k, v unfused
        assert torch.equal(part.dense, unpacked[prefix + f"self_attn.{name}_proj.weight"].half())
    x = torch.randn(33, down.dense.shape[1]).half()
    assert torch.equal(down(x), torch.nn.functional.linear(x, down.dense)) and kernel_rows == []
    down(x[:32])
    assert kernel_rows == [32]


def test_the_fp16_copy_is_chosen_by_memory_or_the_setting(monkeypatch):
    from conftest import package_log
    from llama_pkg.model.exllama_linear import dense_copy

    packed = {"model.layers.0.mlp.down_proj.qweight": torch.zeros(4096 // 8, 4096, dtype=torch.int32)}
    with package_log() as lines:
        for setting, made, why in (("1", True, "LLAMA_PKG_DENSE_WEIGHTS"), ("0", False, "LLAMA_PKG_DENSE_WEIGHTS"),
                                   ("auto", False, "GiB free after the 4-bit weights")):  # the CPU: no GPU memory
            monkeypatch.setenv("LLAMA_PKG_DENSE_WEIGHTS", setting)
            assert dense_copy(packed, "cpu") is made
            assert lines[-1].startswith("fp16 copy of the GPTQ weights for batches over 32 rows (0.0 GiB): "
                                        f"{'made' if made else 'not made'} (") and why in lines[-1], lines[-1]
    monkeypatch.setenv("LLAMA_PKG_DENSE_WEIGHTS", "yes")
    with pytest.raises(ValueError, match="LLAMA_PKG_DENSE_WEIGHTS='yes'"):
        dense_copy(packed, "cpu")
