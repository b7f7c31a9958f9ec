"""The pipeline's stages. Each is idempotent: a finished stage does no work when run again.

A stage has a ``name``, ``applies(catalog)``, ``run(catalog, client, progress) -> summary``
and ``report(workspace) -> str | None`` (what it has produced, for ``relcohort status``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from engine import store, synth
from engine.grid import MNI_SPACE
from pipelines.catalog import Catalog

Progress = Callable[[str, int, int], None]

IMAGES = "images.zarr"
DEMO_COHORT = "demo_cohort"
SYNTH_RECORD = ".relcohort-synth.json"


class SynthStage:
    """Generate the demo cohort's files (skipped when the catalog names a directory)."""

    name = "synth"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.cohort.demo is not None

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        settings = catalog.cohort.demo.model_dump()
        out = catalog.cohort_root
        record = out / SYNTH_RECORD
        if record.is_file() and json.loads(record.read_text()) == settings:
            return {"cohort": str(out), "subjects": settings["subjects"], "generated": 0}
        record.unlink(missing_ok=True)
        synth.generate_cohort(out, settings["subjects"], settings["voxel_size"], settings["seed"],
                              client=client, progress=progress)
        record.write_text(json.dumps(settings))  # written last: marks the cohort whole
        return {"cohort": str(out), "subjects": settings["subjects"], "generated": settings["subjects"]}

    def report(self, workspace: Path) -> str | None:
        record = workspace / DEMO_COHORT / SYNTH_RECORD
        if not record.is_file():
            return None
        settings = json.loads(record.read_text())
        return (f"{workspace / DEMO_COHORT}: {settings['subjects']} synthetic participants at "
                f"{settings['voxel_size']} mm, seed {settings['seed']}")


class IngestStage:
    """Ingest the cohort's images into ``images.zarr`` (incremental; see ``engine.store.ingest``)."""

    name = "ingest"

    def applies(self, catalog: Catalog) -> bool:
        return True

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        participants = store.read_participants(catalog.participants_file)
        space = catalog.cohort.space or (MNI_SPACE if catalog.cohort.demo else None)
        report = store.ingest(
            catalog.workspace / IMAGES, participants, catalog.cohort_root, catalog.modality_list(),
            catalog.mask_file, space=space, on_error=catalog.ingest.on_error,
            subjects_per_chunk=catalog.ingest.subjects_per_chunk, voxels_per_chunk=catalog.ingest.voxels_per_chunk,
            client=client, progress=progress,
        )
        return {"store": str(report.store), "subjects": report.n_subjects, "appended": report.appended,
                "unchanged": report.unchanged, "written": report.written,
                "skipped": [problem.record() for problem in report.problems]}

    def report(self, workspace: Path) -> str | None:
        path = workspace / IMAGES
        if not (path / "zarr.json").exists():
            return None
        attrs = store.ingest_record(path)
        dataset = store.open_cohort(path)
        ingest = attrs["ingest"]
        lines = [f"{path}: {dataset.sizes['subject']} complete subjects × {dataset.sizes['voxel']} voxels; "
                 f"modalities {', '.join(attrs['modalities'])}; grid {attrs['grid']['shape']} "
                 f"({attrs['grid']['space']}); last ingest {ingest['state']} at {ingest.get('finished', '?')}"]
        incomplete = attrs["n_subjects"] - dataset.sizes["subject"]
        if incomplete:
            lines.append(f"  {incomplete} row(s) not wholly ingested (hidden); run the ingest again")
        for skipped in ingest.get("skipped", []):
            lines.append(f"  skipped {skipped['participant_id'] or '-'}: {skipped['file'] or ''} {skipped['problem']}")
        return "\n".join(lines)


STAGES = [SynthStage(), IngestStage()]
