"""From a density map to a site-specific DICOM radiograph, plus its lesion masks as PNG.

The site decides the look: contrast curve, noise, blur, bit depth, rescale and photometric
interpretation. Files are written deterministically (UIDs from the seed, dates from the latent
patient, a fixed implementation UID), so one seed gives the same bytes on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from scipy.ndimage import gaussian_filter

from mmcds.synth.anatomy import Drawing
from mmcds.synth.latent import LatentPatient
from mmcds.synth.sites import SiteProfile

SOP_CLASS = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
}
# fixed, so files do not change with the installed pydicom version
IMPLEMENTATION_UID = "2.25.156384916237402918263544210763127390121"
IMPLEMENTATION_NAME = "MMCDS_SYNTH_1"


@dataclass(frozen=True)
class ImageUIDs:
    study: str
    series: str
    sop: str
    frame_of_reference: str
    accession: str


def render(drawing: Drawing, site: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    """Stored pixel values (uint16) as the site's detector would write them."""
    v = np.clip(drawing.density, 0, 1) ** site.gamma
    v = 0.5 + (v - 0.5) * site.contrast
    v = v * rng.normal(1.0, 0.04) + rng.normal(0.0, 0.02)  # exposure varies per image
    v = gaussian_filter(v, site.blur)
    v = v + rng.normal(0.0, 1.0, v.shape).astype(np.float32) * site.noise * (0.5 + np.abs(v))
    top = (1 << site.bits_stored) - 1
    stored = np.clip(np.rint((0.05 + 0.85 * np.clip(v, 0, 1.1)) * top), 0, top).astype(np.uint16)
    if site.photometric == "MONOCHROME1":  # dense is dark in the stored values
        stored = (top - stored).astype(np.uint16)
    return stored


def _da(t: datetime) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: datetime) -> str:
    return t.strftime("%H%M%S")


def dicom_name(p: LatentPatient) -> str:
    from mmcds.synth.fhir import patient_name  # one source for the patient's synthetic name

    family, given = patient_name(p)
    return f"{family}^{given}"


def build_dataset(
    stored: np.ndarray, p: LatentPatient, uids: ImageUIDs, acquired: datetime, view: str
) -> Dataset:
    site = p.site
    sop_class = SOP_CLASS[site.modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(uids.sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_NAME
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uids.sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = _da(acquired)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = _tm(acquired)
    ds.AccessionNumber = uids.accession
    ds.Modality = site.modality
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = site.manufacturer
    ds.InstitutionName = site.institution
    ds.StudyDescription = "XR CHEST 1 VIEW"
    ds.SeriesDescription = f"CHEST {view}"
    ds.PatientName = dicom_name(p)
    ds.PatientID = p.key
    ds.PatientBirthDate = _da(p.birth_date)
    ds.PatientSex = "F" if p.sex == "female" else "M"
    ds.PatientAge = f"{p.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.StudyID = uids.accession[-8:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    rows, cols = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = site.photometric
    ds.Rows, ds.Columns = rows, cols
    spacing = f"{site.pixel_spacing_mm:.3f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = site.bits_stored
    ds.HighBit = site.bits_stored - 1
    ds.PixelRepresentation = 0
    top = (1 << site.bits_stored) - 1
    ds.RescaleSlope = f"{site.rescale_slope:g}"
    ds.RescaleIntercept = f"{site.rescale_intercept:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{site.rescale_slope * 0.48 * top + site.rescale_intercept:.1f}"
    ds.WindowWidth = f"{site.rescale_slope * 0.9 * top:.1f}"
    ds.VOILUTFunction = "LINEAR"
    ds.PresentationLUTShape = "INVERSE" if site.photometric == "MONOCHROME1" else "IDENTITY"
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def write_dicom(path: Path, ds: Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path, format="PNG")
