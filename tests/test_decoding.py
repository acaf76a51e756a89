"""The decoding engine: each mode against a plain reference, seeds, and compaction."""

from __future__ import annotations

import copy
import itertools
import math
import threading
from collections.abc import Sequence

import pytest
import torch

from genrnn import decoding
from genrnn.bundle import load_bundle
from genrnn.config import DecodingConfig, ModelConfig, replace
from genrnn.decoding import Generator, filtered_distribution, length_penalty, wide_dtype
from genrnn.model import Seq2Seq
from genrnn.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer
from tests.conftest import Operations, train_tiny
from tests.test_model import ATTENTION

WORDS = ["cat", "dog", "house", "a", "mouse", "spelling", "x", "tree"]


def small_config(**overrides) -> ModelConfig:
    """A one-layer model small enough to decode in milliseconds, without dropout."""
    values = dict(
        embedding_dim=16,
        encoder_hidden=16,
        decoder_hidden=32,
        encoder_layers=1,
        decoder_layers=1,
        embedding_dropout=0.0,
        layer_dropout=0.0,
        output_dropout=0.0,
    )
    return ModelConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def generator() -> Generator:
    """An untrained model whose EOS is likely: every word decodes alike and short (greedy and beam end at
    once), which tests of refusals, seeds and plumbing need; tests of what decoding finds use ``trained``."""
    torch.manual_seed(3)
    source = train_tokenizer(WORDS * 3, "char", 64)
    target = train_tokenizer(["K AE1 T", "D AO1 G", "HH AW1 S", "AH0", "T R IY1"] * 3, "word", 64)
    model = Seq2Seq(small_config(), source.vocab_size, target.vocab_size)
    with torch.no_grad():
        model.output.bias[EOS_ID] = 2.0
    return Generator(model, source, target, seed=0)


def teacher_forced_logprob(generator: Generator, source: str, sequence: Sequence[int]) -> float:
    """Log-probability of emitting ``sequence`` (EOS included if it ends with one), step by step."""
    model = generator.model
    ids = generator.source_tokenizer.encode([source])[0]
    with torch.no_grad():
        state = model.encode(torch.tensor([ids]), torch.tensor([len(ids)])).state
        total, previous = 0.0, BOS_ID
        for token in sequence:
            logits, state = model.decode(torch.tensor([[previous]]), state)
            logits = logits[0, 0]
            logits[[PAD_ID, BOS_ID]] = float("-inf")
            total += float(logits.log_softmax(-1)[token])
            previous = token
    return total


def greedy_reference(generator: Generator, source: str, max_new_tokens: int) -> list[int]:
    """Step-by-step argmax over one sequence, written plainly."""
    model = generator.model
    ids = generator.source_tokenizer.encode([source])[0]
    with torch.no_grad():
        state = model.encode(torch.tensor([ids]), torch.tensor([len(ids)])).state
        token, out = BOS_ID, []
        for _ in range(max_new_tokens):
            logits, state = model.decode(torch.tensor([[token]]), state)
            logits = logits[0, 0]
            logits[[PAD_ID, BOS_ID]] = float("-inf")
            token = int(logits.argmax())
            if token == EOS_ID:
                break
            out.append(token)
    return out


@pytest.mark.parametrize("method", ["generate", "generate_sorted"])
def test_one_string_is_refused_rather_than_decoded_letter_by_letter(generator, method):
    with pytest.raises(TypeError, match=r"decode it as \['cat'\]"):
        getattr(generator, method)("cat", DecodingConfig())


def test_greedy_equals_a_step_by_step_argmax(trained):
    # A trained model, whose outputs run for several steps: the untrained one's all end at once.
    results = trained.generate(WORDS, DecodingConfig(mode="greedy", max_new_tokens=5))
    for word, result in zip(WORDS, results):
        assert result.candidates[0].tokens == greedy_reference(trained, word, 5)
    assert {r.candidates[0].finish_reason for r in results} == {"eos", "length"}  # some end, some reach the cap
    assert max(len(r.candidates[0].tokens) for r in results) == 5


