"""Write a phantom volume as a DICOM MR series (one file per slice), for tests and demos of DICOM I/O.

Real tags of an MR Image Storage object (patient, study, series, frame of reference, geometry),
written with pydicom; intensities are stored as unsigned 16-bit integers with a rescale slope.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_path
from dafne_logic.core.errors import InputError


def write_dicom_series(image: sitk.Image, folder: str | Path, *, series_description: str = "phantom",
                       series_number: int = 1, study_uid: str | None = None) -> list[Path]:
    """Write ``image`` (3D scalar, non-negative) as ``folder/slice_0000.dcm``...; returns the files in k order.

    One study and frame of reference per call unless ``study_uid`` ties several series together.
    Geometry (origin, spacing, direction) is kept exactly: ImagePositionPatient of slice k is the
    physical point of voxel (0, 0, k), ImageOrientationPatient the first two direction columns.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    # A standard DICOM file (preamble, meta header): pydicom 3 names it enforce_file_format, pydicom 2
    # (what Slicer 5.10 ships) write_like_original=False.
    pydicom_3 = int(pydicom.__version__.split(".")[0]) >= 3
    file_format = {"enforce_file_format": True} if pydicom_3 else {"write_like_original": False}

    voxels = sitk.GetArrayFromImage(image).astype(np.float64)  # (k, j, i)
    if voxels.min() < 0:
        raise InputError("write_dicom_series stores unsigned intensities; the image has negative values.")
    slope = max(float(voxels.max()), 1e-12) / 65000.0
    stored = np.round(voxels / slope).astype(np.uint16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    study = study_uid or str(generate_uid())
    series_uid, frame_uid = generate_uid(), generate_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(voxels.shape[0]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Leg", "PHANTOM", "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study, "1", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, series_description
        ds.Modality, ds.Manufacturer = "MR", "DafneSlicer phantom"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0.0, float(f"{slope:.10g}")
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "NONE", "", "2D"
        ds.PixelData = stored[k].tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, **file_format)
        files.append(path)
    return files
