"""The fast CPU path: the embedding graph exported to ONNX and run by ONNX Runtime.

The exported graph is the same ``torch.nn.Module`` the eager path runs (checkpoint body + pooling),
so the two agree to float rounding; ``tests/test_image_encoders.py`` holds them to 1e-4. The
``.onnx`` file is cached next to the checkpoint under a name derived from the model id, the
pooling and the input size, so a changed checkpoint never reuses a stale graph.

``quantize_int8`` derives an int8 graph from that fp32 one, written beside it. Only reduced
precision can go faster here: at batch 8 the fp32 graph already runs near this CPU's fp32 matmul
rate. Two recipes, chosen per architecture from measurements on ResNet-50 and ViT-B/16 (AVX2
without VNNI, 1 ORT thread): ``"static"`` (activation ranges calibrated on real inputs,
QLinearConv/QLinearAdd end to end) for CNNs, where dynamic quantisation (ConvInteger) ran 4x
*slower* than fp32; ``"dynamic"`` (weight MatMuls only, activation ranges taken per call) for
ViTs, where it was both faster and closer to fp32 than static QLinearMatMul, which requantises
around every LayerNorm, GELU and softmax. A ``<fp32 stem>.int8.json`` manifest names the current
int8 file, so a service can load it without the calibration images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import onnxruntime as ort
import torch

from mmcds.encoders.checkpoint import CheckpointError

if TYPE_CHECKING:
    from mmcds.encoders.image import Pooling

ONNX_OPSET = 17
INPUT_NAME = "pixel_values"
Int8Recipe = Literal["static", "dynamic"]
# Per image-encoder kind (why: the module docstring). Measured on random-init ResNet-50 and
# ViT-B/16, 1 ORT thread, against their fp32 graphs: CNN static 2.2x (batch 1) and 1.7x (batch 8),
# cosine >= 0.9998; ViT dynamic 1.85-2.0x, cosine >= 0.999 (static: 1.65-1.85x, cosine 0.997).
INT8_RECIPES: dict[str, Int8Recipe] = {"cnn": "static", "vit": "dynamic"}


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def onnx_cache_path(folder: Path, model_id: str, variant: str) -> Path:
    """``<folder>/onnx/<model_id>.<variant>.onnx``, or a user cache when the folder is read-only
    (e.g. a checkpoint mounted into a container)."""
    stem = re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{model_id}.{variant}")
    preferred = folder / "onnx"
    try:
        preferred.mkdir(exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred / f"{stem}.onnx"
    except OSError:
        pass
    fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmcds" / "onnx"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback / f"{stem}.onnx"


@contextmanager
def _atomic(path: Path, suffix: str) -> Iterator[Path]:
    """A temporary file beside ``path``, moved onto it only if the block completes: a crash
    midway never leaves a truncated file for the next process to load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=f"{suffix}.tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def fp32_graph_path(folder: Path, model_id: str, pooling: Pooling, processor: Any) -> Path:
    """The image encoder's fp32 graph: named by model id, pooling and the input size the
    checkpoint's processor produces (a grey image through it: only its shape matters)."""
    grey = np.zeros((32, 32, 3), np.uint8)
    out = processor(images=[grey], return_tensors="pt", input_data_format="channels_last")
    size = "x".join(str(s) for s in out["pixel_values"].shape[-2:])
    return onnx_cache_path(folder, model_id, f"{pooling}.{size}")


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``module(pixel_values) -> embedding`` with a dynamic batch axis, atomically."""
    module = module.eval()
    with _atomic(path, ".onnx") as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; its trace warnings concern the fixed image size, which preprocessing
        # guarantees.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example.float(),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=["embedding"],
            dynamic_axes={INPUT_NAME: {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path


def session_options(threads: int | None = None, *, spin: bool = False) -> ort.SessionOptions:
    """ORT options for a small CPU box: all graph optimisations (conv+BN+ReLU fusion, layout
    transforms, attention fusion), one intra-op pool sized to the cores we may use, no inter-op
    parallelism (a single embedding graph is a chain). Idle worker threads do not busy-wait by
    default: measured on the shared 2-core box, spinning threads stole the cores from the next
    PyTorch call in the same process (text encoder, Grad-CAM) and from other processes, and
    ResNet-50 under ORT was itself faster without spinning there. ``spin=True`` may win a few
    percent on a dedicated machine."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


class OrtEmbedder:
    """Runs an exported embedding graph: (B, 3, H, W) float32 -> (B, dim) float32.

    ``per_image`` runs the batch one image at a time, for graphs whose numbers would otherwise
    depend on the batch: dynamic quantisation takes one activation range per tensor, so batch
    neighbours moved a tiny ViT's embedding by ~0.02, and the embedding cache keys on the image
    alone. It costs nothing measurable there: dynamic int8 ViT-B/16 ran 4.0 images/s at batch 1
    and 3.5-3.9 at batch 8 (1 ORT thread)."""

    def __init__(
        self, path: Path, *, threads: int | None = None, spin: bool = False, per_image: bool = False
    ) -> None:
        self.path = path
        self.per_image = per_image
        self.session = ort.InferenceSession(
            str(path),
            sess_options=session_options(threads, spin=spin),
            providers=["CPUExecutionProvider"],
        )
        self._input = self.session.get_inputs()[0].name

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.per_image and len(batch) > 1:
            return np.concatenate([self(batch[i : i + 1]) for i in range(len(batch))])
        (embedding,) = self.session.run(None, {self._input: batch})
        return np.asarray(embedding, dtype=np.float32)


