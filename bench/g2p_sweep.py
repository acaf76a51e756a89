"""Several G2P benchmark configurations trained side by side on one machine, then decoded as ensembles.

    python bench/g2p_sweep.py --data-dir ../shared/data/cmudict-g014b2b --output runs/g014b2b-sweep \\
        [--max-time 00:00:05:00] [--only base,luong] [--config training/configs/g2p.yaml] [--train FILE]

Each variant is one ``bench/g2p_benchmark.py`` run (its own process, log and
results.json under the output directory); they share the machine's GPU, or its
cores. When all have finished, the students named in ``--only`` are trained:
each has one variant's configuration, starts from that variant's weights or from
scratch, and learns from the ensemble of every variant of the run (distillation:
their mixture, whatever ``--ensemble-averaging`` says), with its own budget; or,
with ``--teacher-table DIR``, from a table that an earlier sweep kept, without
any variant of this one. Then the ensembles named below are scored from the
variants' and students' bundles (those with the same members as one before them
are skipped), once for each ``--ensemble-averaging`` (one that
averages log-probabilities is named with ``-log-probabilities``), unless
``--no-ensembles`` says to score the variants alone; with
``--keep-teacher-table``, the variants' table is made meanwhile, in
``OUTPUT/teacher-table-run/teacher-table``, for the students of a later sweep.
With ``--train FILE`` (a distilled train file, ``bench/g2p_distill.py``) every
variant and student trains on it instead of the split's train file. With ``--go-on
TIME``, last, the variant best on dev goes on from its weights for that long at
``--go-on-lr`` (run ``VARIANT-on``): a rerun of a finished sweep with it trains that
alone.
``summary.json`` gathers every result and ``summary.md`` holds the table rows;
rerunning resumes unfinished runs and skips finished ones. A finished variant that
this call asks for otherwise (its configuration, ``--set``, budget, train file or
beam sizes) stops the call before anything starts; what was made from the variants
(ensembles, students, a run going on) is made again where asked for otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrnn.config import AVERAGINGS, DEFAULT_AVERAGING

BENCHMARK = Path(__file__).with_name("g2p_benchmark.py")
TABLE = "teacher-table-run"  # the run that makes the variants' table for later students

LUONG_DEEP = ["model.attention=luong", "model.encoder_layers=3", "model.encoder_hidden=512"]
BAHDANAU_DEEP = ["model.attention=bahdanau", "model.encoder_layers=3", "model.encoder_hidden=512"]
BASE_WIDE = ["model.encoder_hidden=512", "model.decoder_hidden=1024"]
BAHDANAU_WIDE = [*BAHDANAU_DEEP, "model.decoder_hidden=1024"]
NO_FEEDING = [*LUONG_DEEP, "model.input_feeding=false"]
MORE_DROPOUT = ["model.layer_dropout=0.3", "model.output_dropout=0.3"]  # g2p.yaml has 0.2
# annealed over the whole budget: early stopping would cut the schedule short
COSINE = ["training.schedule=cosine", "training.early_stopping_patience=1000"]
WEIGHT_DECAY = ["training.optimizer=adamw", "training.weight_decay=0.05"]  # g2p.yaml: adam, none
MORE_WEIGHT_DECAY = ["training.optimizer=adamw", "training.weight_decay=0.1"]
# name → config overrides on top of --config
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "base-seed7": ["training.seed=7"],
    "base-ema": ["training.ema_decay=0.999"],
    "base-wide": BASE_WIDE,
    "luong": ["model.attention=luong"],
    "luong-seed7": ["model.attention=luong", "training.seed=7"],
    "luong-deep": LUONG_DEEP,
    "bahdanau": ["model.attention=bahdanau"],
    # the next round: the best of the first on more seeds, with weight averaging, and regularised
    "luong-deep-seed7": [*LUONG_DEEP, "training.seed=7"],
    "luong-deep-seed11": [*LUONG_DEEP, "training.seed=11"],
    "luong-deep-ema": [*LUONG_DEEP, "training.ema_decay=0.999"],
    "luong-deep-batch8k": [*LUONG_DEEP, "data.max_tokens=8192"],  # half the steps an epoch: more epochs a minute?
    "bahdanau-deep": BAHDANAU_DEEP,
    "base-wide-dropout": [*BASE_WIDE, *MORE_DROPOUT],
    # the rate annealed to zero over the budget, where the plateau schedule cut it only once or twice
    "base-cosine": COSINE,
    "base-wide-cosine": [*BASE_WIDE, *COSINE],
    "luong-deep-cosine": [*LUONG_DEEP, *COSINE],
    "luong-deep-cosine-seed7": [*LUONG_DEEP, *COSINE, "training.seed=7"],
    "luong-deep-cosine-batch8k": [*LUONG_DEEP, *COSINE, "data.max_tokens=8192"],
    "bahdanau-deep-cosine": [*BAHDANAU_DEEP, *COSINE],
    # the single model that led the cosine round, on more seeds and with twice the batch
    "bahdanau-deep-seed7": [*BAHDANAU_DEEP, "training.seed=7"],
    "bahdanau-deep-cosine-seed7": [*BAHDANAU_DEEP, *COSINE, "training.seed=7"],
    "bahdanau-deep-cosine-seed11": [*BAHDANAU_DEEP, *COSINE, "training.seed=11"],
    "bahdanau-deep-cosine-batch8k": [*BAHDANAU_DEEP, *COSINE, "data.max_tokens=8192"],
    # the best single model with more dropout: its dev loss stopped falling halfway through its
    # 6.5 minutes while its training loss went on down
    "bahdanau-deep-cosine-dropout": [*BAHDANAU_DEEP, *COSINE, *MORE_DROPOUT],
    "bahdanau-deep-cosine-dropout-seed11": [*BAHDANAU_DEEP, *COSINE, *MORE_DROPOUT, "training.seed=11"],
    # more draws of the best single models, for dev to choose among and for a larger ensemble, and
    # Bahdanau with the wide decoder of base-wide
    "bahdanau-deep-cosine-seed13": [*BAHDANAU_DEEP, *COSINE, "training.seed=13"],
    # the weights' moving average, never measured on this split: the twin of the round of four's seed11
    "bahdanau-deep-cosine-ema-seed11": [*BAHDANAU_DEEP, *COSINE, "training.ema_decay=0.999", "training.seed=11"],
    # six independent draws at once, for a larger ensemble (with seed 7, 11 and 13 and the unseeded one)
    "bahdanau-deep-cosine-seed17": [*BAHDANAU_DEEP, *COSINE, "training.seed=17"],
    "bahdanau-deep-cosine-seed19": [*BAHDANAU_DEEP, *COSINE, "training.seed=19"],
    # decoupled weight decay on the weight matrices, for the single model whose dev loss stopped
    # falling a third of the way in: two draws, beside four without, in the round of six
    "bahdanau-deep-cosine-wd-seed17": [*BAHDANAU_DEEP, *COSINE, *WEIGHT_DECAY, "training.seed=17"],
    "bahdanau-deep-cosine-wd-seed19": [*BAHDANAU_DEEP, *COSINE, *WEIGHT_DECAY, "training.seed=19"],
    # the round after: the two -wd- draws led the six by 0.2 points of dev on average, so two more
    # draws of it and two at twice the rate, four at once
    "bahdanau-deep-cosine-wd-seed23": [*BAHDANAU_DEEP, *COSINE, *WEIGHT_DECAY, "training.seed=23"],
    "bahdanau-deep-cosine-wd-seed29": [*BAHDANAU_DEEP, *COSINE, *WEIGHT_DECAY, "training.seed=29"],
    "bahdanau-deep-cosine-wd2-seed31": [*BAHDANAU_DEEP, *COSINE, *MORE_WEIGHT_DECAY, "training.seed=31"],
    "bahdanau-deep-cosine-wd2-seed37": [*BAHDANAU_DEEP, *COSINE, *MORE_WEIGHT_DECAY, "training.seed=37"],
    "bahdanau-wide-cosine": [*BAHDANAU_WIDE, *COSINE],
    # the bottom decoder layer queries the attention: only it steps a token at a time in training
    "bahdanau-deep-bottom-cosine": [*BAHDANAU_DEEP, "model.attention_query=bottom", *COSINE],
    "bahdanau-wide-cosine-seed11": [*BAHDANAU_WIDE, *COSINE, "training.seed=11"],
    # Luong attention without input feeding: the decoder runs over the whole target at once in training
    "luong-deep-no-feeding": NO_FEEDING,
    "luong-deep-no-feeding-seed7": [*NO_FEEDING, "training.seed=7"],
    "luong-deep-no-feeding-cosine": [*NO_FEEDING, *COSINE],
    # ablations: each of g2p.yaml's defaults taken away, to check that it earns its place
    "base-no-smoothing": ["training.label_smoothing=0.0"],
    "base-no-dropout": ["model.embedding_dropout=0.0", "model.layer_dropout=0.0", "model.output_dropout=0.0"],
    "base-unidirectional": ["model.bidirectional=false", "model.encoder_hidden=512"],
    "base-last-state": ["model.bridge=last"],
    "base-constant-lr": ["training.schedule=constant"],
    # speed: bf16 autocast on a GPU, against base's steps in the same budget
    "base-bf16": ["training.precision=bf16-mixed"],
}


@dataclass(frozen=True)
class Student:
    """A variant's configuration taught by the run's variants: from that variant's weights, or from scratch."""

    variant: str
    overrides: tuple[str, ...]
    from_variant: bool = True