def test_beam_of_size_one_equals_greedy(trained):
    greedy = trained.generate(WORDS, DecodingConfig(mode="greedy", max_new_tokens=10))
    beam = trained.generate(WORDS, DecodingConfig(mode="beam", beam_size=1, max_new_tokens=10))
    assert len({len(g.candidates[0].tokens) for g in greedy}) > 1  # outputs of several lengths
    for g, b in zip(greedy, beam):
        assert g.candidates[0].tokens == b.candidates[0].tokens
        assert g.candidates[0].logprob == pytest.approx(b.candidates[0].logprob, abs=1e-4)


def test_long_outputs_score_as_exactly_in_beam_search_as_in_greedy():
    """Both sum their log-probabilities in float64: over 256 steps float32 drifted by 1e-3."""
    torch.manual_seed(5)
    source = train_tokenizer(WORDS * 3, "char", 64)
    target = train_tokenizer(["K AE1 T", "D AO1 G", "HH AW1 S", "AH0", "T R IY1"] * 3, "word", 64)
    model = Seq2Seq(small_config(attention="bahdanau"), source.vocab_size, target.vocab_size)
    with torch.no_grad():
        model.output.bias[EOS_ID] = -20.0  # every output runs to the cap
    long = Generator(model, source, target, seed=0)
    greedy = long.generate(WORDS[:3], DecodingConfig(mode="greedy", max_new_tokens=256))
    beam = long.generate(WORDS[:3], DecodingConfig(mode="beam", beam_size=1, max_new_tokens=256))
    for word, g, b in zip(WORDS, greedy, beam):
        assert len(g.candidates[0].tokens) == 256 and g.candidates[0].tokens == b.candidates[0].tokens
        assert b.candidates[0].logprob == pytest.approx(g.candidates[0].logprob, abs=1e-6)
        assert g.candidates[0].logprob == pytest.approx(teacher_forced_logprob(long, word, g.candidates[0].tokens))


def test_sums_are_float64_but_on_mps_which_has_none():
    assert wide_dtype(torch.device("cpu")) == wide_dtype(torch.device("cuda")) == torch.float64
    assert wide_dtype(torch.device("mps")) == torch.float32


def test_every_mode_decodes_with_float32_sums_as_on_mps(trained, monkeypatch):
    """The engine's path on MPS, taken on the CPU: the same outputs, scores to float32's precision."""
    settings = [
        DecodingConfig(mode="greedy", max_new_tokens=10),
        DecodingConfig(mode="sample", seed=3, num_return_sequences=3, top_p=0.9, max_new_tokens=10),
        DecodingConfig(mode="beam", beam_size=4, num_return_sequences=2, max_new_tokens=10),
    ]
    wide = [trained.generate(WORDS, s) for s in settings]
    monkeypatch.setattr(decoding, "wide_dtype", lambda device: torch.float32)
    narrow = [trained.generate(WORDS, s) for s in settings]
    for w, n in zip(wide, narrow):
        for a, b in zip(w, n):
            assert [c.tokens for c in a.candidates] == [c.tokens for c in b.candidates]
            assert [c.logprob for c in b.candidates] == pytest.approx([c.logprob for c in a.candidates], abs=1e-4)


def normalised(candidate, alpha: float) -> float:
    length = len(candidate.tokens) + (candidate.finish_reason == "eos")
    return candidate.logprob / float(length_penalty(torch.tensor(length), torch.tensor(alpha), torch.tensor(False)))


def test_beam_returns_distinct_hypotheses_in_score_order(trained):
    settings = DecodingConfig(mode="beam", beam_size=5, num_return_sequences=5, max_new_tokens=8, length_penalty=0.6)
    for result in trained.generate(WORDS, settings):
        candidates = result.candidates
        assert len(candidates) == 5
        assert len({tuple(c.tokens) for c in candidates}) == 5
        scores = [normalised(c, 0.6) for c in candidates]
        assert scores == sorted(scores, reverse=True)


