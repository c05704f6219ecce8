"""The package's own engine: its forward against transformers, batching that cannot be seen in any
request's tokens, the block pool's accounting, and the batched sampler's edge cases."""

import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import package_log, reference_engine, run, wait_for
from llama_pkg import cdiv
from llama_pkg.backends.hf import TransformersBackend
from llama_pkg.engine.block_manager import BlockPool
from llama_pkg.engine.llm_engine import LLMEngine
from llama_pkg.model import sampler
from llama_pkg.params import SamplingParams
from llama_pkg.pipeline import Pipeline


def reference_and_engine(folder, gptq=False):
    return TransformersBackend(folder, 4096, gptq=gptq), reference_engine(folder, 4096, gptq=gptq)


@pytest.fixture(scope="module")
def gptq_act_order_model(tmp_path_factory):
    import model_builders

    return model_builders.build_gptq(tmp_path_factory.mktemp("gq") / "tiny-gptq", group_size=32, act_order=True)


PROMPTS = [[1] + list(range(300, 337)), [1, 450, 4996], [1] + list(range(900, 1000, 3)), [1] + list(range(5000, 5070))]


def assert_close(got, want, scale_fraction=1e-4):
    err = (got - want).abs().max().item()
    assert err <= scale_fraction * want.abs().max().item() + 1e-5, err


@pytest.mark.parametrize("kind", ["float", "gptq act-order", "demo"])
def test_forward_matches_transformers_prefill_ragged_batch_and_decode(kind, test_model, gptq_act_order_model):
    from conftest import ROOT

    folder = {"float": test_model, "gptq act-order": gptq_act_order_model,
              "demo": ROOT / "weights" / "smollm2-135m-instruct"}[kind]
    ref, engine = reference_and_engine(folder, gptq=kind.startswith("gptq"))
    # every position of sequences of different lengths prefilled side by side in one flat batch
    for got, ids in zip(engine.call(lambda: engine.runner.prefill_logits(PROMPTS)), PROMPTS):
        assert_close(got, ref.logits(ids))
    # the decode path: the prompt, then one token per step through the engine's paged cache
    ids = PROMPTS[0]
    greedy = list(engine.generate(ids, 12, SamplingParams(temperature=0, repetition_penalty=1.0, min_new_tokens=12), frozenset()))
    want = ref.step_logits(ids, greedy[:-1])
    assert [int(x) for x in want.argmax(-1)] == greedy
    assert greedy == list(ref.generate(ids, 12, SamplingParams(temperature=0, repetition_penalty=1.0, min_new_tokens=12), frozenset()))
    engine_steps = engine.call(lambda: decode_logits(engine, ids, greedy[:-1]))
    assert_close(engine_steps, want)


@torch.inference_mode()
def decode_logits(engine, prompt, next_ids):
    """Last-position logits after the prompt and after each of next_ids fed one at a time, through the
    model's layers and `attend` over a scratch paged cache whose blocks are deliberately out of order."""
    from llama_pkg.model.attention import attend
    from llama_pkg.model.llama import KVCache

    model, bs = engine.model, 16
    blocks = cdiv(len(prompt) + len(next_ids), bs)
    cache = KVCache(model.config, blocks + 3, bs, model.device, model.dtype)
    table = torch.tensor(list(range(blocks + 2, 2, -1))[:blocks])  # reversed, not starting at 0
    slots = (table[:, None] * bs + torch.arange(bs)).reshape(-1)

    def last_logits(ids, first):
        end = first + len(ids)

        def attention(q, keys, values):
            return attend(q, keys, values, slots, end, len(ids) > 1, bs)

        hidden = model.layers_forward(torch.tensor(ids), torch.arange(first, end), slots[first:end], cache, attention)
        return model.lm_head(hidden[-1:])[0]

    out = [last_logits(prompt, 0)]
    out += [last_logits([token], len(prompt) + i) for i, token in enumerate(next_ids)]
    return torch.stack(out)


@pytest.fixture(scope="module")
def engine8(test_model, monkeypatch_module):
    monkeypatch_module.setenv("LLAMA_PKG_MAX_BATCH", "8")
    monkeypatch_module.setenv("LLAMA_PKG_PREFILL_CHUNK", "32")
    return Pipeline.load(str(test_model))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


