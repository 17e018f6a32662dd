"""Decode benchmark: moeforge's engine vs HF `generate` on the same converted weights.

Measures, in one run and one dtype:
  1. batch-1 greedy decode tokens/s, ours (eager engine, and with `compile=True`: torch.compile'd
     decode step) vs HF DeepseekV3 `generate` (same prompt, same tokens);
  2. cache bytes per token: ours (latent + rotary key) vs the formula L * (C + R) * bytes, and HF's
     (per-head K and V, measured from its cache after generate);
  3. time per decoded token at 1K and 4K tokens of context, ours vs HF (random weights: the speed
     does not depend on them);
  4. MTP self-speculative decoding vs plain greedy on a trained checkpoint, eager and compiled, with
     1, 2 and 3 drafts per step (--draft-tokens): speedup, acceptance per draft position, and whether
     the outputs are identical.

Compiled engines are built once and reused (their first calls compile, outside the timings).
A DeepSeek-V4 checkpoint gets measurements 1 and 4 against HF DeepseekV4 `generate` (its compiled
engine compiles the cache-free parts of each block: V4Transformer.compile_stateless); its cache and
long-context figures are in benchmarks/v4_attention.py.

    python benchmarks/decode.py --ckpt runs/demo/checkpoints/step_0000300 [--dtype float32|bfloat16]

Without --ckpt a tiny model is trained first (`moeforge train`, a few minutes). Prints JSON
lines and a short table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import moeforge  # noqa: F401 - first: MKL's fast fp32 kernels on AMD CPUs (moeforge._mkl)

# isort: split
import torch

from moeforge.device import tune_host_memory
from moeforge.infer.engine import Engine, SamplingParams
from moeforge.interop.convert import convert_to_hf
from moeforge.model.checkpoint import load_model, save_model
from moeforge.model.transformer import Transformer


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ours_greedy(model, prompt: list[int], n: int, speculative: bool = False,
                engine: Engine | None = None) -> tuple[list[int], Engine]:
    eng = engine or Engine(model, max_batch=1, max_len=len(prompt) + n + 1, speculative=speculative)
    req = eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    return req.output, eng


def hf_greedy(hf, prompt: list[int], n: int):
    ids = torch.tensor([prompt])
    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0, return_dict_in_generate=True)


def load_hf(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def emit(rows: list[dict], **row) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="trained moeforge checkpoint with MTP (default: train one)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded per measurement")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3], help="MTP drafts per step to measure")
    args = ap.parse_args()
    # as the CLI does (MOEFORGE_KEEP_FREED_MEMORY=0, THP_MEM_ALLOC_ENABLE=0 measure without); all candidates alike
    print(json.dumps({"host_memory": tune_host_memory()}))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="mf-decode-"))
    ckpt = args.ckpt
    if ckpt is None:
        ckpt = str(tmp / "run")
        subprocess.run([sys.executable, "-m", "moeforge", "train", "--preset", "tiny", "--out", ckpt, "--steps", "300",
                        "--max-bytes", "8000000", "--samples", "0"], check=True)
    model = load_model(ckpt, device="cpu", dtype=dtype)
    v4 = model.cfg.v4 is not None
    hf = load_hf(convert_to_hf(ckpt, tmp / "hf"), dtype)
    prompt = list(range(10, 42))
    n = args.tokens

    # 1. batch-1 decode tokens/s, same weights, same greedy settings
    compiled = Engine(model, max_batch=1, max_len=1024, compile=True)
    for m in (16, 48, 8):  # compile, and let the context length become a symbolic size
        ours_greedy(model, prompt, m, engine=compiled)
    ours_greedy(model, prompt, 8), hf_greedy(hf, prompt, 8)  # warm-up
    out_ours = ours_greedy(model, prompt, n)[0]
    hf_out = hf_greedy(hf, prompt, n)
    t_ours = timed(lambda: ours_greedy(model, prompt, n))
    t_hf = timed(lambda: hf_greedy(hf, prompt, n))
    same = sum(a == b for a, b in zip(out_ours, hf_out.sequences[0, len(prompt):].tolist())) / n
    emit(rows, metric="decode_tokens_per_s_batch1", dtype=args.dtype, tokens=n, ours=round(n / t_ours, 1),
         hf=round(n / t_hf, 1), ratio=round(t_hf / t_ours, 2), same_tokens_fraction=round(same, 3))
    t_comp = timed(lambda: ours_greedy(model, prompt, n, engine=compiled))
    same_compiled = ours_greedy(model, prompt, n, engine=compiled)[0] == out_ours
    emit(rows, metric="decode_tokens_per_s_batch1_compiled", dtype=args.dtype, tokens=n,
         ours=round(n / t_comp, 1), hf=round(n / t_hf, 1), ratio=round(t_hf / t_comp, 2),
         same_as_eager=same_compiled)
    if not v4:
        v3_cache_and_context(args, rows, model, hf_out, dtype, tmp)
    mtp_speculation(args, rows, model, n)
    print_table(rows)


def v3_cache_and_context(args, rows: list[dict], model, hf_out, dtype: torch.dtype, tmp: Path) -> None:
    """Measurements 2 and 3 (V3 family): cache bytes per token, and time per token at long context."""

    # 2. cache bytes per token
    cfg = model.cfg
    a = cfg.attention
    ebytes = torch.tensor([], dtype=dtype).element_size()
    formula = cfg.num_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * ebytes
    eng = Engine(model, max_batch=1)
    hf_cache = hf_out.past_key_values
    total = 0
    for layer in hf_cache.layers:
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    hf_tokens = hf_cache.get_seq_length()
    emit(rows, metric="cache_bytes_per_token", dtype=args.dtype, ours=eng.cache.bytes_per_token, formula=formula,
         hf=total // hf_tokens, ratio=round(total / hf_tokens / formula, 2))
    del eng

    # 3. per-token decode time at long context (random weights, context extended)
    long_cfg = cfg.replace(max_position_embeddings=max(args.contexts) + 64)
    torch.manual_seed(0)
    save_model(Transformer(long_cfg), tmp / "long")
    long_model = load_model(tmp / "long", device="cpu", dtype=dtype)
    long_hf = load_hf(convert_to_hf(tmp / "long", tmp / "long_hf"), dtype)
    steps = 32
    for ctx in args.contexts:
        p = torch.randint(2, cfg.vocab_size, (ctx,)).tolist()
        ours = (timed(lambda p=p, m=long_model: ours_greedy(m, p, steps + 1), 2)
                - timed(lambda p=p, m=long_model: ours_greedy(m, p, 1), 2)) / steps
        theirs = (timed(lambda p=p, m=long_hf: hf_greedy(m, p, steps + 1), 2)
                  - timed(lambda p=p, m=long_hf: hf_greedy(m, p, 1), 2)) / steps
        emit(rows, metric="decode_ms_per_token_at_context", dtype=args.dtype, context=ctx,
             ours=round(ours * 1e3, 2), hf=round(theirs * 1e3, 2), ratio=round(theirs / ours, 2))
    del long_model, long_hf


def mtp_speculation(args, rows: list[dict], model, n: int) -> None:
    """Measurement 4: MTP self-speculative decoding on the trained model, 1..K drafts per step."""
    if len(model.mtp):
        prompts = [list(range(10, 42)), [50, 60, 70, 80], list(range(200, 216))]
        for comp in (False, True):
            plain_eng = Engine(model, max_batch=1, max_len=1024, compile=comp)
            for p in prompts:  # warm-up (compiles)
                for m in (16, 48):
                    ours_greedy(model, p, m, engine=plain_eng)
            plain_out = {tuple(p): ours_greedy(model, p, n, engine=plain_eng)[0] for p in prompts}
            for k in args.draft_tokens:
                spec_eng = Engine(model, max_batch=1, max_len=1024, compile=comp, speculative=True, draft_tokens=k)
                for p in prompts:
                    for m in (16, 48):
                        ours_greedy(model, p, m, engine=spec_eng)
                spec_eng.stats = spec_eng._new_stats()
                plain_t = spec_t = 0.0
                same = True
                for p in prompts:  # alternate plain and speculative runs
                    same &= ours_greedy(model, p, n, engine=spec_eng)[0] == plain_out[tuple(p)]
                    plain_t += timed(lambda p=p, e=plain_eng: ours_greedy(model, p, n, engine=e))
                    spec_t += timed(lambda p=p, e=spec_eng: ours_greedy(model, p, n, engine=e))
                emit(rows, metric="mtp_speculative" + ("_compiled" if comp else ""), dtype=args.dtype,
                     draft_tokens=k, tokens=n * len(prompts),
                     plain_tokens_per_s=round(n * len(prompts) / plain_t, 1),
                     speculative_tokens_per_s=round(n * len(prompts) / spec_t, 1), speedup=round(plain_t / spec_t, 2),
                     acceptance_rate=[round(a, 3) for a in spec_eng.stats.acceptance_rate],
                     identical_greedy_output=same)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'metric':40s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}")
    for r in rows:
        name = r["metric"] + (f"@{r['context']}" if "context" in r else "") + (
            f" k={r['draft_tokens']}" if "draft_tokens" in r else "")
        if "ours" in r:
            ref = r.get("hf", r.get("formula"))
            print(f"{name:40s} {r['ours']:>10} {ref:>10} {r.get('ratio', ''):>7}")
        else:
            print(f"{name:40s} {r['speculative_tokens_per_s']:>10} {r['plain_tokens_per_s']:>10} {r['speedup']:>7}"
                  f"  (acceptance {r['acceptance_rate']})")


if __name__ == "__main__":
    main()
