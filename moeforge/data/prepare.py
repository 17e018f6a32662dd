"""Prepare a corpus once: tokenizer + token shards, cached on disk by what produced them.

`prepare_data(cfg)` lists the corpus files, trains a byte-level BPE on the training
documents (or loads the tokenizer.json the config names), tokenizes every document with
`Tokenizer.encode_batch` (multi-threaded) and writes one flat token file per split,
documents each followed by the end-of-text token:

    <cache_dir>/<corpus>-<key>/
        tokenizer.json   train.bin   val.bin   meta.json  (dtype, token counts, stats)

The folder is written through `atomic_dir` (temp folder, then rename), so an interrupted
run leaves nothing half-written. `key` hashes the corpus fingerprint (every file's path,
size and mtime; the Python version for the stdlib), the config fields that change the
result, and the tokenizer's JSON (or, for a trained one, vocab_size and the `tokenizers`
version). A second call with the same inputs memory-maps the cached files and returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from moeforge.config import read_json
from moeforge.data.sources import (
    Document,
    ReadReport,
    SourceFile,
    fingerprint,
    is_val,
    iter_documents,
    list_files,
    stdlib_files,
)
from moeforge.data.tokenizer import (
    EOT,
    check_vocab_size,
    eot_token,
    load_tokenizer,
    tokenizer_digest,
    tokenizer_file,
    train_tokenizer,
)
from moeforge.model.checkpoint import atomic_dir

FORMAT = 1  # bump when the cached layout or the way documents become tokens changes
META = "meta.json"
TOKENIZER = "tokenizer.json"
BATCH_BYTES = 4 << 20  # text handed to one encode_batch call


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # files or folders; empty -> the Python stdlib corpus
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py", ".rst", ".jsonl", ".parquet"])
    text_field: str = "text"  # for .jsonl / .parquet
    tokenizer: str | None = None  # an existing tokenizer.json (or a folder holding one); None -> train a BPE
    vocab_size: int = 4096  # when training a tokenizer
    val_fraction: float = 0.05  # share of documents held out, by a hash of each document's key
    max_bytes: int | None = None  # cap on corpus bytes read: documents in sorted order until the cap
    cache_dir: str | None = None  # default: $MOEFORGE_CACHE/data, else ~/.cache/moeforge/data

    def validate(self) -> DataConfig:
        if isinstance(self.paths, (str, Path)):
            raise ValueError(f"paths must be a list of files or folders, got the string {str(self.paths)!r}")  # noqa: TRY004
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0 or None for no cap (got {self.max_bytes})")
        if not self.text_field:
            raise ValueError("text_field must name the jsonl field / parquet column that holds the text")
        if self.paths and not self.extensions:
            raise ValueError("extensions is empty: no file in a data folder would be read")
        if self.tokenizer is None:
            check_vocab_size(self.vocab_size)
        return self


@dataclass
class PreparedData:
    tokenizer: tokenizers.Tokenizer
    tokenizer_path: Path  # tokenizer.json, for the trainer to copy into checkpoints
    train: np.ndarray  # 1-D uint16 / uint32 token ids (a read-only memmap), documents each followed by eot
    val: np.ndarray
    stats: dict[str, Any]

    @property
    def eot_id(self) -> int:
        return int(self.stats["eot_id"])


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("MOEFORGE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "moeforge") / "data"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids < 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def cache_key(cfg: DataConfig, files: list[SourceFile], stdlib: bool, tok: tokenizers.Tokenizer | None) -> str:
    parts = {
        "format": FORMAT,
        "corpus": fingerprint(files, stdlib),
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "max_bytes": cfg.max_bytes,
        "tokenizer": tokenizer_digest(tok) if tok is not None else ["bpe", cfg.vocab_size, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# ------------------------------------------------------------------ entry point
def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Tokenizer and train/val token arrays for `cfg`, built once and then read from the cache."""
    start = time.perf_counter()
    cfg.validate()
    loaded, tok_src = None, None
    if cfg.tokenizer is not None:
        tok_src = tokenizer_file(cfg.tokenizer)
        loaded = load_tokenizer(tok_src)
        eot_token(loaded, tok_src)  # fail before any work when there is no end-of-text token
    stdlib = not cfg.paths
    files = stdlib_files() if stdlib else list_files(cfg.paths, cfg.extensions)
    if not files:
        raise ValueError(f"no documents: no file under {', '.join(cfg.paths)} has an extension in {cfg.extensions}")
    folder = cache_root(cfg) / f"{'stdlib' if stdlib else 'corpus'}-{cache_key(cfg, files, stdlib, loaded)}"

    data = load_cached(folder)
    if data is None:
        with atomic_dir(folder) as tmp:
            build(cfg, files, stdlib, loaded, tok_src, tmp, progress)
        data = load_cached(folder)
        assert data is not None, f"freshly written cache {folder} does not load"
        data.stats["cache_hit"] = False
    else:
        data.stats["cache_hit"] = True
    for msg in data.stats["warnings"]:
        warnings.warn(msg, stacklevel=2)
    data.stats["seconds"] = round(time.perf_counter() - start, 3)
    return data


