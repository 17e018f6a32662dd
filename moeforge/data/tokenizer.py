"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load an existing tokenizer.json.

The trained tokenizer is GPT-2 style: the ByteLevel pre-tokenizer maps every byte to a
printable symbol, so any string (any bytes, after UTF-8 decoding) encodes without an
unknown token and `decode(encode(text)) == text`. Its one special token,
`<|endoftext|>`, gets id 0 and separates documents in the token stream; the trainer
uses it as eos. A loaded tokenizer (e.g. an HF checkpoint's) needs an end-of-text
token too: the `eos_token` of a `tokenizer_config.json` beside it, or a well-known name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
# end-of-text names used by common checkpoints, tried in order when no tokenizer_config.json says
EOT_CANDIDATES = (EOT, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>")
BYTE_ALPHABET = 256


def check_vocab_size(vocab_size: int) -> None:
    smallest = BYTE_ALPHABET + 1  # every byte symbol + <|endoftext|>
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least {smallest} "
            f"(256 byte symbols + {EOT}); use a larger vocab_size"
        )
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit token ids in uint32")


def new_byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts`; it may end smaller than vocab_size on a tiny corpus."""
    check_vocab_size(vocab_size)
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones the corpus lacks
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json a user named: the file itself, or the one inside a checkpoint folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"tokenizer file {p} does not exist; pass a tokenizer.json or a folder that holds one")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception for bad JSON or unknown models
        raise ValueError(f"cannot load tokenizer {p}: {e}") from None


def configured_eos(tokenizer_json: Path) -> str | None:
    """eos_token from a tokenizer_config.json next to the tokenizer, if there is one."""
    cfg = tokenizer_json.with_name("tokenizer_config.json")
    try:
        eos = json.loads(cfg.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def eot_token(tok: Tokenizer, tokenizer_json: Path | None = None) -> tuple[str, int]:
    """(text, id) of the token that separates documents; ValueError when the tokenizer has none."""
    names = [configured_eos(tokenizer_json)] if tokenizer_json is not None else []
    for name in [*names, *EOT_CANDIDATES]:
        if name is not None and (i := tok.token_to_id(name)) is not None:
            return name, i
    where = f" {tokenizer_json}" if tokenizer_json is not None else ""
    raise ValueError(
        f"tokenizer{where} has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)} and tokenizer_config.json's "
        "eos_token); add one or let moeforge train a tokenizer (tokenizer=None)"
    )


def tokenizer_digest(tok: Tokenizer) -> str:
    """Hash of the tokenizer's full JSON: two tokenizers with the same digest tokenize identically."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
