"""The first process of a job's process group: it runs the job and ends the group if the worker dies.

    python -m charter.service.jobguard WORKER_PID COMMAND [ARGS…]

The worker starts every job through this guard (on Linux). The kernel sends the guard a
signal when the worker dies (prctl PR_SET_PDEATHSIG), and the guard then SIGKILLs the whole
group — the job and everything it started (accelerate ranks, data loaders) — so a job taken
over after a worker crash never has two attempts writing its folder at once. Otherwise the
guard is invisible: the job shares its stdout, the worker's SIGTERM to the group reaches the
job, and the guard exits as the job did (same code, or killed by the same signal).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _end_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)


def main() -> int:
    worker_pid, cmd = int(sys.argv[1]), sys.argv[2:]
    # A handler, not SIG_IGN: an ignored signal would be inherited by the job, a handler is not.
    signal.signal(signal.SIGTERM, lambda *_: None)  # the job gets it too and ends; then so does the guard
    signal.signal(signal.SIGUSR2, _end_group)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR2)
    if os.getppid() != worker_pid:  # the worker died before prctl took effect
        _end_group()
    returncode = subprocess.Popen(cmd).wait()
    if returncode < 0:  # killed by a signal: be killed by it too, so the worker reads the same
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled anyway
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
