"""Every asset of the platform, declared once.

An entry says what the asset is (key, group, whether it has one partition per patient), what it is
made with (kinds) and who answers for it (owners), its code version, and the files it writes. The
asset's own module declares it with `entry.dagster_attributes()`; its consumers (other assets,
checks, sensors, `cohort/tables/fusion.py`, the demo's summary) find its files through the entry's
`AssetFile`s. No asset key or output file name is written anywhere else, so renaming a file or
bumping a version is a change to this module only (`gcmlm_assets_tests/core/test_catalogue.py`
holds the definitions to it).

Plain Python: no Dagster, nothing heavy; every domain and the landing zone may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gcmlm_assets.storage import ArtifactStore

RADIOLOGY, PATHOLOGY, COHORT = "radiology", "pathology", "cohort"
GROUP_OWNERS = {RADIOLOGY: "team:radiology", PATHOLOGY: "team:pathology", COHORT: "team:biostatistics"}


class MissingAssetFile(FileNotFoundError):
    """An input asset's file is not in the artifact store: the asset has not been materialized
    (for that patient)."""


@dataclass(frozen=True)
class Asset:
    key: str
    group: str
    per_patient: bool
    # Bump when a change of code changes the asset's output for the same inputs: it is in the asset's
    # fingerprints, so stored outputs are then recomputed instead of reused. None: slide_vector, whose
    # pooling (chosen in the run's config) has its own version in the fingerprint (pathology/pooling.py).
    code_version: str | None
    kinds: frozenset[str] = field(default_factory=frozenset)
    # One partition per CT scan (`ct_scans`: a patient's timepoints, scans.py), not per patient: the
    # folder and file methods then take a scan key where they say patient_id.
    per_scan: bool = False

    @property
    def owners(self) -> list[str]:
        return [GROUP_OWNERS[self.group]]

    def file(self, name: str) -> AssetFile:
        return AssetFile(self, name)

    def folder(self, store: ArtifactStore, patient_id: str | None = None, *, create: bool = True) -> Path:
        """The asset's folder in the artifact store (one per patient when partitioned)."""
        return store.asset_dir(self.key, self._partition(patient_id), create=create)

    def dagster_attributes(self) -> dict[str, Any]:
        """Keyword arguments of `dg.AssetSpec` and `@dg.asset` that this entry decides."""
        return {"key": self.key, "group_name": self.group, "code_version": self.code_version,
                "kinds": set(self.kinds), "owners": self.owners}

    def _partition(self, patient_id: str | None) -> str | None:
        if self.per_patient and patient_id is None:
            raise ValueError(f"{self.key} has one output per patient: name the patient")
        if not self.per_patient and patient_id is not None:
            raise ValueError(f"{self.key} is not partitioned by patient (got patient {patient_id!r})")
        return patient_id


@dataclass(frozen=True)
class AssetFile:
    """A file an asset writes, under its folder (or the folder's published version: see storage.py)."""

    asset: Asset
    name: str

    def path(self, store: ArtifactStore, patient_id: str | None = None) -> Path:
        return self.asset.folder(store, patient_id, create=False) / self.name

    def in_folder(self, folder: Path) -> Path:
        """The file inside a given folder of the asset (a version folder being written or read)."""
        return Path(folder) / self.name

    def required(self, store: ArtifactStore, patient_id: str | None = None) -> Path:
        """The file's path; MissingAssetFile (naming the file and what to materialize) if it is not there."""
        path = self.path(store, patient_id)
        if not path.is_file():
            whose = f" for patient {patient_id}" if patient_id is not None else ""
            raise MissingAssetFile(f"{path}: missing; materialize {self.asset.key}{whose} first")
        return path


# ---------------------------------------------------------------- radiology
# ct_image 2: the full-size three-plane picture, and cut-short .nii/.nii.gz files refused (ct.nii.gz's
# bytes are unchanged for a sound file, so nothing downstream is recomputed).
# 3: float volumes with NaN or infinite voxels refused (ITK read a NIfTI's as 0), non-image DICOM files named.
CT_IMAGE = Asset("ct_image", RADIOLOGY, per_patient=True, code_version="3", kinds=frozenset({"simpleitk"}),
                 per_scan=True)
CT_VOLUME = CT_IMAGE.file("ct.nii.gz")
CT_THUMBNAIL = CT_IMAGE.file("ct_thumbnail.png")

# ct_mask 2: label maps are refused or narrowed to the configured label (they were binarised whole).
CT_MASK = Asset("ct_mask", RADIOLOGY, per_patient=True, code_version="2", kinds=frozenset({"nnunet"}), per_scan=True)
MASK_VOLUME = CT_MASK.file("mask.nii.gz")
MASK_OVERLAY = CT_MASK.file("mask_overlay.png")

