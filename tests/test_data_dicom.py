import io

import numpy as np
import pytest
from PIL import Image

from data_fixtures import dicom_bytes
from spcl_jax.data import decode
from spcl_jax.data.dicom import decode_dicom

RAMP = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)


def test_min_max_scaling_without_voi():
  unit = decode_dicom(dicom_bytes(RAMP), "ramp.dcm")
  np.testing.assert_allclose(unit, RAMP / 4000.0, atol=1e-6)
  assert unit.dtype == np.float32


def test_monochrome1_is_inverted_on_pixel_values():
  mono2 = decode_dicom(dicom_bytes(RAMP, photometric="MONOCHROME2"), "m2.dcm")
  mono1 = decode_dicom(dicom_bytes(RAMP, photometric="MONOCHROME1"), "m1.dcm")
  np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
  assert mono1[0, 0] == pytest.approx(1.0)  # The lowest stored value is white in MONOCHROME1.
  assert mono1[1, 1] == pytest.approx(0.0)


def test_linear_window_clips_and_centres():
  image = np.array([[0, 1500], [2000, 4000]], dtype=np.uint16)
  unit = decode_dicom(dicom_bytes(image, window=(2000.5, 1001)), "w.dcm")
  # LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1].
  np.testing.assert_allclose(unit, [[0.0, 0.0], [0.5, 1.0]], atol=1e-6)


def test_rescale_is_applied_before_the_window():
  image = np.array([[0, 10], [20, 30]], dtype=np.uint16)
  # Modality values 100 + 10 x -> 100, 200, 300, 400; the window 250 +- 100 spans 150..350.
  unit = decode_dicom(dicom_bytes(image, rescale=(10, 100), window=(250.5, 201)), "r.dcm")
  np.testing.assert_allclose(unit, [[0.0, 0.25], [0.75, 1.0]], atol=1e-6)


def test_voi_lut_table_scaled_by_its_output_bits():
  image = np.array([[0, 1], [2, 3]], dtype=np.uint16)
  table = np.array([0, 100, 200, 255])
  unit = decode_dicom(dicom_bytes(image, bits_stored=8, voi_lut=(table, 0, 8)), "lut.dcm")
  np.testing.assert_allclose(unit, table.reshape(2, 2) / 255.0, atol=1e-6)


def test_jpeg2000_compressed_decodes_like_uncompressed():
  from pydicom.uid import JPEG2000Lossless, RLELossless
  image = (np.arange(32 * 32).reshape(32, 32) * 3 % 4096).astype(np.uint16)
  plain = decode_dicom(dicom_bytes(image), "plain.dcm")
  for syntax in (JPEG2000Lossless, RLELossless):
    np.testing.assert_array_equal(
        decode_dicom(dicom_bytes(image, transfer_syntax=syntax), "c.dcm"), plain)


def test_errors_name_the_file():
  with pytest.raises(ValueError, match="broken.dcm"):
    decode_dicom(b"not a dicom file at all" * 10, "broken.dcm")
  with pytest.raises(ValueError, match="flat.dcm.*single pixel value|flat.dcm.*every pixel"):
    decode_dicom(dicom_bytes(np.full((4, 4), 7, np.uint16)), "flat.dcm")


def test_16_bit_png_is_divided_by_its_maximum_code():
  image = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "PNG")
  decoded = decode.decode_image({"name": "x.png", "encoded": buffer.getvalue()}, 2)
  np.testing.assert_array_equal(decoded, [[0, 255], [128, 1]])
