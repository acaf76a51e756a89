"""Training throughput of the default G2P model: bucketed + packed batches against a naive baseline.

    python bench/train_throughput.py [--config training/configs/g2p.yaml] [--pairs 20000] [--steps 20]
        [--rounds 3] [--no-feeding] [--bahdanau] [--device cuda]

Both variants train the same model (forward, backward, Adam step, from the same
initial weights) on the same pairs of the built-in CMUdict task, in as many batches:
genrnn's first ``--steps`` (+ 3 of warm-up) token-budget batches of pairs of similar
length, the encoder over packed sequences; the baseline, those batches' pairs shuffled
(the warm-up's apart from the timed steps') and cut into batches of equal size, the
encoder over the padded tensor. They take
turns, ``--rounds`` times, so that a load that comes and goes falls on both, and the
medians are reported. Reported: target tokens per second (real, non-padding) and the
padding fraction of the batches.

With ``--no-feeding``, the model with Luong attention also trains on the bucketed
batches twice: with input feeding, which steps the decoder one position at a time
(the baseline), and without, which runs the decoder over the whole target at once.
With ``--bahdanau``, the model with Bahdanau attention trains on them too, its
attention queried by the top decoder layer (the baseline) and by the bottom one, which
alone then steps one position at a time; they take turns as the first two do.
``--device cuda`` trains on a GPU, timed after synchronising.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from machine import load_average, machine  # the script's own directory is on the path

from genrnn.config import load_config
from genrnn.data import PairDataset, TokenBudgetBatchSampler, collate, read_examples, training_pairs
from genrnn.model import Seq2Seq
from genrnn.tokenizer import PAD_ID, train_tokenizers


def packed_step(model: Seq2Seq, batch) -> torch.Tensor:
    logits = model(batch.source, batch.source_lengths, batch.target_in)
    return F.cross_entropy(logits.flatten(0, 1), batch.target_out.flatten(), ignore_index=PAD_ID)


def padded_step(model: Seq2Seq, batch) -> torch.Tensor:
    """The same computation without packing: the encoder also runs over the padding."""
    embedded = model.embedding_dropout(model.source_embedding(batch.source))
    _, final = model.encoder(embedded)
    logits, _ = model.decode(batch.target_in, model.bridge(final))
    return F.cross_entropy(logits.flatten(0, 1), batch.target_out.flatten(), ignore_index=PAD_ID)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP = 3  # steps each variant takes before the clock starts


def measure(model: Seq2Seq, batches, step, device: torch.device, warmup: int = WARMUP) -> tuple[float, float]:
    """Target tokens per second and padding fraction over ``batches`` (after a warm-up), on ``device``."""
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    tokens = seconds = 0.0
    padding = []
    for i, batch in enumerate(batches):
        synchronize(device)
        started = time.perf_counter()
        moved = batch.to(device)  # part of a step, as in training
        optimizer.zero_grad()
        step(model, moved).backward()
        optimizer.step()
        synchronize(device)
        if i >= warmup:
            seconds += time.perf_counter() - started
            tokens += batch.target_tokens
            padding.append(batch.padding_fraction)
    return tokens / seconds, sum(padding) / len(padding)


def same_pairs_shuffled(dataset: PairDataset, bucketed: list[list[int]], seed: int = 1) -> list:
    """The pairs of the ``bucketed`` batches in random order, cut into as many batches of (nearly) equal size."""
    pairs = [i for batch in bucketed for i in batch]
    random.Random(seed).shuffle(pairs)
    count = len(bucketed)
    bounds = [round(k * len(pairs) / count) for k in range(count + 1)]
    return [collate([dataset[i] for i in pairs[start:end]]) for start, end in zip(bounds, bounds[1:])]


def take_turns(variants: dict[str, tuple], rounds: int, device: torch.device) -> dict[str, tuple[list[float], float]]:
    """Each variant's rates over ``rounds`` turns and its padding fraction; ``variants``: name → (model, batches, step).

    Every turn trains a fresh copy of the variant's model, so that each starts from the same weights.
    """
    measured = {name: ([], 0.0) for name in variants}
    for _ in range(rounds):
        for name, (model, batches, step) in variants.items():
            rate, padding = measure(copy.deepcopy(model), batches, step, device)
            measured[name] = (measured[name][0] + [rate], padding)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="training/configs/g2p.yaml")
    parser.add_argument("--pairs", type=int, default=20000, help="training pairs to draw batches from")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--no-feeding", action="store_true", help="also time Luong attention without input feeding")
    parser.add_argument("--bahdanau", action="store_true", help="also time Bahdanau attention")
    parser.add_argument("--rounds", type=int, default=3, help="turns each variant takes (medians reported)")
    parser.add_argument("--device", default="cpu", help="torch device to train on, e.g. cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)

    config = load_config(args.config)
    pairs = training_pairs(read_examples(config.data.train))
    random.Random(0).shuffle(pairs)
    pairs = pairs[: args.pairs]
    source_tok, target_tok = train_tokenizers([s for s, _ in pairs], [t for _, t in pairs], config.tokenizer)
    dataset = PairDataset(pairs, source_tok, target_tok)

    sampler = TokenBudgetBatchSampler([dataset.cost(i) for i in range(len(dataset))], config.data.max_tokens, seed=0)
    indices = list(sampler)[: args.steps + WARMUP]
    if len(indices) < args.steps + WARMUP:
        parser.error(f"--pairs {args.pairs} make {len(indices)} batches, fewer than --steps {args.steps} and {WARMUP}")
    bucketed = [collate([dataset[i] for i in batch]) for batch in indices]
    # The warm-up's pairs and the timed steps' pairs are shuffled apart: each variant times the same pairs.
    naive = same_pairs_shuffled(dataset, indices[:WARMUP]) + same_pairs_shuffled(dataset, indices[WARMUP:])
    mean_size = round(sum(len(batch) for batch in indices) / len(indices))

    def model_with(**changes) -> Seq2Seq:
        torch.manual_seed(0)
        return Seq2Seq(replace(config.model, **changes), source_tok.vocab_size, target_tok.vocab_size)

    model = model_with()
    comparisons = [
        {
            "baseline: random batches, padded encoder": (model, naive, padded_step),
            "genrnn: length buckets, packed encoder": (model, bucketed, packed_step),
        }
    ]
    if args.no_feeding:
        comparisons.append(
            {
                "baseline: Luong attention, input feeding": (model_with(attention="luong"), bucketed, packed_step),
                "Luong attention, no input feeding": (
                    model_with(attention="luong", input_feeding=False),
                    bucketed,
                    packed_step,
                ),
            }
        )
    if args.bahdanau:
        comparisons.append(
            {
                f"Bahdanau attention, {query} layer queries" + (" (baseline)" if query == "top" else ""): (
                    model_with(attention="bahdanau", attention_query=query),
                    bucketed,
                    packed_step,
                )
                for query in ("top", "bottom")
            }
        )
    host = machine()  # with the load average at the start
    results = [take_turns(variants, args.rounds, device) for variants in comparisons]
    print(
        f"machine: {host} and {load_average():.1f} at the end; {torch.get_num_threads()} torch threads, "
        f"device {device.type}; "
        f"model {model.num_parameters():,} parameters; "
        f"{mean_size} pairs per batch on average, {args.steps} steps each, median of {args.rounds} rounds"
    )
    print("| variant | target tokens/s | each round | padding fraction |\n| --- | ---: | --- | ---: |")
    for measured in results:
        for name, (rates, padding) in measured.items():
            each = " · ".join(f"{rate:,.0f}" for rate in rates)
            print(f"| {name} | {statistics.median(rates):,.0f} | {each} | {padding:.1%} |")
    for measured in results:
        (baseline, (base, _)), (variant, (other, _)) = measured.items()
        ratios = [b / a for a, b in zip(base, other)]
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"{variant} against {baseline}: {statistics.median(ratios):.2f}×, the rounds' ratios' median ({each})")


if __name__ == "__main__":
    main()
