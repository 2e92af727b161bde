"""Gopher's heuristic quality and repetition rules (Rae et al. 2021, appendix A.1.1 and table A1), as
DataTrove's GopherRepetitionFilter and GopherQualityFilter implement them (docs/ALGORITHMS.md section 6).

Beam-free: `check(text, rules)` returns the first rule a text breaks, with the measured value, or None. The
rules run in DataTrove's order (repetition, then quality). Words come from `split_words`, which follows the
rules of spaCy's English tokenizer (DataTrove's word tokenizer for English) with regular expressions:
brackets, quotes and sentence punctuation are their own tokens, contractions split (`do` `n't`, `it` `'s`),
decimals, versions, abbreviations and URLs stay whole.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

PUNCT = "(){}\\[\\]<>_#*&,:;!?¿¡\"'`“”‘’«»"
PREFIX = re.compile(rf"^(?:[{PUNCT}§%=—–$£€¥]|\+(?![0-9])|\.\.+|…)")
SUFFIX = re.compile(
    rf"(?:[{PUNCT}—–]|\.\.+|…|['’]s|n't|'(?:re|ve|ll|d|m)|(?<=[0-9])%|(?<=[0-9a-z%)\]>\"'`])\.|(?<=[A-Z][A-Z])\.)$",
    re.IGNORECASE,
)
ABBREVIATION = re.compile(r"^(?:[A-Za-z]\.){2,}$")  # e.g. i.e. U.S.: spaCy's special cases keep their dots
INFIX = re.compile(r"(?<=[^\W_])-+(?=[^\W\d_])|(?<=[^\W_])[:<>=/](?=[^\W\d_])|(?<=[^\W\d_]),(?=[^\W\d_])"
                   r"|(?<=[a-z])\.(?=[A-Z])|\.\.+|…")
URL = re.compile(r"^https?://\S+?(?=[.,;:!?)\]]*$)")
PARAGRAPHS = re.compile(r"\n{2,}")
LINES = re.compile(r"\n+")
BULLETS = ("•", "-")
ELLIPSES = ("...", "…")


@dataclass(frozen=True)
class GopherRules:
    """Thresholds (the published ones by default); None switches a rule off."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: frozenset[str] = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = field(
        default=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)))


@dataclass(frozen=True)
class Breach:
    """The rule a text breaks (named as its config key), the value measured and the threshold."""

    rule: str
    value: float
    threshold: float

    def detail(self) -> str:
        return f"{self.rule} {self.value:.4g} (threshold {self.threshold:g})"


def split_words(text: str) -> list[str]:
    """Words as spaCy's English tokenizer cuts them: whitespace first, then prefixes and suffixes peeled off
    each piece (brackets, quotes, sentence punctuation, contractions, ellipses; abbreviations such as `e.g.`
    keep their dots), then infixes split (hyphens and slashes between letters, commas between letters)."""
    words: list[str] = []
    for piece in text.split():
        words.extend(_split_piece(piece))
    return words


def _split_piece(piece: str) -> list[str]:
    url = URL.match(piece)
    if url:
        return [url.group(), *_split_piece(piece[url.end():])] if url.end() < len(piece) else [piece]
    prefixes, suffixes = [], []
    while piece and (found := PREFIX.match(piece)) and found.end() < len(piece):
        prefixes.append(found.group())
        piece = piece[found.end():]
    if ABBREVIATION.match(piece):
        return [*prefixes, piece]
    while piece and (found := SUFFIX.search(piece)) and found.start() > 0:
        suffixes.insert(0, found.group())
        piece = piece[: found.start()]
    middle, start = [], 0
    for found in INFIX.finditer(piece):
        if found.start() > start:
            middle.append(piece[start: found.start()])
        middle.append(found.group())
        start = found.end()
    if start < len(piece):
        middle.append(piece[start:])
    return [*prefixes, *middle, *suffixes]


def is_symbol(word: str) -> bool:
    """A token made only of punctuation and symbols (Unicode categories P* and S*)."""
    return all(unicodedata.category(ch)[0] in "PS" for ch in word)


