"""The G2P benchmark script, end to end on a small split laid out like g014b2b."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genrnn.data import read_examples
from tests.conftest import ROOT, TINY_CONFIG, write_tsv

BENCHMARK = [sys.executable, str(ROOT / "bench" / "g2p_benchmark.py")]


@pytest.fixture(scope="module")
def split(g2p_files, tmp_path_factory) -> Path:
    """Train and reference files named as in g014b2b; the test words carry every reference."""
    directory = tmp_path_factory.mktemp("split")
    (directory / "g014b2b.train").write_text(g2p_files["train"].read_text())
    write_tsv(directory / "g014b2b.ref", read_examples(g2p_files["test"])[:60])
    return directory


def run_benchmark(split: Path, output: Path, *args: str) -> dict:
    """Run the script; its results.json."""
    command = [*BENCHMARK, "--data-dir", str(split), "--output", str(output), "--accelerator", "cpu", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    # dev chooses the decoding, greedy on a tie; its table row is in bold, the other is not
    wer = {mode: scores["dev"]["wer"] for mode, scores in results["scores"].items()}
    assert results["dev_choice"] == ("greedy" if wer["greedy"] <= wer["beam2"] else "beam2")
    other = ({"greedy", "beam2"} - {results["dev_choice"]}).pop()
    assert f"| **{results['dev_choice']}** |" in result.stdout and f"| {other} |" in result.stdout
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

    # scoring a trained bundle again, and as an ensemble of two copies, gives the same figures
    bundle = tmp_path / "run" / "bundle"
    again = run_benchmark(split, tmp_path / "again", "--model", str(bundle), "--beam-size", "2")
    pair = run_benchmark(split, tmp_path / "pair", "--model", f"{bundle},{bundle}", "--beam-size", "2")
    assert again["scores"] == results["scores"]
    assert pair["scores"]["greedy"] == results["scores"]["greedy"]
    assert pair["parameters"] == 2 * results["parameters"]
    assert (again["averaging"], pair["averaging"]) == (None, "probabilities")


def test_the_sweep_trains_variants_side_by_side_then_scores_their_ensemble(split, tmp_path):
    output = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "bench" / "g2p_sweep.py"), "--data-dir", str(split), "--output", str(output)]
    command += ["--config", str(TINY_CONFIG), "--only", "base,luong", "--set", "training.max_epochs=1"]
    command += ["--set", "training.accelerator=cpu", "--beam-size", "2", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((output / "summary.json").read_text())
    assert list(summary) == ["base", "luong", "ensemble-all"]  # the other ensembles would have one member
    assert summary["luong"]["training"]["config"]["model"]["attention"] == "luong"
    assert summary["base"]["training"]["config"]["model"]["attention"] == "none"
    assert summary["base"]["training"]["device"] == "cpu"  # --set reaches every variant
    assert summary["ensemble-all"]["parameters"] == summary["base"]["parameters"] + summary["luong"]["parameters"]
    rows = (output / "summary.md").read_text().splitlines()
    assert len(rows) == 2 + 3 * 2 and rows[-1].replace("**", "").startswith("| ensemble-all | beam2 |")
    assert sum(row.count("**") for row in rows) == 3 * 3 * 2  # each run's choice: decoding, test WER and PER

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
