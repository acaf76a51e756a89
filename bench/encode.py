"""Encoder speed on a CPU: each length's rows run together (oneDNN's LSTM) against packed sequences.

    python bench/encode.py [--model BUNDLE] [--batch-sizes 64 256 1024] [--seconds 3]

``Seq2Seq.encode`` over CMUdict dev words, batch after batch: in a fixed random order (as
an HTTP server's batches come), and sorted by length (as a batch job cuts them),
without gradients, once as the engine runs it (from ``ONEDNN_MIN_ROWS`` rows on, the
rows of each length together, unpacked, so that oneDNN's LSTM takes them) and once with
``encode_by_length`` off: packed sequences on PyTorch's own kernel, as every batch was
encoded before. Both in this run, taking turns; float32, and int8 dynamic quantization.
The encoder's speed does not depend on its weights: without a bundle (found under
``runs/`` or given), random weights of ``g2p.yaml``'s architecture.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import torch
from decode import clock, load_model  # the script's own directory is on the path
from machine import machine

from genrnn.data import pad, read_examples
from genrnn.model import ONEDNN_MIN_ROWS, Seq2Seq
from genrnn.quantization import quantize_int8
from genrnn.tokenizer import Tokenizer


def batches(tokenizer: Tokenizer, words: Sequence[str], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded sources and their lengths, ``size`` words each."""
    ids = tokenizer.encode(words)
    chunks = [ids[start : start + size] for start in range(0, len(ids) - size + 1, size)]
    return [(pad(chunk), torch.tensor([len(row) for row in chunk])) for chunk in chunks]


@torch.inference_mode()
def words_per_second(model: Seq2Seq, inputs: list[tuple[torch.Tensor, torch.Tensor]], seconds: float) -> float:
    """Words encoded a second (CPU time), going round the batches until ``seconds`` have passed."""
    model.encode(*inputs[0])  # warm up
    words, started = 0, clock()
    while clock() - started < seconds:
        for source, lengths in inputs:
            model.encode(source, lengths)
            words += source.shape[0]
    return words / (clock() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle (default: the newest under runs/ of g2p.yaml's architecture)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--seconds", type=float, default=3.0, help="least CPU time measured per cell")
    parser.add_argument("--rounds", type=int, default=2, help="turns each variant takes, the best one kept")
    args = parser.parse_args()

    torch.set_num_threads(1)
    model, source_tokenizer, _, described = load_model(args.model)
    words = [e.source for e in read_examples("builtin:cmudict:dev")]
    random.Random(0).shuffle(words)
    print(f"machine: {machine()}, 1 thread, timed by the process's CPU time")
    print(f"model: {described}; oneDNN available: {torch.backends.mkldnn.is_available()}")
    print(f"rows of each length together from {ONEDNN_MIN_ROWS} rows on\n")
    print("| weights | words | batch | packed (baseline), words/s | by length, words/s | speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    orders = {"random order": words, "sorted by length": sorted(words, key=len)}
    for name, weights in (("float32", model), ("int8", quantize_int8(model))):
        for order, ordered in orders.items():
            for size in args.batch_sizes:
                inputs = batches(source_tokenizer, ordered, size)
                best = {False: 0.0, True: 0.0}
                for _ in range(args.rounds):
                    for by_length in (False, True):
                        weights.encode_by_length = by_length
                        best[by_length] = max(best[by_length], words_per_second(weights, inputs, args.seconds))
                weights.encode_by_length = True
                cells = f"{best[False]:,.0f} | {best[True]:,.0f} | {best[True] / best[False]:.2f}×"
                print(f"| {name} | {order} | {size:,} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
