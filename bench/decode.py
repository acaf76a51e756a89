"""Decoding speed of the default G2P model on this machine, against a naive baseline and torch.mm.

    python bench/decode.py [--model runs/bench-g2p/bundle] [--batch-sizes 1 8 64 256 1024] [--device cuda]
        [--write BENCHMARKS.md]

For greedy, sampled (temperature 0.8, top-p 0.9) and beam (size 4) decoding at each
batch size: sequences/s and output tokens/s of :meth:`Generator.generate` (tokenizing,
decoding and detokenizing) on CMUdict dev words in a fixed random order. The baseline,
in the same run: greedy and sampled decoding at each batch size without compaction
(finished rows go on stepping until the batch's last ends); batch 1 is decoding one
sequence at a time, where compaction changes nothing. Beam search always compacts. On a
CPU, two more greedy rows: oneDNN's LSTM at every batch size, and the encoder on packed
sequences at every batch size (the engine encodes each length's rows together from 256
rows on). Greedy
decoding at the largest batch is also counted in floating-point operations (the
matrix multiplies of the encoder, bridge, decoder steps actually taken and output
projection) and set against the rate of one large ``torch.mm`` measured in the same
run. Long outputs: the cost of a beam step against a greedy step as outputs grow to
1,024 tokens (the model made never to end), which stays flat when the beam keeps
back-pointers rather than copying its histories. Last, int8 dynamic quantization:
greedy speed and dev-set WER/PER against float (on the CPU only). With ``--device cuda``
the model decodes on the GPU, timed by the wall clock after synchronising, and the
results go to their own section of the Markdown file.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from machine import machine  # the script's own directory is on the path

from genrnn import decoding
from genrnn.bundle import load_bundle
from genrnn.config import DecodingConfig, ModelConfig, load_config, replace
from genrnn.data import read_examples
from genrnn.decoding import Generator
from genrnn.metrics import score
from genrnn.model import Seq2Seq
from genrnn.quantization import quantize_int8
from genrnn.tokenizer import EOS_ID, Tokenizer, train_tokenizers

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "training" / "configs" / "g2p.yaml"
SECTION = "## Decoding speed"
GPU_SECTION = "## Decoding speed on a GPU"
NOTES = "### Notes"
ONEDNN_ALWAYS = "greedy, oneDNN LSTM at every batch size"
ENCODER_PACKED = "greedy, encoder on packed sequences (baseline)"
NO_COMPACTION = "no compaction (baseline)"
MODES = {
    "greedy": DecodingConfig(mode="greedy", max_new_tokens=48),
    "sample": DecodingConfig(mode="sample", temperature=0.8, top_p=0.9, seed=1, max_new_tokens=48),
    "beam": DecodingConfig(mode="beam", beam_size=4, max_new_tokens=48),
}


@dataclass
class Speed:
    sequences_per_s: float
    tokens_per_s: float
    seconds: float
    sequences: int
    decoder_row_steps: int = 0  # decoder rows × steps actually run (greedy: one row per sequence)
    source_tokens: int = 0


# -- the model ----------------------------------------------------------------------------------


def find_bundle(architecture: ModelConfig) -> Path | None:
    """The newest bundle under runs/ with the default architecture."""
    candidates = sorted(ROOT.glob("runs/*/bundle/genrnn.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest in candidates:
        try:
            bundle = load_bundle(manifest.parent)
        except Exception:  # an unfinished or foreign bundle: look further
            continue
        if bundle.model_config == architecture:
            return manifest.parent
    return None


def load_model(model: str | None) -> tuple[Seq2Seq, Tokenizer, Tokenizer, str]:
    """A trained bundle if there is one, else random weights of the default architecture."""
    config = load_config(DEFAULT_CONFIG)
    path = Path(model) if model else find_bundle(config.model)
    if path is not None:
        bundle = load_bundle(path)
        steps = bundle.training.get("steps", "?")
        return bundle.model, bundle.source_tokenizer, bundle.target_tokenizer, f"bundle {path} ({steps} training steps)"
    examples = read_examples("builtin:cmudict:train")
    source, target = train_tokenizers(
        [e.source for e in examples], [t for e in examples for t in e.targets[:1]], config.tokenizer
    )
    torch.manual_seed(0)
    model = Seq2Seq(config.model, source.vocab_size, target.vocab_size).eval()
    return model, source, target, "random weights of training/configs/g2p.yaml's architecture (no bundle found)"


# -- counting work ------------------------------------------------------------------------------


def rnn_flops(cell: str, input_size: int, hidden: int) -> int:
    """Multiply-add FLOPs of one step of one recurrent layer (one direction) for one row."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    return 2 * gates * hidden * (input_size + hidden)


