"""DICOM and bitmap decoding on the real reference files, plus synthetic DICOMs built with pydicom
for the cases those files do not cover (rescale, windows, VOI LUT, colour, multi-frame)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels.processing import apply_windowing
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from mmcds.encoders.dicom import ImageDecodeError, decode_bitmap, decode_dicom, window_to_unit
from mmcds.encoders.quality import check_quality, is_usable

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


def _read(dicom_dir: Path, name: str) -> bytes:
    return (dicom_dir / name).read_bytes()


def _stored(data: bytes) -> np.ndarray:
    return np.asarray(pydicom.dcmread(io.BytesIO(data)).pixel_array)


def _bands(pixels: np.ndarray) -> tuple[float, float]:
    """Mean of the central (mediastinum) band and of the two lung bands, middle third of rows."""
    h, w = pixels.shape
    rows = slice(h // 3, 2 * h // 3)
    centre = pixels[rows, w // 2 - w // 20 : w // 2 + w // 20].mean()
    lungs = (
        pixels[rows, w // 4 - w // 20 : w // 4 + w // 20].mean()
        + pixels[rows, 3 * w // 4 - w // 20 : 3 * w // 4 + w // 20].mean()
    ) / 2
    return float(centre), float(lungs)


def make_dicom(stored: np.ndarray, **attrs: object) -> bytes:
    """A native (uncompressed) single-frame DICOM Part 10 file holding `stored`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 3 if stored.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if stored.ndim == 3 else "MONOCHROME2"
    if stored.ndim == 3:
        ds.PlanarConfiguration = 0
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# --- real files -------------------------------------------------------------------------------


