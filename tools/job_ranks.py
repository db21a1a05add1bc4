"""The live ranks of a data-parallel train job on this machine, found by their environment.

torch's elastic agent starts each rank in a session of its own, so a rank is found neither
in its launcher's process group nor by name; every rank our agent starts carries the run
it trains into (``steps.tracking.training.elastic.LAUNCHED_FOR_RUN``) and its global
``RANK``. Used by the tests that kill ranks (tests/test_distributed.py) and by `make bench`.
"""

from __future__ import annotations

import psutil

from steps.tracking.training.elastic import LAUNCHED_FOR_RUN


def ranks_of(run_id: str) -> dict[int, int]:
    """Global rank -> pid of the live ranks training into ``run_id`` on this machine."""
    ranks = {}
    for process in psutil.process_iter():
        try:
            env = process.environ()
            if env.get(LAUNCHED_FOR_RUN) == run_id and "RANK" in env and \
                    process.status() != psutil.STATUS_ZOMBIE:
                ranks[int(env["RANK"])] = process.pid
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    return ranks
