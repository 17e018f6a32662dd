"""Batched inference engine: prefill, absorbed-MLA decode over a preallocated latent cache,
continuous batching, optional MTP self-speculative decoding.

`Engine.submit` queues a request (from any thread: it only appends to an inbox); each
`Engine.step()`:
  1. moves the inbox into the waiting queue and drops cancelled requests (their slot is freed at once),
  2. admits waiting requests into free slots and caches the next chunk of the prompts being
     prefilled: up to `prefill_chunk` tokens in all, from the front of the queue, in one
     right-padded forward (naive MLA path, per-sequence positions). A request whose prompt is
     complete samples its first token and joins the decoding rows, so a long prompt costs the
     running sequences a chunk per step instead of its whole prefill at once,
  3. runs one decode step for every active sequence: one new token each with the
     absorbed path (or, with speculation, one verify forward of pending + draft tokens;
     moeforge/infer/speculative.py),
  4. retires finished sequences (eos, stop string, max_tokens, context full).
Requests therefore join and leave the running batch between decode steps. The engine is
single-threaded; the server drives it from one worker thread (moeforge/serve).

DeepSeek-V4 models (`cfg.v4`) keep their own per-layer caches (window, compressed entries,
indexer keys, compressor state: moeforge.model.v4_attention), whose compression steps fall at
each sequence's own positions. The engine holds one such cache per request, prefills each
request's chunk with its own forward, and decodes all active rows in one forward in which only attention runs
per row over that row's cache (projections, mHC, MoE and the head are batched). Scheduling,
sampling, stop handling, streaming and MTP speculation (moeforge/infer/speculative.py) are
shared with the V3 path; `compile` is V3-only for now.

Sampling is done per row with the request's own `torch.Generator` (seeded from
`SamplingParams.seed`), so a request's output does not depend on what it was batched with.

Shapes: B rows in a step, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moeforge.infer.cache import LatentCache
from moeforge.infer.detokenize import IncrementalDecoder
from moeforge.infer.sample import filter_logits
from moeforge.model.transformer import Transformer

_ids = itertools.count()


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        return self


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    id: str = ""
    output: list[int] = field(default_factory=list)
    text: str = ""  # decoded output (with a tokenizer), cut before a stop string
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    cancelled: bool = False
    on_update: Callable[[Request], None] | None = None  # called from the engine's thread after each step
    generator: torch.Generator | None = None
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # engine state
    slot: int = -1
    pending: int = -1  # sampled, not yet in the cache
    drafts: list[int] = field(default_factory=list)  # MTP drafts for the tokens after `pending`
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # (V,) each draft's distribution (temperature > 0)
    emitted: int = 0  # characters of `text` already streamed
    prefilled: int = 0  # prompt tokens already in the cache (chunked prefill)
    state: list | None = None  # DeepSeek-V4: this request's per-layer V4LayerCache list
    mtp_state: object = None  # DeepSeek-V4 speculation: the MTP block's V4LayerCache
    detok: IncrementalDecoder | None = field(default=None, repr=False)  # `text` without re-decoding all output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def new_text(self, hold: int = 0) -> str:
        """Text not yet streamed. While running, keep back `hold` chars (a possible stop-string prefix)
        and an incomplete UTF-8 character."""
        end = len(self.text)
        if not self.finished:
            end = max(self.emitted, end - hold)
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    batch_size_sum: int = 0  # sum over decode steps of the rows decoded
    drafted: list[int] = field(default_factory=list)  # per draft position: rows that proposed a draft there
    accepted: list[int] = field(default_factory=list)  # rows that kept it (and so every draft before it)

    @property
    def acceptance_rate(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def mean_batch_size(self) -> float:
        return self.batch_size_sum / self.steps if self.steps else 0.0


class Engine:
    def __init__(self, model: Transformer | nn.Module, max_batch: int = 8, max_len: int | None = None, tokenizer=None,
                 speculative: bool = False, compile: bool = False, prefill_chunk: int | None = 512,
                 draft_tokens: int = 1):
        """`tokenizer`: an HF `tokenizers.Tokenizer` (needed for stop strings and `Request.text`).
        `compile`: run the decode step through `torch.compile` (Inductor; compiled on first use).
        `prefill_chunk`: prompt tokens prefilled per step (V3 family), so a long prompt does not stall
        the running sequences for its whole prefill; None prefills every admitted prompt at once.
        `draft_tokens`: with `speculative`, tokens the MTP module drafts per step."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        cfg = model.cfg
        self.model, self.cfg, self.tokenizer = model.eval(), cfg, tokenizer
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch = max_batch
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs a model with MTP modules (mtp.num_layers >= 1)")
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
        if draft_tokens > 1 and not speculative:
            raise ValueError("draft tokens are made by MTP speculation: add --speculative (speculative=True)")
        self.v4, self.compile = cfg.v4 is not None, compile
        if self.v4 and compile:
            model.compile_stateless()  # V4: the blocks' cache-free parts compiled, attention over its caches eager
        self.speculative = speculative
        self.draft_tokens = draft_tokens if speculative else 0
        p = model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        a = cfg.attention
        self.cache: LatentCache | None = None
        self.mtp_cache: LatentCache | None = None
        if not self.v4:
            # a verify step writes the drafts past the last kept token, the MTP chain as many positions
            extra = max(1, self.draft_tokens)
            self.cache = LatentCache(cfg.num_layers, max_batch, self.max_len + extra, a.kv_lora_rank,
                                     a.qk_rope_head_dim, self.device, self.dtype)
            if speculative:
                self.mtp_cache = LatentCache(1, max_batch, self.max_len + extra, a.kv_lora_rank, a.qk_rope_head_dim,
                                             self.device, self.dtype)
        self.active: list[Request] = []  # decoding: active[i].slot == i
        self.prefilling: list[Request] = []  # admitted, prompt still being cached: slots after the active ones
        self.waiting: deque[Request] = deque()
        self.inbox: deque[Request] = deque()  # submitted, not yet seen by step(): safe to append from any thread
        from moeforge.infer.speculative import mtp_chain_logits, mtp_logits

        # the decode-time forwards (plain decode, speculative verify, MTP draft); prefill stays eager.
        # Sizes start static and become symbolic when they change (automatic dynamic shapes): a few
        # compiles while the context length and batch size first move, then none.
        self._forward_fn = torch.compile(self._forward) if compile else self._forward
        self._mtp_fn = torch.compile(mtp_logits) if compile else mtp_logits
        self._mtp_chain_fn = torch.compile(mtp_chain_logits) if compile else mtp_chain_logits
        self.stats = self._new_stats()

    def _new_stats(self) -> EngineStats:
        return EngineStats(drafted=[0] * self.draft_tokens, accepted=[0] * self.draft_tokens)

    # ---------------------------------------------------------------- requests
    def submit(self, prompt: list[int], params: SamplingParams | None = None, request_id: str | None = None,
               on_update: Callable[[Request], None] | None = None,
               generator: torch.Generator | None = None) -> Request:
        """Queue a prompt. `generator` overrides the one seeded from `params.seed`."""
        params = (params or SamplingParams()).validate()
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {self.cfg.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_len} tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer")
        gen = generator
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        req = Request(list(prompt), params, request_id or f"req-{next(_ids)}", on_update=on_update, generator=gen)
        self.inbox.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Safe from the engine's thread; other threads set `req.cancelled = True` instead."""
        req.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.active or self.prefilling or self.waiting or self.inbox)

    @property
    def running(self) -> int:
        """Requests holding a batch slot (decoding or being prefilled)."""
        return len(self.active) + len(self.prefilling)

    @property
    def queued(self) -> int:
        """Requests submitted and not yet admitted to the batch."""
        return len(self.waiting) + len(self.inbox)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion (batched up to max_batch at a time); requests in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work:
            self.step()
        return reqs

    def warm_up(self) -> None:
        """Run short requests so a compiled engine compiles before real traffic: batch 1 at two context
        lengths (the length becomes a symbolic size), then full batches that shrink one row per step down
        to one, once with prompts of mixed lengths (masked attention) and once of equal lengths (plain
        causal), so every batch size has met its graph (the compiled graphs split batch sizes into ranges,
        e.g. up to 4 rows and from 5; a size first met in live traffic would stall it for the compile,
        15-20 s on the dev CPU). Resets the statistics afterwards."""
        for n in (2, 5):
            self.generate([[1] * n], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        if self.max_batch > 1:
            for lengths in ([2 + i % 3 for i in range(self.max_batch)], [3] * self.max_batch):
                self.generate([[1] * n for n in lengths],
                              [SamplingParams(max_tokens=2 + i, temperature=0, ignore_eos=True)
                               for i in range(self.max_batch)])
        self.stats = self._new_stats()

    def stream(self, prompt: list[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Token ids of one request as they are produced (runs the engine itself)."""
        req = self.submit(prompt, params, generator=generator)
        sent = 0
        while not req.finished:
            self.step()
            yield from req.output[sent:]
            sent = len(req.output)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit, prefill, decode one step, retire. Returns the requests that changed."""
        changed: list[Request] = []
        while self.inbox:
            self.waiting.append(self.inbox.popleft())
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            req.finish_reason = "cancelled"
            changed.append(req)
        for req in self.active + self.prefilling:
            if req.cancelled and not req.finished:
                req.finish_reason = "cancelled"
                changed.append(req)
        self._retire()
        new: list[Request] = []
        while self.waiting and self.running + len(new) < self.max_batch:
            new.append(self.waiting.popleft())
        for req in new:
            req.slot, req.prefilled = self.running, 0
            for c in self._caches():
                c.clear(req.slot)
            self.prefilling.append(req)
        changed += self._prefill_step()
        self._retire()
        if self.active:
            rows = list(self.active)
            # V4 with compile: the compiled block parts for this engine's decode-time calls (prefill stays eager)
            with self.model.stateless_compiled() if self.v4 and self.compile else contextlib.nullcontext():
                if self.speculative:
                    from moeforge.infer.speculative import speculative_step

                    speculative_step(self, rows)
                else:
                    self._decode(rows)
            self.stats.steps += 1
            self.stats.batch_size_sum += len(rows)
            changed += [r for r in rows if r not in changed]
        self._retire()
        for req in changed:
            if req.on_update is not None:
                req.on_update(req)
        return changed

    def _retire(self) -> None:
        """Free the slots of finished requests. Decoding rows stay a contiguous prefix of the slots and
        the rows being prefilled follow them: a hole is filled by moving the region's last row into it."""
        for region in (self.active, self.prefilling):
            i = 0
            while i < len(region):
                req = region[i]
                if not req.finished:
                    i += 1
                    continue
                self._fill_hole(region, i)
                if region is self.active and self.prefilling:
                    # the decoding region shrank by one: its old last slot goes to a prefilling row
                    p = self.prefilling.pop()
                    self._move(p, len(self.active))
                    self.prefilling.insert(0, p)
                self._release(req)

    def _fill_hole(self, rows: list[Request], i: int) -> None:
        """Take rows[i] out, moving rows' last request into its slot and list position."""
        req, last = rows[i], rows.pop()
        if last is not req:
            self._move(last, req.slot)
            rows[i] = last

    def _move(self, req: Request, slot: int) -> None:
        if req.slot != slot:
            for c in self._caches():
                c.move(req.slot, slot)
            req.slot = slot

    def _release(self, req: Request) -> None:
        for c in self._caches():
            c.clear(self.running)  # the slot past the occupied ones is free now
        req.slot = -1
        req.state = req.mtp_state = None

    def _caches(self) -> list[LatentCache]:
        return [c for c in (self.cache, self.mtp_cache) if c is not None]

    def _prefill_step(self) -> list[Request]:
        """Cache the next prompt chunk of the rows being prefilled: the front run of them, up to
        `prefill_chunk` tokens in all (V3: one right-padded forward, naive MLA path, per-row positions;
        V4: a forward per row over its own cache). A row whose prompt is complete samples its first
        token; complete rows at the front join the decoding rows. Returns the rows that got their
        first token."""
        budget = self.prefill_chunk or float("inf")
        rows: list[Request] = []
        takes: list[int] = []
        for req in self.prefilling:
            left = len(req.prompt) - req.prefilled
            if left == 0 or budget <= 0:
                break  # a complete row waits for the rows before it; the chunk budget is spent
            take = int(min(left, budget))
            rows.append(req)
            takes.append(take)
            budget -= take
        if not rows:
            done: list[Request] = []
        elif self.v4:
            done = self._prefill_chunk_v4(rows, takes)
        else:
            done = self._prefill_chunk(rows, takes)
        while self.prefilling and self.prefilling[0].prefilled == len(self.prefilling[0].prompt):
            self.active.append(self.prefilling.pop(0))  # its slot is already len(active)
        return done

    def _prefill_chunk(self, rows: list[Request], takes: list[int]) -> list[Request]:
        """V3 family: rows (consecutive slots) cache their next `takes[i]` prompt tokens in one right-padded
        forward. Returns the rows whose prompt is now complete (their first token sampled)."""
        lo, hi = rows[0].slot, rows[0].slot + len(rows)
        T = max(takes)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, takes)):
            ids[i, :n] = torch.tensor(r.prompt[r.prefilled : r.prefilled + n])
        ids = ids.to(self.device)
        pos = self.cache.positions(lo, hi)
        out = self.model(ids, start_pos=pos, cache=self.cache.step(lo, hi, T), mtp=False, logits=False)
        self.cache.commit(lo, takes)
        idx = [i for i, (r, n) in enumerate(zip(rows, takes)) if r.prefilled + n == len(r.prompt)]
        rows_t = torch.tensor(idx, dtype=torch.long, device=self.device)
        last = torch.tensor([takes[i] - 1 for i in idx], dtype=torch.long, device=self.device)
        done = self._chunk_done(rows, takes, self.model.lm_head(out.hidden[rows_t, last]))
        if self.speculative:
            from moeforge.infer.speculative import mtp_draft

            nxt = torch.zeros_like(ids)
            for i, (r, n) in enumerate(zip(rows, takes)):
                nxt[i, :n] = torch.tensor(self._mtp_next(r, n))
            mtp_draft(self, rows, lo, out.hidden, nxt, takes, pos, absorbed=False, chain=bool(done))
        return done

    def _prefill_chunk_v4(self, rows: list[Request], takes: list[int]) -> list[Request]:
        """DeepSeek-V4: each row continues its own cache with its next `takes[i]` prompt tokens."""
        hidden, logits = [], []
        for r, n in zip(rows, takes):
            ids = torch.tensor([r.prompt[r.prefilled : r.prefilled + n]], device=self.device)
            out = self.model(ids, start_pos=r.prefilled, cache=r.state, mtp=False, return_cache=True)
            r.state = out.cache
            hidden.append(out.hidden)
            if r.prefilled + n == len(r.prompt):
                logits.append(out.logits[:, -1])
        done = self._chunk_done(rows, takes, torch.cat(logits) if logits else None)
        if self.speculative:
            from moeforge.infer.speculative import v4_draft

            for r, n, h in zip(rows, takes, hidden):  # drafts only matter once the prompt is complete
                v4_draft(self, [r], h, torch.tensor([self._mtp_next(r, n)], device=self.device),
                         chain=r.prefilled == len(r.prompt))
        return done

    def _chunk_done(self, rows: list[Request], takes: list[int], logits: torch.Tensor | None) -> list[Request]:
        """Advance rows past their chunk; rows whose prompt is complete sample their first token from
        `logits` (one row each, in order)."""
        self.stats.prefill_tokens += sum(takes)
        for r, n in zip(rows, takes):
            r.prefilled += n
        done = [r for r in rows if r.prefilled == len(r.prompt)]
        if done:
            for req, tok in zip(done, self.sample(logits, done)):
                req.pending = tok
                self._append(req, tok)
        return done

    @staticmethod
    def _mtp_next(r: Request, n: int) -> list[int]:
        """The tokens following the chunk of n positions just cached for r (MTP position i reads main state
        i and token i+1): the chunk shifted by one, ending with the first sampled token once complete."""
        follow = r.prompt[r.prefilled - n + 1 : r.prefilled + 1]
        return follow + [r.pending] if r.prefilled == len(r.prompt) else follow

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: list) -> tuple[torch.Tensor, torch.Tensor]:
        """T new tokens per row (B, T) over the cache, absorbed MLA -> logits (B, T, V), hidden (B, T, D)."""
        out = self.model(ids, start_pos=pos, cache=cache, absorbed=True, mtp=False, logits=False)
        return self.model.lm_head(out.hidden), out.hidden

    def _decode_v4(self, rows: list[Request]) -> None:
        """DeepSeek-V4: one forward for all rows, attention per row over its own cache
        (moeforge.model.v4_attention)."""
        ids = torch.tensor([[r.pending] for r in rows], device=self.device)
        per_row = [[r.state[layer] for r in rows] for layer in range(len(rows[0].state))]
        out = self.model(ids, cache=per_row, mtp=False, return_cache=True)
        for i, req in enumerate(rows):
            req.state = [layer[i] for layer in out.cache]
        for req, tok in zip(rows, self.sample(out.logits[:, -1], rows)):
            req.pending = tok
            self._append(req, tok)

    def _decode(self, rows: list[Request]) -> None:
        if self.v4:
            self._decode_v4(rows)
            return
        n = len(rows)
        ids = torch.tensor([[r.pending] for r in rows], device=self.device)
        pos = self.cache.positions(0, n)
        logits, _ = self._forward_fn(ids, pos, self.cache.step(0, n, 1))
        self.cache.commit(0, [1] * n)
        tokens = self.sample(logits[:, 0], rows)
        for req, tok in zip(rows, tokens):
            req.pending = tok
            self._append(req, tok)

    # --------------------------------------------------------------- sampling
    def sample(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """(B, V) logits -> one token per row, each with its request's parameters and generator."""
        out = logits.argmax(-1).tolist()
        for i, req in enumerate(rows):
            p = req.params
            if p.temperature > 0:
                probs = filter_logits(logits[i : i + 1], p.temperature, p.top_k, p.top_p).softmax(-1)
                out[i] = int(torch.multinomial(probs, 1, generator=req.generator))
        return out

    def _append(self, req: Request, token: int) -> None:
        """Add a sampled token to the request's output and decide whether it is finished."""
        if req.finished:
            return
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        p = req.params
        if not p.ignore_eos and self.cfg.eos_token_id is not None and token == self.cfg.eos_token_id:
            req.finish_reason = "stop"
            return
        req.output.append(token)
        self.stats.generated_tokens += 1
        if self.tokenizer is not None:
            old = len(req.text)
            if req.detok is None:
                req.detok = IncrementalDecoder(self.tokenizer)
            req.text = req.detok.decode(req.output)
            if p.stop:
                start = max(0, old - max(len(s) for s in p.stop))
                hits = [i for i in (req.text.find(s, start) for s in p.stop) if i >= 0]
                if hits:
                    req.text = req.text[: min(hits)]
                    req.finish_reason = "stop"
                    return
        if len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
            req.finish_reason = "length"
