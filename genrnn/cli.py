"""The ``genrnn`` command line: ``train``, ``evaluate``, ``generate``, ``serve``.

Each verb imports its wing (``training``, ``serving``) only when it runs, so the
library stays usable without Lightning or LitServe. Errors a user can cause end
with one line on stderr and exit status 1; usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from genrnn.config import (
    AVERAGINGS,
    DEFAULT_AVERAGING,
    JOB_CAPS,
    MODE_FIELDS,
    Averaging,
    DecodingConfig,
    ExperimentConfig,
    decoding_for_mode,
    fields_read,
    from_dict,
    is_rank_zero,
    load_config,
    over_job_cap,
    override,
    process_rank,
    replace,
)
from genrnn.errors import ConfigurationError, GenrnnError, Terminated, sigterm_raises_terminated
from genrnn.files import check_apart, check_writable
from genrnn.processes import die_with_the_launching_process, started_by_the_first_process

if TYPE_CHECKING:  # torch is imported when a verb runs, not to parse its arguments
    import torch

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "training" / "configs" / "g2p.yaml"


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Options that mirror the HTTP request's decoding fields.

    Each is None unless given, so that one given for a mode that does not read it can be told
    (:func:`refuse_unread_options`); DecodingConfig's defaults fill in the others.
    """
    d = DecodingConfig()
    group = parser.add_argument_group("decoding")
    group.add_argument("--mode", choices=["greedy", "sample", "beam"], help=f"decoding mode (default: {d.mode})")
    group.add_argument("--temperature", type=float, help=f"sampling temperature (> 0; default: {d.temperature:g})")
    group.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0, the default: off)")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1, the default: off)")
    group.add_argument("--seed", type=int, help="random seed for sampling")
    group.add_argument(
        "--num-return-sequences",
        type=int,
        help=f"candidates per input (sample and beam; default: {d.num_return_sequences})",
    )
    group.add_argument("--beam-size", type=int, help=f"beam width (default: {d.beam_size})")
    group.add_argument("--length-penalty", type=float, help=f"beam length penalty (default: {d.length_penalty:g})")
    group.add_argument(
        "--length-penalty-form",
        choices=["gnmt", "average"],
        help="gnmt (the default): ((5 + len) / 6) ** alpha; average: log-probability per token",
    )
    group.add_argument("--max-new-tokens", type=int, help=f"length cap per output (default: {d.max_new_tokens})")


def add_quantize_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="decode with int8 weights (dynamic quantization; CPU only; outputs depend on the batch, seeds too)",
    )


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model``, and how an ensemble of several bundles combines them."""
    parser.add_argument("--model", required=True, help="bundle directory; several, joined by commas: an ensemble")
    parser.add_argument(
        "--ensemble-averaging",
        choices=AVERAGINGS,
        help=f"an ensemble averages its members' probabilities or log-probabilities (default: {DEFAULT_AVERAGING})",
    )


def output_file(text: str) -> str:
    """An ``--output`` of a file: ``-``, which many tools take for stdout, would be a file named ``-``."""
    if text == "-":
        raise argparse.ArgumentTypeError("'-' is not stdout here: the output is a file; name one")
    return text


def ensemble_averaging(args: argparse.Namespace) -> Averaging:
    """What ``--model``'s ensemble averages; refused for a single bundle, where it would mean nothing."""
    averaging = getattr(args, "ensemble_averaging", None)  # serve's options are absent when not given
    if averaging is None:
        return DEFAULT_AVERAGING
    from genrnn.bundle import ensemble_members  # here: it imports torch, which --help need not wait for

    if len(ensemble_members(args.model)) < 2:
        raise ConfigurationError("--ensemble-averaging: applies to an ensemble, several bundles joined by commas")
    return averaging


def decoding_from_args(args: argparse.Namespace) -> DecodingConfig:
    return decoding_for_mode(_decoding_options(args))


