"""Mean-logit against stacked fusion on simulated cohorts: the evidence behind the default.

    python -m benchmarks.fusion_rules [--seeds 4] [--repeats 2]

Each row is one scenario, averaged over `--seeds` independent synthetic cohorts (the tests'
feature generator, gcmlm_assets_tests/support/cohort/synthetic.py, seeds 100, 101, ...; never the
demo's cohort or any model's own folds). Every cohort is cross-validated once with the real
`crossval.cross_validate`, which scores both fusions on the same folds; the table gives the mean
CV AUC of each block, the better block, and each fusion, and how often stacking beat the mean.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from gcmlm_assets.cohort.tables import cohort_data
from gcmlm_assets.cohort.model import crossval
from gcmlm_assets.cohort.model import metrics as model_metrics
from gcmlm_assets.cohort.model import model_settings

# (name, patients, radiology signal, pathology signal): the generator's signal scales, 1.0 = its default
SCENARIOS = [
    ("both informative", 24, 1.0, 1.0),
    ("both informative", 40, 1.0, 1.0),
    ("both informative", 80, 1.0, 1.0),
    ("weak pathology", 40, 1.5, 0.2),
    ("weak pathology", 80, 1.5, 0.2),
]


def cohort_aucs(n: int, seed: int, radiology_signal: float, pathology_signal: float, settings) -> dict[str, float]:
    from gcmlm_assets_tests.support.cohort.synthetic import cohort_table, make_cohort

    # the generator draws the labels first, so both calls share them; each keeps one block
    ids, labels, radiomics, _ = make_cohort(n, seed=seed, signal=radiology_signal)
    _, same, _, pathology = make_cohort(n, seed=seed, signal=pathology_signal)
    assert (labels == same).all()
    data = cohort_data.CohortData.from_table(cohort_table(ids, labels, radiomics, pathology), settings.blocks())
    metrics, _ = model_metrics.evaluate_cross_validation(crossval.cross_validate(data, settings), settings)
    return {model: values["auc"] for model, values in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="CV repeats per cohort")
    args = parser.parse_args()
    settings = dataclasses.replace(model_settings.ModelSettings(), fusion="mean", n_repeats=args.repeats,
                                   n_bootstrap=50, abmil_in_ablation=False)
    print(f"{'scenario':<18} {'n':>4} {'seeds':>5} {'radiology':>9} {'pathology':>9} {'best block':>10} "
          f"{'mean logit':>10} {'stacked':>8} {'stacked wins':>12}")
    for name, n, radiology_signal, pathology_signal in SCENARIOS:
        rows = [cohort_aucs(n, 100 + seed, radiology_signal, pathology_signal, settings)
                for seed in range(args.seeds)]
        mean = {key: float(np.mean([r[key] for r in rows])) for key in ("radiology", "pathology", "fused",
                                                                         "fused_stacked")}
        best = float(np.mean([max(r["radiology"], r["pathology"]) for r in rows]))
        wins = sum(r["fused_stacked"] > r["fused"] for r in rows)
        print(f"{name:<18} {n:>4} {args.seeds:>5} {mean['radiology']:>9.3f} {mean['pathology']:>9.3f} "
              f"{best:>10.3f} {mean['fused']:>10.3f} {mean['fused_stacked']:>8.3f} {wins:>8}/{args.seeds}",
              flush=True)


if __name__ == "__main__":
    main()
