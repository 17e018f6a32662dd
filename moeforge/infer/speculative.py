"""MTP self-speculative decoding (DeepSeek-V3 report section 2.2, "MTP in inference";
Leviathan et al. 2023 / Chen et al. 2023 for the rejection rule).

State per sequence of n cached tokens x_0..x_{n-1}: the sampled `pending` token x_n and k drafts
d_1..d_k for x_{n+1}..x_{n+k} (`Engine(draft_tokens=k)`). The first MTP module predicted d_1 from
the main model's hidden state at position n-1 and the embedding of x_n; each further draft comes
from the same module run once more on its own output state and the previous draft (the module
stands in for the main model's state it has not seen yet, as SGLang and vLLM chain DeepSeek-V3's
single MTP layer). One step:

  verify   the main model reads [x_n, d_1..d_k] at positions n..n+k in one forward and gives
           p_n..p_{n+k} (p_{n+i}: the distribution of x_{n+i+1});
  accept   drafts are checked in order. Greedy: d_i is kept iff it is argmax p_{n+i-1}. Sampling:
           kept with probability min(1, p(d_i) / q_i(d_i)) (q_i: the distribution d_i was drawn
           from); the first rejected position is drawn from max(0, p - q_i) renormalised instead,
           and the step ends there. Either way each kept token ~ p exactly, so the output
           distribution equals plain decoding's. If all k are kept, a bonus x_{n+k+1} ~ p_{n+k};
  update   the main cache keeps a+1 new tokens (a drafts accepted); the MTP module reads the main
           hidden states at those positions with the next tokens, extending its own latent cache
           (overwriting what the chain wrote there), drafts the next d_1 from the last one, and
           chains k-1 more positions past its committed length for d_2..d_k.

Each step therefore costs one main forward of k+1 tokens plus k MTP block forwards and yields 1 + a
tokens. Deeper MTP modules (mtp.num_layers > 1) are not used for drafting. The engine reports the
acceptance rate per draft position (`EngineStats.acceptance_rate`: position i counts a row when it
kept d_1..d_i).

DeepSeek-V4 (`_v4_speculative_step`, `v4_draft`): the same rule, k drafts included, over per-request
V4 caches. A V4 cache cannot drop tokens, so a row that keeps m of the k+1 verified positions re-runs
its first m inputs from the cache it had before the verify forward (a forward leaves the cache it was
given as it was), and the MTP module keeps its own per-request cache (`Request.mtp_state`), which the
chained drafts continue as copies.

Shapes: B rows, T tokens, D hidden, V vocab, k drafts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeforge.infer.sample import filter_logits

if TYPE_CHECKING:
    from moeforge.infer.engine import Engine, Request


def mtp_logits(model, next_ids: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor, cache, last: torch.Tensor,
               absorbed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The first MTP module over T positions per row, extending its cache -> logits (B, V) at row i's
    position last[i] (the draft for the token after it) and the module's output state there (B, D)."""
    module = model.mtp[0]
    B, T = next_ids.shape
    positions = pos.view(-1, 1) + torch.arange(T, device=pos.device)
    cos, sin = model.rotary(positions)
    h = module.eh_proj(torch.cat([module.enorm(model.embed_tokens(next_ids)), module.hnorm(hidden[:, :T])], dim=-1))
    h, _, _ = module.block(h, cos, sin, cache, absorbed)
    h = h[torch.arange(B, device=h.device), last]
    return model.lm_head(module.norm(h)), h