def test_monochrome1_cr_is_inverted_windowed_and_keeps_its_shape(dicom_dir: Path) -> None:
    data = _read(dicom_dir, "nema-cr-chest-pa-monochrome1.dcm")
    image = decode_dicom(data, reference="ImagingStudy/1")
    stored = _stored(data).astype(np.float64)
    assert stored.max() < 2**15  # 15-bit stored values in 16-bit words
    # WindowCenter 15000 / WindowWidth 30000, LINEAR (PS3.3 C.11.2.1.2), then MONOCHROME1 flip.
    expected = 1 - np.clip((stored - 14999.5) / 29999 + 0.5, 0, 1)
    assert image.pixels.shape == (1955, 1841) and image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    centre, lungs = _bands(image.pixels)
    assert centre > lungs + 0.1, "bright must mean dense: the mediastinum is denser than lungs"
    assert image.content_hash == hashlib.sha256(data).hexdigest()
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert (image.study_uid, image.series_uid, image.sop_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    assert (image.modality, image.view, image.body_part) == ("CR", "PA", "CHEST")
    assert image.site == "Philips Medical Systems Hamburg"
    assert image.acquired is not None and image.acquired.date().isoformat() == "2004-08-26"
    assert image.reference == "ImagingStudy/1"
    assert check_quality(image) == []


def test_jpeg2000_twin_decodes_to_the_same_pixels(dicom_dir: Path) -> None:
    raw = decode_dicom(_read(dicom_dir, "nema-cr-chest-pa-monochrome1.dcm"))
    j2k = decode_dicom(_read(dicom_dir, "nema-cr-chest-pa-jpeg2000.dcm"))
    np.testing.assert_allclose(j2k.pixels, raw.pixels, atol=1e-6)  # lossless
    assert j2k.content_hash != raw.content_hash


def test_nih_dx_8bit_implicit_vr_is_stretched_over_its_range(dicom_dir: Path) -> None:
    data = _read(dicom_dir, "nih-cxr-dx-no-finding.dcm")
    image = decode_dicom(data)
    stored = _stored(data).astype(np.float64)
    # No window in the file: the value range is stretched to [0, 1].
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert (image.modality, image.site, image.acquired, image.view) == ("DX", None, None, None)
    centre, lungs = _bands(image.pixels)
    assert centre > lungs
    assert check_quality(image) == []


def test_siim_jpeg_baseline_matches_an_independent_decode(dicom_dir: Path) -> None:
    data = _read(dicom_dir, "siim-cr-chest-no-pneumothorax.dcm")
    image = decode_dicom(data)
    frame = get_frame(pydicom.dcmread(io.BytesIO(data)).PixelData, 0, number_of_frames=1)
    pillow = np.asarray(Image.open(io.BytesIO(frame))).astype(np.float64)
    expected = (pillow - pillow.min()) / (pillow.max() - pillow.min())
    # Two JPEG decoders (libjpeg vs libjpeg-turbo) differ by rounding only.
    assert np.abs(image.pixels - expected).mean() < 1 / 255
    assert (image.modality, image.view, image.body_part) == ("CR", "PA", "CHEST")
    assert check_quality(image) == []


def test_siim_monochrome1_copy_is_a_relabelled_file_and_decodes_as_the_negative(
    dicom_dir: Path,
) -> None:
    # The "copy" differs from the original by one byte: "MONOCHROME2" -> "MONOCHROME1"; its
    # stored values are unchanged. Read faithfully it is therefore the exact negative, and the
    # quality gate warns that it looks inverted.
    m2_bytes = _read(dicom_dir, "siim-cr-chest-no-pneumothorax.dcm")
    m1_bytes = _read(dicom_dir, "siim-cr-chest-monochrome1-copy.dcm")
    assert sum(a != b for a, b in zip(m1_bytes, m2_bytes, strict=True)) == 1
    m2, m1 = decode_dicom(m2_bytes), decode_dicom(m1_bytes)
    np.testing.assert_allclose(m1.pixels, 1 - m2.pixels, atol=1e-6)
    issues = check_quality(m1)
    assert [(i.code, i.severity) for i in issues] == [("inverted", "warn")]


def test_monochrome1_and_its_true_monochrome2_twin_give_the_same_pixels(dicom_dir: Path) -> None:
    # A real twin stores inverted values: built here from the SIIM MONOCHROME2 image (8-bit, no
    # window) and from the NEMA MONOCHROME1 image (15-bit, window mirrored to match).
    siim = decode_dicom(_read(dicom_dir, "siim-cr-chest-no-pneumothorax.dcm"))
    stored = _stored(_read(dicom_dir, "siim-cr-chest-no-pneumothorax.dcm"))
    twin = make_dicom((255 - stored).astype(np.uint8), PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_allclose(decode_dicom(twin).pixels, siim.pixels, atol=1e-6)

    nema_bytes = _read(dicom_dir, "nema-cr-chest-pa-monochrome1.dcm")
    nema, top = decode_dicom(nema_bytes), 2**15 - 1
    twin = make_dicom(
        (top - _stored(nema_bytes)).astype(np.uint16),
        BitsStored=15,
        HighBit=14,
        WindowCenter=top - 15000 + 1,  # the LINEAR window mirrored about the 15-bit range
        WindowWidth=30000,
    )
    np.testing.assert_allclose(decode_dicom(twin).pixels, nema.pixels, atol=1e-6)


def test_ct_slice_decodes_and_is_rejected_by_the_quality_gate(dicom_dir: Path) -> None:
    image = decode_dicom(_read(dicom_dir, "ct-small.dcm"))
    assert image.modality == "CT"
    issues = check_quality(image)
    assert [(i.code, i.severity) for i in issues] == [("modality", "reject")]
    assert not is_usable(issues)


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("nema-cr-chest-pa-monochrome1.dcm", "1.2.840.10008.1.2.1"),
        ("nema-cr-chest-pa-jpeg2000.dcm", "1.2.840.10008.1.2.4.90"),
        ("siim-cr-chest-no-pneumothorax.dcm", JPEG_BASELINE),
    ],
)
def test_truncated_files_are_rejected_naming_the_transfer_syntax(
    dicom_dir: Path, name: str, syntax: str
) -> None:
    data = _read(dicom_dir, name)
    with pytest.raises(ImageDecodeError, match="truncated") as err:
        decode_dicom(data[: len(data) - 1001])
    assert err.value.transfer_syntax == syntax
    assert syntax in str(err.value) and pydicom.uid.UID(syntax).name in str(err.value)


