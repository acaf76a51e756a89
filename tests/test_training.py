"""Training for real: convergence, the command line end to end, resuming, and DDP."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path

import pytest

from genrnn.bundle import load_bundle
from genrnn.cli import main
from genrnn.config import DataConfig, DecodingConfig, ExperimentConfig, TokenizerConfig, from_dict
from genrnn.data import Example, PairDataset, TokenBudgetBatchSampler, read_examples
from genrnn.decoding import Generator
from genrnn.evaluation import best_outputs
from genrnn.metrics import ErrorCounts, error_counts, score
from genrnn.tokenizer import train_tokenizers
from tests.conftest import TINY_CONFIG, interruptible, signal_when
from training.datamodule import PairDataModule, ResumableLoader, spread
from training.resume import CheckpointBeside, ResumePoint
from training.train import cpu_runs_recurrent_at

GENRNN = [sys.executable, "-m", "genrnn.cli"]


def reversal_file(path: Path, count: int, seed: int) -> Path:
    """Random letter strings and their reversals, one pair a line: ``abc<TAB>c b a``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 7)))
        lines.append(f"{word}\t{' '.join(reversed(word))}\n")
    path.write_text("".join(lines))
    return path


def reversal_config(train: Path, valid: Path, **training) -> ExperimentConfig:
    """A small model for the reversal task; ``training`` overrides the training section."""
    return from_dict(
        ExperimentConfig,
        {
            "name": "reverse",
            "model": {
                "embedding_dim": 32,
                "encoder_hidden": 64,
                "encoder_layers": 1,
                "decoder_hidden": 128,
                "decoder_layers": 1,
                "embedding_dropout": 0.0,
                "layer_dropout": 0.0,
                "output_dropout": 0.0,
            },
            "tokenizer": {"source_type": "char", "target_type": "word"},
            "data": {"train": str(train), "valid": str(valid), "max_tokens": 512},
            # Seconds on an idle 2-core CPU; dev accuracy swings between epochs and the best is kept.
            "training": {
                "lr": 0.01,
                "max_epochs": 25,
                "max_time": "00:00:08:00",
                "accelerator": "cpu",
                "early_stopping_patience": 50,
                **training,
            },
        },
    )


def held_out_accuracy(bundle_path: Path, examples) -> float:
    """Greedy sequence accuracy of a bundle on examples."""
    bundle = load_bundle(bundle_path)
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    outputs = generator.generate_sorted([e.source for e in examples], DecodingConfig(max_new_tokens=16))
    return score([o.candidates[0].text for o in outputs], [e.targets for e in examples]).sequence_accuracy


@pytest.fixture(scope="module")
def reversal(tmp_path_factory) -> dict[str, Path]:
    """The reversal task's files and a bundle trained on it."""
    from training.train import train

    directory = tmp_path_factory.mktemp("reversal")
    files = {
        "train": reversal_file(directory / "train.tsv", 4000, 1),
        "dev": reversal_file(directory / "dev.tsv", 200, 2),
        "test": reversal_file(directory / "test.tsv", 300, 3),
    }
    return {**files, "bundle": train(reversal_config(files["train"], files["dev"]), directory / "run")}


def test_a_tiny_model_learns_to_reverse_strings(reversal):
    assert held_out_accuracy(reversal["bundle"], read_examples(reversal["test"])) >= 0.9


def test_a_student_follows_its_teacher_where_the_references_are_noisy(reversal, tmp_path):
    """Half the references are copies instead of reversals; the teacher learned clean reversals.

    On the references alone a model cannot tell which of the two to start with; with
    the whole weight on the teacher, the student reverses as the teacher does.
    """
    from training.train import train

    noisy = tmp_path / "noisy.tsv"
    examples = read_examples(reversal["train"])
    noisy.write_text(
        "".join(f"{e.source}\t{' '.join(e.source) if i % 2 else e.targets[0]}\n" for i, e in enumerate(examples))
    )
    config = reversal_config(noisy, reversal["dev"], teacher=str(reversal["bundle"]), distill_weight=1.0, max_epochs=20)
    student = train(config, tmp_path / "student")
    assert held_out_accuracy(student, read_examples(reversal["test"])) >= 0.8


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``genrnn ARGS…``: its status and output.

    In this process, through the command line's own ``main``: a process of its own spends
    seconds importing. A launch on several processes runs its command line again, and a
    changed environment or directory is a process's own, so those get one.
    """
    if kwargs or launches_processes(args):
        result = subprocess.run([*GENRNN, *args], capture_output=True, text=True, timeout=300, **kwargs)
    else:
        stdout, stderr, ctrl_c = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGINT)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(list(args))
        assert signal.getsignal(signal.SIGINT) is ctrl_c, "a run left its Ctrl+C handler behind"
        result = subprocess.CompletedProcess(["genrnn", *args], status, stdout.getvalue(), stderr.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"genrnn {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def launches_processes(args: tuple[str, ...]) -> bool:
    """Whether ``genrnn`` with these arguments starts processes of its own (``--devices N``)."""
    return "--devices" in args and args[args.index("--devices") + 1] != "1"


def tiny_train(g2p_files, output, *options: str, train: str = "train") -> list[str]:
    """``genrnn train`` arguments: the tiny config on the G2P slice, on the CPU."""
    return [
        "train",
        "--config",
        str(TINY_CONFIG),
        "--train",
        str(g2p_files[train]),
        "--valid",
        str(g2p_files["dev"]),
        "--output",
        str(output),
        "--accelerator",
        "cpu",
        *options,
    ]


def test_train_then_evaluate_from_the_command_line(g2p_files, tmp_path):
    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "2"))
    manifest = json.loads((run / "bundle" / "genrnn.json").read_text())
    assert manifest["training"]["epochs"] == 2 and manifest["training"]["steps"] > 0
    assert (run / "logs").is_dir() and (run / "tensorboard").is_dir() and (run / "checkpoints" / "last.ckpt").is_file()

    out = tmp_path / "scores.json"
    result = run_cli("evaluate", "--model", str(run / "bundle"), "--data", str(g2p_files["test"]), "--output", str(out))
    scores = json.loads(out.read_text())
    assert set(scores) == {"wer", "per", "sequence_accuracy", "items", "bleu", "chrf"}
    assert scores["items"] == len(g2p_files["test"].read_text().splitlines())
    assert 0.0 <= scores["wer"] <= 1.0 and scores["wer"] == pytest.approx(1 - scores["sequence_accuracy"])
    assert "WER" in result.stdout and "PER" in result.stdout


def training_loader(lengths: list[int], seed: int = 7) -> ResumableLoader:
    """The training loader over a dataset of plain indices, batched as the trainer batches."""
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=60, seed=seed)
    return ResumableLoader(list(range(len(lengths))), batch_sampler=sampler, collate_fn=list)


def test_the_training_loader_resumes_at_the_first_batch_it_had_not_served():
    lengths = [random.Random(i).randint(1, 12) for i in range(200)]
    before = training_loader(lengths)
    before.batch_sampler.set_epoch(3)
    epoch = list(before)
    served = iter(before)
    for _ in range(5):
        next(served)
    state = before.state_dict()
    assert state == {"epoch": 3, "served": 5}

    after = training_loader(lengths)  # a new process: the state comes from the checkpoint
    after.load_state_dict(state)
    after.batch_sampler.set_epoch(3)  # as Lightning does before each epoch
    assert list(after) == epoch[5:]
    assert after.state_dict() == {"epoch": 3, "served": len(epoch)}
    assert list(after) == epoch  # the skip applies to one pass only

    ended = training_loader(lengths)
    ended.load_state_dict({"epoch": 3, "served": len(epoch)})
    ended.batch_sampler.set_epoch(4)  # a run saved at an epoch end goes on with the whole next epoch
    following = training_loader(lengths)
    following.batch_sampler.set_epoch(4)
    assert list(ended) == list(following)


# Runs `genrnn train ARGS…` and dies as a kill would (no cleanup): as training starts (STEP -1), or
# once it has saved a resume point at global step STEP or later.
DIE_DURING_TRAINING = """
import os, sys
from genrnn.cli import main
from training.resume import ResumePoint
step = int(sys.argv[1])
def die(*args):
    os._exit(9)
def save_then_die(self, trainer, save=ResumePoint._save):
    save(self, trainer)
    if trainer.global_step >= step:
        die()
if step < 0:
    ResumePoint.on_train_start = die
else:
    ResumePoint._save = save_then_die