def greedy_flops(config: ModelConfig, vocab: int, source_tokens: int, rows: int, decoder_row_steps: int) -> int:
    """Matrix-multiply FLOPs of encoding ``source_tokens``, bridging ``rows`` and ``decoder_row_steps`` steps."""
    if getattr(config, "attention", "none") != "none":
        raise ValueError("the FLOP count covers models without attention")
    directions = 2 if config.bidirectional else 1
    encoder = 0
    for layer in range(config.encoder_layers):
        size = config.embedding_dim if layer == 0 else config.encoder_output_size
        encoder += directions * rnn_flops(config.cell, size, config.encoder_hidden)
    bridge = 0
    if config.bridge == "bridge":
        states = 2 if config.cell == "lstm" else 1
        bridge = (
            states
            * 2
            * (config.encoder_layers * config.encoder_output_size)
            * (config.decoder_layers * config.decoder_hidden)
        )
    decoder = 2 * config.decoder_hidden * vocab
    for layer in range(config.decoder_layers):
        size = config.embedding_dim if layer == 0 else config.decoder_hidden
        decoder += rnn_flops(config.cell, size, config.decoder_hidden)
    return encoder * source_tokens + bridge * rows + decoder * decoder_row_steps


_device = torch.device("cpu")  # where the benchmark decodes: set once by main()


def clock() -> float:
    """Seconds of this process's CPU time on one thread, else of the wall clock.

    The machine may be shared: on one thread, CPU time leaves out the time other
    processes hold the core, and equals the wall clock on an idle machine. On a GPU,
    the wall clock once the queued work has finished.
    """
    if _device.type == "cuda":
        torch.cuda.synchronize(_device)
        return time.perf_counter()
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def mm_gflops(n: int, seconds: float = 2.0) -> float:
    """The best rate of ``torch.mm`` on ``n × n`` float32 matrices over a few timed rounds."""
    a, b = torch.randn(n, n, device=_device), torch.randn(n, n, device=_device)
    torch.mm(a, b)
    best = 0.0
    deadline = clock() + seconds
    while clock() < deadline:
        started = clock()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (clock() - started) / 1e9)
    return best


# -- timing ---------------------------------------------------------------------------------------


@contextmanager
def onednn_from(rows: int) -> Iterator[None]:
    """Decode with oneDNN's LSTM from ``rows`` rows a step on (0: always, as before the engine switched)."""
    saved = decoding.ONEDNN_MIN_ROWS
    decoding.ONEDNN_MIN_ROWS = rows
    try:
        yield
    finally:
        decoding.ONEDNN_MIN_ROWS = saved


@contextmanager
def encoder_packed(model: torch.nn.Module) -> Iterator[None]:
    """Encode every batch as packed sequences, as before the encoder ran each length's rows together."""
    models = [m for m in model.modules() if isinstance(m, Seq2Seq)]  # an ensemble's members too
    for m in models:
        m.encode_by_length = False
    try:
        yield
    finally:
        for m in models:
            m.encode_by_length = True


def timed(generator: Generator, settings: DecodingConfig, words: Sequence[str], batch: int, seconds: float) -> Speed:
    """Decode consecutive batches of ``words`` (after one warm-up batch) for at least ``seconds``."""
    generator.generate(list(words[:batch]), settings)
    sequences = tokens = row_steps = source_tokens = 0
    elapsed, start = 0.0, batch
    while elapsed < seconds or sequences == 0:
        chunk = [words[(start + i) % len(words)] for i in range(batch)]
        start += batch
        began = clock()
        generations = generator.generate(chunk, settings)
        elapsed += clock() - began
        sequences += len(generations)
        for g in generations:
            best = g.candidates[0]
            tokens += len(best.tokens)
            row_steps += len(best.tokens) + (best.finish_reason == "eos")
            source_tokens += max(g.input_tokens, 1)
    return Speed(sequences / elapsed, tokens / elapsed, elapsed, sequences, row_steps, source_tokens)


def step_cost(generator: Generator, settings: DecodingConfig, words: Sequence[str]) -> float:
    """Milliseconds per decoding step of one batch whose rows all run to ``max_new_tokens``."""
    generator.generate(list(words), replace(settings, max_new_tokens=8))  # warm up
    began = clock()
    generator.generate(list(words), settings)
    return (clock() - began) / settings.max_new_tokens * 1e3


