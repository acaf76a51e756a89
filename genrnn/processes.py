"""Processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl's option, from <linux/prctl.h>
# Set by the first process of a run to its process id, for the processes it launches.
LAUNCHER_VARIABLE = "GENRNN_LAUNCHER_PID"


def die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies, however it dies (on Linux).

    For the processes that a server or a distributed run starts beside its first: killed
    outright (SIGKILL, the OOM killer), that one cannot stop them, and they would go on
    holding a port, a device's memory, or a share of the work that nobody would collect.
    """
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def started_by_the_first_process() -> bool:
    """Whether the first process of this distributed run started this one (Lightning's launch, not torchrun's)."""
    return int(os.environ.get("LOCAL_RANK", "0") or "0") > 0 and LAUNCHER_VARIABLE in os.environ


def die_with_the_launching_process() -> None:
    """In a process that a distributed launch started beside its first (local rank 1 and up), die with its launcher.

    Lightning starts them as children of the first process, which names itself in
    :data:`LAUNCHER_VARIABLE` for them to check that it was still there when they asked;
    torchrun starts them as children of its agent, which names nothing.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or "0")
    if local_rank == 0:
        os.environ[LAUNCHER_VARIABLE] = str(os.getpid())  # the processes it launches inherit it
    elif LAUNCHER_VARIABLE in os.environ:
        die_with(int(os.environ[LAUNCHER_VARIABLE]))
    else:
        die_with(os.getppid())
