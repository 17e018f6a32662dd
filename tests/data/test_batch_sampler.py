"""BatchSampler and eval_batches: window shape and bounds, determinism, exact resumption."""

import json

import numpy as np
import pytest
import torch

from moeforge.data import BatchSampler, eval_batches

SEQ = 16


def check_windows(batch: torch.Tensor, n: int, seq_len: int = SEQ) -> None:
    """On tokens = arange(n), a window is valid iff it is start, start + 1, ... within bounds."""
    assert batch.dtype == torch.int64 and batch.shape[1] == seq_len + 1
    expected = batch[:, :1] + torch.arange(seq_len + 1)
    assert torch.equal(batch, expected)
    assert batch.min() >= 0 and batch.max() < n


def test_windows_are_consecutive_and_in_bounds():
    n = 1000
    s = BatchSampler(np.arange(n, dtype=np.uint16), batch_size=64, seq_len=SEQ, seed=0)
    for _ in range(20):
        b = s.next()
        assert b.shape == (64, SEQ + 1)
        check_windows(b, n)
    # the smallest corpus: exactly one window, always the same
    one = BatchSampler(np.arange(SEQ + 1, dtype=np.uint32), batch_size=3, seq_len=SEQ, seed=1)
    assert torch.equal(one.next(), torch.arange(SEQ + 1).expand(3, -1))


def test_same_seed_same_batches():
    tokens = np.arange(5000, dtype=np.uint16)
    a, b, c = (BatchSampler(tokens, 4, SEQ, seed) for seed in (7, 7, 8))
    for _ in range(5):
        x = a.next()
        assert torch.equal(x, b.next())
        assert not torch.equal(x, c.next())


def test_resume_from_state_draws_the_same_batches(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    s = BatchSampler(tokens, 4, SEQ, seed=3)
    for _ in range(3):
        s.next()
    state = json.loads(json.dumps(s.state_dict()))  # must survive JSON
    after = [s.next() for _ in range(3)]
    fresh = BatchSampler(tokens, 4, SEQ, seed=123)  # the seed comes from the state
    fresh.load_state_dict(state)
    assert fresh.draws == 3
    for x in after:
        assert torch.equal(fresh.next(), x)


def test_state_from_other_data_is_rejected():
    state = BatchSampler(np.arange(5000), 4, SEQ, seed=0).state_dict()
    with pytest.raises(ValueError, match="saved with num_tokens=5000, this sampler has 4000"):
        BatchSampler(np.arange(4000), 4, SEQ, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="no valid generator state"):
        BatchSampler(np.arange(5000), 4, SEQ, seed=0).load_state_dict({**state, "generator": "AAAA"})


def test_too_small_corpus_is_a_value_error():
    with pytest.raises(ValueError, match="corpus too small for seq_len 16: 16 tokens"):
        BatchSampler(np.arange(SEQ), 2, SEQ, seed=0)
    with pytest.raises(ValueError, match="corpus too small for seq_len 16: 0 tokens"):
        next(eval_batches(np.zeros(0, np.uint16), 2, SEQ, 4))


def test_eval_batches_cover_without_overlap():
    n = 10 * SEQ + 1  # exactly 10 windows
    batches = list(eval_batches(np.arange(n, dtype=np.uint16), 4, SEQ))
    assert [len(b) for b in batches] == [4, 4, 2]
    for b in batches:
        check_windows(b, n)
    targets = torch.cat([b[:, 1:] for b in batches]).flatten()
    assert torch.equal(targets, torch.arange(1, n))  # every token after the first is a target exactly once
    again = list(eval_batches(np.arange(n, dtype=np.uint16), 4, SEQ))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))


def test_eval_batches_capped_spread_over_the_split():
    n = 100 * SEQ + 1
    batches = list(eval_batches(np.arange(n), 5, SEQ, max_batches=2))
    starts = torch.cat(batches)[:, 0]
    assert len(batches) == 2 and len(set(starts.tolist())) == 10
    assert starts.min() == 0 and starts.max() >= 80 * SEQ  # not just the first windows
    assert all(s % SEQ == 0 for s in starts.tolist())


def test_memmap_input(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(300, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    check_windows(BatchSampler(mm, 8, SEQ, 0).next(), 300)
    check_windows(next(eval_batches(mm, 8, SEQ, 1)), 300)
