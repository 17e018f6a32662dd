"""The `moeforge plan train | serve | compare` subcommands (wired into moeforge/cli.py).

Errors are ValueErrors; moeforge/cli.py prints them as one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moeforge.config import PRESETS, ModelConfig, get_preset, load_config


def model_from_arg(text: str) -> ModelConfig:
    """`--model`: a preset name or a path to a moeforge / HF config.json (or a checkpoint folder)."""
    if text in PRESETS:
        return get_preset(text)
    if Path(text).exists():
        return load_config(text)
    raise ValueError(f"--model {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config file")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_plan_train(args: argparse.Namespace) -> None:
    from moeforge.plan.catalog import get_chip
    from moeforge.plan.report import print_train
    from moeforge.plan.train import plan_train

    cfg = model_from_arg(args.model)
    chip = get_chip(args.hardware, args.hardware_file)
    plan = plan_train(cfg, chip, args.tokens, chips=args.chips, days=args.days, precision=args.precision,
                      mfu=args.mfu, chip_hours=args.chip_hours, seq_len=args.seq_len, global_batch=args.global_batch,
                      micro_batch=args.micro_batch, pp=args.pp, ep=args.ep, zero=args.zero, recompute=args.recompute,
                      imbalance=args.imbalance, reserve=args.reserve, pue=args.pue, price=args.price)
    _print_json(plan) if args.json else print_train(plan)


def cmd_plan_serve(args: argparse.Namespace) -> None:
    from moeforge.plan.catalog import get_chip
    from moeforge.plan.report import print_serve
    from moeforge.plan.serve import plan_serve

    cfg = model_from_arg(args.model)
    chip = get_chip(args.hardware, args.hardware_file)
    plan = plan_serve(cfg, chip, context=args.context, concurrency=args.concurrency,
                      weight_precision=args.weight_precision, kv_precision=args.kv_precision, chips=args.chips,
                      mfu=args.mfu, reserve=args.reserve)
    _print_json(plan) if args.json else print_serve(plan)


def cmd_plan_compare(args: argparse.Namespace) -> None:
    from moeforge.plan.catalog import load_catalog
    from moeforge.plan.compare import compare_serve, compare_train, plot_compare
    from moeforge.plan.report import print_compare

    cfg = model_from_arg(args.model)
    chips = load_catalog(args.hardware_file)
    if args.tokens is None and args.context is None:
        raise ValueError("give --tokens T --days D (training) and/or --context N [--concurrency C] (serving)")
    if args.tokens is not None and args.days is None:
        raise ValueError("the training comparison needs --days D with --tokens")
    results = []
    if args.tokens is not None:
        results.append(compare_train(cfg, chips, args.tokens, args.days, precision=args.precision,
                                     seq_len=args.seq_len, mfu=args.mfu))
    if args.context is not None:
        results.append(compare_serve(cfg, chips, context=args.context, concurrency=args.concurrency,
                                     weight_precision=args.weight_precision))
    out = Path(args.plot)
    for r in results:
        png = out if len(results) == 1 else out.with_name(f"{out.stem}_{r['kind']}{out.suffix}")
        r["plot"] = str(plot_compare(r, png))
    if args.json:
        _print_json(results[0] if len(results) == 1 else {r["kind"]: r for r in results})
        return
    for r in results:
        print_compare(r)
        print(f"wrote {r['plot']}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a config.json")
    p.add_argument("--hardware-file", metavar="JSON", help="extra chips, same shape as moeforge/plan/hardware.json")
    p.add_argument("--reserve", type=float, default=0.10, help="share of HBM kept free for the runtime (default 0.10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """Add `plan` with its `train`, `serve` and `compare` subcommands to the top-level parser."""
    plan = sub.add_parser("plan", help="capacity planning: chips, days, HBM for training and serving")
    psub = plan.add_subparsers(dest="plan_command", required=True)

    t = psub.add_parser("train", help="FLOPs, chip-hours, days or chips, and a parallel layout that fits")
    _common(t)
    t.add_argument("--hardware", required=True, help="chip name (h100, h800, h200, b200, ascend-910b, ..., cpu)")
    t.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 14.8e12")
    t.add_argument("--chips", type=int, help="number of chips (reports the days)")
    t.add_argument("--days", type=float, help="wall-clock days (reports the chips)")
    t.add_argument("--precision", default="bf16", help="bf16 | fp8 | fp4 matmul precision (default bf16)")
    t.add_argument("--mfu", type=float, help="model FLOPs utilisation (default 0.35)")
    t.add_argument("--chip-hours", type=float, help="with --chips: report the MFU these chip-hours imply")
    t.add_argument("--seq-len", type=int, default=4096)
    t.add_argument("--global-batch", type=int, default=15360, help="sequences per step (default 15360, V3's)")
    t.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    t.add_argument("--pp", type=int, help="fix the pipeline-parallel degree")
    t.add_argument("--ep", type=int, help="fix the expert-parallel degree")
    t.add_argument("--zero", type=int, help="fix the ZeRO stage (0-3)")
    t.add_argument("--recompute", help="fix activation recompute: none | selective | full")
    t.add_argument("--imbalance", type=float, default=1.25, help="busiest expert's load over the mean (default 1.25)")
    t.add_argument("--pue", type=float, default=1.0, help="facility power usage effectiveness (default 1.0)")
    t.add_argument("--price", type=float, help="$ per chip-hour (default: the catalog's, where it has one)")
    t.set_defaults(func=cmd_plan_train)

    s = psub.add_parser("serve", help="weights, KV cache, chips, concurrency, decode / prefill bounds")
    _common(s)
    s.add_argument("--hardware", required=True)
    s.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    s.add_argument("--concurrency", type=int, default=1, help="concurrent sequences (default 1)")
    s.add_argument("--weight-precision", default="bf16", help="bf16 | fp8 | fp4")
    s.add_argument("--kv-precision", default="bf16", help="bf16 | fp8")
    s.add_argument("--chips", type=int, help="plan on this many chips instead of the fewest that fit")
    s.add_argument("--mfu", type=float, default=0.4, help="utilisation for compute bounds (default 0.4)")
    s.set_defaults(func=cmd_plan_serve)

    c = psub.add_parser("compare", help="one model on every catalog chip: table and PNG bar chart")
    _common(c)
    c.add_argument("--tokens", type=float, help="training tokens (with --days)")
    c.add_argument("--days", type=float)
    c.add_argument("--precision", default="bf16")
    c.add_argument("--mfu", type=float)
    c.add_argument("--seq-len", type=int, default=4096)
    c.add_argument("--context", type=int, help="serving comparison: tokens per sequence")
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--weight-precision", default="bf16")
    c.add_argument("--plot", default="plan_compare.png", help="PNG path (default plan_compare.png; "
                                                                 "_train / _serve suffixes when both)")
    c.set_defaults(func=cmd_plan_compare)
