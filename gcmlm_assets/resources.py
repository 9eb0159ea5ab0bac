"""Resources shared by every domain: artifact storage, the landing zone, automation timing."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from gcmlm_assets import settings
from gcmlm_assets.storage import ArtifactStore


class ArtifactStorage(dg.ConfigurableResource):
    """Owns where artifacts live: `<root>/<asset>/<patient_id>/...`.

    `root` is a local folder or a mounted volume (in Kubernetes, a PVC mounted
    at the same path in every pod).
    """

    root: str = Field(default_factory=lambda: str(settings.artifacts_root()))

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)


class LandingZone(dg.ConfigurableResource):
    """The folder uploaders drop patients into (see the README's landing-zone contract)."""

    root: str = Field(default_factory=lambda: str(settings.landing_root()))
    max_runs_per_tick: int = Field(default=200, description="Run requests per sensor tick; the rest wait.")

    def path(self) -> Path:
        return Path(self.root)

    def patient_dir(self, patient_id: str) -> Path:
        from gcmlm_assets.patients import validate_patient_id

        return self.path() / validate_patient_id(patient_id, where=str(self.path()))

    def scan_folders(self, scan_key: str) -> tuple[Path, Path]:
        """(CT folder, reference-mask folder) of one scan of a patient's drop (gcmlm_assets/scans.py):
        `ct/` and `ct_label/` for a drop's only scan, `ct/<timepoint>/` and `ct_label/<timepoint>/`."""
        from gcmlm_assets.scans import parse_scan_key, scan_folders

        scan = parse_scan_key(scan_key)
        ct, reference = scan_folders(scan.timepoint)
        drop = self.patient_dir(scan.patient_id)
        return drop / ct, drop / reference

    def refuse_links_leaving(self, patient_id: str, *subfolders: str) -> None:
        """Raise `LandingInputError` (naming each link and its target) when the patient's folder, or
        anything under its `subfolders` (relative paths such as `ct` or `ct/<timepoint>`, each folder
        on the way included), is a symbolic link that leads outside the landing zone: no file outside
        the landing zone is ever read."""
        from gcmlm_assets.landing_input import LandingInputError, describe_links_leaving, link_leaving, links_leaving

        folder = self.patient_dir(patient_id)
        links: list[tuple[str, str]] = []
        paths = [[folder], *([folder.joinpath(*Path(name).parts[:depth + 1]) for depth in range(len(Path(name).parts))]
                             for name in subfolders)]
        for on_the_way in paths:
            for path in on_the_way:
                target = link_leaving(path, self.path())
                if target is not None:
                    links.append((str(path), target))
                    break
            if links:
                break  # what lies behind a link is not looked at
            if on_the_way[-1] != folder:
                links += links_leaving(on_the_way[-1], self.path())
        if links:
            raise LandingInputError(describe_links_leaving(links, self.path()))


class AutomationSettings(dg.ConfigurableResource):
    """How long the automation sensors wait for work to settle (resource key "automation").

    Drops arrive patient by patient; these waits keep the expensive cohort-wide steps (nnU-Net
    training, the cohort refresh) from running once per patient.
    """

    training_debounce_s: float = Field(
        default=300.0, description="segmentation_model trains once its set of reference masks has not "
                                   "changed for this long and no radiology run is queued or running; "
                                   "tumour_classifier likewise once the annotated lymph-node slides' features "
                                   "have not changed and no lymph-node run is queued or running.")
    cohort_quiet_s: float = Field(
        default=120.0, description="The cohort assets refresh once no per-patient run has been queued, "
                                   "running or finished for this long.")
