"""Figures of the risk model: the cross-validation curves and the distribution of the risk scores.

Plain Python (no Dagster); matplotlib comes through gcmlm_assets.pictures, imported when drawing.
"""

from __future__ import annotations

from gcmlm_assets.cohort.model.model_settings import FUSED
from gcmlm_assets.lazy import lazy

# imported on first use: the definitions import this module, the steps compute (gcmlm_assets/lazy.py)
np = lazy("numpy")


def plot_curves(curves: dict, kind: str, labels: dict[str, str] | None = None) -> bytes:
    """Full-size PNG of one kind of curve ('roc', 'calibration', 'decision_curve') for every model."""
    from gcmlm_assets import pictures

    # 8 in at the pictures' 150 dpi: 1200 px, shown 1:1 in the UI with 10 pt text about 20 px high
    fig, ax = pictures.plt.subplots(figsize=(8, 6), layout="constrained")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC (out-of-fold, mean over repeats)")
    elif kind == "calibration":
        ax.plot([0, 1], [0, 1], ls=":", c="grey", label="ideal")
        ax.set(xlabel="predicted probability", ylabel="observed MLM fraction", title="Calibration",
               xlim=(0, 1), ylim=(0, 1))
    else:
        ax.axhline(0, c="black", lw=1, label="treat none")
        ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve")
    highest_benefit = 0.0
    for model, curve in curves.items():
        if not curve:
            continue
        label = (labels or {}).get(model, model)
        if kind == "roc":
            ax.plot(curve["roc"]["fpr"], curve["roc"]["tpr"], label=label)
        elif kind == "calibration":
            ax.plot(curve["calibration"]["predicted"], curve["calibration"]["observed"], marker="o", label=label)
        else:
            dca = curve["decision_curve"]
            ax.plot(dca["thresholds"], dca["model"], label=label)
            highest_benefit = max(highest_benefit, max(dca["model"]), dca["treat_all"][0])
            if model == FUSED:
                ax.plot(dca["thresholds"], dca["treat_all"], c="grey", ls="--", label="treat all")
    if kind == "decision_curve":
        # treat-all falls steeply at high thresholds; keep the useful range in view
        ax.set_ylim(-0.05, highest_benefit + 0.05)
    ax.legend(fontsize=10, loc="best")
    return pictures.figure_png(fig)


def plot_score_distribution(probabilities, threshold: float, labels=None) -> bytes:
    """Full-size PNG: histogram of the MLM probabilities, stacked by known label, with the risk
    threshold as a vertical line and the high/low risk counts in the title."""
    from gcmlm_assets import pictures

    probabilities = np.asarray(probabilities, dtype=float)
    labels = np.full(len(probabilities), np.nan) if labels is None else \
        np.array([np.nan if v is None else float(v) for v in labels])
    high = int(np.count_nonzero(probabilities >= threshold))
    groups = [("MLM", labels == 1, "tab:red"), ("no MLM", labels == 0, "tab:blue"),
              ("label unknown", np.isnan(labels), "tab:grey")]
    groups = [(name, probabilities[rows], colour) for name, rows, colour in groups if rows.any()]
    fig, ax = pictures.plt.subplots(figsize=(8, 5), layout="constrained")
    if groups:  # matplotlib refuses a stacked histogram of no data sets
        ax.hist([values for _, values, _ in groups], bins=np.linspace(0, 1, 21), stacked=True,
                color=[colour for *_, colour in groups],
                label=[f"{name} ({len(values)})" for name, values, _ in groups])
    ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.3f}")
    ax.yaxis.get_major_locator().set_params(integer=True)  # patients come whole
    ax.set(xlabel="MLM probability (fused model)", ylabel="patients", xlim=(0, 1),
           title=f"Risk scores of {len(probabilities)} patients: {high} high risk, "
                 f"{len(probabilities) - high} low risk")
    ax.legend(fontsize=10, loc="best")
    return pictures.figure_png(fig)

