"""The OpenAI-compatible front (`llama-pkg openai`) with the official `openai` client, in front of the session's
real Cog server on the tiny model: what the front answers is what Cog's API answers for the same inputs."""

import json
import subprocess
import sys
import threading

import jsonschema
import openai
import pytest
import requests

from conftest import ROOT, SERVER_SLOTS, CogServer, free_port, openai_front, wait_for
from json_schemas import PERSON

pytestmark = pytest.mark.slow  # a real Cog server
MODEL = "tiny-llama"
HI = [{"role": "user", "content": "Tell me about llamas"}]


@pytest.fixture(scope="module")
def front(server):
    with openai_front(server.url, MODEL) as url:
        yield url


@pytest.fixture
def client(front):
    return openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)


def cog(server, **inputs):
    """The same prediction straight through Cog's API: (text, metrics)."""
    body = server.predict(**inputs).json()
    assert body["status"] == "succeeded", body
    return "".join(body["output"]), body["metrics"]


def test_models_lists_the_one_served(client, front):
    health = requests.get(f"{front}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "READY"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_chat_answer_is_cogs_answer_with_its_metering(client, server):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, seed=7, temperature=0.8)
    text, metrics = cog(server, messages=json.dumps(HI), system_prompt="", max_tokens=12, seed=7, temperature=0.8,
                        top_p=1.0, repetition_penalty=1.0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (metrics["input_token_count"], 12)
    assert r.usage.total_tokens == metrics["input_token_count"] + 12 and r.model == MODEL


def test_streamed_text_equals_the_whole_answer_and_usage_comes_last(client):
    kwargs = dict(model=MODEL, messages=HI, max_completion_tokens=20, seed=3)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(**kwargs, stream=True))  # no usage asked: none sent
    assert all(c.usage is None for c in plain) and "".join(
        c.choices[0].delta.content or "" for c in plain) == text


def test_a_stop_sequence_cuts_the_answer_with_finish_reason_stop(client):
    full = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=30, temperature=0).choices[0]
    text = full.message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 30


def test_response_format_json_schema_gives_a_valid_document(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=200, seed=1, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=30, seed=1,
                                       response_format={"type": "json_object"})
    content = r.choices[0].message.content  # any object: the random model's first key may run past max_tokens
    assert content.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict))


def test_completions_take_the_prompt_as_raw_text(client, server):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=2)
    text, metrics = cog(server, prompt="Once upon a time", prompt_template="{prompt}", max_tokens=8, seed=2,
                        temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    assert r.choices[0].text == text and r.usage.prompt_tokens == metrics["input_token_count"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, seed=2, stream=True) if c.choices)
    assert streamed == text


@pytest.mark.parametrize("kwargs,param", [
    (dict(top_p=-0.1), "top_p"), (dict(max_tokens=0), "max_tokens"), (dict(max_completion_tokens=5000), "max_completion_tokens"),
    (dict(seed=-1), "seed"), (dict(n=2), "n"), (dict(logprobs=True), "logprobs"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"), (dict(temperature=9), "temperature"),
    (dict(messages=[{"role": "assistant", "content": "x"}]), "messages"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(response_format={"type": "xml"}), "response_format"),
])
def test_bad_requests_are_the_sdks_bad_request_error_naming_the_field(client, kwargs, param):
    kwargs = {"model": MODEL, "messages": HI, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert e.value.body["message"].startswith(param) or "Unrecognized" in e.value.body["message"]


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


def occupy_every_slot(server, prefix):
    """SERVER_SLOTS long predictions straight on Cog (ids prefix-k), running until cancelled."""
    threads = [threading.Thread(target=requests.put, args=(f"{server.url}/predictions/{prefix}-{k}",), kwargs=dict(
        json={"input": {"prompt": "Go", "max_tokens": 4000, "min_tokens": 4000}}, timeout=300))
        for k in range(SERVER_SLOTS)]
    for t in threads:
        t.start()
    assert wait_for(lambda: server.health()["status"] == "BUSY", timeout=30)
    return threads


def release(server, prefix, threads):
    for k in range(SERVER_SLOTS):
        requests.post(f"{server.url}/predictions/{prefix}-{k}/cancel", timeout=10)
    for t in threads:
        t.join(60)
    assert wait_for(lambda: server.health()["status"] == "READY", timeout=30)


def test_full_slots_are_a_rate_limit_with_retry_after(client, front, server):
    threads = occupy_every_slot(server, "busy")
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
        assert e.value.response.headers["retry-after"] == "1"
        r = requests.post(f"{front}/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        health = requests.get(f"{front}/health", timeout=10)  # busy is still serving: not a failed probe
        assert health.status_code == 200 and health.json()["status"] == "BUSY"
    finally:
        release(server, "busy", threads)


def test_a_client_that_goes_away_cancels_its_prediction(client, server):
    """A stream closed after a few chunks of a 4000-token answer (10 s or more here): its slot is free again
    within 3 s; the same for a whole answer whose client times out."""
    stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4000, extra_body={"min_tokens": 4000},
                                            stream=True)
    for _, _ in zip(range(5), stream):
        pass
    assert server.health()["status"] in ("READY", "BUSY")
    stream.close()
    assert wait_for(lambda: server.health()["status"] == "READY", timeout=3)
    # and a whole (non-streamed) request whose client times out
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1.0).chat.completions.create(model=MODEL, messages=HI, max_tokens=4000,
                                                                 extra_body={"min_tokens": 4000})
    assert wait_for(lambda: server.health()["status"] == "READY", timeout=3)


def test_an_unreachable_upstream_is_503(front):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_pkg", "openai", "--upstream", f"http://127.0.0.1:{free_port()}",
                             "--port", str(port), "--model-name", MODEL], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _answers(url), timeout=30)
        r = requests.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=10)
        assert r.status_code == 503 and "cannot be reached" in r.json()["error"]["message"]
        assert requests.get(f"{url}/health", timeout=10).status_code == 503
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(url):
    try:
        return requests.get(f"{url}/v1/models", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_serve_starts_the_front_beside_the_server_and_it_ends_with_it(test_model):
    """`serve --openai-port`: the front answers under the weights folder's name, and stops with the server."""
    port = free_port()
    server = CogServer(test_model, free_port(), args=("--openai-port", str(port)))
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready()
        assert wait_for(lambda: _answers(url), timeout=30)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [test_model.name]
        r = client.chat.completions.create(model=test_model.name, messages=HI, max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        server.stop()
    assert wait_for(lambda: not _answers(url), timeout=10)
