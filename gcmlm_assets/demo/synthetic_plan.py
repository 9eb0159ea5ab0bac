"""What is drawn for each patient of the synthetic cohort before any pixel is made, and the
cohort's clinical table (plain Python, no Dagster).

The planted signal: every patient has two latent severities, one per modality,
`severity = strength * (2 * mlm - 1) / 2 + N(0, 1)` with independent noise. The radiology
severity enlarges the stomach, thickens its wall and makes its texture more heterogeneous
(synthetic_ct.py); the pathology severity raises nuclear density and size and the share of tissue
in tumour nests, less stroma (synthetic_slides.py). Each modality alone separates the classes
imperfectly (AUC about `Phi(strength / sqrt(2))`); together they separate them better, so fusion
has something to add. Clinical covariates carry at most a weak association (pT stage), never the
answer.

Part of the cohort (`ln_fraction`, balanced over the label) also has lymph-node slides: one per
patient (a second for a share `ln_second_slide` of them, none by default), each with `ln_nodes`
(2-3 by default) separated nodes. A third latent severity, drawn the same way,
sets the chance that a node is metastatic and the share of a metastatic node taken by tumour, so
the number of metastatic nodes and T/MLN (tumour area / metastatic node area) carry part of the
signal. A few of these patients (`ln_annotated`, both classes, with tumour-bearing and clean
nodes) get region annotations: the tumour classifier's training set. Sizes are in units of the
tiling's patch (`ln_unit_px` level-0 px); the shapes and pixels are made in
synthetic_lymph_nodes.py. These draws use their own streams (`[seed, 2]`, `[seed, 2, i]`), so the
radiology and pathology draws are those of a cohort without lymph-node slides.

Part of the cohort (`followup_fraction`, balanced over the label) has a second CT, 60-120 days after
the first (both dated, ISO). Between the scans the stomach changes by `radiology_change =
followup_change * (followup_signal_strength * (2 * mlm - 1) / 2 + N(0, 1))` severity units: it
shrinks, thins and grows more homogeneous in most patients without metastases and does the opposite
in most with them. The change is drawn independently of the first CT's severity, so the first
scan's features do not show it: only the change between the two scans does. Its streams are
`[seed, 4]`, `[seed, 4, i]`, so every other draw is that of a cohort without second CTs.

Everything is drawn from `numpy.random.default_rng([seed, patient_index, ...])`, so a plan is the
same for the same settings.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

CLINICAL_COLUMNS = ("patient_id", "mlm", "age", "sex", "pt_stage", "tumour_size_mm")
FIRST_SCAN_EPOCH = dt.date(2024, 1, 1)  # first CTs are dated within the year from here


@dataclass(frozen=True)
class CohortSpec:
    """What to generate. The defaults are the demo's cohort; tests use smaller values."""

    n_patients: int = 24
    seed: int = 20240611
    id_prefix: str = "GC"
    ct_size: tuple[int, int, int] = (96, 96, 48)  # x, y, z voxels
    ct_spacing: tuple[float, float, float] = (2.0, 2.0, 2.5)  # mm
    slide_width: tuple[int, int] = (2000, 3000)  # level-0 pixels, drawn per slide
    slide_aspect: float = 0.75
    mpp: float = 0.5  # µm per level-0 pixel (a 20x scan)
    pyramid_levels: int = 4
    max_slides: int = 2
    jpeg_quality: int = 90
    # Class separation of each modality's latent severity, in noise SDs.
    signal_strength: float = 1.8
    # Lymph-node slides. Sizes in units of `ln_unit_px` level-0 px: the tiling's 256 px patch at
    # 0.5 µm/px, so that tumour regions span enough patches for patch-level areas within a few %.
    ln_fraction: float = 0.5  # share of each class with lymph-node slides
    # The demo encodes every lymph-node patch on the CPU: these keep it to about 3,000 patches.
    ln_second_slide: float = 0.0  # chance that such a patient has a second slide
    ln_nodes: tuple[int, int] = (2, 3)  # nodes per slide, inclusive
    ln_node_radius: tuple[float, float] = (4.5, 6.5)  # a node's equivalent radius, units
    ln_min_tumour_radius: float = 3.0  # a tumour region's smallest equivalent radius, units
    ln_max_units: float = 300.0  # the nodes' total area per slide, units² (about its patch count)
    ln_gap: float = 2.0  # glass between nodes' bounding boxes, units
    ln_unit_px: int = 256
    ln_annotated: int = 4  # patients whose lymph-node slides come with annotations
    # The lymph-node severity's class separation: stronger than the others', since only part of the
    # cohort has the slides (a block that ranks its half of the cohort poorly spoils the fused ranking).
    ln_signal_strength: float = 3.0
    # A second CT for part of the cohort (`followup_fraction` of each class), `followup_days` after
    # the first, with a planted change in the stomach that depends on the label (see the module's
    # docstring); stronger than the first CT's, since only part of the cohort has it.
    followup_fraction: float = 0.4
    followup_days: tuple[int, int] = (60, 120)  # inclusive
    followup_signal_strength: float = 2.5
    followup_change: float = 0.6  # the change's scale: radiology severity units per noise SD

    def __post_init__(self) -> None:
        if self.n_patients < 2:
            raise ValueError(f"a cohort needs at least 2 patients, got {self.n_patients}")
        if min(self.ct_size) < 16:
            raise ValueError(f"ct_size {self.ct_size} is too small for the phantom (>= 16 voxels per axis)")
        if self.slide_width[0] < 512 or self.slide_width[1] < self.slide_width[0]:
            raise ValueError(f"slide_width {self.slide_width} must be an increasing range from >= 512 px")
        if not 0.0 <= self.ln_fraction <= 1.0 or not 0.0 <= self.ln_second_slide <= 1.0:
            raise ValueError(f"ln_fraction {self.ln_fraction} and ln_second_slide {self.ln_second_slide} "
                             "must lie in [0, 1]")
        if not 1 <= self.ln_nodes[0] <= self.ln_nodes[1]:
            raise ValueError(f"ln_nodes {self.ln_nodes} must be an increasing range from >= 1")
        low, high = self.ln_node_radius
        if not self.ln_min_tumour_radius < low <= high:
            raise ValueError(f"ln_node_radius {self.ln_node_radius} must be an increasing range above "
                             f"ln_min_tumour_radius {self.ln_min_tumour_radius}")
        if self.ln_unit_px < 8:
            raise ValueError(f"ln_unit_px {self.ln_unit_px} is too small (>= 8 px)")
        if not 0.0 <= self.followup_fraction <= 1.0:
            raise ValueError(f"followup_fraction {self.followup_fraction} must lie in [0, 1]")
        if not 1 <= self.followup_days[0] <= self.followup_days[1]:
            raise ValueError(f"followup_days {self.followup_days} must be an increasing range from >= 1 day")

    @classmethod
    def small(cls, n_patients: int = 8, **overrides) -> CohortSpec:
        """A cohort for tests: a few seconds per asset. No lymph-node slides and no second CT unless asked
        for (`ln_fraction`, `followup_fraction`): the tests that need them ask."""
        settings = dict(n_patients=n_patients, ct_size=(48, 48, 24), ct_spacing=(4.0, 4.0, 5.0),
                        slide_width=(1200, 1600), pyramid_levels=3, ln_unit_px=32, ln_fraction=0.0,
                        followup_fraction=0.0)
        settings.update(overrides)
        return cls(**settings)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class PlannedNode:
    """One lymph node as planned: its size and whether (and how much) tumour it holds."""

    radius: float  # equivalent radius (sqrt of the semi-axes' product), units
    aspect: float  # minor / major semi-axis
    angle: float  # degrees, the major axis from the x axis
    metastatic: bool
    tumour_share: float  # planned share of the node's area in tumour (0 for a clean node)
    tumour_regions: int  # 0, 1 or 2


