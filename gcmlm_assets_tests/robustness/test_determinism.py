"""The same cohort materialized twice from scratch gives the same artifacts.

Run A is the session's reference cohort (its artifacts kept as a snapshot). For run B its artifacts
folder and its Dagster instance are deleted and made again empty, at the same path, over the same
landing zone, and every asset is materialized again. The path is kept because outputs record absolute
paths (the feature HDF5 files' `slide_path`/`coords_path` attributes, slides.json's `h5`, the model
card's `fused_table`), and those files' hashes flow into downstream manifests and fingerprints.

Every file must be byte-identical, with one exception compared in content: radiomics_row's manifest
records the extraction's wall-clock seconds.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

from gcmlm_assets.cohort.model import modelling
from gcmlm_assets.storage import read_version_pointer
from gcmlm_assets_tests.support.robustness.artifacts import (
    digests,
    materialize_cohort,
    prepare_root,
    visible_damage,
    without_timing,
)

IDENTICAL, CONTENT = "identical bytes", "equal in content (timing removed)"


def test_the_same_cohort_twice_from_scratch_gives_the_same_artifacts(reference_cohort, run_server, capsys):
    ref = reference_cohort
    shutil.rmtree(ref.data.artifacts)
    shutil.rmtree(ref.data.home)
    again = prepare_root(ref.data.root, ref.landing, [p.patient_id for p in ref.plans])
    materialize_cohort(run_server, again, ref.plans)
    assert visible_damage(again.artifacts) == []

    first, second = digests(ref.snapshot), digests(again.artifacts)
    assert sorted(first) == sorted(second)
    outcome = {}
    for rel in sorted(first):
        if first[rel] == second[rel]:
            outcome[rel] = IDENTICAL
        elif rel.startswith("radiomics_row/") and rel.endswith("/_manifest.json") and \
                without_timing(ref.snapshot / rel) == without_timing(again.artifacts / rel):
            outcome[rel] = CONTENT
        else:
            outcome[rel] = "differs"
    assert {rel: how for rel, how in outcome.items() if how == "differs"} == {}
    assert len(outcome) >= 60 and {rel.split("/")[0] for rel in outcome} == {
        "ct_image", "ct_mask", "radiomics_row", "patch_coords", "uni_features", "slide_vector",
        "clinical_table", "fused_table", "risk_model", "risk_scores"}
    # The model is published under the same version name, with the same metrics.
    pointer = read_version_pointer(again.artifacts / "risk_model")
    assert pointer == read_version_pointer(ref.snapshot / "risk_model")
    metrics = json.loads((again.artifacts / "risk_model" / pointer["version"] / "metrics.json").read_text(encoding="utf-8"))
    assert 0 <= metrics["fused"]["auc"] <= 1

    by_asset: dict[str, Counter] = {}
    for rel, how in outcome.items():
        by_asset.setdefault(rel.split("/")[0], Counter())[how] += 1
    with capsys.disabled():
        print(f"\n| asset | files | {IDENTICAL} | {CONTENT} |\n|---|---|---|---|")
        for asset, counts in sorted(by_asset.items()):
            print(f"| {asset} | {sum(counts.values())} | {counts[IDENTICAL]} | {counts[CONTENT]} |")
        print(f"risk_model version {pointer['version']} both times; fused CV AUC {metrics['fused']['auc']}")


def test_saving_a_model_twice_gives_the_same_bytes_and_the_same_scores(reference_cohort, tmp_path):
    import pyarrow.parquet as pq

    folder = reference_cohort.snapshot / "risk_model" / read_version_pointer(reference_cohort.snapshot /
                                                                             "risk_model")["version"]
    model = modelling.load_model(folder / "model.skops")
    modelling.save_model(model, tmp_path / "one.skops")
    modelling.save_model(modelling.load_model(tmp_path / "one.skops"), tmp_path / "two.skops")
    assert (tmp_path / "one.skops").read_bytes() == (tmp_path / "two.skops").read_bytes() \
        == (folder / "model.skops").read_bytes()
    fused = pq.read_table(reference_cohort.snapshot / "fused_table" / "fused.parquet")
    assert modelling.load_model(tmp_path / "two.skops").score_table(fused).equals(model.score_table(fused))
