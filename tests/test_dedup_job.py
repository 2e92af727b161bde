"""The dedup stage inside the job: exact copies and near duplicates of real texts are removed with a ledger row
naming their survivor, short and Chinese texts behave as documented, and a decision change reuses the hashing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, job_config

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job

pytestmark = pytest.mark.slow
ZH = ("我们今天下午一起去城市中心的公园散步，然后在湖边的小餐馆吃了一顿很好吃的晚饭。饭后我们沿着河岸慢慢走回家，"
      "一路上看到很多人在跳舞、唱歌和下棋，孩子们在草地上放风筝，天空中的云彩被夕阳染成了金色。")


def run(config):
    return run_job(plan_job(build_config(config), []))


def near_copy(text: str, every: int = 100) -> str:
    """The text with every `every`-th word replaced: 5 of its 5-grams changed per replaced word (a Jaccard
    similarity of about 0.9 for a text of 120 words)."""
    words = text.split()
    return " ".join("CHANGED" if i % every == every - 1 else word for i, word in enumerate(words))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """160 real docs paragraphs, with planted copies after them: exact, whitespace and case changed, near
    (every 25th word replaced), short texts (exact twins and different ones) and Chinese texts."""
    root = tmp_path_factory.mktemp("dedup")
    docs = pq.read_table(SAMPLE / "docs_paragraphs.parquet").to_pylist()
    long_docs = [row for row in docs if len(row["text"].split()) >= 120][:160]
    rows = [{"id": f"doc-{i}", "text": row["text"], "source": "docs"} for i, row in enumerate(long_docs)]
    planted_rows = [
        {"id": "exact-0", "text": long_docs[0]["text"], "source": "copies"},
        {"id": "exact-0-again", "text": long_docs[0]["text"], "source": "copies"},
        {"id": "spaced-1", "text": "  " + "   ".join(long_docs[1]["text"].split()) + "\n", "source": "copies"},
        {"id": "near-2", "text": near_copy(long_docs[2]["text"]), "source": "copies"},
        {"id": "near-3", "text": near_copy(long_docs[3]["text"]).upper(), "source": "copies"},
        {"id": "short-a", "text": "Hello world", "source": "short"},
        {"id": "short-a-twin", "text": "Hello world", "source": "short"},
        {"id": "short-b", "text": "Goodbye world", "source": "short"},
        {"id": "zh-0", "text": ZH, "source": "zh"},
        {"id": "zh-0-near", "text": ZH.replace("晚饭", "午饭"), "source": "zh"},
        {"id": "zh-1", "text": "这个软件包提供了处理图像文件的命令行工具和开发库，支持多种格式。", "source": "zh"},
    ]
    (root / "input").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "input" / "a.parquet", row_group_size=64)
    pq.write_table(pa.Table.from_pylist(planted_rows), root / "input" / "b.parquet")
    return root


def planted_text(planted, row: int) -> str:
    return pq.read_table(planted / "input" / "a.parquet").column("text")[row].as_py()


def output_bytes(output) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*.parquet"))}


def ledger_of(output) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(output / "ledger").to_pylist()}


def test_planted_duplicates_are_removed_and_name_their_survivor(planted):
    output = planted / "out"
    manifest = run(job_config(planted / "input" / "*", output, dedup={"enabled": True}))
    ledger = ledger_of(output)
    removed = {i: (row["reason"], row["duplicate_of"]) for i, row in ledger.items() if row["fate"] == "deduplicated"}
    assert removed == {
        "exact-0": ("exact_duplicate", "doc-0"),
        "exact-0-again": ("exact_duplicate", "doc-0"),
        "spaced-1": ("exact_duplicate", "doc-1"),
        "near-2": ("near_duplicate", "doc-2"),
        "near-3": ("near_duplicate", "doc-3"),
        "short-a-twin": ("exact_duplicate", "short-a"),
        "zh-0-near": ("near_duplicate", "zh-0"),
    }
    assert all(row["stage"] == "dedup" for i, row in ledger.items() if i in removed)
    assert "Jaccard" in ledger["near-2"]["detail"] and "component of 2" in ledger["near-2"]["detail"]
    assert "component of 3" in ledger["exact-0"]["detail"]
    assert ledger["short-b"]["fate"] == "kept", "texts too short for a 5-gram never merge by their empty signature"
    summary = manifest["dedup"]
    assert summary["removed"] == 7 and summary["components"] == 6
    assert summary["removed_by_reason"] == {"exact_duplicate": 4, "near_duplicate": 3}
    assert summary["removed_by_source"] == {"copies": 5, "short": 1, "zh": 1}
    assert summary["component_sizes"] == {"2": 5, "3-4": 1}
    assert summary["largest"][0]["size"] == 3 and summary["largest"][0]["survivor"] == "doc-0"
    assert summary["largest"][0]["texts"] == [planted_text(planted, 0)[:200]] * 3, "its first three members' texts"
    report = (output / "report" / "index.html").read_text()
    assert "Deduplication (exact and MinHash)" in report and "near_duplicate" in report


def test_the_longest_text_survives_when_asked(planted, tmp_path):
    run(job_config(planted / "input" / "*", tmp_path / "out", dedup={"enabled": True, "keep": "longest",
                                                                     "near": False}))
    ledger = ledger_of(tmp_path / "out")
    assert ledger["spaced-1"]["fate"] == "kept", "the copy with more whitespace is the longest"
    assert ledger["doc-1"]["duplicate_of"] == "spaced-1"
    assert ledger["near-2"]["fate"] == "kept", "near: false leaves near duplicates alone"


def test_the_highest_keep_column_survives_and_missing_values_lose(planted, tmp_path):
    texts = [planted_text(planted, row) for row in range(3)]
    rows = [{"id": "a", "text": texts[0], "score": 0.5}, {"id": "a-copy", "text": texts[0], "score": 0.9},
            {"id": "b", "text": texts[1], "score": None}, {"id": "b-copy", "text": texts[1], "score": 0.1},
            {"id": "c", "text": texts[2], "score": 0.3}, {"id": "c-copy", "text": texts[2], "score": 0.3}]
    (tmp_path / "input").mkdir()
    pq.write_table(pa.Table.from_pylist([{**row, "source": "scored"} for row in rows]),
                   tmp_path / "input" / "scored.parquet")
    run(job_config(tmp_path / "input" / "*", tmp_path / "out",
                   dedup={"enabled": True, "keep": "column", "keep_column": "score"}))
    ledger = ledger_of(tmp_path / "out")
    assert {i: row["duplicate_of"] for i, row in ledger.items() if row["fate"] == "deduplicated"} == {
        "a": "a-copy", "b": "b-copy", "c-copy": "c"}, "the highest score wins; a tie goes to the first in input order"


def test_a_decision_change_reuses_the_candidates_and_reruns_are_identical(planted, tmp_path):
    config = job_config(planted / "input" / "*", tmp_path / "out", dedup={"enabled": True})
    first = run(config)
    first_bytes = output_bytes(tmp_path / "out")
    config["dedup"]["threshold"] = 0.99
    second = run(config)
    steps = next(entry for entry in second["stages"] if entry["stage"] == "dedup")["steps"]
    assert [(step["step"], step["reused"]) for step in steps] == [("candidates", True), ("decide", False)]
    ledger = ledger_of(tmp_path / "out")
    assert ledger["near-2"]["fate"] == "kept" and ledger["exact-0"]["fate"] == "deduplicated", \
        "a stricter check keeps the near copies; exact copies need no check"
    config["dedup"]["threshold"] = 0.8
    third = run(config)
    assert [entry["reused"] for entry in third["stages"]] == [True, True]
    assert output_bytes(tmp_path / "out") == first_bytes
    assert third["counts"] == first["counts"]
    forced = run_job(plan_job(build_config(config), []), force=True)
    assert forced["counts"] == first["counts"]
    assert output_bytes(tmp_path / "out") == first_bytes


def test_datatrove_shingles_match_what_its_tokenizer_merges(planted, tmp_path):
    """`dedup.shingles: datatrove` splits words as DataTrove's English tokenizer does: `cannot` and `can not`,
    `500MB` and `500 MB` give the same shingles (Jaccard 1), where winnow's words see different ones; a Chinese
    text is one word to it, too short for a 5-gram, so its near copy is left alone (only exact copies go)."""
    rows = [
        {"id": "a", "text": "We cannot ship the 500MB image to every mirror tonight", "source": "t"},
        {"id": "b", "text": "We can not ship the 500 MB image to every mirror tonight", "source": "t"},
        {"id": "zh-0", "text": ZH, "source": "zh"},
        {"id": "zh-0-near", "text": ZH.replace("晚饭", "午饭"), "source": "zh"},
    ]
    (tmp_path / "input").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input" / "a.parquet")
    fates = {}
    for kind in ("words", "datatrove"):
        output = tmp_path / kind
        manifest = run(job_config(tmp_path / "input" / "*", output, dedup={"enabled": True, "shingles": kind}))
        assert manifest["dedup"]["settings"]["shingles"] == kind
        fates[kind] = {i: (row["fate"], row["duplicate_of"]) for i, row in ledger_of(output).items()}
    assert fates["words"]["b"] == ("kept", None) and fates["words"]["zh-0-near"] == ("deduplicated", "zh-0")
    assert fates["datatrove"]["b"] == ("deduplicated", "a") and fates["datatrove"]["zh-0-near"] == ("kept", None)
    assert ledger_of(tmp_path / "datatrove")["b"]["detail"].startswith("Jaccard 1 to a ")


def drifted(text: str, steps: int) -> list[str]:
    """`steps` versions of the text, each with one more word changed than the one before (Jaccard about 0.92 to
    its neighbour, 5-grams): neighbours are near copies, the ends are not, so the pairs form chains, not stars."""
    words, versions = text.split(), []
    for step in range(steps):
        words[(step * 9 + 3) % len(words)] = f"DRIFT{step}"
        versions.append(" ".join(words))
    return versions


def test_graph_rounds_join_the_components_the_driver_does(planted, tmp_path):
    """`dedup.components: graph` (large-star/small-star rounds in passes) gives the driver's union-find output
    byte for byte, on chains of drifting copies that take it more than one round, beside the planted copies."""
    docs = pq.read_table(planted / "input" / "a.parquet").to_pylist()
    rows = [{"id": f"chain-{c}-{s}", "text": text, "source": f"chain-{c}"}
            for c in range(4) for s, text in enumerate(drifted(docs[c]["text"], 12))]
    (tmp_path / "input").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[::-1]), tmp_path / "input" / "c.parquet", row_group_size=16)
    inputs = [planted / "input" / "a.parquet", planted / "input" / "b.parquet", tmp_path / "input" / "c.parquet"]
    for path in inputs[:2]:
        (tmp_path / "input" / path.name).write_bytes(path.read_bytes())
    outputs, summaries = {}, {}
    for mode in ("driver", "graph"):
        output = tmp_path / mode
        manifest = run(job_config(tmp_path / "input" / "*", output, dedup={"enabled": True, "components": mode}))
        outputs[mode], summaries[mode] = output_bytes(output), dict(manifest["dedup"])
    assert summaries["driver"].pop("joined") == "driver (union-find)"
    joined = summaries["graph"].pop("joined")
    rounds = int(joined.split("(")[1].split()[0])
    assert joined.startswith("graph (") and rounds > 1, joined
    summaries["driver"].pop("settings"), summaries["graph"].pop("settings")
    assert summaries["graph"] == summaries["driver"]
    assert outputs["graph"] == outputs["driver"]
    ledger = ledger_of(tmp_path / "graph")
    chained = {row["duplicate_of"] for i, row in ledger.items() if i.startswith("chain-")
               and row["fate"] == "deduplicated"}
    assert len(chained) >= 4 and summaries["graph"]["removed"] > 8
