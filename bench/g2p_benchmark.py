"""The standard CMUdict G2P benchmark (g014b2b split): train, select on dev, score the test words.

    python bench/g2p_benchmark.py --data-dir ../shared/data/cmudict-g014b2b \\
        [--config training/configs/g2p.yaml] [--set key=value ...] [--output runs/g014b2b] \\
        [--max-time 00:00:20:00] [--beam-size 4,8] [--length-penalty 0.6] [--model BUNDLE[,BUNDLE...]] \\
        [--train FILE]

The dev set is held out of the train file deterministically (about 1/21 of the
words, by hash), and every choice is made on it: the checkpoint kept, by the greedy
WER of the dev words each validation decodes (``data.valid_limit``, spread through
the dev set), the beam size, and greedy or beam, by the whole dev set's. The 12,000 test
words are decoded once per configuration (greedy, and beam search at the beam size dev
chose) and scored as the literature does: a
word is wrong unless the output equals one of its references; PER is the edit
distance to the closest reference over that reference's length. Writes
``results.json`` in the run directory (``dev_choice``: the decoding dev chose),
``outputs.json`` beside it (every word's 1-best output, and whether it is right), and
prints table rows for BENCHMARKS.md, dev's choice and the test figures it reports in bold.

``--model a,b,c`` skips training and scores bundles already trained this way,
several of them as one ensemble. ``--train FILE`` trains on another file instead of
the split's train file (a distilled one, ``bench/g2p_distill.py``); it must hold the
split's dev words as they are, so that the run holds out the same dev set, and no
test word. Nor may any model that a bundle's weights or teachers came from
(``training.init_from``, ``training.teacher``) have trained on a test word, or on the
dev words that chose its checkpoint: bundles record the data of theirs (``ancestry`` in
their training facts), and each file must be here, as it was, to be checked.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from genrnn.bundle import Bundle, load_bundle
from genrnn.config import AVERAGINGS, DEFAULT_AVERAGING, DecodingConfig, load_config, override, replace
from genrnn.data import BUILTIN_PREFIX, Example, examples_fingerprint, hold_out_dev, read_examples
from genrnn.decoding import Generator
from genrnn.evaluation import best_outputs
from genrnn.metrics import is_right, score


def train_model(args: argparse.Namespace, run: Path) -> tuple[Path, float]:
    """Train on the split's train file or ``--train`` (dev held out by hash); the bundle and the seconds it took."""
    config = override(load_config(args.config), args.set)
    training = config.training
    if args.accelerator:
        training = replace(training, accelerator=args.accelerator)
    if args.max_time:
        training = replace(training, max_time=args.max_time)
    data = replace(config.data, train=str(args.train or Path(args.data_dir) / "g014b2b.train"), valid=None)
    config = replace(config, name=f"{config.name}-g014b2b", data=data, training=training)
    # here: scoring bundles alone needs no Lightning, and its import is slow
    from training.train import load_related_bundles, related_ancestry, train

    # The models it starts from or learns from must not have seen a test word either.
    check_ancestry(related_ancestry(load_related_bundles(config)), Path(args.data_dir))
    started = time.monotonic()
    bundle = train(config, run)
    return bundle, time.monotonic() - started


@functools.cache
def examples_of(path: Path) -> tuple[Example, ...]:
    """A file's examples, read once a process: the checks, the scoring and the distillation share them."""
    return tuple(read_examples(path))


def check_train_file(train_file: Path, data_dir: Path) -> None:
    """Fail unless ``train_file`` holds out exactly the split's dev examples and holds no test word."""

    def dev_of(path: Path) -> list[Example]:
        return sorted(hold_out_dev(examples_of(path))[1], key=lambda e: (e.source, e.targets))

    split_train = data_dir / "g014b2b.train"
    if dev_of(train_file) != dev_of(split_train):
        raise SystemExit(
            f"{train_file}: its dev words (held out by hash) differ from those of {split_train}; "
            "keep the split's dev lines as they are, so that every run selects on the same dev set"
        )
    test_words = {e.source for e in examples_of(data_dir / "g014b2b.ref")}
    leaked = sorted(test_words & {e.source for e in examples_of(train_file)})
    if leaked:
        raise SystemExit(f"{train_file}: {len(leaked):,} of its words are test words (such as {leaked[0]!r})")