def load_cached(folder: Path) -> PreparedData | None:
    """The prepared data in `folder`, or None when it is missing or incomplete."""
    try:
        meta = read_json(folder / META)
        dtype = np.dtype(meta["dtype"])
        arrays = [
            open_tokens(folder / f"{split}.bin", dtype, meta["stats"][f"{split}_tokens"]) for split in ("train", "val")
        ]
        tok = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER))
    except Exception:  # noqa: BLE001 - anything wrong with a cache entry means: build it again
        return None
    stats = dict(meta["stats"], cache_dir=str(folder))
    return PreparedData(tok, folder / TOKENIZER, arrays[0], arrays[1], stats)


def open_tokens(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if path.stat().st_size != n * dtype.itemsize:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes, expected {n} tokens of {dtype}")
    if n == 0:
        return np.zeros(0, dtype)  # numpy cannot memory-map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


# ------------------------------------------------------------------ building
def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),  # bytes done / total
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def estimate_bytes(files: list[SourceFile], max_bytes: int | None) -> int:
    total = sum(f.path.stat().st_size for f in files)
    return min(total, max_bytes) if max_bytes is not None else total


def build(
    cfg: DataConfig,
    files: list[SourceFile],
    stdlib: bool,
    loaded: tokenizers.Tokenizer | None,
    tok_src: Path | None,
    out: Path,
    progress: bool,
) -> None:
    t0 = time.perf_counter()
    total = estimate_bytes(files, cfg.max_bytes)
    with progress_bar(progress) as bar:
        all_train = False
        if loaded is None:
            tok, all_train = fit_tokenizer(cfg, files, bar, total)
            eot_name, eot_id = EOT, tok.token_to_id(EOT)
        else:
            tok = loaded
            eot_name, eot_id = eot_token(tok, tok_src)
        tok.save(str(out / TOKENIZER))
        dtype = token_dtype(max(tok.get_vocab(with_added_tokens=True).values()) + 1)

        def tokenize(val_fraction: float) -> tuple[dict[str, int], ReadReport]:
            report = ReadReport()
            docs = iter_documents(files, cfg.text_field, cfg.max_bytes, report)
            task = bar.add_task("tokenizing", total=total)
            return write_tokens(tok, docs, val_fraction, out, dtype, eot_id, bar, task), report

        counts, report = tokenize(0.0 if all_train else cfg.val_fraction)
        if counts["train_documents"] == 0 and counts["val_documents"] > 0:  # every document hashed into val
            counts, report = tokenize(0.0)
    if counts["train_documents"] + counts["val_documents"] == 0:
        where = "the Python standard library" if stdlib else ", ".join(cfg.paths)
        raise ValueError(f"no text in {where} (extensions {cfg.extensions}, text_field {cfg.text_field!r})")

    notes = report.warnings()
    vocab = tok.get_vocab_size()
    if loaded is None and vocab < cfg.vocab_size:
        notes.append(
            f"the trained tokenizer has {vocab} tokens, fewer than vocab_size={cfg.vocab_size}: the corpus is too small "
            f"to learn more merges; size the model's vocab_size from tokenizer.get_vocab_size()"
        )
    total_tokens = counts["train_tokens"] + counts["val_tokens"]
    if counts["val_tokens"] == 0 and cfg.val_fraction > 0:
        notes.append(
            f"the validation split is empty: no document was hashed into val_fraction={cfg.val_fraction} "
            "(too few documents); there will be no validation loss"
        )
    elif cfg.val_fraction > 0 and counts["val_tokens"] < cfg.val_fraction / 4 * total_tokens:
        notes.append(
            f"the validation split holds only {counts['val_tokens']:,} tokens, "
            f"{counts['val_tokens'] / total_tokens:.2%} of the corpus against val_fraction={cfg.val_fraction} "
            "(few documents were read): the validation loss will be noisy; read more data "
            "(a larger --max-bytes) or raise val_fraction"
        )
    n_bytes = counts["train_bytes"] + counts["val_bytes"]
    stats = {
        "source": f"python {sys.version.split()[0]} stdlib" if stdlib else list(cfg.paths),
        "files": len(files),
        "documents": counts["train_documents"] + counts["val_documents"],
        **counts,
        "bytes": n_bytes,
        "capped": report.capped,
        "bytes_per_token": round(n_bytes / max(1, counts["train_tokens"] + counts["val_tokens"]), 3),
        "tokenizer": str(tok_src) if tok_src is not None else "trained byte-level BPE",
        "vocab_size": vocab,
        "vocab_size_requested": cfg.vocab_size if loaded is None else None,
        "eot_token": eot_name,
        "eot_id": eot_id,
        "dtype": dtype.name,
        "val_unigram_entropy": unigram_entropy(open_tokens(out / "val.bin", dtype, counts["val_tokens"]), vocab),
        "skipped_lines": sum(report.bad_lines.values()),
        "replaced_files": report.replaced_files,
        "warnings": notes,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "config": asdict(cfg),
    }
    (out / META).write_text(json.dumps({"format": FORMAT, "dtype": dtype.name, "stats": stats}, indent=1))


