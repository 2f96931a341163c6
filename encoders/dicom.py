"""Decode DICOM objects (and PNG/JPEG bitmaps) into ``ImageInput``: faithful, normalised pixels.

The order follows the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2): stored values (masked to
BitsStored, sign-extended) -> Modality LUT (RescaleSlope/Intercept or a LUT) -> VOI LUT or window
-> MONOCHROME1 inversion. The result is float32 (H, W) in [0, 1] where bright means dense.

Anything that cannot be decoded faithfully raises ``ImageDecodeError`` naming the reason and the
transfer syntax. Damage is caught where it can be detected (truncation, broken codestream framing
or headers, decoder errors, size mismatches); bit errors inside JPEG entropy-coded data carry no
checksum, so no decoder can tell them from image content.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from datetime import datetime

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.uid import UID

from mmcds.encoders.dicom_tags import acquired_at, first_number, int_tag, text_tag
from mmcds.errors import InputRejected
from mmcds.records import ImageInput, content_hash

DEFAULT_MAX_PIXELS = 40_000_000

# Encapsulated syntaxes whose every frame is one codestream framed by SOI/SOC ... EOI/EOC (FFD9).
# pylibjpeg decodes a truncated baseline JPEG without complaint (grey-filled garbage), so the
# framing is checked before any decoder sees the data.
_JPEG_FAMILY = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
}
_J2K_FAMILY = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"
# Two channels farther apart than this (fraction of full scale, 99th percentile) mean real colour.
_GREY_TOLERANCE = 0.02


class ImageDecodeError(InputRejected):
    """An image that cannot be decoded faithfully; the message says why and what to do."""

    def __init__(
        self,
        reason: str,
        *,
        transfer_syntax: str | None = None,
        reference: str | None = None,
    ) -> None:
        self.reason = reason
        self.transfer_syntax = transfer_syntax
        self.reference = reference
        where = f"{reference}: " if reference else ""
        syntax = (
            f" [transfer syntax {_describe_syntax(transfer_syntax)}]" if transfer_syntax else ""
        )
        super().__init__(f"{where}{reason}{syntax}")


_Fail = Callable[[str], "ImageDecodeError"]


def _describe_syntax(uid: str | None) -> str:
    if not uid:
        return "unknown"
    name = UID(uid).name
    return f"{uid} ({name})" if name and name != uid else f"{uid} (unrecognised)"


def decode_dicom(
    data: bytes, *, reference: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageInput:
    """Decode one single-frame DICOM Part 10 object into normalised grey pixels."""
    ds = _read(data, reference)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) or None

    def fail(reason: str) -> ImageDecodeError:
        return ImageDecodeError(reason, transfer_syntax=ts, reference=reference)

    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise fail("float pixel data (parametric map) is not a radiograph")
        if _PIXEL_DATA_TAG_LE in data or _PIXEL_DATA_TAG_BE in data:
            raise fail("pixel data element is present but unreadable: the file is truncated")
        raise fail("no pixel data (a structured report or presentation state?)")
    frames = int_tag(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise fail(
            f"multi-frame object ({frames} frames) is not a single radiograph; "
            "send one projection per instance"
        )
    rows, cols = int_tag(ds.get("Rows"), 0), int_tag(ds.get("Columns"), 0)
    if rows <= 0 or cols <= 0:
        raise fail(f"invalid image size Rows={rows} Columns={cols}")
    if rows * cols > max_pixels:
        raise fail(f"image of {rows}x{cols} pixels exceeds the limit of {max_pixels} pixels")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in {"MONOCHROME1", "MONOCHROME2"} | _COLOUR:
        raise fail(f"photometric interpretation {photometric or 'missing'} is not supported")
    if ts is None:
        raise fail("file meta has no TransferSyntaxUID; cannot tell how pixels are encoded")
    _check_decoder(ts, fail)
    if UID(ts).is_encapsulated:
        _check_codestream(ds, ts, fail)
    else:
        _check_native_length(ds, rows * cols, fail)
    try:
        stored = ds.pixel_array  # YBR is converted to RGB here
    except Exception as exc:  # every decoder plugin raises its own type
        raise fail(f"pixel data could not be decoded: {_one_line(exc)}") from exc
    expected = (rows, cols) if photometric.startswith("MONO") else (rows, cols, 3)
    if stored.shape != expected:
        raise fail(f"decoded shape {stored.shape} does not match the header {expected}")

    if photometric.startswith("MONO"):
        pixels = _grey_pipeline(stored, ds, fail)
        if photometric == "MONOCHROME1":
            # Presentation LUT Shape is ignored on purpose: DX/CR set INVERSE *because* the
            # object is MONOCHROME1, so honouring both would invert twice.
            pixels = 1.0 - pixels
    else:
        # Colour-encoded radiographs (secondary captures, some JPEG exports) are converted to
        # grey only when the channels agree, i.e. the colour encoding carries a grey image;
        # real colour (burnt-in coloured annotations, overlays, photos) is rejected because no
        # grey conversion of it is faithful to what was acquired. Window/VOI does not apply to
        # colour (PS3.3 C.11.2), so the stored bit depth is the scale.
        full = float(2 ** int_tag(ds.get("BitsStored"), 8) - 1)
        pixels = _colour_to_grey(stored.astype(np.float64), full, fail) / full

    return ImageInput(
        pixels=np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=text_tag(ds, "Modality"),
        view=text_tag(ds, "ViewPosition"),
        site=text_tag(ds, "InstitutionName"),
        acquired=acquired_at(ds),
        reference=reference,
        content_hash=content_hash(data),
        body_part=text_tag(ds, "BodyPartExamined"),
        bits_stored=int_tag(ds.get("BitsStored"), 0) or None,
    )


def _read(data: bytes, reference: str | None) -> Dataset:
    try:
        # catch_warnings is process-global; at worst a concurrent thread's warning is captured
        # here, and only an end-of-file warning changes the outcome.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise ImageDecodeError(
            "not a DICOM Part 10 file (no 'DICM' preamble); send application/dicom",
            reference=reference,
        ) from exc
    except Exception as exc:  # pydicom raises EOFError, struct.error, ValueError...
        raise ImageDecodeError(
            f"DICOM file could not be parsed (truncated or corrupt): {_one_line(exc)}",
            reference=reference,
        ) from exc
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) or None
    for w in caught:
        # pydicom only warns when the file ends inside an undefined-length element and then
        # drops that element, which would otherwise look like "no pixel data".
        if "end of file" in str(w.message).lower():
            raise ImageDecodeError(
                f"DICOM file is truncated: {_one_line(w.message)}",
                transfer_syntax=ts,
                reference=reference,
            )
    return ds


def _check_decoder(ts: str, fail: _Fail) -> None:
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError as exc:
        raise fail("no pixel-data decoder exists for this transfer syntax") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise fail(f"no decoder installed for this transfer syntax; install {missing}")


def _check_codestream(ds: Dataset, ts: str, fail: _Fail) -> None:
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as exc:
        raise fail(f"encapsulated pixel data is malformed: {_one_line(exc)}") from exc
    # Frames are padded to even length, with 0x00 or (some encoders) 0xFF after the EOI.
    body = frame.rstrip(b"\x00\xff")
    if ts in _JPEG_FAMILY and not body.startswith(b"\xff\xd8"):
        raise fail("compressed frame does not start with a JPEG SOI marker")
    # A JP2 file wrapper instead of a bare codestream occurs in the wild and is still decodable.
    if ts in _J2K_FAMILY and not (body.startswith(b"\xff\x4f") or body[4:8] == b"jP  "):
        raise fail("compressed frame does not start with a JPEG 2000 SOC marker")
    if (ts in _JPEG_FAMILY or ts in _J2K_FAMILY) and not body.endswith(b"\xff\xd9"):
        raise fail("compressed frame has no end-of-image marker: the stream is truncated")


def _check_native_length(ds: Dataset, pixels: int, fail: _Fail) -> None:
    # pydicom reads an element cut short by the end of the file without complaint.
    samples = int_tag(ds.get("SamplesPerPixel"), 1)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # chroma shared by pixel pairs: Y1 Y2 Cb Cr
    bits = int_tag(ds.get("BitsAllocated"), 0) * samples
    expected = (pixels * bits + 7) // 8
    got = len(ds.PixelData)
    if got < expected:
        raise fail(f"pixel data holds {got} of {expected} bytes: the file is truncated")


def _grey_pipeline(stored: np.ndarray, ds: Dataset, fail: _Fail) -> np.ndarray:
    """Modality LUT then VOI, giving values in [0, 1] before any MONOCHROME1 inversion."""
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        try:
            # A LUT is indexed by integers; rescaled values are rounded to their entry.
            out = apply_voi(np.rint(values).astype(np.int64), ds, index=0)
            bits = int(item.LUTDescriptor[2])
        except Exception as exc:
            raise fail(f"VOI LUT could not be applied: {_one_line(exc)}") from exc
        return np.asarray(out, dtype=np.float64) / float(2**bits - 1)
    window = _first_window(ds)
    if window is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return window_to_unit(values, *window, function=function)
    # No display hint at all: stretch the actual value range, the convention of every viewer.
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    """The first (center, width) pair; None when absent or unusable (then min/max is used)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = (first_number(ds[k].value) for k in ("WindowCenter", "WindowWidth"))
    except (TypeError, ValueError, IndexError):
        return None
    # A zero/negative width is malformed metadata; viewers fall back to the data range too.
    return (center, width) if width > 0 else None


