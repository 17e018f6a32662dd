"""Byte-level BPE: round trip, vocab limits, loading a tokenizer.json and finding its end-of-text token."""

import json

import pytest

from moeforge.data.tokenizer import EOT, eot_token, load_tokenizer, train_tokenizer

TEXT = "def f(x):\n\treturn x  # café ☕ 🙂\r\n\n  indented\x00 \ufffd 中文 Ωmega\n"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20], 320)


def test_round_trip_is_exact(tok):
    for s in [TEXT, " leading space", "trailing  ", "", "\n\n\n", "unseen: ʃʒ ∑ 𝔘"]:
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids) == s


def test_eot_is_id_zero_and_vocab_reaches_request(tok):
    assert eot_token(tok) == (EOT, 0)
    assert tok.get_vocab_size() == 320


def test_vocab_size_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ValueError, match="vocab_size 200 is too small for a byte-level BPE: it needs at least 257"):
        train_tokenizer(["abc"], 200)


def test_load_tokenizer_file_or_folder(tmp_path, tok):
    tok.save(str(tmp_path / "tokenizer.json"))
    for p in (tmp_path, tmp_path / "tokenizer.json"):
        assert load_tokenizer(p).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="tokenizer file .*missing.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "broken.json")


def test_eot_from_tokenizer_config_or_error(tmp_path):
    tok = train_tokenizer(["hello world"], 300)
    tok.add_special_tokens(["</s>", "<end>"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    assert eot_token(tok, path)[0] == EOT  # a well-known name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    assert eot_token(tok, path) == ("<end>", tok.token_to_id("<end>"))

    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="has no end-of-text token"):
        eot_token(bare)
