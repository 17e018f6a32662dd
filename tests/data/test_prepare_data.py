"""prepare_data end to end on tiny corpora: shards, stats, the split, the cache and bad inputs."""

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moeforge.data.prepare as prep
from moeforge.data import DataConfig, eval_batches, prepare_data
from moeforge.data.sources import is_val

VOCAB = 300


def make_corpus(root, n=40):
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j}  # number {j}\n" for j in range(20))
        (sub / f"mod{i:02d}.py").write_text(body)
    return root


def cfg_for(tmp_path, paths, **kw):
    return DataConfig(
        paths=[str(p) for p in paths],
        cache_dir=str(tmp_path / "cache"),
        vocab_size=VOCAB,
        val_fraction=kw.pop("val_fraction", 0.2),
        **kw,
    )


def split_texts(data):
    """Documents of each split, decoded (eot separates them)."""
    out = {}
    for name in ("train", "val"):
        ids = np.asarray(getattr(data, name)).tolist()
        docs, cur = [], []
        for t in ids:
            if t == data.eot_id:
                docs.append(data.tokenizer.decode(cur))
                cur = []
            else:
                cur.append(t)
        assert not cur  # every document ends with eot
        out[name] = docs
    return out


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def test_folder_corpus_end_to_end(tmp_path, corpus):
    data = prepare_data(cfg_for(tmp_path, [corpus]), progress=False)
    s = data.stats
    assert data.train.dtype == np.uint16 and data.train.ndim == 1 and isinstance(data.train, np.memmap)
    assert data.tokenizer.get_vocab_size() == s["vocab_size"] == VOCAB and s["eot_id"] == 0
    assert data.tokenizer_path.name == "tokenizer.json" and data.tokenizer_path.is_file()
    assert s["documents"] == s["train_documents"] + s["val_documents"] == 40 and s["files"] == 40
    assert 0 < s["val_documents"] < 40
    assert s["train_tokens"] == len(data.train) and s["val_tokens"] == len(data.val)
    assert s["bytes"] == sum(p.stat().st_size for p in corpus.rglob("*.py")) and not s["cache_hit"]
    # documents come back exactly, in sorted path order, each in the split its key hashes to
    texts = split_texts(data)
    files = sorted(corpus.rglob("*.py"))
    want_val = [f.read_text() for f in files if is_val(f.relative_to(corpus).as_posix(), 0.2)]
    assert texts["val"] == want_val
    assert texts["train"] == [f.read_text() for f in files if f.read_text() not in want_val]
    counts = np.bincount(data.val, minlength=VOCAB) / len(data.val)
    p = counts[counts > 0]
    assert s["val_unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-3)
    json.dumps(s)


def test_split_independent_of_path_order(tmp_path, corpus):
    files = sorted(corpus.rglob("*.py"))
    a = prepare_data(cfg_for(tmp_path / "a", files), progress=False)
    b = prepare_data(cfg_for(tmp_path / "b", files[::-1]), progress=False)
    assert not b.stats["cache_hit"]  # separate caches: built twice
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)


def test_cache_hit_is_identical_and_skips_work(tmp_path, corpus, monkeypatch):
    cfg = cfg_for(tmp_path, [corpus])
    first = prepare_data(cfg, progress=False)

    def fail(*a, **k):
        raise AssertionError("cache hit must not rebuild")

    monkeypatch.setattr(prep, "build", fail)
    second = prepare_data(cfg, progress=False)
    assert second.stats["cache_hit"] and not first.stats["cache_hit"]
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert second.tokenizer.to_str() == first.tokenizer.to_str()


def test_cache_invalidated_when_a_file_changes(tmp_path, corpus):
    cfg = cfg_for(tmp_path, [corpus])
    first = prepare_data(cfg, progress=False)
    f = min(corpus.rglob("*.py"))
    f.write_text(f.read_text() + "# one more line\n")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    second = prepare_data(cfg, progress=False)
    assert not second.stats["cache_hit"]
    assert second.stats["bytes"] == first.stats["bytes"] + len("# one more line\n")
    third = prepare_data(cfg_for(tmp_path, [corpus], val_fraction=0.3), progress=False)
    assert not third.stats["cache_hit"]


def test_jsonl_and_parquet_corpus(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    rows = [{"text": f"record number {i} says hello"} for i in range(30)]
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(30)]}), d / "b.parquet")
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        data = prepare_data(cfg_for(tmp_path, [d]), progress=False)
    assert data.stats["documents"] == 60 and data.stats["skipped_lines"] == 1
    texts = split_texts(data)
    assert sorted(texts["train"] + texts["val"]) == sorted(
        [r["text"] for r in rows] + [f"parquet row {i}" for i in range(30)]
    )


def test_existing_tokenizer(tmp_path, corpus):
    trained = prepare_data(cfg_for(tmp_path, [corpus]), progress=False)
    cfg = cfg_for(tmp_path, [corpus], tokenizer=str(trained.tokenizer_path))
    cfg.vocab_size = 1  # ignored with an existing tokenizer
    loaded = prepare_data(cfg, progress=False)
    assert not loaded.stats["cache_hit"] and loaded.stats["tokenizer"] == str(trained.tokenizer_path)
    assert np.array_equal(loaded.train, trained.train)


