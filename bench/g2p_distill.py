"""A sequence-level distilled train file: every train word with the 1-best output of trained bundles.

    python bench/g2p_distill.py --data-dir ../shared/data/cmudict-g014b2b --model A,B,C,D \\
        --output runs/distilled.train [--beam-size 4] [--ensemble-averaging probabilities]

Kim & Rush's sequence-level knowledge distillation: a student trained on a teacher's
outputs (here, usually an ensemble's) learns the teacher's mode instead of every
variant of the references. The words of the split's train file are decoded with
``--model`` (several bundles: one ensemble) and written one line each,
``WORD<TAB>OUTPUT``, in the train file's format. The dev words keep their reference
lines, so that a run trained on the output (``g2p_benchmark.py --train FILE``) holds
out the very same dev set by hash, and the teachers never see it. The test words are
not in the train file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from g2p_benchmark import check_trained_on, examples_of  # the script's own directory is on the path

from genrnn.bundle import load_bundle
from genrnn.config import AVERAGINGS, DEFAULT_AVERAGING, DecodingConfig
from genrnn.data import Example, hold_out_dev, tsv_line
from genrnn.decoding import Generator
from genrnn.evaluation import best_outputs
from genrnn.metrics import is_right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="directory with g014b2b.train")
    parser.add_argument("--model", required=True, help="the teacher bundles, comma-separated (an ensemble)")
    parser.add_argument("--output", required=True, help="the distilled train file to write")
    parser.add_argument("--beam-size", type=int, default=4, help="1: greedy decoding")
    parser.add_argument("--length-penalty", type=float, default=0.6, help="beam search's GNMT length penalty")
    parser.add_argument("--ensemble-averaging", choices=AVERAGINGS, default=DEFAULT_AVERAGING)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.beam_size < 1:
        parser.error("--beam-size must be at least 1")
    if Path(args.output).suffix.lower() == ".jsonl":  # the trainer reads a .jsonl file as JSON lines
        parser.error("--output: the file is written as TSV; name it anything but *.jsonl")

    started = time.monotonic()
    bundle = load_bundle(args.model, args.device, args.ensemble_averaging)
    check_trained_on(bundle, Path(args.data_dir))  # teachers that saw dev or test words would teach them
    train, dev = hold_out_dev(examples_of(Path(args.data_dir) / "g014b2b.train"))
    if args.beam_size == 1:
        settings = DecodingConfig(mode="greedy")
    else:
        settings = DecodingConfig(mode="beam", beam_size=args.beam_size, length_penalty=args.length_penalty)
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    outputs = best_outputs(generator, [e.source for e in train], settings)
    # A word the teachers decode to nothing keeps its references: the train file holds no empty target.
    distilled = [Example(e.source, (best,)) if best else e for e, best in zip(train, outputs)]

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")  # a killed run leaves no file that looks finished
    partial.write_text("".join(tsv_line(e) for e in [*distilled, *dev]))
    partial.replace(output)
    changed = sum(not is_right(best, e.targets) for e, best in zip(train, outputs))  # as scoring counts them
    print(
        f"{output}: {len(train):,} train words decoded ({changed:,} differ from every reference, "
        f"{changed / max(1, len(train)):.2%}), {len(dev):,} dev words kept as they were; "
        f"{time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
