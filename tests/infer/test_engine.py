"""Engine: preallocated latent cache, batching, continuous batching, sampling, MTP speculation."""

import pytest
import torch

from moeforge.config import get_preset
from moeforge.infer import speculative
from moeforge.infer.cache import LatentCache
from moeforge.infer.engine import Engine, SamplingParams
from moeforge.infer.sample import generate
from moeforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # larger init than training's 0.02 so greedy choices are not near-ties
    cfg = get_preset("tiny").replace(vocab_size=300, hidden_size=64, intermediate_size=96, initializer_range=0.15,
                                     max_position_embeddings=128, eos_token_id=None, **{
                                         "moe.moe_intermediate_size": 32, "attention.q_lora_rank": 32,
                                         "attention.kv_lora_rank": 24, "mtp.num_layers": 1})
    return Transformer(cfg).eval()


PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [100], [7, 7, 250, 31], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_cache_layout_and_bytes(model):
    a = model.cfg.attention
    c = LatentCache(model.cfg.num_layers, 3, 50, a.kv_lora_rank, a.qk_rope_head_dim)
    assert c.latent.shape == (4, 3, 50, 24) and c.k_rope.shape == (4, 3, 50, 16)
    assert c.bytes_per_token == 4 * (24 + 16) * 4


@torch.no_grad()
def test_batched_cached_decode_equals_full_recompute(model):
    """Padded prefill of different-length prompts, then absorbed decode: logits == full forward."""
    a = model.cfg.attention
    cache = LatentCache(model.cfg.num_layers, 4, 40, a.kv_lora_rank, a.qk_rope_head_dim)
    seqs = [list(p) for p in PROMPTS]
    lens = [len(s) for s in seqs]
    T = max(lens)
    ids = torch.zeros(4, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    out = model(ids, start_pos=cache.positions(0, 4), cache=cache.step(0, 4, T), mtp=False)
    cache.commit(0, lens)
    step_logits = [[out.logits[i, n - 1]] for i, n in enumerate(lens)]
    for _ in range(5):
        nxt = [int(step_logits[i][-1].argmax()) for i in range(4)]
        for s, t in zip(seqs, nxt):
            s.append(t)
        o = model(torch.tensor(nxt).view(4, 1), start_pos=cache.positions(0, 4), cache=cache.step(0, 4, 1),
                  absorbed=True, mtp=False)
        cache.commit(0, [1] * 4)
        for i in range(4):
            step_logits[i].append(o.logits[i, 0])
    for i, s in enumerate(seqs):
        full = model(torch.tensor([s]), mtp=False).logits[0]
        got = torch.stack(step_logits[i])
        torch.testing.assert_close(got, full[lens[i] - 1 :], atol=1e-4, rtol=1e-4)


def test_batched_equals_one_by_one_and_continuous_batching(model):
    alone = [Engine(model, max_batch=1).generate([p], GREEDY)[0].output for p in PROMPTS]
    together = [r.output for r in Engine(model, max_batch=4).generate(PROMPTS, GREEDY)]
    assert together == alone
    # two slots, four requests with different lengths: requests join and leave between steps
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (3, 12, 5, 12)]
    eng = Engine(model, max_batch=2)
    reqs = [eng.submit(p, sp) for p, sp in zip(PROMPTS, params)]
    sizes = []
    while eng.has_work:
        eng.step()
        sizes.append(len(eng.active))
    assert [r.output for r in reqs] == [a[: sp.max_tokens] for a, sp in zip(alone, params)]
    assert all(r.finish_reason == "length" for r in reqs) and max(sizes) == 2
    assert eng.cache.lengths == [0, 0]  # every slot freed


def test_chunked_prefill_equals_whole_prefill(model):
    """Prompts cached a few tokens per step (also with speculation) give the same tokens; a row that
    finished its prompt waits behind an unfinished one before it."""
    whole = [r.output for r in Engine(model, max_batch=4, prefill_chunk=None).generate(PROMPTS, GREEDY)]
    for batch in (1, 2, 4):
        eng = Engine(model, max_batch=batch, prefill_chunk=3)
        assert [r.output for r in eng.generate(PROMPTS, GREEDY)] == whole
        assert eng.stats.prefill_tokens == sum(map(len, PROMPTS))
    for k in (1, 2):
        spec = Engine(model, max_batch=4, prefill_chunk=3, speculative=True, draft_tokens=k)
        assert [r.output for r in spec.generate(PROMPTS, GREEDY)] == whole
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, prefill_chunk=0)