@dataclass(frozen=True)
class PatientPlan:
    """Everything drawn for one patient before any pixel is made."""

    index: int
    patient_id: str
    mlm: int
    has_reference_mask: bool
    n_slides: int
    radiology_severity: float
    pathology_severity: float
    age: int
    sex: int  # 1 = male
    pt_stage: int
    tumour_size_mm: float
    lymph_node_severity: float = 0.0
    ln_slides: tuple[tuple[PlannedNode, ...], ...] = ()  # per lymph-node slide, its nodes
    ln_annotated: bool = False  # the lymph-node slides come with region annotations
    # The CT timepoints (ISO dates, oldest first) when the patient has a second CT, else () (one CT,
    # directly in ct/); the second CT's radiology severity is radiology_severity + radiology_change.
    scan_dates: tuple[str, ...] = ()
    radiology_change: float = 0.0

    @property
    def followup_severity(self) -> float:
        return self.radiology_severity + self.radiology_change


def patient_id(spec: CohortSpec, index: int) -> str:
    return f"{spec.id_prefix}{index + 1:04d}"


def plan_cohort(spec: CohortSpec) -> list[PatientPlan]:
    """Labels (half positive, rounded down), reference masks (half of each class) and latent severities."""
    rng = np.random.default_rng([spec.seed, 0])
    n = spec.n_patients
    labels = np.zeros(n, dtype=int)
    labels[rng.permutation(n)[: n // 2]] = 1
    # Reference masks for every other patient of each class, so that which CTs the network
    # segments is independent of the label.
    has_mask = np.zeros(n, dtype=bool)
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        has_mask[members[::2]] = True
    plans = []
    for i in range(n):
        prng = np.random.default_rng([spec.seed, 1, i])
        shift = spec.signal_strength * (2 * labels[i] - 1) / 2
        rad = float(shift + prng.normal())
        path = float(shift + prng.normal())
        # pT stage is only weakly tied to the label (a realistic, non-decisive covariate).
        stage = int(np.clip(round(2.4 + 0.4 * labels[i] + prng.normal(0, 0.9)), 1, 4))
        plans.append(PatientPlan(
            index=i,
            patient_id=patient_id(spec, i),
            mlm=int(labels[i]),
            has_reference_mask=bool(has_mask[i]),
            n_slides=int(prng.integers(1, spec.max_slides + 1)),
            radiology_severity=round(rad, 6),
            pathology_severity=round(path, 6),
            age=int(np.clip(round(prng.normal(64, 10)), 30, 90)),
            sex=int(prng.random() < 0.65),
            pt_stage=stage,
            tumour_size_mm=round(float(np.clip(prng.normal(35 + 5 * stage, 12), 8, 120)), 1),
        ))
    return _with_followup_scans(spec, _with_lymph_nodes(spec, plans, labels), labels)


def _with_lymph_nodes(spec: CohortSpec, plans: list[PatientPlan], labels: np.ndarray) -> list[PatientPlan]:
    """The lymph-node severity of every patient, the slides of `ln_fraction` of each class and the
    annotated subset, from streams the other draws never use."""
    rng = np.random.default_rng([spec.seed, 2])
    chosen = np.zeros(len(plans), dtype=bool)
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        chosen[rng.permutation(members)[: int(round(spec.ln_fraction * len(members)))]] = True
    plans = [replace(plan, **_lymph_node_draws(spec, plan, bool(chosen[plan.index]))) for plan in plans]
    annotated = _annotated_subset(spec, plans, rng)
    return [replace(plan, ln_annotated=plan.index in annotated) for plan in plans]


def _lymph_node_draws(spec: CohortSpec, plan: PatientPlan, has_slides: bool) -> dict:
    prng = np.random.default_rng([spec.seed, 2, plan.index])
    severity = float(spec.ln_signal_strength * (2 * plan.mlm - 1) / 2 + prng.normal())
    if not has_slides:
        return {"lymph_node_severity": round(severity, 6)}
    n_slides = 2 if prng.random() < spec.ln_second_slide else 1
    return {"lymph_node_severity": round(severity, 6),
            "ln_slides": tuple(_planned_slide(spec, severity, prng) for _ in range(n_slides))}


def _planned_slide(spec: CohortSpec, severity: float, rng: np.random.Generator) -> tuple[PlannedNode, ...]:
    n_nodes = int(rng.integers(spec.ln_nodes[0], spec.ln_nodes[1] + 1))
    low, high = spec.ln_node_radius
    # Keep the nodes' total area (about the slide's patch count) within the budget.
    high = float(np.clip(math.sqrt(spec.ln_max_units / (math.pi * n_nodes)), low, high))
    # A node is metastatic with a chance rising with the severity; tumour takes a larger share of
    # it as the severity rises, never less than a region of ln_min_tumour_radius.
    p_metastatic = 1.0 / (1.0 + math.exp(-2.5 * severity))
    nodes = []
    for _ in range(n_nodes):
        metastatic = bool(rng.random() < p_metastatic)
        # Metastatic nodes are enlarged: drawn from the upper part of the size range.
        radius = float(rng.uniform(low + 0.4 * (high - low) if metastatic else low, high))
        aspect = float(rng.uniform(0.65, 0.95))
        angle = float(rng.uniform(0.0, 180.0))
        share, regions = 0.0, 0
        if metastatic:
            floor = (spec.ln_min_tumour_radius / radius) ** 2
            share = float(np.clip(0.5 + 0.25 * severity + rng.normal(0, 0.05), floor, 0.85))
            two_fit = share * radius**2 >= 2 * (1.1 * spec.ln_min_tumour_radius) ** 2 and aspect < 0.8
            regions = 2 if two_fit and rng.random() < 0.5 else 1
        nodes.append(PlannedNode(radius=round(radius, 4), aspect=round(aspect, 4), angle=round(angle, 2),
                                 metastatic=metastatic, tumour_share=round(share, 4), tumour_regions=regions))
    return tuple(nodes)


def _annotated_subset(spec: CohortSpec, plans: list[PatientPlan], rng: np.random.Generator) -> set[int]:
    """`ln_annotated` patients with lymph-node slides, alternating over the classes; patients whose
    slides hold both tumour-bearing and clean nodes first, so the classifier sees both in one slide."""
    queues = []
    for cls in (1, 0):
        members = [p for p in plans if p.ln_slides and p.mlm == cls]
        shuffled = [members[k] for k in rng.permutation(len(members))]
        queues.append(sorted(shuffled, key=lambda p: not _mixed(p)))  # stable: mixed first, then drawn order
    chosen: list[int] = []
    while len(chosen) < spec.ln_annotated and any(queues):
        for queue in queues:
            if queue and len(chosen) < spec.ln_annotated:
                chosen.append(queue.pop(0).index)
    return set(chosen)


def _mixed(plan: PatientPlan) -> bool:
    flags = {node.metastatic for nodes in plan.ln_slides for node in nodes}
    return flags == {True, False}


def _with_followup_scans(spec: CohortSpec, plans: list[PatientPlan], labels: np.ndarray) -> list[PatientPlan]:
    """The second CT of `followup_fraction` of each class: its dates and the planted change, from
    streams no other draw uses (`[seed, 4]`, `[seed, 4, i]`), so every other draw is unchanged."""
    rng = np.random.default_rng([spec.seed, 4])
    chosen = np.zeros(len(plans), dtype=bool)
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        chosen[rng.permutation(members)[: int(round(spec.followup_fraction * len(members)))]] = True
    out = []
    for plan in plans:
        if not chosen[plan.index]:
            out.append(plan)
            continue
        prng = np.random.default_rng([spec.seed, 4, plan.index])
        first = FIRST_SCAN_EPOCH + dt.timedelta(days=int(prng.integers(0, 365)))
        second = first + dt.timedelta(days=int(prng.integers(spec.followup_days[0], spec.followup_days[1] + 1)))
        # Independent of the first CT's severity: only the change between the scans carries it.
        change = spec.followup_change * (spec.followup_signal_strength * (2 * plan.mlm - 1) / 2 + prng.normal())
        out.append(replace(plan, scan_dates=(first.isoformat(), second.isoformat()),
                           radiology_change=round(float(change), 6)))
    return out


def clinical_csv_text(plans: list[PatientPlan], real_patient: str | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CLINICAL_COLUMNS)
    for p in plans:
        writer.writerow([p.patient_id, p.mlm, p.age, p.sex, p.pt_stage, f"{p.tumour_size_mm:.1f}"])
    if real_patient:
        # Outcome and covariates unknown: scored by the model, never trained on.
        writer.writerow([real_patient, "", "", "", "", ""])
    return buffer.getvalue()