def fit_tokenizer(
    cfg: DataConfig, files: list[SourceFile], bar: Progress, total: int
) -> tuple[tokenizers.Tokenizer, bool]:
    """Train the BPE on the training documents; (tokenizer, whether every document must go to train).

    When the hash puts every document in val (a corpus of one or two documents), the split
    gives way: all documents train and val stays empty.
    """
    task = bar.add_task("training tokenizer", total=total)
    seen = {"train": 0, "val": 0}

    def texts(all_train: bool) -> Iterator[str]:
        for doc in iter_documents(files, cfg.text_field, cfg.max_bytes, ReadReport()):
            bar.advance(task, len(doc.text))
            split = "train" if all_train or not is_val(doc.key, cfg.val_fraction) else "val"
            seen[split] += 1
            if split == "train":
                yield doc.text

    tok = train_tokenizer(texts(False), cfg.vocab_size)
    all_train = seen["train"] == 0 and seen["val"] > 0
    if all_train:
        tok = train_tokenizer(texts(True), cfg.vocab_size)
    done = bar.tasks[task].completed
    bar.update(task, total=done, completed=done)  # the byte total was an estimate
    return tok, all_train


def write_tokens(
    tok: tokenizers.Tokenizer,
    docs: Iterator[Document],
    val_fraction: float,
    out: Path,
    dtype: np.dtype,
    eot_id: int,
    bar: Progress,
    task: Any,
) -> dict[str, int]:
    """Encode documents in batches and append each one's ids + eot to train.bin or val.bin."""
    counts = {f"{s}_{what}": 0 for s in ("train", "val") for what in ("documents", "bytes", "tokens")}
    eot = np.array([eot_id], dtype)
    with open(out / "train.bin", "wb") as ftrain, open(out / "val.bin", "wb") as fval:
        sinks = {"train": ftrain, "val": fval}

        def flush(batch: list[Document]) -> None:
            encodings = tok.encode_batch([d.text for d in batch], add_special_tokens=False)
            chunks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for doc, enc in zip(batch, encodings):
                split = "val" if is_val(doc.key, val_fraction) else "train"
                chunks[split] += [np.asarray(enc.ids, dtype), eot]
                counts[f"{split}_documents"] += 1
                counts[f"{split}_bytes"] += len(doc.text.encode("utf-8"))
                counts[f"{split}_tokens"] += len(enc.ids) + 1
            for split, arrays in chunks.items():
                if arrays:
                    np.concatenate(arrays).tofile(sinks[split])
            bar.advance(task, sum(len(d.text) for d in batch))

        batch: list[Document] = []
        size = 0
        for doc in docs:
            batch.append(doc)
            size += len(doc.text)
            if size >= BATCH_BYTES:
                flush(batch)
                batch, size = [], 0
        if batch:
            flush(batch)
    done = bar.tasks[task].completed
    bar.update(task, total=done, completed=done)
    return counts


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float | None:
    """Entropy in nats of the token frequencies: the loss of a model that ignores context."""
    if len(tokens) == 0:
        return None
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / len(tokens)
    return round(float(-(p * np.log(p)).sum()), 4)
