"""Writing test drops and evaluating landing_sensor like the daemon does."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import dagster as dg

from gcmlm_assets.definitions import landing_sensor
from gcmlm_assets.landing.scan import LN_WSI_FOLDER
from gcmlm_assets.pathology.resources import PatchEncoder
from gcmlm_assets.resources import LandingZone


def make_drop(root: Path, patient_id: str, *, ct: bool = True, wsi: bool = False,
              label: bool = False, ln_wsi: bool = False, ready: bool = True) -> Path:
    folder = root / patient_id
    if ct:
        (folder / "ct").mkdir(parents=True, exist_ok=True)
        (folder / "ct" / "ct.nii.gz").write_bytes(b"ct-" + patient_id.encode())
    if label:
        (folder / "ct_label").mkdir(parents=True, exist_ok=True)
        (folder / "ct_label" / "mask.nii.gz").write_bytes(b"mask")
    if wsi:
        (folder / "wsi").mkdir(parents=True, exist_ok=True)
        (folder / "wsi" / "slide1.svs").write_bytes(b"slide-" + patient_id.encode())
    if ln_wsi:
        (folder / LN_WSI_FOLDER).mkdir(parents=True, exist_ok=True)
        (folder / LN_WSI_FOLDER / "node1.svs").write_bytes(b"lymph-node slide-" + patient_id.encode())
    folder.mkdir(parents=True, exist_ok=True)
    if ready:
        (folder / "READY").write_text("")
    return folder


def add_timepoint(root: Path, patient_id: str, timepoint: str, *, label: bool = False, ready: bool = True) -> Path:
    """One CT scan of the patient in `ct/<timepoint>/` (its reference mask in `ct_label/<timepoint>/`),
    then READY touched (the uploader's commit), as a later scan of a known patient arrives."""
    folder = root / patient_id
    (folder / "ct" / timepoint).mkdir(parents=True, exist_ok=True)
    (folder / "ct" / timepoint / "ct.nii.gz").write_bytes(f"ct-{patient_id}-{timepoint}".encode())
    if label:
        (folder / "ct_label" / timepoint).mkdir(parents=True, exist_ok=True)
        (folder / "ct_label" / timepoint / "mask.nii.gz").write_bytes(b"mask")
    if ready:
        time.sleep(0.01)
        (folder / "READY").write_text("")
    return folder


def touch_later(path: Path, content: bytes) -> None:
    """Rewrite a file so its times move past anything the cursor has seen."""
    time.sleep(0.01)
    path.write_bytes(content)


def touch_ready(folder: Path) -> None:
    """The uploader's commit: READY's mtime (and ctime) move to now."""
    time.sleep(0.01)
    os.utime(folder / "READY")


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


class Ticker:
    """Evaluates the sensor like the daemon does: cursor carried over, partition requests applied."""

    def __init__(self, instance: dg.DagsterInstance, landing_root: Path, max_runs: int = 200,
                 encoder: PatchEncoder | None = None):
        self.instance = instance
        self.landing = LandingZone(root=str(landing_root), max_runs_per_tick=max_runs)
        # An encoder that needs no weights unless a test says otherwise.
        self.encoder = encoder or PatchEncoder(name="vit-tiny-random")
        self.cursor: str | None = None
        self.messages: list[str] = []  # what the ticks logged, as the UI's tick log shows it

    def tick(self) -> dg.SensorResult:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                     resources={"landing": self.landing, "encoder": self.encoder}) as context:
            context.log.addHandler(_Collect(self.messages))
            result = landing_sensor(context)
        for request in result.dynamic_partitions_requests or []:  # as the daemon applies them
            if isinstance(request, dg.DeleteDynamicPartitionsRequest):
                for key in request.partition_keys:
                    self.instance.delete_dynamic_partition(request.partitions_def_name, key)
            else:
                self.instance.add_dynamic_partitions(request.partitions_def_name,
                                                     list(request.partition_keys))
        self.cursor = result.cursor
        return result

    def partitions(self) -> set[str]:
        return set(self.instance.get_dynamic_partitions("patients"))

    def scans(self) -> list[str]:
        """The `ct_scans` partitions, in their order."""
        return list(self.instance.get_dynamic_partitions("ct_scans"))


def requested(result: dg.SensorResult) -> list[tuple[str, str]]:
    """(patient, modality) of each run request, sorted."""
    return sorted((r.partition_key, r.tags["gcmlm/modality"]) for r in result.run_requests)