def test_decoding_continues_while_a_long_prompt_is_prefilled(model):
    long_prompt = [(7 * i) % 290 + 3 for i in range(40)]
    want = Engine(model, max_batch=1).generate([PROMPTS[0], long_prompt, PROMPTS[2]],
                                               SamplingParams(max_tokens=30, temperature=0))
    eng = Engine(model, max_batch=3, prefill_chunk=4)
    a = eng.submit(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0))
    while not a.output:  # its 7-token prompt takes two steps at 4 tokens per step
        eng.step()
    b = eng.submit(long_prompt, SamplingParams(max_tokens=30, temperature=0))
    c = eng.submit(PROMPTS[2], SamplingParams(max_tokens=30, temperature=0))
    while b.prefilled < len(long_prompt):
        before, was_done = len(a.output), a.finished
        eng.step()
        if not was_done:
            assert len(a.output) == before + 1  # one token per step for the running row, never a stall
    # a finished while b was still being prefilled: b's cache moved into a's slot
    assert a.finished and a.output == want[0].output[:6]
    while eng.has_work:
        eng.step()
    assert b.output == want[1].output and c.output == want[2].output
    assert eng.running == 0 and eng.cache.lengths == [0, 0, 0]
    # a request cancelled while waiting behind a prompt being prefilled frees its slot
    d = eng.submit(long_prompt, SamplingParams(max_tokens=5, temperature=0))
    e = eng.submit(PROMPTS[3], SamplingParams(max_tokens=5, temperature=0))
    eng.step()
    eng.cancel(e)
    while eng.has_work:
        eng.step()
    assert d.output == want[1].output[:5] and e.finish_reason == "cancelled" and eng.cache.lengths == [0, 0, 0]


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=s) for s in range(4)]
    alone = [Engine(model, max_batch=1).generate([p], sp)[0].output for p, sp in zip(PROMPTS, params)]
    together = [r.output for r in Engine(model, max_batch=4).generate(PROMPTS, params)]
    assert together == alone
    other_seed = Engine(model).generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.9, seed=99))
    assert other_seed[0].output != alone[0]


def test_generate_wrapper_matches_engine_and_stops_at_eos(model):
    g = torch.Generator().manual_seed(0)
    toks = list(generate(model, torch.tensor([PROMPTS[0]]), 12, g, temperature=0))
    assert toks == Engine(model).generate([PROMPTS[0]], GREEDY)[0].output
    assert list(generate(model, torch.tensor([PROMPTS[0]]), 12, g, temperature=0, eos_token_id=toks[3])) == toks[:3]


def test_cancel_frees_the_slot(model):
    eng = Engine(model, max_batch=1)
    a = eng.submit(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0))
    b = eng.submit(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0))
    eng.step()
    assert eng.active == [a]
    a.cancelled = True
    eng.step()
    assert a.finish_reason == "cancelled" and eng.active == [b]
    while eng.has_work:
        eng.step()
    assert len(b.output) == 6


