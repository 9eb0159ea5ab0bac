"""Dagster assets of the mask and the features in DICOM (thin wiring over dicom_seg.py and dicom_sr.py).

ct_mask_seg: the gastric mask as a DICOM SEG of the CT series it was made on; radiomics_sr: the
radiomics row as a TID 1500 SR that references the SEG. Both run per CT scan after radiomics_row
in the radiology chain, reuse their stored file while their inputs are unchanged, and check their
file read back against what it was made from. A CT that came in as a NIfTI, NRRD or MHA volume has
no study, series or instances to reference: both materialize without a file, saying why. The
DICOM patient of both is the scan's patient (a patient's timepoints are one patient in a PACS).
"""

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.batching import per_patient_events
from gcmlm_assets.catalogue import (
    CT_IMAGE, CT_MASK, CT_MASK_SEG, MASK_SEG_FILE, MASK_VOLUME, RADIOMICS_ROW, RADIOMICS_SR, RADIOMICS_SR_FILE,
    RADIOMICS_TABLE, Asset)
from gcmlm_assets.inputs import required_file
from gcmlm_assets.landing_input import LandingInputError
from gcmlm_assets.partitions import ct_scans_partitions
from gcmlm_assets.policies import TRANSIENT_RETRY, stored_materialization
from gcmlm_assets.radiology import checks, ct_io, dicom_seg, dicom_sr, features
from gcmlm_assets.radiology.assets import input_failure, refuse_scan_links, scan_of
from gcmlm_assets.radiology.resources import RadiomicsSettings
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.reuse import StoredOutput, combined_digest
from gcmlm_assets.storage import ArtifactStore, sha256_file, sha256_text

WRITTEN, NONE = "written", "none"


# What each output is made from (reuse.py); gcmlm_assets_tests/core/test_fingerprints.py pins them.

def ct_mask_seg_fingerprint(ct_inputs_sha: str, mask_sha: str, origin: str) -> str:
    return sha256_text(CT_MASK_SEG.key, CT_MASK_SEG.code_version, ct_inputs_sha, mask_sha, origin)


def radiomics_sr_fingerprint(seg_version: str, row_sha: str, settings_sha: str) -> str:
    return sha256_text(RADIOMICS_SR.key, RADIOMICS_SR.code_version, seg_version, row_sha, settings_sha)


def recorded_manifest(asset: Asset, store: ArtifactStore, patient_id: str) -> dict:
    """The manifest of an input asset's stored output, or a Failure naming what to materialize."""
    manifest = store.read_manifest(asset.key, patient_id)
    if manifest is None:
        missing = store.path(asset.key, patient_id, store.MANIFEST)
        raise dg.Failure(description=f"{missing}: missing; materialize {asset.key} for patient {patient_id} first",
                         metadata={"missing": str(missing)}, allow_retries=False)
    return manifest


def mask_origin(mask_manifest: dict) -> dicom_seg.MaskOrigin:
    """Who made the mask, from ct_mask's manifest: the reference file of the drop, or the model."""
    provenance = mask_manifest.get("provenance", {})
    if mask_manifest.get("source") == "predicted":
        return dicom_seg.model_origin(provenance["model_id"])
    return dicom_seg.reference_origin(provenance.get("reference_file") or "reference mask")


def seg_version(seg_manifest: dict) -> str:
    """What the SR is made from on the SEG's side: the SEG file's hash, or why there is none."""
    if seg_manifest.get("seg") == WRITTEN:
        return seg_manifest["files"][MASK_SEG_FILE.name]
    return sha256_text(NONE, seg_manifest.get("reason", ""))


def _absent(output: StoredOutput, file, reason: str, **facts) -> None:
    # A file of an earlier, DICOM drop of the patient must not outlive the drop.
    output.path(file).unlink(missing_ok=True)
    output.record_digests({}, reason=reason, **facts)


