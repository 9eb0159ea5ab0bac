"""The demo's lymph-node figures: what lymph_nodes found against what the generator planted
(plain Python, no Dagster).

Inputs are the generator's truth (`synthetic.read_lymph_node_truth`) and each patient's
lymph_nodes `regions.json` (the design's format: per slide its nodes with `bbox_level0`,
`metastatic`, areas; the patient's `totals`). A planted node is matched to the detected node of the
same slide whose bounding box holds the planted centre (the smallest such box if several do).

The figures are reported twice (`split_by_training`): on the held-out patients, those without
annotations, which the tumour classifier never saw (the headline; the issue's targets are judged
there), and on the annotated ones, its training set (for reference: it has seen their patches).
The figures, all on synthetic slides (never clinical ones):
- node count exact: slides whose detected node count equals the planted one, of all planted slides;
- T/MLN relative error |found - planted| / planted over patients with planted metastatic nodes
  (infinite when nothing was found), its median and maximum;
- metastatic-node sensitivity (planted metastatic nodes matched to a detected metastatic node) and
  specificity (planted clean nodes matched to a detected clean node, of those matched plus the
  detected metastatic nodes that match no planted node).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

# The targets for the demo.
TARGET_T_MLN_RELATIVE_ERROR = 0.10
TARGET_SENSITIVITY = 0.9
TARGET_SPECIFICITY = 0.9


@dataclass(frozen=True)
class PatientComparison:
    patient_id: str
    annotated: bool  # a training patient of the tumour classifier
    slides: int
    slides_count_exact: int
    planted_nodes: int
    found_nodes: int | None  # None: no regions.json for the patient
    planted_metastatic: int
    found_metastatic: int | None
    planted_t_mln: float | None
    found_t_mln: float | None

    @property
    def t_mln_relative_error(self) -> float | None:
        """None when nothing was planted (no metastatic node); infinite when nothing was found."""
        if self.planted_t_mln is None:
            return None
        if self.found_t_mln is None:
            return math.inf
        return abs(self.found_t_mln - self.planted_t_mln) / self.planted_t_mln


@dataclass
class LymphNodeComparison:
    patients: list[PatientComparison] = field(default_factory=list)
    slides_exact: int = 0
    slides_total: int = 0
    true_positive: int = 0  # planted metastatic, found metastatic
    false_negative: int = 0  # planted metastatic, found clean or not found
    true_negative: int = 0  # planted clean, found clean
    false_positive: int = 0  # planted clean found metastatic, or a metastatic node where none was planted
    unmatched_planted: int = 0  # planted nodes no detected box holds
    unmatched_found: int = 0  # detected nodes holding no planted centre

    @property
    def t_mln_errors(self) -> list[float]:
        return [e for e in (p.t_mln_relative_error for p in self.patients) if e is not None]

    @property
    def t_mln_error_median(self) -> float | None:
        errors = self.t_mln_errors
        return float(statistics.median(errors)) if errors else None

    @property
    def t_mln_error_max(self) -> float | None:
        errors = self.t_mln_errors
        return max(errors) if errors else None

    @property
    def sensitivity(self) -> float | None:
        total = self.true_positive + self.false_negative
        return self.true_positive / total if total else None

    @property
    def specificity(self) -> float | None:
        total = self.true_negative + self.false_positive
        return self.true_negative / total if total else None

    def targets_met(self) -> dict[str, bool]:
        """The issue's demo targets, each True or False (False when it cannot be measured)."""
        def at_least(value, target):
            return value is not None and value >= target
        return {
            "node count exact on every slide": self.slides_total > 0 and self.slides_exact == self.slides_total,
            f"T/MLN relative error <= {TARGET_T_MLN_RELATIVE_ERROR:.0%}": (
                self.t_mln_error_max is not None and self.t_mln_error_max <= TARGET_T_MLN_RELATIVE_ERROR),
            f"sensitivity >= {TARGET_SENSITIVITY}": at_least(self.sensitivity, TARGET_SENSITIVITY),
            f"specificity >= {TARGET_SPECIFICITY}": at_least(self.specificity, TARGET_SPECIFICITY),
        }

    def figures(self) -> dict:
        """The figures as plain values (JSON-ready; an infinite error as None with a flag)."""
        def finite(value):
            return None if value is None or math.isinf(value) else round(value, 4)
        return {
            "slides_node_count_exact": self.slides_exact,
            "slides": self.slides_total,
            "t_mln_relative_error_median": finite(self.t_mln_error_median),
            "t_mln_relative_error_max": finite(self.t_mln_error_max),
            "t_mln_missing": sum(math.isinf(e) for e in self.t_mln_errors),
            "metastatic_sensitivity": finite(self.sensitivity),
            "metastatic_specificity": finite(self.specificity),
            "true_positive": self.true_positive, "false_negative": self.false_negative,
            "true_negative": self.true_negative, "false_positive": self.false_positive,
            "unmatched_planted_nodes": self.unmatched_planted, "unmatched_found_nodes": self.unmatched_found,
            "targets_met": self.targets_met(),
        }

    def figure_lines(self) -> list[str]:
        """The figures as Markdown bullets."""
        lines = [
            f"- node count exact: {self.slides_exact}/{self.slides_total} slides",
            f"- T/MLN relative error: median {_number(self.t_mln_error_median)}, max {_number(self.t_mln_error_max)} "
            f"({len(self.t_mln_errors)} patients with planted metastatic nodes)",
            f"- metastatic nodes: sensitivity {_number(self.sensitivity)} ({self.true_positive}/"
            f"{self.true_positive + self.false_negative}), specificity {_number(self.specificity)} "
            f"({self.true_negative}/{self.true_negative + self.false_positive})",
        ]
        if self.unmatched_planted or self.unmatched_found:
            lines.append(f"- unmatched: {self.unmatched_planted} planted nodes, {self.unmatched_found} detected nodes")
        return lines


