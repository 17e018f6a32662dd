"""`moeforge` command line: thin parsing over the library.

User errors (ValueError, missing files) print one line `moeforge: error: ...` and exit 2;
no traceback. Set MOEFORGE_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

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

    if sum(bool(x) for x in (args.from_hf, args.to_hf, args.consolidate)) != 1:
        raise ValueError("give exactly one of --from-hf DIR, --to-hf DIR or --consolidate DIR")
    if args.consolidate:
        from moeforge.distributed.checkpoint import consolidate

        out = consolidate(args.consolidate, args.out)
    elif args.from_hf:
        out = convert_from_hf(args.from_hf, args.out)
    else:
        out = convert_to_hf(args.to_hf, args.out)
    print(f"wrote {out}")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as sigmoid


def _add_dataclass_flags(parser: argparse.ArgumentParser, klass: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field (batch_size -> --batch-size); unset flags keep the default."""
    for f in dataclasses.fields(klass):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=_parse_value, default=None, metavar=f.name.upper())


def _dataclass_from_args(klass: type, args: argparse.Namespace, base: Any = None) -> Any:
    obj = base if base is not None else klass()
    for f in dataclasses.fields(klass):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(obj, f.name, value)
    return obj


def cmd_train(args: argparse.Namespace) -> None:
    from moeforge.data import DataConfig
    from moeforge.train.config import TrainConfig
    from moeforge.train.plots import plot_run
    from moeforge.train.trainer import Trainer

    model_cfg = _config_from_args(args)
    overrides = {}
    for item in args.override or []:
        if "=" not in item:
            raise ValueError(f"--override takes KEY=VALUE (e.g. moe.n_group=2), got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    if args.vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = args.vocab_size  # the model follows the tokenizer unless told otherwise
    data_cfg = _dataclass_from_args(DataConfig, args)
    data_cfg.paths = args.data or []
    if args.vocab_size is None and not data_cfg.tokenizer:
        data_cfg.vocab_size = model_cfg.vocab_size
    if overrides:
        model_cfg = model_cfg.replace(**overrides)
    train_cfg = _dataclass_from_args(TrainConfig, args).validate()
    if args.nproc:
        return _launch_torchrun(args.nproc)
    trainer = Trainer(model_cfg, train_cfg, data_cfg, args.out, resume=args.resume)
    summary = trainer.run()
    if trainer.parallel is not None:  # the samples below use a plain one-process model on rank 0
        import torch.distributed as dist

        dist.destroy_process_group()
        if not trainer.is_main:
            return None
        from moeforge.distributed.checkpoint import consolidate
        from moeforge.model.checkpoint import load_model

        final = consolidate(summary["checkpoint"], Path(args.out) / "final")
        trainer.console.print(f"consolidated the sharded checkpoint into {final}")
        summary["checkpoint"] = str(final)
        trainer.model = load_model(final, device=trainer.device)
    plots = plot_run(args.out)
    c = trainer.console
    c.print(f"[bold]done[/bold]: {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {summary['seconds']} s")
    if summary["val_loss"] is not None:
        entropy = summary["unigram_entropy"]
        c.print(f"final validation loss {summary['val_loss']:.4f} nats"
                + (f" vs unigram entropy {entropy:.4f} nats of the corpus" if entropy else ""))
    c.print(f"checkpoint: {summary['checkpoint']}")
    c.print("plots: " + ", ".join(str(p) for p in plots))
    if train_cfg.samples:
        from moeforge.infer.sample import generate

        tok = trainer.data.tokenizer
        gen = torch.Generator().manual_seed(train_cfg.seed)
        prompts = args.sample_prompt or ["def ", "import ", "class "]
        trainer.model.eval()
        for prompt in prompts[: train_cfg.samples]:
            ids = torch.tensor([tok.encode(prompt).ids], device=trainer.device)
            new = list(generate(trainer.model, ids, train_cfg.sample_tokens, gen, temperature=0.8, top_k=50,
                                eos_token_id=trainer.mcfg.eos_token_id))
            c.rule(f"sample: {prompt!r}")
            c.print(tok.decode(ids[0].tolist() + new), markup=False, highlight=False)


def _launch_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with nproc processes (minus --nproc)."""
    import subprocess

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1 (got {nproc})")
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "moeforge", *argv]
    rc = subprocess.call(cmd)
    if rc:
        raise ValueError(f"the {nproc}-process run failed (exit code {rc}); see the messages above")


def cmd_generate(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from moeforge.infer.engine import Engine, SamplingParams
    from moeforge.model.checkpoint import load_model
    from moeforge.train.state import checkpoints

    path = Path(args.ckpt)
    if path.is_dir() and not (path / "config.json").exists() and checkpoints(path):
        path = checkpoints(path)[0]  # a run folder: its newest checkpoint
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"{path} has no tokenizer.json; generate needs the checkpoint's tokenizer")
    tok = Tokenizer.from_file(str(tok_file))
    model = load_model(path, device=args.device)
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt is empty after tokenization; give some text with --prompt")
    engine = Engine(model, max_batch=1, tokenizer=tok, speculative=args.speculative, compile=args.compile,
                    draft_tokens=_draft_tokens(args))
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop or [])
    req = engine.submit(ids, params)
    print(args.prompt, end="", flush=True)
    while not req.finished:
        engine.step()
        print(req.new_text(hold=max((len(s) for s in params.stop), default=1) - 1), end="", flush=True)
    print()
    if args.speculative:
        rate = engine.stats.acceptance_rate
        print(f"MTP draft acceptance: {', '.join(f'{r:.2f}' for r in rate)}", file=sys.stderr)


DEFAULT_DRAFT_TOKENS = 3  # the best of 1-3 for eager decoding of the demo model (docs/benchmarks.md)


def _draft_tokens(args: argparse.Namespace) -> int:
    """--draft-tokens, defaulting to DEFAULT_DRAFT_TOKENS with --speculative (1, i.e. unused, without)."""
    if args.draft_tokens is not None:
        return args.draft_tokens
    return DEFAULT_DRAFT_TOKENS if args.speculative else 1


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from moeforge.serve.app import load_server
    except ImportError as e:
        raise ValueError(f"serving needs fastapi and uvicorn ({e}); reinstall moeforge (pip install -e .)") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        warnings.warn(f"serving on {args.host} without --api-key: anyone who can reach this port can use the model")
    app = load_server(args.ckpt, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                      max_len=args.max_len, speculative=args.speculative, draft_tokens=_draft_tokens(args),
                      compile=args.compile, prefill_chunk=args.prefill_chunk or None, api_key=args.api_key,
                      model_name=args.model_name, max_concurrent=args.max_concurrent,
                      threads="auto" if args.threads is None else args.threads)
    print(f"moeforge: serving {args.ckpt} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def cmd_plot(args: argparse.Namespace) -> None:
    from moeforge.train.plots import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")


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
    conv.add_argument("--consolidate", metavar="DIR",
                      help="sharded checkpoint of a multi-process run to write as one moeforge checkpoint")
    conv.add_argument("--out", required=True, metavar="DIR", help="output folder")
    conv.set_defaults(func=cmd_convert)

    from moeforge.data import DataConfig
    from moeforge.train.config import TrainConfig

    train = sub.add_parser("train", help="train a model (default: the tiny preset on the Python stdlib source)")
    train.add_argument("--preset", help=f"model preset, one of: {', '.join(PRESETS)} (default tiny)")
    train.add_argument("--config", help="a moeforge or HF config.json for the model")
    train.add_argument("--override", action="append", metavar="KEY=VALUE",
                       help="change a model config field, e.g. moe.n_group=2 (repeatable)")
    train.add_argument("--data", nargs="+", metavar="PATH",
                       help="text files / folders / .jsonl / .parquet (default: the Python stdlib source)")
    train.add_argument("--out", default="runs/tiny", help="run folder (default runs/tiny)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    train.add_argument("--sample-prompt", action="append", help="prompt for the samples printed at the end")
    train.add_argument("--nproc", type=int, help="launch this run under torchrun with N processes (use with --ep)")
    _add_dataclass_flags(train, TrainConfig)
    _add_dataclass_flags(train, DataConfig, skip=("paths",))
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="sample text from a checkpoint (or a run folder's newest checkpoint)")
    gen.add_argument("--ckpt", required=True, metavar="DIR")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    gen.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                     help=f"with --speculative: tokens the MTP module drafts per step (default {DEFAULT_DRAFT_TOKENS})")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step (V3 family; ~20-60 s to compile on a small CPU, then faster)")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a checkpoint (see docs/serving.md)")
    srv.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint folder (or a run folder)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    srv.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")
    srv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    srv.add_argument("--max-concurrent", type=int, default=None,
                     help="requests running or waiting before 429 (default 4 x max-batch)")
    srv.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's)")
    srv.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    srv.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                     help=f"with --speculative: tokens the MTP module drafts per step (default {DEFAULT_DRAFT_TOKENS})")
    srv.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step (compiled before the server starts listening)")
    srv.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                     help="prompt tokens prefilled per engine step, so long prompts do not stall running "
                          "streams (default 512; 0 = whole prompts at once)")
    srv.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    srv.add_argument("--device", default=None)
    srv.add_argument("--threads", type=int, default=None,
                     help="PyTorch CPU threads (default on CPU: all cores but one, left to the HTTP event loop)")
    srv.add_argument("--log-level", default="info")
    srv.set_defaults(func=cmd_serve)

    plot = sub.add_parser("plot", help="write loss.png and expert_load.png for a run folder")
    plot.add_argument("run_dir")
    plot.set_defaults(func=cmd_plot)

    from moeforge.plan.cli import add_plan_parser

    add_plan_parser(sub)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"moeforge: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    from moeforge.device import tune_host_memory

    tune_host_memory()  # before anything allocates a tensor (the huge-page setting is read then)
    from moeforge.train.trainer import TrainingAborted

    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        args.func(args)
    except (ValueError, OSError, TrainingAborted) as e:
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