def test_beam_finds_the_exhaustive_optimum_on_a_tiny_vocabulary():
    torch.manual_seed(7)
    source = train_tokenizer(["ab", "ba", "abba"] * 4, "char", 16)
    target = train_tokenizer(["x y", "y x"] * 4, "word", 16)
    assert target.vocab_size == 6  # pad unk bos eos ▁x ▁y: emitted tokens are unk, eos, x, y
    config = small_config(embedding_dim=8, encoder_hidden=8, decoder_hidden=8, bidirectional=False)
    model = Seq2Seq(config, source.vocab_size, target.vocab_size).eval()
    generator = Generator(model, source, target)
    max_len, alpha = 3, 1.0
    emitted = [1, 4, 5]
    sequences = [(*prefix, EOS_ID) for n in range(max_len) for prefix in itertools.product(emitted, repeat=n)]
    sequences += list(itertools.product(emitted, repeat=max_len))  # stopped by the length cap
    best = max(teacher_forced_logprob(generator, "abba", s) / ((5 + len(s)) / 6) ** alpha for s in sequences)

    settings = DecodingConfig(mode="beam", beam_size=len(sequences), max_new_tokens=max_len, length_penalty=alpha)
    top = generator.generate(["abba"], settings)[0].candidates[0]
    assert normalised(top, alpha) == pytest.approx(best, abs=1e-5)


def beam_reference(generator: Generator, source: str, settings: DecodingConfig) -> list[tuple[float, tuple[int, ...]]]:
    """Beam search over one source, written plainly: (normalised score, tokens with EOS), best first.

    Each step ranks the 2 × beam likeliest extensions; those among the first beam_size that
    end (EOS or the cap) finish, the beam_size best others go on. It stops once beam_size have
    finished and no live beam, ending at its next step, would outscore the last of them.
    """
    k, cap, alpha = settings.beam_size, settings.max_new_tokens, settings.length_penalty

    def penalty(length: int) -> float:
        return length if settings.length_penalty_form == "average" else ((5 + length) / 6) ** alpha

    model = generator.model
    ids = generator.source_tokenizer.encode([source])[0]
    with torch.no_grad():
        beams = [((), 0.0, model.encode(torch.tensor([ids]), torch.tensor([len(ids)])).state)]
        finished: list[tuple[float, tuple[int, ...]]] = []
        for t in range(cap):
            extensions = []
            for tokens, score, state in beams:
                logits, next_state = model.decode(torch.tensor([[tokens[-1] if tokens else BOS_ID]]), state)
                logits = logits[0, 0]
                logits[[PAD_ID, BOS_ID]] = float("-inf")
                logp = logits.log_softmax(-1).double()
                extensions += [  # UNK included: the engine may write it
                    (score + float(logp[i]), (*tokens, i), next_state)
                    for i in range(len(logp))
                    if i not in (PAD_ID, BOS_ID)
                ]
            extensions.sort(key=lambda e: -e[0])
            beams = []
            for rank, (score, tokens, state) in enumerate(extensions[: 2 * k]):
                if tokens[-1] == EOS_ID or t + 1 == cap:
                    if rank < k:
                        finished.append((score / penalty(t + 1), tokens))
                elif len(beams) < k:
                    beams.append((tokens, score, state))
            finished.sort(key=lambda f: -f[0])
            if not beams or (len(finished) >= k and max(b[1] for b in beams) / penalty(t + 2) <= finished[k - 1][0]):
                break
    return finished[:k]


@pytest.mark.parametrize("form, alpha", [("gnmt", 0.6), ("gnmt", 2.0), ("average", 0.0)])
def test_beam_search_equals_a_plain_one_with_its_stopping_rule(trained, g2p_files, form, alpha):
    # A strong length penalty keeps longer hypotheses going after beam_size shorter ones ended.
    words = [line.split("\t")[0] for line in g2p_files["test"].read_text().splitlines()[:60]]
    settings = DecodingConfig(
        mode="beam", beam_size=3, num_return_sequences=3, max_new_tokens=24, length_penalty=alpha,
        length_penalty_form=form,
    )  # fmt: skip
    for word, result in zip(words, trained.generate(words, settings)):
        expected = beam_reference(trained, word, settings)
        got = [(*c.tokens, EOS_ID) if c.finish_reason == "eos" else tuple(c.tokens) for c in result.candidates]
        assert got == [tokens for _, tokens in expected], word


