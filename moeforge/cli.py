"""`moeforge` command line: thin parsing over the library.

User errors (ValueError, missing files) print one line `moeforge: error: ...` and exit 2;
no traceback. Set MOEFORGE_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moeforge.config import PRESETS, ModelConfig, get_preset, load_config


def _config_from_args(args: argparse.Namespace) -> ModelConfig:
    if args.preset and args.config:
        raise ValueError("give either --preset or --config, not both")
    if args.config:
        return load_config(args.config)
    return get_preset(args.preset or "tiny")


def cmd_info(args: argparse.Namespace) -> None:
    from moeforge.accounting import print_summary, summarize

    cfg = _config_from_args(args)
    summary = summarize(cfg, context=args.context)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)


def cmd_doctor(args: argparse.Namespace) -> None:
    from moeforge.device import doctor_report, print_doctor

    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_doctor(report)


def cmd_convert(args: argparse.Namespace) -> None:
    from moeforge.interop.convert import convert_from_hf, convert_to_hf

    if bool(args.from_hf) == bool(args.to_hf):
        raise ValueError("give exactly one of --from-hf DIR or --to-hf DIR")
    if args.from_hf:
        out = convert_from_hf(args.from_hf, args.out)
    else:
        out = convert_to_hf(args.to_hf, args.out)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeforge", description="DeepSeek-family MoE models on any accelerator")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, FLOPs and KV-cache size of a model config")
    info.add_argument("--preset", choices=None, help=f"one of: {', '.join(PRESETS)}")
    info.add_argument("--config", help="a moeforge or HF config.json (or a checkpoint folder)")
    info.add_argument("--context", type=int, default=4096, help="context length for decode FLOPs (default 4096)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    doctor = sub.add_parser("doctor", help="what this machine's PyTorch can do")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    conv = sub.add_parser("convert", help="convert checkpoints between HF and moeforge formats")
    conv.add_argument("--from-hf", metavar="DIR", help="HF DeepseekV3/V2 checkpoint folder to read")
    conv.add_argument("--to-hf", metavar="DIR", help="moeforge checkpoint folder to write as HF")
    conv.add_argument("--out", required=True, metavar="DIR", help="output folder")
    conv.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        if os.environ.get("MOEFORGE_DEBUG"):
            raise
        print(f"moeforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
