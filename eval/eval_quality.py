"""winnow's Gopher rules against DataTrove's GopherRepetitionFilter -> GopherQualityFilter on real text.

    make eval-quality [ARGS="--rows 2000 --file docs_paragraphs.parquet"]

Both see the same texts (the first --rows of a ../shared/data file, default docs_paragraphs.parquet) with the
published thresholds; prints the share of texts on which the keep/reject decision agrees, the share on which the
reason (first rule broken) agrees too, the rejections per rule on each side and the texts they disagree on.
DataTrove (and spaCy, its English word tokenizer) is a test-only dependency.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from winnow.selectors.gopher import GopherRules, check

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# DataTrove's reasons -> winnow's rule names (config keys)
DATATROVE_RULES = {
    "gopher_short_doc": "min_doc_words", "gopher_long_doc": "max_doc_words",
    "gopher_below_avg_threshold": "min_avg_word_length", "gopher_above_avg_threshold": "max_avg_word_length",
    "gopher_too_many_hashes": "max_symbol_word_ratio", "gopher_too_many_ellipsis": "max_symbol_word_ratio",
    "gopher_too_many_bullets": "max_bullet_lines_ratio", "gopher_too_many_end_ellipsis": "max_ellipsis_lines_ratio",
    "gopher_below_alpha_threshold": "max_non_alpha_words_ratio", "gopher_enough_stop_words": "min_stop_words",
    "dup_para_frac": "dup_para_frac", "dup_para_char_frac": "dup_para_char_frac", "dup_line_frac": "dup_line_frac",
    "dup_line_char_frac": "dup_line_char_frac", "empty": "min_doc_words",
    **{f"top_{n}_gram": f"top_n_grams.{n}" for n in (2, 3, 4)},
    **{f"duplicated_{n}_n_grams": f"dup_n_grams.{n}" for n in range(5, 11)},
}


def datatrove_decisions(texts: list[str]) -> list[str | None]:
    """DataTrove's first failing rule per text (None: kept), repetition filter first as in its examples."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    filters = [GopherRepetitionFilter(), GopherQualityFilter()]
    decisions = []
    for index, text in enumerate(texts):
        document, reason = Document(text=text, id=str(index)), None
        for step in filters:
            verdict = step.filter(document)
            if verdict is not True:
                reason = DATATROVE_RULES[verdict[1]] if isinstance(verdict, tuple) else "rejected"
                break
        decisions.append(reason)
    return decisions


def compare(texts: list[str]) -> dict:
    ours = [None if (breach := check(text, GopherRules())) is None else breach.rule for text in texts]
    theirs = datatrove_decisions(texts)
    decision = sum((a is None) == (b is None) for a, b in zip(ours, theirs, strict=True))
    reason = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return {
        "texts": len(texts),
        "decision_agreement": decision / len(texts),
        "reason_agreement": reason / len(texts),
        "rejected_winnow": sum(a is not None for a in ours),
        "rejected_datatrove": sum(b is not None for b in theirs),
        "winnow_by_rule": Counter(a for a in ours if a),
        "datatrove_by_rule": Counter(b for b in theirs if b),
        "disagreements": [(i, a, b) for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="docs_paragraphs.parquet")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--show", type=int, default=5, help="disagreements printed")
    args = parser.parse_args()
    path = SHARED / args.file
    if not path.exists():
        print(f"{path} is absent: this evaluation needs ../shared/data", file=sys.stderr)
        return 2
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()[: args.rows]
    result = compare(texts)
    print(f"{result['texts']} texts of {args.file}: keep/reject agreement {result['decision_agreement']:.4f}, "
          f"same first rule {result['reason_agreement']:.4f}; rejected: winnow {result['rejected_winnow']}, "
          f"DataTrove {result['rejected_datatrove']}")
    for rule in sorted(set(result["winnow_by_rule"]) | set(result["datatrove_by_rule"])):
        ours, theirs = result["winnow_by_rule"][rule], result["datatrove_by_rule"][rule]
        print(f"  {rule:28s} winnow {ours:5d}  DataTrove {theirs:5d}")
    for index, ours, theirs in result["disagreements"][: args.show]:
        print(f"  row {index}: winnow {ours}, DataTrove {theirs}: {texts[index][:160]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
