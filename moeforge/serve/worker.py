"""The engine's thread and the server's metrics.

`EngineWorker` owns one `Engine` and runs `Engine.step()` in a background thread while any
request is waiting or running; HTTP handlers submit requests without waiting for a step to end
(`Engine.submit` only appends to the engine's inbox; a request joins the batch between two
decode steps) and receive updates through an asyncio queue filled with
`loop.call_soon_threadsafe`. Cancelling is setting `Request.cancelled`; the next step frees the
slot. If a step raises, every request in flight fails with a server error and the engine's
slots are reset, so the server stays up.

`Metrics` keeps counters and renders them in the Prometheus text format (version 0.0.4).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from moeforge.infer.engine import Engine, Request, SamplingParams

log = logging.getLogger("moeforge.serve")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Update:
    text: str  # new text since the previous update
    tokens: int  # completion tokens so far
    finish_reason: str | None


class EngineWorker:
    def __init__(self, engine: Engine, max_concurrent: int):
        self.engine, self.max_concurrent = engine, max_concurrent
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="moeforge-engine", daemon=True)
        self.hold = 0  # characters held back while streaming (longest stop string - 1), per request

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
        self._thread.join(timeout=10)

    @property
    def in_flight(self) -> int:
        return self.engine.running + self.engine.queued

    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> Request:
        """Queue a request; raises ValueError for a bad one. Updates arrive in `queue`."""
        hold = max((len(s) for s in params.stop), default=1) - 1

        def on_update(req: Request) -> None:  # engine thread
            upd = Update(req.new_text(hold), len(req.output), req.finish_reason)
            loop.call_soon_threadsafe(queue.put_nowait, upd)

        req = self.engine.submit(prompt, params, on_update=on_update)
        self.wake.set()
        return req

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            with self.lock:
                try:
                    self.engine.step()
                except Exception:  # keep serving: fail what was in flight, free every slot
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all()

    def _fail_all(self) -> None:
        eng = self.engine
        while eng.inbox:
            eng.waiting.append(eng.inbox.popleft())
        for req in eng.active + eng.prefilling + list(eng.waiting):
            req.finish_reason = "error"
            if req.on_update is not None:
                req.on_update(req)
        eng.active.clear()
        eng.prefilling.clear()
        eng.waiting.clear()
        for c in eng._caches():
            c.lengths = [0] * len(c.lengths)


class Metrics:
    """Counters for /metrics; updated from the event loop's thread only."""

    def __init__(self, worker: EngineWorker):
        self.worker = worker
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.started = time.time()

    def request_done(self, route: str, status: int, latency: float | None = None) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        if latency is not None:
            self.latency_sum += latency
            self.latency_count += 1
            for i, b in enumerate(LATENCY_BUCKETS):
                if latency <= b:
                    self.latency_buckets[i] += 1

    def render(self) -> str:
        stats = self.worker.engine.stats
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("moeforge_requests_total", "counter", "HTTP requests by route and status code",
               [(f'{{route="{r}",code="{s}"}}', n) for (r, s), n in sorted(self.requests.items())])
        metric("moeforge_prompt_tokens_total", "counter", "prompt tokens of accepted requests",
               [("", self.prompt_tokens)])
        metric("moeforge_completion_tokens_total", "counter", "tokens generated", [("", self.completion_tokens)])
        cum = [(f'{{le="{b}"}}', n) for b, n in zip(LATENCY_BUCKETS, self.latency_buckets)]
        cum.append(('{le="+Inf"}', self.latency_count))
        out.append("# HELP moeforge_request_latency_seconds completion request latency, end to end")
        out.append("# TYPE moeforge_request_latency_seconds histogram")
        out.extend(f"moeforge_request_latency_seconds_bucket{lab} {n}" for lab, n in cum)
        out.append(f"moeforge_request_latency_seconds_sum {self.latency_sum}")
        out.append(f"moeforge_request_latency_seconds_count {self.latency_count}")
        metric("moeforge_time_to_first_token_seconds_sum", "counter", "sum of times to the first token",
               [("", self.ttft_sum)])
        metric("moeforge_time_to_first_token_seconds_count", "counter", "requests with a first token",
               [("", self.ttft_count)])
        metric("moeforge_requests_running", "gauge", "requests in the decode batch",
               [("", self.worker.engine.running)])
        metric("moeforge_requests_waiting", "gauge", "requests waiting for a batch slot",
               [("", self.worker.engine.queued)])
        metric("moeforge_decode_steps_total", "counter", "engine decode steps", [("", stats.steps)])
        metric("moeforge_decode_rows_total", "counter", "rows decoded, summed over decode steps",
               [("", stats.batch_size_sum)])
        metric("moeforge_batch_size_mean", "gauge", "mean rows per decode step", [("", stats.mean_batch_size)])
        metric("moeforge_spec_acceptance_rate", "gauge", "MTP draft acceptance rate by draft position",
               [(f'{{position="{i + 1}"}}', r) for i, r in enumerate(stats.acceptance_rate)])
        return "\n".join(out) + "\n"
