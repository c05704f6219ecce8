"""A request's tokens and logits do not depend on its batch (docs/batch-invariance.md), on any host: every
product the CPU step runs gives each row the same bits at 1 to (prefill chunk + batch) rows with 1, 2
and 4 threads, and a prompt row the same bits in any chunk beside any rows; the engine gives a request
the same logits bit for bit at every step alone, beside 7 and 15 partners whose prompt chunks share its
steps, with a cold and a warm prefix cache, and twice in one batch, on the tiny model and the demo model."""

import threading
from collections import defaultdict

import pytest
import torch

from conftest import ROOT
from llama_pkg.model import cpu_kernels, cpu_linear, gptq
from llama_pkg.model.sampler import NAMES
from llama_pkg.params import SamplingParams

ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 64, 100, 128, 129, 136)  # chunk 128 + batch 8
DEMO = ROOT / "weights" / "smollm2-135m-instruct"


def linears(k, n, seed=0):
    """Every kind of Linear the CPU step runs, for input size k and output size n: ATen's kernels and the
    package's (cpu_kernels.py, which must build here)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    own = cpu_kernels.load("on")
    out = {"int8": cpu_linear.Int8Linear(w), "int4": cpu_linear.CpuLinears({"p.weight": w}, "int4")(["p"]),
           "int8 own": cpu_linear.Int8Linear(w, kernels=own),
           "int4 own": cpu_linear.CpuLinears({"p.weight": w}, "int4", kernels=own)(["p"])}
    for act_order in (False, True):
        qweight, qzeros, scales, g_idx = gptq.quantize(w, 32, act_order, g)
        tensors = {"p.qweight": qweight, "p.qzeros": qzeros, "p.scales": scales, "p.g_idx": g_idx}
        out[f"gptq act_order={act_order}"] = cpu_linear.CpuLinears(tensors)(["p"])
        out[f"gptq act_order={act_order} own"] = cpu_linear.CpuLinears(tensors, kernels=own)(["p"])
    assert all(out[name].kernels is own for name in out if name.endswith("own"))
    return out


@pytest.fixture(params=[1, 2, 4])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("k,n", [(64, 192), (128, 64), (576, 3072), (1536, 576), (576, 49152)])
def test_every_row_of_every_product_is_the_same_at_any_row_count(k, n, threads):
    """The tiny model's and the demo's shapes (its fused gate_up and lm head included)."""
    x = torch.randn(max(ROWS), k, generator=torch.Generator().manual_seed(1))
    for name, linear in linears(k, n).items():
        alone = torch.cat([linear(x[i:i + 1]) for i in range(max(ROWS))])
        for m in ROWS:
            got = linear(x[:m])
            differing = [i for i in range(m) if not torch.equal(got[i], alone[i])]
            assert not differing, f"{name}: rows {differing[:5]} of a {m}-row product differ from the row alone"


@pytest.mark.parametrize("kind", ["int4", "int8", "int4 own", "int8 own"])
def test_a_prompt_row_is_the_same_in_any_chunk_beside_any_rows(kind, threads):
    """Prompt rows through the dense products (cpu_linear.PromptTiles): a position's row has the same bits
    whether its chunk starts at a tile's start, in its middle or after a cached prefix, with decode rows before
    it and another sequence's chunk after it; the decode rows get the integer kernel's bits; and the dense
    product computes what the integer kernel does, within bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    own = cpu_kernels.load("on") if kind.endswith("own") else None
    linear = cpu_linear.CpuLinears({"p.weight": torch.randn(960, 576, generator=g) * 0.05}, kind.split()[0], "dense",
                                   own)(["p"])
    assert linear.dense is not None and getattr(linear, "kernels", None) is own
    x = torch.randn(300, 576, generator=g)  # one sequence's positions 0..299
    alone = linear(x, cpu_linear.PromptTiles(0, [(0, 300)]))
    for start, count, decode, other in [(0, 128, 0, 0), (48, 128, 3, 0), (100, 200, 8, 37), (128, 1, 1, 0),
                                        (250, 50, 0, 129), (16, 112, 5, 16)]:
        rows = torch.cat([torch.randn(decode, 576, generator=g), x[start:start + count],
                          torch.randn(other, 576, generator=g)])
        got = linear(rows, cpu_linear.PromptTiles(decode, [(start, count)] + ([(7, other)] if other else [])))
        assert torch.equal(got[decode:decode + count], alone[start:start + count]), (start, count, decode, other)
        for i in range(decode):
            assert torch.equal(got[i], linear(rows[i:i + 1])[0])
    kernel = linear(x)
    assert torch.allclose(alone, kernel, rtol=0.02, atol=0.02 * kernel.abs().max().item())