def window_to_unit(
    values: np.ndarray, center: float, width: float, *, function: str = "LINEAR"
) -> np.ndarray:
    """PS3.3 C.11.2.1.2/C.11.2.1.3 windowing, with the output range mapped to [0, 1]."""
    if function == "SIGMOID":
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    # LINEAR (also the fallback for unknown function names, as the standard's default).
    if function != "LINEAR_EXACT" and width <= 1:  # LINEAR needs width >= 1: 1 is a threshold
        return (values > center - 0.5).astype(np.float64)
    if function == "LINEAR_EXACT":
        offset, scale = center, width
    else:
        offset, scale = center - 0.5, width - 1
    # In place on one new array: a full-size radiograph is 7.5 M float64 pixels, and each
    # temporary of the plain expression cost ~0.1 s on the analysis's path.
    out = np.subtract(values, offset, dtype=np.float64)
    out /= scale
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _colour_to_grey(rgb: np.ndarray, full_scale: float, fail: _Fail) -> np.ndarray:
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    if float(np.percentile(spread, 99)) > _GREY_TOLERANCE * full_scale:
        raise fail("image is in real colour, not a grey radiograph encoded as colour")
    # ITU-R BT.601 luma: for agreeing channels this is the grey value itself.
    return np.asarray(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)


