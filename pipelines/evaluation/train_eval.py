"""`winnow eval train`: does a recipe train a better model? Small Llama-style models trained on each arm's
shards at an equal token budget, beside a uniform random sample of the same input, scored on held-out text.

Arms are winnow configs (run first, reusing the stage cache) or finished outputs; each is read in shard order.
Every distinct input gets a control arm: its records in a seeded random order (a new draw per seed), cut to the
same budget. The budget is the smallest arm's token count, so every arm trains on the same number of distinct
tokens for the same number of steps. The tokenizer is trained once on a neutral sample that no arm's input
holds; held-out sets that overlap an arm's input are refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from winnow.proxy import metrics, recipe

EvalCallback = Callable[[str], None]


class EvalError(ValueError):
    """A bad evaluation request: the message says what to change."""


@dataclass
class Arm:
    """One training set: `texts` in training order (a control's are drawn per seed from its input); `input_key`
    names the input (path and text column) its control is drawn from."""

    name: str
    kind: str  # recipe | control
    origin: str
    input_key: str
    texts: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None


@dataclass
class HeldOut:
    name: str
    path: str
    texts: list[str]


def read_texts(pattern: str, column: str, what: str) -> list[str]:
    from winnow.pipelines.io.read import InputError, expand_paths, read_column

    try:
        texts = [text for path in expand_paths(pattern) for text in read_column(path, column, what)]
    except InputError as error:
        raise EvalError(str(error)) from None
    return [text for text in texts if isinstance(text, str) and text.strip()]


def _output_arm(output: str, name: str) -> Arm:
    from winnow.pipelines.io.storage import join, read_json

    try:
        manifest = read_json(join(output, "manifest.json"))
    except (OSError, ValueError) as error:
        raise EvalError(f"{output}: not a finished winnow output (no readable manifest.json: {error})") from None
    config = manifest["config"]
    texts = [text for entry in manifest["shards"]
             for text in read_texts(join(output, entry["file"]), "text", "shard")]
    columns = config["input"]["columns"]
    key = json.dumps([config["input"]["path"], columns["text"]])
    return Arm(name, "recipe", output, key, texts, config)


def recipe_arm(argument: str, overrides: list[str], force: bool, say: EvalCallback) -> Arm:
    """An arm from a YAML config (run, reusing the cache) or from a finished output directory."""
    name = Path(argument.rstrip("/")).stem
    if not argument.endswith((".yaml", ".yml")):
        return _output_arm(argument, name)
    from winnow.pipelines.config import ConfigError, load_config
    from winnow.pipelines.io.read import InputError
    from winnow.pipelines.job import OutputError, plan_job, run_job

    try:
        config = load_config(argument, overrides)
        plan = plan_job(config, [])
    except (ConfigError, InputError, OutputError) as error:
        raise EvalError(f"{argument}: {error}") from None
    say(f"arm {name}: running {argument}")
    run_job(plan, force=force)
    return _output_arm(plan.output, name)


def control_arms(arms: list[Arm]) -> tuple[list[Arm], dict[str, list[str]]]:
    """One control per distinct input (path and text column), with the input's texts."""
    controls, inputs = [], {}
    for arm in arms:
        if arm.input_key in inputs:
            continue
        path, column = json.loads(arm.input_key)
        inputs[arm.input_key] = read_texts(path, column, "input")
        name = "random" if len({a.input_key for a in arms}) == 1 else f"random-{len(controls)}"
        controls.append(Arm(name, "control", path, arm.input_key))
    return controls, inputs


def check_disjoint(inputs: dict[str, list[str]], named: dict[str, list[str]]) -> None:
    """Held-out and tokenizer texts must belong to no arm: any shared text is an error that names the set."""
    pooled = {text.strip() for texts in inputs.values() for text in texts}
    for name, texts in named.items():
        shared = sum(text.strip() in pooled for text in texts)
        if shared:
            raise EvalError(f"{name}: {shared} of its {len(texts)} texts are in an arm's input; held-out and "
                            "tokenizer texts must come from data no arm was built from")


def split_neutral(texts: list[str]) -> tuple[list[str], list[str]]:
    """(tokenizer half, evaluation half) of a held-out set, by a hash of each text: stable across runs."""
    halves: tuple[list[str], list[str]] = ([], [])
    for text in texts:
        halves[hashlib.sha1(text.encode("utf-8")).digest()[0] & 1].append(text)
    return halves


def control_documents(pool: list[np.ndarray], budget: int, seed: int) -> list[int]:
    """Indices of a uniform random draw of the pool (seeded), as many as reach `budget` stream tokens."""
    order = np.random.default_rng(seed).permutation(len(pool))
    lengths = np.fromiter((len(pool[i]) + 1 for i in order), dtype=np.int64, count=len(order))
    needed = int(np.searchsorted(np.cumsum(lengths), budget)) + 1
    if needed > len(order):
        raise EvalError(f"the input holds {int(lengths.sum())} tokens, fewer than the budget of {budget}")
    return order[:needed].tolist()


def run_evaluation(arguments: list[str], heldout: list[tuple[str, str]], out: str, preset_name: str = "cpu",
                   seeds: int = 3, overrides: list[str] | None = None, tokenizer_sample: str | None = None,
                   text_column: str = "text", keep_order: bool = False, device: str = "cpu",
                   heldout_docs: int = 2000, choice_items: int = 500, curve_docs: int = 200,
                   force: bool = False, say: EvalCallback = print) -> dict[str, Any]:
    """Train every arm for every seed and write OUT/eval_train.json and OUT/report/index.html."""
    import torch

    if preset_name not in recipe.PRESETS:
        raise EvalError(f"unknown preset {preset_name!r}; one of {', '.join(recipe.PRESETS)}")
    if not heldout:
        raise EvalError("name at least one held-out set (--heldout NAME=PATH)")
    if seeds < 1:
        raise EvalError("--seeds must be at least 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {device} asked for, but torch sees no CUDA device")
    preset = recipe.PRESETS[preset_name]
    arms = [recipe_arm(argument, overrides or [], force, say) for argument in arguments]
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise EvalError(f"two arms share a name ({', '.join(names)}); give their configs or outputs distinct names")
    controls, inputs = control_arms(arms)
    sets = [HeldOut(name, path, read_texts(path, text_column, f"held-out set {name}")) for name, path in heldout]
    if tokenizer_sample:
        neutral = read_texts(tokenizer_sample, text_column, "tokenizer sample")
        neutral_origin = tokenizer_sample
    else:
        neutral, sets[0].texts = split_neutral(sets[0].texts)
        neutral_origin = f"half of held-out set {sets[0].name} (by text hash; the other half is evaluated)"
    check_disjoint(inputs, {**{f"held-out set {s.name}": s.texts for s in sets}, "tokenizer sample": neutral})
    for held in sets:
        held.texts = held.texts[:heldout_docs]
        if not held.texts:
            raise EvalError(f"held-out set {held.name} ({held.path}) has no texts")
    say(f"tokenizer: training a {preset.vocab_size}-token byte-level BPE on {len(neutral):,} neutral texts")
    tokenizer = recipe.train_tokenizer(neutral, preset.vocab_size)
    encoded = {arm.name: recipe.encode(tokenizer, arm.texts) for arm in arms}
    pools = {key: recipe.encode(tokenizer, texts) for key, texts in inputs.items()}
    available = {arm.name: recipe.stream_tokens(encoded[arm.name]) for arm in arms}
    available.update({c.name: recipe.stream_tokens(pools[c.input_key]) for c in controls})
    budget = min(available.values())
    try:
        steps = recipe.training_steps(budget, preset)
    except ValueError as error:
        raise EvalError(str(error)) from None
    say(f"budget: {budget:,} tokens per arm (the smallest arm), {steps} steps of {preset.batch_size} x "
        f"{preset.seq_len} tokens each; {len(arms) + len(controls)} arms x {seeds} seeds")
    held_tokens = [recipe.encode(tokenizer, held.texts) for held in sets]
    items = [metrics.multiple_choice_items(held.texts, choice_items, seed=0) for held in sets]
    curve_set = (held_tokens[0][:curve_docs], sets[0].texts[:curve_docs])
    results = []
    for arm in [*arms, *controls]:
        runs = []
        for seed in range(seeds):
            if arm.kind == "control":
                picked = control_documents(pools[arm.input_key], budget, seed)
                documents = [pools[arm.input_key][i] for i in picked]
            else:
                documents = encoded[arm.name]
            stream = recipe.token_stream(documents, budget)
            run = _train_one(arm, preset, stream, steps, seed, keep_order, device, sets, held_tokens, items,
                             curve_set, tokenizer, say)
            used = recipe.documents_in_budget(documents, budget)
            runs.append({**run, "budget_tokens": len(stream), "documents_used": used})
        results.append({"name": arm.name, "kind": arm.kind, "origin": arm.origin, "config": arm.config,
                        "documents": len(arm.texts) if arm.kind == "recipe" else len(inputs[arm.input_key]),
                        "tokens_available": available[arm.name], "runs": runs})
    report = {
        "preset": preset.as_dict(), "device": device, "seeds": seeds, "keep_order": keep_order,
        "budget_tokens": budget, "steps": steps, "tokens_trained": steps * preset.batch_size * preset.seq_len,
        "tokenizer": {"vocab_size": tokenizer.get_vocab_size(), "sample_texts": len(neutral),
                      "sample": neutral_origin},
        "heldout": [{"name": s.name, "path": s.path, "texts": len(s.texts),
                     "bytes": sum(len(t.encode("utf-8")) for t in s.texts), "choice_items": len(i)}
                    for s, i in zip(sets, items, strict=True)],
        "arms": results,
    }
    report["comparisons"] = compare(results, [s.name for s in sets])
    from winnow.pipelines.evaluation.train_report import write_outputs  # Beam's storage: not at CLI start

    write_outputs(report, out)
    return report


def _train_one(arm: Arm, preset, stream, steps, seed, keep_order, device, sets, held_tokens, items, curve_set,
               tokenizer, say: EvalCallback) -> dict[str, Any]:
    started = time.perf_counter()
    model = recipe.build_model(preset, tokenizer.get_vocab_size(), seed)
    curve: list[list[float]] = []
    tokens_per_step = preset.batch_size * preset.seq_len

    def evaluate(step: int) -> None:
        value = metrics.bits_per_byte(model, *curve_set, preset.seq_len, device)
        curve.append([step * tokens_per_step, value])
        say(f"arm {arm.name} seed {seed}: {step}/{steps} steps, held-out {sets[0].name} {value:.4f} bits/byte "
            f"({time.perf_counter() - started:.0f} s)")

    losses = recipe.train(model, stream, preset, steps, seed, keep_order, device, evaluate)
    trained = time.perf_counter() - started
    final = {}
    for held, tokens, choice_set in zip(sets, held_tokens, items, strict=True):
        final[held.name] = {"bits_per_byte": metrics.bits_per_byte(model, tokens, held.texts, preset.seq_len, device),
                            **metrics.choice_scores(model, tokenizer, choice_set, preset.seq_len, device)}
    return {"seed": seed, "parameters": recipe.parameter_count(model), "train_seconds": round(trained, 2),
            "seconds": round(time.perf_counter() - started, 2), "final_train_loss": float(np.mean(losses[-20:])),
            "curve": curve, "metrics": final}


LOWER_IS_BETTER = {"bits_per_byte": True, "accuracy": False, "correct_probability": False}


def compare(results: list[dict[str, Any]], heldout: list[str]) -> list[dict[str, Any]]:
    """Every recipe arm against every control on every metric: means, spreads and the winner, if any."""
    rows = []
    for arm in (a for a in results if a["kind"] == "recipe"):
        for control in (a for a in results if a["kind"] == "control"):
            for name in heldout:
                for metric, lower in LOWER_IS_BETTER.items():
                    values = [[run["metrics"][name].get(metric) for run in side["runs"]] for side in (arm, control)]
                    if None in values[0] + values[1]:
                        continue
                    best = metrics.winner(values[0], values[1], lower)
                    rows.append({"arm": arm["name"], "control": control["name"], "heldout": name, "metric": metric,
                                 "arm_mean_spread": metrics.spread(values[0]),
                                 "control_mean_spread": metrics.spread(values[1]),
                                 "winner": None if best is None else (arm["name"], control["name"])[best]})
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("arms", nargs="+", metavar="CONFIG_OR_OUTPUT",
                        help="winnow configs (run first, reusing the cache) or finished outputs; a random control "
                             "of each distinct input is added")
    parser.add_argument("--heldout", action="append", default=[], metavar="NAME=PATH", required=True,
                        help="a held-out set no arm was built from (Parquet/JSON Lines, glob); the first one is "
                             "also the curves' set and, without --tokenizer-sample, gives half its texts to the "
                             "tokenizer")
    parser.add_argument("--out", required=True, help="where eval_train.json and report/index.html go")
    parser.add_argument("--preset", default="cpu", choices=sorted(recipe.PRESETS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (initialisation and data order)")
    parser.add_argument("--tokenizer-sample", help="neutral texts for the tokenizer (in no arm's input)")
    parser.add_argument("--text-column", default="text", help="text column of the held-out and tokenizer files")
    parser.add_argument("--keep-order", action="store_true",
                        help="train every arm in its shard order (a cooldown schedule as written); seeds then "
                             "vary initialisation only")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    parser.add_argument("--heldout-docs", type=int, default=2000, help="texts per held-out set scored")
    parser.add_argument("--choice-items", type=int, default=500, help="multiple-choice items per held-out set")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of every arm config")
    parser.add_argument("--force", action="store_true", help="rerun the arm configs instead of reusing the cache")


def command(args) -> dict[str, Any]:
    heldout = []
    for item in args.heldout:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--heldout {item!r}: expected NAME=PATH")
        heldout.append((name, path))
    return run_evaluation(args.arms, heldout, args.out, args.preset, args.seeds, args.overrides,
                          args.tokenizer_sample, args.text_column, args.keep_order, args.device,
                          args.heldout_docs, args.choice_items, force=args.force,
                          say=lambda line: print(f"winnow eval train: {line}", flush=True))
