"""The documentation's generated pages, written when MkDocs builds the site (mkdocs-gen-files).

- ``reference/catalog.md``: every catalog field, from the schema (:mod:`pipelines.reference`);
- ``reference/cli.md``: every command's help, from the command line itself;
- ``reference/api/*.md``: the public names of the engine's modules, from their docstrings (mkdocstrings);
- ``benchmarks.md``: what each benchmark measures (its script's docstring) and its tables, from the files it
  wrote in ``benchmarks/results/``, each with the machine, the date and the command;
- ``demo-results.md``: what the last recorded ``make demo`` printed and measured (``benchmarks/demo_run.py``);
- ``changelog.md``: ``CHANGELOG.md``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import mkdocs_gen_files

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path[:0] = [str(REPO), str(BENCHMARKS)]

from pipelines.reference import catalog_reference  # noqa: E402 (the repository on the path first)

#: The API reference: page → (introduction, modules).
API = {
    "data": ("Inputs, the cohort store, registration and the synthetic cohort.",
             ["engine.data.inputs", "engine.data.labels", "engine.data.store", "engine.data.masker", "engine.data.grid",
              "engine.data.registration", "engine.data.synth"]),
    "analysis": ("Atlases and region reductions, features, statistics and associations.",
                 ["engine.analysis.atlas", "engine.analysis.features", "engine.analysis.mask_relevance",
                  "engine.analysis.stats", "engine.analysis.association"]),
    "models": ("Networks, training, attribution, the relevance store and the validation of explanations.",
               ["engine.models.networks", "engine.models.volumes", "engine.models.splits", "engine.models.metrics",
                "engine.models.training", "engine.models.ensembles", "engine.models.baselines", "engine.models.lrp",
                "engine.models.attribution", "engine.models.relevance", "engine.models.noise",
                "engine.models.validation"]),
    "outputs": ("The workspace as Python objects, the report, and the report in a browser.",
                ["engine.outputs.workspace", "engine.outputs.report", "engine.outputs.browser"]),
    "workspace": ("The workspace's layout (every output's path, freshness, atomic writes) and running tasks.",
                  ["engine.layout", "engine.tasks"]),
}


def write(path: str, text: str) -> None:
    with mkdocs_gen_files.open(path, "w") as page:
        page.write(text)


def api_pages() -> None:
    for page, (introduction, modules) in API.items():
        blocks = "\n\n".join(f"::: {module}" for module in modules)
        write(f"reference/api/{page}.md", f"# {page.capitalize()}\n\n{introduction}\n\n{blocks}\n")


def cli_page() -> None:
    import click
    import typer

    from pipelines.cli import app

    command = typer.main.get_command(app)
    lines = ["# Command line", "", "`relcohort COMMAND --help` prints the same.", ""]
    with click.Context(command, info_name="relcohort") as context:
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            with click.Context(sub, info_name=name, parent=context) as inner:
                lines += [f"## `relcohort {name}`", "", "```text", sub.get_usage(inner), "```", "",
                          _markdown(inspect.cleandoc(sub.help or "")), "",
                          "| argument or option | what |", "|---|---|"]
                for parameter in sub.params:
                    record = parameter.get_help_record(inner)
                    names, what = record if record else (parameter.name.upper(), parameter.help or "")
                    lines.append(f"| `{names}` | {what} |")
                lines.append("")
    write("reference/cli.md", "\n".join(lines))


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ``code`` → `code`, :func:`x` → `x`."""
    return re.sub(r":\w+:`~?([\w.]+)`", r"`\1`", text).replace("``", "`")


def _script(name: str):
    """A benchmark script as a module (its docstring and its ``table`` function)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorded(path: Path, record: dict, script) -> str:
    """The header of a result: the command, the machine and the date it was measured on."""
    machine = record.get("machine") or {}
    if isinstance(machine, dict):
        described = ", ".join(f"{key} {value}" for key, value in machine.items())
    else:
        described = str(machine)
    date = record.get("date")
    if date is None:  # written before results carried their date: the commit that wrote the file
        date = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path.relative_to(REPO))], cwd=REPO,
                              capture_output=True, text=True).stdout.strip() + " (the commit that wrote the file)"
    command = record.get("command") or script.__doc__.strip().splitlines()[2].strip()
    return f"`{path.relative_to(REPO)}` · command `{command}` · machine: {described} · date: {date}"


def _generic_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmarks_page() -> None:
    lines = ["# Benchmarks", "",
             "Each section is a script in `benchmarks/`: what it measures (its docstring) and the tables of the "
             "results it wrote to `benchmarks/results/`, each with the command, the machine and the date. "
             "`make benchmark` runs the main ones again; every number on this page comes from those files.", ""]
    for path in sorted(BENCHMARKS.glob("*.py")):
        if path.stem in ("record",):
            continue
        script = _script(path.stem)
        results = sorted((BENCHMARKS / "results").glob(f"{path.stem}*.json"))
        if path.stem == "ingest_throughput":
            results = [BENCHMARKS / "results" / "ingest.json"]
        title, _, body = script.__doc__.strip().partition("\n")
        lines += [f"## {title.rstrip('.')}", "", f"`benchmarks/{path.name}`", "", _markdown(body.strip("\n")), ""]
        for result in results:
            record = json.loads(result.read_text())
            rows = record.get("results", record.get("rows")) if isinstance(record, dict) else record
            lines += [_recorded(result, record if isinstance(record, dict) else {}, script), ""]
            if isinstance(rows, list) and rows and hasattr(script, "table"):
                try:
                    lines += [script.table(rows), ""]
                    continue
                except (KeyError, TypeError, ValueError):
                    pass
            lines += [_generic_table(rows) if isinstance(rows, list) and rows else
                      "```json\n" + json.dumps(record, indent=1)[:4000] + "\n```", ""]
    write("benchmarks.md", "\n".join(lines))


def demo_results_page() -> None:
    path = BENCHMARKS / "results" / "demo_run.json"
    record = json.loads(path.read_text())
    stages = record["stage_seconds"]
    recorded = _recorded(path, record, _script("demo_run"))
    lines = ["# The demo's results", "",
             f"What `make demo` printed and measured on its last recorded run ({recorded}).",
             "", "| stage | seconds |", "|---|---|",
             *(f"| {name} | {seconds:.0f} |" for name, seconds in stages.items()),
             f"| **all** (`time make demo`, the package installed) | **{record['wall_seconds']:.0f}** |"
             if record.get("wall_seconds") else "", "",
             "It ends by printing where the results are:", "", "```text", record["results_block"].rstrip(), "```", ""]
    write("demo-results.md", "\n".join(lines))


def changelog_page() -> None:
    write("changelog.md", (REPO / "CHANGELOG.md").read_text())


write("reference/catalog.md", catalog_reference())
cli_page()
api_pages()
benchmarks_page()
demo_results_page()
changelog_page()
