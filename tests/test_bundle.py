"""The bundle: a round trip gives identical outputs; damage is refused by name."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from genrnn.bundle import load_bundle, save_bundle
from genrnn.cli import ensemble_averaging
from genrnn.config import DecodingConfig, ModelConfig, TokenizerConfig
from genrnn.decoding import Generator
from genrnn.errors import BundleError, ConfigurationError
from genrnn.files import current_umask
from genrnn.model import Seq2Seq
from genrnn.tokenizer import train_tokenizers


def write_bundle(directory: Path) -> Seq2Seq:
    """A small bundle in ``directory``; its model."""
    torch.manual_seed(0)
    source, target = train_tokenizers(
        ["cat", "dog", "house"] * 4, ["K AE1 T", "D AO1 G", "HH AW1 S"] * 4, TokenizerConfig()
    )
    config = ModelConfig(embedding_dim=16, encoder_hidden=8, decoder_hidden=16, tie_embeddings=True)
    model = Seq2Seq(config, source.vocab_size, target.vocab_size).eval()
    save_bundle(directory, model, source, target, TokenizerConfig(), "demo", {"steps": 7})
    return model


@pytest.fixture()
def bundle_dir(tmp_path):
    return tmp_path / "b", write_bundle(tmp_path / "b")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_a_bundle_is_as_readable_as_the_umask_allows(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_bundle(tmp_path / "b")
    finally:
        os.umask(previous)

    # a container's server runs as its own user: it reads a mounted bundle as "others"
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "b").iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_the_umask_is_read_without_setting_it(monkeypatch):
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", None)  # other threads may be creating files: it must stay as it is
        assert current_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_round_trip_gives_identical_outputs(bundle_dir):
    directory, model = bundle_dir
    bundle = load_bundle(directory)
    assert bundle.name == "demo" and bundle.training == {"steps": 7}
    assert bundle.model.output.weight is bundle.model.target_embedding.weight  # tying survives
    for a, b in zip(model.state_dict().values(), bundle.model.state_dict().values()):
        assert torch.equal(a, b)
    settings = DecodingConfig(mode="beam", beam_size=3, num_return_sequences=3, max_new_tokens=6)
    before = Generator(model, bundle.source_tokenizer, bundle.target_tokenizer).generate(["house"], settings)
    after = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer).generate(["house"], settings)
    assert before == after


def test_manifest_lists_a_checksum_for_every_file(bundle_dir):
    directory, _ = bundle_dir
    manifest = json.loads((directory / "genrnn.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "source.model", "target.model"}
    assert manifest["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert manifest["format_version"] == 1


@pytest.mark.parametrize("name", ["model.safetensors", "source.model", "target.model"])
def test_an_altered_file_is_refused_by_name(bundle_dir, name):
    directory, _ = bundle_dir
    path = directory / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match its checksum"):
        load_bundle(directory)


@pytest.mark.parametrize("name", ["model.safetensors", "target.model", "genrnn.json"])
def test_a_missing_file_is_refused_by_name(bundle_dir, name):
    directory, _ = bundle_dir
    (directory / name).unlink()
    with pytest.raises(BundleError, match=f"{name} is missing"):
        load_bundle(directory)


@pytest.mark.parametrize("version", [99, True, 1.0, "1"])  # true and 1.0 equal 1 in Python
def test_unknown_format_version_is_refused(bundle_dir, tmp_path, version):
    directory, _ = bundle_dir
    copy = shutil.copytree(directory, tmp_path / "copy")
    manifest = json.loads((copy / "genrnn.json").read_text())
    manifest["format_version"] = version
    (copy / "genrnn.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"format version {version!r}"):
        load_bundle(copy)


def test_library_loads_and_decodes_without_lightning_or_litserve(bundle_dir):
    import subprocess
    import sys

    directory, _ = bundle_dir
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None; "
        "sys.modules['litserve'] = None\n"
        "from genrnn.bundle import load_bundle; from genrnn.decoding import Generator\n"
        f"b = load_bundle({str(directory)!r})\n"
        "print(Generator(b.model, b.source_tokenizer, b.target_tokenizer).generate(['cat'])[0].input)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cat"


@pytest.mark.parametrize(
    ("files", "message"),
    [(["weights.safetensors"], "'files' must map file names"), ({"../genrnn.json": "0"}, "is not a file name beside")],
)
def test_a_manifest_whose_files_are_no_names_beside_it_is_refused(bundle_dir, tmp_path, files, message):
    directory, _ = bundle_dir
    copy = shutil.copytree(directory, tmp_path / "copy")
    manifest = json.loads((copy / "genrnn.json").read_text())
    (copy / "genrnn.json").write_text(json.dumps({**manifest, "files": files}))
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_a_model_list_naming_no_bundle_is_refused():
    with pytest.raises(BundleError, match="no bundle named in ','"):
        load_bundle(",")


@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_a_manifest_that_is_no_json_object_is_refused(bundle_dir, tmp_path, content):
    directory, _ = bundle_dir
    copy = shutil.copytree(directory, tmp_path / "copy")
    (copy / "genrnn.json").write_text(content)
    with pytest.raises(BundleError, match="genrnn.json is not"):
        load_bundle(copy)


def rewritten(directory, tmp_path, file: str, content: bytes | None = None, **manifest_changes):
    """A copy of the bundle with ``file`` replaced by ``content`` (its checksum updated) and the manifest changed."""
    from genrnn.files import sha256

    copy = shutil.copytree(directory, tmp_path / "copy")
    manifest = json.loads((copy / "genrnn.json").read_text())
    if content is not None:
        (copy / file).write_bytes(content)
        manifest["files"][file] = sha256(copy / file)
    (copy / "genrnn.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return copy


@pytest.mark.parametrize(
    ("name", "content", "changes", "message"),
    [
        ("source.model", b"not a model", {}, "source.model is not a sentencepiece model"),
        ("model.safetensors", b"xx", {}, "model.safetensors is not a safetensors file"),
        ("genrnn.json", None, {"name": None}, "name must be a non-empty string; got None"),
        ("genrnn.json", None, {"name": 5}, "name must be a non-empty string; got 5"),
        ("genrnn.json", None, {"tokenizer": None}, "tokenizer must be a mapping; got None"),
        ("genrnn.json", None, {"training": [1, 2]}, r"training must be a mapping; got \[1, 2\]"),
        ("genrnn.json", None, {"vocab_sizes": {"source": 5}}, "source.model has .* pieces; genrnn.json says 5"),
    ],
)
def test_a_damaged_file_whose_checksum_was_updated_is_refused_in_one_line(
    bundle_dir, tmp_path, name, content, changes, message
):
    copy = rewritten(bundle_dir[0], tmp_path, name, content, **changes)
    with pytest.raises(BundleError, match=message) as raised:
        load_bundle(copy)
    assert "\n" not in str(raised.value)


def test_a_manifest_without_a_section_names_it(bundle_dir, tmp_path):
    copy = shutil.copytree(bundle_dir[0], tmp_path / "copy")
    manifest = json.loads((copy / "genrnn.json").read_text())
    del manifest["model"]
    (copy / "genrnn.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"genrnn.json: has no 'model' section$"):
        load_bundle(copy)


def test_weights_that_do_not_fit_the_model_are_refused_in_one_line(bundle_dir, tmp_path):
    manifest = json.loads((bundle_dir[0] / "genrnn.json").read_text())
    copy = rewritten(bundle_dir[0], tmp_path, "genrnn.json", model={**manifest["model"], "attention": "luong"})
    with pytest.raises(BundleError, match="does not fit the model") as raised:
        load_bundle(copy)
    assert "\n" not in str(raised.value) and " stored, " in str(raised.value)


def test_a_bundle_trained_before_shared_tokenizers_were_checked_still_loads(bundle_dir, tmp_path):
    # Then a shared model took the source's type and size, and the manifest kept the target's.
    tokenizer = {"shared": True, "source_type": "char", "target_type": "word"}
    assert load_bundle(rewritten(bundle_dir[0], tmp_path, "genrnn.json", tokenizer=tokenizer)).tokenizer_config.shared


def test_a_manifest_that_describes_a_huge_model_is_refused_before_memory_is_taken(bundle_dir, tmp_path):
    model = json.loads((bundle_dir[0] / "genrnn.json").read_text())["model"]
    # Built, each weight matrix of the encoder would take 58 GB.
    copy = rewritten(bundle_dir[0], tmp_path / "a", "genrnn.json", model={**model, "encoder_hidden": 60_000})
    with pytest.raises(BundleError, match=r"does not fit the model in genrnn.json: .* stored, \[.*60000\] described"):
        load_bundle(copy)
    for size in (10**9, 10**20):  # past what torch can count, and past a 64-bit integer
        copy = rewritten(bundle_dir[0], tmp_path / str(size), "genrnn.json", model={**model, "encoder_hidden": size})
        with pytest.raises(BundleError, match="genrnn.json: bad configuration: model.encoder_hidden: must be at most"):
            load_bundle(copy)


def test_a_bundle_directory_with_a_comma_in_its_name_loads_as_one_bundle(bundle_dir, tmp_path):
    directory, _ = bundle_dir
    copy = shutil.copytree(directory, tmp_path / "g2p,v2")
    assert load_bundle(copy).fingerprint == load_bundle(directory).fingerprint
    pair = load_bundle(f"{directory}, {directory}")  # members may be spaced out after their commas
    assert len(pair.manifest["members"]) == 2
    assert load_bundle(f"{directory},").fingerprint == load_bundle(directory).fingerprint  # one named: itself
    # the command line counts members as loading does: the comma's directory is one bundle, not an ensemble
    for model in (str(copy), f"{directory},"):
        args = argparse.Namespace(model=model, ensemble_averaging="log-probabilities")
        with pytest.raises(ConfigurationError, match="--ensemble-averaging: applies to an ensemble"):
            ensemble_averaging(args)
