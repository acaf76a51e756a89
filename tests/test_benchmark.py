"""The G2P benchmark script, end to end on a small split laid out like g014b2b."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genrnn.bundle import load_bundle
from genrnn.config import DecodingConfig
from genrnn.data import examples_fingerprint, hold_out_dev, read_examples, tsv_line
from genrnn.decoding import Generator
from genrnn.evaluation import evaluate
from genrnn.metrics import score
from tests.conftest import ROOT, TINY_CONFIG, noisy_copy, train_tiny, write_tsv

BENCHMARK = [sys.executable, str(ROOT / "bench" / "g2p_benchmark.py")]
DISTILL = [sys.executable, str(ROOT / "bench" / "g2p_distill.py")]


@pytest.fixture(scope="module")
def split(g2p_files, tmp_path_factory) -> Path:
    """Train and reference files named as in g014b2b; the test words carry every reference."""
    directory = tmp_path_factory.mktemp("split")
    (directory / "g014b2b.train").write_text(g2p_files["train"].read_text())
    write_tsv(directory / "g014b2b.ref", read_examples(g2p_files["test"])[:60])
    return directory


@pytest.fixture(scope="module")
def teachers(split, tmp_path_factory) -> str:
    """Two tiny bundles trained as the benchmark trains, on the split's train file less its dev words."""
    bundle = train_tiny(split / "g014b2b.train", None, tmp_path_factory.mktemp("split-run"))
    return f"{bundle},{noisy_copy(bundle, tmp_path_factory.mktemp('noisy') / 'bundle')}"


