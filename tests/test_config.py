"""Configuration: YAML parsed once, every bad key named."""

from __future__ import annotations

import re

import pytest

from genrnn.config import (
    DecodingConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    from_dict,
    load_config,
    override,
    read_yaml,
    replace,
)
from genrnn.errors import ConfigurationError
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["g2p.yaml", "g2p-small.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "training" / "configs" / name)
    assert isinstance(config.model, ModelConfig)


def test_the_quickstart_saves_resume_points_well_within_its_training_budget():
    """Ctrl+C stops a run at once, keeping the last resume point: make run's must come before its budget ends."""
    makefile = (ROOT / "Makefile").read_text()
    budget = re.search(r"^GENRNN_TRAIN_TIME \?= (\d+):(\d+):(\d+):(\d+)$", makefile, re.M)
    config_path = re.search(r"^TRAIN_CONFIG \?= (\S+)$", makefile, re.M).group(1)
    days, hours, minutes, seconds = (int(part) for part in budget.groups())
    budget_minutes = ((days * 24 + hours) * 60 + minutes) + seconds / 60

    assert 0 < load_config(ROOT / config_path).training.checkpoint_minutes <= budget_minutes / 4


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model": {"cell": "transformer"}}, "model.cell: must be one of lstm, gru, rnn"),
        ({"model": {"hidden": 3}}, "model.hidden: unknown key"),
        ({"model": {"encoder_layers": 0}}, "model.encoder_layers: must be at least 1"),
        ({"model": {"decoder_layers": 10_000_000}}, "model.decoder_layers: must be at most 64"),
        ({"model": {"embedding_dim": 10**20}}, "model.embedding_dim: must be at most 65,536"),  # past int64
        ({"model": {"attention_size": 5_000_000_000}}, "model.attention_size: must be at most 65,536"),
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
        ({"name": "a\x00b"}, "name: must be printable"),  # it names the run's directory
        # what an evaluation refuses: dev decoding would run out of memory at the first validation
        ({"decoding": {"mode": "beam", "beam_size": 100000}}, "decoding.beam_size: at most 64; got 100000"),
        ({"decoding": {"max_new_tokens": 10**8}}, "decoding.max_new_tokens: at most 1024"),
    ],
)
def test_bad_values_name_their_key(values, message):
    with pytest.raises(ConfigurationError, match=message.replace(".", r"\.")):
        from_dict(ExperimentConfig, values)


def test_the_decoding_caps_hold_for_the_fields_its_mode_reads():
    # Greedy dev decoding reads no beam size, as an evaluation's --mode greedy reads none.
    config = from_dict(ExperimentConfig, {"decoding": {"mode": "greedy", "beam_size": 100}})
    assert config.decoding.beam_size == 100


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    # YAML would keep the last section and drop the first's settings without a word.
    path = tmp_path / "twice.yaml"
    path.write_text("training:\n  lr: 0.01\nmodel: {cell: gru}\ntraining:\n  seed: 5\n")
    with pytest.raises(
        ConfigurationError, match=r"twice.yaml:4: not valid YAML \('training' given twice \(first on line 1\)\)"
    ):
        load_config(path)
    merged = read_yaml("small: &small {cell: gru, layers: 1}\nmodel:\n  <<: *small\n  cell: lstm\n")
    assert merged["model"] == {"cell": "lstm", "layers": 1}  # a merge's keys may be given again


def test_a_bundle_whose_directory_name_holds_a_comma_may_start_a_run(tmp_path):
    one = tmp_path / "run,2" / "bundle"  # read as that one bundle, as bundles are wherever named
    with pytest.raises(ConfigurationError, match="training.init_from: names one bundle"):
        from_dict(ExperimentConfig, {"training": {"init_from": str(one)}})
    one.mkdir(parents=True)
    assert from_dict(ExperimentConfig, {"training": {"init_from": str(one)}}).training.init_from == str(one)


def test_numbers_in_exponent_notation_are_numbers():
    assert from_dict(ExperimentConfig, {"training": {"lr": "1e-3"}}).training.lr == 0.001


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigurationError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: g2p\nmodel: [unclosed\n")
    with pytest.raises(ConfigurationError) as raised:
        load_config(bad)
    # one line, naming the line at fault
    assert str(raised.value) == f"{bad}:3: not valid YAML (expected ',' or ']', but got '<stream end>')"
    listed = tmp_path / "listed.yaml"
    listed.write_text("- model\n- data\n")
    with pytest.raises(ConfigurationError, match=r"listed.yaml: must be a mapping of sections \(name, .*got a list"):
        load_config(listed)


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


@pytest.mark.parametrize(
    "cls,values,message",
    [
        (DecodingConfig, {"mode": "Beam"}, "mode: must be one of greedy, sample, beam; got 'Beam'"),
        (DecodingConfig, {"mode": "beam", "length_penalty_form": "avg"}, "length_penalty_form: must be one of"),
        (ModelConfig, {"cell": "lsmt"}, "model.cell: must be one of"),
        (ModelConfig, {"attention": "additive"}, "model.attention: must be one of"),
        (TokenizerConfig, {"target_type": "words"}, "tokenizer.target_type: must be one of"),
        (OptimConfig, {"schedule": "linear"}, "training.schedule: must be one of"),
    ],
)
def test_choices_are_checked_in_configs_built_in_python(cls, values, message):
    # A mistyped mode decoded by sampling from an unseeded stream; from_dict alone checked them.
    with pytest.raises(ConfigurationError, match=f"^{message}"):
        cls(**values)


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("training.seed=-5", "training.seed: must be in"),
        ("training.weight_decay=-1", "training.weight_decay: must be 0"),
        ("training.max_steps=0", "training.max_steps: must be positive or -1"),
        ("training.max_time=00:00:00:00", "training.max_time: must be more than zero"),
        ("training.plateau_patience=-1", "training.plateau_patience: must be 0"),
        ("training.val_check_interval=0", "training.val_check_interval: must be a fraction"),
        ("training.val_check_interval=2.5", "training.val_check_interval: must be a fraction"),
        ("training.precision=banana", "training.precision: must be one of"),
        ("decoding.temperature=0", "decoding.temperature: must be in"),  # its section, as in the file
        ("name=''", "name: must be a non-empty name"),  # a bundle without a name loads nowhere
        ("name=a/b", "name: must be a non-empty name without '/'"),  # it names the run's directory
    ],
)
def test_values_that_would_fail_deep_inside_training_are_refused_at_the_edge(assignment, message):
    with pytest.raises(ConfigurationError, match=message):
        override(ExperimentConfig(), [assignment])


