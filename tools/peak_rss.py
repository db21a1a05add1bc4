"""Peak resident memory of one command, without the caller's own size in it.

Why a launcher in between: Linux folds the peak RSS of a process's *old* address space into
its own record when it execs, and Python's subprocess starts children with vfork, which
borrows the parent's address space until that exec. So ``os.wait4`` on a child of a large
process (a test runner that has imported torch and trained models, a benchmark holding
60k images) reports at least the parent's peak: inside the full test suite that turned
a 1.04 bytes-per-pixel slope into 3.27. This small launcher execs the command from its own
small address space, so the figure it reads is the command's alone.

    python tools/peak_rss.py OUTFILE CMD...   runs CMD, writes its peak RSS in bytes to
                                              OUTFILE, exits with CMD's exit code
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def run_with_peak_rss(cmd: list[str], timeout: float | None = None,
                      **kwargs) -> tuple[subprocess.CompletedProcess, int]:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)`` and the command's
    peak RSS in bytes. On timeout the command's whole process group is killed."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "peak"
        proc = subprocess.Popen([sys.executable, __file__, str(record), *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kwargs)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        peak = int(record.read_text()) if record.exists() else 0
    return result, peak


def main(argv: list[str]) -> int:
    record, cmd = argv[0], argv[1:]
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    Path(record).write_text(str(usage.ru_maxrss * 1024))  # KiB on Linux
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
