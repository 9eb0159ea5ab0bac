"""The packaged params files and the feature row file (no Dagster)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from gcmlm_assets.radiology import checks, features


def test_packaged_params_are_valid_and_hashes_ignore_formatting(tmp_path: Path):
    for name in features.NAMED_PARAMS:
        params = features.load_params(name)
        features.extractor_from_params(params)  # PyRadiomics validates against its schema
        assert params["setting"]["binWidth"] == 25 and params["setting"]["resampledPixelSpacing"] == [1, 1, 1]
    assert list(features.load_params("default")["imageType"]) == ["Original"]
    assert list(features.load_params("rich")["imageType"]) == ["Original", "LoG", "Wavelet"]
    # Same content, other layout and no comments: same hash; one value changed: another hash.
    copy = tmp_path / "copy.yaml"
    copy.write_text(yaml.safe_dump(features.load_params("default"), default_flow_style=True))
    assert features.settings_hash(features.load_params(copy)) == features.settings_hash(features.load_params("default"))
    changed = features.load_params("default")
    changed["setting"]["binWidth"] = 10
    assert features.settings_hash(changed) != features.settings_hash(features.load_params("default"))


def test_expected_feature_counts():
    # PyRadiomics' default 3-D feature lists: 14 shape + 93 grey-level features per image.
    assert len(features.expected_feature_names(features.load_params("default"))) == 107
    rich = features.expected_feature_names(features.load_params("rich"))
    assert len(rich) == 14 + (1 + 5 + 8) * 93
    assert sum(name.startswith("wavelet-") for name in rich) == 8 * 93
    assert sum(name.startswith("log-sigma-") for name in rich) == 5 * 93


def test_row_file_and_its_checks(tmp_path: Path):
    names = features.expected_feature_names(features.load_params("default"))
    values = {name: float(i) for i, name in enumerate(names)}
    path = features.write_row(tmp_path / "radiomics.parquet", "P1", values, {"settings_sha256": "x"})
    table = features.read_row(path)
    assert table.column_names == ["patient_id", *names]
    assert table.schema.field(names[0]).type == pa.float64()
    results = {r.check_name: r.passed for r in checks.radiomics_row_check_results(table, "P1", names)}
    assert results == {"radiomics_row_complete": True, "radiomics_row_finite": True}

    # A NaN (a PyRadiomics feature that failed) and a missing column each fail a check.
    broken = dict(values, **{names[3]: math.nan})
    table = features.row_table("P1", broken)
    results = {r.check_name: r for r in checks.radiomics_row_check_results(table, "P1", names)}
    assert {name: r.passed for name, r in results.items()} == {"radiomics_row_complete": True,
                                                               "radiomics_row_finite": False}
    finite = results["radiomics_row_finite"]
    assert finite.metadata["expected"].value == "every feature a finite number"
    assert finite.metadata["found"].value == f"1 of {len(names)} feature(s) not a finite number: {names[3]} (nan)"
    assert "patient P1" in finite.description and names[3] in finite.description
    assert finite.metadata["non_finite_count"].value == 1
    short = {k: v for k, v in values.items() if k != names[-1]}
    results = {r.check_name: r.passed
               for r in checks.radiomics_row_check_results(features.row_table("P1", short), "P1", names)}
    assert results["radiomics_row_complete"] is False
    results = {r.check_name: r for r in checks.radiomics_row_check_results(features.row_table("P2", values), "P1",
                                                                           names)}
    complete = results["radiomics_row_complete"]
    assert complete.passed is False
    assert complete.metadata["found"].value == "patient id P2"
    expected = complete.metadata["expected"].value
    assert expected.startswith(f"1 row for patient P1: patient id, then {len(names)} features")


def test_unknown_params_name_is_refused():
    with pytest.raises(FileNotFoundError, match="PyRadiomics params file not found"):
        features.resolve_params("fancy")