def run_benchmark(split: Path, output: Path, *args: str) -> dict:
    """Run the script; its results.json."""
    command = [*BENCHMARK, "--data-dir", str(split), "--output", str(output), "--accelerator", "cpu", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    # dev chooses the beam size, then the decoding, the cheaper on a tie (greedy, a smaller beam):
    # only those two decode the test words; dev's choice's table row is in bold, no other is
    wer = {mode: scores["dev"]["wer"] for mode, scores in {**results["scores"], **results["dev_only"]}.items()}
    beams = sorted((mode for mode in wer if mode != "greedy"), key=lambda mode: int(mode.removeprefix("beam")))
    assert list(results["scores"]) == ["greedy", min(beams, key=wer.get)]
    assert results["dev_choice"] == min(results["scores"], key=wer.get)
    assert all("test" not in scores for scores in results["dev_only"].values())
    assert f"| **{results['dev_choice']}** |" in result.stdout
    assert all(f"| {mode} |" in result.stdout for mode in wer if mode != results["dev_choice"])
    return results


def test_trains_with_overrides_and_scores_the_test_words(split, tmp_path):
    overrides = ["--set", "training.max_epochs=2", "--set", "model.attention=luong"]
    results = run_benchmark(split, tmp_path / "run", "--config", str(TINY_CONFIG), "--beam-size", "2", *overrides)

    assert results["words"]["test"] == 60
    assert results["overrides"] == ["training.max_epochs=2", "model.attention=luong"]
    assert results["training"]["config"]["model"]["attention"] == "luong"
    assert results["training"]["epochs"] == 2
    # the dev set was held out of the train file, and selection used it
    assert 0 < results["training"]["dev_examples"] < results["training"]["train_pairs"] / 10
    assert set(results["training"]["best_dev"]) == {"dev_wer"}
    assert results["words"]["dev"] == results["training"]["dev_examples"]  # the dev set the run selected on
    for scores in results["scores"].values():
        for words in ("dev", "test"):
            assert 0.0 <= scores[words]["wer"] <= 1.0 and 0.0 <= scores[words]["per"]

    # every word's output is kept beside the results, with whether it is right, in the split's order
    kept = json.loads((tmp_path / "run" / "outputs.json").read_text())
    references = {
        "dev": hold_out_dev(read_examples(split / "g014b2b.train"))[1],
        "test": read_examples(split / "g014b2b.ref"),
    }
    for words, examples in references.items():
        assert kept["words"][words] == [e.source for e in examples]
        for mode, scores in results["scores"].items():
            outputs, right = kept["outputs"][mode][words], kept["right"][mode][words]
            assert len(outputs) == len(right) == len(examples)
            assert right == "".join(
                str(int(o.split() in [t.split() for t in e.targets])) for o, e in zip(outputs, examples)
            )
            assert right.count("1") == round((1 - scores[words]["wer"]) * len(examples))

    # scoring a trained bundle again, and as an ensemble of two copies, gives the same figures
    bundle = tmp_path / "run" / "bundle"
    again = run_benchmark(split, tmp_path / "again", "--model", str(bundle), "--beam-size", "2")
    pair = run_benchmark(split, tmp_path / "pair", "--model", f"{bundle},{bundle}", "--beam-size", "2")
    assert again["scores"] == results["scores"]
    assert pair["scores"]["greedy"] == results["scores"]["greedy"]
    # several beam sizes each decode dev; the test words only at dev's choice among them
    sizes = run_benchmark(split, tmp_path / "sizes", "--model", str(bundle), "--beam-size", "3,1,2")
    dev = {mode: scores["dev"] for mode, scores in {**sizes["scores"], **sizes["dev_only"]}.items()}
    assert sorted(dev) == ["beam1", "beam2", "beam3", "greedy"] and dev["beam2"] == again["scores"]["beam2"]["dev"]
    kept = json.loads((tmp_path / "sizes" / "outputs.json").read_text())["outputs"]
    assert {mode for mode, by_split in kept.items() if "test" in by_split} == set(sizes["scores"])
    refused = subprocess.run(
        [*BENCHMARK, "--data-dir", str(split), "--beam-size", "2,0"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "a beam size is at least 1" in refused.stderr
    assert pair["parameters"] == 2 * results["parameters"]
    assert (again["averaging"], pair["averaging"]) == (None, "probabilities")


def test_a_distilled_train_file_holds_the_teachers_outputs_keeps_dev_and_trains_a_student(split, teachers, tmp_path):
    distilled = tmp_path / "distilled.train"
    command = [*DISTILL, "--data-dir", str(split), "--model", teachers, "--output", str(distilled), "--beam-size", "1"]
    result = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # written as TSV: never under a name the trainer would read as JSON lines
    jsonl = [*command[:-4], "--output", str(tmp_path / "distilled.jsonl")]
    refused = subprocess.run(jsonl, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert refused.returncode == 2 and "name it anything but *.jsonl" in refused.stderr
    assert not (tmp_path / "distilled.jsonl").exists()

    train, dev = hold_out_dev(read_examples(split / "g014b2b.train"))
    taught, kept = hold_out_dev(read_examples(distilled))
    assert kept == dev  # the dev lines as they were: a student holds out the same dev set
    assert [e.source for e in taught] == [e.source for e in train] and {len(e.targets) for e in taught} == {1}
    # each train word's line is the ensemble's greedy output for that word, scored as the ensemble scores
    bundle = load_bundle(teachers, "cpu")
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    expected = evaluate(generator, train, DecodingConfig(mode="greedy"))
    assert score([e.targets[0] for e in taught], [e.targets for e in train]) == expected
    changed = round((1 - expected.sequence_accuracy) * len(train))
    assert f"{len(train):,} train words decoded ({changed:,} differ from every reference" in result.stdout

    student = run_benchmark(
        split, tmp_path / "student", "--config", str(TINY_CONFIG), "--beam-size", "2",
        "--train", str(distilled), "--set", "training.max_epochs=1",
    )  # fmt: skip
    assert student["training"]["config"]["data"]["train"] == str(distilled)
    assert student["training"]["dev_examples"] == student["words"]["dev"] == len(dev)

    # a file without the split's dev lines would select on another dev set: refused before training
    no_dev = tmp_path / "no-dev.train"
    no_dev.write_text("".join(tsv_line(e) for e in taught))
    command = [*BENCHMARK, "--data-dir", str(split), "--output", str(tmp_path / "refused"), "--train", str(no_dev)]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert refused.returncode != 0 and f"{no_dev}: its dev words" in refused.stderr
    assert not (tmp_path / "refused").exists()
    # nor may a file hold a test word: the model would be scored on what it was taught
    leaky = tmp_path / "leaky.train"
    test_word = next(e for e in read_examples(split / "g014b2b.ref") if hold_out_dev([e])[0])  # not a dev word
    leaky.write_text(distilled.read_text() + tsv_line(test_word))
    command = [*BENCHMARK, "--data-dir", str(split), "--output", str(tmp_path / "refused"), "--train", str(leaky)]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert refused.returncode != 0 and f"{leaky}: 1 of its words are test words" in refused.stderr
    assert not (tmp_path / "refused").exists()


REFUSALS = {
    "builtin:cmudict": "which holds the split's test words",
    "leaky.train": "of its words are test words",
    "g014b2b.train": "its dev words too",  # as a run given its own --valid trains: on all of the file
    "elsewhere.train": "which is not here to check",
}


@pytest.mark.parametrize("trained_on", REFUSALS)
def test_a_bundle_is_scored_or_teaches_only_if_it_trained_on_no_test_word_and_held_out_dev(
    split, teachers, tmp_path, trained_on
):
    leaky = tmp_path / "leaky.train"
    test_words = [e for e in read_examples(split / "g014b2b.ref") if hold_out_dev([e])[0]]  # no dev word
    leaky.write_text((split / "g014b2b.train").read_text() + "".join(map(tsv_line, test_words)))
    clean = Path(teachers.split(",")[0])
    bundle = shutil.copytree(clean, tmp_path / "bundle")
    manifest = json.loads((bundle / "genrnn.json").read_text())
    data = {"leaky.train": str(leaky), "g014b2b.train": str(split / trained_on)}.get(trained_on, trained_on)
    manifest["training"]["data"] = data  # what the bundle says it trained on: not checksummed
    # and the pairs it trained on: the leaky file's less its dev share (elsewhere too), or all of the file
    examples = read_examples(leaky if trained_on in ("elsewhere.train", "builtin:cmudict") else data)
    manifest["training"]["data_fingerprint"] = examples_fingerprint(
        examples if trained_on == "g014b2b.train" else hold_out_dev(examples)[0]
    )
    (bundle / "genrnn.json").write_text(json.dumps(manifest))
    for script, output in ((BENCHMARK, "scored"), (DISTILL, "distilled.train")):
        command = [*script, "--data-dir", str(split), "--model", f"{clean},{bundle}", "--beam-size", "1"]
        result = subprocess.run(
            [*command, "--output", str(tmp_path / output), "--device", "cpu"],
            capture_output=True, text=True, cwd=ROOT, timeout=600,
        )  # fmt: skip
        assert result.returncode != 0 and REFUSALS[trained_on] in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / output).exists()


def test_a_bundle_trained_on_the_splits_train_file_is_scored_whatever_path_it_recorded(split, teachers, tmp_path):
    bundle = shutil.copytree(teachers.split(",")[0], tmp_path / "bundle")
    manifest = json.loads((bundle / "genrnn.json").read_text())
    manifest["training"]["data"] = "elsewhere/g014b2b.train"  # relative to where it trained: not here
    (bundle / "genrnn.json").write_text(json.dumps(manifest))
    command = [*BENCHMARK, "--data-dir", str(split), "--model", str(bundle), "--output", str(tmp_path / "scored")]
    result = subprocess.run([*command, "--beam-size", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_model_that_started_from_or_learned_from_one_that_saw_test_words_is_refused(split, teachers, tmp_path):
    leaky = tmp_path / "leaky.train"
    test_words = [e for e in read_examples(split / "g014b2b.ref") if hold_out_dev([e])[0]]  # no dev word
    leaky.write_text((split / "g014b2b.train").read_text() + "".join(map(tsv_line, test_words)))
    parent = shutil.copytree(teachers.split(",")[0], tmp_path / "parent")
    manifest = json.loads((parent / "genrnn.json").read_text())
    manifest["training"]["data"] = str(leaky)  # what the bundle says it trained on: not checksummed
    manifest["training"]["data_fingerprint"] = leaked = examples_fingerprint(read_examples(leaky))  # all of it
    (parent / "genrnn.json").write_text(json.dumps(manifest))
    # A run that would start from it, or learn from it, is refused before it trains.
    for key in ("init_from", "teacher"):
        command = [*BENCHMARK, "--data-dir", str(split), "--output", str(tmp_path / key), "--config", str(TINY_CONFIG)]
        command += ["--set", f"training.{key}={parent}", "--set", "training.accelerator=cpu"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode != 0 and f"{leaky}: {len(test_words):,} of its words are test words" in result.stderr
        assert not (tmp_path / key).exists()
    # A bundle that did, as it records itself, is neither scored nor a teacher.
    child = shutil.copytree(teachers.split(",")[0], tmp_path / "child")
    manifest = json.loads((child / "genrnn.json").read_text())
    manifest["training"]["related_bundles"] = {"init_from": "0" * 64}
    manifest["training"]["ancestry"] = [{"data": str(leaky), "data_fingerprint": leaked}]
    (child / "genrnn.json").write_text(json.dumps(manifest))
    for script, output in ((BENCHMARK, "scored"), (DISTILL, "distilled.train")):
        command = [*script, "--data-dir", str(split), "--model", str(child), "--output", str(tmp_path / output)]
        result = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode != 0 and f"{leaky}: {len(test_words):,} of its words" in result.stderr
        assert not (tmp_path / output).exists()
    # Nor is one whose ancestry cannot be checked: a file that is not the one recorded (a path
    # given relative to another directory, say), or an ancestry recorded before bundles recorded it.
    for ancestry, refusal in (
        ([{"data": str(leaky), "data_fingerprint": "0" * 64}], f"a bundle trained on {leaky}, which holds other pairs"),
        (None, "whose training data it does not record"),
    ):
        manifest["training"]["ancestry"] = ancestry
        (child / "genrnn.json").write_text(json.dumps(manifest))
        command = [*BENCHMARK, "--data-dir", str(split), "--model", str(child), "--output", str(tmp_path / "unsure")]
        result = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode != 0 and refusal in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "unsure").exists()


def test_the_sweep_trains_variants_side_by_side_then_scores_their_ensemble(split, tmp_path):
    output = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "bench" / "g2p_sweep.py"), "--data-dir", str(split), "--output", str(output)]
    command += ["--config", str(TINY_CONFIG), "--only", "base,luong", "--set", "training.max_epochs=1"]
    command += ["--set", "training.accelerator=cpu", "--beam-size", "2", "--threads", "1"]
    copy = tmp_path / "copy.train"  # the split's train file under another name: --train reaches every run
    copy.write_text((split / "g014b2b.train").read_text())
    command += ["--train", str(copy)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((output / "summary.json").read_text())
    assert list(summary) == ["base", "luong", "ensemble-all"]  # the other ensembles would have one member
    assert summary["luong"]["training"]["config"]["model"]["attention"] == "luong"
    assert summary["base"]["training"]["config"]["model"]["attention"] == "none"
    assert summary["base"]["training"]["device"] == "cpu"  # --set reaches every variant
    assert {summary[name]["training"]["config"]["data"]["train"] for name in ("base", "luong")} == {str(copy)}
    assert summary["ensemble-all"]["parameters"] == summary["base"]["parameters"] + summary["luong"]["parameters"]
    rows = (output / "summary.md").read_text().splitlines()
    assert len(rows) == 2 + 3 * 2 and rows[-1].replace("**", "").startswith("| ensemble-all | beam2 |")
    assert sum(row.count("**") for row in rows) == 3 * 3 * 2  # each run's choice: decoding, test WER and PER

    # asked for a variant otherwise, a rerun stops before it trains or scores anything: the figures found are not
    # the ones asked for (and removing them is for the user to choose)
    for other, found in (
        (["--max-time", "00:00:06:00"], "max_time 00:00:05:00, asked 00:00:06:00"),
        (["--beam-size", "2,3"], "beam sizes [2], asked [2, 3]"),
    ):
        refused = subprocess.run([*command, *other], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert refused.returncode != 0 and "start" not in refused.stdout
        assert f"{output / 'base'} holds a run trained or scored otherwise ({found})" in refused.stderr

    # a rerun finds every result in place and trains nothing again; one written before results held
    # dev's choice is still marked with it
    base = output / "base" / "results.json"
    written = json.loads(base.read_text())
    base.write_text(json.dumps({k: v for k, v in written.items() if k != "dev_choice"}))
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "start" not in again.stdout
    assert (output / "summary.md").read_text().splitlines() == rows
    base.write_text(json.dumps(written))
    assert json.loads((output / "summary.json").read_text())["luong"] == summary["luong"]

    # told to score no ensemble, a rerun sums up the variants alone, scoring none where one is missing
    (output / "ensemble-all").rename(output / "scored-ensemble")
    alone = subprocess.run([*command, "--no-ensembles"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert alone.returncode == 0 and "start" not in alone.stdout, alone.stderr[-3000:]
    assert list(json.loads((output / "summary.json").read_text())) == ["base", "luong"]
    assert not (output / "ensemble-all").exists()
    (output / "scored-ensemble").rename(output / "ensemble-all")

    # asked for both averagings, it scores the ensemble again averaging log-probabilities, and only that
    both = subprocess.run(
        [*command, "--ensemble-averaging", "probabilities,log-probabilities"], capture_output=True, text=True, cwd=ROOT
    )
    assert both.returncode == 0, both.stderr[-3000:]
    assert [line.split(":")[0] for line in both.stdout.splitlines() if line.startswith("start")] == [
        "start ensemble-all-log-probabilities"
    ]
    averaged = json.loads((output / "summary.json").read_text())
    assert list(averaged) == [*summary, "ensemble-all-log-probabilities"]
    assert averaged["ensemble-all"]["averaging"] == "probabilities"
    assert averaged["ensemble-all-log-probabilities"]["averaging"] == "log-probabilities"
    assert averaged["ensemble-all-log-probabilities"]["config"] == summary["ensemble-all"]["config"]

    # asked to go on, a rerun trains only the variant best on dev, from its weights at a lower rate
    on = subprocess.run([*command, "--go-on", "00:00:10:00", "--go-on-lr", "0.0007"], capture_output=True, text=True)
    assert on.returncode == 0, on.stderr[-3000:]
    best = min(("base", "luong"), key=lambda n: summary[n]["scores"][summary[n]["dev_choice"]]["dev"]["wer"])
    assert [line.split(":")[0] for line in on.stdout.splitlines() if line.startswith("start")] == [f"start {best}-on"]
    went_on = json.loads((output / "summary.json").read_text())[f"{best}-on"]["training"]["config"]
    assert went_on["model"] == summary[best]["training"]["config"]["model"]
    assert (went_on["training"]["init_from"], went_on["training"]["lr"]) == (str(output / best / "bundle"), 0.0007)
    again = subprocess.run([*command, "--go-on", "00:00:10:00", "--go-on-lr", "0.0007"], capture_output=True, text=True)
    assert again.returncode == 0 and "start" not in again.stdout  # done as asked: kept
    other = subprocess.run([*command, "--go-on", "00:00:10:00", "--go-on-lr", "0.0003"], capture_output=True, text=True)
    assert other.returncode == 0 and f"start {best}-on" in other.stdout  # asked otherwise: trained again
    went_on = json.loads((output / "summary.json").read_text())[f"{best}-on"]["training"]["config"]
    assert went_on["training"]["lr"] == 0.0003
    shutil.rmtree(output / f"{best}-on")

    # a narrower rerun sums up its own variants, without an ensemble of other members
    command[command.index("base,luong")] = "base"
    narrower = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert narrower.returncode == 0 and "start" not in narrower.stdout
    assert list(json.loads((output / "summary.json").read_text())) == ["base"]

    # a wider one trains the new variant, then a student taught by all three, and scores the ensembles again
    command[command.index("base")] = "base,luong,bahdanau,base-student"
    wider = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert wider.returncode == 0 and "start bahdanau" in wider.stdout and "start base:" not in wider.stdout
    assert wider.stdout.index("start bahdanau") < wider.stdout.index("start base-student")
    summary = json.loads((output / "summary.json").read_text())
    members = sum(summary[name]["parameters"] for name in ("base", "luong", "bahdanau"))
    assert list(summary) == ["base", "luong", "bahdanau", "base-student", "ensemble-attention", "ensemble-all"]
    assert summary["ensemble-all"]["parameters"] == members
    student = summary["base-student"]["training"]["config"]
    assert student["model"] == summary["base"]["training"]["config"]["model"]
    assert student["training"]["init_from"] == str(output / "base" / "bundle")
    assert student["training"]["teacher"].split(",") == [
        str(output / n / "bundle") for n in ("base", "luong", "bahdanau")
    ]

    # two ensembles of the same members are scored once, under the first name
    pair = [*command]
    pair[pair.index("base,luong,bahdanau,base-student")] = "luong,bahdanau"
    same = subprocess.run(pair, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert same.returncode == 0 and "start" not in same.stdout, same.stdout[-3000:]
    assert "skip ensemble-all: the same members as ensemble-attention" in same.stdout
    assert list(json.loads((output / "summary.json").read_text())) == ["luong", "bahdanau", "ensemble-attention"]

    # taught by fewer variants, the student is trained again; without its starting point, it is skipped
    command[command.index("base,luong,bahdanau,base-student")] = "base,luong,base-student"
    fewer = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert fewer.returncode == 0 and "start base-student" in fewer.stdout and "start base:" not in fewer.stdout
    student = json.loads((output / "base-student" / "results.json").read_text())["training"]["config"]
    assert student["training"]["teacher"].split(",") == [str(output / n / "bundle") for n in ("base", "luong")]
    # a student from scratch needs only teachers: it has its variant's configuration and none of its weights
    command[command.index("base,luong,base-student")] = "luong,base-student,base-taught"
    alone = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert alone.returncode == 0 and "skip base-student: its starting point base is not among" in alone.stdout
    taught = json.loads((output / "base-taught" / "results.json").read_text())["training"]["config"]
    assert taught["model"] == summary["base"]["training"]["config"]["model"]
    assert taught["training"]["init_from"] is None
    assert taught["training"]["teacher"] == str(output / "luong" / "bundle")

    # the variants' table, kept for a later sweep whose students learn from it without any variant
    kept = subprocess.run([*command, "--keep-teacher-table"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert kept.returncode == 0 and "start teacher-table-run" in kept.stdout, kept.stdout[-3000:]
    table = output / "teacher-table-run" / "teacher-table"
    later = [*command, "--teacher-table", str(table), "--output", str(tmp_path / "later")]
    later[later.index("luong,base-student,base-taught")] = "base-taught"
    students = subprocess.run(later, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert students.returncode == 0, students.stdout[-3000:]
    taught = json.loads((tmp_path / "later" / "base-taught" / "results.json").read_text())["training"]
    assert taught["config"]["training"]["teacher"] == str(table)
    assert taught["related_bundles"] == {"teacher": load_bundle(output / "luong" / "bundle").fingerprint}

    # where the targets stand: each kind of system's row names one of this sweep's runs of that kind
    # (which one, dev decides: the test below, on figures that differ)
    standing = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "g2p_standing.py"), str(output)], capture_output=True, text=True
    )
    assert standing.returncode == 0, standing.stderr
    decodings = {"no attention": [], "attention, single model": [], "ensemble": []}
    for path in output.glob("*/results.json"):
        results = json.loads(path.read_text())
        if path.parent.name.startswith("ensemble"):
            group = "ensemble"
        elif results["training"]["config"]["model"]["attention"] == "none":
            group = "no attention"
        else:
            group = "attention, single model"
        decodings[group] += [(s["dev"]["wer"], path.parent, mode, s["test"]) for mode, s in results["scores"].items()]
    rows = standing.stdout.splitlines()[2:5]
    assert [row.split(" | ")[0] for row in rows] == [f"| {group}" for group in decodings]
    for row, group in zip(rows, decodings.values()):
        assert any(f"| `{run}`, {mode} | {dev:.2%} | {test['wer']:.2%} |" in row for dev, run, mode, test in group)
    # every run kept its outputs, so each choice is compared word by word with the best other run
    margins = standing.stdout.split("standard error):\n")[1].splitlines()
    assert [line.split(":")[0] for line in margins] == [f"- {group}" for group in decodings]
    assert all("paired:" in line for line in margins), margins
    # runs scored on different words cannot be compared
    other = tmp_path / "other" / "run"
    other.mkdir(parents=True)
    results = json.loads((output / "luong" / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**results, "words": {"dev": 1, "test": 60}}))
    mixed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "g2p_standing.py"), str(output), str(tmp_path / "other")],
        capture_output=True,
        text=True,
    )
    assert mixed.returncode != 0 and str(other / "results.json") in mixed.stderr


def write_results(
    path: Path,
    attention: str | None,
    scores: dict[str, tuple[float, float, float]],
    right: dict[str, str] | None = None,
) -> None:
    """A results.json as the benchmark writes it: ``attention`` None for an ensemble; mode → (dev, test WER, PER).

    With ``right`` (mode → which dev words it got right, "0"/"1" each), the outputs.json beside it too.
    """
    path.mkdir(parents=True)
    results = {
        "config": "a/bundle,b/bundle" if attention is None else "g2p.yaml",
        "training": {} if attention is None else {"config": {"model": {"attention": attention}}},
        "words": {"dev": 5120, "test": 12000},
        "scores": {
            mode: {"dev": {"wer": dev, "per": dev / 4}, "test": {"wer": wer, "per": per}}
            for mode, (dev, wer, per) in scores.items()
        },
    }
    (path / "results.json").write_text(json.dumps(results))
    if right:
        words = [f"word{i}" for i in range(len(next(iter(right.values()))))]
        outputs = {"words": {"dev": words}, "right": {mode: {"dev": flags} for mode, flags in right.items()}}
        (path / "outputs.json").write_text(json.dumps(outputs))


def test_the_standing_takes_dev_choice_across_runs_and_never_looks_at_test(tmp_path):
    first, second = tmp_path / "round-1", tmp_path / "round-2"
    # the lower test WER is never chosen by it: dev decides, across rounds and decodings
    write_results(first / "base", "none", {"greedy": (0.250, 0.230, 0.050), "beam4": (0.247, 0.241, 0.061)})
    write_results(second / "wide", "none", {"greedy": (0.246, 0.239, 0.058), "beam4": (0.248, 0.220, 0.050)})
    write_results(first / "luong", "luong", {"greedy": (0.215, 0.212, 0.049), "beam4": (0.216, 0.200, 0.040)})
    write_results(second / "bahdanau", "bahdanau", {"greedy": (0.215, 0.205, 0.048)})  # a tie: the first read
    write_results(second / "ensemble", None, {"greedy": (0.203, 0.199, 0.046)})
    command = [sys.executable, str(ROOT / "bench" / "g2p_standing.py"), str(first), str(second)]
    standing = subprocess.run(command, capture_output=True, text=True)
    assert standing.returncode == 0, standing.stderr

    rows = standing.stdout.splitlines()[2:5]
    assert rows == [
        f"| no attention | `{second / 'wide'}`, greedy | 24.60% | 23.90% | 5.80% | ≤ 24.0 / 5.9 %: **met** |",
        f"| attention, single model | `{first / 'luong'}`, greedy | 21.50% | 21.20% | 4.90% "
        "| ≤ 21.0 / 5.0 %: WER missed by 0.20 |",
        f"| ensemble | `{second / 'ensemble'}`, greedy | 20.30% | 19.90% | 4.60% | ≤ 20.0 / 4.7 %: **met** |",
    ]


def test_the_standing_says_how_far_ahead_each_choice_is_word_by_word(tmp_path):
    # 100 dev words: the choice gets 10 right that the other misses, the other 4 that the choice misses
    chosen = "1" * 10 + "0" * 4 + "1" * 60 + "0" * 26
    other = "0" * 10 + "1" * 4 + "1" * 60 + "0" * 26
    write_results(tmp_path / "a", "bahdanau", {"beam4": (0.30, 0.21, 0.049)}, right={"beam4": chosen})
    write_results(tmp_path / "b", "luong", {"greedy": (0.36, 0.20, 0.048)}, right={"greedy": other})
    write_results(tmp_path / "c", "none", {"greedy": (0.25, 0.24, 0.059)})
    write_results(tmp_path / "d", None, {"greedy": (0.20, 0.19, 0.046)}, right={"greedy": chosen})
    write_results(tmp_path / "e", None, {"greedy": (0.22, 0.19, 0.046)}, right={"greedy": chosen[:50]})
    command = [sys.executable, str(ROOT / "bench" / "g2p_standing.py"), str(tmp_path)]
    standing = subprocess.run(command, capture_output=True, text=True)
    assert standing.returncode == 0, standing.stderr

    # paired: the per-word differences are -1 on 10 words, +1 on 4, 0 on 86; their mean's standard
    # error is sqrt(14 - 6² / 100) / 100 = 3.69 points. Test: sqrt(p (1 - p) / 12,000).
    # The ensembles kept outputs for different words (100 and 50), so they are not paired.
    assert standing.stdout.split("standard error):\n")[1].splitlines() == [
        "- no attention: the only run; test WER 24.00% ± 0.39",
        f"- attention, single model: 6.00 points of dev WER ahead of `{tmp_path / 'b'}`, greedy "
        "(± 3.69, paired: 10 words right in the choice alone, 4 in the other alone); test WER 21.00% ± 0.37",
        f"- ensemble: 2.00 points of dev WER ahead of `{tmp_path / 'e'}`, greedy; test WER 19.00% ± 0.36",
    ]


def test_the_timeline_of_a_run_too_short_to_time_says_so(g2p_files, tmp_path):
    run = tmp_path / "run"
    train = ["train", "--config", str(ROOT / "training" / "configs" / "tiny.yaml"), "--train", str(g2p_files["train"])]
    train += ["--valid", str(g2p_files["dev"]), "--output", str(run), "--accelerator", "cpu", "--max-steps", "21"]
    subprocess.run([sys.executable, "-m", "genrnn.cli", *train], capture_output=True, check=True, timeout=300)
    command = [sys.executable, str(ROOT / "bench" / "run_timeline.py"), str(run)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"{run}: too short to time: no two logged losses without a validation between them"


def test_the_timeline_of_a_resumed_run_counts_every_part(g2p_files, tmp_path):
    run = tmp_path / "run"
    train = ["train", "--config", str(ROOT / "training" / "configs" / "tiny.yaml"), "--train", str(g2p_files["train"])]
    train += ["--valid", str(g2p_files["dev"]), "--output", str(run), "--accelerator", "cpu"]
    train += ["--set", "training.val_check_interval=30"]
    for steps in ("70", "140"):  # the second run goes on from the first's last checkpoint
        subprocess.run([sys.executable, "-m", "genrnn.cli", *train, "--max-steps", steps], check=True, timeout=300)
    command = [sys.executable, str(ROOT / "bench" / "run_timeline.py"), str(run)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.splitlines()[-1].strip("| ").split(" | ")

    parts = sorted((run / "logs").glob("version_*/metrics.csv"))
    assert len(parts) == 2
    validations, last = 0, 0
    for part in parts:  # within each part, the validations after its first logged loss, the last ones too
        rows = list(csv.DictReader(part.open()))
        logged = [int(r["step"]) for r in rows if r["train_loss"]]
        validated = [int(r["step"]) for r in rows if r["dev_wer"]]
        validations += sum(logged[0] < step for step in validated)
        last = max(logged[-1], *validated)
    assert (int(row[1].replace(",", "")), int(row[4])) == (last, validations)
    assert validations > sum(1 for r in csv.DictReader(parts[-1].open()) if r["dev_wer"])  # the first part's count


def test_the_timeline_splits_a_runs_time_between_steps_and_validations(tiny_bundle):
    run = tiny_bundle.parent
    command = [sys.executable, str(ROOT / "bench" / "run_timeline.py"), str(run)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.splitlines()[-1].strip("| ").split(" | ")
    assert row[0] == str(run)

    # the CSV log, written beside the events, says which steps logged a loss and which validated
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    logged = [int(r["step"]) for r in rows if r["train_loss"]]
    validated = {int(r["step"]) for r in rows if r["dev_wer"]}
    steps, seconds, validations = int(row[1].replace(",", "")), float(row[2]), int(row[4])
    assert max(validated) > logged[-1]  # the run's last validation came after its last logged loss ...
    assert steps == max(validated)
    assert validations == sum(logged[0] < v for v in validated) > 0  # ... and counts
    assert 0 < seconds <= load_bundle(tiny_bundle).training["seconds_this_run"]
    # An estimate, from the intervals' excess over the median step: a tiny model's validations
    # take about as long as the noise of a busy machine, and their sum can come out below zero.
    validation_seconds = float(row[5].split()[0])
    assert abs(validation_seconds) < seconds  # the share is of the unrounded seconds
    # The share is printed to 1 %, and both seconds to 0.1 s: over a few seconds the latter moves the ratio too.
    assert abs(int(row[6].rstrip("%")) / 100 - validation_seconds / seconds) < 0.006 + 0.1 / seconds


def test_the_serving_benchmark_runs_its_three_setups_without_errors(tiny_bundle):
    """A smoke run, so that the script keeps up with the server's options (it once passed a --timeout
    longer than the default --deadline, which the server refuses)."""
    command = [sys.executable, str(ROOT / "bench" / "serve.py"), "--model", str(tiny_bundle)]
    command += ["--clients", "2", "--duration", "1", "--rounds", "1", "--words", "20"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| 2 |" in line]
    assert len(rows) == 6  # three setups, printed as measured and again in the final table
    assert all(row.rstrip(" |").endswith("| 0") for row in rows)  # no request failed


@pytest.mark.parametrize(
    "script",
    [
        ["merge_memory.py", "--items", "2000"],
        ["input_memory.py", "--items", "2000"],
        ["train_throughput.py", "--config", str(TINY_CONFIG), "--pairs", "500", "--steps", "2", "--rounds", "1"],
        ["encode.py", "--model", "TINY", "--batch-sizes", "64", "--seconds", "0.1", "--rounds", "1"],
        ["decode.py", "--model", "TINY", "--batch-sizes", "8", "--modes", "greedy", "beam", "--seconds", "0.1"]
        + ["--naive-seconds", "0.1", "--dev-items", "20"],
    ],
    ids=lambda script: script[0],
)
def test_the_measuring_scripts_run_on_a_small_case(script, tiny_bundle):
    """Smoke runs, so that a script does not silently fall behind the code it measures."""
    arguments = [str(tiny_bundle) if argument == "TINY" else argument for argument in script[1:]]
    command = [sys.executable, str(ROOT / "bench" / script[0]), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| ---" in result.stdout  # its table