def test_beam_search_of_an_untrained_model_equals_the_plain_one_unk_included(generator):
    model = copy.deepcopy(generator.model)
    with torch.no_grad():
        model.output.bias[UNK_ID] = 1.5  # as likely as a trained model never makes it
    generator = Generator(model, generator.source_tokenizer, generator.target_tokenizer)
    settings = DecodingConfig(mode="beam", beam_size=3, num_return_sequences=3, max_new_tokens=8)
    results = generator.generate(WORDS, settings)
    for word, result in zip(WORDS, results):
        expected = beam_reference(generator, word, settings)
        got = [(*c.tokens, EOS_ID) if c.finish_reason == "eos" else tuple(c.tokens) for c in result.candidates]
        assert got == [tokens for _, tokens in expected], word
    assert any(UNK_ID in c.tokens for r in results for c in r.candidates)  # the case a trained model hides


def test_top_k_one_and_a_tiny_temperature_equal_greedy(trained):
    greedy = trained.generate(WORDS, DecodingConfig(mode="greedy", max_new_tokens=10))
    top1 = trained.generate(WORDS, DecodingConfig(mode="sample", top_k=1, seed=1, max_new_tokens=10))
    cold = trained.generate(WORDS, DecodingConfig(mode="sample", temperature=1e-4, seed=2, max_new_tokens=10))
    frozen = trained.generate(WORDS, DecodingConfig(mode="sample", temperature=1e-30, seed=3, max_new_tokens=10))
    for g, a, b, c in zip(greedy, top1, cold, frozen):
        assert g.candidates[0].tokens == a.candidates[0].tokens == b.candidates[0].tokens == c.candidates[0].tokens


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()[None].repeat(5, 1)
    top_p = torch.tensor([0.3, 0.75, 0.85, 0.99, 1.0])
    kept, order = filtered_distribution(logits, torch.ones(5), torch.zeros(5, dtype=torch.long), top_p)
    assert order[0].tolist() == [1, 3, 2, 0]
    assert (kept > 0).sum(dim=1).tolist() == [1, 2, 3, 4, 4]
    # a p that float32 rounds to 0 still keeps the likeliest token
    tiny, _ = filtered_distribution(logits[:1], torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([1e-50]))
    assert tiny[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(kept[1, :2], torch.tensor([0.5, 0.3]) / 0.8)
    torch.testing.assert_close(kept.sum(dim=1), torch.ones(5))


def test_top_k_keeps_the_k_likeliest_and_every_token_tied_with_the_last():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 1.0, 1.0, 1.0]])
    kept, order = filtered_distribution(logits, torch.ones(2), torch.tensor([2, 2]), torch.ones(2))
    assert order[0, :2].tolist() == [1, 3] and (kept[0] > 0).tolist() == [True, True, False, False]
    # As Hugging Face's top-k: no tied token is kept or dropped for its id alone.
    assert kept[1].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0]) and order[1, 3] == 0
    # A k past the vocabulary keeps it all.
    kept, _ = filtered_distribution(logits[:1], torch.ones(1), torch.tensor([10]), torch.ones(1))
    assert (kept[0] > 0).all()


def test_top_p_measures_what_top_k_left():
    # sorted 0.5, 0.3, 0.2: top-k 2 leaves 0.625, 0.375, so p = 0.6 is reached by the first
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    kept, order = filtered_distribution(logits, torch.ones(1), torch.tensor([2]), torch.tensor([0.6]))
    assert order[0].tolist() == [1, 2, 0] and kept[0].tolist() == [1.0, 0.0, 0.0]


