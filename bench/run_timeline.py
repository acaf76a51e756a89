"""Where a finished training run's time went: training steps against validation, from its TensorBoard events.

    python bench/run_timeline.py runs/g014b2b-h200-four/bahdanau-deep-cosine-seed11 [RUN ...]

Training logs its loss every few steps with the wall time of each. An interval with
no validation in it gives the time of a step; an interval with one takes longer,
and the excess over its steps at the median rate is that validation's time. The
validations after the last logged loss (a run's last, as a rule) end an interval of
their own, at the last of them. Prints one table row per run.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass(frozen=True)
class Timeline:
    """One run's training time split between steps and validations."""

    steps: int  # the last logged step: a loss's, or a validation's after it
    seconds: float  # from the first logged loss to the last logged step
    seconds_per_step: float  # the median over intervals without a validation
    validations: int
    validation_seconds: float  # summed

    @property
    def validation_share(self) -> float:
        return self.validation_seconds / self.seconds


def _part(events: Path) -> tuple[list, list]:
    """One part's logged losses and validations (``ScalarEvent``s: step, wall time as it was logged)."""
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = accumulator.Tags()["scalars"]
    losses = accumulator.Scalars("train_loss") if "train_loss" in logged else []
    validations = accumulator.Scalars("dev_wer") if "dev_wer" in logged else []
    return losses, validations


def timeline(run: Path) -> Timeline:
    """Read the run's TensorBoard events (``RUN/tensorboard/version_*/events*``): each part of a resumed run.

    Intervals are taken within a part only: the time between a kill and the resume is no one's.
    """
    paths = list(run.glob("tensorboard/version_*/events.out.tfevents.*"))
    if not paths:
        raise SystemExit(f"{run}: no TensorBoard events under {run / 'tensorboard'}")
    parts = sorted((p for p in map(_part, paths) if p[0]), key=lambda part: part[0][0].wall_time)
    plain, with_validation = [], []  # (steps, seconds[, validations]) of each interval
    total, last_step = 0.0, 0
    for losses, validations in parts:
        after_last = [v for v in validations if v.step > losses[-1].step]
        marks = [*losses, after_last[-1]] if after_last else losses  # the part's logged steps, in order
        for a, b in zip(marks, marks[1:]):
            held = sum(a.step < v.step <= b.step for v in validations)
            interval = (b.step - a.step, b.wall_time - a.wall_time)
            (with_validation.append((*interval, held)) if held else plain.append(interval))
        total += marks[-1].wall_time - marks[0].wall_time
        last_step = marks[-1].step
    if not plain:  # losses are logged every 20 steps: a short run has no interval without a validation
        raise SystemExit(f"{run}: too short to time: no two logged losses without a validation between them")
    per_step = statistics.median(seconds / steps for steps, seconds in plain)
    return Timeline(
        steps=last_step,
        seconds=total,
        seconds_per_step=per_step,
        validations=sum(held for *_, held in with_validation),
        validation_seconds=sum(interval_seconds - steps * per_step for steps, interval_seconds, _ in with_validation),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run directories")
    args = parser.parse_args()
    print("| run | steps | seconds | steps/s between validations | validations | their seconds | share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in args.runs:
        t = timeline(run)
        print(
            f"| {run} | {t.steps:,} | {t.seconds:.1f} | {1 / t.seconds_per_step:.1f} | {t.validations} | "
            f"{t.validation_seconds:.1f} ({t.validation_seconds / max(1, t.validations):.2f} each) | "
            f"{t.validation_share:.0%} |"
        )


if __name__ == "__main__":
    main()
