"""The job configuration: a validated schema, YAML loading and `--set` overrides.

Unknown keys and wrong types are errors that name the key (`input.colums: unknown key`), so a typo never runs
a job with a silent default. The public key names are those of docs/config.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from winnow.selectors import backends
from winnow.selectors.names import PACKAGED_LM, PACKAGED_MODEL, PRUNE_STRATEGIES, SELECT_METHODS


class ConfigError(ValueError):
    """A config that cannot run; the message is one line and names the key."""


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str) -> int:
    """'500MB', '20 GiB', '1000' -> bytes; anything else is a ValueError that names the units."""
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = None
    if amount is None or unit not in _BYTE_UNITS or amount < 0:
        raise ValueError(f"{value!r} is not a size (a number of bytes, or with a unit: KB MB GB TB KiB MiB GiB TiB)")
    return int(amount * _BYTE_UNITS[unit])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputColumns(_Section):
    id: str | None = Field(None, description="column holding a unique id; unset: a content hash of the text")
    text: str = Field("text", description="column holding the text (required)")
    source: str | None = Field(None, description="column naming the record's source; unset: default_source")


class InputConfig(_Section):
    path: str = Field(..., description="file path or glob; Parquet (.parquet) or JSON Lines (.jsonl, .json)")
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    columns: InputColumns = InputColumns()
    default_source: str = "default"

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class ValidateConfig(_Section):
    max_text_bytes: int = Field(1_000_000, gt=0, description="longer texts (UTF-8 bytes) are rejected")
    control_characters: Literal["reject", "strip", "keep"] = Field(
        "reject", description="texts with C0 control characters or DEL (not tab, newlines, \\v, \\f): "
        "reject (reason control_characters), strip (ANSI escape sequences and the controls removed, counted) "
        "or keep",
    )


class OutputConfig(_Section):
    path: str
    shard_rows: int = Field(50_000, gt=0, description="target rows per output shard")
    ledger_rows: int = Field(1_000_000, gt=0, description="target rows per ledger file")
    row_group_rows: int = Field(5_000, gt=0, description="Parquet row-group size, for streaming readers")
    report: bool = Field(True, description="write the HTML run report to OUT/report/ at the end of the run")
    cache: bool = Field(
        True, description="keep each stage's output in .OUT.cache/ beside OUT and reuse it while its input, "
        "config, code and models are unchanged",
    )
    cache_max_bytes: int = Field(
        10 * 2**30, ge=0, description="size bound of the stage cache: after a run, entries of earlier runs are "
        "dropped least recently used first until the cache fits (the run's own are always kept); 0 keeps only "
        "the latest run's. Bytes, or a string with a unit: 500MB, 20GiB",
    )

    @field_validator("cache_max_bytes", mode="before")
    @classmethod
    def _bytes_with_unit(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value


class QualityConfig(_Section):
    """The Gopher quality and repetition rules (Rae et al. 2021, as DataTrove's GopherQualityFilter and
    GopherRepetitionFilter implement them); a threshold set to null switches its rule off."""

    enabled: bool = False
    languages: list[str] | None = Field(
        None, description="sources the English rules apply to (records of other sources pass, counted); "
        "null: every source",
    )
    min_doc_words: int | None = Field(50, ge=0, description="fewer non-symbol words: rejected")
    max_doc_words: int | None = Field(100_000, ge=0, description="more non-symbol words: rejected")
    min_avg_word_length: float | None = Field(3, ge=0, description="mean non-symbol word length below: rejected")
    max_avg_word_length: float | None = Field(10, ge=0, description="mean non-symbol word length above: rejected")
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="'#' or ellipses per word above: rejected")
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0, description="share of lines starting with a bullet")
    max_ellipsis_lines_ratio: float | None = Field(0.3, ge=0, description="share of lines ending with an ellipsis")
    max_non_alpha_words_ratio: float | None = Field(
        0.8, ge=0, le=1, description="share of words with an alphabetic character below: rejected")
    min_stop_words: int | None = Field(2, ge=0, description="fewer English stop words: rejected")
    stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    dup_line_frac: float | None = Field(0.3, ge=0, description="share of lines that repeat an earlier line")
    dup_para_frac: float | None = Field(0.3, ge=0, description="share of paragraphs that repeat an earlier one")
    dup_line_char_frac: float | None = Field(0.2, ge=0, description="characters in repeated lines / all")
    dup_para_char_frac: float | None = Field(0.2, ge=0, description="characters in repeated paragraphs / all")
    top_n_grams: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> largest share of characters in the most frequent n-gram")
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> largest share of characters in repeated n-grams")


class DedupConfig(_Section):
    """Exact and MinHash near-duplicate removal (docs/ALGORITHMS.md section 7)."""

    enabled: bool = False
    exact: bool = Field(True, description="remove exact copies (a digest of the normalised text)")
    normalise: Literal["none", "whitespace", "datatrove"] = Field("whitespace", description="of the exact digest")
    near: bool = Field(True, description="remove near duplicates: MinHash of word n-grams, LSH, components")
    ngram: int = Field(5, gt=0, description="words per shingle (texts with fewer words are left to the exact pass)")
    shingles: Literal["words", "datatrove"] = Field("words", description="words, or DataTrove 0.10.1's shingles")
    bands: int = Field(14, gt=0, le=127, description="LSH bands")
    rows: int = Field(8, gt=0, description="hashes per band")
    seed: int = Field(1, ge=0, description="seed of the MinHash permutations")
    threshold: float | None = Field(
        0.8, ge=0, le=1, description="checked Jaccard a candidate pair must reach; null: every band-sharing pair")
    keep: Literal["first", "longest", "column"] = Field(
        "first", description="a component's survivor (ties: the first in input order)")
    keep_column: str | None = Field(None, description="the input column dedup.keep: column compares (a number)")
    components: Literal["auto", "driver", "graph"] = Field("auto", description="joined by union-find on the "
                                                           "driver, by large-star/small-star rounds, or auto")
    driver_pairs: int = Field(20_000_000, gt=0, description="cached pairs up to which auto joins on the driver")

    @model_validator(mode="after")
    def _column_named(self) -> DedupConfig:
        if self.keep == "column" and not self.keep_column:
            raise ValueError("dedup.keep_column must name a column when dedup.keep is column")
        if self.enabled and not (self.exact or self.near):
            raise ValueError("dedup.exact and dedup.near are both false: nothing to remove (disable dedup instead)")
        return self


class EmbedConfig(_Section):
    enabled: Literal["auto"] | bool = Field(
        "auto", description="auto: only when a later stage needs embeddings; true: always (written to OUT)"
    )
    model: str = Field(PACKAGED_MODEL, description="a sentence-transformers model directory, or the default")
    batch_size: int = Field(64, gt=0, description="texts per forward pass")
    window: int = Field(2048, gt=0, description="texts handed to the model at once, sorted by length inside")
    max_seq_length: int | None = Field(None, gt=0, description="truncate longer inputs (model default: unset)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["torch", "onnx", "openvino", "static"] = Field(
        "torch", description="torch: the model as it is; onnx, openvino: exported once and run by that runtime; "
        "static: a model2vec model distilled once from embed.model (hundreds of times faster, different vectors)")
    precision: Literal["fp32", "int8"] = Field("fp32", description="int8: quantised (onnx: weights; openvino: MatMuls)")
    export_dir: str | None = Field(None, description="where exports and static models are kept by the "
                                   "model's fingerprint; default ~/.cache/winnow/models")
    torch_threads: int = Field(0, ge=0, description="threads per worker (torch or the runtime); 0: cores / workers")
    reuse: bool = Field(True, description="reuse embeddings of unchanged texts from the previous run in OUT")

    @model_validator(mode="after")
    def _precision_fits(self) -> EmbedConfig:
        backends.check_choice(self.backend, self.precision)
        if self.backend != "torch" and self.device == "cuda":
            raise ValueError(f"embed.device: cuda runs the torch backend only (embed.backend is {self.backend})")
        return self


class KMeansConfig(_Section):
    k: int | None = Field(None, gt=0, description="clusters; default about sqrt(records entering the stage)")
    niter: int = Field(100, gt=0, description="k-means iterations (reference: 100)")
    seed: int = Field(1234, description="k-means seed (reference: 1234)")
    fit_sample: int = Field(100_000, gt=0, description="records the centroids are fitted on (a seeded sample)")


class SemDedupConfig(_Section):
    enabled: bool = True
    eps: float = Field(0.05, gt=0, lt=1, description="drop a record whose cosine to an earlier one > 1 - eps")
    strict: bool = Field(True, description="'>' as the reference; false: '>=' as NeMo Curator")
    confirm: Literal["off", "torch", "onnx", "openvino"] = Field(
        "off", description="two tiers: candidates at candidate_eps confirmed at eps by embed.model on this backend")
    confirm_precision: Literal["fp32", "int8"] = Field("fp32", description="of the confirming backend")
    candidate_eps: float = Field(0.15, gt=0, lt=1, description="with confirm: the looser eps of the candidates")

    @model_validator(mode="after")
    def _candidates_looser(self) -> SemDedupConfig:
        if self.confirm != "off" and self.confirm_precision == "int8" and self.confirm == "torch":
            raise ValueError("prune.semdedup.confirm_precision: int8 needs confirm onnx or openvino (not torch)")
        if self.confirm != "off" and self.candidate_eps < self.eps:
            raise ValueError(f"prune.semdedup.candidate_eps ({self.candidate_eps}) is below eps ({self.eps})")
        return self


class PruneConfig(_Section):
    enabled: bool = False
    strategy: Literal[PRUNE_STRATEGIES] = Field("dbp", description="per-cluster quotas: " + ", ".join(PRUNE_STRATEGIES))
    keep_fraction: float = Field(0.5, ge=0, le=1, description="records kept, as a fraction of those entering")
    keep: Literal["hard", "easy", "random"] = Field("hard", description="order inside a cluster")
    tau: float = Field(0.5, gt=0, description="DBP softmax temperature")
    neighbours: int = Field(20, gt=0, description="nearest other centroids in d_inter")
    min_per_cluster_frac: float = Field(0.5, ge=0, le=1, description="DBP lower bound per cluster, x N / k")
    seed: int = 0
    recluster: bool = Field(False, description="cluster the SemDeDup survivors afresh before DBP (the reference)")
    kmeans: KMeansConfig = KMeansConfig()
    semdedup: SemDedupConfig = SemDedupConfig()


class SelectConfig(_Section):
    enabled: bool = False
    method: Literal[SELECT_METHODS] = Field(
        "mona", description="mona: SAE features (Jaccard); embedding: cosine; bm25; random"
    )
    targets: str | None = Field(None, description="Parquet/JSONL file or glob of target examples of the task")
    target_text: str | None = Field(None, description="text column of the targets; default: input.columns.text")
    ratio: float | None = Field(None, gt=0, le=1, description="keep this fraction of the pool (default 0.05)")
    count: int | None = Field(None, ge=0, description="keep exactly this many records (instead of ratio)")
    model: str = Field(PACKAGED_LM, description="causal LM whose activations the SAE reads (local folder)")
    sae: str | None = Field(None, description="sae-lens SAE directory (mona); train one with `winnow sae train`")
    layer: int | None = Field(None, gt=0, description="decoder block read; default: the SAE's, else penultimate")
    max_tokens: int = Field(256, gt=1, description="tokens per sample (longer samples are truncated)")
    batch_size: int = Field(16, gt=0, description="samples per forward pass")
    window: int = Field(512, gt=0, description="records handed to a worker's model at once, sorted by length")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0, description="threads per worker; 0: cores / workers")
    seed: int = Field(0, description="seeds the tie-break among equal scores and the random baseline")
    top_features: int = Field(10, ge=0, description="prototype features reported in the manifest (mona)")
    feature_examples: int = Field(3, ge=0, description="records shown per reported feature")
    shortlist: Literal["embedding", "bm25"] | None = Field(
        None, description="mona only: a cheap scorer ranks the pool first and the LM + SAE score only its top "
        "shortlist_multiple x n; default: none, every record is scored (exact)")
    shortlist_multiple: int = Field(4, ge=1, description="the shortlist keeps this many times the selection size")

    @model_validator(mode="after")
    def _one_size(self):
        if self.ratio is not None and self.count is not None:
            raise ValueError("give ratio or count, not both")
        if self.shortlist is not None and self.method != "mona":
            raise ValueError(f"select.shortlist: only for method mona (method is {self.method})")
        return self

    @property
    def effective_ratio(self) -> float | None:
        return 0.05 if self.ratio is None and self.count is None else self.ratio


class RephraseConfig(_Section):
    enabled: bool = False
    model: str = Field(PACKAGED_LM, description="instruction model: the packaged default or a local folder")
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto: vLLM when installed and a GPU is present, else transformers"
    )
    styles: list[str] = Field(
        default_factory=lambda: ["medium", "qa"], description="easy, medium (wikipedia), hard, qa, or custom names"
    )
    custom_styles: dict[str, str] = Field(default_factory=dict, description="style name -> instruction")
    system_turn: Literal["auto", "true", "false"] = Field("auto", description="preamble in the system turn")
    max_segment_tokens: int = Field(300, gt=0, description="segment size in the generator's tokens")
    sources: list[str] | None = Field(None, description="rephrase only these sources; default: all")
    fraction: float = Field(1.0, ge=0, le=1, description="share of records rephrased (seeded hash)")
    max_records: int | None = Field(None, ge=0, description="cap on records rephrased")
    max_new_tokens: int = Field(512, gt=0)
    greedy: bool = Field(False, description="greedy decoding instead of sampling")
    temperature: float = Field(0.5, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="prompts per generate call")
    window: int = Field(64, gt=0, description="consecutive input rows per generation window (the cache unit)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0)
    cache: bool = Field(True, description="keep finished windows beside the output and reuse them on rerun")


class SchedulePointConfig(_Section):
    at: float = Field(..., ge=0, lt=1, description="fraction of the output where this temperature starts")
    temperature: float | None = Field(None, gt=0, description="tau; 1 proportional, large uniform")
    alpha: float | None = Field(None, gt=0, description="1 / tau, as mT5 and XLM-R write it")

    @model_validator(mode="after")
    def _one_of_temperature_or_alpha(self):
        if (self.temperature is None) == (self.alpha is None):
            raise ValueError("give exactly one of temperature or alpha")
        return self

    @property
    def tau(self) -> float:
        return self.temperature if self.temperature is not None else 1.0 / self.alpha


class MixConfig(_Section):
    enabled: bool = False
    shards: int = Field(8, gt=0, description="number of output shards, in training order")
    schedule: list[SchedulePointConfig] = Field(
        default_factory=lambda: [
            SchedulePointConfig(at=0.0, temperature=5.0),
            SchedulePointConfig(at=0.5, temperature=1.0),
        ],
        description="temperature over the output; default: Cooldown (tau 5, then 1 from the middle)",
    )
    schedule_kind: Literal["step", "linear"] = "step"
    size_by: Literal["documents", "tokens"] = Field("documents", description="source sizes in p(tau)")
    total_records: int | None = Field(None, gt=0, description="output size; default: all records reaching mix")
    total_tokens: int | None = Field(None, gt=0, description="output size in whitespace tokens (instead of records)")
    max_epochs: float | None = Field(None, gt=0, description="cap on passes over a source (UniMax); default none")
    synthetic_share: float | None = Field(
        0.5, ge=0, le=1, description="share of every position given to rephrased sources (WRAP 1:1); null: none"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _one_budget(self):
        if self.total_records is not None and self.total_tokens is not None:
            raise ValueError("give total_records or total_tokens, not both")
        return self

    @field_validator("schedule")
    @classmethod
    def _starts_at_zero(cls, points: list[SchedulePointConfig]) -> list[SchedulePointConfig]:
        if not points or min(p.at for p in points) != 0:
            raise ValueError("the schedule needs a point at 0")
        return points


class WinnowConfig(_Section):
    input: InputConfig
    pipeline: list[str] | None = Field(
        None, description="stages in order, from validate (e.g. [validate, quality, embed, prune, select, "
        "rephrase]); mix and output run last; default: that order",
    )
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    quality: QualityConfig = QualityConfig()
    dedup: DedupConfig = DedupConfig()
    output: OutputConfig
    embed: EmbedConfig = EmbedConfig()
    prune: PruneConfig = PruneConfig()
    select: SelectConfig = SelectConfig()
    rephrase: RephraseConfig = RephraseConfig()
    mix: MixConfig = MixConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _select_inputs(self):
        if self.rephrase.enabled:
            from winnow.rephrase.prompts import resolve_styles

            try:
                resolve_styles(self.rephrase.styles, self.rephrase.custom_styles)
            except ValueError as error:
                raise ValueError(f"rephrase.styles: {error}") from None
        if self.select.enabled:
            if not self.select.targets:
                raise ValueError("select.targets: required when select.enabled (a file of target examples)")
            if self.select.method == "mona" and not self.select.sae:
                raise ValueError("select.sae: required for method mona (train one with `winnow sae train`)")
            if self.select.method == "embedding" and self.embed.enabled is False:
                raise ValueError("select.method embedding needs the embed stage (embed.enabled is false)")
            if self.select.shortlist == "embedding" and self.embed.enabled is False:
                raise ValueError("select.shortlist embedding needs the embed stage (embed.enabled is false)")
        return self

    def resolved(self) -> dict[str, Any]:
        """The full config with every default filled in, as plain JSON-able data."""
        return self.model_dump(mode="json", by_alias=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<config>"
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if first["type"] == "missing":
        return f"{key}: required key is missing"
    given = first.get("input")
    given_text = "" if isinstance(given, dict) else f" (got {given!r})"
    more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return f"{message}{more}"
    return f"{key}: {message}{given_text}{more}"


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value typed as YAML: 5, true, [a, b], text)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def build_config(raw: dict[str, Any]) -> WinnowConfig:
    try:
        return WinnowConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> WinnowConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return build_config(apply_overrides(raw, overrides or []))
