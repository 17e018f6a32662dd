"""Every formula the capacity planner uses, each with its derivation, checkable by hand.

Model sizes and FLOPs come from `moeforge.accounting` (the one place they are counted);
this module only combines them with chip figures (`moeforge.plan.catalog`). Units: bytes,
FLOPs, seconds unless a name says otherwise (`_gb` = 1e9 bytes, `_tbps` = 1e12 B/s).

Training
--------
* FLOPs per token F = `accounting.flops_per_token_train(cfg, seq_len, with_mtp=True)`:
  3 passes x 2 FLOPs per multiply-add x active matmul weights (~6 N_active), plus the
  causal attention term at the sequence length, plus the MTP modules (they are trained).
* Total FLOPs C = tokens x F.
* Chip-hours H = C / (peak x MFU) / 3600, peak = the chip's dense TFLOPS x 1e12 in the
  training precision. Conversely MFU = C / (H x 3600 x peak).
* Days = H / chips / 24; chips = H / (days x 24), rounded up.

Training memory per chip (see `state_bytes`, `activation_bytes`): every parameter, the
TOTAL count (all experts, the MTP modules too), has a bf16 weight (2 B), an fp32 gradient
(4 B), an fp32 master copy (4 B) and AdamW's two fp32 moments (8 B). Pipeline parallel
(PP) splits layers; expert parallel (EP) splits each layer's routed experts over EP
chips; the rest is replicated over the DP chips of a stage, and ZeRO stage z shards over
them: z >= 1 optimizer moments + master, z >= 2 gradients, z = 3 weights. Routed experts
are replicated only over DP / EP chips (the expert-data-parallel group), so ZeRO shards
them over DP / EP.

Serving (see `serve_*`): weights x bytes per weight; KV bytes per token from the model's
own cache layout (accounting); decode at batch B reads the touched weights once per
step plus every sequence's cache, so step time >= bytes / (chips x HBM bandwidth) and
>= FLOPs / (chips x peak x MFU); prefill is compute-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moeforge import accounting
from moeforge.config import ModelConfig

GB = 1e9
PRECISION_BYTES = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
RECOMPUTE = ("none", "selective", "full")

# Bytes per parameter for training state (mixed precision AdamW, as the V3 report's
# fp32 master weights and gradients; V3 keeps its moments in bf16, we assume fp32).
WEIGHT_B, GRAD_B, MASTER_B, ADAM_B = 2.0, 4.0, 4.0, 8.0


# ================================================================ model quantities
def model_numbers(cfg: ModelConfig) -> dict[str, Any]:
    """Counts from accounting that the planner needs, under the names it uses."""
    p = accounting.count_params(cfg)
    comp, mtp = p["components"], p["mtp_components"]
    routed = comp.get("routed_experts", {"total": 0})["total"]
    mtp_routed = mtp.get("routed_experts", {"total": 0})["total"]
    return {
        "total_params": p["total_params"],
        "active_params": p["active_params"],
        "total_params_with_mtp": p["total_params_with_mtp"],
        "active_params_with_mtp": p["active_params_with_mtp"],
        "embedding": comp["embedding"]["total"],
        "head": comp["head"]["total"],
        "routed": routed,
        # everything in the layers except routed experts: attention, dense MLP, shared experts, router, norms
        "layer_dense": p["total_params"] - routed - comp["embedding"]["total"] - comp["head"]["total"],
        "mtp_routed": mtp_routed,
        "mtp_dense": p["mtp_params"] - mtp_routed,
    }


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """`accounting.flops_per_token_train` with the MTP modules (trained alongside the main model)."""
    return accounting.flops_per_token_train(cfg, seq_len, with_mtp=True)


def dense_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """A dense model of the same TOTAL size: every routed expert active for every token.

    F_dense = F_moe + 6 (N_total - N_active) (with MTP): the inactive routed weights become
    active, each costing 2 FLOPs per multiply-add x 3 passes.
    """
    n = model_numbers(cfg)
    return train_flops_per_token(cfg, seq_len) + 6.0 * (n["total_params_with_mtp"] - n["active_params_with_mtp"])


# ================================================================ time, chips, MFU
def chip_hours(total_flops: float, peak_tflops: float, mfu: float) -> float:
    """H = C / (peak x 1e12 x MFU) / 3600."""
    return total_flops / (peak_tflops * 1e12 * mfu) / 3600.0


def implied_mfu(total_flops: float, peak_tflops: float, hours: float) -> float:
    """MFU = C / (H x 3600 x peak x 1e12): the inverse of `chip_hours`."""
    return total_flops / (hours * 3600.0 * peak_tflops * 1e12)


def energy_mwh(hours: float, tdp_w: float | None, pue: float) -> float | None:
    """E = chip-hours x TDP (W) x PUE / 1e6 (MWh): every chip at its TDP for the whole run."""
    return None if tdp_w is None else hours * tdp_w * pue / 1e6


# ================================================================ training memory
@dataclass(frozen=True)
class Stage:
    """Parameters held by one pipeline stage: `dense` (replicated over DP), `expert` (split over EP)."""

    index: int
    layers: int  # transformer blocks, MTP blocks included
    moe_layers: int
    dense: float
    expert: float
    in_flight: int  # micro-batches whose activations this stage holds under 1F1B


def stages(cfg: ModelConfig, pp: int) -> list[Stage]:
    """The first and the last pipeline stage (the heaviest ones), each an upper bound.

    Each stage holds ceil(L / PP) layers, each charged the average non-expert layer
    weights (layer_dense / L) and ceil(L_moe / PP) layers of routed experts. The first
    stage adds the embedding and holds PP micro-batches in flight (1F1B schedule: stage s
    holds PP - s); the last adds the head and the MTP modules (one more block each) and
    holds 1. With PP = 1 the one stage holds everything.
    """
    n = model_numbers(cfg)
    L, n_mtp = cfg.num_layers, cfg.mtp.num_layers
    n_moe = cfg.num_moe_layers
    per_layer_dense = n["layer_dense"] / L
    per_moe_layer = n["routed"] / n_moe if n_moe else 0.0
    k, k_moe = math.ceil(L / pp), math.ceil(n_moe / pp)
    if pp == 1:
        return [Stage(0, L + n_mtp, n_moe + n_mtp, n["layer_dense"] + n["embedding"] + n["head"] + n["mtp_dense"],
                      n["routed"] + n["mtp_routed"], 1)]
    first = Stage(0, k, k_moe, k * per_layer_dense + n["embedding"], k_moe * per_moe_layer, pp)
    last = Stage(pp - 1, k + n_mtp, k_moe + n_mtp, k * per_layer_dense + n["head"] + n["mtp_dense"],
                 k_moe * per_moe_layer + n["mtp_routed"], 1)
    return [first, last]


def state_bytes(stage: Stage, dp: int, ep: int, zero: int) -> dict[str, dict[str, float]]:
    """Weights, gradients, master copies and optimizer moments on one chip of `stage`.

    Per kind (bytes/param b): dense part = stage.dense x b / s_d, expert part =
    stage.expert / EP x b / s_e, where s_d = DP and s_e = DP / EP when ZeRO shards that
    kind (z >= 1: master + optimizer, z >= 2: + gradients, z = 3: + weights), else 1.
    """
    edp = dp // ep
    out = {}
    for kind, b, from_stage in (("weights", WEIGHT_B, 3), ("gradients", GRAD_B, 2), ("master", MASTER_B, 1),
                                ("optimizer", ADAM_B, 1)):
        sharded = zero >= from_stage
        out[kind] = {"dense": stage.dense * b / (dp if sharded else 1),
                     "expert": stage.expert / ep * b / (edp if sharded else 1)}
    return out


def activation_values_per_token(cfg: ModelConfig, moe: bool, recompute: str, imbalance: float) -> float:
    """Values (2 bytes each) one layer keeps per token for its backward pass.

    No recompute, MLA layer (naive path: q / k / v materialised, flash-style attention
    keeping only the fp32 softmax statistics, 2 values per head):
      attention: block input h, normed input h, q latent + its norm 2 q_lora, q H d_qk,
        kv latent + rope key (C + R), normed latent C, k_nope and v H (d_nope + d_v),
        rope key R, attention output H d_v, softmax statistics 2 H
      MoE FFN: residual h, normed input h, router scores in fp32 2 E, shared experts
        n_s 3 I (gate, up, gated product), and per routed copy of the token (K of them,
        x the imbalance factor: the busiest expert's chip gets that much more than the
        mean) the dispatched input h, 3 I, and the output before the weighted combine h
      dense FFN: residual h, normed input h, 3 I_dense
    selective (what the V3 report recomputes: RMSNorms, MLA up-projections): drop the
      normed copies (2 h, q_lora, C) and q, k_nope, v.
    full: keep only the block input h (the layer is recomputed in backward).
    """
    a, m, h = cfg.attention, cfg.moe, cfg.hidden_size
    v4 = getattr(cfg, "v4", None)
    width = h * (v4.hc_mult if v4 is not None else 1)  # V4's mHC residual stream is hc_mult x wider
    if recompute == "full":
        return float(width)
    ql, H = a.q_lora_rank or 0, a.num_heads
    if v4 is None:
        C, R = a.kv_lora_rank, a.qk_rope_head_dim
        q, kv_up = H * a.qk_head_dim, H * (a.qk_nope_head_dim + a.v_head_dim)
        attn = 2 * h + 2 * ql + q + (C + R) + C + kv_up + R + H * a.v_head_dim + 2 * H
    else:  # V4 (approximate): one shared K=V head, grouped output projection; compressors left out
        C, q, kv_up = v4.head_dim, H * v4.head_dim, 0
        attn = width + h + 2 * ql + q + 2 * v4.head_dim + H * v4.head_dim + v4.o_groups * v4.o_lora_rank + 2 * H
    if moe:
        routed = m.num_experts_per_tok * (2 * h + 3 * m.moe_intermediate_size) * imbalance
        ffn = 2 * h + 2 * m.n_routed_experts + m.n_shared_experts * 3 * m.moe_intermediate_size + routed
    else:
        ffn = 2 * h + 3 * cfg.intermediate_size
    if recompute == "selective":
        attn -= 2 * h + ql + C + q + kv_up
    return float(attn + ffn)


def activation_bytes(cfg: ModelConfig, stage: Stage, recompute: str, micro_tokens: int, imbalance: float) -> float:
    """Activations on one chip of `stage`: in_flight micro-batches x its layers x per-token values x 2 B x tokens.

    The stage's layers are charged as MoE layers (an upper bound when dense layers sit in it).
    With full recompute the stage also holds one layer's complete activations while that
    layer runs its backward.
    """
    per_layer = activation_values_per_token(cfg, stage.moe_layers > 0, recompute, imbalance) * 2.0 * micro_tokens
    total = stage.in_flight * stage.layers * per_layer
    if recompute == "full":
        total += activation_values_per_token(cfg, stage.moe_layers > 0, "none", imbalance) * 2.0 * micro_tokens
    return total


def recompute_overhead(cfg: ModelConfig, recompute: str, flops_per_token: float) -> float:
    """Extra hardware FLOPs as a fraction of model FLOPs.

    full: one more forward = F_fwd / F_train = 1/3. selective: the MLA up-projections run
    again in backward, 2 FLOPs x (q_lora x H d_qk + C x H (d_nope + d_v)) per token per layer,
    over `flops_per_token` (the training FLOPs per token, `train_flops_per_token`).
    """
    if recompute == "none":
        return 0.0
    if recompute == "full":
        return 1.0 / 3.0
    a, v4 = cfg.attention, getattr(cfg, "v4", None)
    if v4 is not None:
        up = (a.q_lora_rank or 0) * a.num_heads * v4.head_dim
    else:
        up = (a.q_lora_rank or 0) * a.num_heads * a.qk_head_dim + a.kv_lora_rank * a.num_heads * (
            a.qk_nope_head_dim + a.v_head_dim)
    return 2.0 * up * (cfg.num_layers + cfg.mtp.num_layers) / flops_per_token


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """1F1B idle fraction (PP - 1) / (M + PP - 1), M = micro-batches per pipeline per step."""
    return (pp - 1) / (micro_batches + pp - 1)


# ================================================================ all-to-all
def all_to_all_bytes_per_token_layer(cfg: ModelConfig, ep: int, dispatch_bytes: float) -> float:
    """Bytes one chip sends per token per MoE layer in a training step (forward + backward).

    Forward: dispatch K copies of the hidden state (h x dispatch_bytes each: 1 in FP8 as
    V3 does, else 2) and combine K expert outputs (h x 2 B). Backward sends the same
    volumes the other way. A fraction (EP - 1) / EP of the experts live on other chips.
    Node-limited routing (V3: at most 4 nodes per token) dedupes copies; this ignores that,
    so it is an upper bound.
    """
    if ep <= 1:
        return 0.0
    k, h = cfg.moe.num_experts_per_tok, cfg.hidden_size
    return 2.0 * k * h * (dispatch_bytes + 2.0) * (ep - 1) / ep


def dp_sync_bytes(stage: Stage, dp: int, ep: int, zero: int) -> float:
    """Bytes one chip sends per step to keep its data-parallel replicas in step.

    Gradient reduce-scatter + weight all-gather (the ring all-reduce, or ZeRO's
    equivalent) move 2 x (g - 1)/g x the chip's unsharded bf16 bytes, g = the group size:
    DP for the dense part, DP / EP for the routed experts. ZeRO-3 gathers the weights once
    more (forward and backward each gather): 1.5x that (the ZeRO paper's figure).
    """
    edp = dp // ep
    dense = 2 * WEIGHT_B * stage.dense * (dp - 1) / dp
    expert = 2 * WEIGHT_B * stage.expert / ep * (edp - 1) / edp
    return (dense + expert) * (1.5 if zero == 3 else 1.0)


def link_bytes_per_s(ep: int, scale_up_gbps: float | None, scale_up_domain: float | None,
                     scale_out_gbps: float | None) -> float | None:
    """Bandwidth a collective over `ep` chips (EP, or DP) sees per chip, one direction.

    A group within the scale-up domain: half the catalog scale-up figure (vendors quote it
    bidirectional). Wider: the scale-out NIC figure (per direction), the slower path.
    """
    if scale_up_domain is not None and ep <= scale_up_domain and scale_up_gbps is not None:
        return scale_up_gbps * GB / 2.0
    return None if scale_out_gbps is None else scale_out_gbps * GB


# ================================================================ serving
def hit_fraction(cfg: ModelConfig, batch: int) -> float:
    """Expected share of a layer's routed experts a decode batch touches: 1 - (1 - K/E)^B (uniform routing)."""
    m = cfg.moe
    if m.n_routed_experts == 0:
        return 0.0
    return 1.0 - (1.0 - m.num_experts_per_tok / m.n_routed_experts) ** batch


def decode_bytes_per_step(cfg: ModelConfig, batch: int, weight_bytes: float, seq_cache_bytes: float) -> float:
    """Bytes read from HBM per decode step of `batch` sequences, each with `seq_cache_bytes` of cache.

    Non-routed weights once, the touched routed experts once (hit_fraction x routed
    weights), and each sequence's whole cache: (N_total - N_routed + f N_routed) x b + B x cache.
    With B = 1 the expected routed weights read are K/E of them: the active parameters.
    """
    n = model_numbers(cfg)
    weights = (n["total_params"] - n["routed"] + hit_fraction(cfg, batch) * n["routed"]) * weight_bytes
    return weights + batch * seq_cache_bytes


def dense_decode_bytes_per_step(cfg: ModelConfig, batch: int, weight_bytes: float, seq_cache_bytes: float) -> float:
    """The same for a dense model of the same total size: all weights every step."""
    return model_numbers(cfg)["total_params"] * weight_bytes + batch * seq_cache_bytes


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> float:
    """KV-cache bytes per cached token from the model's own cache layout (accounting).

    MLA (V2 / V3 / Kimi-K2): L (kv_lora_rank + qk_rope_head_dim) values, V3: 61 x 576 x 2 B
    = 70,272 B in bf16. V4 (`cfg.v4` set): the growing part of its compressed caches, as
    `accounting` counts it (the V4 accounting module when accounting dispatches to it).
    """
    return float(accounting.kv_cache_bytes_per_token(cfg, dtype_bytes=dtype_bytes))


def kv_bytes_per_sequence(cfg: ModelConfig, context: int, dtype_bytes: int = 2) -> float:
    """Cache bytes of one sequence at `context` tokens: context x per-token bytes for MLA;
    V4 adds its fixed sliding window and compressor state (`accounting_v4.v4_cache_bytes`)."""
    if getattr(cfg, "v4", None) is not None:
        from moeforge import accounting_v4

        return float(accounting_v4.v4_cache_bytes(cfg, context, dtype_bytes=dtype_bytes))
    return context * kv_bytes_per_token(cfg, dtype_bytes)


def serve_chips_needed(weights: float, kv_total: float, usable_per_chip: float) -> int:
    """Chips = ceil((weights + all sequences' caches) / usable HBM per chip), at least 1.

    Weights and caches are assumed spread evenly (expert + tensor / data parallel).
    """
    return max(1, math.ceil((weights + kv_total) / usable_per_chip))


def serve_max_concurrency(chips: int, usable_per_chip: float, weights: float, seq_cache_bytes: float) -> int:
    """Sequences that fit beside the weights: floor((chips x usable - W) / cache bytes per sequence)."""
    free = chips * usable_per_chip - weights
    return max(0, math.floor(free / seq_cache_bytes))


def decode_step_seconds(bytes_read: float, flops: float, chips: int, hbm_tbps: float, peak_tflops: float,
                        mfu: float) -> tuple[float, float]:
    """(memory time, compute time) of one decode step; the step takes at least the larger.

    memory: bytes / (chips x HBM TB/s x 1e12); compute: FLOPs / (chips x peak x 1e12 x MFU).
    """
    return bytes_read / (chips * hbm_tbps * 1e12), flops / (chips * peak_tflops * 1e12 * mfu)


def prefill_tokens_per_s(cfg: ModelConfig, context: int, chips: int, peak_tflops: float, mfu: float) -> float:
    """Compute-bound prefill: chips x peak x MFU / F_fwd(context) (causal forward FLOPs per prompt token)."""
    return chips * peak_tflops * 1e12 * mfu / accounting.flops_per_token_forward(cfg, context)
