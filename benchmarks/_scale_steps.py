"""Stand-ins of the real steps, for recording the events one patient's runs write (scale benchmark).

Each stand-in is built from the real asset's own specs (keys, deps, partitions, check specs,
blocking flags, code versions, subsetting) taken from `build_definitions()`, so Dagster records
for it what it records for the real step: planned materializations and check evaluations, step
outputs, materializations, check evaluations, logs. Only the body is replaced: it computes
nothing and yields what the real step yields for one patient, with the real metadata keys
(gcmlm_assets/*/assets.py) and values of realistic size. Pictures are markdown data URIs filling
92 % of the limit the code in the tree sets for them (the display encoding takes the best one that
fits, so a photo comes close to it): `pictures.PATIENT_MARKDOWN_LIMIT`, where it exists, for the
CT, mask, patch-grid and heatmap pictures, `pictures.MARKDOWN_LIMIT` for the others; or `picture_bytes`
each when given. Their bytes are random, as compressed images are. A patient has two slides; an
explanation embeds their contribution maps, as many as risk_explanations embeds (or `heatmaps`).
"""

import base64
import hashlib
import json
import random
from pathlib import Path

import dagster as dg

from gcmlm_assets.batching import store_checks_per_patient

from gcmlm_assets.cohort.columns import CLINICAL_TABLE_COLUMNS, FUSED_TABLE_COLUMNS, RISK_SCORES_COLUMNS
from gcmlm_assets.columns import column_schema_metadata
from gcmlm_assets.pathology.pooling import SLIDE_VECTOR_COLUMNS
from gcmlm_assets.radiology.columns import RADIOMICS_ROW_COLUMNS

RADIOLOGY = ("ct_image", "ct_mask", "radiomics_row")
PATHOLOGY = ("patch_coords", "uni_features", "slide_vector")
COHORT = ("clinical_table", "fused_table", "risk_model", "risk_scores")
EXPLANATIONS = ("risk_explanations",)
MD = dg.MetadataValue.md
JSON = dg.MetadataValue.json
PATH = dg.MetadataValue.path
FILLED = 0.92  # of a picture's markdown limit


