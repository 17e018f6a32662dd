"""Chunked prefill: how long does a running stream stall while a long prompt is prefilled?

One stream decodes while a long prompt arrives; the engine steps until the long prompt has its
first token. Prints, per `prefill_chunk`, the worst step time the running stream saw (its largest
gap between two tokens) and the long prompt's time to first token. Tiny preset, random weights
(the speed does not depend on them), fp32.

    python benchmarks/prefill_chunk.py [--prompt 4000 --chunks 0 512 256]
"""

from __future__ import annotations

import argparse
import json
import time

import moeforge  # noqa: F401 - first: MKL's fast fp32 kernels on AMD CPUs (moeforge._mkl)

# isort: split
import torch

from moeforge.config import get_preset
from moeforge.device import tune_host_memory
from moeforge.infer.engine import Engine, SamplingParams
from moeforge.model.transformer import Transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=4000, help="long prompt length in tokens")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256], help="prefill_chunk values (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps({"host_memory": tune_host_memory()}))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(max_position_embeddings=args.prompt + 512)
    model = Transformer(cfg).eval()
    long = torch.randint(2, cfg.vocab_size, (args.prompt,)).tolist()
    for chunk in args.chunks:
        eng = Engine(model, max_batch=2, prefill_chunk=chunk or None)
        running = eng.submit([5, 6, 7], SamplingParams(max_tokens=args.prompt, temperature=0, ignore_eos=True))
        for _ in range(5):
            eng.step()
        req = eng.submit(long, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        gaps, t0 = [], time.perf_counter()
        while not req.output:
            t = time.perf_counter()
            eng.step()
            gaps.append(time.perf_counter() - t)
        assert not running.finished
        print(json.dumps({"bench": "prefill_chunk", "prefill_chunk": chunk, "prompt_tokens": args.prompt,
                          "steps": len(gaps), "worst_gap_ms": round(max(gaps) * 1e3, 1),
                          "long_prompt_ttft_s": round(time.perf_counter() - t0, 3)}), flush=True)


if __name__ == "__main__":
    main()
