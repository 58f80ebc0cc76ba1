"""A completion's text as its tokens arrive: decoded, cut before a stop string, and released to a stream only in
pieces that can no longer change (no half of a UTF-8 character, no start of a stop string).

Also the token strings of OpenAI's `logprobs` object: each token's own text, or `bytes:\\xNN...` for a token that
holds only part of a character (byte-level BPE), as OpenAI writes those.
"""

from __future__ import annotations

import functools

REPLACEMENT = "\ufffd"  # what decoding gives for bytes that do not (yet) form a character


class TextTracker:
    """The text of one completion's tokens so far.

    Args:
        tokenizer: anything with `decode(ids, skip_special_tokens=True)`.
        stop: strings that end the completion; the text keeps what comes before the first one.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` released so far
        self.stopped = False  # a stop string was found (and cut off)

    def add(self, token: int) -> int:
        """Appends a token; returns its character offset in the text (where its text starts)."""
        offset = len(self.text)
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            self._cut_at_stop(offset)
        return offset

    def _cut_at_stop(self, new_from: int) -> None:
        longest = max(len(s) for s in self.stop)
        begin = max(0, new_from - longest + 1)  # a stop string can end in the new text only
        hits = [at for at in (self.text.find(s, begin) for s in self.stop) if at >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def release(self, final: bool) -> str:
        """The text not released before that can no longer change (all of it when final)."""
        end = len(self.text) if final else max(self.sent, self._stable_end())
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def _stable_end(self) -> int:
        text = self.text.rstrip(REPLACEMENT)  # an incomplete character: wait for its other bytes
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held


def token_string(tokenizer, token: int) -> str:
    """A token's text for `logprobs`: its decoded text, its special token's name (`</s>`), or OpenAI's
    `bytes:\\xNN` form when it holds only part of a UTF-8 character."""
    text = tokenizer.decode([token])
    if REPLACEMENT not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token)
    if piece is None:
        return text
    decoder = _byte_decoder()
    if not all(ch in decoder for ch in piece):
        return text
    return "bytes:" + "".join(f"\\x{decoder[ch]:02x}" for ch in piece)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's table, inverted: each of the 256 byte symbols -> its byte. Printable bytes stand for
    themselves; the others are shifted to the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table
