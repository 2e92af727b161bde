"""WRAP text handling without generation: segment bounds, prompts per style, cleaning rules."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

from winnow.rephrase import clean, prompts, segment
from winnow.selectors import lm

BAD_OUTPUTS = Path(__file__).parent / "data" / "smollm2_outputs.json"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lm.resolve_lm_path(lm.PACKAGED_LM)), local_files_only=True)


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("limit", [20, 60, 300])
def test_segments_stay_within_the_limit_and_split_only_at_sentences(tokenizer, limit):
    texts = pq.read_table(SAMPLE / "docs_paragraphs.parquet").column("text").to_pylist()[:80]
    for text in texts:
        pieces = segment.segment(text, tokenizer, limit)
        assert all(count(tokenizer, p) <= limit for p in pieces)
        assert " ".join(" ".join(p.split()) for p in pieces).replace(" ", "") == "".join(text.split())
        for sentence in segment.sentences(text):
            if count(tokenizer, sentence) <= limit:
                assert any(sentence in p for p in pieces), "a sentence that fits is never split"


def test_a_sentence_longer_than_the_limit_is_cut_at_words(tokenizer):
    sentence = " ".join(["configuration"] * 50) + "."
    pieces = segment.segment("Short one. " + sentence + " Last.", tokenizer, 16)
    assert pieces[0] == "Short one."
    assert all(count(tokenizer, p) <= 16 for p in pieces)
    assert all(not p.startswith("ation") for p in pieces)
    assert pieces[-1].endswith("Last.")


def test_sentences_split_at_end_punctuation_and_blank_lines():
    assert segment.sentences('He said "Stop." Then left! Why?\n\nNew para') == [
        'He said "Stop."', "Then left!", "Why?", "New para"]


def test_prompts_carry_the_papers_text_verbatim_with_and_without_a_system_turn(tokenizer):
    text = "The kernel schedules tasks."
    medium = prompts.STYLES["medium"]
    with_system = prompts.build_prompt(tokenizer, medium, text, system_turn=True)
    assert with_system == (
        f"<|im_start|>system\n{prompts.PREAMBLE}<|im_end|>\n<|im_start|>user\n{medium.instruction}\n\n{text}"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    without = prompts.build_prompt(tokenizer, medium, text, system_turn=False)
    assert f"<|im_start|>user\n{prompts.PREAMBLE}\n\n{medium.instruction}\n\n{text}<|im_end|>" in without
    assert prompts.accepts_system_turn(tokenizer)
    for style in prompts.STYLES.values():
        assert style.instruction in prompts.build_prompt(tokenizer, style, text)
    assert prompts.STYLES["qa"].instruction.startswith('Convert the following paragraph into a conversational')
    assert prompts.STYLES["easy"].instruction.endswith("that a toddler will understand:")


def test_plain_prompt_without_a_chat_template():
    class Plain:
        chat_template = None

    prompt = prompts.build_prompt(Plain(), prompts.STYLES["hard"], "Text.")
    assert prompt == f"{prompts.PREAMBLE}\nUSER: {prompts.STYLES['hard'].instruction}\n\nText.\nASSISTANT:"


def test_styles_resolve_aliases_and_custom_ones():
    assert [s.name for s in prompts.resolve_styles(["wikipedia", "qa"])] == ["medium", "qa"]
    custom = prompts.resolve_styles(["legal"], {"legal": "Rewrite as a contract clause:"})[0]
    assert custom.instruction == "Rewrite as a contract clause:" and custom.source_prefix == "legal"
    with pytest.raises(ValueError, match="unknown style 'poem'"):
        prompts.resolve_styles(["poem"])


def test_cleaning_rules_on_hand_written_cases():
    source = "The scheduler picks the next task to run on each CPU."
    ok, reason, _ = clean.clean("Sure! Here's a paraphrase of the paragraph:\n\nEach CPU gets its next job "
                                "from the scheduler.\n\nI made minor adjustments to the wording.", source, "medium",
                                True)
    assert ok == "Each CPU gets its next job from the scheduler." and reason is None
    listed = ("The paragraph contains several sentences that can be improved. Here's a suggested rewording of the "
              "paragraph:\n\nEach CPU takes its next task from the scheduler.\n\nI made the following changes:\n\n"
              "- Changed \"picks\" to \"takes\".\n- Added \"from\".")
    assert clean.strip_wrappers(listed) == "Each CPU takes its next task from the scheduler."
    assert clean.clean("anything", source, "medium", False)[1] == "truncated"
    assert clean.clean("Here is the paraphrase:", source, "medium", True)[1] == "empty"
    assert clean.clean(source, source, "medium", True)[1] == "echo"
    assert clean.clean("the cpu runs the task " * 12, source, "medium", True)[1] == "degenerate"
    assert clean.clean("The CPU runs tasks.", source, "qa", True)[1] == "no_qa_pair"
    qa = "Question: What does the scheduler do?\nAnswer: It picks the next task for each CPU."
    assert clean.clean(qa, source, "qa", True) == (qa, None, None)


def test_cleaning_rules_on_real_outputs_of_the_default_model():
    """Outputs SmolLM2-135M-Instruct produced for real documentation paragraphs (tests/data), labelled by
    hand with what cleaning must do: the expected reason, or the text that must survive."""
    cases = json.loads(BAD_OUTPUTS.read_text())["cases"]
    reasons = {case["expected_reason"] for case in cases}
    assert reasons == {None, "meta", "echo", "truncated", "degenerate", "no_qa_pair", "prompt_leak"}
    for case in cases:
        instruction = prompts.STYLES[case["style"]].instruction
        text, reason, _ = clean.clean(case["output"], case["input"], case["style"], case["finished"], instruction)
        assert reason == case["expected_reason"], case["output"][:200]
        if case.get("expected_start"):
            assert text.startswith(case["expected_start"]), text[:200]
        if case.get("stripped_start"):
            stripped = clean.strip_wrappers(case["output"])
            assert stripped.startswith(case["stripped_start"]), stripped[:200]
            assert case["stripped_must_not_contain"] not in stripped


def test_prompt_leaks_and_meta_leads_are_rejected_whatever_the_source_says():
    """Issue 16: an output that begins with the leaked preamble, or that repeats the style's instruction, is
    rejected; the meta rule reads the output's lead even when the source itself says "the sentence", and lets
    it pass only when the source holds that very sentence."""
    easy = prompts.STYLES["easy"].instruction
    source = "The sentence below names the lock. Readers take rcu_read_lock() before they read the list."
    leaked = f"{prompts.PREAMBLE} Readers take a lock first."
    assert clean.clean(leaked, source, "easy", True, easy)[:2] == (None, "prompt_leak")
    assert clean.clean(f"{easy}\n\nReaders take a lock.", source, "easy", True, easy)[1:] == \
        ("prompt_leak", "the output repeats the prompt's instruction")
    commentary = "The sentence is rephrased so that a child can read it. Readers lock, then read."
    assert clean.clean(commentary, source, "easy", True, easy)[1] == "meta"
    faithful = "The sentence below names the lock. First a reader locks, and only then does it look at the list."
    assert clean.clean(faithful, source, "easy", True, easy) == (faithful, None, None)
