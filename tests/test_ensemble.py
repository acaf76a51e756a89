"""Ensembles: several bundles decoded together by averaging their probabilities or log-probabilities."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from genrnn.bundle import load_bundle, save_bundle
from genrnn.config import AVERAGINGS, DecodingConfig, ModelConfig, TokenizerConfig
from genrnn.decoding import Generator
from genrnn.ensemble import Ensemble
from genrnn.errors import BundleError
from genrnn.model import Seq2Seq
from genrnn.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizers

WORDS, PHONES = ["cat", "dog", "house", "mouse"] * 4, ["K AE1 T", "D AO1 G", "HH AW1 S", "M AW1 S"] * 4


def member(seed: int, tokenizers, attention: str = "none") -> Seq2Seq:
    torch.manual_seed(seed)
    config = ModelConfig(
        embedding_dim=16, encoder_hidden=8, decoder_hidden=16, encoder_layers=1, decoder_layers=1, attention=attention
    )
    return Seq2Seq(config, tokenizers[0].vocab_size, tokenizers[1].vocab_size).eval()


@pytest.fixture(scope="module")
def tokenizers():
    return train_tokenizers(WORDS, PHONES, TokenizerConfig())


def test_an_ensemble_of_one_decodes_like_its_member(tokenizers):
    model = member(0, tokenizers)
    settings = DecodingConfig(mode="beam", beam_size=3, num_return_sequences=2, max_new_tokens=6)
    alone = Generator(model, *tokenizers).generate(WORDS[:4], settings)
    together = Generator(Ensemble([model]), *tokenizers).generate(WORDS[:4], settings)
    for a, b in zip(alone, together):
        assert [c.tokens for c in a.candidates] == [c.tokens for c in b.candidates]
        assert [c.logprob for c in a.candidates] == pytest.approx([c.logprob for c in b.candidates], abs=1e-5)


@pytest.mark.parametrize("averaging", AVERAGINGS)
def test_the_next_token_distribution_is_the_members_average(tokenizers, averaging):
    members = [member(1, tokenizers), member(2, tokenizers, attention="luong")]
    ensemble = Ensemble(members, averaging)
    ids = torch.tensor(tokenizers[0].encode(["house"]))
    lengths = torch.tensor([ids.shape[1]])
    bos = torch.tensor([[BOS_ID]])
    with torch.no_grad():
        averaged, _ = ensemble.decode(bos, ensemble.encode(ids, lengths).state)
        logits = torch.stack([m.decode(bos, m.encode(ids, lengths).state)[0] for m in members])
    logits[..., [PAD_ID, BOS_ID]] = float("-inf")  # each member's distribution as it decodes alone
    log_probs = logits.log_softmax(-1)
    if averaging == "probabilities":  # a mixture
        expected = log_probs.exp().mean(0)
    else:  # a normalised product
        expected = log_probs.mean(0).exp() / log_probs.mean(0).exp().sum(-1, keepdim=True)
    torch.testing.assert_close(averaged.exp(), expected)
    assert averaged.exp().sum(-1).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("averaging", AVERAGINGS)
def test_every_step_of_a_mixed_ensembles_outputs_scores_the_members_average(tokenizers, averaging):
    """Members of other architectures and depths keep their own states through every step of a beam."""
    shapes = [
        {},
        {"attention": "bahdanau", "decoder_layers": 2, "attention_query": "bottom"},
        {"attention": "luong", "cell": "gru", "encoder_layers": 2},
    ]
    members = []
    for seed, shape in enumerate(shapes):
        torch.manual_seed(seed)
        config = ModelConfig(embedding_dim=16, encoder_hidden=8, decoder_hidden=16, **shape)
        members.append(Seq2Seq(config, tokenizers[0].vocab_size, tokenizers[1].vocab_size).double().eval())
    settings = DecodingConfig(mode="beam", beam_size=3, num_return_sequences=3, max_new_tokens=6)
    results = Generator(Ensemble(members, averaging), *tokenizers).generate(WORDS[:4], settings)
    for word, result in zip(WORDS[:4], results):
        ids = tokenizers[0].encode([word])
        for candidate in result.candidates:
            outputs = candidate.tokens + ([EOS_ID] if candidate.finish_reason == "eos" else [])
            target_in = torch.tensor([[BOS_ID, *outputs]])
            with torch.no_grad():  # each member alone, teacher-forced over the whole output
                each = torch.stack([m(torch.tensor(ids), torch.tensor([len(ids[0])]), target_in)[0] for m in members])
            each[..., [PAD_ID, BOS_ID]] = float("-inf")  # never emitted: each member's distribution without them
            each = each.log_softmax(-1)
            if averaging == "probabilities":
                averaged = torch.logsumexp(each, dim=0) - math.log(len(members))
            else:
                averaged = each.mean(dim=0)
            steps = averaged[: len(outputs)].log_softmax(-1)
            expected = steps.gather(1, torch.tensor(outputs)[:, None]).sum()
            assert candidate.logprob == pytest.approx(float(expected), abs=1e-5), word


def test_an_unknown_averaging_is_refused(tokenizers):
    with pytest.raises(ValueError, match="averaging must be one of probabilities, log-probabilities"):
        Ensemble([member(1, tokenizers)], "geometric")
    with pytest.raises(ValueError, match="needs at least one member"):
        Ensemble([])


def test_bundles_joined_by_commas_load_as_an_ensemble(tokenizers, tmp_path):
    for i in range(2):
        save_bundle(tmp_path / f"m{i}", member(i, tokenizers), *tokenizers, TokenizerConfig(), f"m{i}")
    bundle = load_bundle(f"{tmp_path / 'm0'},{tmp_path / 'm1'}")
    assert isinstance(bundle.model, Ensemble) and bundle.name == "m0+m1"
    assert [m["name"] for m in bundle.info()["ensemble"]] == ["m0", "m1"]
    assert bundle.info()["averaging"] == bundle.model.averaging == "probabilities"
    # Averaged otherwise, the same members are another model: a resumed job must not mix the two.
    other = load_bundle(f"{tmp_path / 'm0'},{tmp_path / 'm1'}", averaging="log-probabilities")
    assert other.info()["averaging"] == other.model.averaging == "log-probabilities"
    assert other.fingerprint != bundle.fingerprint
    # The default's fingerprint is the one ensembles had before the choice: their jobs still resume.
    members = "".join(load_bundle(tmp_path / f"m{i}").fingerprint for i in range(2))
    assert bundle.fingerprint == hashlib.sha256(members.encode()).hexdigest()
    result = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer).generate(["cat"])
    assert result[0].candidates[0].finish_reason in {"eos", "length"}

    other = train_tokenizers(["x", "y"] * 5, ["A", "B"] * 5, TokenizerConfig())
    save_bundle(tmp_path / "other", member(3, other), *other, TokenizerConfig(), "other")
    with pytest.raises(BundleError, match="tokenizers differ"):
        load_bundle(f"{tmp_path / 'm0'},{tmp_path / 'other'}")


def test_evaluate_takes_an_ensemble_and_two_copies_score_like_one(tiny_bundle, g2p_files, tmp_path):
    import json
    import subprocess
    import sys

    def wer(model: str) -> float:
        out = tmp_path / "scores.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "genrnn.cli",
                "evaluate",
                "--model",
                model,
                "--data",
                str(g2p_files["test"]),
                "--output",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        return json.loads(out.read_text())["wer"]

    assert wer(f"{tiny_bundle},{tiny_bundle}") == wer(str(tiny_bundle))


@pytest.mark.parametrize("averaging", AVERAGINGS)
def test_evaluate_averages_as_asked(tiny_bundle, other_bundle, g2p_files, tmp_path, averaging):
    import json

    from genrnn.cli import main
    from genrnn.data import read_examples
    from genrnn.evaluation import evaluate

    model = f"{tiny_bundle},{other_bundle}"
    out = tmp_path / "scores.json"
    args = ["evaluate", "--model", model, "--data", str(g2p_files["test"]), "--output", str(out), "--mode", "beam"]
    assert main([*args, "--ensemble-averaging", averaging]) == 0

    bundle = load_bundle(model, averaging=averaging)
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    expected = evaluate(generator, read_examples(g2p_files["test"]), DecodingConfig(mode="beam"))
    assert json.loads(out.read_text()) == pytest.approx(expected.to_dict())
