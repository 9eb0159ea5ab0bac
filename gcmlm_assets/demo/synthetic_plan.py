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

Everything is drawn from `numpy.random.default_rng([seed, patient_index, ...])`, so a plan is the
same for the same settings.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass

import numpy as np

CLINICAL_COLUMNS = ("patient_id", "mlm", "age", "sex", "pt_stage", "tumour_size_mm")


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

    def __post_init__(self) -> None:
        if self.n_patients < 2:
            raise ValueError(f"a cohort needs at least 2 patients, got {self.n_patients}")
        if min(self.ct_size) < 16:
            raise ValueError(f"ct_size {self.ct_size} is too small for the phantom (>= 16 voxels per axis)")
        if self.slide_width[0] < 512 or self.slide_width[1] < self.slide_width[0]:
            raise ValueError(f"slide_width {self.slide_width} must be an increasing range from >= 512 px")

    @classmethod
    def small(cls, n_patients: int = 8, **overrides) -> CohortSpec:
        """A cohort for tests: a few seconds per asset."""
        settings = dict(n_patients=n_patients, ct_size=(48, 48, 24), ct_spacing=(4.0, 4.0, 5.0),
                        slide_width=(1200, 1600), pyramid_levels=3)
        settings.update(overrides)
        return cls(**settings)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


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
    return plans


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
