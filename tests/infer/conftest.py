"""Shared checks for the engine tests."""

import pytest

from moeforge.infer import speculative
from moeforge.infer.engine import Engine, SamplingParams


@pytest.fixture
def speculate_with_oracle(monkeypatch):
    """Run speculation whose drafts are replaced, for the prompts `oracle_rows` picks, by the plain greedy
    output's next token (a random MTP head rarely guesses right): checks the accept path keeps the
    output equal to `plain` and that acceptance is partial. `draft_fn`: the speculative module's draft
    function the engine calls (mtp_draft for V3, v4_draft for V4)."""

    def run(model, prompts: list[list[int]], greedy: SamplingParams, plain: list[list[int]], draft_fn: str,
            oracle_rows, draft_tokens: int = 1) -> None:
        orig = getattr(speculative, draft_fn)

        def oracle(engine, rows, *args, **kw):
            orig(engine, rows, *args, **kw)
            for r in rows:
                i = prompts.index(r.prompt)
                n = len(r.output)  # index in the plain output of the token after `pending` (output[-1])
                if oracle_rows(i):  # the right drafts as far as the plain output goes, then the MTP's own
                    right = plain[i][n : n + len(r.drafts)]
                    r.drafts = right + r.drafts[len(right):]

        monkeypatch.setattr(speculative, draft_fn, oracle)
        eng = Engine(model, max_batch=2, speculative=True, draft_tokens=draft_tokens)
        assert [r.output for r in eng.generate(prompts, greedy)] == plain
        rates = eng.stats.acceptance_rate  # oracle rows keep every draft, the others (almost) none
        assert all(0.15 < a < 1.0 for a in rates) and rates == sorted(rates, reverse=True)
        assert len(eng.stats.acceptance_rate) == draft_tokens
        assert eng.stats.generated_tokens == sum(map(len, plain))

    return run
