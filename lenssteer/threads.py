"""OpenMP threads on a shared CPU: wait passively unless the user says otherwise.

By default the OpenMP runtime under torch keeps idle threads spinning for a while, waiting for the
next parallel region. On a machine whose cores other processes also use, the spinning threads take
the very cores the working ones need: training ran 4-11x slower that way (benchmarks/RESULTS.md,
"threads on a shared CPU"). ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep instead. The CLI and
the recipes set it before torch loads; a value the user set is kept. It only works if set before the
OpenMP runtime starts, i.e. before ``import torch``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["HELP", "prefer_passive_waiting"]

HELP = (
    "OMP_WAIT_POLICY defaults to PASSIVE (idle OpenMP threads sleep instead of spinning, which keeps "
    "a shared CPU fast); set OMP_WAIT_POLICY yourself to override."
)


def prefer_passive_waiting() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless set already. True if it now applies to this process
    (torch not yet loaded)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules
