"""Reading pairs, the built-in CMUdict task, and length-bucketed batches."""

from __future__ import annotations

import math
import random
import unicodedata

import pytest

from genrnn.data import (
    SHUFFLE_SEEDING,
    SUM_SHUFFLE_SEEDING,
    Example,
    PairDataset,
    TokenBudgetBatchSampler,
    cmudict_split,
    collate,
    pad,
    read_examples,
    read_length,
)
from genrnn.errors import DataError
from genrnn.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer


def test_tsv_and_jsonl_read_the_same_examples(tmp_path):
    (tmp_path / "a.tsv").write_text("cat\tK AE1 T\n\nread\tR EH1 D\tR IY1 D\n")
    (tmp_path / "a.jsonl").write_text(
        '{"source": "cat", "target": "K AE1 T"}\n{"source": "read", "target": ["R EH1 D", "R IY1 D"]}\n'
    )
    expected = [Example("cat", ("K AE1 T",)), Example("read", ("R EH1 D", "R IY1 D"))]
    assert read_examples(tmp_path / "a.tsv") == expected
    assert read_examples(tmp_path / "a.jsonl") == expected
    # as some editors save them: a byte-order mark, a trailing tab, Windows line ends, an upper-case suffix
    (tmp_path / "b.tsv").write_bytes(b"\xef\xbb\xbfcat\tK AE1 T\t\r\nread\tR EH1 D\tR IY1 D\r\n")
    (tmp_path / "b.JSONL").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.jsonl").read_bytes())
    assert read_examples(tmp_path / "b.tsv") == expected
    assert read_examples(tmp_path / "b.JSONL") == expected
    # two such files joined by cat: the second's mark is no part of its first source
    (tmp_path / "c.tsv").write_bytes(b"\xef\xbb\xbfcat\tK AE1 T\n\xef\xbb\xbfread\tR EH1 D\tR IY1 D\n")
    assert read_examples(tmp_path / "c.tsv") == expected


@pytest.mark.parametrize(
    "name,content,line,message",
    [
        ("bad.tsv", "cat\tK AE1 T\ndog K AO1 G\n", 2, "no tab"),
        ("bad.tsv", "cat\tK AE1 T\n\n\tK\n", 3, "empty"),
        ("bad.tsv", "cat\tK AE1 T\ndog\t\n", 2, "empty target"),  # not "no tab": it has one
        # JSON lines under another suffix: split at the tabs between their tokens, they read as pairs
        ("bad.ndjson", '{"source":\t"cat",\t"target":\t"K AE1 T"}\n', 1, "a JSON object, .* name the file .jsonl"),
        ("bad.tsv", "cat\tK AE1 T\n\u200b\tK\n", 2, "only unseen characters"),  # a zero-width space reads as nothing
        ("bad.jsonl", '{"source": "cat", "target": "\\u00ad"}\n', 1, "only unseen characters"),  # a soft hyphen
        ("bad.jsonl", '{"source": "cat", "target": "K"}\n{"source": "dog"\n', 2, "not valid JSON"),
        ("bad.jsonl", '{"source": "cat"}\n', 1, '"source" and "target"'),
        # the parser would keep the last, silently
        ("bad.jsonl", '{"source": "cat", "target": "K", "target": "D"}\n', 1, "key 'target' is given twice"),
        ("bad.jsonl", '{"source": "cat", "target": "K", "n": ' + "9" * 5000 + "}\n", 1, "4300 digits"),
        ("bad.jsonl", '{"source": "cat", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", 1, "nested too deeply"),
        ("bad.jsonl", '{"source": 3, "target": "K"}\n', 1, "must be strings"),
        ("bad.jsonl", '{"source": "cat", "target": "K"}\n{"source": "\\ud800", "target": "K"}\n', 2, "surrogate"),
        *(
            (
                "bad.jsonl",
                f'{{"source": "cat", "target": "K"}}\n{{"source": "c{escape}at", "target": "K"}}\n',
                2,
                "NUL inside",
            )
            for escape in ("\\t", "\\n", "\\r", "\\u0000")
        ),
        ("bad.tsv", "cat\tK AE1 T\ncaf\xe9\tK AE1 F\n", 2, "not UTF-8"),  # written as Latin-1 below
        ("bad.tsv", "cat\tK AE1 T\ndog\tD AO1 G\rread\tR EH1 D\r\n", 2, "carriage return"),  # CR-only ends
        ("bad.tsv", "cat\tK AE1 T\n\x00d\x00o\x00g\x00\t\x00D\x00\n", 2, "NUL"),  # UTF-16 text is valid UTF-8
        ("bad.tsv", "cat\tK AE1 T\n" + "a" * (1 << 20) + "b\tK\n", 2, "more than 1,048,576 bytes"),
    ],
)
def test_a_malformed_line_names_its_file_and_line(tmp_path, name, content, line, message):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1" if "not UTF-8" in message else "utf-8"))
    with pytest.raises(DataError, match=f"{name}:{line}: .*{message}"):
        read_examples(path)


def test_lines_within_the_limit_are_read_as_a_plain_reader_reads_them(tmp_path, monkeypatch):
    """Whatever carriage returns surround the limit: the numbers and contents are those of every line."""
    import genrnn.data

    rng, path = random.Random(0), tmp_path / "f"
    for _ in range(5000):
        limit = rng.randint(1, 6)  # 1 MiB, scaled down so that random lines cross it
        monkeypatch.setattr(genrnn.data, "MAX_LINE_BYTES", limit)
        path.write_bytes(bytes(rng.choice(b"ab\r\n\xef") for _ in range(rng.randint(0, 24))))
        with path.open("rb") as f:
            plain = [raw.rstrip(b"\r\n") for raw in f]
        expected = [(n, line if len(line) <= limit else None) for n, line in enumerate(plain, start=1)]
        assert list(genrnn.data.numbered_lines(path)) == expected, path.read_bytes()


def test_lines_of_one_source_are_merged_for_scoring(tmp_path):
    (tmp_path / "a.tsv").write_text("read\tR EH1 D\ncat\tK AE1 T\nread\tR IY1 D\nread\tR EH1 D\n")
    assert read_examples(tmp_path / "a.tsv") == [
        Example("read", ("R EH1 D", "R IY1 D")),
        Example("cat", ("K AE1 T",)),
    ]


def test_missing_file_and_unknown_builtin():
    with pytest.raises(DataError, match="not found"):
        read_examples("/nonexistent/pairs.tsv")
    with pytest.raises(DataError, match="unknown built-in"):
        read_examples("builtin:timit")


def test_builtin_cmudict_splits_by_word_and_keeps_every_pronunciation():
    train, dev = read_examples("builtin:cmudict"), read_examples("builtin:cmudict:dev")
    assert 100_000 < len(train) and 5_000 < len(dev) < 8_000
    assert not {e.source for e in train} & {e.source for e in dev}
    read = next(e for e in [*train, *dev, *read_examples("builtin:cmudict:test")] if e.source == "read")
    assert set(read.targets) == {"R EH1 D", "R IY1 D"}
    assert all(cmudict_split(e.source) == "dev" for e in dev)
    assert all(e.source == e.source.lower() for e in dev[:100])


def test_collate_builds_teacher_forcing_inputs_and_outputs():
    batch = collate([(0, [5, 6, 7], [8, 9]), (1, [5], [8, 9, 10])])
    assert batch.source.tolist() == [[5, 6, 7], [5, PAD_ID, PAD_ID]]
    assert batch.source_lengths.tolist() == [3, 1]
    assert batch.target_in.tolist() == [[BOS_ID, 8, 9, PAD_ID], [BOS_ID, 8, 9, 10]]
    assert batch.target_out.tolist() == [[8, 9, EOS_ID, PAD_ID], [8, 9, 10, EOS_ID]]
    assert batch.padding_fraction == pytest.approx(3 / 14)
    # counted on the host, and equal to what the tensors hold
    assert (
        (batch.source_tokens, batch.target_tokens)
        == (4, 7)
        == (
            int(batch.source_lengths.sum()),
            int((batch.target_out != PAD_ID).sum()),
        )
    )
    moved = batch.to("cpu")
    assert (moved.source_tokens, moved.target_tokens) == (4, 7) and moved.source_lengths is batch.source_lengths


def test_pad_fills_rows_to_one_length():
    assert pad([[4], [5, 6, 7], []]).tolist() == [[4, PAD_ID, PAD_ID], [5, 6, 7], [PAD_ID] * 3]
    assert pad([[4]], length=3).tolist() == [[4, PAD_ID, PAD_ID]]
    assert pad([], length=2).shape == (0, 2)


def test_dataset_drops_pairs_over_the_length_limits():
    tok = train_tokenizer(["abcdef", "ab"] * 5, "char", 32)
    dataset = PairDataset([("abcdef", "ab"), ("ab", "ab")], tok, tok, max_source_length=4)
    assert len(dataset) == 1 and dataset.dropped == 1


def test_token_budget_batches_cover_everything_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(1000)]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=200, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) * max(lengths[i] for i in b) <= 200 for b in batches)
    assert len(sampler) == len(batches)
    # bucketing keeps padding small compared with batches of the same size in random order
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert sum(lengths) / padded > 0.9
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch


def test_every_seed_and_epoch_shuffle_in_an_order_of_their_own():
    lengths = [random.Random(i).randint(1, 40) for i in range(500)]

    def order(seed: int, epoch: int, seeding: str = SHUFFLE_SEEDING) -> list[list[int]]:
        sampler = TokenBudgetBatchSampler(lengths, max_tokens=200, seed=seed, seeding=seeding)
        sampler.set_epoch(epoch)
        return list(sampler)

    orders = [order(seed, epoch) for seed in (1, 7, 11, 13) for epoch in range(8)]
    assert len({str(o) for o in orders}) == len(orders)  # seed 7's fifth epoch is not seed 11's first
    # runs stamped before the seeding was recorded keep the order they began with
    assert order(7, 4, SUM_SHUFFLE_SEEDING) == order(11, 0, SUM_SHUFFLE_SEEDING) != order(7, 4)
    with pytest.raises(ValueError, match="seeding"):
        TokenBudgetBatchSampler(lengths, max_tokens=200, seeding="seed")


def test_batch_size_caps_the_number_of_pairs():
    sampler = TokenBudgetBatchSampler([3] * 100, max_tokens=1000, max_items=8, shuffle=False)
    assert max(len(b) for b in sampler) == 8


def test_ranks_share_the_batches_evenly_without_overlap():
    lengths = [random.Random(i).randint(1, 30) for i in range(301)]
    ranks = [list(TokenBudgetBatchSampler(lengths, 120, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    alone = list(TokenBudgetBatchSampler(lengths, 120, seed=3))  # the same pass, on one process
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(len(alone) / 2)
    covered = {i for batches in ranks for b in batches for i in b}
    assert covered == set(range(301))
    # Without overlap: each batch is one rank's, but for the one repeated to even an odd count.
    served = [tuple(b) for batches in ranks for b in batches]
    assert len(served) - len(set(served)) == len(alone) % 2


@pytest.mark.parametrize(
    "items,max_tokens,ranks",
    [(301, 120, 2), (301, 120, 3), (5, 100, 4), (2, 100, 4)],  # more batches than ranks, fewer, fewer items
)
def test_uneven_ranks_evaluate_every_item_once_and_each_has_a_batch(items, max_tokens, ranks):
    lengths = [random.Random(i).randint(1, 30) for i in range(items)]
    samplers = [
        TokenBudgetBatchSampler(lengths, max_tokens, shuffle=False, num_replicas=ranks, rank=r, even=False)
        for r in range(ranks)
    ]
    shares = [list(sampler) for sampler in samplers]
    assert all(len(share) == len(sampler) >= 1 for share, sampler in zip(shares, samplers))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    served = sorted(i for share in shares for batch in share for i in batch)
    if items >= ranks:
        assert served == list(range(items))
    else:  # only then does an item come twice: a rank must not go without a batch
        assert set(served) == set(range(items)) and len(served) == ranks


@pytest.mark.parametrize("normalize", [True, False])
def test_a_character_is_blank_exactly_when_the_tokenizer_reads_nothing_of_it(normalize):
    from genrnn.data import is_blank

    tokenizer = train_tokenizer(["cat", "dog", "bird"] * 5, "char", 32, normalize=normalize)
    characters = [chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000]  # every plane in use; no surrogates
    read_as_nothing = {c for c, ids in zip(characters, tokenizer.encode(characters)) if not ids}
    assert not read_as_nothing - {c for c in characters if is_blank(c)}
    # ... and no letter, digit, punctuation or symbol is, but for sentencepiece's space mark and U+FFFD
    readable = {c for c in characters if unicodedata.category(c)[0] in "LNPS"}
    assert {c for c in readable if is_blank(c)} == {"\u2581", "\ufffd"}


def test_a_length_counts_the_characters_nfkc_makes_up_to_a_cap():
    ligature = "\ufdfa"  # one character, and 18 in NFKC
    assert read_length(ligature * 2, cap=100) == 36
    assert read_length("e\u0301", cap=100) == 2  # NFKC composes the two into one: the text's own count
    # A text over the cap already is not normalised (half a second for a megabyte of these): its own count.
    assert read_length(ligature * 101, cap=100) == 101