def test_seeded_samples_follow_the_tempered_softmax(generator):
    temperature, n = 0.7, 4000
    ids = generator.source_tokenizer.encode(["house"])[0]
    with torch.no_grad():
        state = generator.model.encode(torch.tensor([ids]), torch.tensor([len(ids)])).state
        logits, _ = generator.model.decode(torch.tensor([[BOS_ID]]), state)
    logits = logits[0, 0]
    logits[[PAD_ID, BOS_ID]] = float("-inf")
    expected = (logits / temperature).softmax(-1)

    settings = [DecodingConfig(mode="sample", temperature=temperature, seed=s, max_new_tokens=1) for s in range(n)]
    first = [r.candidates[0].tokens[:1] or [EOS_ID] for r in generator.generate(["house"] * n, settings)]
    counts = torch.bincount(torch.tensor([f[0] for f in first]), minlength=len(expected)).double()
    for token, p in enumerate(expected.tolist()):
        tolerance = 4.5 * math.sqrt(max(p * (1 - p), 1e-4) / n)
        assert abs(counts[token] / n - p) < tolerance, (token, p, counts[token] / n)


@pytest.fixture(scope="module")
def trained(tiny_bundle) -> Generator:
    bundle = load_bundle(tiny_bundle)
    return Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer, seed=5)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_decoding_waits_for_the_device_once_a_step_also_where_rows_finish(trained, monkeypatch, mode):
    waits, steps = Operations(), []
    step, encode = trained._step_logprobs, trained.model.encode

    def counted_step(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)

    def encode_unwatched(*args, **kwargs):  # the encoder's own (packed lengths) are once a batch
        waits.watching = False
        try:
            return encode(*args, **kwargs)
        finally:
            waits.watching = True

    monkeypatch.setattr(trained, "_step_logprobs", counted_step)
    monkeypatch.setattr(trained.model, "encode", encode_unwatched)
    with torch.no_grad(), waits:  # the words' outputs end at different steps
        outputs = trained.generate(WORDS, DecodingConfig(mode=mode, seed=3, beam_size=3, max_new_tokens=12))

    assert len({len(o.candidates[0].tokens) for o in outputs}) > 1  # rows did finish at different steps
    assert waits.host_waits == len(steps)  # the step's check for finished rows, and nothing else


def mixed_batch(words: list[str]) -> list[DecodingConfig]:
    """37 requests with every mode and a spread of settings."""
    choices = [
        DecodingConfig(mode="greedy", max_new_tokens=20),
        DecodingConfig(mode="sample", temperature=0.7, top_p=0.9, seed=11, max_new_tokens=20),
        DecodingConfig(mode="sample", temperature=1.3, top_k=5, num_return_sequences=3, max_new_tokens=4),
        DecodingConfig(mode="beam", beam_size=3, num_return_sequences=2, max_new_tokens=20),
        DecodingConfig(mode="beam", beam_size=5, length_penalty_form="average", max_new_tokens=6),
    ]
    return [choices[i % len(choices)] for i in range(len(words))]


def test_a_seed_gives_the_same_output_alone_and_in_a_mixed_batch(trained, g2p_files):
    words = [line.split("\t")[0] for line in g2p_files["test"].read_text().splitlines()[:37]]
    settings = mixed_batch(words)
    settings[17] = DecodingConfig(mode="sample", temperature=1.0, seed=1234, num_return_sequences=2, max_new_tokens=20)
    in_batch = trained.generate(words, settings)[17]
    alone = trained.generate([words[17]], settings[17])[0]
    assert [c.tokens for c in alone.candidates] == [c.tokens for c in in_batch.candidates]
    other_seed = trained.generate([words[17]], DecodingConfig(mode="sample", seed=99, num_return_sequences=2))[0]
    assert len(other_seed.candidates) == 2


def test_many_sources_under_one_seed_each_sample_a_stream_of_their_own(generator):
    # Under one stream every copy of a source would draw the same numbers and write the same output.
    sources = ["spelling"] * 24
    settings = DecodingConfig(mode="sample", temperature=2.0, seed=5, max_new_tokens=8)
    outputs = [g.candidates[0].tokens for g in generator.generate_sorted(sources, settings)]
    assert len({tuple(o) for o in outputs}) > 1
    one_at_a_time = [g.candidates[0].tokens for g in generator.generate_sorted(sources, settings, batch_size=1)]
    assert one_at_a_time == outputs
    assert [g.candidates[0].tokens for g in generator.generate_sorted(sources, settings)] == outputs


