"""Weights in a format this package does not load are refused in one line that names the format, before
anything is loaded; large float weights on a CUDA machine are refused rather than run on the CPU."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from llama_pkg import backends, weights


def copy_of(test_model, tmp_path, **config_changes):
    folder = tmp_path / "model"
    shutil.copytree(test_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_gguf_file_or_folder_is_named_as_gguf(tmp_path):
    gguf = tmp_path / "llama-2-7b-chat.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    for path in (gguf, tmp_path):
        with pytest.raises(weights.WeightsError, match="is a GGUF model \\(llama.cpp's format\\)"):
            weights.resolve(path)


def test_metas_original_checkpoint_is_named(tmp_path):
    (tmp_path / "consolidated.00.pth").write_bytes(bytes(16))
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(weights.WeightsError, match="Meta's original checkpoint"):
        weights.resolve(tmp_path)


@pytest.mark.parametrize("quantization,named", [({"quant_method": "awq", "bits": 4}, "'awq' is not supported"),
                                                ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
                                                ({"quant_method": "fp8"}, "'fp8' is not supported"),
                                                ({"quant_method": "gptq", "bits": 8}, "8-bit GPTQ is not supported")])
def test_other_quantizations_are_named(test_model, tmp_path, quantization, named):
    folder = copy_of(test_model, tmp_path, quantization_config=quantization)
    with pytest.raises(weights.WeightsError, match=named):
        weights.verify(folder)


def test_exl2_tensors_are_named(test_model, tmp_path):
    folder = copy_of(test_model, tmp_path)
    save_file({"model.layers.0.self_attn.q_proj.q_weight": torch.zeros(4, 4, dtype=torch.int32)},
              str(folder / "model.safetensors"))
    with pytest.raises(weights.WeightsError, match="EXL2 tensors"):
        weights.verify(folder)


def test_a_relative_folder_that_is_not_there_says_relative_to_what(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(weights.WeightsError, match=f"relative to the working directory, {tmp_path}"):
        weights.resolve("weights/llama-2-7b-chat")


def test_large_float_weights_on_a_cuda_machine_are_refused_small_ones_run_on_the_cpu(test_model, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    small = weights.inspect(test_model)
    assert backends.choose(small) == ("batched", "float weights, on the CPU (a small model: the GPU path is for "
                                                 "GPTQ weights)")
    seven_b = weights.inspect(copy_of(test_model, tmp_path, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128))
    with pytest.raises(weights.WeightsError, match="about 25.1 GiB as float32 for 6.74 B parameters"):
        backends.choose(seven_b)
    monkeypatch.setenv("LLAMA_PKG_BACKEND", "batched")
    assert backends.choose(seven_b) == ("batched", "forced by LLAMA_PKG_BACKEND")


def test_forcing_exllamav2_without_cuda_says_so(test_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LLAMA_PKG_BACKEND", "exllamav2")
    with pytest.raises(ValueError, match="LLAMA_PKG_BACKEND=exllamav2 needs a CUDA device"):
        backends.choose(weights.inspect(test_model))


@pytest.mark.slow  # a subprocess
def test_the_cli_refuses_a_gguf_in_one_line(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    out = subprocess.run([sys.executable, "-m", "llama_pkg", "predict", "--weights", str(gguf), "-i", "prompt=Hi"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {gguf} is a GGUF model (llama.cpp's format)")


def test_an_unreadable_weights_file_is_named_with_the_fix(test_model, monkeypatch):
    """A container runs as its own user: weights mounted from the host may not be readable by it (the
    demo model's safetensors were 0600). Setup names the file, the user and the fix, not a PermissionError.
    (os.access answers as an unprivileged user would: root, which these machines run as, reads anything.)"""
    from llama_pkg import weights

    real = weights.os.access
    monkeypatch.setattr(weights.os, "access", lambda path, mode: not str(path).endswith(".safetensors") and real(path, mode))
    with pytest.raises(weights.WeightsError, match="model.safetensors cannot be read by this process.*chmod -R a\\+rX"):
        weights.verify(test_model)
