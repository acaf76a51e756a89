"""Configuration: YAML parsed once, every bad key named."""

from __future__ import annotations

import pytest

from genrnn.config import DecodingConfig, ExperimentConfig, ModelConfig, from_dict, load_config, override
from genrnn.errors import ConfigurationError
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["g2p.yaml", "g2p-small.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "training" / "configs" / name)
    assert isinstance(config.model, ModelConfig)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model": {"cell": "transformer"}}, "model.cell: must be one of lstm, gru, rnn"),
        ({"model": {"hidden": 3}}, "model.hidden: unknown key"),
        ({"model": {"encoder_layers": 0}}, "model.encoder_layers: must be at least 1"),
        ({"model": {"layer_dropout": 1.5}}, "model.layer_dropout"),
        ({"model": {"bidirectional": "yes"}}, "model.bidirectional: must be true or false"),
        ({"training": {"lr": "fast"}}, "training.lr: must be a number"),
        ({"training": {"lr": "nan"}}, "training.lr: must be a number"),
        ({"training": {"lr": 10**400}}, "training.lr: must be a number"),
        ({"training": {"max_time": "20 minutes"}}, "training.max_time: must be DD:HH:MM:SS"),
        ({"training": {"distill_weight": 0}}, "training.distill_weight: must be in"),
        ({"training": {"init_from": "a,b"}}, "training.init_from: names one bundle"),
        (
            {"training": {"plateau_patience": 4, "early_stopping_patience": 5}},
            "training.early_stopping_patience: must exceed training.plateau_patience",
        ),
        ({"tokenizer": {"source_type": "bytes"}}, "tokenizer.source_type"),
        ({"data": "x"}, "data: must be a mapping"),
        ({"colour": "blue"}, "colour: unknown key"),
    ],
)
def test_bad_values_name_their_key(values, message):
    with pytest.raises(ConfigurationError, match=message.replace(".", r"\.")):
        from_dict(ExperimentConfig, values)


def test_numbers_in_exponent_notation_are_numbers():
    assert from_dict(ExperimentConfig, {"training": {"lr": "1e-3"}}).training.lr == 0.001


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigurationError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "values,field",
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e39}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 2**31}, "top_k"),
        ({"length_penalty": float("inf")}, "length_penalty"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"mode": "beam", "beam_size": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_decoding_ranges(values, field):
    with pytest.raises(ConfigurationError, match=f"^{field}:"):
        DecodingConfig(**values)


def test_overrides_set_nested_keys_and_are_validated():
    config = override(ExperimentConfig(), ["model.cell=gru", "training.lr=0.01", "data.valid=dev.tsv"])
    assert (config.model.cell, config.training.lr, config.data.valid) == ("gru", 0.01, "dev.tsv")
    with pytest.raises(ConfigurationError, match="model.cell: must be one of"):
        override(ExperimentConfig(), ["model.cell=cnn"])
    with pytest.raises(ConfigurationError, match="model.size: unknown key"):
        override(ExperimentConfig(), ["model.size=3"])
    with pytest.raises(ConfigurationError, match="section.key=value"):
        override(ExperimentConfig(), ["model.cell"])
