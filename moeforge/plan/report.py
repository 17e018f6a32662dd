"""Rich tables for the plans, with the assumptions printed under each."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from moeforge.accounting import human


def _f(v: float | None, fmt: str = ",.1f", none: str = "n/a") -> str:
    return none if v is None else format(v, fmt)


def _assumptions(console: Console, plan: dict[str, Any]) -> None:
    for note in plan.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print("[bold]assumptions[/bold]")
    for a in plan.get("assumptions", []):
        console.print(f"[dim]- {a}[/dim]")


def print_train(p: dict[str, Any], console: Console | None = None) -> None:
    c = console or Console()
    lay = p["layout"]
    t = Table(title=f"plan train: {p['model']} on {p['hardware']} ({p['precision']})", title_justify="left",
              show_header=False)
    t.add_column("item")
    t.add_column("value")
    t.add_row("parameters", f"{human(p['total_params'])} total / {human(p['active_params'])} active "
                            f"(with MTP {human(p['total_params_with_mtp'])} / {human(p['active_params_with_mtp'])})")
    t.add_row("tokens", f"{p['tokens'] / 1e12:,.3g}T at seq_len {p['seq_len']:,}")
    t.add_row("FLOPs", f"{human(p['flops_per_token'], 'FLOP')}/token, {p['train_flops']:.3e} total")
    t.add_row("MFU", f"{p['mfu']:.3f} ({p['mfu_source']})")
    t.add_row("chip-hours", f"{p['chip_hours']:,.0f}")
    t.add_row("chips x days", f"{p['chips']:,} chips x {p['days']:,.1f} days")
    fit = "[green]fits[/green]" if p["fits"] else "[red]does not fit[/red]"
    t.add_row("layout", f"DP{lay['dp']} x PP{lay['pp']} (EP{lay['ep']} inside DP, expert-DP {lay['expert_dp']}), "
                        f"ZeRO-{lay['zero']}, recompute {lay['recompute']}, micro-batch {lay['micro_batch']} x "
                        f"{lay['micro_batches_per_step']} per step (global {lay['global_batch']:,} sequences)")
    t.add_row("memory per chip", f"{p['memory_per_chip_gb']:.1f} GB of {p['usable_hbm_gb']:.1f} GB usable: {fit}")
    o = p["overheads"]
    t.add_row("overheads (MFU absorbs)", ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in o.items()))
    a = p["all_to_all"]
    link = "" if a["link"] == "none" else f" over {a['link']} {a['link_gb_per_s']:g} GB/s"
    t.add_row("all-to-all per step", f"{a['bytes_per_step_per_chip'] / 1e9:,.1f} GB/chip{link}: "
                                     f"{a['seconds_per_step']:.2f} s; DP sync {a['dp_sync_bytes_per_step_per_chip'] / 1e9:,.1f}"
                                     f" GB: {a['dp_sync_seconds_per_step']:.2f} s; compute {a['compute_seconds_per_step']:.2f} s"
                                     f" -> {'hidden' if a['hidden'] else '[red]exposed[/red]'}")
    t.add_row("energy", f"{_f(p['energy_mwh'])} MWh")
    t.add_row("cost", "n/a (--price)" if p["cost_usd"] is None else f"${p['cost_usd']:,.0f} at ${p['usd_per_chip_hour']:g}/chip-hour")
    c.print(t)
    m = Table(title=f"memory per chip, heaviest pipeline stage (stage {p['heaviest_stage']})", title_justify="left")
    for col in ("component", "dense GB", "experts GB", "total GB", "sharding"):
        m.add_column(col, justify="left" if col in ("component", "sharding") else "right")
    for row in p["memory_table"]:
        m.add_row(row["component"], _f(row["dense_gb"], ",.2f", ""), _f(row["expert_gb"], ",.2f", ""),
                  _f(row["total_gb"], ",.2f"), row["sharding"])
    c.print(m)
    _assumptions(c, p)


def print_serve(p: dict[str, Any], console: Console | None = None) -> None:
    c = console or Console()
    t = Table(title=f"plan serve: {p['model']} on {p['hardware']} (weights {p['weight_precision']}, "
                    f"KV {p['kv_precision']})", title_justify="left", show_header=False)
    t.add_column("item")
    t.add_column("value")
    t.add_row("parameters", f"{human(p['total_params'])} total / {human(p['active_params'])} active")
    t.add_row("weights", f"{p['weights_gb']:,.1f} GB")
    t.add_row("KV cache", f"{p['kv_bytes_per_token']:,.0f} B/token ({p['kv_cache_layout']}); "
                          f"{p['kv_gb_per_sequence']:,.2f} GB per {p['context']:,}-token sequence, "
                          f"{p['kv_gb_total']:,.1f} GB for {p['concurrency']:,}")
    t.add_row("chips", f"{p['chips']:,} (needed {p['chips_needed']:,}; weights alone {p['chips_for_weights']:,}; "
                       f"{p['usable_hbm_gb']:.1f} GB usable each)")
    t.add_row("max concurrency", f"{p['max_concurrency']:,} sequences of {p['context']:,} tokens")
    t.add_row("decode bound", f"{p['decode_tokens_per_s_bound']:,.0f} tokens/s at batch {p['decode_batch']} "
                              f"({p['decode_tokens_per_s_per_sequence']:,.1f} per sequence, {p['decode_bound']}-bound, "
                              f"{p['decode_step_ms']:.1f} ms/step)")
    t.add_row("bytes per token (1 sequence)", f"{p['bytes_read_per_token_single_sequence'] / 1e9:,.2f} GB")
    t.add_row("prefill bound", f"{p['prefill_tokens_per_s_bound']:,.0f} tokens/s "
                               f"({p['prefill_seconds_full_context']:.2f} s for a {p['context']:,}-token prompt)")
    d = p["dense_equivalent"]
    t.add_row("dense model, same total size", f"{d['decode_tokens_per_s_bound']:,.0f} tokens/s: MoE is "
                                              f"{d['sparsity_dividend']:.2f}x at this batch, "
                                              f"{d['single_sequence_dividend']:.1f}x for one sequence")
    c.print(t)
    _assumptions(c, p)


def print_compare(r: dict[str, Any], console: Console | None = None) -> None:
    c = console or Console()
    train = r["kind"] == "train"
    title = (f"plan compare: train {r['model']} on {r['tokens'] / 1e12:g}T tokens in {r['days']:g} days" if train
             else f"plan compare: serve {r['model']}, {r['concurrency']} x {r['context']:,}-token sequences")
    t = Table(title=title, title_justify="left")
    cols = (("chip", "chips", "chip-hours", "HBM TB", "MWh", "GB/chip", "layout", "dense chips", "dividend")
            if train else
            ("chip", "chips", "weights GB/chip", "max conc.", "decode tok/s", "prefill tok/s", "dividend"))
    for col in cols:
        t.add_column(col, justify="left" if col in ("chip", "layout") else "right", no_wrap=col == "chip")
    for row in r["rows"]:
        name = row["hardware"] + ("*" if row.get("estimated") else "")
        if "error" in row:
            t.add_row(name, f"[red]{row['error']}[/red]")
            continue
        if train:
            lay = row["layout"]
            t.add_row(name, f"{row['chips']:,}", human(row["chip_hours"]),
                      f"{row['total_hbm_tb']:,.0f}", _f(row["energy_mwh"], ",.0f"),
                      f"{row['memory_per_chip_gb']:.0f}" + ("" if row["fits"] else " [red]!fit[/red]"),
                      f"PP{lay['pp']} EP{lay['ep']} Z{lay['zero']} {lay['recompute'][:3]}",
                      human(row["dense_chips"]), f"{row['sparsity_dividend']:.1f}x")
        else:
            t.add_row(name, f"{row['chips']:,}", f"{row['weights_gb_per_chip']:,.1f}", f"{row['max_concurrency']:,}",
                      f"{row['decode_tokens_per_s_bound']:,.0f}", f"{row['prefill_tokens_per_s_bound']:,.0f}",
                      f"{row['sparsity_dividend']:.2f}x")
    c.print(t)
    vr = r["vendor_ratios"]
    if vr:
        a_names = list(dict.fromkeys(x["a"] for x in vr))
        b_names = list(dict.fromkeys(x["b"] for x in vr))
        v = Table(title="chips of column per chip of row (vendor pairs)", title_justify="left")
        v.add_column("")
        for b in b_names:
            v.add_column(b, justify="right")
        lookup = {(x["a"], x["b"]): x["ratio"] for x in vr}
        for a in a_names:
            v.add_row(a, *[_f(lookup.get((a, b)), ".2f", "") for b in b_names])
        c.print(v)
    c.print("[bold]assumptions[/bold]")
    notes = [
        "each chip's row is its own plan (see `moeforge plan train/serve --hardware NAME` for the details)",
        "dividend: what a dense model of the same TOTAL size needs over what this MoE needs "
        + ("(chip-hours, same chip and MFU)" if train else "(decode step time at the same batch)"),
        "* = some figures of that chip are estimates (see moeforge/plan/hardware.json)",
        "layout: PP pipeline stages, EP expert-parallel degree, Z ZeRO stage, activation recompute (DP = chips / PP)",
    ]
    for n in notes:
        c.print(f"[dim]- {n}[/dim]")
