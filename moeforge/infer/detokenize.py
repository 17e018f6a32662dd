"""Incremental detokenization: the text of a growing token list at O(1) decoding work per token.

Decoding a request's whole output after every new token costs O(n) per token, O(n^2) per
request: with the tiny preset's tokenizer, 0.18 ms per token on average over a 4,000-token
output (0.35 ms at its end), where a compiled decode step takes 0.5 ms. Here only a short window
is decoded: the tokens since the last point where the text ended on a complete character, plus
the window before it, whose decoded text is subtracted. Starting both decodes at the same token
keeps decoders that treat the first token specially (a leading-space marker) consistent.

The result equals `tokenizer.decode(ids)` for byte-level tokenizers at every length, including
an incomplete UTF-8 character at the end (shown as U+FFFD, as a full decode shows it) and
invalid byte sequences (tested). If a decoder's text for the window's first tokens changes once
more tokens follow (so the subtraction no longer lines up), that call falls back to a full decode.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""  # decoded text of ids[:read], which ends on a complete character
        self.prefix = 0  # window start: ids[prefix:read] decode to prefix_text, the tail of self.text
        self.read = 0
        self.prefix_text = ""

    def decode(self, ids: list[int]) -> str:
        """The text of ids, a list that only grew since the last call."""
        tail = self.tokenizer.decode(ids[self.prefix :])
        if not tail.startswith(self.prefix_text):  # earlier text changed: fall back to a full decode
            self.text = self.tokenizer.decode(ids)
            self.prefix = self.read = len(ids)
            self.prefix_text = ""
            return self.text
        delta = tail[len(self.prefix_text) :]
        current = self.text + delta
        if delta and not delta.endswith(REPLACEMENT):  # ends on a complete character: move the window
            self.text = current
            self.prefix, self.read = self.read, len(ids)
            self.prefix_text = self.tokenizer.decode(ids[self.prefix : self.read])
        return current
