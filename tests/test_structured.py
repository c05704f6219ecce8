"""json_schema: every answer a JSON document that validates, per request inside a batch; the masks in the
sampler and the CUDA-graph input; errors before billing; truncation said; the same JSON whatever shares
the step. The tiny model's random weights never help: only the masks make its answers parse."""

import json
import threading

import jsonschema
import pytest
import torch

from conftest import concurrently, package_log, reference_engine
from json_schemas import PERSON, SCHEMAS, UNBOUNDED
from llama_pkg import weights
from llama_pkg.engine.cuda_graphs import CudaGraphs
from llama_pkg.engine.llm_engine import LLMEngine
from llama_pkg.grammar import CACHE_SCHEMAS, Grammars, fill_masks, words
from llama_pkg.model import sampler
from llama_pkg.params import MAX_SCHEMA_CHARS, InputError, SamplingParams, validate
from llama_pkg.pipeline import Pipeline


def predict(engine, **inputs):
    """run(), also when it fails: (text, metrics, error)."""
    from llama_pkg import runtime

    metrics, chunks = {}, []
    try:
        for chunk in runtime.predict(engine, inputs, metrics.__setitem__):
            chunks.append(chunk)
    except InputError as e:
        return "".join(chunks), metrics, e
    return "".join(chunks), metrics, None


def assert_document(text, metrics, schema):
    """A complete answer validates; one cut short says so (and only when max_tokens cut it)."""
    if metrics["truncated"]:
        return False
    jsonschema.validate(json.loads(text), schema)
    return True


# -- the sampler's masks ------------------------------------------------------------------------------