def _decoding_options(args: argparse.Namespace) -> dict[str, object]:
    """The decoding options given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingConfig)}
    return {name: value for name, value in given.items() if value is not None}


def refuse_unread_options(args: argparse.Namespace) -> None:
    """An option given for a mode that does not read it is a mistake: ``--beam-size 8`` alone decodes greedily.

    (HTTP ignores such fields, as DESIGN.md's contract says; a command line is typed by a
    person, who would otherwise read greedy scores as beam search's.)
    """
    options = _decoding_options(args)
    mode = options.get("mode", DecodingConfig.mode)
    for name in sorted(set(options) - fields_read(mode)):
        modes = " or ".join(f"--mode {m}" for m, reads in MODE_FIELDS.items() if name in reads)
        raise ConfigurationError(f"--{name.replace('_', '-')}: applies to {modes}, and this decodes with --mode {mode}")


# -- train ---------------------------------------------------------------------------------------


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model and write its bundle",
        description="Train an encoder–decoder on pairs and write a bundle of the best checkpoint.",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: the G2P config)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="training data: builtin:cmudict or a .tsv / .jsonl file")
    data.add_argument("--train", help="training file (.tsv or .jsonl)")
    p.add_argument("--valid", help="dev file (default: the built-in dev split, or 1/21 of --train held out)")
    p.add_argument("--output", help="run directory (default: runs/<name>); rerun to resume")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run directory has a checkpoint")
    p.add_argument("--accelerator", help="cpu, gpu, or auto")
    p.add_argument("--devices", help="number of devices, 'auto', or a list such as 0,1")
    p.add_argument("--num-nodes", type=int, help="number of machines (DDP)")
    p.add_argument("--strategy", help="Lightning strategy, e.g. ddp")
    p.add_argument("--precision", help="e.g. 32-true, bf16-mixed, 16-mixed")
    p.add_argument("--batch-size", type=int, help="most pairs per batch")
    p.add_argument("--max-tokens", type=int, help="token budget per batch")
    p.add_argument("--max-epochs", type=int, help="epoch budget")
    p.add_argument("--max-steps", type=int, help="step budget")
    p.add_argument("--max-time", help="time budget DD:HH:MM:SS")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set model.cell=gru --set training.lr=0.001",
    )
    p.set_defaults(run=_run_train)


def config_from_train_args(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment config with the command line's overrides applied."""
    config = override(load_config(args.config), args.set)
    data, training = config.data, config.training
    # New training data comes with its own dev set: --valid's, held out of it, or one --set names.
    valid = args.valid
    if valid is None and any(assignment.partition("=")[0].strip() == "data.valid" for assignment in args.set):
        valid = data.valid
    if args.data:
        data = replace(data, train=args.data, valid=valid)
    if args.train:
        data = replace(data, train=args.train, valid=valid)
    elif args.valid:
        data = replace(data, valid=args.valid)
    if args.batch_size is not None:
        data = replace(data, batch_size=args.batch_size)
    if args.max_tokens is not None:
        data = replace(data, max_tokens=args.max_tokens)
    overrides = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "num_nodes": args.num_nodes,
        "strategy": args.strategy,
        "precision": args.precision,
        "max_epochs": args.max_epochs,
        "max_steps": args.max_steps,
        "max_time": args.max_time,
        "seed": args.seed,
    }
    training = replace(training, **{k: v for k, v in overrides.items() if v is not None})
    return replace(config, data=data, training=training)


def _run_train(args: argparse.Namespace) -> None:
    config = config_from_train_args(args)
    args.output = args.output or Path("runs") / config.name  # resolved first: a stop's hint looks there
    from training.train import train

    train(config, args.output, resume=not args.no_resume)


# -- evaluate ------------------------------------------------------------------------------------


