"""Server load benchmark: aggregate tokens/s of 8 concurrent clients vs 8 sequential ones.

Starts `moeforge serve`'s app in-process on a free loopback port and drives it with the
official `openai` client (streaming completions, greedy, a fixed number of tokens each).

    python benchmarks/serve_load.py --ckpt runs/demo/checkpoints/step_0000300 [--clients 8 --tokens 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

from moeforge.serve.app import load_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--speculative", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = load_server(args.ckpt, device="cpu", dtype=args.dtype, max_batch=args.clients, model_name="m",
                      speculative=args.speculative)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

    def one(i: int) -> int:
        stream = client.completions.create(model="m", prompt=f"def f{i}(", max_tokens=args.tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        return [c for c in stream if c.usage][-1].usage.completion_tokens

    one(0)  # warm-up
    t = time.perf_counter()
    seq = sum(one(i) for i in range(args.clients))
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        conc = sum(pool.map(one, range(args.clients)))
    t_conc = time.perf_counter() - t
    row = {"metric": "serve_aggregate_tokens_per_s", "dtype": args.dtype, "clients": args.clients,
           "tokens_each": args.tokens, "sequential": round(seq / t_seq, 1), "concurrent": round(conc / t_conc, 1),
           "ratio": round((conc / t_conc) / (seq / t_seq), 2),
           "mean_batch_size": round(app.state.worker.engine.stats.mean_batch_size, 2)}
    print(json.dumps(row))
    server.should_exit = True


if __name__ == "__main__":
    main()
