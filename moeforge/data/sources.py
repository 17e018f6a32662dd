"""Corpus sources: which files make up a corpus and the documents read from them.

A corpus is a sorted list of `SourceFile`s: plain text (`.txt`, `.md`, `.py`, ... read
whole, undecodable bytes replaced), `.jsonl` (one JSON object per line, its text field)
or `.parquet` (a text column, read through pyarrow). With no paths the corpus is the
running Python's standard library: its `.py` files without test folders or
site-packages.

Every document carries a `key` that does not depend on where the corpus lives or in
which order paths were given (its path relative to the folder named in the config, plus
`#row` for jsonl/parquet or `#piece` for long text files); `is_val` hashes that key, so
the validation split never changes between runs. Long text files are cut into pieces of
about `PIECE_BYTES` at line boundaries so that a single-file corpus still has
documents for both splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PIECE_BYTES = 1 << 16  # long text files become pieces of about this many bytes
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests"})


@dataclass(frozen=True)
class SourceFile:
    path: Path  # absolute
    key: str  # stable name used for the val split: path relative to the given folder, posix style

    @property
    def kind(self) -> str:
        suffix = self.path.suffix.lower()
        return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


@dataclass(frozen=True)
class Document:
    key: str
    text: str


@dataclass
class ReadReport:
    """What reading skipped, filled in while documents are read."""

    bad_lines: dict[str, int] = field(default_factory=dict)  # jsonl file -> lines skipped (bad JSON / no text field)
    replaced_files: int = 0  # text files that were not valid UTF-8 (bad bytes became U+FFFD)
    capped: bool = False  # reading stopped at max_bytes

    def warnings(self) -> list[str]:
        out = [f"skipped {n} bad line(s) in {path} (not JSON, or no text field)" for path, n in self.bad_lines.items()]
        if self.replaced_files:
            out.append(f"{self.replaced_files} file(s) were not valid UTF-8; undecodable bytes were replaced")
        return out


# ------------------------------------------------------------------ discovery
def is_test_path(parts: tuple[str, ...]) -> bool:
    """Whether a path (as components) belongs to a test suite or an installed package."""
    for p in parts:
        if p in SKIP_DIRS or p.startswith("test_") or p.endswith(("_test", "_tests")):
            return True
    return False


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """The standard library's `.py` files in sorted order, without tests and site-packages."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ValueError(f"the Python standard library folder {root} does not exist; pass data paths explicitly")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if is_test_path(rel):
            dirnames[:] = []
            continue
        for name in filenames:
            if name.endswith(".py") and not is_test_path((name,)):
                files.append(SourceFile(Path(dirpath) / name, "/".join((*rel, name))))
    return sorted(files, key=lambda f: f.key)


def list_files(paths: list[str], extensions: list[str]) -> list[SourceFile]:
    """Files named by `paths` (a folder: its files with these extensions, recursively), sorted by path.

    A file named explicitly is read whatever its extension. A file reached twice is read
    once, under its longest key (the one relative to the outermost folder), whatever the
    order of `paths`.
    """
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    found: dict[Path, SourceFile] = {}

    def add(f: SourceFile) -> None:
        if f.path not in found or len(f.key) > len(found[f.path].key):
            found[f.path] = f

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ValueError(f"data path {raw} does not exist")
        p = p.resolve()
        if p.is_file():
            add(SourceFile(p, p.name))
            continue
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .venv, ...
            for name in filenames:
                if name.lower().endswith(exts) and not name.startswith("."):
                    f = Path(dirpath) / name
                    add(SourceFile(f, f.relative_to(p).as_posix()))
    return sorted(found.values(), key=lambda f: str(f.path))


def fingerprint(files: list[SourceFile], stdlib: bool) -> list[list]:
    """What identifies the corpus for the cache: every file's key, path, size and mtime (+ Python for stdlib)."""
    rows: list[list] = [["python", sys.version]] if stdlib else []
    for f in files:
        st = f.path.stat()
        rows.append([f.key, str(f.path), st.st_size, st.st_mtime_ns])
    return rows


# ------------------------------------------------------------------ the split
def is_val(key: str, val_fraction: float) -> bool:
    """Deterministic hold-out: a document is in val when the hash of its key falls below val_fraction."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2.0**64 < val_fraction


# ------------------------------------------------------------------ reading
def read_text(path: Path, report: ReadReport) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        report.replaced_files += 1
        return data.decode("utf-8", errors="replace")


def split_pieces(text: str, max_bytes: int = PIECE_BYTES) -> list[str]:
    """Cut text at line ends into pieces of about max_bytes (counted in characters, close enough)."""
    if len(text) <= max_bytes:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + max_bytes)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def text_documents(f: SourceFile, report: ReadReport) -> Iterator[Document]:
    pieces = split_pieces(read_text(f.path, report))
    for i, piece in enumerate(pieces):
        yield Document(f.key if i == 0 else f"{f.key}#piece{i}", piece)


def jsonl_documents(f: SourceFile, text_field: str, report: ReadReport) -> Iterator[Document]:
    bad = good = 0
    fields_seen: set[str] = set()
    with open(f.path, encoding="utf-8", errors="replace") as fh:
        for row, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            value = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                bad += 1
                if isinstance(obj, dict):
                    fields_seen.update(obj)
                continue
            good += 1
            yield Document(f"{f.key}#{row}", value)
    if bad and not good and fields_seen:
        seen = ", ".join(sorted(fields_seen)[:10])
        raise ValueError(
            f"no line of {f.path} has a string field {text_field!r} (fields seen: {seen}); set text_field to the right one"
        )
    if bad:
        report.bad_lines[str(f.path)] = bad


def parquet_documents(f: SourceFile, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq  # local: only parquet corpora need it

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types for corrupt files
        raise ValueError(f"cannot read parquet file {f.path}: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(
            f"parquet file {f.path} has no column {text_field!r} (columns: {', '.join(names)}); set text_field"
        )
    typ = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or str(typ) == "string_view"):
        raise ValueError(f"column {text_field!r} of {f.path} holds {typ}, not text; set text_field to a text column")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield Document(f"{f.key}#{row}", value)
            row += 1


def iter_documents(
    files: list[SourceFile], text_field: str, max_bytes: int | None, report: ReadReport
) -> Iterator[Document]:
    """Non-blank documents in file order; with max_bytes, stop once that many UTF-8 bytes were yielded.

    The document that crosses the cap is cut to fit, so even a cap smaller than the first
    file gives some text.
    """
    total = 0
    for f in files:
        if f.kind == "jsonl":
            docs = jsonl_documents(f, text_field, report)
        elif f.kind == "parquet":
            docs = parquet_documents(f, text_field)
        else:
            docs = text_documents(f, report)
        for doc in docs:
            if not doc.text.strip():
                continue
            n = len(doc.text.encode("utf-8"))
            if max_bytes is not None and total + n > max_bytes:
                room = max_bytes - total
                cut = doc.text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
                if cut.strip():
                    yield Document(doc.key, cut)
                report.capped = True
                return
            total += n
            yield doc