def _evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a bundle on a test set (WER, PER, sequence accuracy)",
        description="Decode every source of a test set and score the 1-best output.",
    )
    add_model_option(p)
    p.add_argument("--data", required=True, help="test data: .tsv / .jsonl file or builtin:cmudict:test")
    p.add_argument("--output", type=output_file, help="also write the scores here as JSON")
    p.add_argument("--batch-size", type=int, default=256, help="inputs decoded together")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_quantize_option(p)
    add_decoding_options(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from genrnn.bundle import ensemble_members, load_bundle
    from genrnn.data import BUILTIN_CMUDICT, BUILTIN_PREFIX, read_examples
    from genrnn.decoding import Generator
    from genrnn.evaluation import evaluate
    from genrnn.quantization import quantize_int8

    # Every argument is checked before the decoding, which may take long.
    refuse_unread_options(args)
    settings = decoding_from_args(args)
    problem = over_job_cap(settings)
    if problem:
        raise ConfigurationError(problem)
    if args.batch_size < 1:
        raise ConfigurationError(f"batch_size: must be at least 1; got {args.batch_size}")
    if args.output:
        check_writable(Path(args.output))
        data = [] if args.data.startswith(BUILTIN_PREFIX) else [args.data]
        check_apart(Path(args.output), [*data, *ensemble_members(args.model)])
    if args.data.rstrip(":") == BUILTIN_CMUDICT:
        raise ConfigurationError(
            f"data: {BUILTIN_CMUDICT} alone is its training split; name the split to score, as {BUILTIN_CMUDICT}:test"
        )
    device = torch_device(args.device)
    bundle = load_bundle(args.model, device, ensemble_averaging(args))
    examples = read_examples(args.data)
    generator = Generator(
        quantize_int8(bundle.model) if args.quantize == "int8" else bundle.model,
        bundle.source_tokenizer,
        bundle.target_tokenizer,
        max_new_tokens_cap=JOB_CAPS["max_new_tokens"],
    )
    scores = evaluate(generator, examples, settings, args.batch_size)
    print(
        f"items {scores.items}  WER {scores.wer:.2%}  PER {scores.per:.2%}  "
        f"sequence accuracy {scores.sequence_accuracy:.2%}  BLEU {scores.bleu:.2%}  chrF {scores.chrf:.2%}"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(scores.to_dict(), indent=2) + "\n")


def torch_device(name: str) -> torch.device:
    """The torch device ``name`` stands for, if this machine has it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigurationError(f"device: {name!r} is no torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigurationError(f"device: {name}: torch sees {torch.cuda.device_count()} CUDA devices here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"device: {name}: torch sees no MPS device here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigurationError(f"device: {name}: genrnn decodes on cpu, cuda or mps")
    return device


# -- generate ------------------------------------------------------------------------------------


def _generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="decode every line of a file into JSONL (resumable, multi-device)",
        description=(
            "Decode a plain-text (one source a line), TSV (id<TAB>source) or JSONL "
            '({"id": .., "source": .., optional decoding fields}) file into JSONL, one object per input, '
            "in input order. Rerun the same command after an interruption to resume."
        ),
    )
    add_model_option(p)
    p.add_argument("--input", required=True, help="input file: .jsonl, .tsv, or anything else as plain text")
    p.add_argument(
        "--output",
        type=output_file,
        required=True,
        help="output JSONL file (parts are kept in OUTPUT.parts/ until done)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="inputs decoded together")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, or auto")
    p.add_argument("--devices", default="1", help="number of devices, 'auto', or a list such as 0,1")
    p.add_argument("--num-nodes", type=int, default=1, help="number of machines")
    p.add_argument("--skip-bad-lines", action="store_true", help="record malformed lines in the output and go on")
    add_quantize_option(p)
    add_decoding_options(p)
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from serving.batch import GenerateJob, run_generate
    from serving.batch_input import input_format

    if input_format(Path(args.input)) != "jsonl":  # a JSONL line may choose another mode, with these as defaults
        refuse_unread_options(args)
    run_generate(
        GenerateJob(
            model=args.model,
            ensemble_averaging=ensemble_averaging(args),
            input=Path(args.input),
            output=Path(args.output),
            # Every option, also those --mode does not read: they are the defaults of lines in other modes.
            settings=from_dict(DecodingConfig, _decoding_options(args)),
            batch_size=args.batch_size,
            accelerator=args.accelerator,
            devices=args.devices,
            num_nodes=args.num_nodes,
            skip_bad_lines=args.skip_bad_lines,
            quantize=args.quantize,
        )
    )


# -- serve ---------------------------------------------------------------------------------------

# Options left out keep serving.config.ServeConfig's defaults (quoted in the help lines).
_SERVE_LIMITS = ("max_inputs", "max_input_length", "max_new_tokens", "max_beam_size", "max_return_sequences")


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP (POST /v1/generate, /health, /info, /metrics)",
        description="Serve a bundle over HTTP with dynamic batching; SIGTERM or Ctrl+C drains requests in flight.",
        argument_default=argparse.SUPPRESS,
    )
    add_model_option(p)
    p.add_argument("--host", help="address to listen on: 127.0.0.1 (default), 0.0.0.0 or ::")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--accelerator", help="auto (default: a GPU when there is one), cpu, cuda (or gpu) or mps")
    p.add_argument("--devices", help="number of devices, or auto (default: all of the accelerator's)")
    p.add_argument("--workers-per-device", type=int, help="inference processes per device (default 1, at most 256)")
    p.add_argument("--api-servers", type=int, help="HTTP processes (default: one per inference worker; at most 256)")
    p.add_argument("--max-batch-size", type=int, help="most inputs decoded together (default 64)")
    p.add_argument("--batch-timeout", type=float, help="seconds a batch waits to fill (default 0.005)")
    p.add_argument(
        "--max-queue", type=int, help="requests in the server at once; beyond it, 429 (default 256, at most 1,000,000)"
    )
    p.add_argument("--timeout", type=float, help="seconds a request may wait for a worker; beyond it, 504 (default 30)")
    p.add_argument("--deadline", type=float, help="seconds a request may take in all; beyond it, 504 (default 300)")
    p.add_argument(
        "--exit-when-stuck",
        type=float,
        help="seconds a worker may stay still before the server exits with status 1 (default: 3 deadlines; 0: never)",
    )
    p.add_argument("--max-body-bytes", type=int, help="largest request body; beyond it, 413 (default 1048576)")
    p.add_argument("--api-key-env", help="environment variable holding an API key; when set, /v1/* requires it")
    p.add_argument("--max-inputs", type=int, help="most inputs in one request (default 256)")
    p.add_argument("--max-input-length", type=int, help="most characters in one input (default 1024)")
    p.add_argument("--max-new-tokens", type=int, help="cap on max_new_tokens (default 256)")
    p.add_argument("--max-beam-size", type=int, help="cap on beam_size (default 16)")
    p.add_argument("--max-return-sequences", type=int, help="cap on num_return_sequences (default 16)")
    p.add_argument("--log-level", help="critical, error, warning, info (default) or debug")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from serving.config import ServeConfig
    from serving.schemas import Limits
    from serving.server import serve

    options = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    options["ensemble_averaging"] = ensemble_averaging(args)
    limits = Limits(**{k: options.pop(k) for k in _SERVE_LIMITS if k in options})
    if options.get("devices", "auto") != "auto":
        try:
            options["devices"] = int(options["devices"])
        except ValueError:
            raise ConfigurationError(f"--devices: must be 'auto' or a count; got {options['devices']!r}") from None
    serve(ServeConfig(**options, limits=limits))


# -- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrnn", description="Sequence generation with encoder–decoder RNNs.")
    # Options are spelled out: a prefix (--por for --port) would slip past the Docker entry
    # script's checks, and would mean another option once one with that prefix is added.
    whole_names = partial(argparse.ArgumentParser, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=whole_names)
    _train_parser(sub)
    _evaluate_parser(sub)
    _generate_parser(sub)
    _serve_parser(sub)
    return parser


def _after_stop(args: argparse.Namespace) -> str:
    """What to do after a signal stopped a verb that keeps its progress: how to go on."""
    if args.command == "generate":
        return "; rerun the same command to go on where it stopped"
    if args.command != "train":
        return ""
    from training.paths import last_checkpoint  # light: the run's imports may not have finished

    if args.output is None:  # stopped before its configuration was read: nothing had started
        return ""
    if last_checkpoint(args.output).is_file():
        return "; rerun it (without --no-resume) to go on from its last checkpoint"
    return "; it had saved no checkpoint yet, so a rerun starts afresh"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Killed outright, the first process of a distributed run can stop no other: they go too.
    die_with_the_launching_process()
    try:
        with sigterm_raises_terminated() if args.command in ("train", "generate") else nullcontext():
            args.run(args)
    except (GenrnnError, ConfigurationError) as error:
        # The first process tells the errors that every process of a distributed run meets. One it
        # started meets an error alone before the trainer runs: the first had got past the same
        # checks before starting it (an input file that grew in between, say).
        rank = process_rank()
        if rank == 0 or (started_by_the_first_process() and not error.in_trainer):
            print(f"genrnn {args.command}: error{f' (rank {rank})' if rank else ''}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a path, a permission, a full disk: one process's own, so every rank tells its own
        rank = process_rank()
        print(f"genrnn {args.command}: error{f' (rank {rank})' if rank else ''}: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:
        # The shell's statuses for a process that a signal ended: 128 + SIGINT (2) or SIGTERM (15).
        how, status = ("interrupted", 130) if isinstance(stop, KeyboardInterrupt) else ("terminated", 143)
        if is_rank_zero():
            print(f"genrnn {args.command}: {how}{_after_stop(args)}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
