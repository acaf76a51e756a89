"""Where a run directory keeps what it writes; light to import, for the command line's messages."""

from __future__ import annotations

from pathlib import Path


def last_checkpoint(output: Path) -> Path:
    """Where a run in ``output`` keeps the checkpoint it resumes from."""
    return Path(output) / "checkpoints" / "last.ckpt"


def teacher_table(output: Path) -> Path:
    """Where a distilled run keeps its teacher's table, for other runs to learn from (see training.distillation)."""
    return Path(output) / "teacher-table"
