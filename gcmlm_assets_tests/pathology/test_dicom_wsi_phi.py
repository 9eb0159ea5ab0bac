"""No patient value of a DICOM-WSI series reaches the pathology artifacts, metadata or event log.

Every instance of the series (VOLUME levels, THUMBNAIL, LABEL) carries distinctive patient values
(phi_search.PATIENT_KEYWORDS); patch_coords -> uni_features -> slide_vector run through the real
assets, then every file under the artifacts root, every materialization's and check's metadata,
the run's event log and every file of the instance's home are searched. The same search finds the
values in the landing drop, so it can fail.
"""

from __future__ import annotations

from pathlib import Path

from gcmlm_assets.pathology.assets import patch_coords, slide_vector, uni_features
from gcmlm_assets.pathology.resources import PatchEncoder, TilingSettings
from gcmlm_assets_tests.support.phi_search import PATIENT_KEYWORDS, found_in, leaks_in_run, leaks_under

from gcmlm_assets_tests.support.pathology.dicom_wsi_fixtures import write_dicom_wsi
from gcmlm_assets_tests.support.pathology.features import materialize_patient
from gcmlm_assets_tests.support.pathology.slide_fixtures import real_tissue_rgb

PATIENT = "PW042"  # the landing folder's (pseudonymous) id: what the platform may record


def test_no_patient_value_of_a_dicom_wsi_series_reaches_artifacts_metadata_or_the_event_log(
        instance, base_resources, data_root: Path, test_data):
    wsi = data_root / "landing" / PATIENT / "wsi"
    built = write_dicom_wsi(wsi, real_tissue_rgb(test_data), stem="slide", patient=PATIENT_KEYWORDS)
    assert all(set(found_in(path.read_bytes())) >= {"ZZSECRETNAME", "ZZSECRETID123", "19010203", "ZZACC98765",
                                                    "ZZSECRET HOSPITAL"} for path in built.files)

    resources = {**base_resources, "pathology": TilingSettings(),
                 "encoder": PatchEncoder(name="vit-tiny-random", batch_size=16)}
    result = materialize_patient(instance, [patch_coords, uni_features, slide_vector], resources, PATIENT)
    assert result.success, [e.step_failure_data.error for e in result.get_step_failure_events()]

    artifacts = data_root / "artifacts"
    written = {str(p.relative_to(artifacts)) for p in artifacts.rglob("*") if p.is_file()}
    assert {f"patch_coords/{PATIENT}/slides.json", f"uni_features/{PATIENT}/slide-level0.h5",
            f"slide_vector/{PATIENT}/slide_vector.parquet"} <= written, sorted(written)
    assert leaks_under(artifacts) == {}
    assert leaks_in_run(instance, result) == []
    home = Path(instance.root_directory)
    assert PATIENT.encode() in b"".join(p.read_bytes() for p in home.rglob("*.db"))  # the log is there
    assert leaks_under(home) == {}