def long_outputs_table(model: Seq2Seq, source: Tokenizer, target: Tokenizer, words: Sequence[str]) -> str:
    """Beam (size 4) against greedy, per step, as outputs grow: a model that never emits EOS."""
    endless = copy.deepcopy(model)
    for module in endless.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.flatten_parameters()  # a deep copy loses cuDNN's single weight buffer
    with torch.no_grad():
        endless.output.bias[EOS_ID] = float("-inf")
    generator = Generator(endless, source, target, max_new_tokens_cap=1024)
    rows = []
    for length in (64, 256, 1024):
        greedy = step_cost(generator, replace(MODES["greedy"], max_new_tokens=length), words)
        beam = step_cost(generator, replace(MODES["beam"], max_new_tokens=length), words)
        rows.append([f"{length}", f"{greedy:.2f}", f"{beam:.2f}", f"{beam / greedy:.1f}×"])
        print(" | ".join(rows[-1]), flush=True)
    header = [f"output tokens (batch {len(words)})", "greedy ms/step", "beam 4 ms/step", "beam / greedy"]
    return table(header, rows)


def flop_rate_line(
    engine: Generator, model: Seq2Seq, words: Sequence[str], batch: int, seconds: float, on_cpu: bool
) -> str:
    """Greedy at ``batch``, in FLOP/s, against torch.mm measured now (the machine may be shared)."""
    greedy = timed(engine, MODES["greedy"], words, batch, seconds)
    flops = greedy_flops(
        model.config, model.target_vocab_size, greedy.source_tokens, greedy.sequences, greedy.decoder_row_steps
    )
    achieved = flops / greedy.seconds / 1e9
    n = 2048 if on_cpu else 8192
    mm = mm_gflops(n)
    return (
        f"Greedy at batch {batch}: {achieved:,.1f} GFLOP/s ({flops / greedy.sequences / 1e6:.1f} MFLOP a sequence); "
        f"torch.mm {n}×{n} float32: {mm:,.1f} GFLOP/s; ratio {achieved / mm:.1%}"
        + (" (target: 50%)." if on_cpu else ".")
    )


def machine_and_timing() -> str:
    """The machine line, and how the steps were timed."""
    if _device.type == "cuda":
        return f"{machine()}; timed by the wall clock after synchronising"
    timing = "CPU time of the process" if torch.get_num_threads() == 1 else "wall clock"
    return f"{machine()}; {torch.get_num_threads()} thread(s), timed by the {timing}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_section(path: Path, section: str, text: str) -> None:
    """Replace this benchmark's section of ``path`` (or add it), leaving the other sections alone.

    A ``### Notes`` subsection written by hand is kept.
    """
    existing = path.read_text() if path.is_file() else "# Benchmarks\n"
    lines = existing.splitlines()
    if section in lines:
        start = lines.index(section)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        notes = next((i for i in range(start, end) if lines[i] == NOTES), end)
        lines[start:end] = text.rstrip("\n").splitlines() + [""] + lines[notes:end]
    else:
        lines += ["", *text.rstrip("\n").splitlines()]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


# -- the benchmark ----------------------------------------------------------------------------------


def int8_section(
    engine: Generator, words: Sequence[str], dev: Sequence, batch_sizes: Sequence[int], seconds: float
) -> str:
    """int8 dynamic quantization against float32: greedy speed, and WER/PER on ``dev``."""
    model, source, target = engine.model, engine.source_tokenizer, engine.target_tokenizer
    quantized = Generator(quantize_int8(model), source, target)
    largest = max(batch_sizes)
    rows = []
    for batch in sorted({1, 64, largest} & set(batch_sizes) or {largest}):
        exact = timed(engine, MODES["greedy"], words, batch, seconds)
        approx = timed(quantized, MODES["greedy"], words, batch, seconds)
        speedup = approx.sequences_per_s / exact.sequences_per_s
        rates = f"{exact.sequences_per_s:,.0f}", f"{approx.sequences_per_s:,.0f}"
        rows.append([f"greedy, batch {batch}", *rates, f"{speedup:.2f}×"])
    sources, references = [e.source for e in dev], [e.targets for e in dev]
    outputs = {}
    for name, generator in (("float32", engine), ("int8", quantized)):
        generations = generator.generate_sorted(sources, MODES["greedy"], batch_size=256)
        outputs[name] = [g.candidates[0].text for g in generations]
    exact_scores, int8_scores = score(outputs["float32"], references), score(outputs["int8"], references)
    same = sum(a == b for a, b in zip(outputs["float32"], outputs["int8"])) / len(sources)
    speed = table(["", "float32 seq/s", "int8 seq/s", "speed-up"], rows)
    accuracy = table(
        ["CMUdict dev", "items", "WER", "PER", "same output as float32"],
        [
            ["float32", f"{exact_scores.items}", f"{exact_scores.wer:.2%}", f"{exact_scores.per:.2%}", "—"],
            ["int8", f"{int8_scores.items}", f"{int8_scores.wer:.2%}", f"{int8_scores.per:.2%}", f"{same:.1%}"],
        ],
    )
    return f"### int8 dynamic quantization (`--quantize int8`)\n\n{speed}\n\n{accuracy}\n"


