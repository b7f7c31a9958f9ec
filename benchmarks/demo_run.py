"""What `make demo` printed and how long its stages took, recorded from a finished demo workspace.

    make demo && .venv/bin/python benchmarks/demo_run.py [--workspace workspace/demo] [--wall-seconds S]

Reads the workspace's last complete run in ``provenance.json`` and writes, to
``benchmarks/results/demo_run.json``, the seconds of each stage, the block of results the run
printed (re-rendered from the same record) and, when given, the wall time of ``time make demo``.
The documentation's demo results are generated from that file.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from record import save_results  # sibling script
from rich.console import Console

from engine.layout import Layout, Provenance
from pipelines.runner import print_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace/demo"))
    parser.add_argument("--wall-seconds", type=float, default=None, help="the wall time of `time make demo`")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    layout = Layout(args.workspace.resolve())
    run = next(run for run in reversed(Provenance.read(layout).runs) if run.state == "complete")
    console = Console(record=True, width=400, file=io.StringIO())
    print_results(console, layout, run)
    block = console.export_text().replace(str(layout.root), "workspace/demo")
    stages = {name: summary["seconds"] for name, summary in run.stages.items()}
    save_results(args.out / "demo_run.json", [], stage_seconds=stages, wall_seconds=args.wall_seconds,
                 results_block=block, started=run.started)
    print(block)


if __name__ == "__main__":
    main()