def mtp_chain_logits(model, next_ids: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor, cache,
                     last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`mtp_logits` for the one-position chain passes of k > 1 drafts. A function of its own so that a
    compiled engine keeps their graphs apart from the (k+1)-position update's: Dynamo counts recompiles
    per function, and both kinds over every batch size passed its limit of 8 (the rest then ran eager)."""
    return mtp_logits(model, next_ids, hidden, pos, cache, last)


def mtp_draft(engine: Engine, rows: list[Request], lo: int, hidden: torch.Tensor, next_ids: torch.Tensor,
              counts: list[int], pos: torch.Tensor, absorbed: bool = True, chain: bool = True) -> None:
    """Extend the MTP cache of slots lo.. with `counts[i]` positions and draft each row's next tokens.

    hidden (B, T, D): main-model states (after the final norm) at the new positions; next_ids (B, T): the
    token following each position; pos (B,): first new position per row. absorbed=False (prefill) runs
    eager; absorbed=True (decode) runs the engine's (possibly compiled) function. With
    `engine.draft_tokens` k > 1 and `chain` the module then runs k-1 more single positions past the committed
    length (written to the cache, not committed: the next update overwrites them); a prefill chunk that
    completes no prompt passes chain=False, as its drafts are never used.
    """
    B, T = next_ids.shape
    cache = engine.mtp_cache
    writer = cache.step(lo, lo + B, T)[0]
    last = torch.tensor(counts, device=hidden.device) - 1
    if absorbed:
        logits, h = engine._mtp_fn(engine.model, next_ids, hidden, pos, writer, last)
    else:
        logits, h = mtp_logits(engine.model, next_ids, hidden, pos, writer, last, absorbed=False)
    cache.commit(lo, counts)
    for r in rows:
        r.drafts, r.draft_probs = [], []
    _add_drafts(rows, logits)
    extra = engine.draft_tokens - 1
    if extra <= 0 or not chain:
        return
    zero = torch.zeros(B, dtype=torch.long, device=hidden.device)
    for _ in range(extra):
        ids = torch.tensor([[r.drafts[-1]] for r in rows], device=hidden.device)
        logits, h = engine._mtp_chain_fn(engine.model, ids, h.unsqueeze(1), cache.positions(lo, lo + B),
                                   cache.step(lo, lo + B, 1)[0], zero)
        cache.commit(lo, [1] * B)  # so the next chain position attends to this one
        _add_drafts(rows, logits)
    cache.commit(lo, [-extra] * B)  # the chain's entries stay uncommitted


def _add_drafts(rows: list[Request], logits: torch.Tensor) -> None:
    """Append each row's next draft from its MTP logits (B, V): argmax, or a sample from q."""
    greedy = logits.argmax(-1).tolist()
    for i, req in enumerate(rows):
        p = req.params
        if p.temperature > 0:
            q = filter_logits(logits[i : i + 1], p.temperature, p.top_k, p.top_p).softmax(-1)
            req.drafts.append(int(torch.multinomial(q, 1, generator=req.generator)))
            req.draft_probs.append(q[0])
        else:
            req.drafts.append(greedy[i])


def v4_draft(engine: Engine, rows: list[Request], hidden: torch.Tensor, next_ids: torch.Tensor,
             chain: bool = True) -> None:
    """DeepSeek-V4: run the first MTP module over T new positions per row (each row's own MTP cache,
    `Request.mtp_state`) and draft from the last one. hidden (B, T, D): main states; next_ids (B, T).
    With `engine.draft_tokens` k > 1 and `chain`, the module then runs k-1 more single positions on its
    own output state and the previous draft, as for V3. A V4 cache cannot drop entries, so the chain
    continues copies (the cache objects a forward returns) and the committed `mtp_state` stays as it was."""
    model = engine.model
    module = model.mtp[0]
    h, caches, _ = module.step(model.embed_tokens(next_ids), hidden, next_ids, [r.mtp_state for r in rows])
    for req, c in zip(rows, caches):
        req.mtp_state = c
        req.drafts, req.draft_probs = [], []
    h = h[:, -1:]
    _add_drafts(rows, model.lm_head(module.norm(h[:, -1])))
    for _ in range(engine.draft_tokens - 1 if chain else 0):
        ids = torch.tensor([[r.drafts[-1]] for r in rows], device=hidden.device)
        h, caches, _ = module.step(model.embed_tokens(ids), h, ids, caches)
        _add_drafts(rows, model.lm_head(module.norm(h[:, -1])))


def _accept(req: Request, logits: torch.Tensor) -> list[int]:
    """logits (k+1, V) at [pending, d_1..d_k] -> the tokens this row keeps (1 to k+1)."""
    p = req.params
    drafts = req.drafts
    if p.temperature == 0:
        target = logits.argmax(-1).tolist()
        kept: list[int] = []
        for i, d in enumerate(drafts):
            if target[i] != d:
                return kept + [target[i]]
            kept.append(d)
        return kept + [target[len(drafts)]]
    probs = filter_logits(logits, p.temperature, p.top_k, p.top_p).softmax(-1)  # (k+1, V)
    kept = []
    for i, d in enumerate(drafts):
        pt, q = probs[i], req.draft_probs[i]
        u = torch.rand((), generator=req.generator, device=pt.device)
        if u * q[d] < pt[d]:  # accept with probability min(1, p(d)/q(d))
            kept.append(d)
            continue
        residual = (pt - q).clamp_min(0)
        if float(residual.sum()) <= 0:
            residual = pt
        return kept + [int(torch.multinomial(residual.unsqueeze(0), 1, generator=req.generator))]
    return kept + [int(torch.multinomial(probs[len(drafts)].unsqueeze(0), 1, generator=req.generator))]


def _count(engine: Engine, kept: list[list[int]]) -> None:
    """Acceptance per draft position: every row drafted at each position; position i counts the rows that
    kept drafts 1..i."""
    for i in range(len(engine.stats.drafted)):
        engine.stats.drafted[i] += len(kept)
        engine.stats.accepted[i] += sum(len(k) - 1 > i for k in kept)


def _v4_speculative_step(engine: Engine, rows: list[Request]) -> None:
    """DeepSeek-V4: verify [pending, d_1..d_k] for all rows in one forward over their own caches. V4
    caches cannot drop a token, so a row that keeps m < k+1 tokens re-runs its first m inputs from the
    cache it had before (a forward leaves the cache objects it was given intact); rows keeping the
    same m share that forward."""
    model = engine.model
    layers = range(len(rows[0].state))
    ids = torch.tensor([[r.pending, *r.drafts] for r in rows], device=engine.device)  # (B, k+1)
    out = model(ids, cache=[[r.state[i] for r in rows] for i in layers], mtp=False, return_cache=True)
    kept = [_accept(r, out.logits[i]) for i, r in enumerate(rows)]
    k1 = ids.shape[1]
    for j, r in enumerate(rows):
        if len(kept[j]) == k1:
            r.state = [layer[j] for layer in out.cache]
    for m in range(1, k1):
        group = [j for j, t in enumerate(kept) if len(t) == m]
        if group:
            o = model(ids[group, :m], cache=[[rows[j].state[i] for j in group] for i in layers], mtp=False,
                      return_cache=True)
            for g, j in enumerate(group):
                rows[j].state = [layer[g] for layer in o.cache]
    _count(engine, kept)
    for req, k in zip(rows, kept):
        req.pending = k[-1]
        for tok in k:
            engine._append(req, tok)
    for m in range(1, k1 + 1):  # MTP over (h_n, t_1) .. (h_{n+m-1}, t_m) for rows keeping t_1..t_m
        group = [j for j, k in enumerate(kept) if len(k) == m]
        if group:
            nxt = torch.tensor([kept[j] for j in group], device=engine.device)
            v4_draft(engine, [rows[j] for j in group], out.hidden[group, :m], nxt)


def speculative_step(engine: Engine, rows: list[Request]) -> None:
    """One verify-accept-draft step for every active row (slots 0..B-1)."""
    if engine.v4:
        _v4_speculative_step(engine, rows)
        return
    cache = engine.cache
    B, k = len(rows), engine.draft_tokens
    ids = torch.tensor([[r.pending, *r.drafts] for r in rows], device=engine.device)  # (B, k+1)
    pos = cache.positions(0, B)
    logits, hidden = engine._forward_fn(ids, pos, cache.step(0, B, k + 1))  # (B, k+1, V), (B, k+1, D)
    kept = [_accept(r, logits[i]) for i, r in enumerate(rows)]
    counts = [len(t) for t in kept]
    cache.commit(0, counts)
    _count(engine, kept)
    # MTP position n+j reads main hidden n+j and token n+j+1: for a row keeping t_1..t_m those are
    # (h_n, t_1) .. (h_{n+m-1}, t_m). Always k+1 positions (the rest padding, written past what is
    # committed and never attended to), so a compiled MTP function sees one shape, not one per count.
    nxt = torch.zeros(B, k + 1, dtype=torch.long)
    for i, t in enumerate(kept):
        nxt[i, : len(t)] = torch.tensor(t)
    for req, t in zip(rows, kept):
        req.pending = t[-1]
        for tok in t:
            engine._append(req, tok)
    mtp_draft(engine, rows, 0, hidden, nxt.to(engine.device), counts, pos)
