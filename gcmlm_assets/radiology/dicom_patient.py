"""The patient data a derived DICOM object (SEG, SR) keeps of its source CT: the platform's id, sex and age.

Plain Python (no Dagster). highdicom copies the patient and study modules of the source series into
what it derives from it; a CT dropped straight into the landing zone (not through the PACS intake)
carries the patient's real name, id, birth date and the like. `pseudonymise` replaces or removes
them in the object and in every sequence item below it (every person name, and at the top level
what the PS3.15 Basic Profile removes: study description, admission, visit and trial attributes),
keeping the study, series and frame of reference UIDs (the SEG must stay in the CT's study) and the
dates and times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcmlm_assets.landing.intake.deidentify import REMOVED as PROFILE_REMOVED

if TYPE_CHECKING:
    import pydicom

PATIENT_GROUP = 0x0010
# The patient attributes replaced by the platform's (pseudonymous) patient id.
REPLACED = ("PatientID", "PatientName")
# Group 0010 attributes kept as they are (patient characteristics, not identity).
KEPT = ("PatientSex", "PatientAge")
# Type 2 attributes of the patient and study modules: present, but empty.
BLANKED = ("PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName")
# Names of the source's site and staff, wherever they were copied.
REMOVED = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "OperatorsName")
# What highdicom copies from the source's patient, study, patient-study and clinical-trial modules
# to the object's top level and the PS3.15 profile removes (the intake's list), but for what is the
# object's own (the SR's content, the series' description, the equipment's serial number); and the
# source's de-identification codes, which would describe another process than this one.
OWN = frozenset({"ContentSequence", "SeriesDescription", "DeviceSerialNumber",
                 "ReferencedPerformedProcedureStepSequence"})
COPIED_REMOVED = (frozenset(PROFILE_REMOVED) - OWN) | {"DeidentificationMethodCodeSequence"}
# (0012,0063) De-identification Method: LO values of at most 64 characters each.
METHOD = (
    "PatientName, PatientID: the platform's pseudonymous patient id",
    "Blanked: PatientBirthDate, AccessionNumber, StudyID",
    "Blanked: ReferringPhysicianName",
    "Removed: group 0010 but PatientSex, PatientAge",
    "Removed: InstitutionName/Address/DepartmentName, StationName",
    "Removed: every person name; PS3.15 E.1-1's study, visit, trial",
    "Kept: study, series and frame of reference UIDs; dates, times",
)


def person_name(patient_id: str) -> str:
    """`patient_id` as a Person Name of one component, the family name: the trailing caret says so
    (PS3.5 6.2.1.2); without it highdicom and dciodvfy take it for a malformed or retired form."""
    return f"{patient_id}^"


def _clean(dataset: pydicom.Dataset, patient_id: str, top: bool) -> None:
    for tag in list(dataset.keys()):
        element = dataset[tag]
        keyword = element.keyword
        if keyword in REPLACED:
            element.value = person_name(patient_id) if keyword == "PatientName" else patient_id
        elif keyword in BLANKED:
            element.value = None
        elif (element.VR == "PN" or keyword in REMOVED or (top and keyword in COPIED_REMOVED)
              or (tag.group == PATIENT_GROUP and keyword not in KEPT)):
            del dataset[tag]
        elif element.VR == "SQ":
            for item in element.value:
                _clean(item, patient_id, top=False)


def pseudonymise(dataset: pydicom.Dataset, patient_id: str) -> None:
    """Keep of the patient's identity in `dataset` (and every sequence item in it) only
    `patient_id`, the platform's pseudonymous id, as Patient ID and Patient's Name (its family name);
    record that and how in Patient Identity Removed and De-identification Method."""
    if not patient_id:
        raise ValueError("a derived DICOM object needs the platform's patient id")
    _clean(dataset, patient_id, top=True)
    dataset.PatientID = patient_id
    dataset.PatientName = person_name(patient_id)
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = list(METHOD)

