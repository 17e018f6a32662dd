"""`moeforge plan serve`: weights, KV cache, chips, concurrency and throughput bounds.

Formulas in `moeforge.plan.formulas` (derivations there): weight bytes = total params x
bytes per weight; cache per sequence from the model's own cache layout; chips =
ceil((weights + concurrency x cache) / usable HBM); decode step >= max(bytes read /
aggregate HBM bandwidth, FLOPs / (aggregate peak x MFU)); prefill compute-bound.
"""

from __future__ import annotations

from typing import Any

from moeforge import accounting
from moeforge.config import ModelConfig
from moeforge.plan import formulas as F
from moeforge.plan.catalog import Chip
from moeforge.plan.train import MAX_CHIPS, check_number

KV_PRECISIONS = {"bf16": 2, "fp8": 1}


def plan_serve(cfg: ModelConfig, chip: Chip, *, context: int = 4096, concurrency: int = 1,
               weight_precision: str = "bf16", kv_precision: str = "bf16", chips: int | None = None,
               mfu: float = 0.4, reserve: float = 0.10) -> dict[str, Any]:
    """The serving plan as a JSON-ready dict. `chips` defaults to the fewest that hold everything."""
    check_number("--context", context, 0, 100_000_000)
    check_number("--concurrency", concurrency, 0, 100_000_000)
    check_number("--chips", chips, 0, MAX_CHIPS)
    check_number("--mfu", mfu, 0, 1)
    check_number("--reserve", reserve, 0, 0.9, low_open=False)
    for name, v in (("--context", context), ("--concurrency", concurrency), ("--chips", chips)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer (got {v!r})")
    if weight_precision not in F.PRECISION_BYTES:
        raise ValueError(f"--weight-precision must be one of {', '.join(F.PRECISION_BYTES)} (got {weight_precision!r})")
    if kv_precision not in KV_PRECISIONS:
        raise ValueError(f"--kv-precision must be one of {', '.join(KV_PRECISIONS)} (got {kv_precision!r})")
    peak = chip.require_precision(weight_precision, "serve weights", "--weight-precision")
    if kv_precision == "fp8":
        chip.require_precision("fp8", "keep the KV cache", "--kv-precision")

    n = F.model_numbers(cfg)
    wb = F.PRECISION_BYTES[weight_precision]
    weights = n["total_params"] * wb
    kv_tok = F.kv_bytes_per_token(cfg, KV_PRECISIONS[kv_precision])
    seq = F.kv_bytes_per_sequence(cfg, context, KV_PRECISIONS[kv_precision])
    usable = chip.get("hbm_gb") * F.GB * (1 - reserve)
    needed = F.serve_chips_needed(weights, concurrency * seq, usable)
    weights_only = F.serve_chips_needed(weights, 0.0, usable)
    n_chips = needed if chips is None else chips
    max_conc = F.serve_max_concurrency(n_chips, usable, weights, seq)
    notes = []
    if chips is not None and chips < needed:
        notes.append(f"{chips} chips cannot hold the weights and {concurrency} sequences of {context:,} tokens: "
                     f"{needed} needed" + (f" ({weights_only} for the weights alone)" if weights_only > chips else ""))
    batch = max(1, min(concurrency, max_conc)) if max_conc else 1
    hbm = chip.get("hbm_tbps")
    dec_flops = batch * _decode_flops(cfg, context)
    mem_s, comp_s = F.decode_step_seconds(F.decode_bytes_per_step(cfg, batch, wb, seq), dec_flops, n_chips, hbm,
                                          peak, mfu)
    step = max(mem_s, comp_s)
    d_mem_s, d_comp_s = F.decode_step_seconds(F.dense_decode_bytes_per_step(cfg, batch, wb, seq),
                                              batch * (_decode_flops(cfg, context) + 2.0 * (n["total_params"]
                                                                                          - n["active_params"])),
                                              n_chips, hbm, peak, mfu)
    dense_step = max(d_mem_s, d_comp_s)
    prefill = F.prefill_tokens_per_s(cfg, context, n_chips, peak, mfu)
    return {
        "model": cfg.name,
        "hardware": chip.name,
        "weight_precision": weight_precision,
        "kv_precision": kv_precision,
        "context": context,
        "concurrency": concurrency,
        "total_params": n["total_params"],
        "active_params": n["active_params"],
        "weights_gb": weights / F.GB,
        "kv_bytes_per_token": kv_tok,
        "kv_cache_layout": "v4 compressed (window + CSA/HCA)" if getattr(cfg, "v4", None) is not None
                           else "MLA latent (kv_lora_rank + qk_rope_head_dim per layer)",
        "kv_gb_per_sequence": seq / F.GB,
        "kv_gb_total": concurrency * seq / F.GB,
        "usable_hbm_gb": usable / F.GB,
        "chips_needed": needed,
        "chips_for_weights": weights_only,
        "chips": n_chips,
        "max_concurrency": max_conc,
        "decode_batch": batch,
        "bytes_read_per_token_single_sequence": n["active_params"] * wb + seq,
        "decode_step_ms": step * 1e3,
        "decode_bound": "memory" if mem_s >= comp_s else "compute",
        "decode_tokens_per_s_bound": batch / step,
        "decode_tokens_per_s_per_sequence": 1.0 / step,
        "prefill_tokens_per_s_bound": prefill,
        "prefill_seconds_full_context": context / prefill,
        "dense_equivalent": {
            "decode_tokens_per_s_bound": batch / dense_step,
            "sparsity_dividend": dense_step / step,
            "single_sequence_dividend": (n["total_params"] * wb + seq) / (n["active_params"] * wb + seq),
        },
        "notes": notes,
        "assumptions": [
            (f"weights: total params (main model, MTP excluded) x {wb:g} B ({weight_precision}); spread evenly over "
            "the chips (expert + tensor / data parallel)"),
            (f"KV cache: the model's own layout, {kv_precision}; {kv_tok:,.0f} B per token, every sequence at "
            f"{context:,} tokens"),
            f"usable HBM = {1 - reserve:.0%} of {chip.get('hbm_gb'):g} GB (runtime, activations, fragmentation)",
            (f"decode: batch {batch}; bytes per step = non-routed weights + expected touched experts 1-(1-K/E)^B + "
            f"caches, at {hbm:g} TB/s per chip; FLOPs at {peak:g} TFLOPS x MFU {mfu:g}"),
            f"prefill: forward FLOPs at causal length {context:,}, {peak:g} TFLOPS x MFU {mfu:g} per chip",
        ],
    }


def _decode_flops(cfg: ModelConfig, context: int) -> float:
    """Decode FLOPs per token at `context` cached tokens, from accounting."""
    return accounting.flops_per_token_decode(cfg, context)