def test_tiny_corpus_warns_vocab_and_empty_val(tmp_path):
    name = next(f"doc{i}.txt" for i in range(100) if is_val(f"doc{i}.txt", 0.5))
    f = tmp_path / name  # hashes into val: the fallback puts it in train
    f.write_text("just a few words, a few words\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = prepare_data(cfg_for(tmp_path, [f], val_fraction=0.5), progress=False)
    msgs = " ".join(str(w.message) for w in caught)
    assert "fewer than vocab_size=300" in msgs and "validation split is empty" in msgs
    s = data.stats
    assert s["vocab_size"] == data.tokenizer.get_vocab_size() < VOCAB and s["vocab_size_requested"] == VOCAB
    assert s["val_tokens"] == 0 and s["train_tokens"] > 0  # one document: it trains, whatever its hash
    with pytest.raises(ValueError, match="corpus too small for seq_len 8: 0 tokens"):
        next(eval_batches(data.val, 2, 8, 1))


def test_a_small_validation_share_warns(tmp_path):
    val_name = next(f"v{i}.txt" for i in range(200) if is_val(f"v{i}.txt", 0.2))
    train_names = [n for n in (f"t{i}.txt" for i in range(200)) if not is_val(n, 0.2)][:3]
    (tmp_path / val_name).write_text("a tiny held out file\n")
    for n in train_names:
        (tmp_path / n).write_text("def f(x):\n    return x * 2 + 1\n" * 200)
    files = [tmp_path / n for n in [val_name, *train_names]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = prepare_data(cfg_for(tmp_path, files, val_fraction=0.2), progress=False)
    msgs = " ".join(str(w.message) for w in caught)
    assert 0 < data.stats["val_tokens"] < 0.05 * data.stats["train_tokens"]
    assert "validation split holds only" in msgs and "noisy" in msgs


@pytest.mark.filterwarnings("ignore:the validation split is empty")
def test_single_val_document_trains_with_an_existing_tokenizer(tmp_path, corpus):
    trained = prepare_data(cfg_for(tmp_path, [corpus]), progress=False)
    name = next(f"doc{i}.txt" for i in range(100) if is_val(f"doc{i}.txt", 0.5))
    (tmp_path / name).write_text("a single document whose name hashes into val\n")
    data = prepare_data(
        cfg_for(tmp_path, [tmp_path / name], val_fraction=0.5, tokenizer=str(trained.tokenizer_path)), progress=False
    )
    assert data.stats["train_documents"] == 1 and data.stats["val_tokens"] == 0


@pytest.mark.filterwarnings("ignore:the trained tokenizer has")
def test_undecodable_file_round_trips_with_replacement(tmp_path):
    d = tmp_path / "bytes"
    d.mkdir()
    (d / "x.txt").write_bytes(b"valid text then \xff\xfe garbage\n" * 5)
    with pytest.warns(UserWarning, match="1 file.s. were not valid UTF-8"):
        data = prepare_data(cfg_for(tmp_path, [d], val_fraction=0.0), progress=False)
    assert data.stats["replaced_files"] == 1
    assert split_texts(data)["train"] == ["valid text then \ufffd\ufffd garbage\n" * 5]


@pytest.mark.filterwarnings("ignore:the validation split is empty")
def test_stdlib_default_with_a_small_cap(tmp_path):
    data = prepare_data(DataConfig(max_bytes=30_000, vocab_size=VOCAB, cache_dir=str(tmp_path)), progress=False)
    s = data.stats
    assert "stdlib" in s["source"] and s["capped"] and s["bytes"] == 30_000 and s["files"] > 500
    assert data.tokenizer.decode(np.asarray(data.train[:200]).tolist())


@pytest.mark.filterwarnings("ignore:the validation split is empty")
def test_cache_dir_from_environment(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "env"))
    data = prepare_data(DataConfig(paths=[str(corpus)], vocab_size=VOCAB), progress=False)
    assert data.tokenizer_path.parent.parent == tmp_path / "env" / "data"


@pytest.mark.parametrize(
    "setup, kw, message",
    [
        (None, {"paths": ["missing"]}, r"data path .*missing does not exist"),
        ("empty", {}, r"no documents: no file under .*empty has an extension in \['.txt'"),
        ("blank", {}, r"no text in .*blank \(extensions"),
        ("jsonl", {}, r"no line of .*d.jsonl has a string field 'text'"),
        (None, {"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        (None, {"vocab_size": 100}, r"vocab_size 100 is too small"),
        (None, {"max_bytes": 0}, r"max_bytes must be > 0"),
        (None, {"paths": "corpus/"}, r"paths must be a list of files or folders, got the string 'corpus/'"),
        (None, {"tokenizer": "nowhere.json"}, r"tokenizer file .*nowhere.json does not exist"),
    ],
)
def test_bad_inputs(tmp_path, setup, kw, message):
    folder = tmp_path / (setup or "x")
    folder.mkdir()
    if setup == "empty":
        (folder / "a.bin").write_text("not read")
    elif setup == "blank":
        (folder / "a.txt").write_text("  \n\n")
    elif setup == "jsonl":
        (folder / "d.jsonl").write_text('{"body": "x"}\n')
    kw.setdefault("paths", [str(folder)])
    if kw["paths"] == ["missing"]:
        kw["paths"] = [str(tmp_path / "missing")]
    with pytest.raises(ValueError, match=message):
        prepare_data(DataConfig(cache_dir=str(tmp_path / "cache"), **kw), progress=False)
