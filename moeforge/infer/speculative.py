"""MTP self-speculative decoding (DeepSeek-V3 report section 2.2, "MTP in inference";
Leviathan et al. 2023 / Chen et al. 2023 for the rejection rule).

State per sequence of n cached tokens x_0..x_{n-1}: the sampled `pending` token x_n and a
`draft` for x_{n+1}, which the first MTP module predicted from the main model's hidden
state at position n-1 and the embedding of x_n. One step:

  verify   the main model reads [x_n, draft] at positions n, n+1 in one forward and gives
           p_n (distribution of x_{n+1}) and p_{n+1} (of x_{n+2});
  accept   greedy: the draft is kept iff it is argmax p_n. Sampling: kept with probability
           min(1, p_n(d) / q(d)) (q: the draft distribution); on rejection x_{n+1} is drawn
           from max(0, p_n - q) renormalised. Either way x_{n+1} ~ p_n exactly, so the
           output distribution equals plain decoding's. If kept, a bonus x_{n+2} ~ p_{n+1};
  update   the main cache keeps a+1 new tokens (a = 1 if accepted); the MTP module reads the
           main hidden states at those positions with the next tokens, extending its own
           latent cache, and drafts the following token from the last one.

Each step therefore costs one main forward of 2 tokens plus one MTP block forward and yields
1 + a tokens. Only the first MTP module drafts (depth 1, as in DeepSeek-V3); the engine
reports the acceptance rate per draft position (`EngineStats.acceptance_rate`).

DeepSeek-V4 (`_v4_speculative_step`, `v4_draft`): the same rule over per-request V4 caches. A V4
cache cannot drop its last token, so a row that rejects its draft re-runs x_n alone from the
cache it had before the verify forward (a forward leaves the cache it was given as it was), and the
MTP module keeps its own per-request cache (`Request.mtp_state`).

Shapes: B rows, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeforge.infer.sample import filter_logits

if TYPE_CHECKING:
    from moeforge.infer.engine import Engine, Request


def mtp_logits(model, next_ids: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor, cache, last: torch.Tensor,
               absorbed: bool = True) -> torch.Tensor:
    """The first MTP module over T positions per row, extending its cache -> logits (B, V) at row i's
    position last[i] (the draft for the token after it)."""
    module = model.mtp[0]
    B, T = next_ids.shape
    positions = pos.view(-1, 1) + torch.arange(T, device=pos.device)
    cos, sin = model.rotary(positions)
    h = module.eh_proj(torch.cat([module.enorm(model.embed_tokens(next_ids)), module.hnorm(hidden[:, :T])], dim=-1))
    h, _, _ = module.block(h, cos, sin, cache, absorbed)
    return model.lm_head(module.norm(h[torch.arange(B, device=h.device), last]))  # (B, V)


def mtp_draft(engine: Engine, rows: list[Request], lo: int, hidden: torch.Tensor, next_ids: torch.Tensor,
              counts: list[int], pos: torch.Tensor, absorbed: bool = True) -> None:
    """Extend the MTP cache of slots lo.. with `counts[i]` positions and draft each row's next token.

    hidden (B, T, D): main-model states (after the final norm) at the new positions; next_ids (B, T): the
    token following each position; pos (B,): first new position per row. absorbed=False (prefill) runs
    eager; absorbed=True (decode) runs the engine's (possibly compiled) function.
    """
    B, T = next_ids.shape
    writer = engine.mtp_cache.step(lo, lo + B, T)[0]
    last = torch.tensor(counts, device=hidden.device) - 1
    if absorbed:
        logits = engine._mtp_fn(engine.model, next_ids, hidden, pos, writer, last)
    else:
        logits = mtp_logits(engine.model, next_ids, hidden, pos, writer, last, absorbed=False)
    engine.mtp_cache.commit(lo, counts)
    _set_drafts(rows, logits)


def _set_drafts(rows: list[Request], logits: torch.Tensor) -> None:
    """Draft each row's next token from its MTP logits (B, V): argmax, or a sample from q."""
    greedy = logits.argmax(-1).tolist()
    for i, req in enumerate(rows):
        p = req.params
        if p.temperature > 0:
            q = filter_logits(logits[i : i + 1], p.temperature, p.top_k, p.top_p).softmax(-1)
            req.draft = int(torch.multinomial(q, 1, generator=req.generator))
            req.draft_probs = q[0]
        else:
            req.draft, req.draft_probs = greedy[i], None


