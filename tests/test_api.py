"""The Python API (`llama_pkg.load`): what the README shows, on the tiny model."""

import subprocess
import sys

import pytest

import llama_pkg
from conftest import ROOT


@pytest.fixture(scope="module")
def model(test_model):
    m = llama_pkg.load(test_model)
    yield m
    m.close()


def test_generate_and_stream_give_the_same_answer_with_its_metrics(model):
    inputs = dict(prompt="Tell me about llamas", max_tokens=12, min_tokens=12, seed=3)
    answer = model.generate(**inputs)
    stream = model.stream(**inputs)
    chunks = list(stream)
    assert answer.text == "".join(chunks) and answer.text
    assert answer.metrics["output_token_count"] == stream.metrics["output_token_count"] == 12
    assert answer.metrics["finish_reason"] == "length" and answer.metrics["input_token_count"] > 0


def test_a_stream_closed_early_is_cancelled_billed_what_was_generated(model):
    stream = model.stream(prompt="Tell me about llamas", max_tokens=2000, min_tokens=2000, seed=1)
    taken = [next(stream) for _ in range(5)]
    stream.close()
    assert 5 <= stream.metrics["output_token_count"] < 2000 and "finish_reason" not in stream.metrics
    assert all(taken)


def test_a_bad_input_is_an_input_error_naming_it(model):
    with pytest.raises(llama_pkg.InputError) as e:
        model.generate(prompt="Hi", top_k="many")
    assert e.value.field == "top_k"


def test_importing_the_package_loads_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, llama_pkg; print('torch' in sys.modules)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