# ---------------------------------------------------------------- ct_mask_seg


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **CT_MASK_SEG.dagster_attributes(),
        deps=[CT_IMAGE.key, CT_MASK.key],
        skippable=True,
        description=f"The gastric mask as a DICOM Segmentation (`{MASK_SEG_FILE.name}`) of the CT series in "
                    "`<landing>/<patient>/ct/` (or `ct/<timepoint>/`): one frame per source slice, referencing "
                    "its study, series and instances, with the mask's maker (reference mask or nnU-Net model). "
                    "None, with the reason, for a CT dropped as a NIfTI, NRRD or MHA volume.",
    )],
    partitions_def=ct_scans_partitions,
    check_specs=checks.CT_MASK_SEG_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def ct_mask_seg(context: dg.AssetExecutionContext, storage: ArtifactStorage, landing: LandingZone):
    yield from per_patient_events(context, CT_MASK_SEG,
                                  lambda patient_id: [_ct_mask_seg_for(context, patient_id, storage, landing)],
                                  checks.CT_MASK_SEG_CHECK_SPECS)


def _ct_mask_seg_for(context: dg.AssetExecutionContext, patient_id: str, storage: ArtifactStorage,
                     landing: LandingZone) -> dg.MaterializeResult:
    store = storage.store()
    mask_path = required_file(MASK_VOLUME, store, patient_id)
    ct_inputs = recorded_manifest(CT_IMAGE, store, patient_id)["inputs"]
    origin = mask_origin(recorded_manifest(CT_MASK, store, patient_id))
    mask_sha = sha256_file(mask_path)
    output = StoredOutput(store, CT_MASK_SEG, patient_id,
                          ct_mask_seg_fingerprint(combined_digest(ct_inputs), mask_sha, repr(origin)))
    seg_path = output.path(MASK_SEG_FILE)
    if not output.reused:
        folder = landing.scan_folders(str(scan_of(patient_id)))[0]
        try:
            refuse_scan_links(landing, patient_id, reference=False)
            now = {path.name: sha256_file(path) for path in ct_io.input_files(folder)}
        except (ct_io.CTInputError, LandingInputError) as error:
            raise input_failure(error) from error
        if now != ct_inputs:  # the SEG references the very instances ct.nii.gz and the mask were made from
            raise input_failure(ValueError(
                f"{folder}: the CT drop changed since ct_image was materialized for patient {patient_id}; "
                "materialize ct_image and ct_mask again first"))
        inputs = {CT_IMAGE.key: combined_digest(ct_inputs), CT_MASK.key: mask_sha}
        reason = dicom_seg.seg_absent_reason(folder)
        if reason:
            _absent(output, MASK_SEG_FILE, reason, seg=NONE, inputs=inputs)
        else:
            try:
                written = dicom_seg.write_seg(folder, mask_path, seg_path, origin, scan_of(patient_id).patient_id)
            except dicom_seg.SegInputError as error:
                raise input_failure(error) from error
            output.record([MASK_SEG_FILE], seg=WRITTEN, inputs=inputs, **written)
    manifest = output.manifest
    written = manifest["seg"] == WRITTEN
    context.log.info(f"{patient_id}: SEG {'reused' if output.reused else 'made'}: "
                     + (str(seg_path) if written else f"none ({manifest['reason']})"))
    shown = ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "referenced_series_uid",
             "referenced_instances", "frames", "segment", "algorithm_type", "algorithm")
    return stored_materialization(
        output,
        metadata={
            "seg": manifest["seg"],
            **({"path": dg.MetadataValue.path(str(seg_path)), "sha256": output.sha256(MASK_SEG_FILE),
                **{name: manifest[name] for name in shown}} if written else {"reason": manifest["reason"]}),
            "input_mask_sha256": mask_sha,
            "input_ct_files_sha256": combined_digest(ct_inputs),
            "reused": output.reused,
        },
        data_version=seg_version(manifest),
        check_results=[checks.seg_matches_mask_result(seg_path if written else None, mask_path,
                                                      manifest.get("reason", ""))],
        specs=checks.CT_MASK_SEG_CHECK_SPECS)


