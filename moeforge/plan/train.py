"""`moeforge plan train`: FLOPs, chip-hours, days or chips, and a parallel layout that fits.

The numbers come from `moeforge.plan.formulas` (derivations there). This module checks
the request, searches layouts (PP x DP chips, EP inside DP, ZeRO stage, recompute) and
picks the one with the least estimated overhead among those that fit in HBM:

    overhead = recompute FLOPs + pipeline bubble + exposed communication

(communication = expert all-to-all + data-parallel gradient/weight sync, exposed when
it takes longer than the step's compute; see `formulas.dp_sync_bytes`). These overheads
are what the MFU has to absorb; the chip-hours themselves follow from MFU alone.
With --days the chip count is the multiple of 8, 16, 32, ... chips (at least enough
for the compute) that minimises chips x (1 + overhead) among counts where a layout fits.
"""

from __future__ import annotations

import math
from typing import Any

from moeforge.config import ModelConfig
from moeforge.plan import formulas as F
from moeforge.plan.catalog import Chip

MAX_TOKENS = 1e16  # 10,000T tokens: far beyond any run; larger is a typo
MAX_CHIPS = 10_000_000
NODE = 8  # chips are planned in whole 8-chip nodes when derived from --days


def check_number(name: str, value: float | None, low: float, high: float, *, low_open: bool = True) -> None:
    """ValueError unless low < value <= high (low <= value when not low_open)."""
    if value is None:
        return
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{name} must be a number (got nan)")
    bad_low = value <= low if low_open else value < low
    if bad_low or value > high:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"{name} must be {lo} and <= {high:g} (got {value:g})")


def _pow2_divisors(n: int, cap: int) -> list[int]:
    out, k = [], 1
    while k <= min(n, cap):
        if n % k == 0:
            out.append(k)
        k *= 2
    return out


def evaluate_layout(cfg: ModelConfig, chip: Chip, n: int, pp: int, ep: int, zero: int, recompute: str, *,
                    stage_list: list[F.Stage], seq_len: int, micro_batch: int, global_batch: int, imbalance: float,
                    usable: float, flops_per_token: float, peak: float, mfu: float,
                    dispatch_bytes: float) -> dict[str, Any] | None:
    """Memory, overheads and communication of one layout; None if the layout is impossible."""
    dp = n // pp
    if n % pp or dp % ep or global_batch < dp * micro_batch:
        return None
    micro_tokens = micro_batch * seq_len
    worst = None
    for st in stage_list:
        states = F.state_bytes(st, dp, ep, zero)
        act = F.activation_bytes(cfg, st, recompute, micro_tokens, imbalance)
        total = sum(v["dense"] + v["expert"] for v in states.values()) + act
        if worst is None or total > worst[0]:
            worst = (total, st, states, act)
    total, st, states, act = worst
    micro_batches = global_batch // (dp * micro_batch)
    tokens_per_rank = global_batch * seq_len / dp
    compute_s = tokens_per_rank * flops_per_token / pp / (peak * 1e12 * mfu)
    moe_layers = max(s.moe_layers for s in stage_list)
    a2a = tokens_per_rank * moe_layers * F.all_to_all_bytes_per_token_layer(cfg, ep, dispatch_bytes)
    up, dom, out = chip.get("scale_up_gbps"), chip.get("scale_up_domain"), chip.get("scale_out_gbps")
    link = F.link_bytes_per_s(ep, up, dom, out)
    sync = max(F.dp_sync_bytes(s, dp, ep, zero) for s in stage_list)
    sync_link = F.link_bytes_per_s(dp, up, dom, out)
    a2a_s = 0.0 if a2a == 0 else (float("inf") if link is None else a2a / link)
    sync_s = 0.0 if sync == 0 else (float("inf") if sync_link is None else sync / sync_link)
    comm_s = a2a_s + sync_s
    exposed = 0.0 if comm_s <= compute_s else (comm_s - compute_s) / compute_s
    over = {
        "recompute": F.recompute_overhead(cfg, recompute, flops_per_token),
        "pipeline_bubble": F.pipeline_bubble(pp, micro_batches),
        "exposed_communication": exposed,
    }
    return {
        "layout": {"dp": dp, "pp": pp, "ep": ep, "expert_dp": dp // ep, "zero": zero, "recompute": recompute,
                   "micro_batch": micro_batch, "micro_batches_per_step": micro_batches, "global_batch": global_batch},
        "fits": total <= usable,
        "memory_bytes": total,
        "heaviest_stage": st.index,
        "states": states,
        "activations_bytes": act,
        "overheads": over,
        "overhead": sum(over.values()),
        "all_to_all": {
            "bytes_per_step_per_chip": a2a,
            "link": "none" if ep == 1 else ("scale-up" if ep <= (dom or 0) else "scale-out"),
            "link_gb_per_s": None if link is None or ep == 1 else link / F.GB,
            "seconds_per_step": a2a_s,
            "dp_sync_bytes_per_step_per_chip": sync,
            "dp_sync_seconds_per_step": sync_s,
            "compute_seconds_per_step": compute_s,
            "hidden": comm_s <= compute_s,
        },
    }


