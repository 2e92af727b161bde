"""Config schema: public keys, errors that name the key, typed --set overrides."""

from __future__ import annotations

import pytest
from conftest import ROOT

from winnow.pipelines.config import ConfigError, build_config, load_config, parse_override
from winnow.pipelines.stages import needs_embeddings


def minimal() -> dict:
    return {"input": {"path": "in/*.parquet"}, "output": {"path": "out"}}


def test_default_config_loads_with_public_keys():
    config = load_config(ROOT / "configs" / "default.yaml")
    resolved = config.resolved()
    assert resolved["input"]["columns"] == {"id": "id", "text": "text", "source": "source"}
    assert resolved["embed"]["model"] == "all-MiniLM-L6-v2"
    assert resolved["embed"]["batch_size"] == 64
    assert resolved["output"]["path"] == "out/default"
    assert resolved["prune"]["kmeans"] == {"k": None, "niter": 100, "seed": 1234, "fit_sample": 100000}
    assert resolved["prune"]["semdedup"] == {"enabled": True, "eps": 0.05, "strict": True, "confirm": "off",
                                             "confirm_precision": "fp32", "candidate_eps": 0.15}
    assert resolved["mix"]["schedule"] == [
        {"at": 0.0, "temperature": 5.0, "alpha": None},
        {"at": 0.5, "temperature": 1.0, "alpha": None},
    ]


def test_pruning_switches_embedding_on_and_schedules_need_one_of_temperature_or_alpha():
    assert needs_embeddings(build_config({**minimal(), "prune": {"enabled": True}}))
    assert not needs_embeddings(build_config(minimal()))
    with pytest.raises(ConfigError, match=r"^mix\.schedule\.0: .*exactly one of temperature or alpha"):
        build_config({**minimal(), "mix": {"schedule": [{"at": 0, "temperature": 2, "alpha": 0.5}]}})
    with pytest.raises(ConfigError, match=r"^mix\.schedule: .*needs a point at 0"):
        build_config({**minimal(), "mix": {"schedule": [{"at": 0.5, "temperature": 2}]}})


def test_unknown_key_is_an_error_naming_the_key():
    raw = minimal()
    raw["input"]["colums"] = {"text": "body"}
    with pytest.raises(ConfigError, match=r"^input\.colums: unknown key$"):
        build_config(raw)


def test_unknown_section_is_an_error_naming_it():
    raw = {**minimal(), "prnue": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"^prnue: unknown key$"):
        build_config(raw)


def test_wrong_type_is_an_error_naming_the_key():
    raw = {**minimal(), "embed": {"batch_size": "many"}}
    with pytest.raises(ConfigError, match=r"^embed\.batch_size: .*'many'"):
        build_config(raw)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"^output: required key is missing$"):
        build_config({"input": {"path": "x.parquet"}})


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {path: a.parquet}\noutput: {path: out}\n")
    config = load_config(path, ["embed.batch_size=16", "embed.enabled=true", "input.columns.text=body"])
    assert config.embed.batch_size == 16
    assert config.embed.enabled is True
    assert config.input.columns.text == "body"
    with pytest.raises(ConfigError, match=r"^embed\.batch_size: "):
        load_config(path, ["embed.batch_size=-1"])
    with pytest.raises(ConfigError, match=r"^embed\.bach_size: unknown key$"):
        load_config(path, ["embed.bach_size=8"])


def test_parse_override_reads_values_as_yaml():
    assert parse_override("a.b=5") == (["a", "b"], 5)
    assert parse_override("a.b=[x, y]") == (["a", "b"], ["x", "y"])
    assert parse_override("a=some text") == (["a"], "some text")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("novalue")


def test_unreadable_and_invalid_yaml_configs(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: not valid YAML"):
        load_config(bad)


def test_fingerprint_changes_with_config():
    first = build_config(minimal())
    raw = minimal()
    raw["output"]["shard_rows"] = 7
    assert first.fingerprint() == build_config(minimal()).fingerprint()
    assert first.fingerprint() != build_config(raw).fingerprint()
