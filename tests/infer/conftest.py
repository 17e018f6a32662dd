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
            oracle_rows) -> None:
        orig = getattr(speculative, draft_fn)

        def oracle(engine, rows, *args, **kw):
            orig(engine, rows, *args, **kw)
            for r in rows:
                i = prompts.index(r.prompt)
                n = len(r.output)  # index in the plain output of the token after `pending` (output[-1])
                if oracle_rows(i) and n < len(plain[i]):
                    r.draft = plain[i][n]

        monkeypatch.setattr(speculative, draft_fn, oracle)
        eng = Engine(model, max_batch=2, speculative=True)
        assert [r.output for r in eng.generate(prompts, greedy)] == plain
        assert 0.3 < eng.stats.acceptance_rate[0] < 1.0
        assert eng.stats.generated_tokens == sum(map(len, plain))

    return run
