"""The real Cog HTTP server on loopback: readiness, predictions, SSE, validation, cancel, a busy slot."""

import json
import math
import threading
import time

import pytest
import requests

from conftest import SERVER_SLOTS, recount, scrape, sse_events, wait_for

pytestmark = pytest.mark.slow  # a real Cog server


def wait_until_busy(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.health()["status"] == "BUSY":
            return
        time.sleep(0.05)
    raise TimeoutError("the server never became BUSY")


def test_health_and_openapi(server):
    assert server.health()["status"] == "READY"
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == []  # prompt or messages: neither is required alone
    assert "default" not in inputs["properties"]["messages"] and inputs["properties"]["messages"]["minLength"] == 1
    assert inputs["properties"]["max_new_tokens"]["maximum"] == 4096
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert inputs["properties"]["json_schema"]["default"] == ""


def test_the_index_names_docs_that_coglet_does_not_serve(server):
    """coglet 0.23.1's index lists /docs, which it answers with 404 (the README says so): pinned, so a
    coglet that changes either shows here."""
    index = requests.get(f"{server.url}/", timeout=10).json()
    assert index.get("docs_url") == "/docs" and index.get("openapi_url") == "/openapi.json"
    assert requests.get(f"{server.url}/docs", timeout=10).status_code == 404


def test_prediction_succeeds_with_exact_metrics(server):
    r = server.predict(prompt="Tell me about llamas", max_new_tokens=12, seed=4)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "succeeded", body
    assert body["metrics"]["input_token_count"] == recount("Tell me about llamas")
    assert body["metrics"]["output_token_count"] == 12
    assert "Using seed: 4" in body["logs"]
    again = server.predict(prompt="Tell me about llamas", max_new_tokens=12, seed=4).json()
    assert again["output"] == body["output"]


def test_sse_stream_concatenates_to_the_output(server):
    r = server.predict(prompt="Hello", max_new_tokens=10, seed=9, headers={"Accept": "text/event-stream"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = list(sse_events(r))
    chunks = [d["chunk"] for e, d in events if e == "output"]
    done = [d for e, d in events if e == "completed"]
    assert events[0][0] == "start" and len(done) == 1
    assert "".join(chunks) == "".join(done[0]["output"]) and len(chunks) > 1
    assert done[0]["metrics"]["output_token_count"] == 10
    assert {d["name"] for e, d in events if e == "metric"} >= {"input_token_count", "output_token_count"}


def test_validation_errors_name_the_field(server):
    r = server.predict(prompt="Hi", max_new_tokens=9000)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "max_new_tokens"
    r = server.predict(prompt="Hi", temperature="hot")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "temperature"
    r = server.predict(prompt="", max_new_tokens=3)  # the schema's minLength
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "prompt", r.text
    # neither prompt nor messages: a rule across inputs, which coglet's validator does not read (it ignores
    # if/then): the predictor's, a failed prediction naming the field
    body = server.predict(max_new_tokens=3).json()
    assert body["status"] == "failed" and "prompt: is required" in body["error"]
    assert server.wait_ready(timeout=30) == "READY"


def cancel(server, pred_id, timeout=10):
    """POST the cancel until the server knows the id (its PUT may still be on its way)."""
    deadline = time.time() + timeout
    while True:
        r = requests.post(f"{server.url}/predictions/{pred_id}/cancel", timeout=10)
        if r.status_code == 200 or time.time() > deadline:
            return r
        time.sleep(0.02)


def test_cancel_during_a_long_generation_keeps_token_counts(server):
    result = {}

    def long_prediction():
        result["r"] = requests.put(f"{server.url}/predictions/cancel-me", timeout=120,
                                   json={"input": {"prompt": "Go", "max_new_tokens": 4000, "min_new_tokens": 4000}})

    t = threading.Thread(target=long_prediction)
    t.start()
    time.sleep(1.0)
    assert cancel(server, "cancel-me").status_code == 200
    t.join(60)
    body = result["r"].json()
    assert body["status"] == "canceled", body
    assert body["metrics"]["input_token_count"] == recount("Go")
    assert 0 < body["metrics"]["output_token_count"] < 4000
    assert_ready_again(server)


def test_concurrent_streams_one_cancelled_the_next_refused_the_rest_as_alone(server):
    """SERVER_SLOTS predictions at once, SSE and JSON mixed, with their own settings: all accepted while
    one more is refused with 409; one is cancelled mid-stream; the others give exactly the output
    and counts they give alone."""
    requests_ = [dict(prompt=f"Stream {k}" + " word" * (5 * k), max_new_tokens=300, min_new_tokens=300, seed=k,
                      temperature=[0.7, 0, 1.1, 0.5][k % 4], top_k=[0, 5, 0, 40][k % 4])
                 for k in range(SERVER_SLOTS)]
    results = {}

    def client(k):
        if k == 0:  # the one that is cancelled
            results[k] = requests.put(f"{server.url}/predictions/concurrent-cancel", json={"input": requests_[k]},
                                      timeout=120).json()
        elif k % 2:
            r = server.predict(headers={"Accept": "text/event-stream"}, **requests_[k])
            results[k] = [d for e, d in sse_events(r) if e == "completed"][0]
        else:
            results[k] = server.predict(**requests_[k]).json()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(SERVER_SLOTS)]
    for t in threads:
        t.start()
    wait_until_busy(server)  # every slot taken
    refused = requests.post(f"{server.url}/predictions", json={"input": {"prompt": "One too many"}}, timeout=30)
    assert cancel(server, "concurrent-cancel").status_code == 200
    for t in threads:
        t.join(120)
    assert refused.status_code == 409 and "busy" in refused.json()["error"].lower()
    assert results[0]["status"] == "canceled" and 0 <= results[0]["metrics"]["output_token_count"] < 300
    for k in range(1, SERVER_SLOTS):
        body = results[k]
        assert body["status"] == "succeeded", body
        assert body["metrics"]["output_token_count"] == 300
        assert body["metrics"]["input_token_count"] == recount(requests_[k]["prompt"])
        assert body["logs"].count("Using seed") == 1 and f"Using seed: {k}\n" in body["logs"]  # its own lines only
        alone = server.predict(**requests_[k]).json()
        assert alone["output"] == body["output"] and alone["metrics"]["output_token_count"] == 300, k
    assert_ready_again(server)


def assert_ready_again(server):
    deadline = time.time() + 30
    while server.health()["status"] != "READY" and time.time() < deadline:
        time.sleep(0.1)
    assert server.health()["status"] == "READY"
    assert server.predict(prompt="Still there?", max_new_tokens=3).json()["status"] == "succeeded"


def test_prometheus_metrics_count_what_is_billed(server):
    """LLAMA_PKG_METRICS_PORT: the token counters move by the prediction's own metering, each token after the
    first is one inter-token latency, and the running gauge sees a prediction while it runs."""
    before = scrape(server.metrics_url)
    body = server.predict(prompt="Count the llamas", max_tokens=9, seed=2).json()
    after = scrape(server.metrics_url)
    delta = lambda name: after[f"llama_pkg:{name}"] - before[f"llama_pkg:{name}"]  # noqa: E731
    assert delta("prompt_tokens_total") == body["metrics"]["input_token_count"]
    assert delta("generation_tokens_total") == body["metrics"]["output_token_count"] == 9
    assert delta("time_to_first_token_seconds_count") == 1 and delta("inter_token_latency_seconds_count") == 8
    assert after["llama_pkg:setup_seconds"] > 0 and after["llama_pkg:num_requests_waiting"] == 0
    assert after["llama_pkg:num_requests_running"] == 0 and after["llama_pkg:kv_cache_usage_perc"] == 0
    t = threading.Thread(target=requests.put, args=(f"{server.url}/predictions/metrics-long",), kwargs=dict(
        json={"input": {"prompt": "Go", "max_tokens": 4000, "min_tokens": 4000}}, timeout=120))
    t.start()
    try:
        assert wait_for(lambda: scrape(server.metrics_url)["llama_pkg:num_requests_running"] == 1, timeout=30)
        assert scrape(server.metrics_url)["llama_pkg:kv_cache_usage_perc"] > 0
    finally:
        cancel(server, "metrics-long")
        t.join(120)
    assert wait_for(lambda: scrape(server.metrics_url)["llama_pkg:num_requests_running"] == 0, timeout=10)


def schema_inputs(server):
    """The Input properties of the schema the server serves (what clients read)."""
    return requests.get(f"{server.url}/openapi.json", timeout=10).json()["components"]["schemas"]["Input"]


# companions that keep a request at a bound valid otherwise and short: a stop sequence ends it at once
SHORT = {"prompt": "Hi", "max_tokens": 2, "stop_sequences": "e,a,o,i,n,t,s"}
AT_BOUND = {"max_tokens": {"max_tokens": None}, "min_tokens": {"max_tokens": 4096},
            "max_new_tokens": {"max_tokens": None}, "min_new_tokens": {"max_tokens": None, "max_new_tokens": 4096}}


NULL_WITH = {"prompt": {"messages": json.dumps([{"role": "user", "content": "Hi"}])}}  # a null prompt: not given


def just_past(value, kind, direction):
    return value + direction if kind == "integer" else math.nextafter(value, direction * math.inf)


def test_the_schema_and_the_predictor_agree_on_every_bound_and_null(server):
    """From the served schema: every numeric input at its minimum and maximum runs (status succeeded), just
    past either is a 422 naming it; every input whose type allows null runs with null; a prompt that the
    schema refuses (empty) is a 422; the older names are marked deprecated."""
    schema = schema_inputs(server)
    checked = []
    for name, prop in schema["properties"].items():
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        kind = types[0]
        for bound, direction in (("minimum", -1), ("maximum", 1)):
            if bound not in prop:
                continue
            inputs = {**SHORT, **AT_BOUND.get(name, {}), name: prop[bound]}
            inputs = {k: v for k, v in inputs.items() if v is not None}
            body = server.predict(**inputs).json()
            assert body.get("status") == "succeeded", (name, bound, body)
            r = server.predict(**{**inputs, name: just_past(prop[bound], kind, direction)})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == name, (name, bound, r.text)
            checked.append((name, bound))
        if "null" in types:
            body = server.predict(**{**SHORT, **NULL_WITH.get(name, {}), name: None}).json()
            assert body.get("status") == "succeeded", (name, body)
            checked.append((name, None))
    assert {n for n, _ in checked} >= {"max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed",
                                       "repetition_penalty", "presence_penalty", "frequency_penalty"}
    assert ("seed", None) in checked and ("max_new_tokens", None) in checked
    for inputs in ({"prompt": "", "max_tokens": 2}, {"messages": "", "prompt": "Hi"}):
        r = server.predict(**inputs)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] in inputs, (inputs, r.text)
    assert schema["properties"]["max_new_tokens"]["deprecated"] and schema["properties"]["min_new_tokens"]["deprecated"]
    assert "deprecated" not in schema["properties"]["max_tokens"]
