import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moeforge.config import get_preset
from moeforge.infer.sample import filter_logits, sample_next
from moeforge.model.transformer import Transformer
from moeforge.train.balance import load_stats, moe_modules, update_bias
from moeforge.train.config import TrainConfig
from moeforge.train.optim import build_optimizers, lr_multiplier
from moeforge.train.state import (
    CKPT_DIR,
    SHARDED_MARKER,
    check_resume_layout,
    checkpoints,
    resume_latest,
    save_checkpoint,
)
from moeforge.train.trainer import compute_losses


@pytest.fixture
def model():
    cfg = get_preset("tiny").replace(vocab_size=128, hidden_size=32, intermediate_size=48, **{
        "moe.moe_intermediate_size": 16, "attention.q_lora_rank": 16, "attention.kv_lora_rank": 16,
        "attention.qk_nope_head_dim": 8, "attention.qk_rope_head_dim": 4, "attention.v_head_dim": 8})
    return Transformer(cfg)


def test_schedules():
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, cfg) == pytest.approx(0.1, abs=1e-3)
    mults = [lr_multiplier(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(mults))
    wsd = TrainConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(50, 100, wsd) == 1.0 and lr_multiplier(79, 100, wsd) == 1.0
    assert lr_multiplier(89, 100, wsd) == pytest.approx(0.5) and lr_multiplier(99, 100, wsd) == 0.0


def test_bias_update_moves_against_load(model):
    mods = moe_modules(model)
    assert len(mods) == 3 + 1  # 3 MoE layers + 1 MTP layer
    counts = torch.full((len(mods), 16), 16.0)
    counts[:, 0], counts[:, 1] = 32.0, 0.0  # mean stays 16: expert 0 overloaded, expert 1 idle
    update_bias(mods, counts, 0.001)
    for m in mods:
        b = m.gate.e_score_correction_bias
        assert b[0] == pytest.approx(-0.001) and b[1] == pytest.approx(0.001) and (b[2:] == 0).all()
    stats = load_stats(mods, counts)
    assert stats["load_max_over_mean"] == [2.0] * 4
    assert stats["experts_without_tokens"] == [1] * 4
    assert stats["bias_min"][0] == pytest.approx(-0.001) and stats["bias_max"][3] == pytest.approx(0.001)
    update_bias(mods, counts, 0.0)  # gamma 0: off
    assert mods[0].gate.e_score_correction_bias[0] == pytest.approx(-0.001)


def test_losses_match_their_definitions(model):
    window = torch.randint(0, 128, (2, 17))
    out = model(window[:, :-1])
    cfg = TrainConfig(mtp_weight=0.3, balance_alpha=0.01)
    losses = compute_losses(out, window, cfg)
    main = F.cross_entropy(out.logits.reshape(-1, 128), window[:, 1:].reshape(-1))
    # depth-1 MTP logits at position i predict token i + 2
    mtp = F.cross_entropy(out.mtp_logits[0].reshape(-1, 128), window[:, 2:].reshape(-1))
    bal = sum(s.balance_loss for s in out.moe_stats)
    torch.testing.assert_close(losses["loss"], main + 0.3 * mtp + 0.01 * bal)
    assert math.isclose(float(losses["main_loss"]), math.log(128), rel_tol=0.05)  # untrained: ~uniform


def test_muon_groups(model):
    opts = build_optimizers(model, TrainConfig(optimizer="muon"))
    assert isinstance(opts[1], torch.optim.Muon)
    muon = {id(p) for g in opts[1].param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert "layers.0.self_attn.kv_b_proj.weight" in names
    assert not any("embed" in n or "lm_head" in n or "mlp.experts." in n or "mlp.gate.weight" in n for n in names)
    adamw = sum(len(g["params"]) for g in opts[0].param_groups)
    assert adamw + len(muon) == len(list(model.parameters()))


def test_checkpoints_keep_last_and_fall_back_past_a_corrupt_one(model, tmp_path):
    opts = build_optimizers(model, TrainConfig())
    model(torch.randint(0, 128, (1, 8))).logits.sum().backward()
    for o in opts:
        o.step()
    for step in (1, 2, 3):
        with torch.no_grad():
            model.embed_tokens.weight[0, 0] = float(step)
        save_checkpoint(tmp_path, step, model, opts, {"step": step}, None, keep_last=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000003", "step_0000002"]
    # corrupt the newest: resume warns and takes step 2
    weights = tmp_path / CKPT_DIR / "step_0000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping checkpoint step_0000003.*model.safetensors"):
        state = resume_latest(tmp_path, model, opts)
    assert state["step"] == 2 and model.embed_tokens.weight[0, 0] == 2.0
    assert json.loads((tmp_path / CKPT_DIR / "step_0000002" / "trainer_state.json").read_text())["step"] == 2


def test_resume_refuses_the_other_kind_of_checkpoint(model, tmp_path):
    """A one-process run cannot read a sharded (multi-process) checkpoint, and a multi-process run must not
    start over next to one-process checkpoints (it would rotate them away): both are refused by name."""
    check_resume_layout(tmp_path, multi_process=True)  # nothing saved yet: either kind may start
    opts = build_optimizers(model, TrainConfig())
    save_checkpoint(tmp_path, 1, model, opts, {"step": 1}, None, keep_last=2)
    check_resume_layout(tmp_path, multi_process=False)
    with pytest.raises(ValueError, match="step_0000001 is a one-process checkpoint.*without --nproc"):
        check_resume_layout(tmp_path, multi_process=True)
    sharded = tmp_path / CKPT_DIR / "step_0000002"
    sharded.mkdir()
    (sharded / SHARDED_MARKER).write_text("")
    check_resume_layout(tmp_path, multi_process=True)
    with pytest.raises(ValueError, match="step_0000002 is a sharded checkpoint.*--consolidate"):
        check_resume_layout(tmp_path, multi_process=False)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, temperature=0).item() == 3
    x = filter_logits(logits, top_k=2)
    assert torch.isinf(x[0, :2]).all() and torch.isfinite(x[0, 2:]).all()
    p = logits.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644
    x = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(x[0]).tolist() == [False, False, True, True]
    assert p[3] < 0.7
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, g, top_k=2) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {2, 3}
    with pytest.raises(ValueError):
        filter_logits(logits, top_p=0)


def test_activation_checkpointing_gives_the_same_step(model):
    from moeforge.distributed.parallelize import apply_activation_checkpointing

    twin = type(model)(model.cfg)
    twin.load_state_dict(model.state_dict())
    apply_activation_checkpointing(twin)
    assert set(twin.state_dict()) == set(model.state_dict())  # checkpoint names unchanged
    window = torch.randint(0, 128, (2, 17))
    cfg = TrainConfig()
    for m in (model, twin):
        out = m(window[:, :-1], logits=False)
        compute_losses(out, window, cfg, m.lm_head.weight)["loss"].backward()
    grads = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
