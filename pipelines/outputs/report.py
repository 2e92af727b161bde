"""`winnow report OUT`: one self-contained HTML page (OUT/report/index.html) that makes a run legible.

Built from the manifest, the ledger and the shards only (and the input files, for the texts of records that
were taken out), with inline SVG plots from matplotlib, so the page needs no network and no other file.
Sections appear only for stages that ran: the funnel of fates per stage, pruning (cluster sizes, complexity
vs quota, SemDeDup pairs), selection (score distribution with the threshold, the prototype's top SAE features
and the records that activate them), rephrasing (acceptance per style, rephrasings beside their originals),
the mixture across shards with its temperature schedule, and timings.
"""

from __future__ import annotations

import importlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.io.storage import join, open_file, read_json, write_bytes
from winnow.pipelines.outputs.report_html import esc as _esc
from winnow.pipelines.outputs.report_html import figure as _figure
from winnow.pipelines.outputs.report_html import svg as _svg
from winnow.pipelines.outputs.report_html import table as _table

REPORT_DIR = "report"
EXAMPLES = 4
SNIPPET = 400


def _snippet(text: str | None) -> str:
    if text is None:
        return "<em>(text not available)</em>"
    short = text if len(text) <= SNIPPET else text[:SNIPPET] + " ..."
    return _esc(short)


class _Texts:
    """Texts by (input_file, input_row) from the input files, read once per file on demand."""

    def __init__(self, config: dict[str, Any]):
        self.column = config["input"]["columns"]["text"]
        self.files: dict[str, list] = {}

    def get(self, file: str, row: int) -> str | None:
        if file not in self.files:
            try:
                if file.lower().endswith((".parquet", ".pq")):
                    self.files[file] = _read_parquet(file, [self.column]).column(self.column).to_pylist()
                else:
                    with open_file(file) as handle:
                        lines = handle.read().decode("utf-8", errors="replace").split("\n")
                    self.files[file] = [_json_text(line, self.column) for line in lines]
            except Exception:  # noqa: BLE001 - an input gone or unreachable: the report shows no text
                self.files[file] = []
        rows = self.files[file]
        value = rows[row] if 0 <= row < len(rows) else None
        return value if isinstance(value, str) else None


def _json_text(line: str, column: str):
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value.get(column) if isinstance(value, dict) else None


def funnel_section(manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]
    rows = [[_esc(r["fate"]), _esc(r["stage"]), _esc(r["reason"] or ""), f"{r['rows']:,}"]
            for r in counts["by_stage_reason"]]
    from winnow.pipelines.stages import STAGES, ledger_stage_order

    ran = [entry["stage"] for entry in manifest.get("stages", [])] or [stage.name for stage in STAGES]
    order = ledger_stage_order(ran)
    removed = Counter()
    for r in counts["by_stage_reason"]:
        if r["fate"] != "kept":
            removed[r["stage"]] += r["rows"]
    stages, remaining, left = [], [], counts["input_records"]
    stages.append("input")
    remaining.append(left)
    for stage in order:
        if removed.get(stage):
            left -= removed[stage]
            stages.append(f"after {stage}")
            remaining.append(left)
    figure, axis = _figure(7.5, 0.5 + 0.45 * len(stages))
    axis.barh(range(len(stages))[::-1], remaining, color="#4477aa")
    for y, value in zip(range(len(stages))[::-1], remaining, strict=True):
        axis.text(value, y, f" {value:,}", va="center", fontsize=9)
    axis.set_yticks(range(len(stages))[::-1], stages)
    axis.set_xlabel("input records remaining")
    axis.set_title("Funnel")
    fates = ", ".join(f"{n:,} {fate}" for fate, n in counts["by_fate"].items())
    synthetic = ""
    if "synthetic" in counts:
        made = counts["synthetic"]
        outcome = ", ".join(f"{n:,} {f}" for f, n in made["by_fate"].items())
        synthetic = f"<p>Rephrasings: {made['generated']:,} generated ({outcome}).</p>"
    return (f"<h2 id='funnel'>Funnel</h2><p>{counts['input_records']:,} input records: {fates}.</p>{synthetic}"
            f"{_svg(figure)}{_table(['fate', 'stage', 'reason', 'rows'], rows)}")


def _rows(table, mask) -> list[dict[str, Any]]:
    return table.filter(mask).to_pylist()


