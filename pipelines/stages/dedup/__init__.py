"""Dedup stage: exact and MinHash near-duplicate removal, off by default; by default after quality, before embed.

Two cached steps, so that a changed decision (`dedup.threshold`, `keep`, `keep_column`, `components`) reuses the
hashing:
  candidates  every record file's exact digests and MinHash band keys, shuffled by hash range through files;
              runs of equal keys linked to their first record (exact and near pairs); near pairs checked on
              their shingles (Jaccard similarity); the pairs written to `pairs/` (candidates.py)
  decide      the pairs that count joined into components, on the driver (union-find) or, past
              `dedup.driver_pairs` or with `dedup.components: graph`, by large-star/small-star rounds in passes
              of their own (stars.py); each component's survivor chosen by the rule; the others removed
              (decide.py):
                records  every record not removed
                removed  ledger rows `deduplicated`, stage `dedup`, reason `exact_duplicate` or `near_duplicate`,
                         `duplicate_of` the survivor's id, the detail its strongest pair and the component's size
                summary  removed per reason and per source, component sizes, the largest components
A text with fewer than `dedup.ngram` words has no shingle: it is removed only as an exact copy, never merged
into a component of short texts (docs/ALGORITHMS.md section 7).
"""

from __future__ import annotations

from typing import Any

from winnow.pipelines.engine.stage import ManifestContext, Stage, Step, config_section, summary_meta
from winnow.pipelines.stages.dedup.candidates import build_candidates
from winnow.pipelines.stages.dedup.decide import LARGEST, NAME, SHOWN, SUMMARY_DIR, build_decide
from winnow.pipelines.stages.dedup.stars import roots_pass, stars_pass

DECISION_KEYS = ("threshold", "keep", "keep_column", "components", "driver_pairs")


def _steps(plan, config) -> list[Step]:
    section = config_section(config, NAME)
    scores = {k: v for k, v in section.items() if k not in DECISION_KEYS}
    decision = {k: section[k] for k in DECISION_KEYS}
    return [
        Step("candidates", build_candidates, {NAME: scores}, reads_files=True),
        Step("decide", build_decide, {NAME: decision}, reads_files=True,
             passes=(stars_pass(config.dedup), roots_pass(config.dedup, LARGEST, SHOWN))),
    ]


def _manifest(context: ManifestContext) -> dict[str, Any]:
    return {NAME: {**summary_meta(context.files, SUMMARY_DIR), "settings": context.job.config.dedup.model_dump()}}


def _check(context) -> list[str]:
    """The summary against the ledger: removed == the ledger's deduplicated rows of stage dedup."""
    summary = context.manifest[NAME]
    if "removed" not in summary:
        return []
    ledger = context.rows[("deduplicated", NAME)]
    if summary["removed"] != ledger:
        return [f"{summary['removed']} records removed, but the ledger has {ledger} deduplicated rows of dedup"]
    if summary["removed"] != summary["records_in_components"] - summary["components"]:
        return [f"{summary['components']} components of {summary['records_in_components']} records, but "
                f"{summary['removed']} removed (one survivor each)"]
    return []


def report_section(manifest: dict[str, Any], **_) -> str:
    from winnow.pipelines.outputs.report_html import esc, table

    dedup = manifest[NAME]
    if "removed" not in dedup:
        return f"<h2 id='{NAME}'>Deduplication</h2><p>No record reached this stage.</p>"
    reasons = [[esc(reason), f"{count:,}"] for reason, count in dedup["removed_by_reason"].items()]
    sources = [[esc(source), f"{count:,}"] for source, count in dedup["removed_by_source"].items()]
    sizes = [[esc(band), f"{count:,}"] for band, count in dedup["component_sizes"].items()]
    largest = [[f"{item['size']:,}", esc(item["survivor"]), "<br>".join(esc(text) for text in item["texts"])]
               for item in dedup["largest"]]
    return (f"<h2 id='{NAME}'>Deduplication (exact and MinHash)</h2><p>{dedup['records']:,} records, "
            f"{dedup['components']:,} components of duplicates holding {dedup['records_in_components']:,} records; "
            f"{dedup['removed']:,} removed (survivor: {esc(dedup['keep'])}).</p>"
            + (table(["reason", "removed"], reasons) + table(["source", "removed"], sources)
               + table(["component size", "components"], sizes)
               + "<h3>Largest components</h3>" + table(["size", "survivor", "texts (first three)"], largest)
               if dedup["removed"] else ""))


STAGE = Stage(
    name=NAME,
    module=__name__,
    section=NAME,
    enabled=lambda config: config.dedup.enabled,
    plan=lambda context: None,
    steps=_steps,
    libraries=("numba", "numpy", "pyarrow"),
    manifest=_manifest,
    report=f"{__name__}:report_section",
    ledger_stages=(NAME,),
    check=_check,
)
