"""Training throughput of the default G2P model: bucketed + packed batches against a naive baseline.

    python bench/train_throughput.py [--config training/configs/g2p.yaml] [--pairs 20000] [--steps 40]
        [--no-feeding] [--bahdanau [--rounds N]] [--device cuda]

Both variants train the same model (forward, backward, Adam step) on the same
pairs of the built-in CMUdict task, with the same number of pairs per batch on
average. genrnn: token-budget batches of similar length, encoder over packed
sequences. Baseline: batches in random order with a fixed size, encoder over the
padded tensor. Reported: target tokens per second (real, non-padding) and the
padding fraction of the batches.

With ``--no-feeding``, the model with Luong attention also trains on the bucketed
batches twice: with input feeding, which steps the decoder one position at a time
(the baseline), and without, which runs the decoder over the whole target at once.
With ``--bahdanau``, the model with Bahdanau attention trains on them too, its
attention queried by the top decoder layer (the baseline) and by the bottom one, which
alone then steps one position at a time; with ``--rounds N`` they take N turns each
and the medians are reported.
``--device cuda`` trains on a GPU, timed after synchronising.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

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


def measure(model: Seq2Seq, batches, step, device: torch.device, warmup: int = 3) -> tuple[float, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="training/configs/g2p.yaml")
    parser.add_argument("--pairs", type=int, default=20000, help="training pairs to draw batches from")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per variant")
    parser.add_argument("--no-feeding", action="store_true", help="also time Luong attention without input feeding")
    parser.add_argument("--bahdanau", action="store_true", help="also time Bahdanau attention")
    parser.add_argument("--rounds", type=int, default=1, help="turns each Bahdanau variant takes (median reported)")
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
    bucketed = [collate([dataset[i] for i in b]) for b in list(sampler)[: args.steps + 3]]
    mean_size = round(sum(b.source.shape[0] for b in bucketed) / len(bucketed))
    order = list(range(len(dataset)))
    random.Random(1).shuffle(order)
    naive = [
        collate([dataset[i] for i in order[k : k + mean_size]])
        for k in range(0, mean_size * (args.steps + 3), mean_size)
    ]

    torch.manual_seed(0)
    model = Seq2Seq(config.model, source_tok.vocab_size, target_tok.vocab_size)
    rows = [
        ("baseline: random batches, padded encoder", *measure(model, naive, padded_step, device)),
        ("genrnn: length buckets, packed encoder", *measure(model, bucketed, packed_step, device)),
    ]
    if args.no_feeding:
        for feeding in (True, False):
            torch.manual_seed(0)
            luong = replace(config.model, attention="luong", input_feeding=feeding)
            attentive = Seq2Seq(luong, source_tok.vocab_size, target_tok.vocab_size)
            label = "baseline: Luong attention, input feeding" if feeding else "Luong attention, no input feeding"
            rows.append((label, *measure(attentive, bucketed, packed_step, device)))
    if args.bahdanau:
        # The two take turns, round after round, so that a load that comes and goes falls on both.
        queries = {}
        for query in ("top", "bottom"):
            torch.manual_seed(0)
            bahdanau = replace(config.model, attention="bahdanau", attention_query=query)
            queries[query] = Seq2Seq(bahdanau, source_tok.vocab_size, target_tok.vocab_size)
        rates = {query: [] for query in queries}
        for _ in range(args.rounds):
            for query, attentive in queries.items():
                rate, padding = measure(attentive, bucketed, packed_step, device)
                rates[query].append(rate)
        for query, measured in rates.items():
            label = f"Bahdanau attention, {query} layer queries" + (" (baseline)" if query == "top" else "")
            rows.append((label, statistics.median(measured), padding))
        ratios = [bottom / top for top, bottom in zip(rates["top"], rates["bottom"])]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}, "
        f"torch {torch.__version__}; model {model.num_parameters():,} parameters; "
        f"{mean_size} pairs per batch on average, {args.steps} steps each"
    )
    print("| variant | target tokens/s | padding fraction |\n| --- | ---: | ---: |")
    for name, rate, padding in rows:
        print(f"| {name} | {rate:,.0f} | {padding:.1%} |")
    print(f"speed-up: {rows[1][1] / rows[0][1]:.2f}×")
    if args.no_feeding:
        print(f"without input feeding: {rows[3][1] / rows[2][1]:.2f}×")
    if args.bahdanau:
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"bottom layer queries: {statistics.median(ratios):.2f}× (median of {args.rounds} rounds: {each})")


if __name__ == "__main__":
    main()
