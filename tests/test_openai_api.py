"""OpenAI request bodies -> the predictor's inputs, without a server (tests/test_openai.py serves them)."""

import json

import pytest

from llama_pkg.openai_api import ApiError, chat_inputs, completion_inputs, input_error
from llama_pkg.params import validate

HI = [{"role": "user", "content": "Hi"}]


def test_openais_defaults_replace_the_predictors():
    inputs, stream, usage, renamed = chat_inputs({"model": "m", "messages": HI}, "m")
    assert (inputs["temperature"], inputs["top_p"], inputs["repetition_penalty"], inputs["system_prompt"]) == (
        1.0, 1.0, 1.0, "")
    assert inputs["max_tokens"] == 4096 and (stream, usage, renamed) == (False, False, {})
    request = validate(inputs)  # what the predictor will accept
    assert request.dialog == (("user", "Hi"),) and request.system_prompt == ""


def test_fields_are_mapped():
    body = {"model": "m", "messages": [{"role": "developer", "content": "S"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 9, "stop": "x", "seed": 4, "temperature": 0.2, "top_k": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}},
            "stream": True, "stream_options": {"include_usage": True}, "n": 1, "logprobs": False}
    inputs, stream, usage, renamed = chat_inputs(body, "m")
    assert json.loads(inputs["messages"]) == [{"role": "system", "content": "S"}, {"role": "user", "content": "ab"}]
    assert (inputs["max_tokens"], inputs["stop_sequences"], inputs["seed"], inputs["top_k"]) == (9, '["x"]', 4, 5)
    assert json.loads(inputs["json_schema"]) == {"type": "integer"} and stream and usage
    assert renamed == {"max_tokens": "max_completion_tokens"}
    inputs, *_ = completion_inputs({"prompt": ["Once"], "max_tokens": 3}, "m")
    assert (inputs["prompt"], inputs["prompt_template"], inputs["max_tokens"]) == ("Once", "{prompt}", 3)


@pytest.mark.parametrize("body,param,status", [
    ({"messages": HI, "n": 3}, "n", 400), ({"messages": HI, "tools": [{"type": "function"}]}, "tools", 400),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"messages": HI, "wat": 1}, "wat", 400), ({"messages": HI, "model": "other"}, "model", 404),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", 400),
    ({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, "messages[0].name", 400),
    ({"messages": HI, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", 400),
    ({"messages": HI, "stop": [1]}, "stop", 400), ({}, "messages", 400),
])
def test_refusals_name_the_field(body, param, status):
    with pytest.raises(ApiError) as e:
        chat_inputs(body, "m")
    assert (e.value.status, e.value.param) == (status, param) and e.value.body()["error"]["param"] == param


def test_completions_refuse_token_ids_and_several_prompts():
    for prompt in ([1, 2], ["a", "b"], None):
        with pytest.raises(ApiError) as e:
            completion_inputs({"prompt": prompt}, "m")
        assert e.value.param == "prompt"


def test_a_failed_predictions_input_error_names_the_openai_field():
    e = input_error("Prediction failed: Generator iteration error: InputError: stop_sequences: at most 16 stop sequences")
    assert (e.status, e.param, e.message) == (400, "stop", "stop: at most 16 stop sequences")
    assert input_error("InputError: max_tokens: too many", {"max_tokens": "max_completion_tokens"}).param == (
        "max_completion_tokens")
    assert input_error("Prediction failed: RuntimeError: CUDA out of memory") is None