RADIOMICS_ROW = Asset("radiomics_row", RADIOLOGY, per_patient=True, code_version="1",
                      kinds=frozenset({"pyradiomics"}), per_scan=True)
RADIOMICS_TABLE = RADIOMICS_ROW.file("radiomics.parquet")

# The mask and the features in DICOM, for a PACS viewer (radiology/dicom_assets.py): a SEG of the CT
# series the mask was made on, and a TID 1500 SR of the row that references it. A CT that came in
# as a NIfTI/NRRD/MHA volume gets neither; the manifest says why.
CT_MASK_SEG = Asset("ct_mask_seg", RADIOLOGY, per_patient=True, code_version="2", kinds=frozenset({"dicom"}),
                    per_scan=True)
MASK_SEG_FILE = CT_MASK_SEG.file("mask.seg.dcm")
RADIOMICS_SR = Asset("radiomics_sr", RADIOLOGY, per_patient=True, code_version="2", kinds=frozenset({"dicom"}),
                     per_scan=True)
RADIOMICS_SR_FILE = RADIOMICS_SR.file("radiomics.sr.dcm")

# Versioned model folders under one pointer (radiology/nnunet.py).
SEGMENTATION_MODEL = Asset("segmentation_model", RADIOLOGY, per_patient=False, code_version="1",
                           kinds=frozenset({"nnunet"}))

# ---------------------------------------------------------------- pathology
# One `<slide>.h5` of coordinates per slide with tissue, listed in slides.json (pathology/patch_coords.py).
# Its code version is the tiling's: pathology/tiling_params.py's TILING_VERSION is this value.
PATCH_COORDS = Asset("patch_coords", PATHOLOGY, per_patient=True, code_version="2", kinds=frozenset({"openslide"}))
SLIDE_LISTING = PATCH_COORDS.file("slides.json")
TILING_PICTURE = PATCH_COORDS.file("tiling.png")

# One `<slide>.h5` of patch embeddings per slide, listed in the asset's manifest (pathology/extract.py).
# Its code version is the extraction's: pathology/feature_files.py's EXTRACTION_VERSION is this value.
UNI_FEATURES = Asset("uni_features", PATHOLOGY, per_patient=True, code_version="1", kinds=frozenset({"torch"}))

SLIDE_VECTOR = Asset("slide_vector", PATHOLOGY, per_patient=True, code_version=None, kinds=frozenset({"numpy"}))
SLIDE_VECTOR_TABLE = SLIDE_VECTOR.file("slide_vector.parquet")
SLIDE_VECTOR_PICTURE = SLIDE_VECTOR.file("slide_vector.png")

# One `<slide>.geojson` per slide of patch_coords' listing, for QuPath: tissue, the patch grid and the
# patient's current risk_explanations patch values as tile measurements (pathology/slide_geojson.py).
# Its code version is the GeoJSON writer's: pathology/slide_geojson.py's GEOJSON_VERSION is this value.
QUPATH_GEOJSON = Asset("qupath_geojson", PATHOLOGY, per_patient=True, code_version="1",
                       kinds=frozenset({"geojson"}))

# ---------------------------------------------------------------- pathology: lymph nodes
# The lymph-node slides of a drop's `ln_wsi/` go through the same tiling and encoder as the primary
# tumour's (pathology/assets.py), into assets of their own, so that neither chain waits on the other.
LYMPH_NODE = "lymph_node"  # the modality (a landing folder, a chain, a block of the fused table)
LN_PATCH_COORDS = Asset("ln_patch_coords", PATHOLOGY, per_patient=True, code_version=PATCH_COORDS.code_version,
                        kinds=frozenset({"openslide"}))
LN_SLIDE_LISTING = LN_PATCH_COORDS.file("slides.json")
LN_TILING_PICTURE = LN_PATCH_COORDS.file("tiling.png")
LN_FEATURES = Asset("ln_features", PATHOLOGY, per_patient=True, code_version=UNI_FEATURES.code_version,
                    kinds=frozenset({"torch"}))
# Patch-level tumour classifier on the encoder's embeddings, trained on the annotated lymph-node
# slides (`ln_annotations/`); versioned folders under one pointer, like risk_model.
TUMOUR_CLASSIFIER = Asset("tumour_classifier", PATHOLOGY, per_patient=False, code_version="1",
                          kinds=frozenset({"sklearn"}))
CLASSIFIER_FILE = TUMOUR_CLASSIFIER.file("classifier.skops")
CLASSIFIER_METRICS = TUMOUR_CLASSIFIER.file("metrics.json")
# Per patient: the nodes and tumour regions of every lymph-node slide (a picture, a QuPath GeoJSON and
# the patches' tumour probabilities per slide, listed in regions.json) and one row of counts, areas and T/MLN.
LYMPH_NODES = Asset("lymph_nodes", PATHOLOGY, per_patient=True, code_version="1", kinds=frozenset({"numpy"}))
LYMPH_NODE_TABLE = LYMPH_NODES.file("lymph_nodes.parquet")
LYMPH_NODE_REGIONS = LYMPH_NODES.file("regions.json")