def load_or_export(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    threads: int | None = None,
    spin: bool = False,
) -> OrtEmbedder:
    """The cached graph at ``path``, exporting it first if absent or unreadable."""
    if path.exists():
        try:
            return OrtEmbedder(path, threads=threads, spin=spin)
        except Exception:  # ORT raises its own exception types; a corrupt cache is replaced
            path.unlink(missing_ok=True)
    export_onnx(module, example, path)
    return OrtEmbedder(path, threads=threads, spin=spin)


# -- int8 ----------------------------------------------------------------------------------


def int8_digest(recipe: Int8Recipe, calibration: np.ndarray) -> str:
    """12 hex naming an int8 graph: the recipe, and for ``"static"`` the calibration inputs'
    exact bytes (a different calibration set never reuses a graph calibrated on another).
    ``"dynamic"`` reads no calibration, so its graph depends on the recipe alone."""
    digest = hashlib.sha256(recipe.encode())
    if recipe == "static":
        arr = np.ascontiguousarray(calibration, dtype=np.float32)
        digest.update(repr(arr.shape).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()[:12]


def int8_manifest_path(fp32: Path) -> Path:
    return fp32.with_name(f"{fp32.stem}.int8.json")


def current_int8(fp32: Path) -> tuple[Path, Int8Recipe] | None:
    """The int8 graph the manifest beside ``fp32`` names and its recipe, or None when there is
    none (no manifest, an unreadable one, or its file gone)."""
    try:
        manifest = json.loads(int8_manifest_path(fp32).read_text())
        path = fp32.with_name(str(manifest["file"]))
        recipe = manifest["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recipe not in get_args(Int8Recipe) or not path.is_file() or path.parent != fp32.parent:
        return None
    return path, recipe


def load_int8(fp32: Path, *, threads: int | None = None) -> OrtEmbedder:
    """The current int8 graph of ``fp32``; a clear error saying how to build one if none."""
    current = current_int8(fp32)
    if current is None:
        raise CheckpointError(
            f"no int8 graph recorded beside {fp32} (no {int8_manifest_path(fp32).name}); build "
            "it once with ImageEncoder.from_pretrained(<checkpoint>, backend='onnx')"
            ".quantize(<~16 representative images>), or use backend='onnx'"
        )
    path, recipe = current
    return OrtEmbedder(path, threads=threads, per_image=recipe == "dynamic")


class _Calibration:
    """``CalibrationDataReader`` protocol: one preprocessed image per call, in order."""

    def __init__(self, calibration: np.ndarray) -> None:
        self._batches = iter(calibration[i : i + 1] for i in range(len(calibration)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def _quantize(fp32: Path, out: Path, recipe: Int8Recipe, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # Shape inference and ORT's basic graph optimisations first, as the quantiser's docs
        # ask: every tensor it quantises needs a known type and shape.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        if recipe == "dynamic":
            # MatMuls with constant weights only; the attention products stay fp32.
            quantize_dynamic(
                str(pre),
                str(out),
                per_channel=True,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
            )
            return
        # u8 activations x s8 per-channel weights: MLAS's fast AVX2 path; MinMax ranges.
        quantize_static(
            str(pre),
            str(out),
            _Calibration(calibration),  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibration_providers=["CPUExecutionProvider"],
        )


def quantize_int8(fp32: Path, calibration: np.ndarray | None, recipe: Int8Recipe) -> Path:
    """The int8 graph for ``fp32`` under ``recipe`` and ``calibration`` ((N, 3, H, W) float32,
    preprocessed; needed for ``"static"`` only), built unless a readable one exists, and recorded
    as current in the manifest. Deterministic: the same inputs give the same graph."""
    if calibration is None or recipe == "dynamic":
        calibration = np.zeros((0, 3, 1, 1), np.float32)
    if recipe == "static" and len(calibration) == 0:
        raise ValueError("static int8 quantisation needs calibration images (~16, representative)")
    digest = int8_digest(recipe, calibration)
    path = fp32.with_name(f"{fp32.stem}.int8.{digest}.onnx")
    if not _readable(path):
        with _atomic(path, ".onnx") as tmp:
            _quantize(fp32, tmp, recipe, calibration)
    manifest: dict[str, Any] = {
        "file": path.name,
        "fp32": fp32.name,
        "recipe": recipe,
        "digest": digest,
        "calibration_images": len(calibration) if recipe == "static" else 0,
        "onnxruntime": ort.__version__,
    }
    with _atomic(int8_manifest_path(fp32), ".json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _readable(path: Path) -> bool:
    """Whether ``path`` holds a graph ORT can load: a truncated file from a crash elsewhere is
    rebuilt, not trusted. Loaded unoptimised, which is all this check needs."""
    if not path.exists():
        return False
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception:  # ORT raises its own exception types
        return False
    return True
