"""The stages winnow knows, in their default order, and the order a config asks for.

Adding a stage: write its module (exporting `STAGE`, see stage.py), give it a config section, and put it in
`STAGES` below. Mix and the output writing always come last: they are what a run writes, not cached stages.
"""

from __future__ import annotations

from winnow.pipelines.config import ConfigError, WinnowConfig
from winnow.pipelines.engine.stage import Stage
from winnow.pipelines.stages import dedup, embed, prune, quality, rephrase, select, validate

STAGES: tuple[Stage, ...] = (
    validate.STAGE, quality.STAGE, dedup.STAGE, embed.STAGE, prune.STAGE, select.STAGE, rephrase.STAGE,
)
BY_NAME = {stage.name: stage for stage in STAGES}
EMBED = embed.STAGE.name
FIRST = validate.STAGE.name


def needs_embeddings(config: WinnowConfig) -> bool:
    """Whether the embed stage runs: on request, or (auto) when an enabled stage reads embeddings."""
    if config.embed.enabled == "auto":
        return any(stage.enabled(config) and stage.reads_embeddings(config) for stage in STAGES)
    return bool(config.embed.enabled)


def job_stages(config: WinnowConfig) -> list[Stage]:
    """The enabled stages in the order the config gives (`pipeline`) or the default one. The embed stage is
    put before the first stage that reads embeddings when the list leaves it out; a list that puts it after
    such a stage, names an unknown stage, or leaves out an enabled one is a ConfigError naming the key."""
    names = list(config.pipeline) if config.pipeline is not None else [stage.name for stage in STAGES]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        known = ", ".join(BY_NAME)
        raise ConfigError(f"pipeline: unknown stage {unknown[0]!r} (stages: {known}; mix and output run last)")
    if len(set(names)) != len(names):
        raise ConfigError("pipeline: a stage is listed twice")
    if names[0] != FIRST:
        raise ConfigError(f"pipeline: must start with {FIRST} (it reads the input)")
    wanted = {stage.name for stage in STAGES if stage.name != EMBED and stage.enabled(config)}
    missing = sorted(wanted - set(names))
    if missing:
        section = BY_NAME[missing[0]].section
        raise ConfigError(f"pipeline: {missing[0]} is enabled but not in the list ({section}.enabled is true)")
    embeds = needs_embeddings(config)
    readers = [name for name in names if name in wanted and BY_NAME[name].reads_embeddings(config)]
    if readers and not embeds:
        raise ConfigError(f"embed.enabled: false, but {readers[0]} reads embeddings (set it to auto or true)")
    if embeds and EMBED not in names:
        names.insert(names.index(readers[0]) if readers else len(names), EMBED)
    chosen = [BY_NAME[name] for name in names if name in wanted or (name == EMBED and embeds)]
    seen_embed = False
    for stage in chosen:
        seen_embed = seen_embed or stage.name == EMBED
        if stage.reads_embeddings(config) and not seen_embed:
            raise ConfigError(f"pipeline: {stage.name} reads embeddings, so {EMBED} must come before it")
    return chosen


def ledger_stage_order(stage_names: list[str]) -> list[str]:
    """The ledger `stage` values in funnel order for a run that ran these stages (then mix and write)."""
    order = [value for name in stage_names if name in BY_NAME for value in BY_NAME[name].ledger_stages]
    return [*order, "mix", "write"]
