"""The `winnow` command line.

    winnow run CONFIG.yaml [--set section.key=value ...] [-- BEAM_PIPELINE_OPTIONS ...]
    winnow sae train --input CORPUS --out SAE_DIR [--layer N --d-sae N --k N --steps N ...]
    winnow verify OUT
    winnow report OUT
    winnow eval train CONFIG_OR_OUTPUT... --heldout NAME=PATH --out DIR [--preset cpu --seeds 3 ...]

Exit status 0 on success; 2 with a one-line reason for a bad config, bad input paths or an output that
cannot be written; 1 when the job itself fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from winnow.pipelines.config import ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def split_beam_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first `--` goes to Beam unchanged."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winnow", description="Curate text collections into training shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run the job a config describes",
        epilog="Arguments after -- go to Beam, e.g. -- --runner=DaskRunner",
    )
    run.add_argument("config", help="YAML job config (see configs/default.yaml)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config key; the value is read as YAML (5, true, [a, b], text)",
    )
    run.add_argument("--force", action="store_true", help="recompute every stage instead of reusing cached ones")
    run.add_argument("--traceback", action="store_true", help="show the full traceback when the job fails")
    sae = commands.add_parser("sae", help="sparse autoencoders for select.method mona")
    sae_commands = sae.add_subparsers(dest="sae_command", required=True)
    from winnow.pipelines.sae_train import add_arguments

    add_arguments(sae_commands.add_parser("train", help="train a TopK SAE on a corpus' activations"))
    check = commands.add_parser("verify", help="check an output directory against its manifest")
    check.add_argument("output", help="a winnow output: a directory or an object-store URI (s3://..., gs://...; "
                       "the filesystem's Beam options after --)")
    report = commands.add_parser("report", help="write the HTML run report into OUT/report/")
    report.add_argument("output", help="a winnow output: a directory or an object-store URI (Beam options after --)")
    embed = commands.add_parser("embed", help="the embedding backends")
    embed_commands = embed.add_subparsers(dest="embed_command", required=True)
    export = embed_commands.add_parser(
        "export", help="make the config's embed.backend export (onnx, openvino, or the static model) ahead of a run")
    export.add_argument("config", help="YAML job config")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. embed.backend=static")
    evaluate = commands.add_parser("eval", help="evaluations of a recipe")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    from winnow.pipelines.evaluation.train_eval import add_arguments as add_eval_arguments

    add_eval_arguments(eval_commands.add_parser(
        "train", help="train small language models on each arm and a random control at an equal token budget"))
    return parser


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "sentence_transformers", "transformers", "distributed", "dask"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _summary(manifest: dict, output: str) -> str:
    counts = manifest["counts"]
    fates = ", ".join(f"{rows} {fate}" for fate, rows in counts["by_fate"].items())
    if "synthetic" in counts:
        made = counts["synthetic"]
        fates += f"; {made['generated']} rephrasings ({', '.join(f'{n} {f}' for f, n in made['by_fate'].items())})"
    return (
        f"winnow: {counts['input_records']} records -> {fates}; {len(manifest['shards'])} shard(s) in {output} "
        f"({manifest['timings']['total_s']:.1f} s)"
    )


def _cache_line(cache: dict) -> str:
    line = (f"winnow: cache: {cache['entries']} entries, {cache['bytes'] / 2**20:,.1f} MiB "
            f"(output.cache_max_bytes {cache['max_bytes'] / 2**20:,.0f} MiB)")
    if cache["dropped"]:
        line += f"; dropped {len(cache['dropped'])} of earlier runs ({cache['dropped_bytes'] / 2**20:,.1f} MiB)"
    return line


def _stage_line(name: str, entry) -> None:
    if entry is None:
        print(f"winnow: {name}: running", flush=True)
        return
    done = "reused from the cache" if entry.reused else f"computed in {entry.seconds:.1f} s"
    reused_steps = [step["step"] for step in entry.steps if step["reused"]]
    if reused_steps and not entry.reused:
        done += f" (reused its {', '.join(reused_steps)} from the cache)"
    resumed = [f"{step['resumed_files']} files of its {step['step']}" for step in entry.steps
               if step.get("resumed_files") and not entry.reused]
    if resumed:
        done += f" (took {', '.join(resumed)} from an interrupted run)"
    print(f"winnow: {name}: {done} ({entry.records} records out, {entry.removed} removed; key {entry.key})",
          flush=True)


def run_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    logging.getLogger().setLevel(logging.ERROR)
    from winnow.pipelines.io.read import InputError
    from winnow.pipelines.job import OutputError, plan_job, run_job
    from winnow.selectors.backends import ExportFailed
    from winnow.selectors.embedding import DeviceUnavailable, ModelNotFound

    try:
        config = load_config(args.config, args.overrides)
        plan = plan_job(config, beam_args)
    except (ConfigError, InputError, OutputError, ModelNotFound, DeviceUnavailable, ExportFailed) as error:
        print(f"winnow: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        manifest = run_job(plan, force=args.force, on_stage=_stage_line)
    except OutputError as error:
        print(f"winnow: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # noqa: BLE001 - the CLI turns any job failure into one line and exit 1
        if args.traceback:
            raise
        last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        print(f"winnow: error: the job failed: {last} (rerun with --traceback for details)", file=sys.stderr)
        return EXIT_FAILED
    if "cache" in manifest:
        print(_cache_line(manifest["cache"]))
    print(_summary(manifest, str(plan.output)))
    return EXIT_OK


def sae_train_command(args: argparse.Namespace) -> int:
    import json

    from winnow.pipelines.io.read import InputError
    from winnow.pipelines.sae_train import train_command
    from winnow.selectors.embedding import ModelNotFound

    try:
        summary = train_command(args)
    except (InputError, ModelNotFound, ValueError) as error:
        print(f"winnow: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary))
    return EXIT_OK


def embed_export_command(args: argparse.Namespace) -> int:
    """Exports once what `embed.backend` needs, where the next run finds it by the model's fingerprint."""
    from winnow.selectors import backends, embedding

    try:
        section = load_config(args.config, args.overrides).embed
        path = embedding.resolve_model_path(section.model)
        fingerprint = embedding.model_fingerprint(path)
        folder = backends.ensure_export(path, fingerprint, section.backend, section.precision,
                                        section.export_dir)
    except (ConfigError, embedding.ModelNotFound, backends.ExportFailed) as error:
        print(f"winnow: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"winnow embed export: {section.backend} {section.precision} of {path}: {folder}")
    return EXIT_OK


def eval_train_command(args: argparse.Namespace) -> int:
    from winnow.pipelines.evaluation.train_eval import EvalError, command

    try:
        report = command(args)
    except EvalError as error:
        print(f"winnow: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"winnow eval train: {len(report['comparisons'])} comparison(s) in {args.out}/eval_train.json and "
          f"{args.out}/report/index.html")
    return EXIT_OK


def report_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from winnow.pipelines.engine.options import share_with_workers
    from winnow.pipelines.io.storage import exists, join, resolve
    from winnow.pipelines.outputs.report import build_report

    share_with_workers(list(beam_args))
    args.output = resolve(args.output)
    if not exists(join(args.output, "manifest.json")):
        print(f"winnow: error: {args.output}: no manifest.json (not a finished winnow output)", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"winnow report: {build_report(args.output)}")
    return EXIT_OK


def verify_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from winnow.pipelines.engine.options import share_with_workers
    from winnow.pipelines.outputs.verify import verify

    share_with_workers(list(beam_args))

    problems = verify(args.output)
    for problem in problems:
        print(f"winnow verify: {problem}", file=sys.stderr)
    if problems:
        print(f"winnow verify: {args.output}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILED
    print(f"winnow verify: {args.output}: every listed file matches its checksum and row count; counts reconcile "
          "and every stage summary agrees with the ledger")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    own_args, beam_args = split_beam_args(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(own_args)
    _quiet_libraries()
    if args.command == "run":
        return run_command(args, beam_args)
    if args.command == "sae":
        return sae_train_command(args)
    if args.command == "verify":
        return verify_command(args, beam_args)
    if args.command == "report":
        return report_command(args, beam_args)
    if args.command == "embed":
        return embed_export_command(args)
    if args.command == "eval":
        return eval_train_command(args)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
