"""The engine on DeepSeek-V4 models: one V4 cache per request, scheduled like V3 rows."""

import pytest
import torch

from moeforge.config import get_preset
from moeforge.infer.engine import Engine, SamplingParams
from moeforge.model.v4 import V4Transformer


@pytest.fixture(scope="module")
def model():
    # window 5, CSA every 4, HCA every 8: 20+ tokens cross every compression boundary
    cfg = get_preset("tiny-v4").replace(vocab_size=200, hidden_size=48, eos_token_id=None, **{
        "moe.moe_intermediate_size": 16, "moe.n_routed_experts": 8, "moe.num_experts_per_tok": 2,
        "v4.head_dim": 16, "v4.qk_rope_head_dim": 8, "v4.index_head_dim": 8, "v4.index_topk": 2,
        "v4.index_n_heads": 16, "v4.sliding_window": 5, "v4.hca_compress_rate": 8, "v4.o_lora_rank": 8,
        "v4.hc_mult": 3, "attention.q_lora_rank": 24})
    torch.manual_seed(0)
    m = V4Transformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the init so greedy choices are not near-ties
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    return m


PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [100], [7, 7, 150, 31, 12, 60, 61, 62, 63, 64, 65]]
GREEDY = SamplingParams(max_tokens=14, temperature=0)


@torch.no_grad()
def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: the whole sequence re-run without a cache for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), mtp=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_v4_engine_matches_recompute_and_batches(model):
    want = [recompute_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    assert [Engine(model, max_batch=1).generate([p], GREEDY)[0].output for p in PROMPTS] == want
    # two slots, three requests of different lengths: they join and leave between steps
    eng = Engine(model, max_batch=2)
    reqs = [eng.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(PROMPTS, (14, 5, 14))]
    while eng.has_work:
        eng.step()
        assert len(eng.active) <= 2
    assert [r.output for r in reqs] == [want[0], want[1][:5], want[2]]
    assert all(r.state is None for r in reqs)  # caches released with the slot


def test_v4_chunked_prefill_equals_whole_prefill(model):
    whole = [r.output for r in Engine(model, max_batch=3, prefill_chunk=None).generate(PROMPTS, GREEDY)]
    assert [r.output for r in Engine(model, max_batch=2, prefill_chunk=3).generate(PROMPTS, GREEDY)] == whole
    spec = Engine(model, max_batch=3, prefill_chunk=4, speculative=True)
    assert [r.output for r in spec.generate(PROMPTS, GREEDY)] == whole


@torch.no_grad()
def test_per_row_caches_equal_separate_forwards(model):
    """Rows at different positions in one forward (per-row caches) == each row on its own."""
    caches = []
    for p in PROMPTS:
        out = model(torch.tensor([p]), mtp=False, return_cache=True)
        caches.append(out.cache)
    nxt = torch.tensor([[3], [4], [5]])
    alone = [model(nxt[i : i + 1], start_pos=len(p), cache=caches[i], mtp=False, return_cache=True)
             for i, p in enumerate(PROMPTS)]
    per_row = [[c[layer] for c in caches] for layer in range(len(caches[0]))]
    out = model(nxt, cache=per_row, mtp=False, return_cache=True)
    torch.testing.assert_close(out.logits, torch.cat([a.logits for a in alone]), atol=1e-5, rtol=1e-5)
    assert [c.length for c in out.cache[0]] == [len(p) + 1 for p in PROMPTS]


@pytest.mark.parametrize("k", [1, 3])
def test_v4_speculative_greedy_equals_plain_greedy(model, speculate_with_oracle, k):
    plain = [r.output for r in Engine(model, max_batch=3).generate(PROMPTS, GREEDY)]
    eng = Engine(model, max_batch=3, speculative=True, draft_tokens=k)
    assert [r.output for r in eng.generate(PROMPTS, GREEDY)] == plain
    # some rows accept, some reject: MTP groups of different kept counts run in one step, and rows
    # keeping m < k+1 tokens re-run them from their previous cache
    speculate_with_oracle(model, PROMPTS, GREEDY, plain, "v4_draft", lambda i: i != 1, draft_tokens=k)


def test_v4_engine_seeded_sampling_and_refusals(model):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=3)
    alone = Engine(model, max_batch=1).generate([PROMPTS[0]], params)[0].output
    together = Engine(model, max_batch=3).generate(PROMPTS, [params] * 3)[0].output
    assert alone == together
    # sampled speculation: a seeded request gives the same tokens alone and batched
    spec = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=5)
    for k in (1, 2):
        one = Engine(model, max_batch=1, speculative=True, draft_tokens=k).generate([PROMPTS[2]], spec)[0].output
        many = Engine(model, max_batch=3, speculative=True, draft_tokens=k).generate(PROMPTS, [spec] * 3)[2].output
        assert len(one) == 10 and one == many


def test_v4_chained_drafts_follow_the_mtp_module(model):
    """With 2 drafts, draft 2 is the MTP module's prediction from its own state after draft 1, recomputed
    here without caches: module over (h_{i-1}, x_i) for all positions -> state m and d_1 at the last;
    the same positions plus (m, d_1) -> d_2 at the new last one."""
    eng = Engine(model, max_batch=1, speculative=True, draft_tokens=2)
    req = eng.submit(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0))
    for _ in range(3):
        eng.step()
    seq = torch.tensor([req.prompt + req.output])  # cached tokens, then `pending` (output[-1])
    module = model.mtp[0]

    def draft(ids, prev):
        h, _, _ = module.step(model.embed_tokens(ids), prev, ids)
        return h[:, -1:], int(model.lm_head(module.norm(h[0, -1])).argmax())

    with torch.no_grad():
        hidden = model(seq, mtp=False).hidden
        m, d1 = draft(seq[:, 1:], hidden[:, :-1])
        _, d2 = draft(torch.cat([seq[:, 1:], torch.tensor([[d1]])], 1), torch.cat([hidden[:, :-1], m], 1))
    assert req.drafts == [d1, d2]


def test_v4_compiled_decode_equals_eager(model):
    """compile=True compiles the blocks' cache-free parts and gives the eager engine's tokens: batched rows of
    different lengths, and MTP speculation. The compiled parts run inside the compiled engine's steps only."""
    import torch._dynamo.utils

    plain = [r.output for r in Engine(model, max_batch=3).generate(PROMPTS, GREEDY)]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eng = Engine(model, max_batch=3, compile=True)
    assert [r.output for r in eng.generate(PROMPTS, GREEDY)] == plain
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the compiled parts ran
    spec = Engine(model, max_batch=3, speculative=True, draft_tokens=2, compile=True)
    assert [r.output for r in spec.generate(PROMPTS, GREEDY)] == plain
    assert all(b.compiled is None and b.self_attn.compiled is None for b in model.layers)  # eager outside
