import random

from moeforge.data.tokenizer import train_tokenizer
from moeforge.infer.detokenize import IncrementalDecoder

TEXT = "naïve café — 中文字符 and emoji 🙂🚀 mixed with plain ascii words. " * 30


def test_incremental_text_equals_full_decode_at_every_length():
    """Random token streams (valid text, multi-byte characters split across byte tokens, invalid
    byte sequences) decode incrementally to exactly what a full decode gives after every token."""
    tok = train_tokenizer([TEXT], 320)
    rng = random.Random(0)
    real = tok.encode(TEXT).ids
    byte_ids = [tok.token_to_id(t) for t in tok.get_vocab() if len(t) == 1]
    streams = [real[:400],
               [rng.randrange(tok.get_vocab_size()) for _ in range(300)],
               [rng.choice(byte_ids) for _ in range(300)]]
    for ids in streams:
        inc = IncrementalDecoder(tok)
        for i in range(1, len(ids) + 1):
            assert inc.decode(ids[:i]) == tok.decode(ids[:i]), (i, ids[:i][-4:])
    # the windows stay short: the committed text covers all but the last few tokens
    assert inc.read >= len(ids) - 8