EIGHT = [  # different seeds, settings, prompt lengths and stop sequences
    dict(prompt="Tell me about llamas", max_new_tokens=40, seed=1),
    dict(prompt="Hi", max_new_tokens=25, seed=2, temperature=0),
    dict(prompt="A much longer prompt " * 12, max_new_tokens=30, seed=3, top_k=20, temperature=1.3),
    dict(prompt="Stop early", max_new_tokens=60, seed=4, stop_sequences="e,a"),
    dict(prompt="Penalties", max_new_tokens=35, seed=5, repetition_penalty=1.5, presence_penalty=0.5,
         frequency_penalty=0.3),
    dict(prompt="No system", system_prompt="", max_new_tokens=20, seed=6, top_p=0.5),
    dict(prompt="[INST] a [/INST] b [INST] c [/INST]", max_new_tokens=45, seed=7, min_new_tokens=45),
    dict(prompt="Template", prompt_template="Q: {prompt}\nA:", max_new_tokens=15, seed=8, temperature=0.2),
]


def test_batching_is_invisible(engine8):
    """Each of eight requests, started at staggered times while the others run, gives exactly the text
    and counts it gives alone."""
    alone = [run(engine8, **inputs) for inputs in EIGHT]
    together = [None] * len(EIGHT)

    def client(k):
        time.sleep(0.01 * k)
        together[k] = run(engine8, **EIGHT[k])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(EIGHT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert engine8.backend.stats()["max_running"] >= 4  # they really shared steps
    for k, ((text, metrics), (text2, metrics2)) in enumerate(zip(alone, together)):
        assert text == text2, k
        for name in ("input_token_count", "output_token_count"):
            assert metrics[name] == metrics2[name], (k, name)
    assert engine8.backend.call(engine8.backend.pool.all_free)


def test_prefix_reuse_gives_the_same_tokens(engine8):
    """The default system prompt's blocks computed by one request are reused by the next (not
    recomputed), and the tokens are those of a pool that never saw the prefix."""
    backend = engine8.backend
    first = run(engine8, prompt="First question about llamas", max_new_tokens=10, seed=1)
    before = backend.stats()["prefix_tokens_reused"]
    second = run(engine8, prompt="Second question", max_new_tokens=10, seed=1)
    assert backend.stats()["prefix_tokens_reused"] - before >= 16  # at least a block of the shared prefix
    fresh = Pipeline(LLMEngine(engine8.info.folder, 4096), engine8.tokenizer, engine8.info)
    again = run(fresh, prompt="Second question", max_new_tokens=10, seed=1)
    assert again[0] == second[0] and again[0] != first[0]
    assert again[1]["output_token_count"] == second[1]["output_token_count"]


def test_cancel_and_failure_free_every_block_and_a_burst_waits(engine8, monkeypatch):
    backend = engine8.backend
    ids = [1] + list(range(400, 460))
    # a cancelled generation (closed by its consumer) and one cancelled through its event
    it = backend.generate(ids, 200, SamplingParams(seed=1, min_new_tokens=200), frozenset())
    assert len([next(it) for _ in range(5)]) == 5
    it.close()
    cancel = threading.Event()
    it = backend.generate(ids, 200, SamplingParams(seed=2, min_new_tokens=200), frozenset(), cancel)
    next(it)
    cancel.set()
    assert len(list(it)) < 200
    # a step that fails: its requests get the error, the loop goes on
    calls = {"n": 0}
    head = backend.model.lm_head  # every step that samples calls it, whatever runs its layers

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected step failure")
        return head(*args, **kwargs)

    monkeypatch.setattr(backend.model, "lm_head", failing)
    with pytest.raises(RuntimeError, match="injected step failure"):
        list(backend.generate(ids, 50, SamplingParams(seed=3), frozenset()))
    monkeypatch.undo()
    assert len(list(backend.generate(ids, 5, SamplingParams(seed=3, min_new_tokens=5), frozenset()))) == 5
    deadline = time.time() + 10
    while not backend.call(backend.pool.all_free) and time.time() < deadline:
        time.sleep(0.01)
    assert backend.call(backend.pool.all_free)


@pytest.mark.slow  # about 30 s
def test_a_burst_larger_than_the_pool_waits_in_arrival_order(test_model, monkeypatch):
    monkeypatch.setenv("LLAMA_PKG_MAX_BATCH", "8")
    monkeypatch.setenv("LLAMA_PKG_KV_CACHE_MB", "1")  # raised to one full context: 4096 + 16 positions
    backend = LLMEngine(test_model, 4096)
    assert backend.pool.blocks == 4096 // 16 + 1
    results, order = {}, []

    def client(k):
        tokens = list(backend.generate([1] + list(range(600 + k, 700 + k)), 1900, SamplingParams(seed=k, min_new_tokens=1900),
                                       frozenset()))
        order.append(k)
        results[k] = tokens

    threads = []
    for k in range(4):  # each holds 2000 positions: two fit the pool at once
        threads.append(threading.Thread(target=client, args=(k,)))
        threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join(300)
    assert all(len(results[k]) == 1900 for k in range(4))
    assert backend.stats()["max_running"] == 2
    assert order[:2] == [0, 1] or sorted(order[:2]) == [0, 1]
    assert backend.call(backend.pool.all_free)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's RSS from /proc (Linux)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_cpu_kv_pool_takes_memory_as_positions_are_written(dtype):
    """The CPU pool is zeros whose pages the system commits when first written: allocating a 512 MiB pool (in
    tensors of 4 MiB) leaves the process's RSS nearly where it was; writing a quarter of it adds about that
    quarter."""
    from llama_pkg.model.llama import Config, KVCache

    def rss():
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) << 10

    config = Config(vocab_size=8, hidden_size=512, intermediate_size=8, layers=64, heads=8, kv_heads=8, head_dim=64,
                    rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=True, context_length=16)
    blocks = (512 << 20) // (KVCache.bytes_per_token(config, dtype) * 16)
    before = rss()
    cache = KVCache(config, blocks, 16, "cpu", dtype)
    assert cache.keys[0].dtype == dtype and sum(t.nbytes for t in cache.keys + cache.values) >= 500 << 20
    allocated = rss()
    assert allocated - before < 32 << 20
    assert not cache.keys[0][::997].any() and not cache.values[-1][-5:].any()  # zeros, read without committing
    tensors = cache.keys + cache.values
    for t in tensors[:len(tensors) // 4]:  # whole tensors: the same count with 4 KiB or 2 MiB (huge) pages
        t.fill_(1)
    assert 100 << 20 < rss() - allocated < 160 << 20


def test_block_pool_reserves_at_admission_and_shares_prefix_blocks():
    from llama_pkg.engine.block_manager import block_hashes

    pool = BlockPool(blocks=10, block_size=4)
    a = list(range(1, 14))  # 13 ids: 3 full blocks
    assert pool.admit(block_hashes(a, 4, 3), 13 + 7) == []  # 5 blocks reserved
    assert pool.available() == 5
    table = [pool.take() for _ in range(5)]
    for block, h in zip(table, block_hashes(a, 4, 3)):
        pool.register(block, h)
    c = a[:9] + [99, 98, 97, 96]
    assert pool.admit(block_hashes(c, 4, 3), 13 + 20) is None  # 9 blocks: more than the 5 left
    b = a[:9] + [99]
    b_prefix = pool.admit(block_hashes(b, 4, 2), 10 + 6)  # 2 shared blocks, 2 new
    assert b_prefix == table[:2] and pool.available() == 3
    pool.release(table, 0)
    # 5 never taken + a's 2 unregistered blocks free, a's third registered block idle, b's 2 reserved
    assert pool.available() == 7 + 1 - 2
    pool.release(b_prefix, 2)
    assert pool.all_free()


def test_sampler_edge_values_inside_the_bounds():
    """A temperature too small to divide by behaves as greedy; a top_p below the top token's
    probability keeps it; nothing becomes NaN."""
    logits = torch.randn(4, 1000) * 5
    counts = torch.zeros(4, 1000)
    rows = [SamplingParams(temperature=1e-40, seed=1), SamplingParams(temperature=5e-324, seed=2),
            SamplingParams(top_p=1e-300, seed=3), SamplingParams(temperature=5.0, top_k=1, seed=4)]
    ids = sampler.sample(logits, counts, sampler.unpack(sampler.packed(rows)), torch.zeros(4, dtype=torch.long),
                         torch.zeros(4, 1000, dtype=torch.bool))
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_sampler_rows_do_not_see_each_other():
    torch.manual_seed(0)
    logits, counts = torch.randn(6, 500), torch.randint(0, 3, (6, 500)).float()
    rows = [SamplingParams(seed=k, temperature=0.3 * k, top_k=k * 7, top_p=1 - 0.1 * k, repetition_penalty=1 + 0.1 * k)
            for k in range(6)]
    table = sampler.packed(rows)
    steps, stops = torch.arange(6), torch.zeros(6, 500, dtype=torch.bool)
    together = sampler.sample(logits, counts, sampler.unpack(table), steps, stops)
    for k in range(6):
        i = torch.tensor([k])
        alone = sampler.sample(logits[i], counts[i], sampler.unpack(table[i]), steps[i], stops[i])
        assert alone.item() == together[k].item()
    # the draw follows the distribution: a two-token split near 30/70 over many seeds
    two = torch.full((1, 500), -float("inf"))
    two[0, 7], two[0, 9] = 0.0, torch.log(torch.tensor(7 / 3))
    draws = [sampler.sample(two, torch.zeros(1, 500), sampler.unpack(sampler.packed(
        [SamplingParams(seed=s, temperature=1, top_p=1, repetition_penalty=1)])), torch.zeros(1, dtype=torch.long),
        torch.zeros(1, 500, dtype=torch.bool)).item() for s in range(2000)]
    assert set(draws) == {7, 9} and 0.26 < draws.count(7) / 2000 < 0.34


def test_a_request_that_fits_passes_one_that_does_not_but_only_so_often(test_model, monkeypatch):
    """With the pool mostly held, a large request that does not fit waits, logging why and its place;
    small ones that fit start before it, OVERTAKES of them, then the rest queue behind it; when room
    frees, it starts and everyone finishes."""
    from llama_pkg.engine.scheduler import OVERTAKES

    monkeypatch.setenv("LLAMA_PKG_MAX_BATCH", "16")
    monkeypatch.setenv("LLAMA_PKG_KV_CACHE_MB", "1")  # raised to one full context: 257 blocks of 16
    engine = LLMEngine(test_model, 4096)
    holder_cancel = threading.Event()  # the request holding the pool: 3,101 positions, 194 blocks, 63 left
    with package_log() as lines:
        try:
            holder = engine.generate([1] + list(range(500, 600)), 3000, SamplingParams(seed=1, min_new_tokens=3000),
                                     frozenset(), holder_cancel)
            next(holder)
            done = {}

            def client(name, prompt, n):
                done[name] = list(engine.generate(prompt, n, SamplingParams(seed=len(done), min_new_tokens=n), frozenset()))

            large = threading.Thread(target=client, args=("large", [1] + list(range(700, 1700)), 200))  # 1,201 positions: 76 blocks
            large.start()
            assert wait_for(lambda: engine.call(lambda: len(engine.scheduler.waiting)) == 1, timeout=30)
            small = [threading.Thread(target=client, args=(k, [1, 5 + k, 6, 7], 10)) for k in range(2 * OVERTAKES)]
            for t in small:
                t.start()
            assert wait_for(lambda: sum(k in done for k in range(2 * OVERTAKES)) == OVERTAKES, timeout=30), done.keys()
            notes = engine.call(lambda: [s.queued for s in engine.scheduler.waiting])
            assert len(notes) == 1 + OVERTAKES and "large" not in done
            assert notes[0][0] == 1 and "KV cache has 63 free blocks" in notes[0][1] and "need 76" in notes[0][1]
            assert all(place == i + 2 and "older request" in why for i, (place, why) in enumerate(notes[1:]))
            assert wait_for(lambda: any("waiting to start, place 1 in the queue: the KV cache" in line for line in lines),
                            timeout=30)
            holder_cancel.set()  # room frees: the large one starts, then the rest
            large.join(60)
            for t in small:
                t.join(60)
            assert len(done["large"]) == 200 and all(len(done[k]) == 10 for k in range(2 * OVERTAKES))
        finally:
            holder_cancel.set()
    assert engine.call(engine.pool.all_free)