def test_compaction_changes_no_result(trained, g2p_files):
    words = [line.split("\t")[0] for line in g2p_files["test"].read_text().splitlines()[:37]]
    settings = mixed_batch(words)
    parts = (trained.model, trained.source_tokenizer, trained.target_tokenizer)
    # The same engine seed, so that unseeded requests draw the same streams too.
    compact = Generator(*parts, seed=8).generate(words, settings)
    plain = Generator(*parts, seed=8, compact=False).generate(words, settings)
    for a, b in zip(compact, plain):
        assert [c.tokens for c in a.candidates] == [c.tokens for c in b.candidates]
        assert [c.finish_reason for c in a.candidates] == [c.finish_reason for c in b.candidates]
        for x, y in zip(a.candidates, b.candidates):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_every_beam_hypothesis_scores_the_log_probability_it_reports(trained, g2p_files):
    # Requests of several beam sizes, caps and lengths end at different steps, so the
    # back-pointers of each are traced through the compaction of the others.
    words = [line.split("\t")[0] for line in g2p_files["test"].read_text().splitlines()[:37]]
    choices = [
        DecodingConfig(mode="beam", beam_size=3, num_return_sequences=2, max_new_tokens=20),
        DecodingConfig(mode="beam", beam_size=5, length_penalty_form="average", max_new_tokens=6),
        DecodingConfig(mode="beam", beam_size=4, num_return_sequences=4, max_new_tokens=3),
        DecodingConfig(mode="beam", beam_size=2, max_new_tokens=1),
    ]
    settings = [choices[i % len(choices)] for i in range(len(words))]
    results = trained.generate(words, settings)
    assert sum(c.finish_reason == "length" for r in results for c in r.candidates) > 0
    for word, result in zip(words, results):
        for candidate in result.candidates:
            sequence = candidate.tokens + ([EOS_ID] if candidate.finish_reason == "eos" else [])
            assert candidate.logprob == pytest.approx(teacher_forced_logprob(trained, word, sequence), abs=1e-4)


def test_sampled_candidates_come_best_first(trained):
    result = trained.generate(["testing"], DecodingConfig(mode="sample", num_return_sequences=6, seed=3))[0]
    logprobs = [c.logprob for c in result.candidates]
    assert len(logprobs) == 6 and logprobs == sorted(logprobs, reverse=True)


def test_max_new_tokens_over_the_cap_is_refused(generator):
    with pytest.raises(ValueError, match="cap"):
        generator.generate(["cat"], DecodingConfig(max_new_tokens=generator.max_new_tokens_cap + 1))


@pytest.mark.parametrize("attention", ATTENTION)
def test_every_mode_runs_on_an_attention_model(kinds, attention):
    attending = kinds[attention]  # two decoder layers: a bottom query differs from a top one
    greedy = attending.generate(WORDS, DecodingConfig(mode="greedy", max_new_tokens=10))
    assert max(len(g.candidates[0].tokens) for g in greedy) > 1
    for word, result in zip(WORDS, greedy):
        assert result.candidates[0].tokens == greedy_reference(attending, word, 10)
    beam = attending.generate(WORDS, DecodingConfig(mode="beam", beam_size=1, max_new_tokens=10))
    assert [b.candidates[0].tokens for b in beam] == [g.candidates[0].tokens for g in greedy]
    sampled = attending.generate(WORDS, DecodingConfig(mode="sample", num_return_sequences=3, seed=1))
    assert all(len(s.candidates) == 3 for s in sampled)


