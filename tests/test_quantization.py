"""int8 dynamic quantization: which layers it changes, how close it stays, and the command-line option."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic

from genrnn.bundle import load_bundle
from genrnn.cli import main
from genrnn.data import pad, read_examples
from genrnn.decoding import Generator
from genrnn.ensemble import Ensemble
from genrnn.errors import ConfigurationError
from genrnn.quantization import quantize_int8
from genrnn.tokenizer import BOS_ID


def test_int8_replaces_recurrent_and_linear_layers_of_a_copy(tiny_bundle):
    model = load_bundle(tiny_bundle).model
    quantized = quantize_int8(model)
    assert isinstance(model.encoder.layers[0], nn.LSTM) and isinstance(model.output, nn.Linear)
    assert isinstance(quantized.encoder.layers[0], dynamic.LSTM)
    assert isinstance(quantized.decoder.layers[0], dynamic.LSTM)
    assert isinstance(quantized.output, dynamic.Linear)
    assert torch.equal(quantized.target_embedding.weight, model.target_embedding.weight)  # embeddings stay float
    assert model.encode_by_length and not quantized.encode_by_length  # no oneDNN kernel for int8 layers to gain


def test_int8_tells_each_member_of_an_ensemble_not_to_encode_by_length(tiny_bundle):
    members = [load_bundle(tiny_bundle).model for _ in range(2)]
    quantized = quantize_int8(Ensemble(members))
    assert all(isinstance(member.encoder.layers[0], dynamic.LSTM) for member in quantized.members)
    assert all(member.encode_by_length for member in members)
    assert not any(member.encode_by_length for member in quantized.members)  # they encode for the ensemble


def test_int8_log_probabilities_stay_close_to_float(tiny_bundle, g2p_files):
    bundle = load_bundle(tiny_bundle)
    examples = read_examples(g2p_files["dev"])[:64]
    sources = bundle.source_tokenizer.encode([e.source for e in examples])
    targets = bundle.target_tokenizer.encode([e.targets[0] for e in examples])
    source, lengths = pad(sources), torch.tensor([len(s) for s in sources])
    target_in = pad([[BOS_ID, *t] for t in targets])
    with torch.inference_mode():
        exact = bundle.model(source, lengths, target_in).log_softmax(-1)
        approximate = quantize_int8(bundle.model)(source, lengths, target_in).log_softmax(-1)
    assert (exact - approximate).abs().max() < 0.25
    assert not torch.equal(exact, approximate)  # it really ran on int8 weights


def test_int8_is_refused_for_a_model_off_the_cpu(tiny_bundle):
    model = load_bundle(tiny_bundle, "meta")
    with pytest.raises(ConfigurationError, match="runs on the CPU"):
        quantize_int8(model.model)


def test_int8_is_refused_for_a_model_not_in_float32(tiny_bundle):
    model = load_bundle(tiny_bundle).model.double()  # it quantized, then failed at its first decoding step
    with pytest.raises(ConfigurationError, match="takes a float32 model; this one is torch.float64"):
        quantize_int8(model)


def test_generate_and_evaluate_take_quantize_int8(tiny_bundle, g2p_files, tmp_path, capsys, monkeypatch):
    import genrnn.quantization
    import serving.batch

    quantized, decoding = [], []  # the models each command quantized (the real function, watched), and decoded

    def watched(model, quantize=genrnn.quantization.quantize_int8):
        quantized.append(quantize(model))
        return quantized[-1]

    def noting(self, model, *args, init=Generator.__init__, **kwargs):
        decoding.append(model)
        init(self, model, *args, **kwargs)

    monkeypatch.setattr(genrnn.quantization, "quantize_int8", watched)  # evaluate imports it as it runs
    monkeypatch.setattr(serving.batch, "quantize_int8", watched)
    monkeypatch.setattr(Generator, "__init__", noting)
    words = tmp_path / "words.txt"
    words.write_text("".join(e.source + "\n" for e in read_examples(g2p_files["dev"])[:10]))
    output = tmp_path / "out.jsonl"
    model = ["--model", str(tiny_bundle), "--quantize", "int8"]
    assert main(["generate", *model, "--input", str(words), "--output", str(output), "--accelerator", "cpu"]) == 0
    assert len(output.read_text().splitlines()) == 10 and len(quantized) == 1 and decoding[-1] is quantized[-1]
    assert main(["evaluate", *model, "--data", str(g2p_files["dev"]), "--output", str(tmp_path / "s.json")]) == 0
    assert len(quantized) == 2 and decoding[-1] is quantized[-1]
    assert "WER" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["items"] == len(read_examples(g2p_files["dev"]))
