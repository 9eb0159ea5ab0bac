"""De-identification of a received CT instance: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile, with the Retain UIDs and Retain Patient Characteristics options.

Retain UIDs: the SEG and SR the platform sends back must reference the original study, series and
instances. Retain Patient Characteristics: sex, age, size and weight are model covariates and
identify no one on their own. Every other attribute of the profile's table that a CT carries is
removed (X) or emptied when the CT IOD requires it to be present (Z); on top of the table, as a net
for what the table leaves to judgement: every person name, every date and time, all of group 0010
except the retained characteristics, and all private attributes. PatientID and PatientName become
the pseudonym. Pixel data is not cleaned, so an instance that says it has burned-in annotation is
refused (`refusal`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

# (code value, meaning) of the DCM codes recorded in (0012,0064), profile first.
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
RETAIN_UIDS = ("113110", "Retain UIDs Option")
RETAIN_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
METHOD_CODES = (BASIC_PROFILE, RETAIN_UIDS, RETAIN_PATIENT_CHARACTERISTICS)

# Group 0010 attributes kept under Retain Patient Characteristics (PS3.15 Table E.1-1).
PATIENT_CHARACTERISTICS = frozenset({
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
    "PregnancyStatus", "PatientSexNeutered", "PatientSpeciesDescription", "PatientBreedDescription",
})
# Table E.1-1 action Z: present but empty (Type 2 in the CT Image IOD). PatientID/Name are set apart.
EMPTIED = ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate", "StudyDate",
           "StudyTime", "ContentDate", "ContentTime", "ContrastBolusAgent",
           "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest")
# Table E.1-1 actions X and D (removed here, D's dummy value being of no use to the platform), for
# the attributes a CT instance may carry outside group 0010, person names and dates (removed anyway).
REMOVED = (
    "InstitutionName", "InstitutionAddress", "InstitutionCodeSequence", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorIdentificationSequence", "StationName",
    "StudyDescription", "SeriesDescription", "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
    "DerivationDescription", "IdentifyingComments", "TimezoneOffsetFromUTC", "InstanceCreatorUID",
    "ReferencedPatientSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
    "ReferencedPatientAliasSequence", "DeviceSerialNumber", "DeviceUID", "PlateID", "GeneratorID", "CassetteID",
    "GantryID", "DetectorID", "ProtocolName", "AcquisitionDeviceProcessingDescription", "AcquisitionComments",
    "AcquisitionProtocolDescription", "ContributionDescription",
    "RespiratoryMotionCompensationTechniqueDescription", "ImageComments", "FrameComments",
    "ImagePresentationComments", "ReasonForStudy", "RequestingService", "StudyComments",
    "RequestedContrastAgent", "StudyIDIssuer", "RequestedProcedureDescription", "RequestedProcedureID",
    "RequestedProcedureComments", "ReasonForTheRequestedProcedure", "ReasonForTheImagingServiceRequest",
    "ImagingServiceRequestComments", "RequestAttributesSequence", "PerformedProcedureStepID",
    "PerformedProcedureStepDescription", "PerformedStationAETitle", "PerformedStationName", "PerformedLocation",
    "CommentsOnThePerformedProcedureStep", "ScheduledProcedureStepDescription", "ScheduledProcedureStepID",
    "ScheduledStationName", "ScheduledProcedureStepLocation", "ScheduledStationAETitle",
    "ScheduledProcedureStepSequence", "AcquisitionContextSequence", "ContentSequence",
    "PatientTransportArrangements", "IntendedRecipientsOfResultsIdentificationSequence", "PersonAddress",
    "PersonTelephoneNumbers", "PersonIdentificationCodeSequence", "AuthorObserverSequence",
    "ParticipantSequence", "VerifyingOrganization", "VerifyingObserverSequence",
    "VerifyingObserverIdentificationCodeSequence", "AdmissionID", "PatientState",
    "PatientInstitutionResidence", "CurrentPatientLocation", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "VisitComments", "OriginalAttributesSequence", "DigitalSignatureUID", "DigitalSignaturesSequence",
    "StorageMediaFileSetID", "StorageMediaFileSetUID", "ConfidentialityConstraintOnPatientDataDescription",
    "TextComments", "TextString", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "ClinicalTrialCoordinatingCenterName", "ClinicalTrialSeriesID", "ClinicalTrialSeriesDescription",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "IssuerOfAdmissionIDSequence", "IssuerOfServiceEpisodeIDSequence", "IssuerOfAccessionNumberSequence",
)
# Every date and time goes (the profile removes or empties each one a CT carries), except the
# Type 2 ones in EMPTIED, which stay present and empty.
DATE_VRS = frozenset({"DA", "DT", "TM"})
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


class IntakeRefusal(ValueError):
    """An instance the receiver will not store; the message is the reason given to the sender."""


def sop_class_refusal(sop_class_uid: str) -> str | None:
    """Why an instance of this SOP class is not stored, or None for CT Image Storage."""
    if sop_class_uid == CT_IMAGE_STORAGE:
        return None
    from pynetdicom.sop_class import uid_to_sop_class

    name = getattr(uid_to_sop_class(sop_class_uid), "name", "") or "unknown SOP class"
    why = ("multi-frame; ct_image reads single-frame series only" if sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
           else "not a CT image")
    return f"only CT Image Storage is received, not {name} ({sop_class_uid}: {why})"


def content_refusal(ds: Dataset) -> str | None:
    """Why this CT instance is not stored, or None. Checked before any file is written."""
    if not str(ds.get("PatientID", "") or "").strip():
        return "no PatientID: the instance cannot be given a pseudonym"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if len(value) > 64 or not UID_PATTERN.fullmatch(value):
            return f"{keyword} missing or not a valid UID ({value[:70]!r})"
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation is YES: pixel data would need cleaning, which this receiver does not do"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "a localizer (scout) image, not a slice of a CT volume"
    return None


def _strip(ds: Dataset) -> None:
    """The profile's removals on one dataset level, then on every sequence item below it."""
    from pydicom.datadict import keyword_for_tag

    ds.remove_private_tags()
    for keyword in REMOVED:
        if keyword in ds:
            del ds[keyword]
    for keyword in EMPTIED:
        if keyword in ds:
            ds[keyword].value = ""
    for element in list(ds):
        keyword = keyword_for_tag(element.tag)
        group = element.tag.group
        if element.VR == "PN" or element.VR in DATE_VRS and keyword not in EMPTIED:
            del ds[element.tag]
        elif group == 0x0010 and keyword not in PATIENT_CHARACTERISTICS | {"PatientID", "PatientName",
                                                                         "PatientBirthDate"}:
            del ds[element.tag]
        elif group == 0x0012 or (group & 0xFF00) in (0x5000, 0x6000) and element.tag.element in (0x3000, 0x4000):
            del ds[element.tag]  # earlier clinical-trial/de-identification records; overlay data, comments
        elif element.VR == "SQ":
            for item in element.value:
                _strip(item)


def deidentify(ds: Dataset, pseudonym: str) -> None:
    """Apply the profile to `ds` in place and record it in (0012,0062)-(0012,0064), (0028,0303)."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.sequence import Sequence

    _strip(ds)
    for keyword in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate", "StudyDate",
                    "StudyTime"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # Type 2 in the Patient and General Study modules
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [meaning for _, meaning in METHOD_CODES]
    items = []
    for value, meaning in METHOD_CODES:
        item = DicomDataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = "REMOVED"