# ---------------------------------------------------------------- radiomics_sr


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **RADIOMICS_SR.dagster_attributes(),
        deps=[ct_mask_seg, RADIOMICS_ROW.key],
        skippable=True,
        description=f"The radiomics row as a DICOM TID 1500 measurement report (`{RADIOMICS_SR_FILE.name}`) of "
                    "the stomach segment of ct_mask_seg's SEG: one measurement per finite feature (standard DCM "
                    "/ IBSI codes where they exist), with the PyRadiomics version and settings. None, with the "
                    "reason, when there is no SEG.",
    )],
    partitions_def=ct_scans_partitions,
    check_specs=checks.RADIOMICS_SR_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def radiomics_sr(context: dg.AssetExecutionContext, storage: ArtifactStorage, radiomics: RadiomicsSettings):
    yield from per_patient_events(context, RADIOMICS_SR,
                                  lambda patient_id: [_radiomics_sr_for(context, patient_id, storage, radiomics)],
                                  checks.RADIOMICS_SR_CHECK_SPECS)


def _radiomics_sr_for(context: dg.AssetExecutionContext, patient_id: str, storage: ArtifactStorage,
                      radiomics: RadiomicsSettings) -> dg.MaterializeResult:
    store = storage.store()
    row_path = required_file(RADIOMICS_TABLE, store, patient_id)
    seg_manifest = recorded_manifest(CT_MASK_SEG, store, patient_id)
    params = radiomics.load_params()
    settings_sha, row_sha = features.settings_hash(params), sha256_file(row_path)
    output = StoredOutput(store, RADIOMICS_SR, patient_id,
                          radiomics_sr_fingerprint(seg_version(seg_manifest), row_sha, settings_sha))
    sr_path = output.path(RADIOMICS_SR_FILE)
    if not output.reused:
        inputs = {CT_MASK_SEG.key: seg_version(seg_manifest), RADIOMICS_ROW.key: row_sha}
        if seg_manifest.get("seg") != WRITTEN:
            _absent(output, RADIOMICS_SR_FILE, f"no SEG to reference: {seg_manifest.get('reason', '')}", sr=NONE,
                    inputs=inputs)
        else:
            seg_path = required_file(MASK_SEG_FILE, store, patient_id)
            try:
                recorded = dicom_sr.read_feature_row(row_path)[2].get("settings_sha256")
                if sha256_file(seg_path) != seg_version(seg_manifest):
                    raise dicom_sr.SRInputError(f"{seg_path}: changed since ct_mask_seg recorded it; materialize "
                                                f"ct_mask_seg for patient {patient_id} again")
                if recorded != settings_sha:
                    raise dicom_sr.SRInputError(
                        f"{row_path}: extracted with other PyRadiomics settings ({recorded}) than the configured "
                        f"{radiomics.params} ({settings_sha}); materialize radiomics_row again")
                written = dicom_sr.write_sr(seg_path, row_path, sr_path, params, scan_of(patient_id).patient_id,
                                            row_id=patient_id)
            except dicom_sr.SRInputError as error:
                raise input_failure(error) from error
            output.record([RADIOMICS_SR_FILE], sr=WRITTEN, inputs=inputs, **written)
    manifest = output.manifest
    written = manifest["sr"] == WRITTEN
    context.log.info(f"{patient_id}: SR {'reused' if output.reused else 'made'}: "
                     + (str(sr_path) if written else f"none ({manifest['reason']})"))
    shown = ("sop_instance_uid", "series_instance_uid", "referenced_seg_uid", "measurements", "standard_codes",
             "private_codes", "features_not_finite")
    return stored_materialization(
        output,
        metadata={
            "sr": manifest["sr"],
            **({"path": dg.MetadataValue.path(str(sr_path)), "sha256": output.sha256(RADIOMICS_SR_FILE),
                **{name: manifest[name] for name in shown}} if written else {"reason": manifest["reason"]}),
            "input_row_sha256": row_sha,
            "params": radiomics.params,
            "settings_sha256": settings_sha,
            "reused": output.reused,
        },
        data_version=output.sha256(RADIOMICS_SR_FILE) if written else sha256_text(NONE, manifest["reason"]),
        check_results=[checks.sr_matches_row_result(sr_path if written else None, row_path,
                                                    manifest.get("reason", ""))],
        specs=checks.RADIOMICS_SR_CHECK_SPECS)


ASSETS: list[dg.AssetsDefinition] = [ct_mask_seg, radiomics_sr]