def _with_frame(data: bytes, frame: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([frame])
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_corrupted_jpeg_stream_is_rejected_not_decoded(dicom_dir: Path) -> None:
    data = _read(dicom_dir, "siim-cr-chest-no-pneumothorax.dcm")
    frame = bytearray(get_frame(pydicom.dcmread(io.BytesIO(data)).PixelData, 0))
    dht = frame.find(b"\xff\xc4")
    frame[dht + 5 : dht + 21] = b"\xff" * 16  # impossible Huffman code counts
    with pytest.raises(ImageDecodeError, match="could not be decoded") as err:
        decode_dicom(_with_frame(data, bytes(frame)))
    assert err.value.transfer_syntax == JPEG_BASELINE
    assert "JPEG Baseline" in str(err.value)


def test_jpeg_stream_cut_inside_the_frame_is_rejected(dicom_dir: Path) -> None:
    # libjpeg would decode this without complaint into grey-filled garbage.
    data = _read(dicom_dir, "siim-cr-chest-no-pneumothorax.dcm")
    frame = get_frame(pydicom.dcmread(io.BytesIO(data)).PixelData, 0)
    with pytest.raises(ImageDecodeError, match="end-of-image") as err:
        decode_dicom(_with_frame(data, frame[: len(frame) // 2]))
    assert err.value.transfer_syntax == JPEG_BASELINE


def test_oversize_is_rejected_from_the_header_before_decoding(dicom_dir: Path) -> None:
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_dicom(_read(dicom_dir, "nema-cr-chest-pa-monochrome1.dcm"), max_pixels=1_000_000)
    # The header claims 60000 x 60000 but carries 8 bytes: decoding would fail differently.
    bomb = make_dicom(np.zeros((2, 2), np.uint16), Rows=60000, Columns=60000)
    with pytest.raises(ImageDecodeError, match="60000x60000 pixels exceeds the limit"):
        decode_dicom(bomb)


# --- synthetic DICOMs -------------------------------------------------------------------------


def test_multi_frame_is_rejected_and_a_single_declared_frame_is_not() -> None:
    frames = np.arange(3 * 64 * 64, dtype=np.uint16).reshape(3, 64, 64)
    data = make_dicom(frames[0], NumberOfFrames=3)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = frames.tobytes()
    out = io.BytesIO()
    ds.save_as(out)
    with pytest.raises(ImageDecodeError, match="multi-frame object \\(3 frames\\)"):
        decode_dicom(out.getvalue())
    single = decode_dicom(make_dicom(frames[0], NumberOfFrames=1))
    assert single.pixels.shape == (64, 64)


def test_rescale_then_window_follow_the_standard() -> None:
    # Modality LUT: value = 2 * stored - 1000; LINEAR_EXACT window c=0 w=1000 -> (v / 1000) + 0.5
    stored = np.array([[500, 375], [200, 850]], dtype=np.int16)
    data = make_dicom(
        stored,
        RescaleSlope="2",
        RescaleIntercept="-1000",
        WindowCenter=0,
        WindowWidth=1000,
        VOILUTFunction="LINEAR_EXACT",
    )
    np.testing.assert_allclose(decode_dicom(data).pixels, [[0.5, 0.25], [0.0, 1.0]], atol=1e-6)


def test_first_of_several_windows_is_used() -> None:
    stored = np.array([[0, 40], [80, 1000]], dtype=np.uint16)
    # LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5, so c=40.5 w=81 maps 0..80 onto 0..1 exactly.
    data = make_dicom(stored, WindowCenter=["40.5", "500"], WindowWidth=[81, 1001])
    np.testing.assert_allclose(decode_dicom(data).pixels, np.array([[0, 0.5], [1, 1]]), atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_matches_pydicom_reference(function: str) -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(32, 32)).astype(np.uint16)
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 12, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1500, 900, function
    reference = apply_windowing(stored, ds) / 4095.0  # pydicom maps onto the 12-bit range
    ours = window_to_unit(stored.astype(np.float64), 1500, 900, function=function)
    np.testing.assert_allclose(ours, reference, atol=1e-9)
    data = make_dicom(
        stored,
        BitsStored=12,
        HighBit=11,
        VOILUTFunction=function,
        WindowCenter=1500,
        WindowWidth=900,
    )
    np.testing.assert_allclose(decode_dicom(data).pixels, reference, atol=1e-6)


def test_voi_lut_sequence_is_applied() -> None:
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new("LUTData", "US", [255 - i for i in range(256)])  # an inverting LUT
    stored = np.array([[0, 255], [64, 128]], dtype=np.uint8)
    data = make_dicom(stored, VOILUTSequence=Sequence([item]))
    np.testing.assert_allclose(decode_dicom(data).pixels, (255 - stored) / 255, atol=1e-6)


def test_bits_stored_masks_stray_high_bits() -> None:
    stored = np.array([[0xF000, 0x0FFF], [0x1800, 0x0800]], dtype=np.uint16)
    data = make_dicom(stored, BitsStored=12, HighBit=11)
    # Bits above BitsStored are not image data: 0xF000 -> 0, 0x1800 -> 0x800.
    expected = np.array([[0, 1], [2048 / 4095, 2048 / 4095]])
    np.testing.assert_allclose(decode_dicom(data).pixels, expected, atol=1e-6)


def test_grey_encoded_as_rgb_is_accepted_and_real_colour_rejected() -> None:
    grey = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    image = decode_dicom(make_dicom(grey))
    np.testing.assert_allclose(image.pixels, grey[..., 0] / 255, atol=1e-6)
    colour = grey.copy()
    colour[..., 0] = 255 - colour[..., 0]
    with pytest.raises(ImageDecodeError, match="real colour"):
        decode_dicom(make_dicom(colour))


def test_metadata_problems_are_clear_errors() -> None:
    no_pixels = io.BytesIO()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((8, 8), np.uint8))))
    del ds.PixelData
    ds.save_as(no_pixels)
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        decode_dicom(no_pixels.getvalue())
    with pytest.raises(ImageDecodeError, match="not a DICOM Part 10 file"):
        decode_dicom(b"%PDF-1.7 not an image")
    palette = make_dicom(np.zeros((8, 8), np.uint8), PhotometricInterpretation="PALETTE COLOR")
    with pytest.raises(ImageDecodeError, match="PALETTE COLOR"):
        decode_dicom(palette)


# --- bitmaps ----------------------------------------------------------------------------------


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode=mode).save(out, format="PNG")
    return out.getvalue()


