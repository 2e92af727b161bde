"""Clean a generated rephrasing, or reject it with a reason (docs/ALGORITHMS.md section 4).

Small instruction models wrap their answer: lead-ins ("Sure! Here's a paraphrase of the paragraph:"), trailing
commentary ("I made minor adjustments...", "Note: ..."), and sometimes no answer at all. Cleaning strips the
wrappers; rejection reasons:
  empty        nothing left after cleaning
  truncated    generation stopped at max_new_tokens, not at the end of the answer
  echo         the output is (nearly) the input copied back
  degenerate   repetition loops: the same line or word 4-grams over and over
  no_qa_pair   a qa-style output without a "Question:" followed by an "Answer:"
  prompt_leak  the output repeats the prompt: the WRAP preamble ("A chat between a curious user...") or the
               style's instruction
  meta         the output's first sentence talks about the text ("This paragraph...", "The sentence is
               rephrased...", "A toddler will understand...") instead of rephrasing it, unless the source holds
               that very sentence
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from winnow.rephrase.prompts import PREAMBLE

LEAK_WORDS = 8  # a prompt leaks when its first eight words appear in the output

_LEAD_IN = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|great)\b[^\n]{0,40}?[!.,:]\s*)?"
    r"(?:(?:here(?:'s| is| are)|below is|the following is)\b[^\n]{0,120}?:\s*\n?"
    r"|(?:sure|certainly|of course|absolutely)[!.,]\s*)",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^\s*(?:paraphrase[d]?(?: version| text| paragraph)?|rephrased(?: version)?)\s*:\s*", re.I)
_COMMENTARY = re.compile(
    r"^\s*(?:\(?note\b|i (?:made|have|hope|changed|used|tried|kept|replaced|rephrased|simplified)\b"
    r"|this (?:paraphrase|version|rephrasing)\b|in this (?:paraphrase|version)\b|let me know\b"
    r"|i've\b|the (?:paraphrase|rephrased (?:version|text)|original text)\b|explanation\s*:|changes made\s*:)",
    re.IGNORECASE,
)
_LEAD_PARAGRAPH = re.compile(r"here(?:'s| is| are)|below is|revised|rewritten|paraphrase|version", re.IGNORECASE)
# commentary about the text, read in the output's first sentence: it opens on the text as its subject ("The text
# conveys...", "In the paragraph, ...", "This paragraph provides...") or says it rephrases ("can be rephrased",
# "I can rephrase it", "a toddler will understand")
_META_LEAD = re.compile(
    r"^\W*(?:in\s+)?(?:the|this)\s+(?:original\s+|given\s+|above\s+|following\s+)?"
    r"(?:sentence|paragraph|text|passage|article)s?\b",
    re.IGNORECASE,
)
_META_ANYWHERE = re.compile(
    r"\btoddler|\b(?:can|could) be (?:rephrased|rewritten|paraphrased|simplified)\b"
    r"|\b(?:rephrase|paraphrase|rewrite|simplify) (?:it|this|the (?:text|paragraph|sentence|passage))\b"
    r"|\b(?:is|was) (?:rephrased|paraphrased|rewritten)\b|\bparaphrase of the\b",
    re.IGNORECASE,
)
_QUESTION = re.compile(r"question\s*\d*\s*:", re.IGNORECASE)
_ANSWER = re.compile(r"answer\s*\d*\s*:", re.IGNORECASE)


def strip_wrappers(output: str) -> str:
    text = output.strip()
    for _ in range(2):
        stripped = _LABEL.sub("", _LEAD_IN.sub("", text, count=1), count=1).strip()
        if stripped == text:
            break
        text = stripped
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) > 1 and paragraphs[0].rstrip().endswith(":") and len(paragraphs[0]) < 400 \
            and _LEAD_PARAGRAPH.search(paragraphs[0]) and not _QUESTION.search(paragraphs[0]):
        paragraphs.pop(0)
    # commentary runs to the end once it starts ("I made the following changes:" and its bullet list)
    cut = next((i for i, paragraph in enumerate(paragraphs) if i > 0 and _COMMENTARY.match(paragraph)), None)
    if cut is not None:
        paragraphs = paragraphs[:cut]
    text = "\n\n".join(paragraphs).strip()
    if len(paragraphs) == 1 and _COMMENTARY.match(text):
        return ""
    return text.strip().strip('"').strip()


def has_qa_pair(text: str) -> bool:
    question = _QUESTION.search(text)
    return bool(question and _ANSWER.search(text, question.end()))


def repetition(text: str) -> float:
    """Share of word 4-grams that repeat an earlier one (0 for short texts)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if len(grams) < 8:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _repeated_line(text: str) -> bool:
    lines = [line.strip().lower() for line in text.splitlines() if len(line.strip()) > 10]
    return any(lines.count(line) >= 3 for line in set(lines))


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def leaked_prompt(output: str, instruction: str | None) -> str | None:
    """Which part of the prompt the output repeats (its first LEAK_WORDS words, case and punctuation aside):
    'preamble' or 'instruction', else None."""
    words = _words(output)
    for name, prompt in (("preamble", PREAMBLE), ("instruction", instruction)):
        if prompt and " ".join(_words(prompt).split()[:LEAK_WORDS]) in words:
            return name
    return None


def clean(output: str, source: str, style: str, finished: bool, instruction: str | None = None
          ) -> tuple[str | None, str | None, str | None]:
    """(cleaned text, None, None) when usable, else (None, reason, detail). `instruction` is the style's
    instruction, which the output must not repeat (nor the preamble)."""
    if not finished:
        return None, "truncated", "stopped at max_new_tokens"
    leaked = leaked_prompt(output, instruction)
    if leaked:
        return None, "prompt_leak", f"the output repeats the prompt's {leaked}"
    text = strip_wrappers(output)
    if not text:
        return None, "empty", "nothing left after removing lead-ins and commentary"
    similarity = SequenceMatcher(None, text.lower(), source.strip().lower(), autojunk=False).ratio()
    if similarity > 0.9:
        return None, "echo", f"{similarity:.2f} similar to the input"
    repeated = repetition(text)
    if repeated > 0.3 or _repeated_line(text):
        return None, "degenerate", f"{repeated:.2f} of word 4-grams repeat"
    first_sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    talks_about_text = _META_LEAD.search(first_sentence) or _META_ANYWHERE.search(first_sentence)
    if talks_about_text and _words(first_sentence) not in _words(source):
        return None, "meta", f"talks about the text: {first_sentence[:80]!r}"
    if style == "qa" and not has_qa_pair(text):
        return None, "no_qa_pair", "no 'Question:' followed by 'Answer:'"
    return text, None, None
