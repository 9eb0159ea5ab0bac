"""Does the change between a synthetic patient's two CTs carry the planted signal, as PyRadiomics sees it?

    python -m benchmarks.delta_signal [--patients 20] [--small] [--params default]

Generates `--patients` synthetic patients, every one with a second CT (followup_fraction 1 unless
`--fraction` says otherwise; the demo's other settings), extracts the radiomics features of both CTs
on the generator's own stomach masks (or on masks a trained nnU-Net predicts, `--model`, each stage
timed per CT) through the functions radiomics_row uses (ct_image's orientation, the packaged params),
and prints, against the label (mlm):
- the AUC of the best single delta feature (difference last - first, or relative change, as the
  fused table's delta block has them; oriented, so >= 0.5, and picked after the fact: optimistic);
- the cross-validated AUC of an L2 logistic model on the whole delta block (every feature's
  difference and relative change, the days between the scans, the similarity), the risk model's kind
  of model, and of the same model on the first CT's features alone (which hold the radiology
  severity, not the change);
- the correlation of the planted change with the first CT's severity within each class (both depend
  on the label, nothing else: near 0 up to chance).
Synthetic figures, not clinical ones.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcmlm_assets.demo.synthetic_ct import make_ct
from gcmlm_assets.demo.synthetic_dicom import dicom_series_files
from gcmlm_assets.demo.synthetic_plan import CohortSpec, plan_cohort
from gcmlm_assets.radiology import ct_io, features, masks


class Timings(dict):
    def add(self, stage: str, seconds: float) -> None:
        self.setdefault(stage, []).append(seconds)


def scan_features(plan, spec, followup: bool, extractor, folder: Path, segmenter, timings: Timings,
                  dice: list[float]) -> dict[str, float]:
    """The scan's features on the generator's stomach, or on the mask `segmenter` predicts (then
    also timed: the DICOM series read as ct_image reads it, the prediction, the extraction)."""
    ct, truth = make_ct(plan, spec, followup)
    truth = sitk.DICOMOrient(truth, "LPS")
    ct_path, mask_path = folder / "ct.nii.gz", folder / "mask.nii.gz"
    if segmenter is None:
        ct_io.write_volume(ct_io.canonicalise(ct), ct_path)
        masks.write_mask(truth, mask_path)
        return features.extract_features(extractor, ct_path, mask_path).features
    series = folder / "series"
    series.mkdir(exist_ok=True)
    for old in series.iterdir():
        old.unlink()
    for name, data in dicom_series_files(ct, plan.patient_id, f"delta-signal {followup}", "benchmark").items():
        (series / name).write_bytes(data)
    started = time.perf_counter()
    image, _ = ct_io.load_ct(series)
    ct_io.write_volume(image, ct_path)
    timings.add("ct_image (DICOM read, LPS, write)", time.perf_counter() - started)
    started = time.perf_counter()
    predicted = segmenter.predict(sitk.ReadImage(str(ct_path)))
    masks.write_mask(predicted, mask_path)
    timings.add("ct_mask (nnU-Net prediction, write)", time.perf_counter() - started)
    dice.append(masks.dice(predicted, truth))
    row = features.extract_features(extractor, ct_path, mask_path)
    timings.add("radiomics_row (PyRadiomics)", row.seconds)
    return row.features


def load_segmenter(model_folder: Path, mirroring: bool, tile_step_size: float):
    """The demo's installed nnU-Net model (an artifact store's segmentation_model folder), pinned as
    its current.json records it."""
    import json

    from gcmlm_assets.radiology.checkpoint_pins import CheckpointPins
    from gcmlm_assets.radiology.nnunet import GastricSegmenter

    pointer = model_folder.parent / "current.json"
    digests = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint_sha256_by_fold"]
    return GastricSegmenter.load(model_folder, pins=CheckpointPins.from_install(pointer, digests),
                                 use_mirroring=mirroring, tile_step_size=tile_step_size)


def delta_block(first: dict[str, float], last: dict[str, float], days: float) -> dict[str, float]:
    """diff and rel per feature, the days, the similarity: the block the fused table derives."""
    block, terms = {}, []
    for name, a in first.items():
        b = last[name]
        block[f"{name}_diff"] = b - a
        block[f"{name}_rel"] = (b - a) / abs(a) if abs(a) >= 1e-12 else math.nan
        scale = abs(a) + abs(b)
        terms.append(abs(b - a) / scale if scale > 0 else 0.0)
    block["days"] = days
    block["similarity"] = 1.0 - float(np.mean(terms))
    return block


def oriented_auc(labels: np.ndarray, values: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(values)
    if len(set(labels[keep])) < 2 or np.ptp(values[keep]) == 0:
        return 0.5
    auc = roc_auc_score(labels[keep], values[keep])
    return max(auc, 1.0 - auc)


def cv_logistic_auc(x: np.ndarray, labels: np.ndarray, repeats: int = 5) -> float:
    """Mean out-of-fold AUC of an L2 logistic model (median-imputed, standardised), repeated stratified 5-fold."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.where(np.isfinite(x), x, np.nan)
    x = x[:, ~np.all(np.isnan(x), axis=0)]
    aucs = []
    for repeat in range(repeats):
        scores = np.zeros(len(labels))
        folds = StratifiedKFold(n_splits=min(5, int(np.bincount(labels).min())), shuffle=True, random_state=repeat)
        for train, test in folds.split(x, labels):
            model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                                  LogisticRegression(C=0.1, max_iter=2000))
            model.fit(x[train], labels[train])
            scores[test] = model.decision_function(x[test])
        aucs.append(roc_auc_score(labels, scores))
    return float(np.mean(aucs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delta_signal", description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="the tests' tiny CTs instead of the demo's")
    parser.add_argument("--params", default="default")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="followup_fraction; below 1 only the patients with a second CT are measured "
                             "(--patients 24 --fraction 0.4: the demo's own)")
    parser.add_argument("--model", type=Path,
                        help="a trained nnU-Net model folder (e.g. a demo's artifacts/segmentation_model/<id>): "
                             "masks predicted by it, as ct_mask does, and each stage timed per CT")
    parser.add_argument("--no-mirroring", action="store_true", help="predict without nnU-Net's mirroring")
    parser.add_argument("--tile-step", type=float, default=0.5,
                        help="nnU-Net's sliding-window step, a fraction of the patch (ct_mask: 0.5)")
    args = parser.parse_args(argv)
    overrides = dict(followup_fraction=args.fraction)
    spec = (CohortSpec.small(args.patients, **overrides) if args.small
            else CohortSpec(n_patients=args.patients, **overrides))
    plans = [p for p in plan_cohort(spec) if p.scan_dates]
    extractor = features.extractor_from_params(features.load_params(args.params))
    labels = np.array([p.mlm for p in plans])
    segmenter = None
    timings, dice = Timings(), []
    if args.model:
        started = time.perf_counter()
        segmenter = load_segmenter(args.model, not args.no_mirroring, args.tile_step)
        print(f"model loaded in {time.perf_counter() - started:.1f} s (mirroring {not args.no_mirroring}, "
              f"tile step {args.tile_step})")
    firsts, blocks, seconds = [], [], []
    with tempfile.TemporaryDirectory(prefix="gcmlm-delta-") as scratch:
        for plan in plans:
            started = time.perf_counter()
            first = scan_features(plan, spec, False, extractor, Path(scratch), segmenter, timings, dice)
            last = scan_features(plan, spec, True, extractor, Path(scratch), segmenter, timings, dice)
            seconds.append((time.perf_counter() - started) / 2)
            dates = [np.datetime64(d) for d in plan.scan_dates]
            firsts.append(first)
            blocks.append(delta_block(first, last, float((dates[1] - dates[0]).astype(int))))
    names = list(blocks[0])
    delta = np.array([[b[n] for n in names] for b in blocks], dtype=float)
    base_names = list(firsts[0])
    base = np.array([[f[n] for n in base_names] for f in firsts], dtype=float)
    ranked = sorted(((oriented_auc(labels, delta[:, j]), names[j]) for j in range(len(names))), reverse=True)
    severity = np.array([p.radiology_severity for p in plans])
    change = np.array([p.radiology_change for p in plans])
    print(f"{len(plans)} synthetic patients ({labels.sum()} with mlm=1), CT {spec.ct_size} at {spec.ct_spacing} mm, "
          f"params {args.params!r}, masks {'predicted by ' + args.model.name if args.model else 'the generator'}'s"
          f": {np.mean(seconds):.1f} s per CT in all")
    for stage, values in timings.items():
        print(f"  {stage:<40} median {np.median(values):5.1f} s per CT (min {min(values):.1f}, max {max(values):.1f})")
    if dice:
        print(f"  predicted masks' Dice with the generator's stomach: median {np.median(dice):.2f}, "
              f"min {min(dice):.2f}")
    print(f"  load average (2 cores, shared): {os.getloadavg()[0]:.1f}")
    print("best single delta features (oriented AUC, picked after the fact):")
    for auc, name in ranked[:8]:
        print(f"  {name:<55} {auc:.3f}")
    for name in ("days", "similarity"):
        print(f"  {name:<55} {oriented_auc(labels, delta[:, names.index(name)]):.3f}")
    diff = [j for j, n in enumerate(names) if n.endswith("_diff")]
    rel = [j for j, n in enumerate(names) if n.endswith("_rel")]
    print(f"CV logistic AUC, delta block (diff + rel + days + similarity): {cv_logistic_auc(delta, labels):.3f}")
    print(f"CV logistic AUC, differences only:                           {cv_logistic_auc(delta[:, diff], labels):.3f}")
    print(f"CV logistic AUC, relative changes only:                      {cv_logistic_auc(delta[:, rel], labels):.3f}")
    print(f"CV logistic AUC, first CT's features alone:                  {cv_logistic_auc(base, labels):.3f}")
    within = [np.corrcoef(severity[labels == c], change[labels == c])[0, 1] for c in (0, 1)]
    print("correlation of the planted change with the first CT's severity within each class (mlm 0, 1): "
          f"{within[0]:+.2f}, {within[1]:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