def check_trained_on(bundle: Bundle, data_dir: Path) -> None:
    """Fail unless every member of ``bundle``, and every model its weights or teachers came from, trained as
    :func:`check_ancestry` asks.
    """
    check_ancestry(bundle.ancestry(), data_dir)


def check_ancestry(ancestry: list[dict[str, Any]] | None, data_dir: Path) -> None:
    """Fail unless each training file of ``ancestry`` is here, passes :func:`check_train_file`, and was
    trained on as the benchmark trains: less its dev share, which chose the checkpoint.
    """
    if ancestry is None:
        raise SystemExit(
            "a bundle started from or was taught by a model whose training data it does not record "
            "(trained before bundles recorded it): it cannot be checked for test words"
        )
    split_train = examples_fingerprint(hold_out_dev(examples_of(data_dir / "g014b2b.train"))[0])
    for entry in ancestry:  # each once: bundles record it so
        data, digest = str(entry.get("data") or "a file it does not name"), entry.get("data_fingerprint")
        if digest == split_train:  # the split's own train file less its dev words, wherever it was named from
            continue
        if data.startswith(BUILTIN_PREFIX):  # the whole dictionary: the test words among them
            raise SystemExit(f"a bundle trained on {data}, which holds the split's test words")
        if not Path(data).is_file():
            raise SystemExit(f"a bundle trained on {data}, which is not here to check (run from where it trained)")
        examples = examples_of(Path(data))
        less_dev = examples_fingerprint(hold_out_dev(examples)[0])
        if digest not in {less_dev, examples_fingerprint(examples)}:
            # A path as it was given when training: here it may name another file.
            raise SystemExit(f"a bundle trained on {data}, which holds other pairs here: it cannot be checked")
        check_train_file(Path(data), data_dir)
        if digest != less_dev:
            raise SystemExit(
                f"a bundle trained on all of {data}, its dev words too (a run given its own validation "
                "file): its dev figures, and the checkpoint they chose, are not the benchmark's"
            )


def training_seconds(bundle: Bundle) -> float:
    """Seconds spent training the bundle, summed over an ensemble's members."""
    members = [m["training"] for m in bundle.manifest.get("members", [])] or [bundle.training]
    return sum(t.get("seconds_this_run", 0.0) for t in members)