# Fine-tuned at a quarter of the rate, annealed to zero, on the reference and the teachers half and half.
DISTILLED = (*COSINE, "training.lr=0.0005", "training.distill_weight=0.5")
# From scratch at the variant's own rate: the teachers guide the whole run, not only its end.
TAUGHT = ("training.distill_weight=0.5",)
STUDENTS: dict[str, Student] = {
    "base-student": Student("base", DISTILLED),
    "bahdanau-deep-cosine-student": Student("bahdanau-deep-cosine", DISTILLED),
    "base-taught": Student("base", TAUGHT, from_variant=False),
    "base-wide-dropout-taught": Student("base-wide-dropout", TAUGHT, from_variant=False),
    "bahdanau-deep-cosine-taught": Student("bahdanau-deep-cosine", TAUGHT, from_variant=False),
    "bahdanau-deep-cosine-taught-seed11": Student("bahdanau-deep-cosine-seed11", TAUGHT, from_variant=False),
    "bahdanau-deep-cosine-taught-seed13": Student("bahdanau-deep-cosine-seed13", TAUGHT, from_variant=False),
    "bahdanau-deep-cosine-dropout-taught": Student("bahdanau-deep-cosine-dropout-seed11", TAUGHT, from_variant=False),
    "bahdanau-wide-cosine-taught": Student("bahdanau-wide-cosine", TAUGHT, from_variant=False),
    "bahdanau-wide-cosine-taught-seed11": Student("bahdanau-wide-cosine-seed11", TAUGHT, from_variant=False),
    "bahdanau-deep-bottom-cosine-taught": Student("bahdanau-deep-bottom-cosine", TAUGHT, from_variant=False),
    "luong-deep-no-feeding-cosine-taught": Student("luong-deep-no-feeding-cosine", TAUGHT, from_variant=False),
}
# name → the variants decoded together (those that finished)
ENSEMBLES: dict[str, tuple[str, ...]] = {
    "ensemble-no-attention": ("base", "base-seed7", "base-ema", "base-wide"),
    "ensemble-attention": ("luong", "luong-seed7", "luong-deep", "bahdanau"),
    "ensemble-luong-deep": ("luong-deep", "luong-deep-seed7", "luong-deep-seed11", "luong-deep-ema"),
    "ensemble-cosine-attention": ("luong-deep-cosine", "luong-deep-cosine-seed7", "bahdanau-deep-cosine"),
    "ensemble-bahdanau": tuple(name for name in VARIANTS if name.startswith("bahdanau-deep")),
    "ensemble-no-feeding": tuple(name for name in VARIANTS if "no-feeding" in name),
    "ensemble-cosine": tuple(name for name in VARIANTS if name.endswith("cosine") or "-cosine-" in name),
    "ensemble-all": tuple(VARIANTS),
    "ensemble-taught": tuple(name for name in STUDENTS if name.startswith("bahdanau") and "-taught" in name),
}


def launch(command: list[str], log: Path, threads: int) -> subprocess.Popen:
    """Start one benchmark process with its output in ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def benchmark_command(args: argparse.Namespace, run: Path, *extra: str) -> list[str]:
    command = [sys.executable, str(BENCHMARK), "--data-dir", args.data_dir, "--output", str(run)]
    return [*command, "--beam-size", str(args.beam_size), *extra]


def training_command(args: argparse.Namespace, run: Path, budget: str, sets: list[str]) -> list[str]:
    """The benchmark command that trains one variant or student, on ``--train`` if given."""
    train = ("--train", args.train) if args.train else ()
    return benchmark_command(
        args, run, "--config", args.config, "--max-time", budget, *train, *(f"--set={s}" for s in sets)
    )


def run_all(jobs: dict[str, list[str]], output: Path, threads: int) -> dict[str, int]:
    """Run the jobs side by side (skipping those with results); each one's exit status."""
    running = {}
    for name, command in jobs.items():
        if (output / name / "results.json").is_file():
            continue
        print(f"start {name}: {' '.join(command)}", flush=True)
        running[name] = launch(command, output / f"{name}.log", threads)
    status = {name: process.wait() for name, process in running.items()}
    for name, code in status.items():
        print(f"{name}: exit {code}" + ("" if code == 0 else f" (see {output / f'{name}.log'})"), flush=True)
    return status