def table_lines(patients: list[PatientComparison]) -> list[str]:
    """A Markdown table, a row per patient, the classifier's training patients marked."""
    def count(value):
        return "-" if value is None else str(value)

    lines = ["| patient | training | slides (count exact) | nodes planted/found | metastatic planted/found "
             "| T/MLN planted | T/MLN found | rel. error |",
             "|---|---|---|---|---|---|---|---|"]
    for p in patients:
        lines.append(
            f"| {p.patient_id} | {'yes' if p.annotated else 'no'} | {p.slides} ({p.slides_count_exact}) "
            f"| {p.planted_nodes}/{count(p.found_nodes)} | {p.planted_metastatic}/{count(p.found_metastatic)} "
            f"| {_number(p.planted_t_mln)} | {_number(p.found_t_mln)} | {_number(p.t_mln_relative_error)} |")
    return lines


def _number(value, digits=3) -> str:
    if value is None:
        return "-"
    return "not found" if math.isinf(value) else f"{value:.{digits}f}"


@dataclass(frozen=True)
class LymphNodeReport:
    """The comparison split by the tumour classifier's training set: `held_out` (patients without
    annotations; the headline, the targets judged on it) and `training` (the annotated patients)."""

    held_out: LymphNodeComparison
    training: LymphNodeComparison

    def targets_met(self) -> dict[str, bool]:
        """The issue's targets on the held-out patients (all False when there are none)."""
        return self.held_out.targets_met()

    def figures(self) -> dict:
        """JSON-ready: the held-out figures (with the targets) and the training ones, apart."""
        training = {k: v for k, v in self.training.figures().items() if k != "targets_met"}
        return {"held_out": {"patients": len(self.held_out.patients), **self.held_out.figures()},
                "training": {"patients": len(self.training.patients), **training}}

    def markdown(self) -> str:
        """The held-out figures and targets, the training figures, then the table per patient."""
        def patients(comparison):
            return f"{len(comparison.patients)} patient{'' if len(comparison.patients) == 1 else 's'}"

        lines = ["Lymph nodes against the generator's planted truth (synthetic slides, not clinical figures)",
                 "",
                 f"Held out ({patients(self.held_out)} without annotations, unseen by the tumour "
                 "classifier; the targets are judged here):",
                 *self.held_out.figure_lines(),
                 "- targets: " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}"
                                           for name, ok in self.targets_met().items()),
                 "",
                 f"Training ({patients(self.training)} with annotations, the tumour classifier's "
                 "training set; for reference only):",
                 *self.training.figure_lines(),
                 "",
                 *table_lines(sorted(self.held_out.patients + self.training.patients,
                                     key=lambda p: p.patient_id))]
        return "\n".join(lines)