def test_the_gptq_repack_equals_the_dequantized_product():
    """The 4-bit layout computes what GPTQ's dequantized weight does, within bf16 rounding (activations,
    scales and the kernel's bf16 output), with and without act-order, for fused Linears too."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 256, generator=g)
    for act_order in (False, True):
        tensors, ws = gptq_linears(g, act_order)
        got = cpu_linear.CpuLinears(tensors)(list("abc"))(x)
        want = x.to(torch.bfloat16).float() @ torch.cat(ws).t()
        err = (got - want).abs().max().item()
        assert err <= 2 ** -7 * want.abs().max().item(), (act_order, err)
        assert isinstance(cpu_linear.CpuLinears(tensors)(list("abc")),
                          cpu_linear.Concat if act_order else cpu_linear.Int4Linear)  # g_idx differ: apart


def blockwise_int8(x):
    """x [M, K] as the package's kernel reads it: per block of 32, round(x * 127 / amax) * amax / 127."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True).float().double()
    scale = (amax.float() / 127).double()
    inv = torch.where(amax > 0, (127 / amax.float()).double(), torch.zeros_like(amax))
    q = torch.round((blocks.float() * inv.float()).double())  # float32 product, rounded half to even
    return (q * scale).reshape(x.shape)


def test_the_package_kernel_computes_the_dequantized_product_of_its_int8_activations():
    """cpu_kernels.py on a float checkpoint's 4-bit groups and on GPTQ ones (act-order, fused): the float64
    product of its weights (scales and offsets in fp16, as it keeps them; GPTQ's repack itself is checked against
    gptq.dequantize above) and the block-quantized activations, to float32 rounding: any misplaced nibble or
    scale is far off. And the true float product of GPTQ's weights within the activations' 8 bits."""
    own = cpu_kernels.load("on")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 256, generator=g)

    def seen(q, scales, zeros, group):  # W as the kernel holds it
        d, m = scales.half().double(), (zeros.float() - 8 * scales.float()).half().double()
        return q.double() * d.repeat_interleave(group, 0).t() + m.repeat_interleave(group, 0).t()

    for act_order in (False, True):
        tensors, ws = gptq_linears(g, act_order)
        linear = cpu_linear.CpuLinears(tensors, kernels=own)(list("abc"))
        parts = linear.parts if act_order else [linear]
        assert all(p.kernels is own for p in parts)
        got = linear(x)
        assert got.dtype == torch.float32
        if act_order:  # each part reads x in its own order (blocks of the permuted columns)
            want = torch.cat([blockwise_int8(x[:, p.perm]) @ seen(*cpu_linear.gptq_parts(tensors, n)[:4]).t()
                              for p, n in zip(parts, "abc")], dim=1)
        else:
            q, s, z, group, _ = zip(*(cpu_linear.gptq_parts(tensors, n) for n in "abc"))
            want = blockwise_int8(x) @ seen(torch.cat(q), torch.cat(s, 1), torch.cat(z, 1), group[0]).t()
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item(), act_order
        exact = x.double() @ torch.cat(ws).double().t()
        assert (got.double() - exact).abs().max().item() <= 0.03 * exact.abs().max().item(), act_order
    w = torch.randn(96, 256, generator=g) * 0.05
    got = cpu_linear.CpuLinears({"p.weight": w}, "int4", "integer", own)(["p"])(x)
    want = blockwise_int8(x) @ seen(*cpu_linear.quantize_int4(w), cpu_linear.GROUP).t()
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # 8 bits (the lm head, LLAMA_PKG_CPU_WEIGHTS=int8): W = q * scale per output channel
    for linear in (cpu_linear.head(w, own), cpu_linear.CpuLinears({"p.weight": w}, "int8", "integer", own)(["p"])):
        assert linear.kernels is own
        reference = cpu_linear.Int8Linear(w)  # ATen's: the same q and scales
        want = blockwise_int8(x) @ (reference.q.double() * reference.scales.double()[:, None]).t()
        got = linear(x)
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_both_builds_of_the_package_kernel_give_the_same_bits():
    """The AVX2 build and the AVX-512 VNNI one sum the same integers in the same float order: on a CPU with
    VNNI both run and must agree bit for bit (on one without, only the AVX2 build can run: checked alone)."""
    own = cpu_kernels.load("on")
    builds = [cpu_kernels.Kernels(own.lib._name, isa) for isa in ("avx2", "vnni")[:1 + own.lib.cpu_kernels_has_vnni()]]
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3072, 576, generator=g) * 0.05
    x = torch.randn(37, 576, generator=g)
    for kind in ("int4", "int8"):
        results = [cpu_linear.CpuLinears({"p.weight": w}, kind, "integer", k)(["p"])(x) for k in builds]
        assert all(torch.equal(r, results[0]) for r in results), kind
        assert results[0].abs().max() > 0


