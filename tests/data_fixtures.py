"""Writers of tiny raw downloads in each dataset's official format (no real metadata).

Every image is synthetic: a smooth gradient plus a per-image offset, so that two images never
decode to the same pixels and a mix-up of records would be caught.
"""

from __future__ import annotations

import gzip
import io
import pathlib

import numpy as np
from PIL import Image


def gradient(height: int, width: int, seed: int, dtype=np.uint8) -> np.ndarray:
  top = np.iinfo(dtype).max
  rows = np.linspace(0.0, 1.0, height)[:, None]
  cols = np.linspace(0.0, 1.0, width)[None, :]
  image = (0.6 * rows + 0.3 * cols + 0.1 * ((seed * 37) % 11) / 10.0) % 1.0
  return np.round(image * top).astype(dtype)


def write_png(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, "PNG")


def write_jpeg(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode="L").save(path, "JPEG", quality=95)


def dicom_bytes(array: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None,
                voi_lut: tuple[np.ndarray, int, int] | None = None,
                transfer_syntax=None) -> bytes:
  """A CR DICOM of uint16 pixels; window=(center, width), rescale=(slope, intercept),
  voi_lut=(table, first mapped value, bits per entry), transfer_syntax: compress with it."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.sequence import Sequence
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID, ds.ViewPosition = "CR", "anon", "PA"
  ds.Rows, ds.Columns = array.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, \
      bits_stored - 1, 0
  ds.PixelData = np.ascontiguousarray(array, dtype=np.uint16).tobytes()
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  if rescale is not None:
    ds.RescaleSlope, ds.RescaleIntercept = rescale
  if voi_lut is not None:
    table, first, bits = voi_lut
    item = Dataset()
    item.LUTDescriptor = [len(table), first, bits]
    item.add_new(0x00283006, "US", [int(v) for v in table])  # LUTData, one value per entry
    ds.VOILUTSequence = Sequence([item])
  if transfer_syntax is not None:
    ds.compress(transfer_syntax)
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def write_csv(path: pathlib.Path, header: str, rows: list[str], gz: bool = False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  text = "\n".join([header, *rows]) + "\n"
  if gz:
    path.write_bytes(gzip.compress(text.encode()))
  else:
    path.write_text(text)


MIMIC_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,"
                "Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
                "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning")


def mimic_row(dicom_id: str, subject: int, study: int, view: str) -> str:
  return (f"{dicom_id},{subject},{study},CHEST (PA AND LAT),{view},64,72,21800506,213014.531,"
          f"CHEST (PA AND LAT),postero-anterior,Erect")


def write_mimic(root: pathlib.Path, rows: list[tuple[str, int, int, str]],
                files: bool = True) -> None:
  """rows: (dicom_id, subject_id, study_id, ViewPosition); one 64x72 JPEG per row."""
  write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_HEADER,
            [mimic_row(*row) for row in rows], gz=True)
  if files:
    for seed, (dicom_id, subject, study, _) in enumerate(rows):
      path = root / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
      write_jpeg(path, gradient(64, 72, seed))


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def nih_row(name: str, findings: str, patient: int, view: str = "PA") -> str:
  return f"{name},{findings},0,{patient},58,M,{view},2682,2749,0.143,0.143,"


CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
                   "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,"
                   "Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                   "Support Devices")


def chexpert_row(prefix: str, split: str, patient: int, study: int, view: int, frontal: bool,
                 labels: list[str]) -> str:
  """labels: the 14 observation cells in header order ("1.0", "0.0", "-1.0" or "")."""
  kind = "frontal" if frontal else "lateral"
  path = f"{prefix}/{split}/patient{patient:05d}/study{study}/view{view}_{kind}.jpg"
  return ",".join([path, "Female", "68", "Frontal" if frontal else "Lateral",
                   "AP" if frontal else "", *labels])