def test_allowed_ids_reads_bit_i_of_word_w_as_id_32w_plus_i():
    g = torch.Generator().manual_seed(0)
    vocab = 100
    masks = torch.randint(-2**31, 2**31 - 1, (3, words(vocab)), dtype=torch.int32, generator=g)
    got = sampler.allowed_ids(masks, vocab)
    want = torch.tensor([[(int(masks[r, i // 32]) >> (i % 32)) & 1 for i in range(vocab)] for r in range(3)]).bool()
    assert torch.equal(got, want)


def mask_of(ids, vocab, rows=1):
    m = torch.zeros(rows, words(vocab), dtype=torch.int32)
    for i in ids:
        m[:, i // 32] |= torch.tensor(1 << (i % 32)).to(torch.int32)
    return m


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5, 5.0])
def test_a_masked_row_draws_only_allowed_ids_and_a_free_row_is_unchanged(temperature):
    vocab, n = 300, 64
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, vocab, generator=g) * 3
    allowed = [3, 31, 32, 77, 299]
    masks = torch.cat([mask_of(allowed, vocab, n // 2), torch.full((n // 2, words(vocab)), -1, dtype=torch.int32)])
    params = [SamplingParams(temperature=temperature, seed=s) for s in range(n)]
    s = sampler.unpack(sampler.packed(params))
    counts, stops, steps = torch.zeros(n, vocab), torch.zeros(n, vocab, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    chosen = sampler.sample(logits, counts, s, steps, stops, masks)
    assert set(chosen[:n // 2].tolist()) <= set(allowed)
    free = sampler.sample(logits, counts, s, steps, stops)
    assert torch.equal(chosen[n // 2:], free[n // 2:])


def test_min_tokens_holds_a_stop_id_only_while_the_mask_allows_another_id():
    vocab, stop = 64, 2
    logits = torch.zeros(2, vocab)
    logits[:, stop] = 10.0  # the model wants to stop
    masks = torch.cat([mask_of([stop, 7], vocab), mask_of([stop], vocab)])
    s = sampler.unpack(sampler.packed([SamplingParams(temperature=0, min_new_tokens=50)] * 2))
    stops = torch.zeros(2, vocab, dtype=torch.bool)
    stops[:, stop] = True
    chosen = sampler.sample(logits, torch.zeros(2, vocab), s, torch.zeros(2, dtype=torch.long), stops, masks)
    assert chosen.tolist() == [7, stop]  # held off while 7 is allowed; the document's end ends it anyway


def test_a_graph_bucket_takes_the_masks_as_an_input_and_clears_them_for_free_steps():
    seen = []
    graphs = CudaGraphs(lambda inputs, masks: (seen.append(masks.clone()) or inputs[0], inputs[0].float()[:, None]),
                        [4], padding_row=9, mask_words=3, device=torch.device("cpu"))
    rows = [[5, 6], [0, 0], [0, 1], [0, 0]]
    graphs.run(rows, 4, torch.tensor([[1, 2, 3], [-1, -1, -1]], dtype=torch.int32))
    graphs.run(rows, 4)
    assert seen[0][0].tolist() == [1, 2, 3] and (seen[0][1:] == -1).all()  # padding rows allow everything
    assert (seen[1] == -1).all()  # a step with no constrained row: every bit set again


# -- the input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, words_", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"type": "string"' + " " * MAX_SCHEMA_CHARS + "}", f"at most {MAX_SCHEMA_CHARS} are taken"),
])
def test_a_bad_schema_value_is_refused_naming_the_field(value, words_):
    with pytest.raises(InputError) as e:
        validate({"prompt": "hi", "json_schema": value})
    assert e.value.field == "json_schema" and words_ in str(e.value)


@pytest.mark.parametrize("schema, words_", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "pattern": "(a"}, "regex"),
    ({"$ref": "#/$defs/missing"}, "missing"),
])
def test_a_schema_that_does_not_compile_is_refused_before_anything_is_billed(engine, schema, words_):
    text, metrics, error = predict(engine, prompt="hi", json_schema=json.dumps(schema))
    assert isinstance(error, InputError) and error.field == "json_schema" and words_ in str(error)
    assert text == "" and metrics.get("input_token_count", 0) == 0 and metrics.get("output_token_count", 0) == 0


def test_compiled_grammars_are_cached_by_schema_text_and_bounded(test_model):
    g = Grammars(test_model, 32000, {2})
    first = json.dumps(PERSON)
    assert g.compile(first) is g.compile(first)
    for i in range(CACHE_SCHEMAS):
        g.compile(json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))
    assert len(g.cache) == CACHE_SCHEMAS and first not in g.cache


def test_eos_is_allowed_only_where_the_document_is_complete(test_model, tokenizer):
    import numpy

    g = Grammars(test_model, 32000, {tokenizer.eos_id})
    m = g.matcher(json.dumps({"type": "array", "items": {"type": "boolean"}, "maxItems": 1}))
    mask = numpy.zeros(words(32000), dtype=numpy.int32)

    def allows(token):
        fill_masks([(m, 0)], mask.ctypes.data, mask.nbytes, 1)
        return bool((int(mask[token // 32]) >> (token % 32)) & 1)

    piece = {b: i for i, b in reversed(list(enumerate(tokenizer.token_bytes)))}  # bytes -> the first id
    for text in (b"[", b"true"):
        assert not allows(tokenizer.eos_id) and not m.done
        assert allows(piece[text]) and m.consume(piece[text])
    assert not allows(tokenizer.eos_id) and not m.complete  # "[true" is not a document yet
    assert m.consume(piece[b"]"]) and m.done and m.complete and allows(tokenizer.eos_id)


def test_a_model_with_fewer_logits_than_its_tokenizer_has_ids_refuses_json_schema(test_model):
    with pytest.raises(InputError) as e:
        Grammars(test_model, 31990, {2})
    assert e.value.field == "json_schema" and "not available for this model" in str(e.value)


def test_a_backend_that_cannot_constrain_refuses_by_name_and_bills_nothing(engine):
    class GeneratorOwnSampler:  # as the exllamav2 backend: its generator draws with its own sampler
        name, structured, context_length, concurrency = "exllamav2", False, 4096, 1
        calls = 0

        def generate(self, *args):
            self.calls += 1
            yield from ()

    backend = GeneratorOwnSampler()
    text, metrics, error = predict(Pipeline(backend, engine.tokenizer, engine.info), prompt="hi",
                                   json_schema=json.dumps(PERSON))
    assert error.field == "json_schema" and "exllamav2 backend" in str(error)
    assert backend.calls == 0 and metrics.get("input_token_count", 0) == 0


# -- answers on the tiny model (random weights: only the mask makes them JSON) ---------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_every_answer_parses_and_validates_eight_at_once_with_free_text(engine, temperature):
    jobs = [dict(prompt=ask, json_schema=json.dumps(schema), temperature=temperature, seed=i, max_tokens=256)
            for i, (_, schema, ask) in enumerate(SCHEMAS)]
    free = [dict(prompt="Tell me a story.", temperature=temperature, seed=s, max_tokens=40) for s in range(4)]
    results = concurrently(lambda **kw: predict(engine, **kw), jobs + free)
    for (title, _, _), job, (text, metrics, error) in zip(SCHEMAS, jobs, results):
        assert error is None
        ok = assert_document(text, metrics, json.loads(job["json_schema"]))
        assert ok or metrics["output_token_count"] == 256  # only max_tokens may cut it, and it is said
        assert ok or title in UNBOUNDED  # a bounded document always ends
    for job, (text, metrics, error) in zip(free, results[len(jobs):]):
        alone = predict(engine, **job)
        assert (text, metrics["output_token_count"]) == (alone[0], alone[1]["output_token_count"])
        assert "truncated" not in metrics


def test_max_tokens_that_cut_the_document_are_said_in_a_metric_and_the_log(engine):
    with package_log() as lines:
        text, metrics, _ = predict(engine, prompt="hi", json_schema=json.dumps(PERSON), max_tokens=4, seed=0)
    assert metrics["truncated"] is True and metrics["output_token_count"] == 4
    with pytest.raises(ValueError):
        json.loads(text)
    assert any("not a complete JSON document" in line and "max_tokens" in line for line in lines)


def test_a_stop_sequence_inside_the_document_ends_the_answer_and_says_it_is_cut(engine):
    with package_log() as lines:
        text, metrics, _ = predict(engine, prompt="hi", json_schema=json.dumps(PERSON), stop_sequences='"age"',
                                   seed=0, temperature=0)
    assert metrics["truncated"] is True and text.startswith("{") and '"age"' not in text
    assert any("cut by a stop sequence" in line for line in lines)


def test_a_cancelled_constrained_answer_is_billed_what_was_drawn_and_said_to_be_cut(engine):
    from llama_pkg import runtime

    cancel, metrics, chunks = threading.Event(), {}, []
    with package_log() as lines:
        for chunk in runtime.predict(engine, {"prompt": "hi", "json_schema": '{"type": "string", "minLength": 3000}',
                                              "seed": 0}, metrics.__setitem__, cancel):
            chunks.append(chunk)
            if len(chunks) == 5:
                cancel.set()
    assert metrics["truncated"] is True and 5 <= metrics["output_token_count"] < 512
    assert "".join(chunks).startswith('"')
    assert any("cut by a cancel" in line for line in lines)
    assert engine.backend.call(engine.backend.pool.all_free)


def test_a_panic_in_the_grammar_library_fails_its_step_not_the_engine(test_model, monkeypatch):
    """A Rust panic surfaces in Python as a BaseException (pyo3's PanicException), which `except Exception`
    does not catch: the step's requests must still fail and the engine go on serving."""
    from llama_pkg.engine import model_runner

    class Panic(BaseException):
        pass

    def panicking(*args):
        raise Panic("injected panic")

    engine = LLMEngine(test_model, 4096)
    grammars = Grammars(test_model, 32000, {2})
    outcome = {}

    def constrained():
        try:
            list(engine.generate([1, 450, 4996], 20, SamplingParams(seed=1), frozenset({2}), None,
                                 grammars.matcher(json.dumps(PERSON))))
        except BaseException as e:  # noqa: BLE001 - what the request got
            outcome["error"] = e

    try:
        monkeypatch.setattr(model_runner, "fill_masks", panicking)
        t = threading.Thread(target=constrained)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive(), "the request hung: the engine's thread died"
        assert isinstance(outcome.get("error"), Panic)
        monkeypatch.undo()
        assert len(list(engine.generate([1, 450], 5, SamplingParams(seed=2, min_new_tokens=5), frozenset()))) == 5
    finally:
        engine.close()


def test_min_tokens_does_not_stretch_a_complete_document(engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    text, metrics, _ = predict(engine, prompt="hi", json_schema=json.dumps(schema), min_tokens=100, seed=0)
    assert json.loads(text) in ({"ok": True}, {"ok": False}) and metrics["truncated"] is False
    assert metrics["output_token_count"] < 100


def test_every_emitted_token_is_billed_forced_or_sampled(engine):
    ids = []

    class Recording:
        name, structured, context_length, concurrency = "batched", True, 4096, 8

        def generate(self, *args):
            for token in engine.backend.generate(*args):
                ids.append(token)
                yield token

    schema = {"type": "object", "properties": {"a_long_key_name_that_is_forced": {"const": "and a forced value"}},
              "required": ["a_long_key_name_that_is_forced"], "additionalProperties": False}
    text, metrics, _ = predict(Pipeline(Recording(), engine.tokenizer, engine.info), prompt="hi",
                               json_schema=json.dumps(schema), seed=0)
    assert json.loads(text) == {"a_long_key_name_that_is_forced": "and a forced value"}
    billable = [i for i in ids if i not in engine.stop_ids]
    assert metrics["output_token_count"] == len(billable) and engine.tokenizer.decode(billable) == text


def test_the_same_seed_gives_the_same_json_alone_or_with_seven_partners(engine):
    job = dict(prompt="A person, please.", json_schema=json.dumps(PERSON), temperature=1.5, seed=11)
    alone = predict(engine, **job)
    partners = [dict(prompt=ask * (1 + i), json_schema=json.dumps(schema) if i % 2 else "", temperature=1.0, seed=i,
                     max_tokens=60) for i, (_, schema, ask) in enumerate(SCHEMAS[:7])]
    batched = concurrently(lambda **kw: predict(engine, **kw), partners + [job])[-1]
    assert (batched[0], batched[1]["output_token_count"]) == (alone[0], alone[1]["output_token_count"])


def test_the_paged_step_and_its_graph_buckets_apply_the_same_masks(test_model, engine, monkeypatch):
    """The CUDA step's code on the CPU (Triton interpreter; buckets run as a graph would): the same greedy ids
    as the CPU step for constrained and free rows side by side (its sums differ in the last bits, so draws
    at a temperature may part). Both on ATen's bf16 products: the package's kernel quantizes activations to
    8 bits, which turns last-bit differences into whole steps and, on the tiny model's near ties, other ids."""
    grammars = Grammars(test_model, 32000, engine.stop_ids)
    monkeypatch.setenv("LLAMA_PKG_CPU_KERNELS", "off")
    paged = LLMEngine(test_model, 4096, paged=True)
    cpu = LLMEngine(test_model, 4096)
    prompts = [[1] + list(range(400 + 7 * k, 430 + 7 * k)) for k in range(3)]
    schemas = [json.dumps(PERSON), "", json.dumps(SCHEMAS[3][1])]

    def tokens(backend, k):
        c = grammars.matcher(schemas[k]) if schemas[k] else None
        greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
        return list(backend.generate(prompts[k], 40, greedy, engine.stop_ids, None, c))

    try:
        got = concurrently(lambda k: tokens(paged, k), [dict(k=k) for k in range(3)])
        assert paged.stats()["graph_steps"] > 0
        want = [tokens(cpu, k) for k in range(3)]
    finally:
        paged.close()
        cpu.close()
    assert got == want
    for k in (0, 2):
        jsonschema.validate(json.loads(engine.tokenizer.decode(got[k])), json.loads(schemas[k]))


def test_the_transformers_backend_follows_the_same_masks(test_model, engine):
    from llama_pkg.backends.hf import TransformersBackend

    grammars = Grammars(test_model, 32000, engine.stop_ids)
    hf = TransformersBackend(test_model, 4096)
    ids = [1] + list(range(700, 740))
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    got = list(hf.generate(ids, 80, greedy, engine.stop_ids, None, grammars.matcher(json.dumps(PERSON))))
    reference = reference_engine(test_model, 4096)  # float32 Linears, as transformers' (greedy ids alike)
    want = list(reference.generate(ids, 80, greedy, engine.stop_ids, None, grammars.matcher(json.dumps(PERSON))))
    reference.close()
    assert got == want
    jsonschema.validate(json.loads(engine.tokenizer.decode(got)), PERSON)


# -- the demo model: a real chat model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    return Pipeline.load(str(weights.DEMO_FOLDER))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_the_demo_model_answers_every_schema_eight_at_once_mixed_with_free_text(demo, temperature):
    jobs = [dict(prompt=ask, json_schema=json.dumps(schema), temperature=temperature, seed=seed, max_tokens=200,
                 title=title) for seed in range(2 if temperature else 1) for title, schema, ask in SCHEMAS]
    free = [dict(prompt="Name a colour.", temperature=temperature, seed=s, max_tokens=24) for s in range(4)]
    results = []
    for start in range(0, len(jobs), 6):  # 8 streams: 6 constrained, 2 free
        batch = jobs[start:start + 6] + free[start // 6 % 2 * 2:][:2]
        answers = concurrently(lambda title=None, **kw: predict(demo, **kw), batch)
        results += list(zip(batch, answers))
    for job, (text, metrics, error) in results:
        assert error is None
        if job.get("json_schema"):
            ok = assert_document(text, metrics, json.loads(job["json_schema"]))
            assert ok or metrics["output_token_count"] == 200  # only max_tokens may cut it, and it is said
            assert ok or job["title"] in UNBOUNDED  # a bounded document always ends
        else:
            alone = predict(demo, **job)
            assert (text, metrics["output_token_count"]) == (alone[0], alone[1]["output_token_count"])


@pytest.mark.slow
def test_the_demo_model_gives_the_same_json_alone_and_batched(demo):
    job = dict(prompt="Describe a person as JSON.", json_schema=json.dumps(PERSON), temperature=1.0, seed=5)
    alone = predict(demo, **job)
    partners = [dict(prompt=ask, json_schema=json.dumps(schema) if i % 2 else "", seed=i, max_tokens=40)
                for i, (_, schema, ask) in enumerate(SCHEMAS[:7])]
    batched = concurrently(lambda **kw: predict(demo, **kw), partners + [job])[-1]
    assert alone[0] == batched[0] and alone[1]["output_token_count"] == batched[1]["output_token_count"]
    jsonschema.validate(json.loads(alone[0]), PERSON)


# -- over HTTP: the README's example ------------------------------------------------------------------------

@pytest.mark.slow
def test_over_http_the_answer_parses_and_a_bad_schema_fails_naming_the_field(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 130}},
              "required": ["name", "age"], "additionalProperties": False}
    body = server.predict(prompt="Describe a person as JSON with a name and an age.", seed=1,
                          json_schema=json.dumps(schema)).json()
    assert body["status"] == "succeeded" and body["metrics"]["truncated"] is False
    jsonschema.validate(json.loads("".join(body["output"])), schema)
    body = server.predict(prompt="Hi", json_schema='{"type": "array", "uniqueItems": true}').json()
    assert body["status"] == "failed" and 'json_schema: cannot be compiled: Unimplemented keys: ["uniqueItems"]' in body["error"]
    assert body["metrics"]["input_token_count"] == 0
    assert server.wait_ready(timeout=30) == "READY"