def test_png_8_and_16_bit_decode_by_bit_depth(dicom_dir: Path) -> None:
    stored = _stored(_read(dicom_dir, "nih-cxr-dx-no-finding.dcm"))
    image = decode_bitmap(_png(stored), "image/png", reference="Media/1")
    np.testing.assert_allclose(image.pixels, stored / 255, atol=1e-6)
    assert image.sop_uid == f"urn:sha256:{image.content_hash}"
    deep = (np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) * 3).astype(np.uint16)
    image16 = decode_bitmap(_png(deep), "image/png; charset=binary")
    np.testing.assert_allclose(image16.pixels, deep / 65535, atol=1e-6)


def test_jpeg_bitmap_matches_the_dicom_it_came_from(dicom_dir: Path) -> None:
    data = _read(dicom_dir, "siim-cr-chest-no-pneumothorax.dcm")
    frame = get_frame(pydicom.dcmread(io.BytesIO(data)).PixelData, 0)
    image = decode_bitmap(frame, "image/jpeg", modality="CR")
    assert np.abs(image.pixels - decode_dicom(data).pixels).mean() < 1 / 255
    assert check_quality(image) == []


def test_bad_bitmaps_are_clear_errors(dicom_dir: Path) -> None:
    png = _png(np.zeros((256, 256), np.uint8) + np.arange(256, dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="PNG data could not be decoded"):
        decode_bitmap(png[: len(png) // 2], "image/png")
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_bitmap(png, "image/png", max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="unsupported image content type"):
        decode_bitmap(png, "image/gif")
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    with pytest.raises(ImageDecodeError, match="real colour"):
        decode_bitmap(_png(rgb), "image/png")
    dicom = decode_bitmap(_read(dicom_dir, "ct-small.dcm"), "application/dicom")
    assert dicom.modality == "CT"


# --- quality gate on constructed pixels ---------------------------------------------------------


def test_quality_gate_flags_tiny_blank_saturated_and_body_part(dicom_dir: Path) -> None:
    base = decode_dicom(_read(dicom_dir, "nih-cxr-dx-no-finding.dcm"))

    def codes(pixels: np.ndarray, **meta: object) -> list[tuple[str, str]]:
        image = decode_dicom(_read(dicom_dir, "nih-cxr-dx-no-finding.dcm"))
        image.pixels = pixels.astype(np.float32)
        for key, value in meta.items():
            setattr(image, key, value)
        return [(i.code, i.severity) for i in check_quality(image)]

    assert codes(base.pixels[:40, :300]) == [("tiny", "reject")]
    assert codes(np.full((256, 256), 0.4)) == [("blank", "reject")]
    clipped = base.pixels.copy()
    clipped[:, : clipped.shape[1] * 8 // 10] = 1.0
    assert codes(clipped) == [("saturated", "reject")]
    half = base.pixels.copy()
    half[: half.shape[0] * 4 // 10] = 0.0
    assert codes(half) == [("saturated", "warn")]
    assert codes(base.pixels, body_part="KNEE") == [("body_part", "reject")]
    assert codes(base.pixels, body_part="Chest") == []
    assert codes(base.pixels, modality=None) == [("modality", "warn")]


# --- every transfer syntax, on the real test files that ship inside pydicom --------------------


def _bundled(name: str) -> bytes:
    return Path(str(get_testdata_file(name))).read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",  # Implicit VR Little Endian
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless (pylibjpeg-libjpeg)
        "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless (pylibjpeg-openjpeg)
    ],
)
def test_lossless_transfer_syntaxes_give_identical_pixels(name: str) -> None:
    native = decode_dicom(_bundled("MR_small.dcm"))
    np.testing.assert_array_equal(decode_dicom(_bundled(name)).pixels, native.pixels)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "693_J2KI.dcm"])
def test_lossy_transfer_syntaxes_decode(name: str) -> None:
    data = _bundled(name)
    pixels = decode_dicom(data).pixels
    stored = _stored(data).astype(np.float64)
    assert pixels.shape == stored.shape
    # No window in these files: the decode is the stretched stored range, nothing invented.
    if "WindowCenter" not in pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True):
        expected = (stored - stored.min()) / (stored.max() - stored.min())
        np.testing.assert_allclose(pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "reason", "syntax"),
    [
        ("MR_truncated.dcm", "truncated", "1.2.840.10008.1.2.1"),
        ("JPEG-lossy.dcm", "could not be decoded", "1.2.840.10008.1.2.4.51"),
        (
            "JPEG2000-embedded-sequence-delimiter.dcm",
            "could not be decoded",
            "1.2.840.10008.1.2.4.91",
        ),
        ("SC_rgb_jpeg_dcmtk.dcm", "real colour", JPEG_BASELINE),
        ("SC_ybr_full_422_uncompressed.dcm", "real colour", "1.2.840.10008.1.2.1"),
    ],
)
def test_broken_or_colour_bundled_files_are_rejected(name: str, reason: str, syntax: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as err:
        decode_dicom(_bundled(name))
    assert err.value.transfer_syntax == syntax
