"""Data pipeline: corpus sources, byte-level BPE tokenizer, cached token shards, batching.

    data = prepare_data(DataConfig(paths=["corpus/"], max_bytes=4_000_000))
    sampler = BatchSampler(data.train, batch_size=8, seq_len=256, seed=0)
    batch = sampler.next()                       # (8, 257) int64
    for b in eval_batches(data.val, 8, 256, max_batches=20): ...

See docs/data.md.
"""

from moeforge.data.prepare import DataConfig, PreparedData, prepare_data
from moeforge.data.sampler import BatchSampler, eval_batches
from moeforge.data.sources import stdlib_files
from moeforge.data.tokenizer import EOT, load_tokenizer, train_tokenizer

__all__ = [
    "EOT",
    "BatchSampler",
    "DataConfig",
    "PreparedData",
    "eval_batches",
    "load_tokenizer",
    "prepare_data",
    "stdlib_files",
    "train_tokenizer",
]
