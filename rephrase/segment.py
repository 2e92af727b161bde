"""Split a document at sentence boundaries into segments of at most N tokens of the generator's tokenizer.

Sentences are packed greedily in order; a segment's size is measured on the joined text (token counts of
pieces do not simply add up), so no segment exceeds N. A sentence longer than N on its own is cut at word
boundaries (and a single word longer than N at token boundaries): the only splits inside a sentence.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace, or at a blank
# line; abbreviations such as "e.g." are rare enough in training text to accept an occasional early split.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


def sentences(text: str) -> list[str]:
    parts = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start : match.end()].strip()
        if piece:
            parts.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        parts.append(tail)
    return parts


def _split_long(sentence: str, count: Callable[[str], int], limit: int, cut_tokens) -> list[str]:
    pieces: list[str] = []
    current = ""
    for word in sentence.split():
        candidate = f"{current} {word}" if current else word
        if count(candidate) <= limit:
            current = candidate
            continue
        if current:
            pieces.append(current)
        if count(word) <= limit:
            current = word
        else:
            pieces.extend(cut_tokens(word, limit))
            current = ""
    if current:
        pieces.append(current)
    return pieces


def segment(text: str, tokenizer, max_tokens: int = 300) -> list[str]:
    """Segments of `text`, each at most `max_tokens` tokens of `tokenizer` (no special tokens)."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")

    def count(piece: str) -> int:
        return len(tokenizer(piece, add_special_tokens=False)["input_ids"])

    def cut_tokens(word: str, limit: int) -> list[str]:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        pieces = [tokenizer.decode(ids[i : i + limit]) for i in range(0, len(ids), limit)]
        return [p for p in pieces if p.strip()]

    segments: list[str] = []
    current = ""
    for sentence in sentences(text):
        candidate = f"{current} {sentence}" if current else sentence
        if count(candidate) <= max_tokens:
            current = candidate
            continue
        if current:
            segments.append(current)
            current = ""
        if count(sentence) <= max_tokens:
            current = sentence
        else:
            segments.extend(_split_long(sentence, count, max_tokens, cut_tokens))
    if current:
        segments.append(current)
    return segments