def test_yaml_as_people_write_it(tmp_path):
    # a device count as a number; a time budget that YAML 1.1 would read as a base-60 number; a BOM
    path = tmp_path / "c.yaml"
    path.write_text("\ufefftraining:\n  devices: 2\n  max_time: 10:00:00:00\n", encoding="utf-8")
    training = load_config(path).training
    assert (training.devices, training.max_time) == ("2", "10:00:00:00")
    assert override(ExperimentConfig(), ["training.max_time=1:00:00:00"]).training.max_time == "1:00:00:00"
    assert override(ExperimentConfig(), ["training.precision=16"]).training.precision == "16"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigurationError, match="c.yaml: not UTF-8"):
        load_config(path)


def test_replace_validates_as_a_file_does():
    with pytest.raises(ConfigurationError, match="precision: must be one of"):
        replace(ExperimentConfig().training, precision="banana")


def test_overrides_set_nested_keys_and_are_validated():
    config = override(ExperimentConfig(), ["model.cell=gru", "training.lr=0.01", "data.valid=dev.tsv"])
    assert (config.model.cell, config.training.lr, config.data.valid) == ("gru", 0.01, "dev.tsv")
    with pytest.raises(ConfigurationError, match="model.cell: must be one of"):
        override(ExperimentConfig(), ["model.cell=cnn"])
    with pytest.raises(ConfigurationError, match="model.size: unknown key"):
        override(ExperimentConfig(), ["model.size=3"])
    with pytest.raises(ConfigurationError, match="section.key=value"):
        override(ExperimentConfig(), ["model.cell"])


def test_an_override_is_a_plain_string_where_yaml_would_cut_it_and_refused_where_yaml_cannot_read_it():
    config = override(ExperimentConfig(), ["data.train=runs/my #1.tsv", "data.valid='dev #2.tsv'"])
    assert (config.data.train, config.data.valid) == ("runs/my #1.tsv", "dev #2.tsv")
    with pytest.raises(ConfigurationError, match="data.train: '@pairs.tsv' is not a YAML value .*quote it"):
        override(ExperimentConfig(), ["data.train=@pairs.tsv"])


def test_unknown_keys_of_any_yaml_type_are_named():
    with pytest.raises(ConfigurationError, match="1: unknown key"):
        from_dict(ExperimentConfig, {1: "a", "foo": "b"})  # `1:` and `foo:` in one file


@pytest.mark.parametrize(
    "arguments,valid",
    [
        (["--train", "a.tsv", "--set", "data.valid=b.tsv"], "b.tsv"),
        (["--data", "builtin:cmudict", "--set", "data.valid=b.tsv"], "b.tsv"),
        (["--train", "a.tsv", "--valid", "c.tsv", "--set", "data.valid=b.tsv"], "c.tsv"),
        (["--train", "a.tsv"], None),  # held out of a.tsv, whatever the config's file says
        (["--set", "data.valid=b.tsv"], "b.tsv"),
    ],
)
def test_a_dev_set_given_on_the_command_line_is_kept_whatever_the_training_data(arguments, valid):
    from genrnn.cli import build_parser, config_from_train_args

    args = build_parser().parse_args(["train", "--config", str(ROOT / "training/configs/tiny.yaml"), *arguments])
    assert config_from_train_args(args).data.valid == valid


@pytest.mark.parametrize(
    "arguments",
    [
        ["train", "--conf", "x"],
        ["evaluate", "--model", "m", "--data", "d", "--max-new", "9"],
        ["generate", "--model", "m", "--input", "i", "--output", "o", "--max-new", "9"],
        ["serve", "--model", "m", "--max-new", "9"],
    ],
)
def test_options_must_be_spelled_out(arguments, capsys):
    from genrnn.cli import build_parser

    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(arguments)  # the last option a prefix of one the command has
    assert usage.value.code == 2
    assert f"unrecognized arguments: {' '.join(arguments[-2:])}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments",
    [
        ["evaluate", "--model", "m", "--data", "d", "--output", "-"],
        ["generate", "--model", "m", "--input", "i", "--output", "-"],
    ],
)
def test_an_output_of_dash_is_refused_not_written_as_a_file(arguments, capsys, tmp_path, monkeypatch):
    from genrnn.cli import build_parser

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(arguments)
    assert usage.value.code == 2
    assert "'-' is not stdout here: the output is a file; name one" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()
