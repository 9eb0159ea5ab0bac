"""No DICOM patient tag of an input series reaches the artifacts, the metadata or the event log.

A DICOM CT series gets distinctive patient tags; ct_image -> ct_mask (reference mask) ->
radiomics_row -> ct_mask_seg -> radiomics_sr run through the real assets on a real instance; then
every artifact file (the DICOM SEG and SR too, whose patient is the platform's id; raw
bytes, gz-decompressed, parquet contents), every materialization's and check's metadata, every
event of the instance's log and every file of the instance's home (event database, compute logs)
is searched for them. The same search finds them in the landing drop, so it can fail.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import dagster as dg
import pydicom
import pyarrow.parquet as pq
import SimpleITK as sitk
from dagster._serdes import serialize_value

from gcmlm_assets.catalogue import MASK_SEG_FILE, RADIOMICS_ROW, RADIOMICS_SR_FILE, RADIOMICS_TABLE
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets.radiology import resources as radiology_resources
from gcmlm_assets.radiology.assets import ct_image, ct_mask, radiomics_row
from gcmlm_assets.radiology.dicom_assets import ct_mask_seg, radiomics_sr
from gcmlm_assets_tests.support.phi_search import PATIENT_KEYWORDS, found_in, leaks_under
from gcmlm_assets_tests.support.radiology.ct import CT_NAME, STOMACH_NAME, ct_crop, make_drop, write_dicom_series
from gcmlm_assets_tests.support.radiology.dicom_results import SERIES_TAGS, assert_pseudonymised

PATIENT = "GC042"  # the landing folder's (pseudonymous) id: what the platform may record
# The series' tags (group|element) carrying the distinctive values phi_search looks for.
PATIENT_TAGS = {"0010|0010": PATIENT_KEYWORDS["PatientName"], "0010|0020": PATIENT_KEYWORDS["PatientID"],
                "0010|0030": PATIENT_KEYWORDS["PatientBirthDate"], "0008|0050": PATIENT_KEYWORDS["AccessionNumber"],
                "0008|0080": PATIENT_KEYWORDS["InstitutionName"]}


def test_no_patient_tag_of_a_dicom_series_reaches_artifacts_metadata_or_the_event_log(
        instance, data_root, base_resources, test_data, tmp_path):
    landing, artifacts = data_root / "landing", data_root / "artifacts"
    real_ct = test_data / "ct" / "totalsegmentator" / CT_NAME
    stomach = sitk.DICOMOrient(sitk.ReadImage(str(test_data / "ct" / "totalsegmentator" / STOMACH_NAME)), "LPS")
    mask_file = tmp_path / "stomach.nii.gz"
    sitk.WriteImage(stomach[30:94, 20:84, 9:21], str(mask_file), True)  # the crop ct_crop takes
    drop = make_drop(landing, PATIENT, [], mask_file)
    # SERIES_TAGS: a frame of reference, without which the series gets no SEG
    slices = write_dicom_series(ct_crop(real_ct), drop / "ct", tags={**SERIES_TAGS, **PATIENT_TAGS})

    # The drop carries the tags (as a DICOM reader sees them), and the search finds them there.
    header = pydicom.dcmread(slices[0], stop_before_pixels=True)
    assert (str(header.PatientName), header.PatientID, header.PatientBirthDate, header.AccessionNumber,
            header.InstitutionName) == tuple(PATIENT_TAGS.values())
    assert set(found_in(slices[0].read_bytes())) >= {"ZZSECRETNAME", "ZZSECRETID123", "19010203", "ZZACC98765",
                                                    "ZZSECRET HOSPITAL"}

    instance.add_dynamic_partitions("ct_scans", [PATIENT])  # the drop's only scan
    resources = {**radiology_resources.resources("local"), **base_resources}
    result = dg.materialize([ct_image, ct_mask, radiomics_row, ct_mask_seg, radiomics_sr], partition_key=PATIENT,
                            instance=instance, resources=resources, raise_on_error=False)
    assert result.success, [e.step_failure_data.error for e in result.get_step_failure_events()]
    ct_meta = {k: v.value for k, v in result.asset_materializations_for_node("ct_image")[0].metadata.items()}
    assert ct_meta["source"].startswith(f"DICOM series of {len(slices)} files")
    store = ArtifactStore(artifacts)
    assert RADIOMICS_TABLE.path(store, PATIENT).is_file()
    # The SEG and SR were written (not skipped), in the CT's study, as the platform's patient.
    for file in (MASK_SEG_FILE, RADIOMICS_SR_FILE):
        assert_pseudonymised(file.path(store, PATIENT), PATIENT, slices[0])

    # Artifacts: every file, as bytes and decompressed.
    written = sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*") if p.is_file())
    assert {f"ct_image/{PATIENT}/ct.nii.gz", f"ct_mask/{PATIENT}/mask.nii.gz",
            f"{RADIOMICS_ROW.key}/{PATIENT}/{RADIOMICS_TABLE.name}", f"ct_mask_seg/{PATIENT}/{MASK_SEG_FILE.name}",
            f"radiomics_sr/{PATIENT}/{RADIOMICS_SR_FILE.name}"} <= set(written)
    assert leaks_under(artifacts) == {}

    # Metadata of every materialization and check result.
    recorded = [serialize_value(m.metadata) for m in result.get_asset_materialization_events()
                for m in [m.step_materialization_data.materialization]]
    recorded += [serialize_value(e.metadata) for e in result.get_asset_check_evaluations()]
    assert len(recorded) >= 3 and all(found_in(text.encode()) == [] for text in recorded)

    # The event log as the instance keeps it (log lines, events, metadata), and every file of the
    # instance's home: its databases and the captured compute logs.
    [run] = instance.get_runs()
    events = instance.all_logs(run.run_id)
    assert any(e.dagster_event and e.dagster_event.is_step_materialization for e in events)
    for entry in events:
        assert found_in(serialize_value(entry).encode()) == [], entry
    assert found_in(serialize_value(run).encode()) == []
    home = Path(instance.root_directory)
    assert any(p.suffix == ".db" for p in home.rglob("*")), sorted(home.rglob("*"))
    assert PATIENT.encode() in b"".join(p.read_bytes() for p in home.rglob("*.db"))  # the log is there
    assert leaks_under(home) == {}


def test_the_search_finds_tags_hidden_in_gzip_and_parquet(tmp_path):
    import pyarrow as pa

    (tmp_path / "header.nii.gz").write_bytes(gzip.compress(b"descrip zzSecretName^zz"))
    pq.write_table(pa.table({"patient": ["ZZSECRETID123"]}, metadata={b"birth": b"1901-02-03"}),
                   tmp_path / "row.parquet", compression="zstd")
    assert leaks_under(tmp_path) == {"header.nii.gz": ["ZZSECRETNAME"], "row.parquet": ["1901-02-03", "ZZSECRETID123"]}