def _one_line(exc: object) -> str:
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


_BITMAP_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}


def decode_bitmap(
    data: bytes,
    content_type: str,
    *,
    reference: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    study_uid: str = "",
    series_uid: str = "",
    sop_uid: str | None = None,
    modality: str | None = None,
    view: str | None = None,
    site: str | None = None,
    acquired: datetime | None = None,
    body_part: str | None = None,
) -> ImageInput:
    """Decode a PNG/JPEG (FHIR Media/Binary) into grey pixels in [0, 1].

    A bitmap is already rendered for display (windowed, inverted if need be), so its values are
    kept as they are, scaled by the bit depth; no min/max stretch. ``application/dicom`` is
    passed to ``decode_dicom``. Without a ``sop_uid`` the image is named by its content hash.
    """
    mime = content_type.split(";")[0].strip().lower()
    if mime in {"application/dicom", "application/dicom+octet-stream"}:
        return decode_dicom(data, reference=reference, max_pixels=max_pixels)
    fmt = _BITMAP_FORMATS.get(mime)
    if fmt is None:
        raise ImageDecodeError(
            f"unsupported image content type {content_type!r}; send PNG, JPEG or DICOM",
            reference=reference,
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{fmt} image of {height}x{width} pixels exceeds the limit of {max_pixels}",
                    reference=reference,
                )
            img.load()  # raises on truncated/corrupt data (LOAD_TRUNCATED_IMAGES stays off)
            oriented = ImageOps.exif_transpose(img) if fmt == "JPEG" else img
            pixels = _bitmap_to_unit(oriented, fmt, reference)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(
            f"{fmt} data could not be decoded: {_one_line(exc)}", reference=reference
        ) from exc
    digest = content_hash(data)
    return ImageInput(
        pixels=np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32),
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid or f"urn:sha256:{digest}",
        modality=modality,
        view=view,
        site=site,
        acquired=acquired,
        reference=reference,
        content_hash=digest,
        body_part=body_part,
    )


def _bitmap_to_unit(img: Image.Image, fmt: str, reference: str | None) -> np.ndarray:
    def fail(reason: str) -> ImageDecodeError:
        return ImageDecodeError(f"{fmt} image: {reason}", reference=reference)

    mode = img.mode
    if mode in {"I;16", "I;16L", "I;16B", "I"}:
        arr = np.asarray(img).astype(np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise fail(f"{mode} values outside 16 bits")
        return arr / 65535.0  # PNG greyscale is at most 16-bit
    if mode == "F":
        raise fail("floating-point bitmaps are not radiographs")
    if mode in {"1", "L"}:
        return np.asarray(img.convert("L")).astype(np.float64) / 255.0
    rgba = np.asarray(img.convert("RGBA")).astype(np.float64)
    if float(rgba[..., 3].min()) < 255:
        raise fail("has transparent pixels; send an opaque image")
    return _colour_to_grey(rgba[..., :3], 255.0, fail) / 255.0