def search_layouts(cfg: ModelConfig, chip: Chip, n: int, fixed: dict[str, Any], **kw: Any) -> tuple[dict | None, dict | None]:
    """(best fitting layout, the smallest-memory layout) over PP, EP, ZeRO, recompute at `n` chips."""
    m = cfg.moe
    experts = m.n_routed_experts if cfg.num_moe_layers else 1
    pps = [fixed["pp"]] if fixed.get("pp") else _pow2_divisors(n, min(cfg.num_layers, 64))
    zeros = [fixed["zero"]] if fixed.get("zero") is not None else [0, 1, 2, 3]
    recs = [fixed["recompute"]] if fixed.get("recompute") else list(F.RECOMPUTE)
    best = smallest = None
    for pp in pps:
        if n % pp:
            continue
        stage_list = F.stages(cfg, pp)
        eps = [fixed["ep"]] if fixed.get("ep") else [e for e in _pow2_divisors(n // pp, experts) if experts % e == 0]
        for ep in eps:
            for zero in zeros:
                for rec in recs:
                    r = evaluate_layout(cfg, chip, n, pp, ep, zero, rec, stage_list=stage_list, **kw)
                    if r is None:
                        continue
                    if smallest is None or r["memory_bytes"] < smallest["memory_bytes"]:
                        smallest = r
                    if r["fits"] and (best is None or (r["overhead"], r["memory_bytes"]) < (best["overhead"],
                                                                                             best["memory_bytes"])):
                        best = r
    return best, smallest


def plan_train(cfg: ModelConfig, chip: Chip, tokens: float, *, chips: int | None = None, days: float | None = None,
               precision: str = "bf16", mfu: float | None = None, chip_hours: float | None = None,
               seq_len: int = 4096, global_batch: int = 15360, micro_batch: int = 1, pp: int | None = None,
               ep: int | None = None, zero: int | None = None, recompute: str | None = None,
               imbalance: float = 1.25, reserve: float = 0.10, pue: float = 1.0, price: float | None = None,
               default_mfu: float = 0.35) -> dict[str, Any]:
    """The whole training plan as a JSON-ready dict (keys documented in docs/planning.md)."""
    check_number("--tokens", tokens, 0, MAX_TOKENS)
    check_number("--chips", chips, 0, MAX_CHIPS)
    check_number("--days", days, 0, 3650)
    check_number("--mfu", mfu, 0, 1)
    check_number("--chip-hours", chip_hours, 0, 1e12)
    check_number("--seq-len", seq_len, 0, 10_000_000)
    check_number("--global-batch", global_batch, 0, 1e9)
    check_number("--micro-batch", micro_batch, 0, 1e6)
    check_number("--imbalance", imbalance, 1.0, 100, low_open=False)
    check_number("--reserve", reserve, 0, 0.9, low_open=False)
    check_number("--pue", pue, 1.0, 5, low_open=False)
    check_number("--price", price, 0, 1e6, low_open=False)
    check_number("--zero", zero, 0, 3, low_open=False)
    if recompute is not None and recompute not in F.RECOMPUTE:
        raise ValueError(f"--recompute must be one of {', '.join(F.RECOMPUTE)} (got {recompute!r})")
    for name, v in (("--chips", chips), ("--seq-len", seq_len), ("--global-batch", global_batch),
                    ("--micro-batch", micro_batch), ("--pp", pp), ("--ep", ep)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer (got {v!r})")
    if chips is not None and days is not None:
        raise ValueError("give either --chips N or --days D, not both")
    if chips is None and days is None:
        raise ValueError("give --chips N (to get the days) or --days D (to get the chips)")
    if chip_hours is not None and (chips is None or mfu is not None):
        raise ValueError("--chip-hours H goes with --chips N and without --mfu: it reports the implied MFU")
    if pp is not None and pp > cfg.num_layers:
        raise ValueError(f"--pp {pp} exceeds the model's {cfg.num_layers} layers")
    if ep is not None and cfg.num_moe_layers and cfg.moe.n_routed_experts % ep:
        raise ValueError(f"--ep {ep} must divide n_routed_experts = {cfg.moe.n_routed_experts}")

    peak = chip.require_precision(precision, "train")
    n = F.model_numbers(cfg)
    fpt = F.train_flops_per_token(cfg, seq_len)
    total_flops = tokens * fpt
    if chip_hours is not None:
        mfu = F.implied_mfu(total_flops, peak, chip_hours)
        mfu_source = f"implied by --chip-hours {chip_hours:g} on {chips} chips"
    else:
        mfu_source = "given" if mfu is not None else "default (DeepSeek-V3 reached ~0.37 of BF16 peak)"
        mfu = default_mfu if mfu is None else mfu
        chip_hours = F.chip_hours(total_flops, peak, mfu)
    usable = chip.get("hbm_gb") * F.GB * (1 - reserve)
    dispatch_bytes = 1.0 if precision in ("fp8", "fp4") else 2.0
    kw = {"seq_len": seq_len, "micro_batch": micro_batch, "global_batch": global_batch, "imbalance": imbalance,
          "usable": usable, "flops_per_token": fpt, "peak": peak, "mfu": mfu, "dispatch_bytes": dispatch_bytes}
    fixed = {"pp": pp, "ep": ep, "zero": zero, "recompute": recompute}
    notes = []
    if chips is not None:
        n_chips = chips
        best, smallest = search_layouts(cfg, chip, n_chips, fixed, **kw)
    else:
        needed = chip_hours / (days * 24)
        best, n_chips, score = None, None, float("inf")
        g = NODE
        while g <= MAX_CHIPS and (g <= 2 * needed or best is None):
            n_try = max(g, math.ceil(needed / g) * g)
            b, _ = search_layouts(cfg, chip, n_try, fixed, **kw)
            if b is not None and n_try * (1 + b["overhead"]) < score:
                best, n_chips, score = b, n_try, n_try * (1 + b["overhead"])
            g *= 2
        first = max(NODE, math.ceil(needed / NODE) * NODE)
        if best is None:
            n_chips = first
            best, smallest = search_layouts(cfg, chip, n_chips, fixed, **kw)
        else:
            smallest = None
            if n_chips > 2 * first:
                notes.append(f"memory, not compute, sets the chip count: {first:,} chips would finish in time "
                             f"but the first count where a layout fits is {n_chips:,}")
    chosen = best or smallest
    fits = best is not None
    if chosen is None:
        raise ValueError(f"no parallel layout exists for {n_chips} chips with these constraints (global batch "
                         f"{global_batch} sequences must cover DP x micro-batch; --pp / --ep must divide the chips)")
    if not fits:
        notes.append(f"does not fit: the smallest layout needs {chosen['memory_bytes'] / F.GB:.1f} GB per chip, "
                     f"{usable / F.GB:.1f} GB usable; add chips or loosen --pp/--ep/--zero/--recompute")
    run_days = chip_hours / n_chips / 24
    tdp = chip.get("tdp_w")
    price = price if price is not None else chip.get("usd_per_hour")
    energy = F.energy_mwh(chip_hours, tdp, pue)
    table = _memory_table(chosen, usable, chip.get("hbm_gb"))
    return {
        "model": cfg.name,
        "hardware": chip.name,
        "precision": precision,
        "tokens": tokens,
        "seq_len": seq_len,
        "total_params": n["total_params"],
        "active_params": n["active_params"],
        "total_params_with_mtp": n["total_params_with_mtp"],
        "active_params_with_mtp": n["active_params_with_mtp"],
        "flops_per_token": fpt,
        "train_flops": total_flops,
        "peak_tflops": peak,
        "mfu": mfu,
        "mfu_source": mfu_source,
        "chip_hours": chip_hours,
        "chips": n_chips,
        "days": run_days,
        "memory_per_chip_gb": chosen["memory_bytes"] / F.GB,
        "usable_hbm_gb": usable / F.GB,
        "hbm_gb": chip.get("hbm_gb"),
        "fits": fits,
        "layout": chosen["layout"],
        "heaviest_stage": chosen["heaviest_stage"],
        "memory_table": table,
        "overheads": chosen["overheads"],
        "all_to_all": chosen["all_to_all"],
        "energy_mwh": energy,
        "usd_per_chip_hour": price,
        "cost_usd": None if price is None else chip_hours * price,
        "notes": notes,
        "assumptions": _assumptions(chip, precision, mfu, mfu_source, seq_len, imbalance, reserve, pue, price,
                                    dispatch_bytes),
    }


def _memory_table(r: dict[str, Any], usable: float, hbm_gb: float) -> list[dict[str, Any]]:
    lay = r["layout"]
    shard = {"weights": 3, "gradients": 2, "master": 1, "optimizer": 1}
    rows = []
    for kind, parts in r["states"].items():
        z = lay["zero"] >= shard[kind]
        how = (f"dense / DP{lay['dp']}, experts / EP{lay['ep']} / {lay['expert_dp']}" if z
               else f"dense replicated, experts / EP{lay['ep']}")
        rows.append({"component": kind, "dense_gb": parts["dense"] / F.GB, "expert_gb": parts["expert"] / F.GB,
                     "total_gb": (parts["dense"] + parts["expert"]) / F.GB, "sharding": how})
    rows.append({"component": "activations", "dense_gb": None, "expert_gb": None,
                 "total_gb": r["activations_bytes"] / F.GB,
                 "sharding": f"recompute {lay['recompute']}, micro-batch {lay['micro_batch']}"})
    rows.append({"component": "total", "dense_gb": None, "expert_gb": None, "total_gb": r["memory_bytes"] / F.GB,
                 "sharding": f"usable {usable / F.GB:.1f} of {hbm_gb:g} GB"})
    return rows


def _assumptions(chip: Chip, precision: str, mfu: float, mfu_source: str, seq_len: int, imbalance: float,
                 reserve: float, pue: float, price: float | None, dispatch_bytes: float) -> list[str]:
    rng = chip.ranges.get(f"{precision}_tflops")
    peak_src = chip.sources.get(f"{precision}_tflops", "")
    return [
        f"peak {chip.tflops(precision):g} TFLOPS dense {precision.upper()} on {chip.name}"
        + (f" (sources range {rng[0]:g}-{rng[1]:g}; using {chip.tflops(precision):g})" if rng else "")
        + f" [{peak_src}]",
        f"MFU {mfu:.3f} ({mfu_source}); FLOPs = 3 x forward, main model + MTP, causal attention at seq {seq_len}",
        ("memory: TOTAL params (all experts + MTP) x (bf16 weight 2 B + fp32 grad 4 B + fp32 master 4 B "
        "+ AdamW fp32 moments 8 B), split by PP stage, EP (routed experts) and the ZeRO stage"),
        (f"activations: bf16, 1F1B schedule (first stage holds PP micro-batches), expert-imbalance x{imbalance:g} "
        "on routed-expert activations; fused head + cross-entropy (no full logits)"),
        f"usable HBM = {1 - reserve:.0%} of capacity (allocator, communication buffers, runtime)",
        (f"all-to-all: dispatch {dispatch_bytes:g} B + combine 2 B per value, forward + backward, no node-limited "
        "dedup (upper bound); hidden if it takes no longer than the step's compute (full overlap)"),
        f"energy at TDP x PUE {pue:g}; cost at " + (f"${price:g}/chip-hour" if price is not None else "no price (--price)"),
    ]