def validate_section(manifest: dict[str, Any], **_) -> str:
    """Only when validation changed records (control characters stripped): how many, per source."""
    changed = manifest["validate"].get("changed_by_source") or {}
    if not changed:
        return ""
    rows = [[_esc(source), f"{count:,}"] for source, count in changed.items()]
    return (f"<h2 id='validate'>Validation</h2><p>{sum(changed.values()):,} records kept with their control "
            f"characters and ANSI escape sequences stripped (validate.control_characters: strip); their ledger rows "
            f"say what was removed.</p>{_table(['source', 'records changed'], rows)}")


def prune_section(manifest: dict[str, Any], ledger, texts: _Texts, **_) -> str:
    prune = manifest["prune"]
    clusters = prune["clusters"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.hist([c["members"] for c in clusters], bins=min(40, max(5, len(clusters) // 2)), color="#4477aa")
    left.set_xlabel("records per cluster")
    left.set_ylabel("clusters")
    left.set_title(f"Cluster sizes (k = {prune['k']})")
    points = [(c["complexity"], c["quota"] / c["survivors"]) for c in clusters
              if c["complexity"] is not None and c["survivors"]]
    if points:
        right.scatter([p[0] for p in points], [p[1] for p in points], s=12, color="#cc6677")
    right.set_xlabel("complexity (d_inter x d_intra)")
    right.set_ylabel("quota / survivors")
    right.set_title("Complexity vs share kept")
    import pyarrow.compute as pc

    pairs = _rows(ledger, pc.equal(ledger["fate"], "deduplicated"))[:EXAMPLES]
    wanted = pa.array([row["duplicate_of"] for row in pairs], pa.string())
    not_duplicate = pc.invert(pc.fill_null(pc.equal(ledger["reason"], "duplicate_id"), False))
    by_id = {row["id"]: row for row in _rows(ledger, pc.and_(pc.is_in(ledger["id"], wanted), not_duplicate))}
    pair_rows = []
    for row in pairs:
        kept = by_id.get(row["duplicate_of"])
        pair_rows.append([
            _snippet(texts.get(row["input_file"], row["input_row"])),
            _snippet(texts.get(kept["input_file"], kept["input_row"]) if kept else None),
            _esc(row["detail"]),
        ])
    pairs_html = _table(["removed", "kept (its earlier near-duplicate)", "detail"], pair_rows) if pair_rows \
        else "<p>No semantic duplicates were removed.</p>"
    return (f"<h2 id='prune'>Pruning</h2><p>{prune['records']:,} records in {prune['k']} clusters; "
            f"{prune['survivors']:,} survive SemDeDup; budget {prune['budget']:,} "
            f"({_esc(prune['settings']['strategy'])}, keep {_esc(prune['settings']['keep'])}).</p>{_svg(figure)}"
            f"<h3>SemDeDup pairs</h3>{pairs_html}")


def select_section(manifest: dict[str, Any], ledger, **_) -> str:
    select = manifest["select"]
    scores = ledger["select_score"].drop_null().to_numpy()
    figure, axis = _figure()
    axis.hist(scores, bins=50, color="#4477aa")
    if select.get("threshold_score") is not None:
        axis.axvline(select["threshold_score"], color="#cc3311", label=f"threshold {select['threshold_score']:.4g}")
        axis.legend()
    axis.set_xlabel(f"{select['method']} score")
    axis.set_ylabel("records")
    axis.set_title("Selection scores")
    model = (f"model {_esc(select['model'])}, layer {select['layer']}, SAE {_esc(select['sae'])} "
             f"(d_sae {select['d_sae']}, k {select['sae_k']}, sha256 {select['sae_fingerprint'][:12]})"
             if select["method"] == "mona" else "")
    if select.get("shortlist"):
        model += (f" Only the {select['shortlisted']:,} records of a {_esc(select['shortlist'])} shortlist "
                  f"({select['shortlist_multiple']} x the selection) were scored; the others are "
                  f"<code>outside_shortlist_{_esc(select['shortlist'])}</code> in the ledger.")
    features = ""
    if select.get("prototype_top_features"):
        rows = [[str(f["feature"]), f"{f['prototype_value']:.4f}",
                 "<br>".join(f"{r['value']:.3f}: {_snippet(r['text'][:200])}" for r in f["top_records"])]
                for f in select["prototype_top_features"]]
        features = "<h3>What the task means to the model</h3>" + _table(
            ["SAE feature", "prototype value", "records that activate it most"], rows)
    return (f"<h2 id='select'>Task selection ({_esc(select['method'])})</h2><p>{select['selected']:,} of "
            f"{select['pool']:,} records kept, most like {select['targets']} target examples. {model}</p>"
            f"{_svg(figure)}{features}")


def rephrase_section(manifest: dict[str, Any], shards: list[dict[str, Any]], ledger, texts: _Texts, **_) -> str:
    rephrase = manifest["rephrase"]
    rows = []
    for style, entry in rephrase["styles_summary"].items():
        reasons = ", ".join(f"{n} {r}" for r, n in entry["rejected"].items()) or "-"
        acceptance = "-" if entry["acceptance"] is None else f"{entry['acceptance']:.0%}"
        ratio = "-" if entry["length_ratio"] is None else f"{entry['length_ratio']:.2f}"
        rows.append([_esc(style), str(entry["generated"]), acceptance, _esc(reasons), ratio])
    summary = _table(["style", "generated", "accepted", "rejected", "length out/in"], rows)
    import pyarrow.compute as pc

    chosen, seen = [], Counter()
    for row in shards:
        if seen[row["style"]] < 2:
            seen[row["style"]] += 1
            chosen.append(row)
    parents = pa.array([row["parent_id"] for row in chosen], pa.string())
    positions = {row["id"]: (row["input_file"], row["input_row"]) for row in _rows(
        ledger, pc.and_(pc.is_in(ledger["id"], parents), pc.is_null(ledger["parent_id"])))}
    examples = []
    for row in chosen:
        where = positions.get(row["parent_id"])
        source_text = texts.get(*where) if where else None
        examples.append([_esc(row["style"]), _snippet(source_text), _snippet(row["text"])])
    side = _table(["style", "original", "rephrased"], examples) if examples else "<p>No accepted rephrasings.</p>"
    return (f"<h2 id='rephrase'>Rephrasing</h2><p>Model {_esc(rephrase['model'])} ({_esc(rephrase['backend'])}), "
            f"{rephrase['records_chosen']:,} records chosen; {rephrase['segments_generated']:,} segments generated, "
            f"{rephrase['segments_reused_from_cache']:,} reused from the cache.</p>{summary}<h3>Side by side</h3>"
            f"{side}")


def mix_section(manifest: dict[str, Any], **_) -> str:
    mix = manifest["mix"]
    if not mix.get("shards"):
        return ""
    import numpy as np

    sources = sorted(mix["sources"])
    shares = np.array([[shard["rows_per_source"].get(s, 0) / max(1, shard["rows"]) for s in sources]
                       for shard in mix["shards"]])
    figure, axis = _figure(9, 4)
    x = np.arange(len(mix["shards"]))
    axis.stackplot(x, shares.T, labels=sources)
    axis.set_xlabel("shard (training order)")
    axis.set_ylabel("share of the shard")
    axis.set_ylim(0, 1)
    axis.set_title("Mixture per shard")
    axis.legend(loc="upper left", bbox_to_anchor=(1.08, 1), fontsize=8)
    twin = axis.twinx()
    taus = [sum(tau for _, tau in shard["tau"]) / len(shard["tau"]) for shard in mix["shards"]]
    twin.step(x, taus, where="mid", color="black", linewidth=1.5)
    twin.set_ylabel("temperature tau")
    rows = [[_esc(s), f"{v['size']:,}", f"{v['rows']:,}", f"{v['epochs']:.2f}", f"{v['expected_share']:.4f}",
             f"{v['realised_share']:.4f}"] for s, v in mix["sources"].items()]
    return (f"<h2 id='mix'>Mixture</h2><p>{mix['total']:,} records in {len(mix['shards'])} shards, schedule "
            f"{_esc(json.dumps(mix['schedule']))} ({_esc(mix['schedule_kind'])}).</p>{_svg(figure)}"
            + _table(["source", "size", "rows", "epochs", "expected share", "realised share"], rows))


def timings_section(manifest: dict[str, Any]) -> str:
    """Wall time of the job's phases, and per stage the time its main step spent working (the `busy_ms`
    metric, summed over workers and windows: model and algorithm time, not waiting)."""
    rows = [[_esc(k), f"{v:.2f} s"] for k, v in manifest["timings"].items()]
    metrics = manifest.get("metrics") or {}
    busy = [(name.split(".")[1], value) for name, value in metrics.items()
            if name.endswith(".busy_ms") and isinstance(value, dict) and value["count"]]
    busy_rows = [[_esc(stage), f"{value['sum'] / 1000:.2f} s", f"{value['count']:,}",
                  f"{value['max'] / 1000:.2f} s"] for stage, value in busy]
    stage_table = _table(["stage", "busy time", "calls (windows, clusters)", "longest call"], busy_rows) \
        if busy_rows else ""
    stages = [[_esc(entry["stage"]), "reused from the cache" if entry["reused"] else "computed",
               f"{entry['seconds']:.2f} s", f"{entry['records_out']:,}", f"{entry['removed']:,}",
               f"<code>{_esc(entry['key'])}</code>"] for entry in manifest.get("stages", [])]
    stage_table += _table(["stage", "this run", "compute time", "records out", "removed", "cache key"], stages) \
        if stages else ""
    counters = [[_esc(name), f"{value:,}"] for name, value in sorted(metrics.items()) if isinstance(value, int)]
    counter_table = _table(["Beam counter", "value"], counters) if counters else ""
    return (f"<h2 id='timings'>Timings</h2>{_table(['phase', 'wall time'], rows)}{stage_table}"
            f"{counter_table}")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#f2f2f2}svg{max-width:100%;height:auto}h2{border-bottom:2px solid
#4477aa;padding-bottom:.2em;margin-top:2em}nav a{margin-right:1em}"""


def _read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    with open_file(path) as handle:
        return pq.read_table(handle, columns=columns)


def _read_ledger(files: list[str], columns: list[str]):
    """The ledger's columns the report uses; columns an older ledger lacks come back as nulls."""
    if not files:
        return pa.table({name: pa.array([], pa.string()) for name in columns})
    with open_file(files[0]) as handle:
        names = pq.read_schema(handle).names
    table = pa.concat_tables([_read_parquet(path, [c for c in columns if c in names]) for path in files])
    for name in columns:
        if name not in table.column_names:
            kind = pa.float64() if name == "select_score" else pa.string()
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    return table


def _section_builder(reference: str):
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def build_report(output: str | Path, target: str | None = None, display: str | None = None,
                 manifest: dict[str, Any] | None = None) -> str:
    """Write the report of the output `output` (a directory or object prefix) into `target` (default
    OUT/report/index.html, or where the manifest's `report` says); `display` names the output in the page.
    Files are found through the manifest (the job passes the one it is about to publish)."""
    output = str(output)
    if manifest is None:
        manifest = read_json(join(output, "manifest.json"))
    ledger_files = [join(output, entry["file"]) for entry in manifest.get("ledger", [])]
    columns = ["id", "fate", "reason", "detail", "input_file", "input_row", "duplicate_of", "select_score",
               "parent_id"]
    ledger = _read_ledger(ledger_files, columns)
    shards: list[dict[str, Any]] = []
    if manifest.get("rephrase"):
        # only the synthetic rows, a few per style: the examples shown beside their originals
        import pyarrow.compute as pc

        for path in [join(output, entry["file"]) for entry in manifest.get("shards", [])]:
            with open_file(path) as handle:
                if not {"parent_id", "style"} <= set(pq.read_schema(handle).names):
                    continue
            table = _read_parquet(path, ["text", "parent_id", "style"])
            shards.extend(table.filter(pc.is_valid(table["parent_id"])).slice(0, 50).to_pylist())
    texts = _Texts(manifest["config"])
    sections = [("funnel", funnel_section(manifest))]
    from winnow.pipelines.stages import STAGES

    builders = {stage.name: _section_builder(stage.report) for stage in STAGES if stage.report}
    builders["mix"] = mix_section
    ran = [entry["stage"] for entry in manifest.get("stages", [])] or [stage.name for stage in STAGES]
    for name in [*ran, "mix"]:
        section, build = manifest.get(name), builders.get(name)
        if not section or build is None:
            continue
        if "note" in section:  # no record reached the stage
            sections.append((name, f"<h2 id='{name}'>{name.title()}</h2><p>{_esc(section['note'])}.</p>"))
        else:
            sections.append((name, build(manifest, ledger=ledger, texts=texts, shards=shards)))
    sections.append(("timings", timings_section(manifest)))
    nav = "".join(f"<a href='#{name}'>{name}</a>" for name, body in sections if body)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>winnow report</title>"
        f"<style>{STYLE}</style></head><body><h1>winnow report</h1><p>{_esc(display or output)} &middot; "
        f"{_esc(manifest['created'])} &middot; winnow {_esc(manifest['winnow_version'])} &middot; config "
        f"{_esc(manifest['config_hash'][:12])} &middot; {_esc(manifest['runner'])}</p><nav>{nav}</nav>"
        + "".join(body for _, body in sections) + "</body></html>"
    )
    path = str(target) if target else join(output, manifest.get("report", f"{REPORT_DIR}/index.html"))
    write_bytes(path, page.encode("utf-8"))
    return path