def duplicates(parts: list[str]) -> tuple[int, int]:
    """(elements equal to an earlier element, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for part in parts:
        if part in seen:
            count += 1
            chars += len(part)
        else:
            seen.add(part)
    return count, chars


def n_grams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i: i + n]) for i in range(len(words) - n + 1)]


def top_n_gram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram: its length times its count (0 without n-grams)."""
    grams = n_grams(words, n)
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def duplicate_n_gram_chars(words: list[str], n: int) -> int:
    """Characters of n-grams that repeat an earlier one; a repeat skips its n words (no overlapping count)."""
    seen: set[str] = set()
    chars = index = 0
    while index < len(words) - n + 1:
        gram = "".join(words[index: index + n])
        if gram in seen:
            chars += len(gram)
            index += n
        else:
            seen.add(gram)
            index += 1
    return chars


def _above(rule: str, value: float, threshold: float | None) -> Breach | None:
    return Breach(rule, value, threshold) if threshold is not None and value > threshold else None


def _below(rule: str, value: float, threshold: float | None) -> Breach | None:
    return Breach(rule, value, threshold) if threshold is not None and value < threshold else None


def repetition_breach(text: str, words: list[str], rules: GopherRules) -> Breach | None:
    length = len(text)
    paragraphs = PARAGRAPHS.split(text.strip())
    repeated, chars = duplicates(paragraphs)
    found = (_above("dup_para_frac", repeated / len(paragraphs), rules.dup_para_frac)
             or _above("dup_para_char_frac", chars / length, rules.dup_para_char_frac))
    if found:
        return found
    lines = LINES.split(text)
    repeated, chars = duplicates(lines)
    found = (_above("dup_line_frac", repeated / len(lines), rules.dup_line_frac)
             or _above("dup_line_char_frac", chars / length, rules.dup_line_char_frac))
    if found:
        return found
    for n, threshold in rules.top_n_grams:
        found = _above(f"top_n_grams.{n}", top_n_gram_chars(words, n) / length, threshold)
        if found:
            return found
    for n, threshold in rules.dup_n_grams:
        found = _above(f"dup_n_grams.{n}", duplicate_n_gram_chars(words, n) / length, threshold)
        if found:
            return found
    return None


def quality_breach(text: str, words: list[str], rules: GopherRules) -> Breach | None:
    content = [word for word in words if not is_symbol(word)]
    found = (_below("min_doc_words", len(content), rules.min_doc_words)
             or _above("max_doc_words", len(content), rules.max_doc_words))
    if found:
        return found
    if content:
        mean = sum(len(word) for word in content) / len(content)
        found = (_below("min_avg_word_length", mean, rules.min_avg_word_length)
                 or _above("max_avg_word_length", mean, rules.max_avg_word_length))
        if found:
            return found
    if words:
        found = (_above("max_symbol_word_ratio", text.count("#") / len(words), rules.max_symbol_word_ratio)
                 or _above("max_symbol_word_ratio", sum(text.count(e) for e in ELLIPSES) / len(words),
                           rules.max_symbol_word_ratio))
        if found:
            return found
    lines = text.splitlines() or [""]
    bullets = sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines)
    ellipses = sum(line.rstrip().endswith(ELLIPSES) for line in lines) / len(lines)
    found = (_above("max_bullet_lines_ratio", bullets, rules.max_bullet_lines_ratio)
             or _above("max_ellipsis_lines_ratio", ellipses, rules.max_ellipsis_lines_ratio))
    if found:
        return found
    if words:
        alphabetic = sum(any(ch.isalpha() for ch in word) for word in words) / len(words)
        found = _below("max_non_alpha_words_ratio", alphabetic, rules.max_non_alpha_words_ratio)
        if found:
            return found
    return _below("min_stop_words", len(rules.stop_words.intersection(words)), rules.min_stop_words)


def check(text: str, rules: GopherRules) -> Breach | None:
    """The first Gopher rule `text` breaks (repetition rules first, as DataTrove's pipelines run them)."""
    if not text:
        return Breach("min_doc_words", 0, rules.min_doc_words or 0)
    words = split_words(text)
    return repetition_breach(text, words, rules) or quality_breach(text, words, rules)