def gptq_linears(g, act_order):
    """Three GPTQ Linears of 96 x 256, groups of 64 -> (their tensors, their dequantized weights)."""
    tensors, ws = {}, []
    for name in "abc":
        w = torch.randn(96, 256, generator=g) * 0.05
        qweight, qzeros, scales, g_idx = gptq.quantize(w, 64, act_order, g)
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales,
                        f"{name}.g_idx": g_idx})
        ws.append(gptq.dequantize(qweight, qzeros, scales, g_idx))
    return tensors, ws


def test_a_decode_row_attends_alike_alone_and_beside_any_sequences(threads):
    """cpu DecodeRows: each sequence's output has the same bits alone and beside sequences of its padded length
    and of others, whether its keys are read in place (slots in order, alone) or gathered (shuffled blocks,
    or beside others), with large values in the cache past its length; and it is softmax attention in float32
    (the float32 reference over the bf16 cache, within float32 rounding: float32 queries keep their bits)."""
    from llama_pkg.model.attention import PAD, DecodeRows, decode_attention_reference

    g = torch.Generator().manual_seed(4)
    bs, kv_heads, heads, dim = 16, 3, 9, 64
    keys = (torch.randn(4096, kv_heads, dim, generator=g) * 100).to(torch.bfloat16)  # past lengths: noise
    values = (torch.randn(4096, kv_heads, dim, generator=g) * 100).to(torch.bfloat16)
    lengths = [1, 17, PAD, PAD + 1, 2 * PAD - 3, 2 * PAD - 40, 5, 300, 299]
    shuffled = (128 + torch.randperm(128, generator=g)).tolist()  # blocks 128..255 out of order
    spans, start = [], 0
    for i, n in enumerate(lengths):
        count = -(-n // bs)
        if i % 2:  # in order: read in place when alone
            table, start = list(range(start, start + count)), start + count + 2
        else:
            table, shuffled = shuffled[:count], shuffled[count:]
        slots = (torch.tensor(table)[:, None] * bs + torch.arange(bs)).reshape(-1)
        keys[slots[:n]] = torch.randn(n, kv_heads, dim, generator=g).to(torch.bfloat16)
        values[slots[:n]] = torch.randn(n, kv_heads, dim, generator=g).to(torch.bfloat16)
        spans.append(slots)
    q = torch.randn(len(lengths), heads, dim, generator=g)
    alone = []
    for i, (slots, n) in enumerate(zip(spans, lengths)):
        out = torch.zeros(1, heads, dim)
        DecodeRows([(0, slots, n)], keys.shape[0])(q[i:i + 1], keys, values, out)
        alone.append(out[0])
        tables = ((slots[::bs] // bs)[None]).to(torch.int32)
        want = decode_attention_reference(q[i:i + 1], keys, values, tables, torch.tensor([n]), bs)
        assert torch.allclose(out[0], want[0], atol=1e-4, rtol=1e-5), n
    for order in (list(range(len(lengths))), list(reversed(range(len(lengths)))), [3, 4, 5], [7, 1], [2, 8, 6, 0]):
        out = torch.zeros(len(order), heads, dim)
        DecodeRows([(r, spans[i], lengths[i]) for r, i in enumerate(order)], keys.shape[0])(
            q[order], keys, values, out)
        for r, i in enumerate(order):
            assert torch.equal(out[r], alone[i]), (order, lengths[i])


# -- the engine ----------------------------------------------------------------------------------------

SEED = NAMES.index("seed")


def record_logits(engine):
    """(seed, step) -> the logits of each draw at that step of a request with that seed, as the sampler got
    them (wraps this engine's draw)."""
    seen = defaultdict(list)
    sampler = engine.runner.sampler
    draw = sampler.draw

    def recording(logits, rows, steps, masks=None):
        for seed, step, row in zip(sampler.settings[rows, SEED].long().tolist(), steps.tolist(), logits):
            seen[seed, step].append(row.clone())
        return draw(logits, rows, steps, masks)

    sampler.draw = recording
    return seen


def generate(engine, prompt, params, max_new):
    return list(engine.generate(prompt, max_new, params, frozenset()))


def with_partners(engine, target, partners, started=2):
    """target = (prompt, params, max_new) -> its ids, generated while `partners` (same form) arrive one by one
    once it has drawn `started` ids, so their prompt chunks share its decode steps."""
    out, threads = {}, []
    ids = []
    for i, token in enumerate(engine.generate(target[0], target[2], target[1], frozenset())):
        ids.append(token)
        if i + 1 == started:
            for k, p in enumerate(partners):
                t = threading.Thread(target=lambda k=k, p=p: out.__setitem__(k, generate(engine, *p)))
                t.start()
                threads.append(t)
    for t in threads:
        t.join(300)
    assert len(out) == len(partners)
    return ids


def partner_requests(count, vocab, offset=0):
    """Prompts of 60 to 260 ids, so most take two or three chunks, each with its own seed and settings."""
    g = torch.Generator().manual_seed(100 + offset)
    out = []
    for i in range(count):
        length = 60 + int(torch.randint(0, 200, (1,), generator=g))
        prompt = [1] + torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append((prompt, SamplingParams(temperature=0.8 + 0.1 * i, seed=1000 + offset + i), 6))
    return out


@pytest.fixture(scope="module", params=["tiny", pytest.param("demo", marks=pytest.mark.slow)])
def engine16(request, test_model):
    from llama_pkg.engine.llm_engine import LLMEngine

    with pytest.MonkeyPatch.context() as m:
        m.setenv("LLAMA_PKG_MAX_BATCH", "16")
        m.setenv("LLAMA_PKG_PREFILL_CHUNK", "64")  # more chunks a prompt: more steps mixing chunks and decodes
        engine = LLMEngine(str(test_model if request.param == "tiny" else DEMO), 4096)
    yield engine
    engine.close()


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_a_request_gets_the_same_logits_alone_and_in_any_batch(engine16, temperature):
    engine = engine16
    vocab = engine.model.config.vocab_size
    seed = int(temperature * 10)
    shared = [1] + list(range(300, 340))  # a prefix of 2 blocks and more, as a system prompt is
    target = (shared + [int(t) for t in torch.randint(3, vocab, (9,), generator=torch.Generator().manual_seed(5))],
              SamplingParams(temperature=temperature, top_p=1.0 if temperature > 1 else 0.95, seed=seed), 24)
    seen = record_logits(engine)
    runs = {}
    runs["alone, cold cache"] = generate(engine, *target[:2], target[2])
    runs["alone, warm cache"] = generate(engine, *target[:2], target[2])
    for partners in (7, 15):
        runs[f"beside {partners}"] = with_partners(engine, target, partner_requests(partners, vocab, partners))
    # the warm prefix of the shared blocks, reused by a partner with the same start
    runs["beside 7, prefix shared"] = with_partners(
        engine, target, [(shared + p[0][1:], p[1], p[2]) for p in partner_requests(7, vocab, 1)])
    twice = {}
    threads = [threading.Thread(target=lambda i=i: twice.__setitem__(i, generate(engine, *target[:2], target[2])))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    runs["twice in one batch, first"], runs["twice in one batch, second"] = twice[0], twice[1]
    reference = runs["alone, cold cache"]
    assert len(reference) == 24
    for name, ids in runs.items():
        assert ids == reference, name
    for step in range(24):
        rows = seen[seed, step]
        assert len(rows) == len(runs)  # one logits row a draw, every run's
        assert all(torch.equal(row, rows[0]) for row in rows), step
    assert engine.scheduler.stats["max_running"] >= 8 and engine.scheduler.stats["prefix_tokens_reused"] > 0
    assert engine.runner.stats["kernel_steps"] > 0  # decode rows went through the kernel library's decode step


# -- quality -------------------------------------------------------------------------------------------

def mean_log_likelihood(engine, ids):
    logits = engine.logits(ids)[:-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).mean().item()


def decode_step_log_likelihood(engine, ids):
    """The same mean log-likelihood, but each position fed alone through the engine's decode step
    (cpu_kernels.DecodeStep: one new position per step over its own cache), as decode rows are."""
    from llama_pkg.model.cpu_kernels import DecodeStep
    from llama_pkg.model.llama import KVCache

    model, bs = engine.model, 16
    blocks = len(ids) // bs + 1
    step = DecodeStep(engine.runner.step.kernels, model, KVCache(model.config, blocks, bs, "cpu", torch.bfloat16))
    tables = torch.arange(blocks, dtype=torch.int32)[None]
    with torch.inference_mode():
        logits = torch.cat([model.lm_head(step(torch.tensor([i]), torch.tensor([p]), torch.tensor([p]), tables,
                                               torch.tensor([0]), bs)) for p, i in enumerate(ids[:-1])])
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).mean().item()


@pytest.mark.slow
def test_the_integer_path_keeps_the_demo_models_likelihood_of_a_fixed_text():
    """The demo model's mean log-likelihood of tests/fixtures/quality.txt (about 420 tokens) on either integer
    setting (int4, the default, and int8) is within 1 % of the float32 path's: prompt rows through the dense
    products (the default), through the integer kernels (LLAMA_PKG_CPU_PROMPT=integer: the package's 4-bit
    kernel for int4), and each position through the decode step."""
    from llama_pkg.engine.llm_engine import LLMEngine
    from llama_pkg.tokenizer import Tokenizer

    ids = Tokenizer(DEMO).encode_text((ROOT / "tests" / "fixtures" / "quality.txt").read_text())
    assert len(ids) > 400
    scores = {}
    for kind, prompt in (("int4", "dense"), ("int4", "integer"), ("int8", "dense"), ("float32", "dense")):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("LLAMA_PKG_CPU_WEIGHTS", kind)
            m.setenv("LLAMA_PKG_CPU_PROMPT", prompt)
            engine = LLMEngine(str(DEMO), 4096)
        scores[kind, prompt] = mean_log_likelihood(engine, ids)
        if kind == "int4" and prompt == "dense":
            assert engine.runner.step is not None
            scores[kind, "decode step"] = decode_step_log_likelihood(engine, ids)
        engine.close()
    reference = scores["float32", "dense"]
    for key, score in scores.items():
        assert abs(score - reference) <= 0.01 * abs(reference), (key, scores)
