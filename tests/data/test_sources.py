"""Corpus discovery and document reading: folders, stdlib, jsonl, parquet, bad bytes, the hashed split."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moeforge.data.sources import ReadReport, is_val, iter_documents, list_files, split_pieces, stdlib_files


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def read_all(files, text_field="text", max_bytes=None):
    report = ReadReport()
    return list(iter_documents(files, text_field, max_bytes, report)), report


def test_folder_is_recursive_sorted_and_filtered_by_extension(tmp_path):
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "a" / "z.md", "z")
    write(tmp_path / "a" / "skip.bin", "x")
    write(tmp_path / ".git" / "HEAD.txt", "hidden")
    files = list_files([str(tmp_path)], [".txt", ".md"])
    assert [f.key for f in files] == ["a/z.md", "b.txt"]
    # a file named explicitly is read whatever its extension; duplicates are read once, under the longest key
    named = [str(tmp_path / "a" / "skip.bin"), str(tmp_path / "a" / "z.md"), str(tmp_path), str(tmp_path / "b.txt")]
    for order in (named, named[::-1]):
        assert [f.key for f in list_files(order, [".txt", ".md"])] == ["skip.bin", "a/z.md", "b.txt"]


def test_missing_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"data path .*nope does not exist"):
        list_files([str(tmp_path / "nope")], [".txt"])


def test_stdlib_discovery_skips_tests_and_site_packages(tmp_path):
    for rel in [
        "os.py",
        "json/__init__.py",
        "test/test_os.py",
        "idlelib/idle_test/htest.py",
        "lib2to3/tests/data.py",
        "unittest/test/x.py",
        "site-packages/pkg/mod.py",
        "test_thing.py",
        "distutils/tests/t.py",
        "notes.txt",
    ]:
        write(tmp_path / rel, "x = 1\n")
    assert [f.key for f in stdlib_files(tmp_path)] == ["json/__init__.py", "os.py"]


def test_real_stdlib_has_no_test_files():
    files = stdlib_files()
    keys = [f.key for f in files]
    assert keys == sorted(keys) and "os.py" in keys and "json/__init__.py" in keys
    for k in keys:
        parts = k.split("/")
        assert not any(p in ("test", "tests", "site-packages") or p.startswith("test_") for p in parts), k
        assert "idle_test" not in parts


def test_undecodable_bytes_are_replaced(tmp_path):
    write(tmp_path / "bad.txt", b"caf\xe9 ok \xff\xfe end")
    docs, report = read_all(list_files([str(tmp_path)], [".txt"]))
    assert docs[0].text == "caf\ufffd ok \ufffd\ufffd end"
    assert report.replaced_files == 1 and "not valid UTF-8" in report.warnings()[0]


def test_jsonl_skips_bad_lines_and_counts_them(tmp_path):
    lines = [json.dumps({"text": "one"}), "{not json", json.dumps({"other": 1}), "", json.dumps({"text": "two"}), "[1]"]
    write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    docs, report = read_all(list_files([str(tmp_path)], [".jsonl"]))
    assert [d.text for d in docs] == ["one", "two"]
    assert [d.key for d in docs] == ["d.jsonl#0", "d.jsonl#4"]  # row index, not document index
    assert list(report.bad_lines.values()) == [3] and "skipped 3 bad line(s)" in report.warnings()[0]


def test_jsonl_without_the_field_names_it(tmp_path):
    write(tmp_path / "d.jsonl", json.dumps({"content": "a"}) + "\n" + json.dumps({"content": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"string field 'text' \(fields seen: content\)"):
        read_all(list_files([str(tmp_path)], [".jsonl"]))
    docs, _ = read_all(list_files([str(tmp_path)], [".jsonl"]), text_field="content")
    assert [d.text for d in docs] == ["a", "b"]


def test_parquet_column_and_nulls(tmp_path):
    pq.write_table(pa.table({"text": ["alpha", None, "gamma"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    docs, _ = read_all(list_files([str(tmp_path)], [".parquet"]))
    assert [(d.key, d.text) for d in docs] == [("t.parquet#0", "alpha"), ("t.parquet#2", "gamma")]
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: text, n\)"):
        read_all(list_files([str(tmp_path)], [".parquet"]), text_field="body")
    with pytest.raises(ValueError, match=r"column 'n' .* not text"):
        read_all(list_files([str(tmp_path)], [".parquet"]), text_field="n")


def test_max_bytes_takes_documents_in_order_and_cuts_the_last(tmp_path):
    write(tmp_path / "a.txt", "é" * 10)  # 20 bytes
    write(tmp_path / "b.txt", "bbbbbbbbbb")
    write(tmp_path / "c.txt", "   \n")  # blank: skipped
    files = list_files([str(tmp_path)], [".txt"])
    docs, report = read_all(files, max_bytes=25)
    assert [d.text for d in docs] == ["é" * 10, "bbbbb"] and report.capped
    docs, _ = read_all(files, max_bytes=5)  # a cut inside a 2-byte character drops it
    assert [d.text for d in docs] == ["éé"]
    docs, report = read_all(files)
    assert len(docs) == 2 and not report.capped


def test_long_files_become_pieces_at_line_ends():
    text = "".join(f"line {i}\n" for i in range(50_000))
    pieces = split_pieces(text, 10_000)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces)


def test_val_split_is_a_stable_hash():
    keys = [f"dir/file{i}.txt" for i in range(20_000)]
    picks = [is_val(k, 0.05) for k in keys]
    assert picks == [is_val(k, 0.05) for k in keys]
    assert 0.04 < sum(picks) / len(keys) < 0.06
    assert not any(is_val(k, 0.0) for k in keys)
    # growing the fraction only adds documents to val
    assert all(is_val(k, 0.1) for k, p in zip(keys, picks) if p)