def asked_of(args: argparse.Namespace, budget: str, sets: list[str]) -> dict[str, Any]:
    """What this call asks of a run it trains, as :func:`differences` compares it with a finished one."""
    train = str(args.train or Path(args.data_dir) / "g014b2b.train")  # as the benchmark names it
    return {"config": args.config, "overrides": sets, "max_time": budget, "train": train, **scored_as(args)}


def scored_as(args: argparse.Namespace) -> dict[str, Any]:
    """How this call asks every run to be scored: the beam sizes that dev chooses among."""
    from g2p_benchmark import beam_sizes  # this script's neighbour; here, as it imports torch

    return {"beam sizes": list(beam_sizes(args.beam_size))}


def differences(run: Path, asked: dict[str, Any]) -> list[str]:
    """How the finished run's settings differ from those ``asked`` (none where it has not finished)."""
    path = run / "results.json"
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    tried = [*results["scores"], *results.get("dev_only", {})]
    recorded = {"beam sizes": sorted(int(mode.removeprefix("beam")) for mode in tried if mode != "greedy")}
    if results["training"]:  # an ensemble's has none: its members trained
        config = results["training"]["config"]
        recorded |= {"config": results["config"], "overrides": results["overrides"]}
        recorded |= {"max_time": config["training"]["max_time"], "train": config["data"]["train"]}
    else:
        recorded |= {"config": results["config"], "averaging": results.get("averaging", DEFAULT_AVERAGING)}
    return [f"{key} {recorded[key]}, asked {value}" for key, value in asked.items() if recorded[key] != value]


def forget_if_made_otherwise(run: Path, asked: dict[str, Any]) -> None:
    """Drop a finished run made from the variants (an ensemble, a student, a run going on) that this call
    asks for otherwise, so that it is made again.

    Its variants' paths are among its settings, not their weights: after a variant is removed and
    trained again, remove what was made from it too.
    """
    if differences(run, asked):
        shutil.rmtree(run)


def refuse_if_trained_otherwise(run: Path, asked: dict[str, Any]) -> None:
    """Stop where a variant finished with other settings than this call asks: its figures are not this call's."""
    found = differences(run, asked)
    if found:
        raise SystemExit(
            f"{run} holds a run trained or scored otherwise ({'; '.join(found)}): use another --output, "
            "or remove it to train it again"
        )


def chosen_decoding(results: dict) -> str:
    """The decoding that dev chose for a run."""
    chosen = results.get("dev_choice")
    if chosen is None:  # results from before the key: chosen as the benchmark chooses
        from g2p_benchmark import dev_choice  # this script's neighbour; here, as it imports torch

        chosen = dev_choice(results["scores"])
    return chosen


