"""The live ranks of a data-parallel train job on this machine, found by their environment.

torch's elastic agent starts each rank in a session of its own, so a rank is found neither
in its launcher's process group nor by name; every rank our launcher starts carries the run
it trains into (``steps.tracking.distributed.LAUNCHED_FOR_RUN``) and its global ``RANK``.
Used by the tests that kill ranks (tests/test_distributed.py) and by `make bench`.
"""

from __future__ import annotations

import os
from pathlib import Path

from steps.tracking.distributed import LAUNCHED_FOR_RUN


def ranks_of(run_id: str) -> dict[int, int]:
    """Global rank -> pid of the live ranks training into ``run_id`` on this machine."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        if env.get(LAUNCHED_FOR_RUN.encode()) == run_id.encode():
            ranks[int(env[b"RANK"])] = int(entry)
    return ranks
