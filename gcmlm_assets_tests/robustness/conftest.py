"""One small synthetic cohort materialized once per session, the reference the kill and determinism
tests compare against, and the run server both use (see runs.py)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from gcmlm_assets_tests.support.robustness.artifacts import DataRoot, materialize_cohort, prepare_root, visible_damage
from gcmlm_assets_tests.support.robustness.runs import RunServer

# Six patients: three per class (the demo profile's risk_model needs three labelled per class), four with
# a reference stomach mask (no nnU-Net is trained), two with two slides; slides kept small.
COHORT_SIZE = 6
SLIDE_WIDTH = (800, 1000)


@dataclass(frozen=True)
class Reference:
    data: DataRoot
    plans: list
    snapshot: Path  # a copy of the artifacts as the uninterrupted runs left them
    landing: Path

    def patient(self, *, reference_mask: bool = False, slides: int = 1):
        return next(p for p in self.plans if p.has_reference_mask >= reference_mask and p.n_slides >= slides)


@pytest.fixture(scope="session")
def run_server(tmp_path_factory) -> RunServer:
    server = RunServer(tmp_path_factory.mktemp("run_server"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def reference_cohort(tmp_path_factory, run_server) -> Reference:
    from gcmlm_assets.demo.synthetic import write_cohort
    from gcmlm_assets.demo.synthetic_plan import CohortSpec

    base = tmp_path_factory.mktemp("robustness")
    cohort = write_cohort(base / "landing", CohortSpec.small(COHORT_SIZE, slide_width=SLIDE_WIDTH))
    data = prepare_root(base / "cohort", cohort.landing, cohort.patient_ids)
    materialize_cohort(run_server, data, cohort.patients)
    assert visible_damage(data.artifacts) == []
    snapshot = base / "snapshot_a"
    shutil.copytree(data.artifacts, snapshot, symlinks=True)
    return Reference(data, cohort.patients, snapshot, cohort.landing)