def dev_wer(run: Path) -> float:
    """The dev WER of a finished run, decoded as dev chose."""
    results = json.loads((run / "results.json").read_text())
    return results["scores"][chosen_decoding(results)]["dev"]["wer"]


def go_on_job(args: argparse.Namespace, trained: list[str], output: Path) -> dict[str, list[str]]:
    """The variant best on dev, going on from its weights at ``--go-on-lr`` for ``--go-on``: its run's command."""
    best = min(trained, key=lambda name: dev_wer(output / name))
    start = str(output / best / "bundle")
    sets = [*args.set, *VARIANTS[best], f"training.init_from={start}", f"training.lr={args.go_on_lr}"]
    print(f"{best} is best on dev ({dev_wer(output / best):.2%}): it goes on", flush=True)
    run = output / f"{best}-on"
    forget_if_made_otherwise(run, asked_of(args, args.go_on, sets))
    return {run.name: training_command(args, run, args.go_on, sets)}


def write_summary(output: Path, names: list[str]) -> None:
    """summary.json and summary.md: the named runs' results, those that have finished."""
    summary, rows = {}, []
    for name in names:
        path = output / name / "results.json"
        if not path.is_file():
            continue
        results = summary[name] = json.loads(path.read_text())
        steps = results["training"].get("steps", "")
        chosen = chosen_decoding(results)
        for mode, scores in results["scores"].items():
            mark = "**" if mode == chosen else ""  # dev's choice, and what it reports
            rows.append(
                f"| {name} | {mark}{mode}{mark} | {scores['dev']['wer']:.2%} | "
                f"{mark}{scores['test']['wer']:.2%}{mark} | {mark}{scores['test']['per']:.2%}{mark} | "
                f"{results['parameters']:,} | {steps} | "
                f"{results['training_seconds'] / 60:.1f} min | {results['device']} |"
            )
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = "| run | decoding | dev WER | test WER | test PER | parameters | steps | training | device |"
    table = "\n".join([header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |", *rows])
    (output / "summary.md").write_text(table + "\n")


def teachers_of(args: argparse.Namespace, trained: list[str], output: Path) -> str:
    """``training.teacher`` for this run's students: the table given, else every trained variant's bundle."""
    return args.teacher_table or ",".join(str(output / name / "bundle") for name in trained)


def table_job(args: argparse.Namespace, trained: list[str], output: Path) -> list[str]:
    """A one-step training run taught by the variants, for the table of their mixture that it keeps."""
    command = [sys.executable, "-m", "genrnn.cli", "train", "--config", args.config, "--output", str(output / TABLE)]
    train = args.train or str(Path(args.data_dir) / "g014b2b.train")
    command += ["--train", train, "--max-steps", "1"]  # dev held out by hash
    return [*command, *(f"--set={s}" for s in args.set), f"--set=training.teacher={teachers_of(args, trained, output)}"]


def student_jobs(args: argparse.Namespace, names: list[str], trained: list[str], output: Path) -> dict:
    """The students' benchmark commands: each is taught by all the trained variants, or by the table given."""
    jobs = {}
    teachers = teachers_of(args, trained, output)
    if not teachers:
        print(f"skip {', '.join(names)}: no variant of this run has finished to teach them", flush=True)
        return jobs
    for name in names:
        student = STUDENTS[name]
        sets = [*args.set, *VARIANTS[student.variant], *student.overrides, f"training.teacher={teachers}"]
        if student.from_variant:
            if student.variant not in trained:
                missing = f"its starting point {student.variant} is not among this run's finished variants"
                print(f"skip {name}: {missing}", flush=True)
                continue
            sets.append(f"training.init_from={output / student.variant / 'bundle'}")
        budget = args.student_time or args.max_time
        forget_if_made_otherwise(output / name, asked_of(args, budget, sets))
        jobs[name] = training_command(args, output / name, budget, sets)
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output", default="runs/g014b2b-sweep")
    parser.add_argument("--config", default="training/configs/g2p.yaml")
    parser.add_argument("--max-time", default="00:00:05:00", help="training budget of each variant, DD:HH:MM:SS")
    parser.add_argument("--only", help="comma-separated variant and student names (default: all variants)")
    parser.add_argument("--student-time", help="training budget of each student, DD:HH:MM:SS (default: --max-time)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    parser.add_argument("--train", help="train every variant and student on this file (its dev lines kept)")
    parser.add_argument("--beam-size", default="4,8", help="beam sizes each run tries on dev, comma-separated")
    parser.add_argument(
        "--ensemble-averaging",
        default=DEFAULT_AVERAGING,
        help=f"what the ensembles average, comma-separated to score each way: {', '.join(AVERAGINGS)}",
    )
    parser.add_argument(
        "--no-ensembles", dest="ensembles", action="store_false", help="score no ensemble: the variants alone"
    )
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: cores / variants)")
    parser.add_argument("--teacher-table", help="a kept teacher table that teaches the students instead")
    parser.add_argument("--go-on", metavar="DD:HH:MM:SS", help="then the variant best on dev goes on for this long")
    parser.add_argument("--go-on-lr", type=float, default=0.0005, help="its learning rate (default 0.0005)")
    parser.add_argument(
        "--keep-teacher-table", action="store_true", help=f"make the variants' table in OUTPUT/{TABLE}/teacher-table"
    )
    args = parser.parse_args()

    chosen = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(chosen) - set(VARIANTS) - set(STUDENTS))
    if unknown:
        parser.error(f"unknown names {unknown}; variants: {', '.join(VARIANTS)}; students: {', '.join(STUDENTS)}")
    if args.keep_teacher_table and args.teacher_table:
        parser.error("--keep-teacher-table keeps the variants' table; with --teacher-table none is made")
    try:
        from g2p_benchmark import beam_sizes  # this script's neighbour; here, as it imports torch

        beam_sizes(args.beam_size)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--beam-size: {error}")
    averagings = args.ensemble_averaging.split(",")
    if set(averagings) - set(AVERAGINGS):
        parser.error(f"--ensemble-averaging: each must be one of {', '.join(AVERAGINGS)}")
    names = [name for name in chosen if name in VARIANTS]
    students = [name for name in chosen if name in STUDENTS]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, len(names)))

    sets = {name: [*args.set, *VARIANTS[name]] for name in names}
    for name in names:  # before anything starts
        refuse_if_trained_otherwise(output / name, asked_of(args, args.max_time, sets[name]))
    training = {name: training_command(args, output / name, args.max_time, sets[name]) for name in names}
    status = run_all(training, output, threads)
    trained = [name for name in names if status.get(name, 0) == 0 and (output / name / "results.json").is_file()]
    write_summary(output, names)  # the single models' figures, should the rest not finish
    if students:
        status = run_all(student_jobs(args, students, trained, output), output, threads)
        students = [
            name for name in students if (output / name / "results.json").is_file() and status.get(name, 0) == 0
        ]
        write_summary(output, [*names, *students])

    ensembles, scored = {}, {}  # scored: each set of members → the first ensemble that has it
    for name, members in ENSEMBLES.items() if args.ensembles else ():
        present = [m for m in members if m in trained or m in students]
        if len(present) > 1:
            bundles = ",".join(str(output / m / "bundle") for m in present)
            members_key = ",".join(sorted(present))
            if members_key in scored:  # the same models decode to the same figures: score them once
                print(f"skip {name}: the same members as {scored[members_key]}", flush=True)
                continue
            scored[members_key] = name
            for averaging in averagings:
                run = name if averaging == DEFAULT_AVERAGING else f"{name}-{averaging}"
                asked = {"config": bundles, "averaging": averaging, **scored_as(args)}
                forget_if_made_otherwise(output / run, asked)
                ensembles[run] = benchmark_command(
                    args, output / run, "--model", bundles, "--ensemble-averaging", averaging
                )
    table = {TABLE: table_job(args, trained, output)} if args.keep_teacher_table and trained else {}
    run_all({**ensembles, **table}, output, threads)
    going_on = go_on_job(args, trained, output) if args.go_on and trained else {}
    run_all(going_on, output, args.threads or os.cpu_count() or 1)  # alone on the machine

    write_summary(output, [*names, *students, *ensembles, *going_on])  # ensembles of this run's variants only
    print((output / "summary.md").read_text())


if __name__ == "__main__":
    main()
