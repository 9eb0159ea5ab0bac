"""PyRadiomics parity: our extraction code reproduces PyRadiomics' own reference values.

For each case, the settings PyRadiomics recorded (`diagnostics_Configuration_Settings`, per CSV and
case column) are fed to `extractor_from_settings`; every `original_*` value of that column must come
out within 0.1 %.
"""

from __future__ import annotations

import ast
import csv
from collections import defaultdict
from pathlib import Path

import pytest

from gcmlm_assets.radiology import features

RELATIVE_TOLERANCE = 1e-3


def reference_values(baseline_dir: Path, case: str) -> dict[str, dict[str, dict[str, float]]]:
    """settings text -> feature class -> {feature name: value} for `case`'s column of every CSV."""
    grouped: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for path in sorted(baseline_dir.glob("baseline_*.csv")):
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if case not in (reader.fieldnames or []):
                continue  # e.g. shape2D, whose columns are <case>_shape2D with a 2-D mask we do not have
            rows = {row["featureName"]: row[case] for row in reader}
        feature_class = path.stem.removeprefix("baseline_")
        grouped[rows["diagnostics_Configuration_Settings"]][feature_class] = {
            name: float(value) for name, value in rows.items() if name.startswith("original_")}
    return grouped


@pytest.mark.parametrize("case", ["brain1", "breast1"])
def test_original_features_match_pyradiomics_baseline(test_data: Path, case: str):
    grouped = reference_values(test_data / "baseline" / "pyradiomics", case)
    assert set().union(*grouped.values()) == {"firstorder", "glcm", "gldm", "glrlm", "glszm", "ngtdm", "shape"}
    compared, worst = 0, 0.0
    for settings_text, classes in grouped.items():
        settings = ast.literal_eval(settings_text)
        extractor = features.extractor_from_settings(settings, {"Original": {}},
                                                     {name: None for name in classes})
        row = features.extract_features(extractor, test_data / "ct" / "pyradiomics" / f"{case}_image.nrrd",
                                        test_data / "ct" / "pyradiomics" / f"{case}_label.nrrd")
        for expected in classes.values():
            for name, reference in expected.items():
                assert name in row.features, f"{case}: {name} not extracted"
                ours = row.features[name]
                error = abs(ours - reference) / abs(reference) if reference else abs(ours)
                assert error <= RELATIVE_TOLERANCE, f"{case} {name}: ours {ours!r}, PyRadiomics {reference!r}"
                worst = max(worst, error)
                compared += 1
    assert compared == 107  # every original_* feature of the 7 classes in the baseline
    print(f"{case}: {compared} features, worst relative difference {worst:.2e}")
