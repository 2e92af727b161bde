"""Property-based: whatever a row holds, validation gives it exactly one outcome, and a rejected row always
becomes a ledger row with a known reason that the ledger schema accepts."""

from __future__ import annotations

from apache_beam.coders import FastPrimitivesCoder
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.pipelines.config import InputConfig
from winnow.pipelines.io.read import ReadTask, make_record
from winnow.pipelines.io.text_checks import CONTROL_CHARACTERS
from winnow.pipelines.io.write import ledger_table
from winnow.pipelines.stages.validate.checks import REJECTED, VALID, check_record, first_of_duplicates

REASONS = {"null_text", "non_string_text", "invalid_utf8", "empty_text", "text_too_long", "missing_text",
           "missing_id", "invalid_id", "invalid_source",
           "invalid_column", "control_characters"}
values = st.one_of(
    st.none(), st.text(), st.binary(max_size=40), st.integers(), st.floats(allow_nan=True), st.booleans(),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["", "   ", "\x00\x01\x02", "\ud800 lone surrogate", "ok text", "x" * 300]),
)
nested = st.recursive(values, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
    st.sampled_from(["k", "\udc80"]), inner, max_size=2), max_leaves=4)
rows = st.dictionaries(st.sampled_from(["id", "text", "source", "other", "\ud83d"]), nested, max_size=4)
coder = FastPrimitivesCoder()


@settings(max_examples=300, deadline=None)
@given(st.lists(rows, min_size=1, max_size=12))
def test_every_row_gets_exactly_one_outcome_and_rejections_fit_the_ledger(batch):
    config = InputConfig(path="x.jsonl", columns={"id": "id", "text": "text", "source": "source"})
    task = ReadTask("data/x.jsonl", 0, "jsonl")
    valid, rejected = [], []
    for row_number, values_ in enumerate(batch):
        record = make_record(values_, task, row_number, config)
        coder.encode(record)  # Beam encodes elements at any step (if only to sample sizes): this must not raise
        outcomes = check_record(record, max_bytes=200, control_characters="reject")
        assert len(outcomes) == 1
        route, item = outcomes[0]
        (valid if route == VALID else rejected).append(item)
        if route == REJECTED:
            assert item["fate"] == "rejected" and item["stage"] == "validate" and item["reason"] in REASONS
            assert item["id"] and item["detail"]
        else:
            assert isinstance(item["text"], str) and item["text"].strip()
            assert len(item["text"].encode("utf-8")) <= 200 and item["id"]
            assert not CONTROL_CHARACTERS.search(item["text"])
    by_id: dict[str, list] = {}
    for record in valid:
        by_id.setdefault(record["id"], []).append(record)
    kept = 0
    for group in by_id.values():
        first, duplicates = first_of_duplicates(group)
        kept += 1
        rejected.extend(duplicates)
        assert all(row["reason"] == "duplicate_id" for row in duplicates)
    assert kept + len(rejected) == len(batch)
    if rejected:
        table = ledger_table(rejected)
        assert table.num_rows == len(rejected)
        assert table.column("reason").null_count == 0
