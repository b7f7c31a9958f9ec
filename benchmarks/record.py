"""What every benchmark shares: timing a call, and writing its results with the machine, date and command."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def best_of(function, repeats: int = 3, warm_up: bool = False) -> float:
    """Fastest of ``repeats`` timed calls; with ``warm_up`` one untimed call first, and a
    function whose warm-up took over 10 s is timed once."""
    if warm_up:
        started = time.perf_counter()
        function()
        if time.perf_counter() - started > 10:
            repeats = 1
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def machine() -> dict:
    """The machine a benchmark ran on: CPU model, cores, platform."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform()}


def save_results(path: Path, results, **extra) -> None:
    """Raw benchmark numbers with the machine, the date (UTC) and the command that measured them."""
    command = shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    record = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": f"python {command}", **extra, "results": results}
    Path(path).write_text(json.dumps(record, indent=2))


def rejection_rate(rejections: int, cohorts: int) -> dict:
    """The share of simulated cohorts with a rejection (a family-wise error under a planted null) and its 95 %
    Clopper–Pearson interval."""
    from scipy import stats

    interval = stats.binomtest(rejections, cohorts).proportion_ci(0.95)
    return {"family_wise_error_rate": rejections / cohorts, "ci_low": interval.low, "ci_high": interval.high,
            "cohorts": cohorts}
