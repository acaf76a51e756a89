"""Batch generation jobs: formats, order, bad lines, seeded sampling, resuming after a kill, two processes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from genrnn.bundle import load_bundle
from genrnn.cli import main
from genrnn.config import JOB_CAPS, DecodingConfig, decoding_for_mode
from genrnn.data import MAX_LINE_BYTES, OVERLONG_LINE
from genrnn.decoding import Generator
from genrnn.errors import ConfigurationError, DataError, GenrnnError
from genrnn.files import sha256
from serving.batch import GenerateJob, owned_batches, run_generate
from serving.batch_input import MAX_SOURCE_LENGTH, ItemTable, read_items, scan_items
from serving.batch_parts import PartStore, _MappedParts
from tests.conftest import children, interruptible, signal_when

GENRNN = [sys.executable, "-m", "genrnn.cli"]
CANDIDATE_KEYS = {"text", "tokens", "logprob", "finish_reason"}


@pytest.fixture(scope="module")
def words(g2p_files) -> list[str]:
    """Test-set words in file order, which is not length order."""
    return [line.split("\t")[0] for line in g2p_files["test"].read_text().splitlines()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(bundle: Path, input: Path, output: Path, **options) -> list[dict]:
    """Run a job in this process and return its output objects."""
    settings = options.pop("settings", DecodingConfig())
    run_generate(GenerateJob(bundle, input, output, settings, accelerator="cpu", **options))
    return read_jsonl(output)


def assert_same_outputs(got: list[dict], expected: list[dict]) -> None:
    """Same items and candidates; log-probabilities may differ in the last bits with other batch shapes."""
    assert [(o["id"], o["input"]) for o in got] == [(o["id"], o["input"]) for o in expected]
    for g, e in zip(got, expected):
        assert [(c["tokens"], c["text"], c["finish_reason"]) for c in g["candidates"]] == [
            (c["tokens"], c["text"], c["finish_reason"]) for c in e["candidates"]
        ], g["id"]
        assert [c["logprob"] for c in g["candidates"]] == pytest.approx([c["logprob"] for c in e["candidates"]], 1e-4)


def test_text_tsv_and_jsonl_inputs_give_the_engines_candidates_in_input_order(tiny_bundle, words, tmp_path):
    sources = words[:12]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    (tmp_path / "in.tsv").write_text("".join(f"w{i}\t{s}\n" for i, s in enumerate(sources)))
    records = [{"id": f"w{i}", "source": s} for i, s in enumerate(sources)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    text = generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "text.jsonl", batch_size=3)
    tsv = generate(tiny_bundle, tmp_path / "in.tsv", tmp_path / "tsv.jsonl", batch_size=5)
    jsonl = generate(tiny_bundle, tmp_path / "in.jsonl", tmp_path / "jsonl.jsonl", batch_size=64)

    assert [o["id"] for o in text] == list(range(1, 13))  # plain text: the line number
    assert [o["id"] for o in tsv] == [o["id"] for o in jsonl] == [f"w{i}" for i in range(12)]
    assert [o["input"] for o in text] == [o["input"] for o in tsv] == [o["input"] for o in jsonl] == sources
    bundle = load_bundle(tiny_bundle)
    engine = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer).generate(sources)
    for output in (text, tsv, jsonl):
        assert all(set(c) == CANDIDATE_KEYS for o in output for c in o["candidates"])
        expected = [
            {"id": o["id"], "input": o["input"], "candidates": [c.to_dict() for c in g.candidates]}
            for o, g in zip(output, engine)
        ]
        assert_same_outputs(output, expected)


def test_an_ensemble_generates_from_the_command_line(tiny_bundle, words, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(words[:12]) + "\n")
    outputs = {}
    for name, model in (("one", str(tiny_bundle)), ("two", f"{tiny_bundle},{tiny_bundle}")):
        args = ["generate", "--model", model, "--input", str(tmp_path / "in.txt"), "--accelerator", "cpu"]
        assert main([*args, "--output", str(tmp_path / f"{name}.jsonl"), "--mode", "beam"]) == 0
        outputs[name] = read_jsonl(tmp_path / f"{name}.jsonl")
    assert len(outputs["two"]) == 12
    assert_same_outputs(outputs["two"], outputs["one"])  # two copies: the distribution of one


def test_an_ensemble_of_different_members_averages_as_asked(tiny_bundle, other_bundle, words, tmp_path):
    sources = words[:12]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    model, beam = f"{tiny_bundle},{other_bundle}", DecodingConfig(mode="beam", num_return_sequences=2)
    logprobs = {}
    for averaging in ("probabilities", "log-probabilities"):
        output = tmp_path / f"{averaging}.jsonl"
        got = generate(model, tmp_path / "in.txt", output, settings=beam, ensemble_averaging=averaging)
        bundle = load_bundle(model, averaging=averaging)
        engine = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer).generate(sources, beam)
        expected = [
            {"id": o["id"], "input": o["input"], "candidates": [c.to_dict() for c in g.candidates]}
            for o, g in zip(got, engine)
        ]
        assert_same_outputs(got, expected)
        logprobs[averaging] = [c["logprob"] for o in got for c in o["candidates"]]
    # The two averagings differ on these members, so each job above decoded its own.
    assert logprobs["probabilities"] != pytest.approx(logprobs["log-probabilities"], abs=1e-3)


def test_jsonl_lines_carry_their_own_decoding_settings(tiny_bundle, words, tmp_path):
    lines = [
        {"source": words[0]},
        {"source": words[1], "mode": "beam", "beam_size": 4, "num_return_sequences": 3},
        {"source": words[2], "mode": "sample", "seed": 3, "num_return_sequences": 2, "temperature": 2.0},
        {"source": words[3], "max_new_tokens": 1},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = generate(tiny_bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == [1, 2, 3, 4]  # no id: the line number
    assert [len(o["candidates"]) for o in out] == [1, 3, 2, 1]
    beam = [c["logprob"] for c in out[1]["candidates"]]
    assert len({tuple(c["tokens"]) for c in out[1]["candidates"]}) == 3
    assert beam == sorted(beam, reverse=True)
    assert out[3]["candidates"][0]["finish_reason"] == "length" or out[3]["candidates"][0]["tokens"] == []
    assert len(out[3]["candidates"][0]["tokens"]) <= 1


def test_a_bad_line_stops_the_job_with_its_line_number(tiny_bundle, words, tmp_path, capsys):
    lines = [json.dumps({"source": words[0]}), "{not json", json.dumps({"source": words[1], "temperature": -1})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    args = ["generate", "--model", str(tiny_bundle), "--input", str(tmp_path / "in.jsonl"), "--accelerator", "cpu"]
    assert main([*args, "--output", str(tmp_path / "out.jsonl")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("genrnn generate: error:") and f"{tmp_path / 'in.jsonl'}:2: not valid JSON" in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_skip_bad_lines_records_each_error_in_its_place(tiny_bundle, words, tmp_path):
    lines = [
        json.dumps({"id": "a", "source": words[0]}),
        "{not json",
        json.dumps({"id": "c", "source": words[1], "mode": "sample", "temperature": -1}),
        json.dumps({"id": "d", "source": words[2], "colour": "red"}),
        "",  # blank lines are no items
        json.dumps({"id": "e", "source": words[3]}),
        json.dumps({"id": "f", "source": words[4], "mode": "sample", "top_k": 10**23}),  # past a tensor's integers
        json.dumps({"id": "g", "source": "\ud800"}),  # JSON can spell what UTF-8 cannot
        json.dumps({"id": "h", "source": words[5], "temperature": 0}),  # greedy reads no temperature
        # a beam or a candidate list past the job's caps would fail its whole batch, on every rerun
        json.dumps({"id": "i", "source": words[6], "mode": "beam", "beam_size": 10**9}),
        json.dumps({"id": "j", "source": words[7], "mode": "sample", "num_return_sequences": 10**8}),
        # a field the mode does not read is ignored whatever its value, but its type is checked, as in HTTP
        json.dumps({"id": "k", "source": words[8], "top_k": "x"}),
        json.dumps({"id": "l", "source": words[9], "mode": "sample", "temperature": "0.5"}),  # text, not a number
    ]
    # The byte-order mark some editors write is no part of the first source.
    (tmp_path / "in.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n")
    out = generate(tiny_bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl", skip_bad_lines=True)
    assert [o["id"] for o in out] == ["a", 2, "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]
    assert [o.get("line") for o in out] == [None, 2, 3, 4, None, 7, 8, None, 10, 11, 12, 13]
    assert out[10]["error"] == "top_k: must be an integer; got 'x'"
    assert out[11]["error"] == "temperature: must be a number; got '0.5'"  # as HTTP refuses it
    assert out[8]["error"] == f"beam_size: at most {JOB_CAPS['beam_size']}; got {10**9}"
    assert out[9]["error"].startswith("num_return_sequences: at most")
    assert out[7]["candidates"]
    assert "not valid JSON" in out[1]["error"]
    assert out[2]["error"].startswith("temperature:")
    assert "unknown key 'colour'" in out[3]["error"]
    assert out[5]["error"].startswith("top_k:") and "surrogate" in out[6]["error"]
    assert out[0]["candidates"] and out[4]["candidates"] and out[4]["input"] == words[3]
    assert out[0]["input"] == words[0]


def test_a_batch_out_of_memory_is_decoded_in_halves_and_an_item_that_never_fits_is_recorded(
    tiny_bundle, words, tmp_path, monkeypatch, capsys
):
    sources = words[:12]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    reference = generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "reference.jsonl", batch_size=8)
    huge = sources[5]
    decode, sizes = Generator.generate, []

    def generate_in_little_memory(self: Generator, batch: list[str], settings) -> list:
        sizes.append(len(batch))
        if len(batch) > 2 or huge in batch:  # as a GPU would: no memory for more than two, or for the huge one
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return decode(self, batch, settings)

    monkeypatch.setattr(Generator, "generate", generate_in_little_memory)
    out = generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl", batch_size=8)
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 4
    assert out[5] == {"id": 6, "line": 6, "error": "decoding ran out of memory, even alone"}
    assert_same_outputs(out[:5] + out[6:], reference[:5] + reference[6:])
    assert f"{tmp_path / 'in.txt'}:6: decoding ran out of memory" in capsys.readouterr().err

    def fail(self: Generator, batch: list[str], settings) -> list:
        raise ValueError("not a matter of memory")

    monkeypatch.setattr(Generator, "generate", fail)  # any other error stops the job: rerunning resumes it
    with pytest.raises(ValueError, match="not a matter of memory"):
        generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "other.jsonl", batch_size=8)


def keeps_extended_attributes(directory: Path) -> bool:
    probe = directory / "probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()
    return True


def test_a_finished_jobs_rerun_still_checks_its_model_input_and_settings(tiny_bundle, words, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(words[:3]) + "\n")
    generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl")
    with pytest.raises(GenrnnError, match="bundle directory not found"):
        generate(tmp_path / "no-bundle", tmp_path / "in.txt", tmp_path / "out.jsonl")
    with pytest.raises(DataError, match="input file not found"):
        generate(tiny_bundle, tmp_path / "no-input.txt", tmp_path / "out.jsonl")
    with pytest.raises(ConfigurationError, match="beam_size: at most 64"):
        generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl", settings=DecodingConfig(beam_size=999))
    if keeps_extended_attributes(tmp_path):  # else an output cannot say which job merged it
        with pytest.raises(ConfigurationError, match="out.jsonl holds the outputs of another job"):
            generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl", settings=DecodingConfig(mode="beam"))
        (tmp_path / "other.txt").write_text("\n".join(words[3:6]) + "\n")
        with pytest.raises(ConfigurationError, match="out.jsonl holds the outputs of another job"):
            generate(tiny_bundle, tmp_path / "other.txt", tmp_path / "out.jsonl")
    with pytest.raises(ConfigurationError, match="output: .*in.txt is .*in.txt, which this command reads"):
        generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "in.txt")
    with pytest.raises(ConfigurationError, match="out.jsonl lies inside .*, which this command reads"):
        generate(tiny_bundle, tmp_path / "in.txt", tiny_bundle / "out.jsonl")
    generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl")
    assert "nothing to do" in capsys.readouterr().err


def test_lines_that_once_crashed_the_job_or_failed_their_batch_are_bad_lines(tmp_path):
    lines = [
        '{"id": "\\ud800", "source": "cat"}',  # an id that UTF-8 cannot spell: the job's stamp could not be written
        '{"source": "cat", "mode": ["beam"]}',  # a mode that is no string
        '{"id": ' + "9" * 5000 + ', "source": "cat"}',  # an integer Python declines to read
        '{"source": "cat", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nesting past the recursion limit
        json.dumps({"source": "a" * (MAX_SOURCE_LENGTH + 1)}),  # its batch, padded to it, would not fit in memory
        "cat\rdog",  # a file with CR line ends would be one line
        json.dumps({"source": "\u200b\u200d"}),  # zero-width characters: decoded from nothing
        json.dumps({"source": "dog"}),
        '{"source": "cat", "mode": "sample", "mode": "beam"}',  # the parser would keep the last, silently
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)

    assert [(item.line, item.source) for item in items] == [(8, "dog")]
    assert [b.line for b in bad] == [1, 2, 3, 4, 5, 6, 7, 9]
    assert bad[7].error == "key 'mode' is given twice"
    assert bad[6].error == "the source holds only unseen characters (such as zero-width spaces)"
    assert [b.error for b in bad[:2]] == [
        '"id" holds a lone surrogate (\\ud800-\\udfff), not text',
        "mode: must be one of greedy, sample, beam; got ['beam']",
    ]
    assert bad[2].error.startswith("not valid JSON here (Exceeds the limit (4300 digits)")
    assert bad[3].error == "not valid JSON here (nested too deeply)"
    assert bad[4].error == f"the source has {MAX_SOURCE_LENGTH + 1:,} characters; at most {MAX_SOURCE_LENGTH:,}"
    assert bad[5].error.startswith("a carriage return inside the line")
    assert scan_items(path, DecodingConfig(), skip_bad_lines=True).fingerprint  # the bad lines' records are JSON
    with pytest.raises(DataError, match='in.jsonl:1: "id" holds a lone surrogate'):
        read_items(path, DecodingConfig())
    # UTF-16 text without a byte-order mark is valid UTF-8, a NUL beside each character
    (tmp_path / "in.txt").write_bytes("cat\ndog\n".encode("utf-16-le"))
    with pytest.raises(DataError, match="in.txt:1: a NUL character"):
        read_items(tmp_path / "in.txt", DecodingConfig())


def test_a_source_is_measured_in_the_characters_the_tokenizer_reads(tmp_path):
    # U+FDFA is one character, and 18 in the NFKC form that the tokenizer reads.
    ligature, under = "\ufdfa", MAX_SOURCE_LENGTH // 18
    path = tmp_path / "in.txt"
    path.write_text(ligature * under + "\n" + ligature * (under + 1) + "\n")
    items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)

    assert [i.line for i in items] == [1]
    length, cap = 18 * (under + 1), MAX_SOURCE_LENGTH
    forms = "in Unicode's compatibility forms (NFKC)"
    assert [(b.line, b.error) for b in bad] == [(2, f"the source has {length:,} characters {forms}; at most {cap:,}")]


def test_a_line_over_a_mebibyte_is_a_bad_line_never_read_whole(tmp_path):
    import tracemalloc

    exact = "a" * MAX_LINE_BYTES  # the most a line may hold, with its CRLF
    path = tmp_path / "in.txt"
    path.write_bytes(b"cat\n" + b"[" * (32 * MAX_LINE_BYTES) + b"\ndog\n" + exact.encode() + b"\r\nowl")
    tracemalloc.start()
    try:
        items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # the line of exactly 1 MiB is read, and refused for its source's length
    too_long = f"the source has {MAX_LINE_BYTES:,} characters; at most {MAX_SOURCE_LENGTH:,}"
    assert [(b.line, b.error) for b in bad] == [(2, OVERLONG_LINE), (4, too_long)]
    assert [(i.line, i.source) for i in items] == [(1, "cat"), (3, "dog"), (5, "owl")]
    assert peak < 8 * MAX_LINE_BYTES  # the 32 MiB line was read a piece at a time
    with pytest.raises(DataError, match="in.txt:2: the line has more than 1,048,576 bytes"):
        read_items(path, DecodingConfig())


def test_an_error_quotes_only_the_start_of_a_huge_value(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [{"source": "dog", "k" * 300_000: 1}, {"source": "cat", "mode": "q" * 200_000}, {"source": "cat", "a": 1}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)

    assert not items and all(len(b.error) < 300 for b in bad)  # what the job prints and records for each
    assert bad[0].error.startswith("unknown key 'kkk") and "… (300,002 characters)" in bad[0].error
    assert bad[1].error.startswith("mode: must be one of greedy, sample, beam; got 'qqq")
    assert bad[2].error.startswith("unknown key 'a';")  # a short value is quoted whole


def test_ids_are_unique_so_that_outputs_and_seeds_tell_items_apart(tmp_path):
    lines = [
        json.dumps({"id": 4, "source": "cat"}),
        json.dumps({"id": "a", "source": "dog"}),
        json.dumps({"id": "a", "source": "cow"}),  # given twice
        json.dumps({"source": "pig"}),  # no id: its line number, 4, which line 1 gave
        json.dumps({"id": "4", "source": "hen"}),  # text, not the number 4
        json.dumps({"id": 2, "source": "ram"}),  # line 2's number, which line 2 did not take as its id
        json.dumps({"id": "b", "source": "yak", "mode": "nope"}),  # a bad line's id is taken too
        json.dumps({"id": "b", "source": "elk"}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)
    assert [(item.line, item.id) for item in items] == [(1, 4), (2, "a"), (5, "4"), (6, 2)]
    assert [(b.line, b.id, b.error) for b in bad if b.line != 7] == [
        (3, "a", 'id "a" is line 2\'s too (ids must be unique)'),
        (4, 4, "it has no id, and its line number is line 1's id; give it one (ids must be unique)"),
        (8, "b", 'id "b" is line 7\'s too (ids must be unique)'),
    ]
    with pytest.raises(DataError, match=r"in.jsonl:3: id \"a\" is line 2's too"):
        read_items(path, DecodingConfig())
    # A repeated id stays the first line's, though a bad line gives it again: line 1's number here.
    path.write_text('{"source": "cat"}\n{"id": 1, "source": "dog"}\n{"id": 1, "source": "cow"}\n')
    items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)
    assert [b.error for b in bad] == ["id 1 is line 1's too (ids must be unique)"] * 2
    # A line too broken to give its id stands in under its number, which takes no id from a line that gives it.
    path.write_text('{"id": 0, "source": "cat"}\n{"id": 1, "source": "dog"\n{"id": 2, "source": "cow"}\n')
    items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)
    assert [(item.line, item.id) for item in items] == [(1, 0), (3, 2)] and [(b.line, b.id) for b in bad] == [(2, 2)]
    (tmp_path / "in.tsv").write_text("x\tcat\ny\tdog\nx\tcow\n")
    with pytest.raises(DataError, match=r"in.tsv:3: id \"x\" is line 1's too"):
        read_items(tmp_path / "in.tsv", DecodingConfig())
    # An empty id tells no item apart, in JSONL as in TSV.
    path.write_text('{"id": "", "source": "cat"}\n{"id": " ", "source": "dog"}\n{"id": "a", "source": "cow"}\n')
    items, bad = read_items(path, DecodingConfig(), skip_bad_lines=True)
    assert [item.id for item in items] == ["a"] and [b.error for b in bad] == ['"id" is empty'] * 2
    (tmp_path / "in.tsv").write_text(" \tcat\n")
    with pytest.raises(DataError, match=r"in.tsv:1: empty id or source"):
        read_items(tmp_path / "in.tsv", DecodingConfig())


def test_a_greedy_jobs_sampling_options_reach_its_sampled_lines(tiny_bundle, words, tmp_path, capsys):
    """--seed, --temperature and --top-k are the defaults of every line, whatever the job's own mode."""
    lines = [{"id": "s", "source": words[0], "mode": "sample", "num_return_sequences": 3}, {"source": words[1]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["generate", "--model", str(tiny_bundle), "--input", str(tmp_path / "in.jsonl"), "--accelerator", "cpu"]
    runs = {}
    for name, options in {"a": ["--seed", "7"], "b": ["--seed", "7"], "c": ["--seed", "8"]}.items():
        assert main([*args, "--output", str(tmp_path / f"{name}.jsonl"), *options]) == 0
        runs[name] = read_jsonl(tmp_path / f"{name}.jsonl")
    assert runs["a"] == runs["b"] and runs["a"][0] != runs["c"][0]
    assert_same_outputs(runs["a"][1:], runs["c"][1:])  # the greedy line reads no seed

    items, _ = read_items(tmp_path / "in.jsonl", DecodingConfig(seed=7, temperature=0.5, top_k=5))
    assert (items[0].settings.temperature, items[0].settings.top_k) == (0.5, 5)
    assert items[0].settings.seed is not None and items[1].settings.seed is None


def test_the_job_is_known_by_the_items_it_read_not_by_the_files_bytes(tmp_path):
    """The same bytes read as plain text and as TSV are two jobs: a resume must not mix them."""
    for name in ("in.txt", "in.tsv"):
        (tmp_path / name).write_text("w1\tcat\nw2\tdog\n")
    text, tsv = (scan_items(tmp_path / name, DecodingConfig()) for name in ("in.txt", "in.tsv"))
    assert [item.source for item in text.items()] == ["w1\tcat", "w2\tdog"]
    assert text.fingerprint != tsv.fingerprint
    (tmp_path / "again.txt").write_text("w1\tcat\r\nw2\tdog")  # the same items, other line ends
    assert scan_items(tmp_path / "again.txt", DecodingConfig()).fingerprint == text.fingerprint
    (tmp_path / "again.tsv").write_text("w1\tcat\t\nw2\tdog\t\t\n")  # spreadsheets end rows with tabs
    assert scan_items(tmp_path / "again.tsv", DecodingConfig()).fingerprint == tsv.fingerprint


def test_parts_of_unknown_origin_are_never_adopted(tiny_bundle, words, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(words[:4]) + "\n")
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    (parts / "part-0.jsonl").write_text('0\t{"id": 1, "input": "someone else\'s", "candidates": []}\n')
    with pytest.raises(GenrnnError, match="holds parts but no job.json"):
        generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl")
    (parts / "job.json").write_text("{cut sh")
    with pytest.raises(GenrnnError, match="job.json is not a job's record"):
        generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl")


def test_an_output_path_that_cannot_be_written_is_one_line_of_error(tiny_bundle, words, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(words[:4]) + "\n")
    args = ["generate", "--model", str(tiny_bundle), "--input", str(tmp_path / "in.txt"), "--accelerator", "cpu"]
    for output, message in (
        (tmp_path / "in.txt" / "out.jsonl", "in.txt is not a directory"),
        (tmp_path / "missing" / "out.jsonl", "missing does not exist"),  # as evaluate says, not made
        (tmp_path, "is a directory"),
        (Path("/dev/null"), "/dev/null is not a regular file; the output is written whole at the end"),
    ):
        assert main([*args, "--output", str(output)]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith("genrnn generate: error:") and message in error and len(error.splitlines()) == 1


def test_no_file_beside_the_output_is_overwritten_not_even_an_input_named_like_a_temporary(
    tiny_bundle, words, tmp_path
):
    source = tmp_path / "out.jsonl.tmp"
    source.write_text("\n".join(words[:4]) + "\n")
    before = source.read_bytes()

    outputs = generate(tiny_bundle, source, tmp_path / "out.jsonl")

    assert [o["input"] for o in outputs] == words[:4]
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.tmp"]


def test_the_merge_writes_input_order_from_whole_lines_first_copy_first(tmp_path, monkeypatch):
    monkeypatch.setattr(_MappedParts, "OPEN_MAPS", 1)  # the parts take turns in one map, as many ranks' would
    store = PartStore(tmp_path / "out.jsonl")
    store.check_stamp({"job": 1})
    with store.open_part(0) as part:  # written out of order, with non-ASCII text and an index twice
        store.write(part, [(3, {"i": 3, "t": "é\tx"}), (0, {"i": 0}), (3, {"i": "3 again"})])
    with store.open_part(1) as part:
        store.write(part, [(2, {"i": 2}), (9, {"i": "not an item of this job"})])
        part.write('4\t{"i": 4')  # half-written by a kill: not there
    store.open_part(2).close()  # a rank with nothing to do: an empty part

    assert list(store.done(5)) == [1, 0, 1, 1, 0]
    with store.open_part(1) as part:  # what a later write adds is found
        store.write(part, [(1, {"i": "late"})])
    assert list(store.done(5)) == [1, 1, 1, 1, 0]
    with pytest.raises(GenrnnError, match="1 items are missing"):
        store.merge(5, {})
    store.merge(5, {4: {"i": "bad line"}})

    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"i": 0}, {"i": "late"}, {"i": 2}, {"i": 3, "t": "é\tx"}, {"i": "bad line"},
    ]  # fmt: skip
    assert not store.directory.exists()


def test_a_part_that_changes_while_the_job_merges_it_is_refused(tmp_path, monkeypatch):
    store = PartStore(tmp_path / "out.jsonl")
    store.check_stamp({"job": 1})
    with store.open_part(0) as part:
        store.write(part, [(0, {"i": 0}), (1, {"i": 1})])
    line_starts = PartStore._line_starts

    def then_rewritten(self, paths, *args):
        where = line_starts(self, paths, *args)
        paths[0].write_text('1\t{"i": 1}\n0\t{"i": 0}\n')  # another program's doing
        return where

    monkeypatch.setattr(PartStore, "_line_starts", then_rewritten)
    with pytest.raises(GenrnnError, match="changed while the job merged it; rerun"):
        store.merge(2, {})
    assert not store.output.exists() and (store.directory / "part-0.jsonl").exists()


def test_a_kill_during_the_merges_cleanup_leaves_the_output_as_it_is(tmp_path, monkeypatch):
    store = PartStore(tmp_path / "out.jsonl")
    store.check_stamp({"job": 1})
    for rank, indices in ((0, [0, 2]), (1, [1, 3])):
        with store.open_part(rank) as part:
            store.write(part, [(i, {"i": i}) for i in indices])
    unlink = Path.unlink

    def killed_after_one(path: Path, *args, **kwargs) -> None:
        unlink(path, *args, **kwargs)
        raise KeyboardInterrupt  # the kill, once the first part is gone

    monkeypatch.setattr(Path, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        store.merge(4, {})
    monkeypatch.undo()
    assert [json.loads(line)["i"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    # A rerun takes the output as whole: it would otherwise decode the removed part's items again.
    assert store.merged()


def test_an_accelerator_whose_package_is_missing_is_one_line_of_error(tiny_bundle, words, tmp_path, capsys):
    try:
        import torch_xla  # noqa: F401

        pytest.skip("torch_xla is installed here")
    except ImportError:
        pass
    (tmp_path / "in.txt").write_text("\n".join(words[:4]) + "\n")
    args = ["generate", "--model", str(tiny_bundle), "--input", str(tmp_path / "in.txt"), "--output"]
    assert main([*args, str(tmp_path / "out.jsonl"), "--accelerator", "tpu"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("genrnn generate: error: accelerator/devices/num_nodes:") and len(error.splitlines()) == 1


def test_seeded_sampling_does_not_depend_on_batch_size_or_order(tiny_bundle, words, tmp_path):
    sources = words[:12]
    (tmp_path / "in.tsv").write_text("".join(f"w{i}\t{s}\n" for i, s in enumerate(sources)))
    shuffled = list(enumerate(sources))
    random.Random(0).shuffle(shuffled)
    (tmp_path / "shuffled.tsv").write_text("".join(f"w{i}\t{s}\n" for i, s in shuffled))
    sample = DecodingConfig(mode="sample", seed=11, num_return_sequences=2, max_new_tokens=16)

    one = generate(tiny_bundle, tmp_path / "in.tsv", tmp_path / "one.jsonl", settings=sample, batch_size=1)
    many = generate(tiny_bundle, tmp_path / "shuffled.tsv", tmp_path / "many.jsonl", settings=sample, batch_size=64)
    by_id = {o["id"]: o for o in many}
    assert_same_outputs(one, [by_id[o["id"]] for o in one])

    other_seed = DecodingConfig(mode="sample", seed=12, num_return_sequences=2, max_new_tokens=16)
    other = generate(tiny_bundle, tmp_path / "in.tsv", tmp_path / "other.jsonl", settings=other_seed)
    assert [o["candidates"] for o in other] != [o["candidates"] for o in one]
    # Each item has its own stream: the same word under two ids is sampled differently.
    items, _ = read_items(tmp_path / "in.tsv", sample)
    assert len({item.settings.seed for item in items}) == len(items)


def test_the_jobs_stamp_is_the_digest_that_jobs_were_stamped_with_before_the_table(tmp_path):
    """A job started by a version that held its items stamped them so; its parts must still be taken over."""
    lines = [
        json.dumps({"id": "é", "source": "café", "mode": "sample", "temperature": 0.5}),
        "not json",
        json.dumps({"source": "dog", "mode": "beam", "beam_size": 3}),
        json.dumps({"source": "owl"}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    sampled = DecodingConfig(seed=3)
    items, bad = read_items(path, sampled, skip_bad_lines=True)
    records = [[i.index, i.id, i.source, dataclasses.asdict(i.settings)] for i in items]
    records += [[b.index, b.id, b.line, b.error] for b in bad]
    digest = hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()
    assert len(items) == 3 and items[0].settings.seed not in (None, 3)
    assert scan_items(path, sampled, skip_bad_lines=True).fingerprint == digest


def _peak_bytes_scanning(path: Path) -> tuple[ItemTable, int]:
    tracemalloc.start()
    try:
        table = scan_items(path, DecodingConfig())
        return table, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_table_holds_a_few_bytes_an_item_and_reads_items_again_as_they_were(tmp_path):
    words = [f"w{i}\u00e9" for i in range(50_000)]
    (tmp_path / "in.txt").write_text("".join(w + "\n" for w in words))
    (tmp_path / "in.tsv").write_text(
        "\ufeff" + "".join(f"id{i}\t{w}\r\n" if i % 2 else f"\nid{i}\t{w}\n" for i, w in enumerate(words))
    )
    # Holding the items took about 300 bytes each, and the stamp's digest 500 more at its peak.
    text, peak = _peak_bytes_scanning(tmp_path / "in.txt")
    assert peak < 64 * len(words)
    tsv, peak = _peak_bytes_scanning(tmp_path / "in.tsv")
    assert peak < 200 * len(words)  # the ids a TSV gives are kept, to tell them apart
    picked = [0, 1, 25_001, 49_999]
    assert [(i.line, i.source) for i in text.items(picked)] == [(n + 1, words[n]) for n in picked]
    assert [(i.index, i.line, i.id, i.source) for i in tsv.items(picked)] == [
        (n, n + (n + 1) // 2 + 2 - n % 2, f"id{n}", words[n])
        for n in picked  # a blank line before each even one
    ]


def test_an_input_changed_under_a_running_job_is_refused_not_misread(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("cat\ndog\ncow\n")
    table = scan_items(path, DecodingConfig())
    path.write_text("cat\nemu\ncow\n")  # the same length, another word
    assert [item.source for item in table.items([0, 2])] == ["cat", "cow"]
    with pytest.raises(DataError, match="in.txt changed while the job read it: put it back as it was to go on"):
        table.items([1])


def test_batches_are_cut_by_length_and_shared_out_among_ranks(words, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(words[:50]) + "\n")
    table = scan_items(tmp_path / "in.txt", DecodingConfig())
    shares = [owned_batches(table, 8, rank, 3) for rank in range(3)]
    assert sorted(position for share in shares for batch in share for position in batch) == list(range(50))
    assert sorted(len(batch) for share in shares for batch in share) == [2] + [8] * 6
    ordered = [item for batch in owned_batches(table, 8, 0, 1) for item in table.items(batch)]
    assert [(len(item.source), item.index) for item in ordered] == sorted((len(w), i) for i, w in enumerate(words[:50]))


def test_a_killed_job_resumes_with_nothing_lost_or_written_twice(tiny_bundle, words, tmp_path, capsys, monkeypatch):
    sources = words[:300]
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(sources) + "\n")
    output = tmp_path / "out.jsonl"
    part = tmp_path / "out.jsonl.parts" / "part-0.jsonl"
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file), "--output", str(output)]
    command += ["--accelerator", "cpu", "--batch-size", "2"]

    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    signal_when(job, lambda: part.is_file() and part.read_bytes().count(b"\n") >= 4, signal.SIGKILL, "4 items")
    written = part.read_bytes().count(b"\n")
    assert 0 < written < len(sources) and not output.exists()
    # Mark one finished item, to see that the rerun keeps it rather than decoding it again; keep
    # half of the last batch of two, and end the part with half a line, as a kill in the middle of
    # a write leaves it.
    first, *rest = part.read_text().splitlines(keepends=True)
    if len(rest) % 2:
        rest.pop()
    index, record = first.split("\t", 1)
    marked = json.loads(record)
    marked["candidates"][0]["text"] = "kept from the first run"
    part.write_text("".join([f"{index}\t{json.dumps(marked)}\n", *rest, '7\t{"id": 8, "inp']))

    # Another job, the same output: other settings, or a file whose words changed meanwhile.
    with pytest.raises(GenrnnError, match="different job"):
        generate(tiny_bundle, source_file, output, settings=DecodingConfig(mode="beam"), batch_size=2)
    source_file.write_text("\n".join(["changed", *sources[1:]]) + "\n")
    with pytest.raises(GenrnnError, match="different job"):
        generate(tiny_bundle, source_file, output, batch_size=2)
    source_file.write_text("\n".join(sources) + "\n")

    # The rerun (here in this process) takes up where the killed job stopped, and writes what an
    # unbroken run writes, to the last bit: the batch the kill cut short is decoded whole again,
    # and only its items not written before are added to the part.
    indices_written = []
    merge = PartStore.merge

    def look_then_merge(store: PartStore, *args) -> None:
        indices_written.extend(int(line.split("\t", 1)[0]) for line in part.read_text().splitlines())
        merge(store, *args)

    monkeypatch.setattr(PartStore, "merge", look_then_merge)
    resumed = generate(tiny_bundle, source_file, output, batch_size=2)
    monkeypatch.undo()
    assert sorted(indices_written) == list(range(len(sources)))
    assert not part.parent.exists()
    assert resumed[int(index)] == marked
    reference = generate(tiny_bundle, source_file, tmp_path / "reference.jsonl", batch_size=2)
    reference[int(index)] = marked
    assert resumed == reference
    progress = capsys.readouterr().err
    assert "items/s" in progress and "ETA" in progress
    generate(tiny_bundle, source_file, output)
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("signum", "status", "how"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_stops_a_job_as_such_and_the_same_command_resumes(tiny_bundle, words, tmp_path, signum, status, how):
    """Ctrl+C (SIGINT) and SIGTERM: the shell's statuses and a hint, where the job exited 1 or ran on."""
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(words[:300]) + "\n")
    output = tmp_path / "out.jsonl"
    part = tmp_path / "out.jsonl.parts" / "part-0.jsonl"
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file), "--output", str(output)]
    command += ["--accelerator", "cpu", "--batch-size", "2"]

    job = interruptible(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = signal_when(job, lambda: part.is_file() and part.read_bytes().count(b"\n") >= 4, signum, "4 items")

    assert job.returncode == status, stderr[-2000:]
    assert f"genrnn generate: {how}; rerun the same command to go on where it stopped" in stderr
    assert not output.exists() and 4 <= part.read_bytes().count(b"\n") < 300
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [o["input"] for o in read_jsonl(output)] == words[:300]


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank lines"])
def test_an_input_without_items_gives_an_empty_output(tiny_bundle, tmp_path, content, capsys):
    """An empty shard of a pipeline is no error."""
    (tmp_path / "in.txt").write_text(content)
    assert generate(tiny_bundle, tmp_path / "in.txt", tmp_path / "out.jsonl") == []
    assert (tmp_path / "out.jsonl").read_bytes() == b""
    assert "0 items written" in capsys.readouterr().err


def test_a_jsonl_line_s_null_max_new_tokens_takes_the_job_s_as_http_takes_the_server_s(tiny_bundle, tmp_path):
    lines = ['{"source": "cat", "max_new_tokens": null}', '{"source": "cat", "max_new_tokens": 2}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    settings = DecodingConfig(max_new_tokens=1)
    default, two = generate(tiny_bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl", settings=settings)
    assert (len(default["candidates"][0]["tokens"]), default["candidates"][0]["finish_reason"]) == (1, "length")
    assert len(two["candidates"][0]["tokens"]) <= 2


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds ``path`` open (Linux)."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # a descriptor closed meanwhile
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
def test_sigterm_while_the_job_reads_its_input_stops_it_with_the_usual_word(tiny_bundle, tmp_path):
    source_file = tmp_path / "in.txt"
    source_file.write_text("abcdefgh\n" * 200_000)  # read for about a second
    output = tmp_path / "out.jsonl"
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file), "--output", str(output)]

    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = signal_when(job, lambda: has_open(job.pid, source_file), signal.SIGTERM, "the input to be read")

    assert job.returncode == 143, stderr[-2000:]  # the shell's status, as when the job decodes
    assert "genrnn generate: terminated; rerun the same command to go on where it stopped" in stderr
    assert "Traceback" not in stderr


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_sigterm_ends_a_job_whose_first_process_waits_on_a_stuck_second(tiny_bundle, words, tmp_path):
    """Waiting on another process happens in native code, where a Python handler never runs: not there."""
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(words[:8]) + "\n")
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file)]
    command += ["--output", str(tmp_path / "out.jsonl"), "--accelerator", "cpu", "--devices", "2"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not children(job.pid):  # the second process, started as the trainer sets up its processes
            assert job.poll() is None and time.monotonic() < deadline, "no second process was started"
            time.sleep(0.01)
        for pid in children(job.pid):
            os.kill(pid, signal.SIGSTOP)  # stuck before it could meet the first
        time.sleep(3)  # the first goes on, into its wait for the second
        job.send_signal(signal.SIGTERM)
        status = job.wait(timeout=60)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()

    assert status == -signal.SIGTERM  # ended by the signal's default action, not held until the wait is over


@pytest.mark.parametrize("group", [False, True], ids=["to the main process", "to every process"])
def test_sigterm_stops_a_two_process_job_that_the_same_command_resumes(tiny_bundle, words, tmp_path, group):
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(words[:400]) + "\n")
    output = tmp_path / "out.jsonl"
    parts = [tmp_path / "out.jsonl.parts" / f"part-{rank}.jsonl" for rank in (0, 1)]
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file), "--output", str(output)]
    command += ["--accelerator", "cpu", "--devices", "2", "--batch-size", "2"]

    def both_started() -> bool:
        return all(part.is_file() and part.read_bytes().count(b"\n") >= 4 for part in parts)

    job = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stderr = signal_when(job, both_started, signal.SIGTERM, "4 items in each part", group=group)
    finally:
        if job.poll() is None:  # a failed wait leaves no job running
            os.killpg(job.pid, signal.SIGKILL)

    assert job.returncode == 143, stderr[-3000:]
    assert "terminated; rerun the same command" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not output.exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = generate(tiny_bundle, source_file, tmp_path / "single.jsonl", batch_size=2)
    assert read_jsonl(output) == single  # the same batches, so the same output to the last bit


def test_an_error_the_second_process_meets_alone_is_told(tiny_bundle, words, tmp_path):
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(words[:40]) + "\n")
    stamp = tmp_path / "out.jsonl.parts" / "job.json"  # written by the first process before it starts the second
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file)]
    command += ["--output", str(tmp_path / "out.jsonl"), "--accelerator", "cpu", "--devices", "2"]

    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not stamp.is_file():
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before its stamp"
            time.sleep(0.01)
        with source_file.open("a") as f:  # the second process reads another input than the first
            f.write("grown\n")
        stderr = job.communicate(timeout=180)[1]
    finally:
        if job.poll() is None:
            job.kill()

    assert job.returncode != 0
    assert "genrnn generate: error (rank 1): " in stderr and "holds the parts of a different job" in stderr, stderr


