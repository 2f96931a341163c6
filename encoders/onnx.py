"""The fast CPU path: the embedding graph exported to ONNX and run by ONNX Runtime.

The exported graph is the same ``torch.nn.Module`` the eager path runs (checkpoint body + pooling),
so the two agree to float rounding; ``tests/test_image_encoders.py`` holds them to 1e-4. The
``.onnx`` file is cached next to the checkpoint under a name derived from the model id, the
pooling and the input size, so a changed checkpoint never reuses a stale graph.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ONNX_OPSET = 17


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


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``module(pixel_values) -> embedding`` with a dynamic batch axis; written atomically
    so a crash mid-export never leaves a truncated file for the next process to load."""
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript; its trace warnings concern the fixed image size, which preprocessing
            # guarantees.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example.float(),),
                tmp_name,
                input_names=["pixel_values"],
                output_names=["embedding"],
                dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
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
    """Runs an exported embedding graph: (B, 3, H, W) float32 -> (B, dim) float32."""

    def __init__(self, path: Path, *, threads: int | None = None, spin: bool = False) -> None:
        self.path = path
        self.session = ort.InferenceSession(
            str(path),
            sess_options=session_options(threads, spin=spin),
            providers=["CPUExecutionProvider"],
        )
        self._input = self.session.get_inputs()[0].name

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(pixel_values, dtype=np.float32)
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
