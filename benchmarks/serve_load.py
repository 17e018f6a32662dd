"""Server load benchmark: aggregate tokens/s of N concurrent clients vs N sequential ones.

Starts `moeforge serve` in its own process on a free loopback port (as it is deployed) and
drives it from this process with the official `openai` client: streaming completions, greedy,
a fixed number of tokens each. The mean decode batch of each phase comes from the server's
/metrics (decode steps and rows decoded, before and after the phase).

    python benchmarks/serve_load.py --ckpt runs/demo/checkpoints/step_0000300 [--clients 8 --tokens 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai


def scrape(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--server-args", default="", help="extra `moeforge serve` flags, e.g. '--speculative'; write it as --server-args=--compile")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moeforge", "serve", "--ckpt", args.ckpt, "--port", str(port), "--dtype", args.dtype,
           "--max-batch", str(args.clients), "--model-name", "m", "--log-level", "warning", *args.server_args.split()]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 600  # with --compile the server compiles before it listens
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"error: the server exited with code {server.returncode}")
                if time.monotonic() > deadline:
                    sys.exit("error: the server did not come up within 600 s")
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)

        def one(i: int) -> int:
            stream = client.completions.create(model="m", prompt=f"def f{i}(", max_tokens=args.tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True})
            return [c for c in stream if c.usage][-1].usage.completion_tokens

        def phase(run) -> tuple[float, float]:
            m0 = scrape(base)
            t = time.perf_counter()
            tokens = run()
            dt = time.perf_counter() - t
            m1 = scrape(base)
            steps = m1["moeforge_decode_steps_total"] - m0["moeforge_decode_steps_total"]
            rows = m1["moeforge_decode_rows_total"] - m0["moeforge_decode_rows_total"]
            return tokens / dt, rows / max(steps, 1)

        with ThreadPoolExecutor(args.clients) as pool:
            # warm-up, alone and together (with --compile: the compiles for changing batch sizes happen here)
            for i in range(2):
                one(i)
            sum(pool.map(one, range(args.clients)))
            seq, seq_batch = phase(lambda: sum(one(i) for i in range(args.clients)))
            conc, conc_batch = phase(lambda: sum(pool.map(one, range(args.clients))))
        row = {"metric": "serve_aggregate_tokens_per_s", "dtype": args.dtype, "clients": args.clients,
               "tokens_each": args.tokens, "server_args": args.server_args, "sequential": round(seq, 1),
               "concurrent": round(conc, 1), "ratio": round(conc / seq, 2),
               "mean_batch_sequential": round(seq_batch, 2), "mean_batch_concurrent": round(conc_batch, 2)}
        print(json.dumps(row))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