def _holds(bbox, point) -> bool:
    x0, y0, x1, y1 = bbox
    x, y = point
    return x0 <= x <= x1 and y0 <= y <= y1


def _box_area(bbox) -> float:
    x0, y0, x1, y1 = bbox
    return (x1 - x0) * (y1 - y0)


def _match(planted_nodes: list[Mapping], found_nodes: list[Mapping]) -> list[int | None]:
    """For each planted node, the index of the found node whose box holds its centre."""
    matches = []
    for node in planted_nodes:
        holding = [i for i, found in enumerate(found_nodes) if _holds(found["bbox_level0"], node["centre_level0"])]
        matches.append(min(holding, key=lambda i: _box_area(found_nodes[i]["bbox_level0"])) if holding else None)
    return matches


def compare_lymph_nodes(truth: Mapping[str, Mapping], regions: Mapping[str, Mapping | None]) -> LymphNodeComparison:
    """Compare every patient of `truth` with its regions.json (`regions[patient]`; missing or None:
    nothing found, which counts against every figure)."""
    result = LymphNodeComparison()
    for patient_id in sorted(truth):
        planted = truth[patient_id]
        found = regions.get(patient_id)
        found_slides = {s["name"]: s for s in (found or {}).get("slides", [])}
        exact = 0
        for slide in planted["slides"]:
            found_nodes = list(found_slides.get(slide["name"], {}).get("nodes", []))
            exact += len(found_nodes) == len(slide["nodes"])
            matches = _match(slide["nodes"], found_nodes)
            for node, index in zip(slide["nodes"], matches):
                hit = index is not None and bool(found_nodes[index]["metastatic"])
                if index is None:
                    result.unmatched_planted += 1
                if node["metastatic"]:
                    result.true_positive += hit
                    result.false_negative += not hit
                elif index is not None:
                    result.true_negative += not hit
                    result.false_positive += hit
            spurious = [n for i, n in enumerate(found_nodes) if i not in set(matches)]
            result.unmatched_found += len(spurious)
            result.false_positive += sum(bool(n["metastatic"]) for n in spurious)
        result.slides_exact += exact
        result.slides_total += len(planted["slides"])
        totals, found_totals = planted["totals"], (found or {}).get("totals")
        result.patients.append(PatientComparison(
            patient_id=patient_id,
            annotated=bool(planted.get("annotated", False)),
            slides=len(planted["slides"]),
            slides_count_exact=exact,
            planted_nodes=totals["n_nodes"],
            found_nodes=None if found_totals is None else found_totals["n_nodes"],
            planted_metastatic=totals["n_metastatic_nodes"],
            found_metastatic=None if found_totals is None else found_totals["n_metastatic_nodes"],
            planted_t_mln=totals["t_mln"],
            found_t_mln=None if found_totals is None else found_totals.get("t_mln"),
        ))
    return result


def split_by_training(truth: Mapping[str, Mapping], regions: Mapping[str, Mapping | None]) -> LymphNodeReport:
    """`compare_lymph_nodes` on the held-out patients (truth's `annotated` false or absent) and,
    apart, on the annotated ones."""
    held_out = {k: v for k, v in truth.items() if not v.get("annotated", False)}
    training = {k: v for k, v in truth.items() if v.get("annotated", False)}
    return LymphNodeReport(compare_lymph_nodes(held_out, regions), compare_lymph_nodes(training, regions))


__all__ = ["LymphNodeComparison", "LymphNodeReport", "PatientComparison", "compare_lymph_nodes",
           "split_by_training", "table_lines"]
