"""What the project's own definitions hand their parts, for tests that materialize a part alone."""

from __future__ import annotations


def patient_result_checks():
    """The `patient_result_checks` resource exactly as definitions.py builds it (the blocking checks
    of radiomics_row and slide_vector), for runs of the cohort assets outside the definitions."""
    from gcmlm_assets.definitions import defs

    return defs.resources["patient_result_checks"]