def test_threads_decoding_at_once_leave_the_onednn_switch_as_they_found_it(generator):
    """Small batches turn oneDNN off while they decode; overlapping ones must not leave it off."""
    assert torch.backends.mkldnn.enabled
    sample = DecodingConfig(mode="sample", seed=1, num_return_sequences=2, max_new_tokens=8)
    failures = []

    def decode() -> None:
        try:
            for _ in range(30):
                generator.generate(WORDS, sample)
        except Exception as error:  # a thread's failure would otherwise go unseen
            failures.append(error)

    threads = [threading.Thread(target=decode) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert torch.backends.mkldnn.enabled


def test_a_capped_output_ends_with_reason_length(generator):
    never_ends = copy.deepcopy(generator.model)
    with torch.no_grad():
        never_ends.output.bias[EOS_ID] = -20.0
    capped = Generator(never_ends, generator.source_tokenizer, generator.target_tokenizer, seed=0)
    for settings in (DecodingConfig(mode="greedy"), DecodingConfig(mode="beam"), DecodingConfig(mode="sample")):
        result = capped.generate(["spelling"], replace(settings, max_new_tokens=1))[0].candidates[0]
        assert (len(result.tokens), result.finish_reason) == (1, "length"), settings.mode


ARCHITECTURES = {"none": {}, **ATTENTION}


@pytest.fixture(scope="module")
def kinds(g2p_files, tmp_path_factory) -> dict[str, Generator]:
    """A tiny model of each architecture with two decoder layers, trained for two epochs (seconds), so that
    its outputs differ by word and run several steps; in float64, where a row computes alike alone and
    in a batch: results compare with ==."""
    generators = {}
    for name, architecture in ARCHITECTURES.items():
        directory = tmp_path_factory.mktemp(f"kind-{name}")
        bundle_dir = train_tiny(g2p_files["train"], g2p_files["dev"], directory, 2, decoder_layers=2, **architecture)
        bundle = load_bundle(bundle_dir)
        generators[name] = Generator(bundle.model.double(), bundle.source_tokenizer, bundle.target_tokenizer, seed=0)
    return generators


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_request_of_a_mixed_batch_decodes_as_it_would_alone(kinds, architecture):
    engine = kinds[architecture]
    words = [*WORDS, "", "a" * 30]  # an empty input and a long one beside the rest
    # Only a seeded sample is its own: an unseeded one draws from the engine's stream.
    settings = [replace(s, seed=7) if s.mode == "sample" else s for s in mixed_batch(words)]
    together = engine.generate(words, settings)
    for word, setting, result in zip(words, settings, together):
        alone = engine.generate([word], setting)[0]
        assert [c.to_dict() for c in result.candidates] == [c.to_dict() for c in alone.candidates], word
    # Beam requests ended at different steps, so that the batch went on without the first to end.
    beams = [r for s, r in zip(settings, together) if s.mode == "beam"]
    assert len({max(len(c.tokens) for c in r.candidates) for r in beams}) > 1


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_reported_log_probabilities_are_the_training_forwards(kinds, architecture):
    """The engine steps one position at a time; training runs the teacher-forced forward: they agree."""
    engine = kinds[architecture]
    settings = [DecodingConfig(mode="greedy"), DecodingConfig(mode="beam", beam_size=3, num_return_sequences=3)]
    model = engine.model
    lengths = set()
    for setting in settings:
        for word, result in zip(WORDS, engine.generate(WORDS, setting)):
            lengths.update(len(c.tokens) for c in result.candidates)
            ids = engine.source_tokenizer.encode([word])[0]
            for candidate in result.candidates:
                outputs = candidate.tokens + ([EOS_ID] if candidate.finish_reason == "eos" else [])
                with torch.no_grad():
                    logits = model(torch.tensor([ids]), torch.tensor([len(ids)]), torch.tensor([[BOS_ID, *outputs]]))
                logits = logits[0, : len(outputs)]
                logits[:, [PAD_ID, BOS_ID]] = float("-inf")  # the engine never emits these
                expected = logits.log_softmax(-1).gather(1, torch.tensor(outputs)[:, None]).sum()
                # The engine's softmax is float32 (its sums float64), whatever the weights.
                assert candidate.logprob == pytest.approx(float(expected), abs=1e-5), (word, setting.mode)
    assert max(lengths) >= 3  # long enough for beams to have been reordered to their parents' states