def test_bad_requests_raise_value_error(model):
    eng = Engine(model)
    with pytest.raises(ValueError, match="exceeds the context"):
        eng.submit([1] * 100, SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.submit([1], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        eng.submit([1], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        eng.submit([1], SamplingParams(stop=["x"]))


def test_stop_strings_and_eos():
    from moeforge.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world, hello there. " * 20], 300)
    torch.manual_seed(1)
    cfg = get_preset("tiny").replace(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                     eos_token_id=None, **{"moe.moe_intermediate_size": 32,
                                                           "attention.q_lora_rank": 32,
                                                           "attention.kv_lora_rank": 24, "mtp.num_layers": 0})
    m = Transformer(cfg).eval()
    prompt = tok.encode("hello").ids
    full = Engine(m, tokenizer=tok).generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    assert full.finish_reason == "length" and full.text == tok.decode(full.output)
    stop = full.text[len(full.text) // 2 :][:2]
    cut = Engine(m, tokenizer=tok).generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    m.cfg.eos_token_id = full.output[4]
    eos = Engine(m).generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    assert eos.finish_reason == "stop" and eos.output == full.output[: full.output.index(full.output[4])]


# ----------------------------------------------------------------- speculation
@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_greedy(model, speculate_with_oracle, k):
    """k drafts per step: the output equals plain greedy decoding, with the MTP's own drafts and with
    oracle drafts that are kept (all k of them, then partly at the end of the plain output)."""
    plain = [r.output for r in Engine(model, max_batch=4).generate(PROMPTS, GREEDY)]
    eng = Engine(model, max_batch=4, speculative=True, draft_tokens=k)
    assert [r.output for r in eng.generate(PROMPTS, GREEDY)] == plain
    speculate_with_oracle(model, PROMPTS, GREEDY, plain, "mtp_draft", lambda i: i % 2 == 0, draft_tokens=k)


def test_draft_tokens_need_speculation(model):
    with pytest.raises(ValueError, match="--speculative"):
        Engine(model, draft_tokens=2)
    with pytest.raises(ValueError, match="draft_tokens must be >= 1"):
        Engine(model, speculative=True, draft_tokens=0)


def test_chained_drafts_follow_the_mtp_module(model):
    """Draft 2 is what the MTP module predicts from its own state after draft 1 (the chain), recomputed
    here without the engine's caches: module over (h_{n-1}, x_n) for all positions -> state m and d_1 at
    the last; module over (m, d_1) at the next position, attending to those positions and itself -> d_2."""
    from moeforge.infer.speculative import mtp_logits
    from moeforge.model.mla import LatentKV

    eng = Engine(model, max_batch=1, speculative=True, draft_tokens=2)
    req = eng.submit(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0))
    for _ in range(3):
        eng.step()
    seq = torch.tensor([req.prompt + req.output])  # cached tokens, then `pending` (output[-1])
    n = seq.shape[1] - 1
    store = [None]

    class Grow:  # an uncached latent store that grows with each call (what the MTP block attends over)
        def extend(self, latent, k_rope):
            store[0] = LatentKV(latent, k_rope) if store[0] is None else store[0].extend(latent, k_rope)
            return store[0]

    with torch.no_grad():
        h = model(seq).hidden
        logits, m = mtp_logits(model, seq[:, 1:], h[:, :n], torch.tensor([0]), Grow(), torch.tensor([n - 1]),
                               absorbed=False)
        d1 = int(logits.argmax(-1))
        logits2, _ = mtp_logits(model, torch.tensor([[d1]]), m.unsqueeze(1), torch.tensor([n]), Grow(),
                                torch.tensor([0]), absorbed=False)
    assert req.drafts == [d1, int(logits2.argmax(-1))]


def test_warm_up_leaves_a_clean_engine(model):
    eng = Engine(model, max_batch=3)
    eng.warm_up()
    assert eng.stats.steps == 0 and eng.stats.generated_tokens == 0
    assert eng.cache.lengths == [0, 0, 0] and not eng.has_work
    assert eng.generate([PROMPTS[0]], GREEDY)[0].output == Engine(model).generate([PROMPTS[0]], GREEDY)[0].output


def test_compiled_decode_equals_eager(model):
    """torch.compile'd decode, verify and draft steps give the eager engine's tokens: a batch of
    different lengths (the masked path) that shrinks to one row, and MTP speculation."""
    plain = [r.output for r in Engine(model, max_batch=4).generate(PROMPTS, GREEDY)]
    assert [r.output for r in Engine(model, max_batch=4, compile=True).generate(PROMPTS, GREEDY)] == plain
    spec = Engine(model, max_batch=4, speculative=True, compile=True)
    assert [r.output for r in spec.generate(PROMPTS, GREEDY)] == plain
    spec = Engine(model, max_batch=4, speculative=True, compile=True, draft_tokens=2)
    assert [r.output for r in spec.generate(PROMPTS, GREEDY)] == plain


def test_rejection_sampling_keeps_the_target_distribution():
    """Two drafts from poor distributions: each kept or resampled token follows the target p at its
    position (the second position measured over the steps that reached it)."""
    from moeforge.infer.engine import Request

    V = 5
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.5]])
    p = logits.softmax(-1)
    q1 = torch.tensor([0.05, 0.05, 0.6, 0.2, 0.1])
    q2 = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.4])
    gen = torch.Generator().manual_seed(0)
    seen, n = torch.zeros(3, V), 8000
    for _ in range(n):
        r = Request([1], SamplingParams(temperature=1.0), generator=gen)
        r.drafts = [int(torch.multinomial(q1, 1, generator=gen)), int(torch.multinomial(q2, 1, generator=gen))]
        r.draft_probs = [q1, q2]
        for i, tok in enumerate(speculative._accept(r, logits)):
            seen[i, tok] += 1
    torch.testing.assert_close(seen[0] / n, p[0], atol=0.025, rtol=0)
    torch.testing.assert_close(seen[1] / seen[1].sum(), p[1], atol=0.03, rtol=0)
    torch.testing.assert_close(seen[2] / seen[2].sum(), p[2], atol=0.04, rtol=0)
    assert seen[2].sum() > 500  # the bonus position was reached often enough to measure
