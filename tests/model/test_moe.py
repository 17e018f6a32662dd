import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter

from moeforge.config import MoEConfig
from moeforge.model.moe import MoE, Router
from moeforge.ops.grouped import grouped_mm_works

D = 32


def _v3_cfg(**kw):
    base = dict(  # noqa: C408 - keyword form reads like the config
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=24, n_group=4,
        topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        routed_scaling_factor=2.5)
    base.update(kw)
    return MoEConfig(**base)


def _hf_v3(cfg: MoEConfig):
    return DeepseekV3Config(hidden_size=D, moe_intermediate_size=cfg.moe_intermediate_size,
                            n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                            num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
                            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                            routed_scaling_factor=cfg.routed_scaling_factor)


def _sorted_pairs(idx, w):
    order = idx.argsort(-1)
    return idx.gather(1, order), w.gather(1, order)


def _assert_same_routing(ours: Router, hf, x: torch.Tensor) -> torch.Tensor:
    """Same experts (order within a token aside) and the same gate weights; returns our indices, sorted."""
    r = ours(x)
    _, hw, hi = hf(x)
    i1, w1 = _sorted_pairs(r.indices, r.weights)
    i2, w2 = _sorted_pairs(hi, hw)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2)
    return i1


@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_group_router_matches_hf_v3(norm):
    cfg = _v3_cfg(norm_topk_prob=norm)
    ours, hf = Router(D, cfg), DeepseekV3TopkRouter(_hf_v3(cfg))
    torch.nn.init.normal_(ours.weight, std=0.3)
    ours.e_score_correction_bias.uniform_(-0.3, 0.3)  # large enough to change selections
    hf.weight.data.copy_(ours.weight)
    hf.e_score_correction_bias.copy_(ours.e_score_correction_bias)
    x = torch.randn(200, D)
    i1 = _assert_same_routing(ours, hf, x)
    r = ours(x)
    # the bias changes which experts are picked but never the weights' source scores
    unbiased = Router(D, cfg)
    unbiased.weight.data.copy_(ours.weight)
    assert not torch.equal(unbiased(x).indices.sort(-1).values, i1)
    torch.testing.assert_close(r.weights, r.scores.gather(1, r.indices) / (
        r.scores.gather(1, r.indices).sum(-1, keepdim=True) if norm else 1) * 2.5)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_router_matches_hf_v2(method):
    cfg = MoEConfig(n_routed_experts=16, num_experts_per_tok=3, moe_intermediate_size=8, n_group=4, topk_group=2,
                    scoring_func="softmax", topk_method=method, norm_topk_prob=False, routed_scaling_factor=1.7)
    hf_cfg = DeepseekV2Config(hidden_size=D, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                              topk_method=method, routed_scaling_factor=1.7)
    ours, hf = Router(D, cfg), DeepseekV2TopkRouter(hf_cfg)
    torch.nn.init.normal_(ours.weight, std=0.3)
    hf.weight.data.copy_(ours.weight)
    _assert_same_routing(ours, hf, torch.randn(100, D))


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition of the block."""
    flat = x.reshape(-1, D)
    r = moe.gate(flat)
    out = torch.zeros_like(flat)
    inter = moe.cfg.moe_intermediate_size
    for n in range(flat.shape[0]):
        for k in range(moe.cfg.num_experts_per_tok):
            e = r.indices[n, k]
            gu = moe.experts.gate_up_proj[e] @ flat[n]
            h = F.silu(gu[:inter]) * gu[inter:]
            out[n] += r.weights[n, k] * (moe.experts.down_proj[e] @ h)
    return (out + moe.shared_experts(flat)).view_as(x)


def _init(moe):
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


@pytest.mark.parametrize("hashed", [False, True])
def test_router_logits_stay_fp32_under_autocast(hashed):
    """The gating product runs in fp32 under bf16 autocast (the V3 report's mixed precision keeps the gate in its
    original precision): the same routing as without autocast, where a plain F.linear would round to bf16."""
    from moeforge.model.moe import HashRouter

    torch.manual_seed(0)
    cfg = _v3_cfg()
    router = HashRouter(D, cfg, 50) if hashed else Router(D, cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    if hashed:
        router.init_table(seed=0)
    x, ids = torch.randn(64, D), torch.randint(0, 50, (1, 64))
    args = (x, ids) if hashed else (x,)
    plain = router(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(*args)
        assert F.linear(x, router.weight).dtype == torch.bfloat16  # what autocast does to a plain product
    assert mixed.scores.dtype == torch.float32 and torch.equal(mixed.scores, plain.scores)
    assert torch.equal(mixed.indices, plain.indices) and torch.equal(mixed.weights, plain.weights)


def test_moe_block_matches_per_token_reference_and_hf():
    cfg = _v3_cfg()
    moe = _init(MoE(D, cfg)).double()
    moe.gate.weight.data = moe.gate.weight.data.float()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y, stats = moe(x)
    torch.testing.assert_close(y, _reference_moe(moe, x), atol=1e-9, rtol=1e-9)
    assert int(stats.counts.sum()) == 18 * cfg.num_experts_per_tok
    # HF block with the same weights (its state dict names are ours)
    hf = DeepseekV3MoE(_hf_v3(cfg)).double()
    hf.gate.weight.data = hf.gate.weight.data.float()
    missing = hf.load_state_dict(moe.state_dict(), strict=True)
    assert not missing.missing_keys
    # HF rounds part of its expert path through fp32, hence the looser bound
    torch.testing.assert_close(y, hf(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("limit", [0.0, 0.5])
@pytest.mark.parametrize("path", ["_routed_fused", "_routed_dense"])
def test_inference_paths_match_sorted_segments(path, limit):
    """The sort-free path of compiled decode graphs, and every expert on every token (eager inference on a
    few tokens of a few-expert model), == the segment path: outputs and counts, in fp64 and in bf16."""
    moe = _init(MoE(D, _v3_cfg(), swiglu_limit=limit)).double()
    moe.gate.weight.data = moe.gate.weight.data.float()
    flat = torch.randn(5, D, dtype=torch.float64)
    r = moe.gate(flat)
    want, want_counts = moe._routed(flat, r)
    got, counts = getattr(moe, path)(flat, r)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.equal(counts, want_counts)
    with torch.no_grad():
        b16 = moe.to(torch.bfloat16)
        b16.gate.float()
        fb = flat.bfloat16()
        rb = b16.gate(fb)
        torch.testing.assert_close(getattr(b16, path)(fb, rb)[0].float(), b16._routed(fb, rb)[0].float(),
                                   atol=2e-2, rtol=2e-2)


def test_dense_path_only_where_it_pays(monkeypatch):
    from moeforge.model import moe as moe_module

    moe = _init(MoE(D, _v3_cfg()))  # 16 experts, top-4: E / K = 4
    taken = []
    real = MoE._routed_dense
    monkeypatch.setattr(MoE, "_routed_dense", lambda self, f, r: taken.append(f.shape[0]) or real(self, f, r))
    x = torch.randn(1, 4, D)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            moe(x)  # 4 tokens x 4 choices cover the 16 experts
            moe(x[:, :1])  # 1 token: 4x the routed FLOPs, small experts: dense too
            moe(torch.randn(1, 5, D))  # more than SMALL_ROWS tokens: the segment path
        y, _ = moe(x)  # autograd on: the segment path
        assert taken == [4, 1]
        with torch.no_grad():
            torch.testing.assert_close(moe(x)[0], y.detach(), atol=1e-6, rtol=1e-6)
            wide = _init(MoE(D, _v3_cfg(n_routed_experts=32, n_group=4)))  # E / K = 8
            wide(torch.randn(1, 1, D))  # 8x the routed FLOPs: the segment path
            wide(torch.randn(1, 2, D))  # 4x: dense
            monkeypatch.setattr(moe_module, "DENSE_CACHE_BYTES", 0)  # experts too big to read them all
            wide(torch.randn(1, 2, D))  # the segment path
            wide(torch.randn(1, 4, D))  # 16 choices of 32 experts do not cover them: the segment path
            moe(x)  # ... while covering them still takes the dense path
            torch.set_num_threads(1)
            moe(x)  # one thread: the segment path
        assert taken == [4, 1, 4, 2, 4]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_moe_backward_matches_reference(impl):
    if impl == "grouped_mm" and not grouped_mm_works("cpu", torch.float32):
        pytest.skip("grouped_mm not available")
    cfg = _v3_cfg()
    moe = _init(MoE(D, cfg, impl=impl))
    ref = _init(MoE(D, cfg))
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(3, 7, D)
    moe(x)[0].square().sum().backward()
    _reference_moe(ref, x).square().sum().backward()
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_balance_loss_definition():
    cfg = _v3_cfg()
    moe = _init(MoE(D, cfg)).train()
    x = torch.randn(2, 10, D)
    _, stats = moe(x)
    r = moe.gate(x.reshape(-1, D))
    E, K, T = cfg.n_routed_experts, cfg.num_experts_per_tok, 10
    expected = 0.0
    for b in range(2):
        idx = r.indices[b * T:(b + 1) * T]
        s = r.scores[b * T:(b + 1) * T]
        f = torch.stack([(idx == i).any(-1).float().sum() for i in range(E)]) * E / (K * T)
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += (f * p).sum() / 2
    torch.testing.assert_close(stats.balance_loss, expected)
    # perfectly uniform routing gives exactly 1 in expectation; a collapsed router gives more
    assert stats.balance_loss > 0.5
    moe.eval()
    assert moe(x)[1].balance_loss == 0


@pytest.mark.parametrize(("method", "E", "G", "TG", "K"), [
    ("noaux_tc", 64, 8, 4, 6), ("noaux_tc", 256, 8, 4, 8), ("noaux_tc", 384, 1, 1, 8), ("noaux_tc", 72, 8, 3, 6),
    ("group_limited_greedy", 160, 8, 3, 6), ("greedy", 64, 1, 1, 6), ("greedy", 21, 1, 1, 4)])
def test_native_router_selection_equals_torch(monkeypatch, method, E, G, TG, K):
    """On CPU the router picks experts with the native kernel: the same experts in the same order (by value,
    descending) as the torch.topk path, for V3 (group score = sum of top-2, dropped groups -inf), V2 (max, 0)
    and ungrouped configs, expert counts off the kernel's vector width included; ties go to the lower expert;
    NaN counts as -inf."""
    from moeforge.ops import native

    if native.ops() is None:
        pytest.skip(f"native kernels unavailable here: {native.STATE}")
    cfg = _v3_cfg(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K, topk_method=method,
                  scoring_func="softmax" if method == "group_limited_greedy" else "sigmoid")
    router = Router(D, cfg)
    choice = torch.rand(300, E) - (0.5 if method == "noaux_tc" else 0.0)  # V3's biased scores can be negative
    got = router._select(choice)
    monkeypatch.setattr(native, "ops", lambda: None)
    want = router._select(choice)
    assert torch.equal(got, want)
    monkeypatch.undo()
    ties = torch.zeros(4, E)
    ties[:, E // 2:] = 1.0  # every value ties with half the row
    expected = torch.sort(-ties, dim=-1, stable=True).indices[:, :K]  # the first of the tied ones
    if G == 1:
        assert torch.equal(router._select(ties), expected)
    else:  # groups tie too: the lower groups of the upper half win
        assert torch.equal(router._select(ties).sort(-1).values, expected.sort(-1).values)
    nan = choice[:8].clone()
    nan[:, 1::3] = float("nan")
    got = router._select(nan)
    monkeypatch.setattr(native, "ops", lambda: None)
    assert torch.equal(got, router._select(nan.nan_to_num(nan=float("-inf"))))


def test_native_pair_sort_equals_stable_argsort():
    """The MoE block sorts its token-expert pairs with the native counting sort on CPU: the stable argsort's
    order and the bincount's counts, empty experts and repeated experts in a row included; bad ids are refused."""
    from moeforge.ops import native

    lib = native.ops()
    if lib is None:
        pytest.skip(f"native kernels unavailable here: {native.STATE}")
    idx = torch.randint(0, 40, (500, 6))
    idx[idx == 7] = 8  # expert 7 empty
    idx[3] = 5  # one token choosing the same expert six times
    order, counts = lib.sort_pairs(idx, 40)
    assert torch.equal(order, idx.flatten().argsort(stable=True))
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=40)) and counts[7] == 0
    with pytest.raises(RuntimeError, match="out of range"):
        lib.sort_pairs(idx, 30)