def test_the_second_process_of_a_job_dies_with_the_first(tiny_bundle, words, tmp_path):
    """Killed outright (SIGKILL, the OOM killer), the first process cannot stop the second: the kernel does."""
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(words * (4000 // len(words) + 1)) + "\n")  # far more than a few seconds' work
    parts = [tmp_path / "out.jsonl.parts" / f"part-{rank}.jsonl" for rank in (0, 1)]
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file)]
    command += ["--output", str(tmp_path / "out.jsonl"), "--accelerator", "cpu", "--devices", "2", "--batch-size", "2"]
    command += ["--mode", "beam", "--beam-size", "8"]

    def both_started() -> bool:
        return all(part.is_file() and part.read_bytes().count(b"\n") >= 4 for part in parts)

    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not both_started():
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before both decoded"
            time.sleep(0.05)
        (second,) = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
        job.kill()
        job.wait()
        deadline = time.monotonic() + 10
        while alive(int(second)):
            assert time.monotonic() < deadline, "the second process went on decoding"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)


def test_a_process_launched_beside_the_first_stops_if_that_one_is_already_gone(tiny_bundle, words, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(words[:4]) + "\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(tmp_path / "in.txt")]
    command += ["--output", str(tmp_path / "out.jsonl"), "--accelerator", "cpu", "--devices", "2"]
    # as Lightning launches the second process of two, but after the first has died
    environment = {**os.environ, "LOCAL_RANK": "1", "GENRNN_LAUNCHER_PID": str(gone.pid)}
    environment |= {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    late = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert late.returncode == 1  # not waiting for a first process that will never come


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet collected, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("count", [60, 5])  # with 5, the second process has no batch at all
def test_two_cpu_processes_merge_to_the_single_process_output(tiny_bundle, words, tmp_path, count):
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(words[:count]) + "\n")
    output = tmp_path / "out.jsonl"
    command = [*GENRNN, "generate", "--model", str(tiny_bundle), "--input", str(source_file), "--output", str(output)]
    command += ["--accelerator", "cpu", "--devices", "2", "--batch-size", "8"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "out.jsonl.parts").exists()
    single = generate(tiny_bundle, source_file, tmp_path / "single.jsonl", batch_size=8)
    assert read_jsonl(output) == single  # the same batches, so the same output to the last bit


def test_a_kill_during_the_last_cleanup_leaves_nothing_to_do(tiny_bundle, words, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(words[:6]) + "\n")
    output = tmp_path / "out.jsonl"
    written = generate(tiny_bundle, tmp_path / "in.txt", output, settings=DecodingConfig(mode="sample"))
    (tmp_path / "out.jsonl.parts").mkdir()  # the output renamed into place, the parts gone, the stamp not yet
    (tmp_path / "out.jsonl.parts" / "job.json").write_text("{}")
    again = generate(tiny_bundle, tmp_path / "in.txt", output, settings=DecodingConfig(mode="sample"))
    assert again == written and "nothing to do" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.parts").exists()


def earlier_stamp(tiny_bundle: Path, source_file: Path, settings: DecodingConfig) -> dict:
    """A job's stamp as genrnn wrote it before stamps named the items read."""
    return {
        "input_sha256": sha256(source_file),
        "model_sha256": load_bundle(tiny_bundle).fingerprint,
        "settings": dataclasses.asdict(decoding_for_mode(dataclasses.asdict(settings))),
        "quantize": None,
    }


def test_parts_that_an_earlier_genrnn_stamped_are_taken_over_when_it_decoded_alike(tiny_bundle, words, tmp_path):
    """Its stamp named the file's bytes and the settings the mode reads, where it now names the items read."""
    source_file = tmp_path / "in.txt"
    source_file.write_text("\n".join(words[:20]) + "\n")
    reference = generate(tiny_bundle, source_file, tmp_path / "reference.jsonl", batch_size=4)
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps(earlier_stamp(tiny_bundle, source_file, DecodingConfig())))
    kept = {**reference[0], "candidates": [{**reference[0]["candidates"][0], "text": "kept from the first run"}]}
    records = [kept, *reference[1:7]]
    (parts / "part-0.jsonl").write_text("".join(f"{i}\t{json.dumps(r)}\n" for i, r in enumerate(records)))
    assert generate(tiny_bundle, source_file, tmp_path / "out.jsonl", batch_size=4) == [kept, *reference[1:]]

    # That version gave a line in another mode none of the job's options: a greedy job's --seed did
    # not seed its sampled lines, so its parts of such a job are another job's.
    lines = [{"source": word, **({"mode": "sample"} if i % 2 else {})} for i, word in enumerate(words[:6])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "sampled.jsonl.parts").mkdir()
    stamp = earlier_stamp(tiny_bundle, tmp_path / "in.jsonl", DecodingConfig(seed=5))
    (tmp_path / "sampled.jsonl.parts" / "job.json").write_text(json.dumps(stamp))
    with pytest.raises(GenrnnError, match="different job"):
        generate(tiny_bundle, tmp_path / "in.jsonl", tmp_path / "sampled.jsonl", settings=DecodingConfig(seed=5))
