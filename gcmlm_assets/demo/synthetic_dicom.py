"""A demo CT volume as the DICOM series a scanner would send (plain Python, no Dagster).

The demo's CTs land as DICOM so that each patient's mask can go back as a DICOM SEG that
references the study, series and instances (radiology/dicom_seg.py). One file per slice of the
volume's own grid (its orientation kept, so ct_image's reorientation is still exercised), int16 HU
with an identity rescale. Nothing depends on the clock: the UIDs are derived from the patient and
`identity` (the plan or the source file's hash) and no date or time is written, so the same
volume gives the same bytes.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from gcmlm_assets.radiology.dicom_seg import derived_uid

if TYPE_CHECKING:
    import SimpleITK as sitk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "gcmlm_assets demo"


def slice_name(index: int) -> str:
    return f"IM{index + 1:05d}.dcm"


def dicom_series_files(volume: sitk.Image, patient_id: str, identity: str,
                       description: str) -> dict[str, bytes]:
    """{file name: bytes} of `volume` (integer HU) as a CT series, one file per slice along its
    third axis; the same arguments give the same bytes."""
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pydicom.valuerep import format_number_as_ds

    def ds(values) -> list[str]:  # as precise as a decimal string's 16 characters allow
        return [format_number_as_ds(float(v)) for v in values]

    values = sitk.GetArrayFromImage(volume)
    if not np.issubdtype(values.dtype, np.integer) or values.min() < -32768 or values.max() > 32767:
        raise ValueError(f"{patient_id}: the CT must hold int16 HU to be written as DICOM, got {values.dtype}")
    values = values.astype(np.int16)
    direction = volume.GetDirection()
    sx, sy, sz = volume.GetSpacing()
    study, series, frame = (derived_uid("demo ct", kind, patient_id, identity) for kind in ("study", "series", "frame"))
    files = {}
    for k in range(values.shape[0]):
        instance = derived_uid("demo ct", "instance", patient_id, identity, str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, instance
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        item = pydicom.Dataset()
        item.file_meta = meta
        item.SOPClassUID, item.SOPInstanceUID = CT_IMAGE_STORAGE, instance
        item.StudyInstanceUID, item.SeriesInstanceUID, item.FrameOfReferenceUID = study, series, frame
        item.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        item.Modality, item.Manufacturer, item.SeriesDescription = "CT", MANUFACTURER, description
        item.PatientName, item.PatientID, item.PatientBirthDate, item.PatientSex = patient_id, patient_id, "", ""
        item.StudyDate, item.StudyTime, item.StudyID = "", "", "1"  # no clock: the same bytes every time
        item.AccessionNumber, item.ReferringPhysicianName = "", ""
        item.SeriesNumber, item.InstanceNumber, item.PositionReferenceIndicator = 1, k + 1, ""
        item.BodyPartExamined, item.KVP = "ABDOMEN", ""
        item.ImageOrientationPatient = ds((*direction[0::3], *direction[1::3]))
        item.ImagePositionPatient = ds(volume.TransformIndexToPhysicalPoint((0, 0, k)))
        item.PixelSpacing = ds((sy, sx))
        item.SliceThickness = ds((sz,))[0]
        item.Rows, item.Columns = int(values.shape[1]), int(values.shape[2])
        item.SamplesPerPixel, item.PhotometricInterpretation = 1, "MONOCHROME2"
        item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 16, 16, 15, 1
        item.RescaleIntercept, item.RescaleSlope, item.RescaleType = 0, 1, "HU"
        item.PixelData = np.ascontiguousarray(values[k]).tobytes()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, item, enforce_file_format=True)
        files[slice_name(k)] = buffer.getvalue()
    return files
