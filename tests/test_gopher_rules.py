"""Gopher's quality and repetition rules, each by hand on a small text with the value it must measure."""

from __future__ import annotations

import pytest

from winnow.selectors.gopher import Breach, GopherRules, check, duplicate_n_gram_chars, split_words, top_n_gram_chars

OFF = dict(
    min_doc_words=None, max_doc_words=None, min_avg_word_length=None, max_avg_word_length=None,
    max_symbol_word_ratio=None, max_bullet_lines_ratio=None, max_ellipsis_lines_ratio=None,
    max_non_alpha_words_ratio=None, min_stop_words=None, dup_line_frac=None, dup_para_frac=None,
    dup_line_char_frac=None, dup_para_char_frac=None, top_n_grams=(), dup_n_grams=(),
)


def only(**rule) -> GopherRules:
    """Every rule off but the given one."""
    return GopherRules(**{**OFF, **rule})


def test_words_split_as_spacy_english_does():
    text = "Hello world, it's a test... don't go-away. #tag 3.5"
    assert split_words(text) == ["Hello", "world", ",", "it", "'s", "a", "test", "...", "do", "n't", "go", "-",
                                 "away", ".", "#", "tag", "3.5"]
    assert split_words("see https://docs.python.org/3/library. now") == ["see", "https://docs.python.org/3/library",
                                                                       ".", "now"]


@pytest.mark.parametrize(("text", "rule", "expected"), [
    # word counts are of non-symbol words: `,` and `...` do not count
    ("Hello, world ... again", {"min_doc_words": 5}, Breach("min_doc_words", 3, 5)),
    ("Hello, world ... again", {"max_doc_words": 2}, Breach("max_doc_words", 3, 2)),
    ("aa bbbb", {"min_avg_word_length": 3.5}, Breach("min_avg_word_length", 3.0, 3.5)),
    ("aa bbbb", {"max_avg_word_length": 2.5}, Breach("max_avg_word_length", 3.0, 2.5)),
    # 2 hashes over 6 tokens (# a # b c d)
    ("#a #b c d", {"max_symbol_word_ratio": 0.3}, Breach("max_symbol_word_ratio", 2 / 6, 0.3)),
    # 2 ellipses over 5 tokens (wait ... what … ok)
    ("wait... what… ok", {"max_symbol_word_ratio": 0.3}, Breach("max_symbol_word_ratio", 2 / 5, 0.3)),
    ("- a\n- b\nc\n• d", {"max_bullet_lines_ratio": 0.7}, Breach("max_bullet_lines_ratio", 0.75, 0.7)),
    ("a...\nb\nc…\nd", {"max_ellipsis_lines_ratio": 0.3}, Breach("max_ellipsis_lines_ratio", 0.5, 0.3)),
    ("a 1 2 3", {"max_non_alpha_words_ratio": 0.8}, Breach("max_non_alpha_words_ratio", 0.25, 0.8)),
    # distinct stop words, case-sensitive: "The" is not "the"
    ("The cat and the dog and the bird", {"min_stop_words": 3}, Breach("min_stop_words", 2, 3)),
    ("A b\n\nA b\n\nC d", {"dup_para_frac": 0.3}, Breach("dup_para_frac", 1 / 3, 0.3)),
    ("Hello there\n\nHello there\n\nx", {"dup_para_char_frac": 0.2}, Breach("dup_para_char_frac", 11 / 27, 0.2)),
    ("a\nb\na\nc", {"dup_line_frac": 0.2}, Breach("dup_line_frac", 0.25, 0.2)),
    ("abc\nabc\nd", {"dup_line_char_frac": 0.2}, Breach("dup_line_char_frac", 3 / 9, 0.2)),
    # "a b" three times: 3 characters x 3 over 11
    ("a b a b a b", {"top_n_grams": ((2, 0.2),)}, Breach("top_n_grams.2", 9 / 11, 0.2)),
    # the second run of five words repeats the first: 19 characters (joined without spaces) over 47
    ("one two three four five one two three four five", {"dup_n_grams": ((5, 0.15),)},
     Breach("dup_n_grams.5", 19 / 47, 0.15)),
])
def test_each_rule_measures_its_value_and_names_itself(text, rule, expected):
    found = check(text, only(**rule))
    assert found is not None
    assert (found.rule, found.threshold) == (expected.rule, expected.threshold)
    assert found.value == pytest.approx(expected.value)


def test_a_rule_at_its_threshold_passes_and_off_rules_never_fire():
    assert check("a\nb\na\nc", only(dup_line_frac=0.25)) is None, "the rule is 'more than', as published"
    assert check("a 1 2 3", GopherRules(**OFF)) is None


def test_n_gram_character_counts():
    words = "a b a b a b".split()
    assert top_n_gram_chars(words, 2) == 9
    assert top_n_gram_chars(words, 7) == 0, "no 7-grams in six words"
    assert duplicate_n_gram_chars("x y x y x y".split(), 2) == 4, "a repeat skips its n words: xy at 2 and 4"


def test_repetition_rules_run_before_the_quality_rules_as_in_datatrove():
    text = "a b\n\na b"
    assert check(text, GopherRules()).rule == "dup_para_frac"
    assert check(text, GopherRules(dup_para_frac=None, dup_para_char_frac=None, dup_line_frac=None,
                                   dup_line_char_frac=None, top_n_grams=())).rule == "min_doc_words"


def test_decisions_agree_with_datatrove_on_2000_real_paragraphs():
    """DataTrove's GopherRepetitionFilter -> GopherQualityFilter (spaCy words) on the same texts: the
    keep/reject decision agrees on at least 99.5% (measured: 99.95%), and so do the rejection counts."""
    import importlib.util

    import pyarrow.parquet as pq
    from conftest import ROOT, shared_file

    pytest.importorskip("datatrove", reason="datatrove is a test dependency (pip install -e '.[test]')")
    spec = importlib.util.spec_from_file_location("eval_quality", ROOT / "eval" / "eval_quality.py")
    evaluation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluation)
    texts = pq.read_table(shared_file("docs_paragraphs.parquet"), columns=["text"]).column("text").to_pylist()[:2000]
    result = evaluation.compare(texts)
    assert result["decision_agreement"] >= 0.995, result["disagreements"][:5]
    assert abs(result["rejected_winnow"] - result["rejected_datatrove"]) <= 10
