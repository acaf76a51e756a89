"""Where a finished training run's time went: training steps against validation, from its TensorBoard events.

    python bench/run_timeline.py runs/g014b2b-h200-four/bahdanau-deep-cosine-seed11 [RUN ...]

Training logs its loss every few steps with the wall time of each. An interval with
no validation in it gives the time of a step; an interval with one takes longer,
and the excess over its steps at the median rate is that validation's time. Prints
one table row per run.
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

    steps: int
    seconds: float  # from the first logged step to the last
    seconds_per_step: float  # the median over intervals without a validation
    validations: int
    validation_seconds: float  # summed

    @property
    def validation_share(self) -> float:
        return self.validation_seconds / self.seconds


def _part(events: Path) -> tuple[list, list[int]]:
    """One part's logged losses (``ScalarEvent``s: step, wall time) and the steps it validated at."""
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = accumulator.Tags()["scalars"]
    losses = accumulator.Scalars("train_loss") if "train_loss" in logged else []
    validated = [event.step for event in accumulator.Scalars("dev_wer")] if "dev_wer" in logged else []
    return losses, validated


def timeline(run: Path) -> Timeline:
    """Read the run's TensorBoard events (``RUN/tensorboard/version_*/events*``): each part of a resumed run.

    Intervals are taken within a part only: the time between a kill and the resume is no one's.
    """
    paths = list(run.glob("tensorboard/version_*/events.out.tfevents.*"))
    if not paths:
        raise SystemExit(f"{run}: no TensorBoard events under {run / 'tensorboard'}")
    parts = sorted((p for p in map(_part, paths) if p[0]), key=lambda part: part[0][0].wall_time)
    plain, with_validation = [], []  # (steps, seconds) of each interval between two logged losses
    for losses, validated in parts:
        for a, b in zip(losses, losses[1:]):
            validates = any(a.step < step <= b.step for step in validated)
            (with_validation if validates else plain).append((b.step - a.step, b.wall_time - a.wall_time))
    if not plain:  # losses are logged every 20 steps: a short run has no interval without a validation
        raise SystemExit(f"{run}: too short to time: no two logged losses without a validation between them")
    per_step = statistics.median(seconds / steps for steps, seconds in plain)
    excess = [seconds - steps * per_step for steps, seconds in with_validation]
    return Timeline(
        steps=parts[-1][0][-1].step,
        seconds=sum(losses[-1].wall_time - losses[0].wall_time for losses, _ in parts),
        seconds_per_step=per_step,
        validations=len(excess),
        validation_seconds=sum(excess),
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
