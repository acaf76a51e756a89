"""sentencepiece tokenizers with fixed special ids."""

from __future__ import annotations

import pytest

from genrnn.config import TokenizerConfig
from genrnn.errors import ConfigurationError
from genrnn.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer, train_tokenizers

WORDS = ["cat", "dog", "house", "mouse"] * 5
PHONES = ["K AE1 T", "D AO1 G", "HH AW1 S", "M AW1 S"] * 5


def test_special_ids_are_fixed_and_round_trip_is_exact(tmp_path):
    source, target = train_tokenizers(WORDS, PHONES, TokenizerConfig())
    for tokenizer in (source, target):
        sp = tokenizer._sp
        assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert source.decode(source.encode(WORDS[:4])) == WORDS[:4]
    assert target.decode(target.encode(PHONES[:4])) == PHONES[:4]
    # a word model gives one piece per phoneme, a char model one per letter
    assert [len(ids) for ids in target.encode(PHONES[:4])] == [3, 3, 3, 3]
    assert [len(ids) for ids in source.encode(WORDS[:4])] == [3, 3, 5, 5]
    source.save(tmp_path / "s.model")
    assert Tokenizer.load(tmp_path / "s.model").encode(["cab"]) == source.encode(["cab"])


@pytest.mark.parametrize("target_type", ["word", "char"])
@pytest.mark.parametrize("shared", [False, True])
def test_targets_round_trip_as_written_where_sources_are_normalised(target_type, shared):
    # IPA's aspiration, a full-width letter and a ligature: NFKC would write them h, A and fi
    phones = ["kʰ æ tʰ", "pʰ ɪ n", "Ａ ﬁ"] * 5
    words = ["ｃat", "pin", "ﬁ"] * 5
    config = TokenizerConfig(shared=shared, target_type=target_type, source_type=target_type if shared else "char")
    source, target = train_tokenizers(words, phones, config)
    assert target.decode(target.encode(phones[:3])) == phones[:3]
    assert UNK_ID not in [i for ids in target.encode(phones[:3]) for i in ids]
    if not shared:  # a source in full-width letters reads as the same word in ASCII
        assert source.encode(["ｃat"]) == source.encode(["cat"])


def test_decode_drops_special_ids():
    source, _ = train_tokenizers(WORDS, PHONES, TokenizerConfig())
    ids = source.encode(["cat"])[0]
    assert source.decode([[BOS_ID, *ids, EOS_ID, PAD_ID]]) == ["cat"]


def test_shared_model_serves_both_sides():
    config = TokenizerConfig(
        shared=True, source_type="bpe", source_vocab_size=40, target_type="bpe", target_vocab_size=40
    )
    source, target = train_tokenizers(WORDS, PHONES, config)
    assert source is target
    assert source.decode(source.encode(["K AE1 T"])) == ["K AE1 T"]


def test_a_shared_model_refuses_target_settings_it_would_ignore():
    config = TokenizerConfig(shared=True, source_type="char", target_type="word")  # phonemes split into letters
    with pytest.raises(ConfigurationError, match="tokenizer.shared: .* got word/256 for char/256"):
        train_tokenizers(WORDS, PHONES, config)


def test_a_vocabulary_smaller_than_the_alphabet_is_a_settings_error():
    config = TokenizerConfig(source_type="bpe", source_vocab_size=16)
    words = ["abcdefghijklmnopqrstuvwxyz", "quick brown fox"] * 5
    with pytest.raises(
        ConfigurationError, match="tokenizer.source_vocab_size: a bpe model of 16 pieces .* the sources:"
    ):
        train_tokenizers(words, ["K AE1 T"] * 10, config)


def test_a_shared_vocabulary_too_small_names_both_sides_as_its_corpus():
    config = TokenizerConfig(
        shared=True, source_type="bpe", source_vocab_size=16, target_type="bpe", target_vocab_size=16
    )
    words = ["abcdefghijklmnopqrstuvwxyz", "quick brown fox"] * 5
    with pytest.raises(ConfigurationError, match="16 pieces cannot be trained on the sources and targets:"):
        train_tokenizers(words, ["K AE1 T"] * 10, config)


def test_vocab_size_is_an_upper_bound():
    source, _ = train_tokenizers(WORDS, PHONES, TokenizerConfig(source_type="unigram", source_vocab_size=5000))
    assert source.vocab_size < 5000


def test_long_texts_are_learnt_from_too():
    # sentencepiece's default would leave out every text over 4,192 bytes, and their pieces with them.
    tokenizer = train_tokenizer(["abcdefgh" * 600] * 5 + ["xy"] * 5, "char", 32)
    assert UNK_ID not in tokenizer.encode(["abcdefgh"])[0]