# ---------------------------------------------------------------- cohort
CLINICAL_TABLE = Asset("clinical_table", COHORT, per_patient=False, code_version="1", kinds=frozenset({"pyarrow"}))
CLINICAL_FILE = CLINICAL_TABLE.file("clinical.parquet")
CLINICAL_PROBLEMS = CLINICAL_TABLE.file("problems.json")

FUSED_TABLE = Asset("fused_table", COHORT, per_patient=False, code_version="5", kinds=frozenset({"pyarrow"}))
FUSED_FILE = FUSED_TABLE.file("fused.parquet")
FUSION_REPORT = FUSED_TABLE.file("fusion_report.json")

# Versioned folders under one pointer (storage.py): a reader sees one complete model.
RISK_MODEL = Asset("risk_model", COHORT, per_patient=False, code_version="6", kinds=frozenset({"sklearn"}))
MODEL_FILE = RISK_MODEL.file("model.skops")
METRICS_FILE = RISK_MODEL.file("metrics.json")
MODEL_CARD = RISK_MODEL.file("model_card.json")
MODEL_CARD_MARKDOWN = RISK_MODEL.file("model_card.md")
CV_PREDICTIONS = RISK_MODEL.file("cv_predictions.parquet")
PLOTS = {"roc": RISK_MODEL.file("roc.png"), "calibration": RISK_MODEL.file("calibration.png"),
               "decision_curve": RISK_MODEL.file("decision_curve.png")}

RISK_SCORES = Asset("risk_scores", COHORT, per_patient=False, code_version="4", kinds=frozenset({"sklearn"}))
SCORES_FILE = RISK_SCORES.file("scores.parquet")
SCORES_PICTURE = RISK_SCORES.file("score_distribution.png")

# One version folder per patient (and model) under the patient's pointer (cohort/explanation_assets.py).
# 2: the explanation key (cohort/explain/explanation_keys.py) is the explanation's data version.
RISK_EXPLANATIONS = Asset("risk_explanations", COHORT, per_patient=True, code_version="3",
                          kinds=frozenset({"sklearn"}))
PATCHES_FILE = RISK_EXPLANATIONS.file("patch_contributions.parquet")
EXPLANATION_FILE = RISK_EXPLANATIONS.file("explanation.json")

# The scores as FHIR R4 RiskAssessments: bundles/<patient>.json and their index (cohort/exchange/fhir_risk.py).
RISK_ASSESSMENTS = Asset("risk_assessments", COHORT, per_patient=False, code_version="1", kinds=frozenset({"fhir"}))
ASSESSMENT_INDEX = RISK_ASSESSMENTS.file("index.json")

ASSETS: dict[str, Asset] = {asset.key: asset for asset in (
    CT_IMAGE, CT_MASK, RADIOMICS_ROW, CT_MASK_SEG, RADIOMICS_SR, SEGMENTATION_MODEL, PATCH_COORDS, UNI_FEATURES,
    SLIDE_VECTOR, QUPATH_GEOJSON, LN_PATCH_COORDS, LN_FEATURES, TUMOUR_CLASSIFIER, LYMPH_NODES, CLINICAL_TABLE,
    FUSED_TABLE, RISK_MODEL, RISK_SCORES, RISK_EXPLANATIONS, RISK_ASSESSMENTS)}

# The per-patient chain each modality's drop starts (the landing sensor's runs), and the row of
# features per patient that the chain yields (what the cohort fuses; a chain without one is not
# waited on by the cohort refresh).
MODALITY_CHAINS: dict[str, tuple[Asset, ...]] = {
    RADIOLOGY: (CT_IMAGE, CT_MASK, RADIOMICS_ROW, CT_MASK_SEG, RADIOMICS_SR),
    PATHOLOGY: (PATCH_COORDS, UNI_FEATURES, SLIDE_VECTOR),
    LYMPH_NODE: (LN_PATCH_COORDS, LN_FEATURES, LYMPH_NODES),
}
PATIENT_FEATURES: dict[str, AssetFile] = {RADIOLOGY: RADIOMICS_TABLE, PATHOLOGY: SLIDE_VECTOR_TABLE,
                                          LYMPH_NODE: LYMPH_NODE_TABLE}
# Per-patient assets made after another one outside those chains, as (upstream, downstream): each
# pair gets a steps sensor (definitions.py), and the demo waits for them (demo/watch.py).
FOLLOW_ONS: tuple[tuple[Asset, Asset], ...] = ((PATCH_COORDS, QUPATH_GEOJSON), (RISK_EXPLANATIONS, QUPATH_GEOJSON))