def beam_sizes(text: str) -> tuple[int, ...]:
    """``--beam-size``: one or more beam sizes, comma-separated, in increasing order."""
    try:
        sizes = tuple(sorted({int(size) for size in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"beam sizes are whole numbers, comma-separated; got {text!r}") from None
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"a beam size is at least 1; got {text!r}")
    return sizes


def dev_choice(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """The decoding with the lowest dev WER; on a tie, the first (greedy, then the smaller beams: the cheaper)."""
    return min(scores, key=lambda mode: scores[mode]["dev"]["wer"])


def outputs_record(splits: dict[str, list[Example]], outputs: dict[str, dict[str, list[str]]]) -> dict:
    """``outputs.json``: the words, and each decoding's 1-best output of each with whether it is right.

    Two runs scored on the same words can then be compared word by word
    (``bench/g2p_standing.py``), which is far more telling than their two rates.
    """
    return {
        "words": {split: [e.source for e in examples] for split, examples in splits.items()},
        "outputs": outputs,
        "right": {
            mode: {
                split: "".join("1" if is_right(text, e.targets) else "0" for text, e in zip(texts, splits[split]))
                for split, texts in by_split.items()
            }
            for mode, by_split in outputs.items()
        },
    }


def table_row(label: str, mode: str, results: dict) -> str:
    """One row for BENCHMARKS.md; dev's choice of decoding in bold, with the test figures it reports.

    A beam size that dev did not choose has dev figures alone: the test words were not decoded so.
    """
    scores, chosen = {**results["scores"], **results["dev_only"]}[mode], mode == results["dev_choice"]
    bold = (lambda text: f"**{text}**") if chosen else (lambda text: text)
    test = {
        metric: bold(format(scores["test"][metric], ".2%")) if "test" in scores else "—" for metric in ("wer", "per")
    }
    return (
        f"| {label} | {bold(mode)} | {scores['dev']['wer']:.2%} | {test['wer']} | {test['per']} | "
        f"{results['parameters']:,} | "
        f"{results['training_seconds'] / 60:.0f} min | {results['device']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="directory with g014b2b.train and g014b2b.ref")
    parser.add_argument("--config", default="training/configs/g2p.yaml")
    parser.add_argument("--output", default="runs/g014b2b", help="run directory (rerun to resume)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    parser.add_argument("--model", help="score these bundles (comma-separated: an ensemble) instead of training")
    parser.add_argument("--train", type=Path, help="train on this file instead of the split's (its dev lines kept)")
    parser.add_argument(
        "--ensemble-averaging",
        choices=AVERAGINGS,
        default=DEFAULT_AVERAGING,
        help="what an ensemble (--model A,B) averages: its members' probabilities or log-probabilities",
    )
    parser.add_argument("--max-time", help="training budget DD:HH:MM:SS")
    parser.add_argument("--accelerator", help="training accelerator (default: the config's)")
    parser.add_argument(
        "--beam-size",
        type=beam_sizes,
        default=(4, 8),
        help="beam sizes to try on dev, comma-separated; the test words are decoded at dev's choice of them",
    )
    parser.add_argument("--length-penalty", type=float, default=0.6, help="beam search's GNMT length penalty")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="decoding device")
    args = parser.parse_args()

    run = Path(args.output)
    data_dir = Path(args.data_dir)
    if args.model and args.train:
        parser.error("--train trains; --model scores bundles already trained")
    if args.train:
        check_train_file(args.train, data_dir)
    if args.model:
        bundle = load_bundle(args.model, args.device, args.ensemble_averaging)
        check_trained_on(bundle, data_dir)
        run.mkdir(parents=True, exist_ok=True)
        seconds = training_seconds(bundle)
    else:
        bundle_dir, seconds = train_model(args, run)
        bundle = load_bundle(bundle_dir, args.device)
    splits = {
        "dev": hold_out_dev(examples_of(data_dir / "g014b2b.train"))[1],
        "test": list(examples_of(data_dir / "g014b2b.ref")),
    }
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    modes = {"greedy": DecodingConfig(mode="greedy")} | {
        f"beam{size}": DecodingConfig(mode="beam", beam_size=size, length_penalty=args.length_penalty)
        for size in args.beam_size
    }
    results = {
        "config": args.model or args.config,
        "overrides": args.set,
        "averaging": bundle.manifest.get("averaging"),  # an ensemble's
        "parameters": bundle.model.num_parameters(),
        "training_seconds": round(seconds, 1),
        "training": bundle.training,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "words": {split: len(examples) for split, examples in splits.items()},
    }
    # Every decoding on dev; the test words only greedily and at dev's choice of beam size.
    sources = {split: [e.source for e in examples] for split, examples in splits.items()}
    references = {split: [e.targets for e in examples] for split, examples in splits.items()}
    outputs = {mode: {"dev": best_outputs(generator, sources["dev"], settings)} for mode, settings in modes.items()}
    scores = {mode: {"dev": score(texts["dev"], references["dev"]).to_dict()} for mode, texts in outputs.items()}
    beam = dev_choice({mode: by_split for mode, by_split in scores.items() if mode != "greedy"})
    for mode in ("greedy", beam):
        outputs[mode]["test"] = best_outputs(generator, sources["test"], modes[mode])
        scores[mode]["test"] = score(outputs[mode]["test"], references["test"]).to_dict()
    results["scores"] = {mode: scores[mode] for mode in ("greedy", beam)}
    results["dev_only"] = {mode: by_split for mode, by_split in scores.items() if "test" not in by_split}
    results["dev_choice"] = dev_choice(results["scores"])
    (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (run / "outputs.json").write_text(json.dumps(outputs_record(splits, outputs)) + "\n")

    label = args.model or " ".join([Path(args.config).name, *args.set, *([f"on {args.train}"] if args.train else [])])
    if "averaging" in bundle.manifest:
        label += f" (averaging {bundle.manifest['averaging']})"
    print("| config | decoding | dev WER | test WER | test PER | parameters | training | device |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for mode in [*results["scores"], *results["dev_only"]]:
        print(table_row(label, mode, results))


if __name__ == "__main__":
    main()
