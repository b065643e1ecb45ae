"""Shared pieces of the benchmarks: result rows, alternating timing, isolated memory runs, machine info.

Every comparison runs its ways side by side in one process, one after the other in each round with
the order rotated every round, so that a change of machine load hits both ways alike; we report the
median of each way and the ratio of the medians. Memory is measured in a fresh subprocess per
variant (:func:`isolated`): the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the measured work) minus the resident size at that moment.
Those processes run with ``MALLOC_MMAP_THRESHOLD_=131072``: every allocation above 128 KB is its
own mapping, returned to the system when freed, so the resident size follows the live tensors.
(With glibc's default, adaptive threshold, freed blocks stay in the heap and the same work
measured anywhere from +62 MB to +215 MB from one process to the next.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_train import _peak_rss_mb, _reset_peak, _rss_mb  # noqa: E402

__all__ = [
    "Row",
    "alternate",
    "isolated",
    "isolated_env",
    "load_average",
    "machine_info",
    "median",
    "paired_ratio",
    "memory_window",
    "versions",
]


@dataclass
class Row:
    """One line of the results table: ``ours`` against ``baseline``, and the target on the ratio.

    ``ratio`` is oriented as the target is written (e.g. speed-up plain/fast, or steered/base time);
    ``met`` is None where the row is reported without a target.
    """

    section: str
    name: str
    baseline: str
    ours: str
    ratio: float | None
    target: str
    met: bool | None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(baseline: list[float], ours: list[float]) -> float:
    """Median of ``ours[i] / baseline[i]``: each pair ran back to back, so shared load cancels."""
    if len(baseline) != len(ours) or not baseline:
        raise ValueError("paired_ratio needs two non-empty lists of the same length")
    return statistics.median(o / b for b, o in zip(baseline, ours, strict=True))


def alternate(
    ways: dict[str, Callable[[], float | None]], rounds: int, warmup: int = 1, offset: int = 0
) -> dict[str, list[float]]:
    """Run every way once per round (order rotated each round); seconds of each run, per way.

    A way may return its own measured seconds (to leave set-up out); otherwise it is timed whole.
    ``warmup`` rounds run first and are not recorded; ``offset`` shifts the first round's order.
    """
    names = list(ways)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = (round_index + offset) % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            measured = ways[name]()
            elapsed = time.perf_counter() - started if measured is None else float(measured)
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


class memory_window:  # noqa: N801 (used like a function: ``with memory_window() as window``)
    """Peak resident growth of the ``with`` block, in MB: ``window.growth_mb`` after it.

    The kernel's peak counter is reset on entry (Linux); ``window.reset`` says whether it could be.
    """

    def __enter__(self) -> memory_window:
        self.reset = _reset_peak()
        self.before_mb = _rss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = _peak_rss_mb()
        self.growth_mb = self.peak_mb - self.before_mb


def isolated(target: str, timeout: float = 900, **kwargs: Any) -> dict[str, Any]:
    """Call ``module:function(**kwargs)`` in a fresh Python process and return its JSON result.

    Used for memory: every variant starts from the same empty process, so one variant's freed but
    retained heap never hides another's peak.
    """
    command = [
        sys.executable,
        str(Path(__file__)),
        "--call",
        target,
        "--kwargs",
        json.dumps(kwargs),
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=isolated_env()
    )
    if out.returncode != 0:
        raise RuntimeError(f"{target} failed in its subprocess:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def isolated_env() -> dict[str, str]:
    """Environment of a memory subprocess: the caller's torch threads, allocations as mappings."""
    import torch

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and the load average now."""
    import torch

    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in load_average()],
    }


def versions() -> dict[str, str]:
    """Versions of python and the libraries whose speed we measure."""
    import peft
    import torch
    import transformers

    import lenssteer

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lenssteer": lenssteer.__version__,
    }


def _main() -> None:
    parser = argparse.ArgumentParser(description="run one benchmark function in this process")
    parser.add_argument("--call", required=True, help="module:function")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments")
    args = parser.parse_args()
    module_name, function_name = args.call.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    print(json.dumps(function(**json.loads(args.kwargs))))


if __name__ == "__main__":
    _main()
