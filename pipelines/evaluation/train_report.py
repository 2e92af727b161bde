"""The outputs of `winnow eval train`: OUT/eval_train.json (everything needed to reproduce and judge the run) and
OUT/report/index.html (held-out curves per arm with their seed bands, and the final table)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from winnow.pipelines.io.storage import join, write_bytes
from winnow.pipelines.outputs.report import STYLE
from winnow.pipelines.outputs.report_html import esc, figure, svg, table


def _cell(mean_spread) -> str:
    mean, spread = mean_spread
    return f"{mean:.4f} &plusmn; {spread:.4f}"


def curves_figure(report: dict[str, Any]) -> str:
    """Held-out bits per byte of the first held-out set against tokens trained: the mean over seeds per arm,
    and the band between the seeds' lowest and highest."""
    fig, axis = figure(7.5, 3.4)
    for arm in report["arms"]:
        curves = np.array([run["curve"] for run in arm["runs"]])  # seeds x points x (tokens, bpb)
        tokens = curves[0, :, 0] / 1e6
        axis.plot(tokens, curves[:, :, 1].mean(axis=0), label=f"{arm['name']} ({arm['kind']})",
                  linestyle="--" if arm["kind"] == "control" else "-")
        axis.fill_between(tokens, curves[:, :, 1].min(axis=0), curves[:, :, 1].max(axis=0), alpha=0.2)
    axis.set_xlabel("tokens trained (millions)")
    axis.set_ylabel(f"bits per byte, {report['heldout'][0]['name']}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return svg(fig)


def final_table(report: dict[str, Any]) -> str:
    from winnow.proxy.metrics import spread

    header = ["arm", "kind", "seconds per seed"]
    for held in report["heldout"]:
        header += [f"{held['name']} bits/byte", f"{held['name']} P(correct)", f"{held['name']} accuracy"]
    rows = []
    for arm in report["arms"]:
        row = [esc(arm["name"]), esc(arm["kind"]), f"{np.mean([run['seconds'] for run in arm['runs']]):.0f}"]
        for held in report["heldout"]:
            for metric in ("bits_per_byte", "correct_probability", "accuracy"):
                values = [run["metrics"][held["name"]].get(metric) for run in arm["runs"]]
                row.append("-" if None in values else _cell(spread(values)))
        rows.append(row)
    return table(header, rows)


def verdicts(report: dict[str, Any]) -> str:
    lines = []
    for row in report["comparisons"]:
        gap = row["arm_mean_spread"][0] - row["control_mean_spread"][0]
        said = f"<b>{esc(row['winner'])}</b> is better" if row["winner"] else "no winner (gap within 2x the spread)"
        lines.append(f"<li>{esc(row['arm'])} vs {esc(row['control'])}, {esc(row['heldout'])} "
                     f"{esc(row['metric'])}: gap {gap:+.4f}; {said}</li>")
    return f"<ul>{''.join(lines)}</ul>"


def section(report: dict[str, Any]) -> str:
    preset = report["preset"]
    params = report["arms"][0]["runs"][0]["parameters"]
    return (
        "<h2 id='eval-train'>Proxy-model evaluation</h2>"
        f"<p>Preset <b>{esc(preset['name'])}</b>: {params:,} parameters ({preset['layers']} layers, width "
        f"{preset['d_model']}, context {preset['seq_len']}), tokenizer of {report['tokenizer']['vocab_size']:,} "
        f"tokens trained on {report['tokenizer']['sample_texts']:,} texts ({esc(report['tokenizer']['sample'])}). "
        f"Every arm: a budget of {report['budget_tokens']:,} distinct tokens, {report['steps']:,} steps, "
        f"{report['tokens_trained']:,} tokens trained; {report['seeds']} seed(s) varying initialisation and "
        f"{'initialisation only (data in shard order)' if report['keep_order'] else 'data order'}. "
        "Mean &plusmn; standard deviation over seeds; a winner only where the gap exceeds twice the larger "
        "spread.</p>"
        + curves_figure(report) + final_table(report) + "<h3>Verdicts</h3>" + verdicts(report)
    )


def write_outputs(report: dict[str, Any], out: str) -> None:
    write_bytes(join(out, "eval_train.json"), json.dumps(report, indent=1, sort_keys=True).encode("utf-8"))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>winnow eval train</title>"
            f"<style>{STYLE}</style></head><body><h1>winnow eval train</h1>{section(report)}</body></html>")
    write_bytes(join(out, "report", "index.html"), page.encode("utf-8"))