def main() -> None:
    global _device
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle directory (default: the newest default-sized bundle under runs/)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--seconds", type=float, default=3.0, help="least time measured per cell")
    parser.add_argument(
        "--naive-seconds", type=float, default=5.0, help="least time measured per cell of the baseline (no compaction)"
    )
    parser.add_argument("--dev-items", type=int, default=0, help="dev words scored for int8 (0: all)")
    parser.add_argument("--write", type=Path, help="also write the tables into this Markdown file's section")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than 1: timed by the wall clock)")
    parser.add_argument("--device", default="cpu", help="cpu, or a CUDA device such as cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _device = torch.device(args.device)
    on_cpu = _device.type == "cpu"

    model, source_tokenizer, target_tokenizer, model_note = load_model(args.model)
    model = model.to(_device)
    dev = read_examples("builtin:cmudict:dev")
    words = [e.source for e in dev]
    random.Random(0).shuffle(words)
    host = machine_and_timing()
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    print(host)
    print(f"model: {model_note}, {model.num_parameters():,} parameters")

    engine = Generator(model, source_tokenizer, target_tokenizer)
    uncompacted = Generator(model, source_tokenizer, target_tokenizer, compact=False)
    for settings in MODES.values():  # warm up: allocator, kernels, caches
        engine.generate(words[:256], settings)

    header = ["mode", *[f"batch {b}" for b in args.batch_sizes]]
    rows = []
    labels = [*args.modes, *([ONEDNN_ALWAYS, ENCODER_PACKED] if on_cpu else [])]
    labels += [f"{mode}, {NO_COMPACTION}" for mode in args.modes if mode != "beam"]  # beam search always compacts
    for label in labels:
        mode = label.split(",")[0]
        generator, seconds = (uncompacted, args.naive_seconds) if NO_COMPACTION in label else (engine, args.seconds)
        packed = encoder_packed(model) if label == ENCODER_PACKED else nullcontext()
        with onednn_from(0 if label == ONEDNN_ALWAYS else decoding.ONEDNN_MIN_ROWS), packed:
            speeds = [timed(generator, MODES[mode], words, batch, seconds) for batch in args.batch_sizes]
        rows.append([label, *[f"{s.sequences_per_s:,.0f} / {s.tokens_per_s:,.0f}" for s in speeds]])
        print(" | ".join(rows[-1]), flush=True)
    speed_table = table(header, rows)

    print(speed_table)
    flop_line = "(FLOP/s not measured: the count covers one model without attention)"
    if isinstance(model, Seq2Seq) and model.config.attention == "none":
        flop_line = flop_rate_line(engine, model, words, max(args.batch_sizes), args.seconds, on_cpu)
    print(flop_line)

    long_table = "(not measured: an ensemble has no single output layer to silence EOS in)"
    if isinstance(model, Seq2Seq):
        long_table = long_outputs_table(model, source_tokenizer, target_tokenizer, words[:64])
    print(long_table)

    int8 = ""
    if on_cpu:  # int8 dynamic quantization runs on the CPU only
        scored = dev[: args.dev_items] if args.dev_items else dev
        int8 = int8_section(engine, words, scored, args.batch_sizes, args.seconds)
        print(int8)
    wall, cpu = time.perf_counter() - wall_started, time.process_time() - cpu_started
    share = f"The run took {wall:.0f} s of wall clock for {cpu:.0f} s of CPU time."
    print(share)

    if args.write:
        command = "python bench/decode.py " + " ".join(sys.argv[1:])
        kernels = (
            "The oneDNN row is greedy decoding with oneDNN's LSTM kernel at every batch size; the engine\n"
            f"uses PyTorch's own kernel below {decoding.ONEDNN_MIN_ROWS} rows a step "
            "(`ONEDNN_MIN_ROWS` in `genrnn/model.py`). The packed row is greedy decoding with the encoder\n"
            "reading packed sequences at every batch size, where the engine runs each length's rows together\n"
            f"from {decoding.ONEDNN_MIN_ROWS} rows on (`Seq2Seq.encode_by_length`)."
            if on_cpu
            else "Recurrent layers run on cuDNN; float32 weights and arithmetic."
        )
        write_section(
            args.write,
            SECTION if on_cpu else GPU_SECTION,
            f"""{SECTION if on_cpu else GPU_SECTION}

`{command}`

Machine: {host}. {share}
Model: {model_note}, {model.num_parameters():,} parameters; inputs: CMUdict dev words in a fixed random order.
Each cell: sequences/s / output tokens/s of `Generator.generate` (tokenize, decode, detokenize), greedy; sample
at temperature 0.8, top-p 0.9; beam size 4, best candidate. The baseline rows decode without compaction: finished
rows go on stepping until the batch's last ends (batch 1: one sequence at a time). {kernels}

{speed_table}

{flop_line}

### Long outputs

{long_table}

{int8}""",
        )


if __name__ == "__main__":
    main()
