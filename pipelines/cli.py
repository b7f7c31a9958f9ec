"""The ``relcohort`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Cohort analysis of brain-MRI relevance maps.")
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    errors.print(f"[red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(1)


@app.command()
def validate(catalog: Annotated[Path, typer.Argument(help="catalog YAML file")]) -> None:
    """Check a catalog against the schema and against its data (the participants table, every file there, a sample
    of each modality opened: grid, space) and report every problem with its field, before any work."""
    from pipelines.catalog import CatalogError, load_catalog
    from pipelines.preflight import preflight

    try:
        parsed, _ = load_catalog(catalog)
    except CatalogError as error:
        _fail(str(error))
    problems = preflight(parsed)
    if problems:
        _fail(str(CatalogError(catalog.resolve(), problems)))
    console.print(f"{catalog}: valid (workspace {parsed.workspace}, modalities {', '.join(parsed.modalities)})")


@app.command()
def run(
    catalog: Annotated[Path, typer.Argument(help="catalog YAML file")],
    cluster: Annotated[str | None, typer.Option(
        "--cluster", help="run on this cluster profile instead of the catalog's: local or slurm "
        "(SLURM settings then come from the site's dask-jobqueue config)")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error too")] = False,
) -> None:
    """Check the catalog against its data, then run every stage (those already done are skipped)."""
    from cluster import ClusterSetupError
    from engine.analysis.association import AnalysisError
    from engine.data.inputs import InputError
    from engine.data.registration import RegistrationError
    from engine.data.store import IngestError
    from pipelines.catalog import CatalogError
    from pipelines.runner import StageError, WorkspaceBusy, run_catalog

    if cluster is not None and cluster not in ("local", "slurm"):
        _fail(f"--cluster must be local or slurm, not {cluster!r}")
    try:
        run_catalog(catalog, console, cluster=cluster)
    except (CatalogError, InputError, IngestError, RegistrationError, WorkspaceBusy, AnalysisError,
            ClusterSetupError, StageError) as error:  # a problem with the inputs or the catalog: one message
        if debug:
            errors.print_exception()
        _fail(str(error))
    except Exception as error:
        errors.print_exception()
        _fail(f"relcohort met an error it has no message for, a bug rather than a problem with your inputs: "
              f"{type(error).__name__}: {error}. Please report it in the project's issue tracker with the traceback "
              "above and the workspace's provenance.json.")


@app.command()
def status(workspace: Annotated[Path, typer.Argument(help="workspace folder of a catalog run")]) -> None:
    """List what each stage has produced in a workspace."""
    from engine.layout import Layout, Provenance
    from pipelines.runner import workspace_status

    try:
        stages = workspace_status(workspace)
    except FileNotFoundError as error:
        _fail(str(error))
    provenance = Provenance.read(Layout(workspace))
    last = provenance.last
    if last is not None:
        console.print(f"last run {last.started} → {last.finished or '?'}: {last.state or 'running?'} "
                      f"(catalog {last.catalog_file}, sha256 {last.catalog_sha256[:12]})", highlight=False)
        if last.error:
            console.print("  " + last.error.replace("\n", "\n  "), style="red", highlight=False)
    width = max(len(name) for name, _ in stages)
    for name, produced in stages:
        if produced is None:
            unused = provenance.stages is not None and name not in provenance.stages
            produced = "[dim]not part of this workspace's catalog[/]" if unused else "[dim]nothing yet[/]"
        console.print(f"[bold]{name:<{width}}[/] {produced}", highlight=False)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the cohort into")],
    subjects: Annotated[int, typer.Option("--subjects", "-n", min=1, help="number of participants")],
    voxel_size: Annotated[float, typer.Option(min=0.5, max=12, help="isotropic voxel size in mm")] = 4.0,
    seed: Annotated[int, typer.Option(min=0, help="random seed")] = 0,
    sessions: Annotated[int, typer.Option(min=1, max=9, help="1 to this many BIDS sessions per participant")] = 1,
    patients: Annotated[float, typer.Option(min=0, max=0.99, help="share of participants who are patients "
                                            "(diagnosis AD or MS by --disease; the others CN)")] = 0.0,
    disease: Annotated[str, typer.Option(help="the patients' disease: alzheimer (medial temporal atrophy) or ms "
                                         "(periventricular and callosal lesions, enlarged ventricles)")] = "alzheimer",
    workers: Annotated[int, typer.Option(min=1, help="local Dask worker processes")] = 2,
    overwrite: Annotated[bool, typer.Option(help="delete what OUT_DIR holds first")] = False,
) -> None:
    """Generate a synthetic cohort with planted age effects (BIDS-like files)."""
    from cluster import LocalProfile
    from engine.data.synth import DISEASES, generate_cohort
    from engine.tasks import Execution
    from pipelines.runner import progress_bar, progress_callback

    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        _fail(f"{out_dir} is not empty; choose a new folder or pass --overwrite")
    if disease not in DISEASES:
        _fail(f"--disease must be one of {', '.join(sorted(DISEASES))}, got {disease!r}")
    with LocalProfile(n_workers=workers).start() as cluster, progress_bar(console) as bar:
        execution = Execution(cluster.client, progress_callback(bar, "synth"))
        table = generate_cohort(out_dir, subjects, voxel_size, seed, execution=execution, overwrite=overwrite,
                                max_sessions=sessions, patients=patients, disease=disease)
    scans = f" ({len(table)} scans in ses- folders, sessions tables per participant)" if sessions > 1 else ""
    console.print(f"{subjects} participants{scans} in {out_dir} (participants.tsv, planted_effects.json, "
                  "mask.nii.gz)")


if __name__ == "__main__":
    app()