class Shapes:
    """Metadata of realistic shape for one patient's (or the cohort's) materializations."""

    def __init__(self, artifacts: Path, picture_bytes: int | None, heatmaps: int | None, slides: int = 2):
        from gcmlm_assets import pictures
        from gcmlm_assets.cohort import explanation_assets

        # getattr with fallbacks: the benchmark also measures commits from before these constants
        if heatmaps is None:  # each slide's contribution map, as many as the code embeds
            embedded = getattr(explanation_assets, "PICTURES_IN_METADATA", None)
            if embedded is None:
                embedded = 2 * getattr(explanation_assets, "SLIDES_IN_METADATA", slides)
            heatmaps = min(slides, embedded)

        limit = pictures.MARKDOWN_LIMIT
        self.artifacts = Path(artifacts)
        self.picture_bytes = picture_bytes or int(FILLED * limit)
        patient_limit = getattr(pictures, "PATIENT_MARKDOWN_LIMIT", limit)
        self.patient_picture_bytes = picture_bytes or int(FILLED * patient_limit)
        self.heatmaps, self.slides = heatmaps, slides
        self._random = random.Random(20)

    def picture(self, alt: str, per_patient_limit: bool = False):
        size = self.patient_picture_bytes if per_patient_limit else self.picture_bytes
        head = f"![{alt}](data:image/webp;base64,"
        raw = self._random.randbytes(max(0, (size - len(head) - 1) * 3 // 4))
        return MD(head + base64.b64encode(raw).decode() + ")")

    def path(self, *parts: str):
        return PATH(str(self.artifacts.joinpath(*parts)))

    @staticmethod
    def sha(*parts: str) -> str:
        return hashlib.sha256("/".join(parts).encode()).hexdigest()

    @staticmethod
    def markdown_table(columns: int, rows: int) -> str:
        header = "| " + " | ".join(f"column_{c}" for c in range(columns)) + " |"
        line = "|" + "---|" * columns
        body = ["| " + " | ".join(f"{(r * 7 + c) % 97 / 13:.4f}" for c in range(columns)) + " |" for r in range(rows)]
        return "\n".join([header, line, *body])

    def metadata(self, asset: str, pid: str | None) -> dict:
        return getattr(self, asset)(pid)

    def ct_image(self, pid: str) -> dict:
        return {"path": self.path("ct_image", pid, "ct.nii.gz"),
                "picture_path": self.path("ct_image", pid, "ct_thumbnail.png"),
                "sha256": self.sha("ct", pid), "input_folder": PATH(f"/landing/{pid}/ct"), "input_files": 312,
                "input_sha256": self.sha("ct-input", pid),
                "source": f"DICOM series 1.2.840.113619.2.55.3.{pid} (312 slices)",
                "reused": False, "size": "(512, 512, 312)", "spacing_mm": "(0.7813, 0.7813, 1.25)",
                "origin_mm": "(-200.0, -200.0, -512.5)", "orientation": "LPS", "original_orientation": "LPS",
                "oblique": False, "pixel_type": "16-bit signed integer", "hu_min": -1024.0, "hu_max": 3071.0,
                "hu_p01": -1002.0, "hu_p50": -61.0, "hu_p99": 412.0,
                "picture": self.picture("CT thumbnail", per_patient_limit=True)}

    def ct_mask(self, pid: str) -> dict:
        return {"path": self.path("ct_mask", pid, "mask.nii.gz"),
                "picture_path": self.path("ct_mask", pid, "mask_overlay.png"),
                "sha256": self.sha("mask", pid), "input_ct_sha256": self.sha("ct", pid),
                "input_source_sha256": self.sha("model"), "source": "predicted",
                "model_id": "Dataset501_GastricCT__nnUNetTrainer__nnUNetPlans__3d_fullres__fold_0__0123456789ab",
                "reference_file": "", "resampled_to_ct_grid": False, "resampling": "none (predicted on the CT grid)",
                "reoriented_from": "", "reference_label": "", "model_agreement": "the mask is the model's own",
                "reused": False, "voxels": 231_542, "voxel_volume_ml": 0.000763, "volume_ml": 176.7,
                "connected_components": 1, "largest_component_voxels": 231_542,
                "picture": self.picture("gastric mask", per_patient_limit=True)}

    def radiomics_row(self, pid: str) -> dict:
        return {"path": self.path("radiomics_row", pid, "radiomics.parquet"), "sha256": self.sha("row", pid),
                "input_ct_sha256": self.sha("ct", pid), "input_mask_sha256": self.sha("mask", pid),
                "pyradiomics_version": "3.1.0", "params": "default",
                "params_file": PATH("/app/radiomics_params.yaml"),
                "settings_sha256": self.sha("settings"), "features": 107, "extraction_seconds": 21.4,
                "reused": False, "resampled_roi_voxels": 231_542, **column_schema_metadata(RADIOMICS_ROW_COLUMNS)}

    def _slide_names(self, pid: str) -> list[str]:
        return [f"{pid}_slide{k + 1}" for k in range(self.slides)]

    def patch_coords(self, pid: str) -> dict:
        slides = self._slide_names(pid)
        table = ["| slide | size (px) | µm/px | source | patches | level | read px | s |",
                 "|---|---|---|---|---|---|---|---|"]
        table += [f"| {s}.svs | 98304x74752 | 0.2527 | openslide.mpp-x | 8412 | 1 | 1024 | 14.2 |" for s in slides]
        return {"n_slides": len(slides), "n_patches": 8412 * len(slides), "mode": "grid",
                "slides": MD("\n".join(table)),
                "picture": self.picture(f"tiling of {pid}", per_patient_limit=True),
                "picture_path": self.path("patch_coords", pid, "tiling.png"),
                "folder": self.path("patch_coords", pid), "listing": self.path("patch_coords", pid, "slides.json"),
                "h5_files": JSON([f"{s}.h5" for s in slides]),
                "input_fingerprints": JSON({f"{s}.svs": {"size_bytes": 1_873_412_096,
                                                         "mtime_ns": 1_700_000_000_000_000_000,
                                                         "quickhash1": self.sha("slide", s)} for s in slides}),
                "dicom_series": JSON({}),
                "params": JSON({"patch_size_um": 256.0, "target_mpp": 0.5, "tissue_threshold": 0.6, "mode": "grid",
                                "max_patches_per_slide": 20000, "seed": 0}),
                "tiling_version": "4", "inputs_fingerprint": self.sha("tiling", pid), "reused": False,
                "seconds": 31.7}

    def uni_features(self, pid: str) -> dict:
        slides = self._slide_names(pid)
        return {"encoder": "uni", "embedding_dim": 1024, "checkpoint": "/models/uni/pytorch_model.bin",
                "checkpoint_sha256": self.sha("uni"), "weights_sha256": self.sha("uni-weights"), "untrained": False,
                "n_slides": len(slides), "n_patches": 8412 * len(slides),
                "patches_per_slide": JSON({f"{s}.h5": 8412 for s in slides}), "slides_without_patches": JSON([]),
                "patches_per_second": 412.5, "reused_slides": JSON([]),
                "readers": JSON({f"{s}.h5": "openslide (scaled JPEG decode)" for s in slides}),
                "scaled_decode": True, "reading": "4 DataLoader workers, 4 read threads each",
                "feature_dtype": "float16", "device": "cuda:0", "device_reason": "auto: the pod's GPU (NVIDIA L4)",
                "folder": self.path("uni_features", pid),
                "h5_files": JSON([str(self.artifacts / "uni_features" / pid / f"{s}.h5") for s in slides]),
                "dicom_series": JSON({}),
                "input_patch_coords": JSON({f"{s}.h5": self.sha("coords", s) for s in slides}),
                "inputs_fingerprint": self.sha("features", pid), "seconds": 45.3}

    def slide_vector(self, pid: str) -> dict:
        return {"pooling": "mean", "n_patches": 8412 * self.slides, "n_slides": self.slides, "dim": 1024,
                "encoder": "uni", "checkpoint_sha256": self.sha("uni"),
                "path": self.path("slide_vector", pid, "slide_vector.parquet"),
                "picture_path": self.path("slide_vector", pid, "slide_vector.png"),
                "input_uni_features": JSON({f"{s}.h5": self.sha("features", s) for s in self._slide_names(pid)}),
                "inputs_fingerprint": self.sha("pooled", pid), "reused": False,
                **column_schema_metadata(SLIDE_VECTOR_COLUMNS)}

    def clinical_table(self, _pid: None) -> dict:
        return {"path": self.path("clinical_table", "clinical.parquet"),
                "problems_path": self.path("clinical_table", "problems.json"),
                "source_csv": PATH("/landing/clinical.csv"), "source_csv_sha256": self.sha("clinical.csv"),
                "rows_read": 10_000, "patients": 10_000, "bad_rows": 0, "patients_without_drop": JSON([]),
                "label_balance": JSON({"positive": 1210, "negative": 6540, "unknown": 2250}),
                "covariates": JSON(["age", "sex", "pt_stage", "tumour_size_mm"]),
                "preview": MD(self.markdown_table(6, 10)), **column_schema_metadata(CLINICAL_TABLE_COLUMNS)}

    def fused_table(self, _pid: None) -> dict:
        counts = {"patients": 10_000, "with_radiology": 9_950, "with_pathology": 9_900, "with_both": 9_850,
                  "with_clinical": 10_000, "with_features": 10_000, "radiology_features": 107,
                  "pathology_features": 1024, "clinical_covariates": 4, "label_positive": 1210,
                  "label_negative": 6540, "label_unknown": 2250}
        return {"path": self.path("fused_table", "fused.parquet"),
                "report": self.path("fused_table", "fusion_report.json"),
                **counts, "label_balance": JSON({"positive": 1210, "negative": 6540, "unknown": 2250,
                                                 "labelled_with_features": {"positive": 1210, "negative": 6540}}),
                "rejected_feature_files": 0, "excluded_results": 0, "excluded_patients": JSON({}),
                "input_feature_files": 19_850, "input_fingerprint": self.sha("fused-input"),
                "clinical_table_sha256": self.sha("clinical"), "preview": MD(self.markdown_table(8, 8)),
                **column_schema_metadata(FUSED_TABLE_COLUMNS)}

    def risk_model(self, _pid: None) -> dict:
        plots = {kind: self.picture(kind) for kind in ("roc", "calibration", "decision_curve")}
        card = {"model": "fused logistic blocks, stacked combiner",
                "settings": {"n_repeats": 10, "n_bootstrap": 2000},
                "sections": {f"section_{i}": "text " * 60 for i in range(12)}}
        return {"status": "trained", "version": "v-20260101-0123456789ab",
                "path": self.path("risk_model", "v1", "model.skops"),
                "pointer": self.path("risk_model", "current.json"),
                "files": JSON({name: str(self.artifacts / "risk_model" / "v1" / name) for name in
                               ("model.skops", "metrics.json", "model_card.json", "model_card.md",
                                "cv_predictions.parquet", "roc.png", "calibration.png", "decision_curve.png")}),
                "fused_table_sha256": self.sha("fused"), "fused_auc": 0.742, "fused_auc_ci": JSON([0.711, 0.770]),
                "ablation": MD(self.markdown_table(5, 9)), **{f"plot_{k}": v for k, v in plots.items()},
                **{f"plot_{k}_path": self.path("risk_model", "v1", f"{k}.png") for k in plots},
                "model_card": MD("## Model card\n\n" + "Intended use, data, evaluation and limits. " * 150),
                "model_card_json": JSON(card), "settings": JSON(card["settings"])}

    def risk_scores(self, _pid: None) -> dict:
        return {"path": self.path("risk_scores", "scores.parquet"), "risk_model_version": "v-20260101-0123456789ab",
                "risk_model_path": self.path("risk_model", "v1", "model.skops"),
                "risk_model_sha256": self.sha("model"),
                "fused_table_sha256": self.sha("fused"), "scored": 10_000, "risk_threshold": 0.31,
                "risk_groups": JSON({"high": 2410, "low": 7590}),
                "modalities_used": JSON({"pathology": 50, "radiology": 100, "radiology+pathology": 9850}),
                "preview": MD(self.markdown_table(5, 10)), **column_schema_metadata(RISK_SCORES_COLUMNS),
                "picture": self.picture("risk score distribution"),
                "picture_path": self.path("risk_scores", "score_distribution.png")}

    def risk_explanations(self, pid: str) -> dict:
        folder = ("risk_explanations", pid, "v1")
        top = "| feature | value | coefficient | contribution |\n|---|---|---|---|\n" + "\n".join(
            f"| original_glcm_feature_{i} | {i * 0.37:.3f} | {0.2 - i * 0.01:.3f} | {0.05 - i * 0.004:.4f} |"
            for i in range(10))
        metadata = {"probability": 0.27, "risk_group": "low", "risk_model_version": "v-20260101-0123456789ab",
                    "how_the_blocks_combine": MD(self.markdown_table(4, 4)),
                    "exactness": JSON({"radiology": "1.2e-15", "pathology": "3.4e-16"}),
                    "patch_contributions_path": self.path(*folder, "patch_contributions.parquet"),
                    "explanation_path": self.path(*folder, "explanation.json"), "patches": 8412 * self.slides,
                    "notes": MD("none"), "radiology_top_features": MD(top), "pathology_top_features": MD(top)}
        for i in range(self.heatmaps):
            name = f"{'contribution' if i % 2 == 0 else 'attention'}_{pid}_slide{i // 2 + 1}"
            metadata[name] = self.picture(name, per_patient_limit=True)
            metadata[f"{name}_full_path"] = self.path(*folder, f"{name}_full.png")
        return metadata


def explanation_key(pid: str) -> str:
    """A patient's explanation key (what risk_scores lists and risk_explanations records as its data
    version, where the code keys explanations): the same for a patient until the model changes."""
    return f"{pid}:{Shapes.sha('risk model v1')[:40]}"


def data_version(asset: str, pid: str | None) -> str:
    return explanation_key(pid) if asset == "risk_explanations" else Shapes.sha(asset, pid or "cohort")


def _log_line(asset: str, pid: str | None) -> str:
    return f"{pid or 'cohort'}: {asset} written (stand-in of the real step for the scale benchmark)"


def stand_in(real: dg.AssetsDefinition, shapes: Shapes) -> dg.AssetsDefinition:
    """`real`'s specs with a body that yields one patient's (or the cohort's) events."""
    name = real.op.name
    keys = [key.to_user_string() for key in real.keys]
    checks = list(real.check_specs)
    # The radiology steps return their check results inside the materialization, the pathology
    # steps yield them after it (as the real assets do).
    separate = keys[0] in PATHOLOGY

    @dg.multi_asset(name=name, specs=list(real.specs), check_specs=checks, can_subset=real.can_subset,
                    partitions_def=real.partitions_def)
    @store_checks_per_patient  # as the real per-patient assets store their check results
    def step(context: dg.AssetExecutionContext):
        pid = context.partition_key if context.has_partition_key else None
        for key in keys:
            if dg.AssetKey(key) not in context.selected_asset_keys:
                continue
            context.log.info(_log_line(key, pid))
            results = [dg.AssetCheckResult(asset_key=key, check_name=spec.name, passed=True,
                                           description=f"Passed: {spec.name} as expected.",
                                           metadata={"expected": "within the project's limits",
                                                     "found": json.dumps({"value": 1.0, "patient": pid})})
                       for spec in checks if spec.asset_key.to_user_string() == key
                       and spec.key in context.selected_asset_check_keys]
            yield dg.MaterializeResult(asset_key=key, metadata=shapes.metadata(key, pid),
                                       data_version=dg.DataVersion(data_version(key, pid)),
                                       check_results=None if separate else results)
            if separate:
                yield from results

    return step


def stand_in_checks(real: dg.AssetChecksDefinition) -> dg.AssetChecksDefinition:
    """The cohort's asset checks (their own ops in the cohort run), passing with small metadata."""
    specs = list(real.check_specs)

    @dg.multi_asset_check(name=real.node_def.name, specs=specs, can_subset=True)
    def checks(context: dg.AssetCheckExecutionContext):
        for spec in specs:
            if spec.key in context.selected_asset_check_keys:
                yield dg.AssetCheckResult(asset_key=spec.asset_key, check_name=spec.name, passed=True,
                                          description="Passed.", metadata={"expected": "valid", "found": "valid"})

    return checks


def stand_in_definitions(defs: dg.Definitions, shapes: Shapes) -> dg.Definitions:
    """The real definitions' assets and checks with stand-in bodies (segmentation_model left out:
    it is not part of a patient's runs)."""
    wanted = set(RADIOLOGY + PATHOLOGY + COHORT + EXPLANATIONS)
    assets = [stand_in(a, shapes) for a in defs.assets
              if isinstance(a, dg.AssetsDefinition) and {k.to_user_string() for k in a.keys} & wanted]
    checks = [stand_in_checks(c) for c in defs.asset_checks or []]
    return dg.Definitions(assets=assets, asset_checks=checks)