main(sys.argv[2:])
"""


def train_until_killed(step: int, args: list[str], scratch: Path) -> None:
    # A script file, not -c: a distributed launch starts its other processes by running it again.
    driver = scratch / "die_during_training.py"
    driver.write_text(DIE_DURING_TRAINING)
    killed = subprocess.run([sys.executable, str(driver), str(step), *args], capture_output=True, timeout=300)
    assert killed.returncode == 9, killed.stderr.decode()[-3000:]


def resume_points(args: list[str], monkeypatch) -> tuple[list[int], str]:
    """The steps at which ``genrnn train ARGS…`` wrote its resume point, and its output."""
    steps = []

    def save_and_note(self, trainer, save=ResumePoint._save):
        save(self, trainer)
        steps.append(trainer.global_step)

    with monkeypatch.context() as patched:
        patched.setattr(ResumePoint, "_save", save_and_note)
        return steps, run_cli(*args).stdout


# Ends by early stopping: at a constant, high rate, the dev WER soon stops improving.
STOPS_EARLY = ("--max-epochs", "40", "--set", "training.early_stopping_patience=1")
STOPS_EARLY += ("--set", "training.schedule=constant", "--set", "training.lr=0.05")


@pytest.mark.parametrize(
    "minutes,options",
    [
        ("10", ("--max-epochs", "3")),
        ("0", ("--max-epochs", "3")),
        ("0", ("--max-epochs", "3", "--max-steps", "100000")),  # Lightning resumes step budgets otherwise
        ("10", STOPS_EARLY),
    ],
    ids=[
        "every 10 minutes",
        "every epoch end",
        "every epoch end, with a step budget",
        "every 10 minutes, stopping early",
    ],
)
def test_the_resume_point_is_written_when_due_and_when_training_ends(
    g2p_files, tmp_path, monkeypatch, minutes, options
):
    args = tiny_train(g2p_files, tmp_path / "run", *options, "--set", f"training.checkpoint_minutes={minutes}")
    steps, _ = resume_points(args, monkeypatch)
    trained = json.loads((tmp_path / "run" / "bundle" / "genrnn.json").read_text())["training"]
    if minutes == "0":  # at every epoch end, the last one included, and only there
        assert steps == [trained["steps"] // 3, 2 * trained["steps"] // 3, trained["steps"]]
    else:  # ten minutes never passed: once, as training ended
        assert steps == [trained["steps"]] and trained["epochs"] < 39
    steps, output = resume_points(args, monkeypatch)  # the finished run, run again
    assert "resuming from" in output and steps == []


def test_a_finished_run_given_more_epochs_goes_on_as_an_unbroken_run_with_weight_averaging(g2p_files, tmp_path):
    import torch

    # Weight averaging puts the averaged weights in place of the trained ones as training ends:
    # the resume point must hold the trained ones, or the longer run would go on from the average.
    options = ("--set", "training.ema_decay=0.9", "--set", "model.output_dropout=0.3")
    run_cli(*tiny_train(g2p_files, tmp_path / "unbroken", "--max-epochs", "3", *options))
    run_cli(*tiny_train(g2p_files, tmp_path / "run", "--max-epochs", "2", *options))
    run_cli(*tiny_train(g2p_files, tmp_path / "run", "--max-epochs", "3", *options))
    unbroken, resumed = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("unbroken", "run")
    )
    for key in ("state_dict", "current_model_state"):  # the average, and the trained weights
        for name, tensor in unbroken[key].items():
            torch.testing.assert_close(resumed[key][name], tensor, msg=lambda m, at=f"{key} {name}": f"{at}: {m}")
    # under Lightning's own key, which resume points saved by Lightning's class hold
    assert resumed["callbacks"]["EMAWeightAveraging"] == unbroken["callbacks"]["EMAWeightAveraging"]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_as_an_unbroken_run(g2p_files, tmp_path, processes):
    import torch

    # Dropout draws from the generators (each process its own); every validation halves the
    # rate (patience 0) and comes halfway through an epoch; a resume point is due after every batch.
    options = ("--devices", str(processes), "--strategy", "ddp" if processes > 1 else "auto")
    options += ("--max-epochs", "3", "--set", "training.checkpoint_minutes=0.00001")
    options += ("--set", "model.output_dropout=0.3", "--set", "model.embedding_dropout=0.1")
    options += ("--set", "training.val_check_interval=0.5", "--set", "training.plateau_patience=0")
    fresh_run, run = tmp_path / "fresh", tmp_path / "run"
    run_cli(*tiny_train(g2p_files, fresh_run, *options))
    fresh = json.loads((fresh_run / "bundle" / "genrnn.json").read_text())["training"]
    steps_per_epoch = fresh["steps"] // fresh["epochs"]

    # The kill comes at the second epoch's first validation: its batch must not be the one saved.
    validating_step = steps_per_epoch + steps_per_epoch // 2
    args = tiny_train(g2p_files, run, *options)
    train_until_killed(validating_step, args, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert killed_at == validating_step + 1, "the resume point comes one batch after the validating one"
    assert not (run / "bundle" / "genrnn.json").exists()

    result = run_cli(*args)
    assert "resuming from" in result.stdout
    resumed = json.loads((run / "bundle" / "genrnn.json").read_text())["training"]
    assert resumed["steps"] == fresh["steps"] and resumed["epochs"] == fresh["epochs"] == 3
    # Every batch was trained on once, in the same order, with the same dropout masks, and
    # every validation ran: the rate and the final weights agree.
    final = torch.load(last, map_location="cpu", weights_only=False)
    fresh_final = torch.load(fresh_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["lr_schedulers"] == fresh_final["lr_schedulers"]
    for name, tensor in fresh_final["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("signum", "status", "how"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_stops_a_run_as_such_and_the_same_command_resumes(g2p_files, tmp_path, signum, status, how):
    """Ctrl+C (SIGINT) and SIGTERM: the shell's statuses and a hint, where Lightning exited 1 and 0."""
    saving = ("--set", "training.checkpoint_minutes=0.00001")  # a resume point after every batch
    args = tiny_train(g2p_files, tmp_path / "run", *saving, "--max-epochs", "50")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run = interruptible([*GENRNN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = signal_when(run, last.is_file, signum, "a resume point")

    assert run.returncode == status, stderr[-2000:]
    assert f"genrnn train: {how}; rerun it (without --no-resume) to go on from its last checkpoint" in stderr
    resumed = run_cli(*args, "--max-epochs", "1")  # the last budget given counts: end soon
    assert "resuming from" in resumed.stdout


def test_sigterm_to_every_process_with_loader_workers_saves_and_stops(g2p_files, tmp_path):
    """systemd or a batch scheduler signals the whole process group: the workers leave it to the run."""
    options = ("--set", "training.checkpoint_minutes=0.00001", "--set", "data.num_workers=2", "--max-epochs", "50")
    args = tiny_train(g2p_files, tmp_path / "run", *options)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run = subprocess.Popen(
        [*GENRNN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    stderr = signal_when(run, last.is_file, signal.SIGTERM, "a resume point", group=True)

    assert run.returncode == 143, stderr[-2000:]
    assert "genrnn train: terminated; rerun it (without --no-resume) to go on from its last checkpoint" in stderr
    resumed = run_cli(*args, "--max-epochs", "1")  # the last budget given counts: end soon
    assert "resuming from" in resumed.stdout


# Runs `genrnn train ARGS…`, which presses Ctrl+C on itself as global step 3 starts, where the
# KeyboardInterrupt is swallowed, as a finalizer running there would swallow it.
CTRL_C_SWALLOWED = """
import os, signal, sys, time
from genrnn.cli import main
from training.resume import ResumePoint
def press_ctrl_c(self, trainer, *args):
    if trainer.global_step == 3:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        except KeyboardInterrupt:
            print("swallowed", file=sys.stderr)
ResumePoint.on_train_batch_start = press_ctrl_c
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_before_the_first_resume_point_stops_even_where_swallowed_and_says_a_rerun_starts_afresh(
    g2p_files, tmp_path
):
    # small batches, many epochs: the first resume point (10 minutes, or the end) is far off
    args = tiny_train(g2p_files, tmp_path / "run", "--max-epochs", "50", "--max-tokens", "64")
    command = [sys.executable, "-c", CTRL_C_SWALLOWED, *args]
    run = interruptible(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = run.communicate(timeout=300)[1]

    assert run.returncode == 130, stderr[-2000:]
    assert "swallowed" in stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert "genrnn train: interrupted; it had saved no checkpoint yet, so a rerun starts afresh" in stderr


# Runs `genrnn train ARGS…`, whose first process sends itself SIGTERM, as docker stop would, as
# global step STEP ends (WHEN "batch"; exit 3 unless that batch validates as VALIDATES says), in
# the first batch of the validation after it (WHEN "validation"), or as training starts (WHEN "start").
TERMINATE_DURING_TRAINING = """
import os, signal, sys
from genrnn.cli import main
from training.resume import ResumePoint, validates_after_this_batch
step, when, validates = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "validates"
batch_end, validation_batch_end = ResumePoint.on_train_batch_end, ResumePoint.on_validation_batch_end
sent = False
def terminate_once(trainer):
    global sent
    if trainer.global_step == step and trainer.global_rank == 0 and not sent:
        sent = True
        os.kill(os.getpid(), signal.SIGTERM)
def terminate_at(self, trainer, *args):
    if when == "batch" and trainer.global_step == step:
        if validates_after_this_batch(trainer) != validates:
            os._exit(3)
        terminate_once(trainer)
    batch_end(self, trainer, *args)
def terminate_in_validation(self, trainer, *args):
    if when == "validation":
        terminate_once(trainer)
    validation_batch_end(self, trainer, *args)
train_start = ResumePoint.on_train_start
def terminate_at_start(self, trainer, *args):
    if when == "start":
        terminate_once(trainer)
    train_start(self, trainer, *args)
ResumePoint.on_train_batch_end = terminate_at
ResumePoint.on_validation_batch_end = terminate_in_validation
ResumePoint.on_train_start = terminate_at_start
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def unbroken_runs(g2p_files, tmp_path_factory) -> Callable[[str, int], tuple[list[str], dict, dict]]:
    """Two epochs without timed saves, validated as often and on as many processes as asked:
    the options, the run's training record, its last checkpoint."""
    import torch

    runs = {}

    def unbroken_run(val_check_interval: str, processes: int) -> tuple[list[str], dict, dict]:
        if (val_check_interval, processes) not in runs:
            options = ["--max-epochs", "2", "--set", "training.checkpoint_minutes=0"]
            options += ["--set", "model.output_dropout=0.3"]
            options += ["--set", f"training.val_check_interval={val_check_interval}"]
            options += ["--devices", str(processes), "--strategy", "ddp" if processes > 1 else "auto"]
            run = tmp_path_factory.mktemp("unbroken")
            run_cli(*tiny_train(g2p_files, run, *options))
            record = json.loads((run / "bundle" / "genrnn.json").read_text())["training"]
            last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            runs[val_check_interval, processes] = options, record, last
        return runs[val_check_interval, processes]

    return unbroken_run


@pytest.mark.parametrize(
    ("where", "when", "saved_after", "processes"),
    [
        ("the start of training", "start", 1, 1),  # saved as the first batch ends
        ("the third batch of the second epoch", "batch", 0, 1),
        ("the batch before a mid-epoch validation", "batch", 1, 1),  # saved as the next batch ends
        ("the first batch of that validation", "validation", 1, 1),
        ("the last batch of the first epoch, which validates", "batch", 0, 1),  # saved as the epoch ends
        # the first of two processes alone gets the signal: both save, both stop
        ("the third batch of the second epoch", "batch", 0, 2),
        ("the batch before a mid-epoch validation", "batch", 1, 2),
    ],
)
def test_a_run_stopped_by_sigterm_saves_as_it_stops_and_resumes_to_an_unbroken_runs_weights(
    g2p_files, tmp_path, unbroken_runs, where, when, saved_after, processes
):
    import torch

    # validated at the epoch's end only, or also halfway through it
    options, record, fresh_final = unbroken_runs("1.0" if "last batch" in where else "0.5", processes)
    per_epoch = record["steps"] // record["epochs"]
    step, validates = {
        "the start of training": (0, False),
        "the third batch of the second epoch": (per_epoch + 3, False),
        "the batch before a mid-epoch validation": (per_epoch + int(per_epoch * 0.5), True),
        "the first batch of that validation": (per_epoch + int(per_epoch * 0.5), True),
        "the last batch of the first epoch, which validates": (per_epoch, True),
    }[where]

    driver = tmp_path / "terminate_during_training.py"
    driver.write_text(TERMINATE_DURING_TRAINING)
    args = tiny_train(g2p_files, tmp_path / "run", *options)
    command = [sys.executable, str(driver), str(step), when, "validates" if validates else "-", *args]
    stopped = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step + saved_after

    run_cli(*args)
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == fresh_final["global_step"]
    for name, tensor in fresh_final["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    # the plateau schedule too: it saw every validation, once
    assert final["lr_schedulers"] == fresh_final["lr_schedulers"]


# Spends the whole time budget once training has taken `step` steps: Lightning's own timer stops the run.
SPEND_THE_BUDGET_AT_STEP = """
import sys
from pytorch_lightning.callbacks import Timer
from genrnn.cli import main
step = int(sys.argv[1])
check = Timer._check_time_remaining
def spent_at_step(self, trainer):
    if trainer.global_step >= step:
        self._offset = self._duration
    check(self, trainer)
Timer._check_time_remaining = spent_at_step
sys.exit(main(sys.argv[2:]))
"""


# Given more time, the run resumes as Lightning resumes epoch budgets (a step budget given
# up resumes so too); given more steps, as it resumes step budgets.
@pytest.mark.parametrize("budget", ["time", "steps"])
@pytest.mark.parametrize(
    ("where", "val_check_interval"),
    [
        ("the third batch of the second epoch", "1.0"),
        ("the batch of a mid-epoch validation", "0.5"),
        ("the last batch of the first epoch", "1.0"),
        ("the last batch of the first epoch", "0.5"),  # which does not validate: 19 and 38 of 39 do
    ],
)
def test_a_run_stopped_by_its_budget_given_more_goes_on_as_an_unbroken_run(
    g2p_files, tmp_path, unbroken_runs, where, val_check_interval, budget
):
    import torch

    options, record, fresh_final = unbroken_runs(val_check_interval, 1)
    per_epoch = record["steps"] // record["epochs"]
    step = {
        "the third batch of the second epoch": per_epoch + 3,
        "the batch of a mid-epoch validation": per_epoch + int(per_epoch * 0.5),
        "the last batch of the first epoch": per_epoch,
    }[where]
    driver = tmp_path / "spend_the_budget.py"
    driver.write_text(SPEND_THE_BUDGET_AT_STEP)
    args = tiny_train(g2p_files, tmp_path / "run", *options)
    if budget == "time":
        command = [sys.executable, str(driver), str(step), *args, "--max-time", "01:00:00:00"]
        stopped = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
    else:
        run_cli(*args, "--max-steps", str(step))
    assert json.loads((tmp_path / "run" / "bundle" / "genrnn.json").read_text())["training"]["steps"] == step

    # on to the epochs' end: without the time budget, or with a step budget as large as they take
    resumed = run_cli(*args, *(["--max-steps", str(record["steps"])] if budget == "steps" else []))
    if step % per_epoch:  # resumed within the second epoch: the bar says so, as it would have at its start
        assert "Epoch 1: 100%" in resumed.stdout and f" {per_epoch}/{per_epoch} " in resumed.stdout
        assert not re.search(r"Training: \|\s*\| [1-9][0-9]*/\?", resumed.stdout)  # batches of an unnamed epoch
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (final["global_step"], final["epoch"]) == (fresh_final["global_step"], fresh_final["epoch"])
    for name, tensor in fresh_final["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    # The loggers' step, the schedule, and early stopping's count, which the validation that
    # Lightning adds as a time budget stops the run mid-epoch must not move.
    stepped = [c["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] for c in (final, fresh_final)]
    assert stepped[0] == stepped[1]
    assert final["lr_schedulers"] == fresh_final["lr_schedulers"]
    early_stopping = next(key for key in fresh_final["callbacks"] if key.startswith("EarlyStopping"))
    assert final["callbacks"][early_stopping] == fresh_final["callbacks"][early_stopping]


def test_no_resume_starts_without_the_old_checkpoints(g2p_files, tmp_path):
    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1"))
    # Started afresh on other data and killed before its first resume point; then run again.
    args = tiny_train(g2p_files, run, "--max-epochs", "1", train="dev")
    train_until_killed(-1, [*args, "--no-resume"], tmp_path)
    result = run_cli(*args)
    assert "resuming from" not in result.stdout  # the first run's checkpoint is gone
    steps = json.loads((run / "bundle" / "genrnn.json").read_text())["training"]["steps"]
    fresh = tmp_path / "fresh"
    run_cli(*tiny_train(g2p_files, fresh, "--max-epochs", "1", train="dev"))
    assert steps == json.loads((fresh / "bundle" / "genrnn.json").read_text())["training"]["steps"]


def test_checkpoints_are_written_beside_themselves_and_renamed_into_place(tmp_path, monkeypatch):
    import torch

    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a temporary directory on another file system than the run's")
    # TMPDIR on another file system, as a container's /tmp beside a mounted run directory:
    # a temporary file there cannot be renamed into place, only copied into the checkpoint itself.
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    path = tmp_path / "checkpoints" / "last.ckpt"
    CheckpointBeside().save_checkpoint({"step": 1}, path)
    first = path.stat().st_ino
    CheckpointBeside().save_checkpoint({"step": 2}, path)
    assert path.stat().st_ino != first  # a new file: a kill while it was written would have left the old one
    assert torch.load(path)["step"] == 2
    assert list(path.parent.iterdir()) == [path]


def test_a_resume_point_cut_short_is_refused_in_one_line(g2p_files, tmp_path):
    args = tiny_train(g2p_files, tmp_path / "run", "--max-epochs", "1")
    run_cli(*args)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a disk that filled up, say
    result = run_cli(*args, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"genrnn train: error: {last} cannot be read (")
    assert "rerun with --no-resume to start afresh" in result.stderr and "Traceback" not in result.stderr


def test_a_run_that_stopped_early_trains_no_further_when_run_again(g2p_files, tmp_path):
    import torch

    options = ("--max-epochs", "40", "--set", "training.early_stopping_patience=1")
    options += ("--set", "training.schedule=constant", "--set", "training.lr=0.05")
    args = tiny_train(g2p_files, tmp_path / "run", *options)
    run_cli(*args)
    first = json.loads((tmp_path / "run" / "bundle" / "genrnn.json").read_text())["training"]
    assert first["epochs"] < 39, "early stopping should have ended the run"
    # kept under Lightning's own key, so that runs saved before this callback keep their count too
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "EarlyStopping{'monitor': 'dev_wer', 'mode': 'min'}" in checkpoint["callbacks"]
    result = run_cli(*args)
    assert "resuming from" in result.stdout
    again = json.loads((tmp_path / "run" / "bundle" / "genrnn.json").read_text())["training"]
    assert (again["steps"], again["epochs"], again["best_dev"]) == (first["steps"], first["epochs"], first["best_dev"])


def test_a_run_directory_moved_elsewhere_resumes_with_its_best_checkpoint_and_score(g2p_files, tmp_path):
    run_cli(*tiny_train(g2p_files, tmp_path / "here", "--max-epochs", "1"))
    first = json.loads((tmp_path / "here" / "bundle" / "genrnn.json").read_text())["training"]
    (tmp_path / "here").rename(tmp_path / "there")
    # A best checkpoint saved after the resume point by a run killed before its next one: no record holds it.
    stray = tmp_path / "there" / "checkpoints" / "best-epoch=9-step=999.ckpt"
    stray.write_bytes(b"")
    (stray.parent / "last.ckpt.4242.tmp").write_bytes(b"PK")  # a save that a kill cut short
    result = run_cli(*tiny_train(g2p_files, tmp_path / "there", "--max-epochs", "1"))
    assert "resuming from" in result.stdout
    again = json.loads((tmp_path / "there" / "bundle" / "genrnn.json").read_text())["training"]
    assert first["best_dev"] and (again["best_checkpoint"], again["best_dev"]) == (
        first["best_checkpoint"],
        first["best_dev"],
    )
    assert sorted(p.name for p in stray.parent.iterdir()) == sorted([Path(first["best_checkpoint"]).name, "last.ckpt"])


# Runs `genrnn train ARGS…` and dies as a kill would once it has saved its Nth best checkpoint.
DIE_AFTER_A_BEST_CHECKPOINT = """
import os, sys
from genrnn.cli import main
from pytorch_lightning.callbacks import ModelCheckpoint
bests = int(sys.argv[1])
saved = []
def save_then_die(self, current, trainer, candidates, save=ModelCheckpoint._update_best_and_save):
    save(self, current, trainer, candidates)
    saved.append(trainer.global_step)
    if len(saved) == bests:
        os._exit(9)
ModelCheckpoint._update_best_and_save = save_then_die
main(sys.argv[2:])
"""


def test_a_run_killed_after_a_new_best_keeps_the_best_its_resume_point_names(g2p_files, tmp_path):
    import torch

    # Two validations an epoch, each with a lower loss, and a resume point at each epoch end:
    # the third best replaces the second, which the resume point names; then the kill.
    run = tmp_path / "run"
    options = ("--set", "training.checkpoint_minutes=0", "--set", "training.monitor=val_loss")
    args = tiny_train(g2p_files, run, "--max-epochs", "4", *options)
    driver = tmp_path / "die_after_a_best.py"
    driver.write_text(DIE_AFTER_A_BEST_CHECKPOINT)
    killed = subprocess.run([sys.executable, str(driver), "3", *args], capture_output=True, timeout=300)
    assert killed.returncode == 9, killed.stderr.decode()[-3000:]

    resume_point = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (record,) = [state for key, state in resume_point["callbacks"].items() if key.startswith("ModelCheckpoint")]
    assert Path(record["best_model_path"]).is_file()  # it had been deleted as the third best was saved
    # Given a step budget that ends before any new best, the rerun writes its bundle from that one.
    step = resume_point["global_step"]
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "4", "--max-steps", str(step + 1), *options))
    assert load_bundle(run / "bundle").training["best_checkpoint"] == Path(record["best_model_path"]).name


def test_the_plateau_schedule_is_stepped_after_every_validation(g2p_files, tmp_path):
    import torch

    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "2", "--set", "training.val_check_interval=0.25"))
    with open(run / "logs" / "version_0" / "metrics.csv") as file:
        validations = sum(1 for row in csv.DictReader(file) if row["dev_wer"])
    assert validations >= 8  # four or more an epoch
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # one step per validation, so its patience and early stopping's count the same thing
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == validations


def logged_rates(run: Path) -> list[tuple[int, float]]:
    """(step, learning rate) as the learning-rate monitor logged them."""
    with open(run / "logs" / "version_0" / "metrics.csv") as file:
        return [(int(row["step"]), float(row["lr-Adam"])) for row in csv.DictReader(file) if row.get("lr-Adam")]


def test_the_cosine_schedule_spans_the_epoch_budget(g2p_files, tmp_path):
    import math

    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "2", "--set", "training.schedule=cosine"))
    total = load_bundle(run / "bundle").training["steps"]
    rates = logged_rates(run)
    assert len(rates) >= 3
    for step, rate in rates:  # the rate of the step logged, which ran after `step` updates
        assert rate == pytest.approx(0.005 * 0.5 * (1 + math.cos(math.pi * step / total)), rel=1e-4, abs=1e-9)


def test_the_cosine_schedule_spans_a_time_budget(g2p_files, tmp_path):
    run = tmp_path / "run"
    import torch

    budget = ["--max-epochs", "1000", "--max-time", "00:00:00:08", "--set", "training.schedule=cosine"]
    run_cli(*tiny_train(g2p_files, run, *budget))
    # With 1,000 epochs to go, only the clock can have brought the rate down to nearly zero.
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] > 0 and final["optimizer_states"][0]["param_groups"][0]["lr"] < 0.1 * 0.005
    # How many steps (and logged rates) fit depends on the machine's load: none, when it is busy.
    rates = [rate for _, rate in logged_rates(run)]
    assert rates == sorted(rates, reverse=True) and all(0 < rate < 0.005 for rate in rates)


def test_step_values_are_logged_every_20_steps_and_at_the_last(g2p_files, tmp_path):
    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1000", "--max-time", "00:00:00:06"))
    with open(run / "logs" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["train_loss"]]
    steps = [int(row["step"]) for row in rows]
    last_step = load_bundle(run / "bundle").training["steps"] - 1  # Lightning counts from 0
    assert steps[-1] == last_step and steps[:-1] == list(range(19, 20 * len(steps) - 20, 20))
    # The time budget ended training at a step of its own: its values, not the previous row's again.
    # (How many steps fit depends on the machine's load: on a busy one, fewer than 20.)
    assert len(rows) == 1 or rows[-1]["train_loss"] != rows[-2]["train_loss"]


def dev_losses(bundle_path: Path, dev: Path, smoothing: float) -> tuple[float, float]:
    """The bundle's loss (with label smoothing) and cross-entropy per target token on ``dev``, in one batch."""
    import torch
    import torch.nn.functional as F

    from genrnn.data import collate, training_pairs

    bundle = load_bundle(bundle_path)
    pairs = PairDataset(training_pairs(read_examples(dev)), bundle.source_tokenizer, bundle.target_tokenizer)
    batch = collate([pairs[i] for i in range(len(pairs))])
    with torch.no_grad():
        logits = bundle.model(batch.source, batch.source_lengths, batch.target_in).flatten(0, 1)
    targets = batch.target_out.flatten()
    loss, cross_entropy = (F.cross_entropy(logits, targets, ignore_index=0, label_smoothing=s) for s in (smoothing, 0))
    return loss.item(), cross_entropy.item()


def dev_counts(bundle_path: Path, dev: Path, ranks: int) -> ErrorCounts:
    """The bundle's errors on the dev sources a run validates on, decoded in each rank's share, on one thread."""
    import torch

    bundle = load_bundle(bundle_path)
    config = from_dict(ExperimentConfig, bundle.training["config"])
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    examples = spread(read_examples(dev), config.data.valid_limit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run's processes: sums of another order could flip a near tie
    try:
        shares = [examples[rank::ranks] for rank in range(ranks)]
        outputs = [best_outputs(generator, [e.source for e in share], config.decoding) for share in shares]
        counts = [astuple(error_counts(out, [e.targets for e in share])) for out, share in zip(outputs, shares)]
    finally:
        torch.set_num_threads(threads)
    return ErrorCounts(*map(sum, zip(*counts)))


def test_ddp_on_two_cpu_processes(g2p_files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # The dev set makes 5 batches: the ranks get 3 and 2. Its loss must count each pair once.
    options = ("--max-epochs", "1", "--set", "training.label_smoothing=0.1", "--set", "data.max_tokens=650")
    run_cli(*tiny_train(g2p_files, one, *options, "--devices", "1"))
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_cli(*tiny_train(g2p_files, two, *options, "--devices", "2", "--strategy", "ddp"), env=one_thread)
    single = json.loads((one / "bundle" / "genrnn.json").read_text())["training"]
    double = json.loads((two / "bundle" / "genrnn.json").read_text())["training"]
    # Each of the two ranks takes every other batch: half the optimiser steps per epoch.
    assert double["steps"] == (single["steps"] + 1) // 2
    assert load_bundle(two / "bundle").model.num_parameters() == single["parameters"]
    for run in (one, two):  # one validation, of the weights the bundle holds
        with open(run / "logs" / "version_0" / "metrics.csv") as file:
            logged = [row for row in csv.DictReader(file) if row["val_loss"]]
        assert len(logged) == 1
        expected = dev_losses(run / "bundle", g2p_files["dev"], smoothing=0.1)
        assert float(logged[0]["val_loss"]) == pytest.approx(expected[0], rel=1e-5), run.name
        assert float(logged[0]["val_nll"]) == pytest.approx(expected[1], rel=1e-5), run.name
    # Each process decoded half the dev sources: together, all of them once.
    counts = dev_counts(two / "bundle", g2p_files["dev"], ranks=2)
    assert float(logged[0]["dev_per"]) == pytest.approx(counts.per, rel=1e-6)
    assert float(logged[0]["dev_wer"]) == pytest.approx(counts.wer, rel=1e-6)


def test_a_dev_set_smaller_than_the_processes_is_refused(g2p_files, tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("cat\tK AE1 T\n")
    args = tiny_train(g2p_files, tmp_path / "run", "--max-epochs", "1", "--devices", "2", "--strategy", "ddp")
    result = run_cli(*args, "--valid", str(dev), check=False)
    assert result.returncode == 1
    assert "the dev set has 1 pairs, fewer than the 2 training processes" in result.stderr


def test_a_run_resumes_only_on_as_many_processes_and_says_so_once(g2p_files, tmp_path):
    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1", "--devices", "1"))
    more = tiny_train(g2p_files, run, "--max-epochs", "2", "--devices", "2", "--strategy", "ddp")
    result = run_cli(*more, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("genrnn train: error")]
    assert len(errors) == 1 and "saved by 1 training processes and this run has 2" in errors[0], errors
    assert errors[0].startswith("genrnn train: error: ")  # the first process's word: every process met it


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--train", "/nonexistent.tsv"], "data file not found: /nonexistent.tsv"),
        (["train", "--train", "."], "data: . is a directory; name a TSV or JSONL file"),
        (["generate", "--model", "a", "--input", ".", "--output", "y"], "input: . is a directory; name a text"),
        (["train", "--config", "/nonexistent.yaml"], "config file not found"),
        # before the data is read: the file's absence would be the error otherwise
        (["train", "--train", "/nonexistent.tsv", "--set", "tokenizer.shared=true"], "tokenizer.shared: one model"),
        (["train", "--train", "/nonexistent.tsv", "--set", "model.bridge=zero"], "without attention it never sees"),
        (["train", "--train", "/nonexistent.tsv", "--precision", "16-true"], "where Adam's epsilon (1e-8) is 0"),
        *(  # the run's bundle would be written over the one it goes on from or learns from
            (
                ["train", "--train", "/nonexistent.tsv", "--output", "r/a", "--set", f"training.{key}=r/a/bundle"],
                "output: r/a/bundle is r/a/bundle, which this command reads",
            )
            for key in ("init_from", "teacher")
        ),
        (
            ["train", "--train", "/nonexistent.tsv", "--max-epochs", "-1", "--set", "training.schedule=cosine"],
            "training.schedule: 'cosine' decays the rate over the budget",
        ),
        (["evaluate", "--model", "/nonexistent", "--data", "x.tsv"], "bundle directory not found"),
        (["evaluate", "--model", ".", "--data", "x.tsv"], "genrnn.json is missing"),
        (["evaluate", "--model", "", "--data", "x.tsv"], "no bundle named: --model is empty"),
        (["train", "--train", "/nonexistent.tsv", "--output", "/dev/null"], "output: /dev/null is a file"),
        # each of these once ended in a traceback, or after the whole decoding: the model is not read first
        *(
            (["evaluate", "--model", "/nonexistent", "--data", "x.tsv", *options], message)
            for options, message in [
                (["--batch-size", "0"], "batch_size: must be at least 1; got 0"),
                (["--device", "bogus"], "device: 'bogus' is no torch device"),
                (["--device", "cuda:99"], "device: cuda:99: torch sees"),
                (["--max-new-tokens", "1000000000"], "max_new_tokens: at most 1024; got 1000000000"),
                (["--mode", "beam", "--beam-size", "100000"], "beam_size: at most 64; got 100000"),
                (["--output", "/nonexistent/scores.json"], "output: /nonexistent does not exist"),
                (["--output", "x.tsv"], "output: x.tsv is x.tsv, which this command reads; name another path"),
                (["--model", ".", "--output", "genrnn.json"], "output: genrnn.json lies inside ., which this command"),
                (["--data", "builtin:cmudict"], "data: builtin:cmudict alone is its training split"),
                (["--data", "builtin:cmudict:"], "data: builtin:cmudict alone is its training split"),
            ]
        ),
        # an option the mode does not read: greedy scores would pass for beam search's
        (
            ["evaluate", "--model", "/nonexistent", "--data", "x.tsv", "--beam-size", "8"],
            "--beam-size: applies to --mode beam, and this decodes with --mode greedy",
        ),
        (
            ["evaluate", "--model", "/nonexistent", "--data", "x.tsv", "--mode", "beam", "--seed", "1"],
            "--seed: applies to --mode sample, and this decodes with --mode beam",
        ),
        (
            ["generate", "--model", "/nonexistent", "--input", "x.txt", "--output", "y", "--num-return-sequences", "2"],
            "--num-return-sequences: applies to --mode sample or --mode beam, and this decodes with --mode greedy",
        ),
        # ... but a JSONL line may choose the mode that reads it
        (
            ["generate", "--model", "/nonexistent", "--input", "x.jsonl", "--output", "y", "--beam-size", "8"],
            "input file not found: x.jsonl",
        ),
        *(
            ([*verb, "--model", "a", "--ensemble-averaging", "probabilities"], "applies to an ensemble")
            for verb in (["evaluate", "--data", "x.tsv"], ["generate", "--input", "x", "--output", "y"], ["serve"])
        ),
    ],
)
def test_user_errors_end_with_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_a_pipe_is_refused_as_input_with_what_to_do(tmp_path):
    """A batch job reads its input again as it decodes it, which a pipe cannot give."""
    pipe = tmp_path / "words"
    os.mkfifo(pipe)
    result = run_cli("generate", "--model", "a", "--input", str(pipe), "--output", str(tmp_path / "out"), check=False)
    assert result.returncode == 1
    expected = f"input: {pipe} is not a regular file (a pipe or a device); save it to a text, TSV or JSONL file first"
    assert expected in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # the default dev set, which the command line never named, and one it named
        (
            ["--data", "builtin:cmudict:dev"],
            "data.train: builtin:cmudict:dev is the split that validates training on the built-in dictionary",
        ),
        (
            ["--data", "builtin:cmudict:dev", "--valid", "builtin:cmudict:dev"],
            "data.valid: builtin:cmudict:dev is the training data's own split (builtin:cmudict:dev); validate on "
            "another (a file)",
        ),
        (["--devices", "abc"], "training.devices: must be a count, 'auto'"),
        # Lightning's refusal comes before the data is read: the missing file is not what is named
        (["--accelerator", "tpuu", "--train", "/nonexistent.tsv"], "training.accelerator/devices/num_nodes/strategy"),
        (["--set", "data.max_source_length=2"], "no training pair is within data.max_source_length"),
        (["--max-tokens", "16"], "training pairs need more than its 16 tokens (the longer side, with EOS)"),
        (["--set", "training.val_check_interval=100000"], "training.val_check_interval: 100000 batches; an epoch has"),
        # each of these once ended in a traceback
        (["--accelerator", "cpu", "--devices", "0,1"], "training.accelerator/devices/num_nodes/strategy"),
        (["--accelerator", "cpu", "--precision", "16-mixed"], "training.precision: 16-mixed needs a GPU"),
        (["--max-time", "00:00:00:\u00b2"], "training.max_time: must be DD:HH:MM:SS"),  # a digit int() refuses
        (["--max-time", "99999999999:00:00:00"], "training.max_time: must be DD:HH:MM:SS"),  # past a timedelta
        (["--set", "tokenizer.source_vocab_size=10000000000"], "tokenizer.source_vocab_size: must be 8 to 1,000,000"),
    ],
)
def test_training_that_could_not_mean_anything_is_refused_in_one_line(g2p_files, tmp_path, options, message):
    longer = tmp_path / "longer.tsv"  # words of three letters and more
    longer.write_text("".join(line for line in g2p_files["train"].open() if len(line.split("\t")[0]) > 2))
    train = ["--train", str(longer), "--valid", str(g2p_files["dev"])]
    args = [*(train if "--data" not in options else []), *options]
    result = run_cli("train", "--config", str(TINY_CONFIG), *args, "--output", str(tmp_path / "r"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_where_the_probe_says_this_cpu_runs_bfloat16_a_run_at_that_precision_trains(g2p_files, tmp_path, precision):
    if not cpu_runs_recurrent_at(precision, "lstm"):
        pytest.skip(f"this CPU's LSTM kernel cannot run {precision} (the refusal's test is below)")
    import torch

    # with the moving average, made before the weights take their precision
    options = ("--precision", precision, "--max-steps", "3", "--set", "training.ema_decay=0.9")
    run_cli(*tiny_train(g2p_files, tmp_path / "run", *options))
    model = load_bundle(tmp_path / "run" / "bundle").model
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_a_bfloat16_precision_this_cpu_cannot_run_is_refused_in_one_line(g2p_files, tmp_path, monkeypatch, precision):
    import training.train

    # A CPU without bfloat16 instructions, as the probe would find it: most CPUs that run CI have them.
    monkeypatch.setattr(training.train, "cpu_runs_recurrent_at", lambda precision, cell: False)
    result = run_cli(
        *tiny_train(g2p_files, tmp_path / "run", "--precision", precision, "--max-steps", "1"), check=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"genrnn train: error: training.precision: this CPU's LSTM kernel cannot run {precision} "
        "(it lacks bfloat16 instructions); use 32-true"
    )


def test_dev_wer_is_scored_on_examples_spread_through_the_dev_set(g2p_files):
    examples = [Example(f"w{i:03}", ("x",)) for i in range(100)]
    assert [e.source for e in spread(examples, 4)] == ["w000", "w025", "w050", "w075"]
    assert spread(examples, 0) == examples == spread(examples, 1000)
    dev = read_examples(g2p_files["dev"])
    tokenizers = train_tokenizers([e.source for e in dev], [e.targets[0] for e in dev], TokenizerConfig())
    datamodule = PairDataModule(dev, dev, *tokenizers, DataConfig(valid_limit=10))
    assert datamodule.dev_examples == spread(dev, 10) != dev[:10]


def test_a_dev_set_that_shares_sources_with_the_training_data_is_reported(g2p_files, capsys):
    from genrnn.config import load_config, replace
    from training.train import load_data

    config = load_config(TINY_CONFIG)
    same = str(g2p_files["dev"])
    load_data(replace(config, data=replace(config.data, train=same, valid=same)))
    dev = read_examples(same)
    assert f"warning: {len(dev)} of the {len(dev)} dev sources are also training sources" in capsys.readouterr().out


def test_pairs_past_the_vocabulary_are_counted(g2p_files):
    dev = read_examples(g2p_files["dev"])
    pairs = [(e.source, e.targets[0]) for e in dev]
    small = train_tokenizers([s for s, _ in pairs], [t for _, t in pairs], TokenizerConfig(target_vocab_size=40))
    large = train_tokenizers([s for s, _ in pairs], [t for _, t in pairs], TokenizerConfig(target_vocab_size=128))
    assert PairDataset(pairs, *small).with_unknown > 0 == PairDataset(pairs, *large).with_unknown


def test_a_malformed_training_line_is_named(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("cat\tK AE1 T\ndog\n")
    result = run_cli(
        "train", "--config", str(TINY_CONFIG), "--train", str(bad), "--output", str(tmp_path / "r"), check=False
    )
    assert result.returncode == 1 and f"{bad}:2: expected 'source<TAB>target'" in result.stderr


def test_without_a_dev_set_one_is_held_out_of_the_training_file_and_said_so(g2p_files, capsys):
    from genrnn.config import load_config, replace
    from training.train import load_data

    config = load_config(TINY_CONFIG)
    config = replace(config, data=replace(config.data, train=str(g2p_files["train"]), valid=None))
    train, dev = load_data(config)

    examples = read_examples(g2p_files["train"])
    assert 0 < len(dev) < len(examples) / 10 and len(train) + len(dev) == len(examples)
    assert not {e.source for e in dev} & {e.source for e in train}
    assert f"dev set: {len(dev)} examples held out of {g2p_files['train']}" in capsys.readouterr().out


def test_a_file_too_small_to_hold_out_a_dev_set_asks_for_one(tmp_path):
    small = tmp_path / "small.tsv"
    small.write_text("cat\tK AE1 T\ndog\tD AO1 G\n")  # neither source is among the held-out 1 in 21
    result = run_cli(
        "train", "--config", str(TINY_CONFIG), "--train", str(small), "--output", str(tmp_path / "r"), check=False
    )
    assert result.returncode == 1 and "too few sources to hold out a dev set" in result.stderr
    assert "--valid" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_weight_decay_falls_on_the_weight_matrices_and_spares_the_biases(optimizer):
    import torch

    from training.module import Seq2SeqModule

    def optimizer_of(decay: float) -> torch.optim.Optimizer:
        values = {"training": {"optimizer": optimizer, "weight_decay": decay, "schedule": "constant"}}
        return Seq2SeqModule(values, 40, 50).configure_optimizers()

    decayed = optimizer_of(0.1)
    by_decay = {group["weight_decay"]: group["params"] for group in decayed.param_groups}
    assert set(by_decay) == {0.1, 0.0}
    assert by_decay[0.1] and all(p.ndim == 2 for p in by_decay[0.1])  # embeddings, LSTM and output matrices
    assert by_decay[0.0] and all(p.ndim == 1 for p in by_decay[0.0])  # every bias, the forget gate's among them
    assert sum(p.numel() for group in decayed.param_groups for p in group["params"]) == sum(
        p.numel() for p in Seq2SeqModule({}, 40, 50).parameters()
    )
    (plain,) = optimizer_of(0.0).param_groups  # as checkpoints saved before the split hold
    assert plain["weight_decay"] == 0.0


def test_a_run_whose_weight_decay_fell_on_every_parameter_resumes_so(g2p_files, tmp_path):
    """Its checkpoint holds one group of parameters, as genrnn saved it before the biases were spared."""
    import torch

    from training.module import Seq2SeqModule

    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    decay = ("--set", "training.optimizer=adamw", "--set", "training.weight_decay=0.05")
    run_cli(*tiny_train(g2p_files, run, *decay, "--max-steps", "3"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    optimizer = checkpoint["optimizer_states"][0]
    assert len(optimizer["param_groups"]) == 2  # as this version saves it
    # The same state as one group, in the module's order of parameters.
    hyper = checkpoint["hyper_parameters"]
    module = Seq2SeqModule(hyper["config"], hyper["source_vocab_size"], hyper["target_vocab_size"])
    parameters = list(module.parameters())
    grouped = [p for p in parameters if p.ndim >= 2] + [p for p in parameters if p.ndim < 2]
    place = {id(p): index for index, p in enumerate(grouped)}
    state = {index: optimizer["state"][place[id(p)]] for index, p in enumerate(parameters)}
    group = {**optimizer["param_groups"][0], "params": list(range(len(parameters)))}
    checkpoint["optimizer_states"] = [{"state": state, "param_groups": [group]}]
    for scheduler in checkpoint["lr_schedulers"]:  # a value a group (rates, floors): one
        scheduler.update({key: value[:1] for key, value in scheduler.items() if isinstance(value, list)})
    torch.save(checkpoint, last)

    resumed = run_cli(*tiny_train(g2p_files, run, *decay, "--max-steps", "6"))

    assert "resuming from" in resumed.stdout
    after = torch.load(last, map_location="cpu", weights_only=False)
    assert after["global_step"] == 6 and len(after["optimizer_states"][0]["param_groups"]) == 1


def test_bad_config_value_names_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  cell: transformer\n")
    result = run_cli("train", "--config", str(config), check=False)
    assert result.returncode == 1 and "model.cell: must be one of lstm, gru, rnn" in result.stderr
    assert os.path.exists(config)


def test_the_moving_average_updates_every_weight_in_one_fused_operation():
    import torch

    from genrnn.config import load_config
    from tests.conftest import Operations
    from training.averaging import DeviceEMA
    from training.module import Seq2SeqModule

    module = Seq2SeqModule.from_config(load_config(TINY_CONFIG), 40, 60)
    average = DeviceEMA(decay=0.9)
    average.setup(None, module, "fit")
    average._average_model.update_parameters(module)  # the first update copies the weights

    with torch.no_grad(), Operations() as operations:
        average._average_model.update_parameters(module)
    # Lightning's own update multiplies, adds and copies each weight: on a GPU, each a kernel launched.
    assert operations.names.count("aten::_foreach_lerp_") == 1
    assert not {"aten::mul", "aten::add", "aten::copy_", "aten::lerp_"} & set(operations.names)


def test_weight_averaging_puts_the_averaged_weights_in_the_bundle(g2p_files, tmp_path):
    import torch

    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1", "--set", "training.ema_decay=0.9"))
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    bundle = load_bundle(run / "bundle")
    name = "decoder.layers.0.weight_hh_l0"
    assert not torch.equal(averaged["model." + name], current["model." + name])
    assert torch.equal(bundle.model.state_dict()[name], averaged["model." + name])
    # The dev WER that chose the checkpoint was measured on the averaged weights too.
    logged = [row for row in csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()) if row["dev_wer"]]
    examples = read_examples(g2p_files["dev"])
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    outputs = generator.generate_sorted([e.source for e in examples], DecodingConfig(max_new_tokens=32))
    wer = score([o.candidates[0].text for o in outputs], [e.targets for e in examples]).wer
    assert float(logged[-1]["dev_wer"]) == pytest.approx(wer, abs=1e-6)


def test_the_best_checkpoint_holds_weights_and_the_resume_point_everything(g2p_files, tmp_path):
    import torch

    run = tmp_path / "run"
    # What an attempt killed before its first resume point leaves: the run starts afresh, without it.
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best-epoch=0-step=1.ckpt").write_bytes(b"an abandoned attempt's")
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "2"))
    (best_path,) = (run / "checkpoints").glob("best-*.ckpt")
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "optimizer_states" not in best and best["state_dict"]
    assert last["optimizer_states"] and last["lr_schedulers"]
    assert last["global_step"] == load_bundle(run / "bundle").training["steps"]  # written as the last epoch ended


def test_a_run_directory_refuses_to_resume_on_other_data(g2p_files, tmp_path):
    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1"))
    stamp = json.loads((run / "run.json").read_text())
    assert set(stamp) == {"data", "model", "tokenizer", "batches", "optimization", "validation", "init_from"}
    assert stamp["init_from"] is None  # begun from no bundle; and no teacher keys
    result = run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1", train="test"), check=False)
    assert result.returncode == 1 and "holds a run with other settings (data: changed;" in result.stderr
    # Other batches would make the checkpoint's count of served batches skip the wrong ones; another
    # schedule could not load the saved one's state, and another rate would be recorded but not used.
    for option, differs in (
        (("--max-tokens", "512"), "batches"),
        (("--seed", "7"), "batches"),
        (("--set", "training.schedule=warmup"), "optimization"),
        (("--set", "training.lr=0.0001"), "optimization"),
        # Scores on another dev set, or measured otherwise, would be compared with the best so far.
        (("--valid", str(g2p_files["test"])), "validation"),
        (("--set", "data.valid_limit=10"), "validation"),
        (("--set", "training.monitor=val_loss"), "validation"),
        (("--set", "decoding.mode=beam"), "validation"),
    ):
        result = run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1", *option), check=False)
        assert result.returncode == 1 and f"other settings ({differs}." in result.stderr, result.stderr[-2000:]
        assert "training.init_from=BUNDLE" in result.stderr and "Traceback" not in result.stderr
    # A stamp from before batches and optimisation were recorded, or before a model setting existed,
    # still resumes; a model changed in a setting the stamp holds does not.
    # Before the shuffle's seeding was recorded, epochs were seeded by seed + epoch: such a run keeps that.
    assert stamp["batches"]["seeding"] == "seed,epoch"
    del stamp["batches"]["seeding"]
    (run / "run.json").write_text(json.dumps(stamp))
    for _ in range(2):  # and goes on keeping it
        assert "resuming from" in run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1")).stdout
        assert json.loads((run / "run.json").read_text())["batches"]["seeding"] == "seed+epoch"
    del stamp["batches"], stamp["optimization"], stamp["validation"], stamp["model"]["attention_query"]
    del stamp["init_from"]
    (run / "run.json").write_text(json.dumps(stamp))
    result = run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1", "--set", "model.decoder_hidden=24"), check=False)
    assert result.returncode == 1 and "other settings (model.decoder_hidden: " in result.stderr
    assert "resuming from" in run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1")).stdout
    # A stamp cut short (it is written whole, but disks fill up) is named, not a traceback
    (run / "run.json").write_text('{"data": ')
    result = run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1"), check=False)
    assert result.returncode == 1 and "run.json is damaged" in result.stderr and "Traceback" not in result.stderr
    run_cli(*tiny_train(g2p_files, run, "--max-epochs", "1", "--no-resume", train="test"))


def test_a_fresh_start_stopped_as_it_stamps_the_run_leaves_no_old_checkpoint_to_resume(
    g2p_files, tmp_path, monkeypatch
):
    import training.train

    run = tmp_path / "run"
    run_cli(*tiny_train(g2p_files, run, "--max-steps", "2"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    stamp_run = training.train.stamp_run

    def stamp_then_ctrl_c(*args, **kwargs):
        stamp_run(*args, **kwargs)
        raise KeyboardInterrupt  # as if Ctrl+C came right after the new settings were stamped

    new_settings = ("--max-steps", "2", "--set", "training.lr=0.01")
    monkeypatch.setattr(training.train, "stamp_run", stamp_then_ctrl_c)
    assert run_cli(*tiny_train(g2p_files, run, *new_settings, "--no-resume"), check=False).returncode == 130
    monkeypatch.undo()
    # Rerun as the message says: the old run's weights must not go on under the new stamp.
    assert "resuming from" not in run_cli(*tiny_train(g2p_files, run, *new_settings)).stdout


def memory_refuses(size: int) -> bool:
    """Whether this kernel refuses one allocation of ``size`` bytes at once, rather than promising it."""
    with open("/proc/meminfo") as file:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in file}
    with open("/proc/sys/vm/overcommit_memory") as file:
        heuristic = file.read().strip() != "1"
    return heuristic and size > 1024 * (kib["MemTotal"] + kib["SwapTotal"])


@pytest.mark.skipif(
    not (sys.platform == "linux" and memory_refuses(4 * 4 * 2**32)),
    reason="the kernel may promise the memory and then kill the test as the weights are drawn",
)
def test_a_model_too_large_for_memory_is_one_line_not_a_traceback(g2p_files, tmp_path):
    # one recurrent matrix of 4 × 65,536 × 65,536 float32s: 64 GiB
    result = run_cli(*tiny_train(g2p_files, tmp_path / "run", "--set", "model.encoder_hidden=65536"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "genrnn train: error: model: cannot be built with these sizes: " in result.stderr


def test_a_budget_spent_before_the_first_validation_still_writes_a_bundle(g2p_files, tmp_path):
    import torch

    run = tmp_path / "run"
    options = ("--max-steps", "3", "--set", "training.ema_decay=0.5")
    run_cli(*tiny_train(g2p_files, run, *options))
    bundle = load_bundle(run / "bundle")
    facts = bundle.training
    assert facts["steps"] == 3 and facts["best_checkpoint"] is None and facts["best_dev"] == {}
    # the weights' moving average, which a rerun of the finished run writes again, not the raw weights
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    name = "decoder.layers.0.weight_hh_l0"
    assert not torch.equal(last["state_dict"]["model." + name], last["current_model_state"]["model." + name])
    assert torch.equal(bundle.model.state_dict()[name], last["state_dict"]["model." + name])
    assert "resuming from" in run_cli(*tiny_train(g2p_files, run, *options)).stdout
    again = load_bundle(run / "bundle").model.state_dict()
    assert all(torch.equal(again[key], weight) for key, weight in bundle.model.state_dict().items())


def test_init_from_starts_the_model_at_the_bundles_weights(g2p_files, tiny_bundle, tmp_path):
    import torch
    from pytorch_lightning.callbacks.model_checkpoint import warning_cache

    run = tmp_path / "run"
    options = ("--max-steps", "1", "--set", f"training.init_from={tiny_bundle}", "--set", "training.lr=1e-9")
    warning_cache.clear()  # Lightning warns once a process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(*tiny_train(g2p_files, run, *options))
    # Ended before its first validation, as a budget may: not to be told as a bug of the module's.
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]
    started, trained = load_bundle(tiny_bundle).model.state_dict(), load_bundle(run / "bundle").model.state_dict()
    assert all(torch.allclose(trained[name], weight, atol=1e-6) for name, weight in started.items())
    # It records what the bundle it started from trained on, beside its own data.
    facts = load_bundle(tiny_bundle).training
    inherited = {"data": facts["data"], "data_fingerprint": facts["data_fingerprint"]}
    assert load_bundle(run / "bundle").training["ancestry"] == [inherited]
    assert load_bundle(run / "bundle").ancestry() == [inherited]  # its own data is that one too
    # Resumed from other weights of the same tokenizers, the bundle would name where they did not come from.
    other = shutil.copytree(run / "bundle", tmp_path / "other")
    changed = ("--max-steps", "2", "--set", f"training.init_from={other}", "--set", "training.lr=1e-9")
    refused = run_cli(*tiny_train(g2p_files, run, *changed), check=False)
    assert refused.returncode == 1 and "other settings (init_from: changed;" in refused.stderr


def test_a_distilled_run_resumes_with_its_teacher_and_refuses_another(g2p_files, tiny_bundle, tmp_path):
    import torch

    run = tmp_path / "run"
    teacher = ("--set", f"training.teacher={tiny_bundle}")
    first = run_cli(*tiny_train(g2p_files, run, "--max-steps", "20", *teacher))  # values are logged every 20
    assert "teacher's distributions for" in first.stdout
    other = run_cli(*tiny_train(g2p_files, run, "--max-steps", "40", "--set", "training.teacher=a,b"), check=False)
    assert other.returncode == 1 and "training.teacher: bundle directory not found: a" in other.stderr
    pair = ("--set", f"training.teacher={tiny_bundle},{tiny_bundle}")  # other weights: another teacher
    refused = run_cli(*tiny_train(g2p_files, run, "--max-steps", "40", *pair), check=False)
    assert refused.returncode == 1 and "other settings (teacher: changed;" in refused.stderr
    untaught = run_cli(*tiny_train(g2p_files, run, "--max-steps", "40"), check=False)
    assert untaught.returncode == 1
    assert "other settings (tokenizers_from_bundle: dropped, teacher: dropped, distill_weight:" in untaught.stderr
    weight = ("--set", "training.distill_weight=1")
    weighed = run_cli(*tiny_train(g2p_files, run, "--max-steps", "40", *teacher, *weight), check=False)
    assert weighed.returncode == 1 and "other settings (distill_weight: 0.5 (this run: 1.0);" in weighed.stderr
    # Begun without init_from: a bundle named now would be taken for the weights' origin.
    begun = ("--set", f"training.init_from={tiny_bundle}")
    named = run_cli(*tiny_train(g2p_files, run, "--max-steps", "40", *teacher, *begun), check=False)
    assert named.returncode == 1 and "other settings (init_from: added;" in named.stderr
    resumed = run_cli(*tiny_train(g2p_files, run, "--max-steps", "40", *teacher))
    assert "resuming from" in resumed.stdout
    # The teacher does not run again: the run reads the table it kept.
    assert "teacher's distributions for" not in resumed.stdout
    assert f"teacher's distributions read from {run / 'teacher-table'}, which this run kept" in resumed.stdout
    unbroken = tmp_path / "unbroken"  # taught by the teacher for all 40 steps: the same weights
    run_cli(*tiny_train(g2p_files, unbroken, "--max-steps", "40", *teacher))
    first, second = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=False) for r in (run, unbroken))
    for name, tensor in first["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    facts = load_bundle(run / "bundle").training
    assert facts["steps"] == 40 and facts["related_bundles"] == {"teacher": load_bundle(tiny_bundle).fingerprint}
    logs = sorted((run / "logs").glob("version_*/metrics.csv"))  # one a run
    assert len(logs) == 2 and all(
        {"reference_loss", "distillation_loss"} <= set(next(csv.reader(log.open()))) for log in logs
    )


def taught_by(g2p_files, output: Path, teacher: Path, *options: str, train: str = "train", check: bool = True):
    """``genrnn train`` of the tiny config taught by ``teacher``: a bundle or a saved table."""
    args = tiny_train(g2p_files, output, *options, "--set", f"training.teacher={teacher}", train=train)
    return run_cli(*args, check=check)


def test_a_saved_teacher_table_teaches_another_run_as_its_teacher_would(g2p_files, tiny_bundle, tmp_path):
    import torch

    options = ("--max-steps", "12", "--set", "model.output_dropout=0.3")  # dropout: the generators must agree too
    taught = taught_by(g2p_files, tmp_path / "taught", tiny_bundle, *options)
    table = tmp_path / "taught" / "teacher-table"
    assert f"teacher's table written to {table}" in taught.stdout
    # as readable as the files beside it (the tests' umask may be any): safetensors writes 0600
    beside = (tmp_path / "taught" / "run.json").stat().st_mode & 0o777
    assert {f.stat().st_mode & 0o777 for f in table.iterdir()} == {beside}
    again = taught_by(g2p_files, tmp_path / "again", table, *options)
    assert "teacher's distributions for" not in again.stdout  # no teacher ran
    assert not (tmp_path / "again" / "teacher-table").exists()  # nothing new to keep
    # Taught by the table, it records what the table's teacher trained on, as the first run does.
    ancestry = load_bundle(tiny_bundle).ancestry()
    assert load_bundle(tmp_path / "again" / "bundle").training["ancestry"] == ancestry
    assert load_bundle(tmp_path / "taught" / "bundle").training["ancestry"] == ancestry

    # The same tokenizers, the same distributions to learn: the same weights.
    tokenizers = load_bundle(tmp_path / "again" / "bundle").tokenizers_fingerprint
    assert tokenizers == load_bundle(tiny_bundle).tokenizers_fingerprint
    first, second = (
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=False) for r in ("taught", "again")
    )
    for name, tensor in first["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    # The table stands for the teacher that made it: the run it came from goes on with it.
    resumed = taught_by(g2p_files, tmp_path / "taught", table, "--max-steps", "14", *options[2:])
    assert "resuming from" in resumed.stdout


@pytest.mark.parametrize(
    "train,options,message",
    [
        ("dev", (), "holds a table made for other training data"),
        ("train", ("--set", "data.max_target_length=5"), "made for other length limits (data.max_source_length=64"),
    ],
)
def test_a_teacher_table_refuses_other_training_pairs(g2p_files, tiny_bundle, tmp_path, train, options, message):
    taught_by(g2p_files, tmp_path / "taught", tiny_bundle, "--max-steps", "2")
    table = tmp_path / "taught" / "teacher-table"
    refused = taught_by(g2p_files, tmp_path / "other", table, "--max-steps", "2", *options, train=train, check=False)
    assert refused.returncode == 1 and message in refused.stderr, refused.stderr[-2000:]


def test_the_table_is_kept_as_soon_as_it_is_made_and_replaced_when_starting_afresh(g2p_files, tiny_bundle, tmp_path):
    import torch
    from safetensors.torch import load_file

    table = tmp_path / "run" / "teacher-table"
    teacher = ("--set", f"training.teacher={tiny_bundle}")
    train_until_killed(2, tiny_train(g2p_files, tmp_path / "run", "--max-steps", "20", *teacher), tmp_path)
    assert json.loads((table / "teacher-table.json").read_text())["teacher"] == load_bundle(tiny_bundle).fingerprint
    # Afresh with another teacher (the bundle twice: another mixture, other weights), another table.
    pair = ("--set", f"training.teacher={tiny_bundle},{tiny_bundle}")
    run_cli(*tiny_train(g2p_files, tmp_path / "run", "--max-steps", "2", *pair), "--no-resume")
    manifest = json.loads((table / "teacher-table.json").read_text())
    assert manifest["teacher"] == load_bundle(f"{tiny_bundle},{tiny_bundle}").fingerprint
    assert load_file(str(table / "table.safetensors"))["ids"].dtype == torch.uint8  # a vocabulary under 256


def test_a_table_of_another_teacher_is_replaced_and_the_table_that_teaches_is_kept(
    g2p_files, tiny_bundle, other_bundle, tmp_path
):
    run, table = tmp_path / "run", tmp_path / "run" / "teacher-table"
    taught_by(g2p_files, run, tiny_bundle, "--max-steps", "2")
    shutil.rmtree(run / "checkpoints")  # as a kill before the first checkpoint leaves a run: its table alone
    taught_by(g2p_files, run, other_bundle, "--max-steps", "2")  # nothing to resume: another teacher may teach
    assert json.loads((table / "teacher-table.json").read_text())["teacher"] == load_bundle(other_bundle).fingerprint
    # Afresh, taught by the run's own table: --no-resume keeps the table that teaches it.
    afresh = taught_by(g2p_files, run, table, "--max-steps", "2", "--no-resume")
    assert "teacher's distributions for" not in afresh.stdout and table.is_dir()


def test_an_altered_teacher_table_is_refused(g2p_files, tiny_bundle, tmp_path):
    taught_by(g2p_files, tmp_path / "taught", tiny_bundle, "--max-steps", "2")
    table = tmp_path / "taught" / "teacher-table"
    with (table / "table.safetensors").open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 1]))
    refused = taught_by(g2p_files, tmp_path / "other", table, "--max-steps", "2", check=False)
    assert refused.returncode == 1 and "does not match its checksum" in refused.stderr, refused.stderr[-2000:]
    (table / "teacher-table.json").write_text("[]")  # JSON, but no manifest
    refused = taught_by(g2p_files, tmp_path / "third", table, "--max-steps", "2", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "is not a teacher table's manifest" in refused.stderr


@pytest.mark.parametrize(
    "options,message",
    [
        (
            ["--set", "model.decoder_hidden=32", "--set", "training.init_from={bundle}"],
            "has other model settings than this run: decoder_hidden: 64 (this run: 32)",
        ),
        (
            ["--set", "tokenizer.target_vocab_size=60", "--set", "training.teacher={bundle}"],
            "has other tokenizer settings than this run: target_vocab_size: 128 (this run: 60)",
        ),
        (["--set", "training.teacher={bundle},nowhere"], "training.teacher: bundle directory not found: nowhere"),
    ],
)
def test_a_bundle_that_cannot_start_or_teach_the_run_is_named(options, message, g2p_files, tiny_bundle, tmp_path):
    options = [o.format(bundle=tiny_bundle) for o in options]
    result = run_cli(*tiny_train(g2p_files, tmp_path / "run", "--max-steps", "1", *options), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]


def test_a_teacher_with_other_tokenizers_than_the_starting_bundle_is_refused(g2p_files, tiny_bundle, tmp_path):
    other = tmp_path / "other"
    run_cli(*tiny_train(g2p_files, other, "--max-steps", "1", train="test"))  # same settings, other data
    options = ["--set", f"training.init_from={tiny_bundle}", "--set", f"training.teacher={other / 'bundle'}"]
    result = run_cli(*tiny_train(g2p_files, tmp_path / "run", "--max-steps", "1", *options), check=False)
    assert result.returncode == 1 and "have different tokenizers" in result.stderr, result.stderr[-2000:]