def v4_draft(engine: Engine, rows: list[Request], hidden: torch.Tensor, next_ids: torch.Tensor) -> None:
    """DeepSeek-V4: run the first MTP module over T new positions per row (each row's own MTP cache,
    `Request.mtp_state`) and draft from the last one. hidden (B, T, D): main states; next_ids (B, T)."""
    model = engine.model
    module = model.mtp[0]
    h, caches, _ = module.step(model.embed_tokens(next_ids), hidden, next_ids, [r.mtp_state for r in rows])
    for req, c in zip(rows, caches):
        req.mtp_state = c
    _set_drafts(rows, model.lm_head(module.norm(h[:, -1])))


def _accept(req: Request, logits: torch.Tensor) -> list[int]:
    """logits (2, V) at [pending, draft] -> the tokens this row keeps (1 or 2)."""
    p = req.params
    if p.temperature == 0:
        target = logits.argmax(-1).tolist()
        return [req.draft, target[1]] if target[0] == req.draft else [target[0]]
    probs = filter_logits(logits, p.temperature, p.top_k, p.top_p).softmax(-1)  # (2, V)
    pt, q, d = probs[0], req.draft_probs, req.draft
    u = torch.rand((), generator=req.generator, device=pt.device)
    if u * q[d] < pt[d]:  # accept with probability min(1, p(d)/q(d))
        bonus = int(torch.multinomial(probs[1:], 1, generator=req.generator))
        return [d, bonus]
    residual = (pt - q).clamp_min(0)
    if float(residual.sum()) <= 0:
        residual = pt
    return [int(torch.multinomial(residual.unsqueeze(0), 1, generator=req.generator))]


def _v4_speculative_step(engine: Engine, rows: list[Request]) -> None:
    """DeepSeek-V4: verify [pending, draft] for all rows in one forward over their own caches. V4 caches
    cannot drop a token, so a row that rejects its draft re-runs its pending token from the previous
    cache (the old cache objects are left intact by a forward)."""
    model = engine.model
    layers = range(len(rows[0].state))
    ids = torch.tensor([[r.pending, r.draft] for r in rows], device=engine.device)  # (B, 2)
    out = model(ids, cache=[[r.state[i] for r in rows] for i in layers], mtp=False, return_cache=True)
    kept = [_accept(r, out.logits[i]) for i, r in enumerate(rows)]
    for j, r in enumerate(rows):
        if len(kept[j]) == 2:
            r.state = [layer[j] for layer in out.cache]
    rerun = [r for r, k in zip(rows, kept) if len(k) == 1]
    if rerun:
        ids1 = torch.tensor([[r.pending] for r in rerun], device=engine.device)
        o1 = model(ids1, cache=[[r.state[i] for r in rerun] for i in layers], mtp=False, return_cache=True)
        for j, r in enumerate(rerun):
            r.state = [layer[j] for layer in o1.cache]
    engine.stats.drafted[0] += len(rows)
    engine.stats.accepted[0] += sum(len(k) - 1 for k in kept)
    for req, k in zip(rows, kept):
        req.pending = k[-1]
        for tok in k:
            engine._append(req, tok)
    for n in (1, 2):  # MTP: (h_n, d), (h_{n+1}, b) for rows keeping [d, b]; (h_n, t) for rows keeping [t]
        group = [j for j, k in enumerate(kept) if len(k) == n]
        if group:
            nxt = torch.tensor([kept[j] for j in group], device=engine.device)
            v4_draft(engine, [rows[j] for j in group], out.hidden[group, :n], nxt)


def speculative_step(engine: Engine, rows: list[Request]) -> None:
    """One verify-accept-draft step for every active row (slots 0..B-1)."""
    if engine.v4:
        _v4_speculative_step(engine, rows)
        return
    cache = engine.cache
    B = len(rows)
    ids = torch.tensor([[r.pending, r.draft] for r in rows], device=engine.device)  # (B, 2)
    pos = cache.positions(0, B)
    logits, hidden = engine._forward_fn(ids, pos, cache.step(0, B, 2))  # (B, 2, V), (B, 2, D)
    kept = [_accept(r, logits[i]) for i, r in enumerate(rows)]
    counts = [len(k) for k in kept]
    cache.commit(0, counts)
    engine.stats.drafted[0] += B
    engine.stats.accepted[0] += sum(c - 1 for c in counts)
    # MTP position n+j reads main hidden n+j and token n+j+1: for a row keeping [d, b] that is
    # (h_n, d), (h_{n+1}, b); for a row keeping [t] only (h_n, t).
    T = max(counts)
    nxt = torch.zeros(B, T, dtype=torch.long)
    for i, k in enumerate(kept):
        nxt[i, : len(k)] = torch.tensor(k)
    for req, k in zip(rows, kept):
        req.pending = k[-1]
        for tok in k:
            engine._append(req, tok)
    mtp_draft(engine, rows, 0, hidden, nxt.to(engine.device), counts, pos)
