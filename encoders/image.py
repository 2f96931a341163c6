"""Image encoders: a CNN and a ViT backbone through transformers Auto classes.

Pixels arrive as the record stage leaves them: float32 (H, W) in [0, 1], bright = dense, any
aspect ratio. Preprocessing is the checkpoint's own image processor; the embedding is the
backbone's pooled output (CNN: ``pooler_output``, the global average of the last feature map;
ViT: the CLS token of the final, layer-normed hidden state -- the token ViT's classification
head and DINO-style pretraining train to summarise the image; ``pooling="mean"`` averages the
patch tokens instead, better for MAE-style checkpoints whose CLS token was never trained).

``feature_maps`` keeps what Grad-CAM (CNN: last conv map) and attention rollout (ViT: patch
tokens + per-layer attentions) need, with the autograd graph when asked.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from transformers import AutoImageProcessor, PreTrainedModel

from mmcds.encoders.checkpoint import (
    CheckpointError,
    load_strict,
    model_id_for,
    resolve_checkpoint,
    select_device,
    torch_dtype,
    weight_files,
)
from mmcds.records import ImageInput, ModalityEncoding, content_hash

if TYPE_CHECKING:
    from mmcds.encoders.onnx import OrtEmbedder

__all__ = [
    "CheckpointError",
    "FeatureMaps",
    "ImageEncoder",
    "auto_backend",
    "select_device",
]

ImageKind = Literal["cnn", "vit"]
Pooling = Literal["cls", "mean"]
Backend = Literal["torch", "onnx", "onnx-int8"]
# "auto": PyTorch on CUDA; on a CPU the int8 graph when one was built for these weights, else
# fp32 ONNX (the fast CPU path, benchmarks/encoders.py).
BackendChoice = Literal["auto", "torch", "onnx", "onnx-int8"]

# Backbones whose outputs this module knows how to pool and explain. CNNs: 4-D last_hidden_state
# and a pooler_output; ViTs: a CLS token first in last_hidden_state.
CNN_TYPES = frozenset({"resnet", "convnext", "convnextv2", "regnet", "bit"})
VIT_TYPES = frozenset({"vit", "dinov2"})  # DeiT adds a distillation token: not handled yet


@dataclass
class FeatureMaps:
    """What an explainer needs from one forward pass (tensors on the encoder's device)."""

    kind: ImageKind
    pixel_values: torch.Tensor  # (B, 3, H, W) as fed to the model; requires_grad when grad=True
    embedding: torch.Tensor  # (B, dim), computed from the maps below (graph kept when grad=True)
    feature_map: torch.Tensor | None = None  # CNN: last conv feature map (B, C, h, w)
    stage_maps: tuple[torch.Tensor, ...] | None = None  # CNN: every stage's output, last = above
    head_logits: torch.Tensor | None = None  # CNN with a classification head: (B, labels)
    tokens: torch.Tensor | None = None  # ViT: final hidden states (B, 1 + h*w, D), CLS first
    attentions: tuple[torch.Tensor, ...] | None = None  # ViT: per layer (B, heads, N, N)
    grid: tuple[int, int] | None = None  # ViT: patch grid (h, w)


class _Embedder(torch.nn.Module):
    """Backbone + pooling as one module: the eager path runs it and the ONNX export traces it,
    so both paths compute exactly the same function."""

    def __init__(self, backbone: PreTrainedModel, kind: ImageKind, pooling: Pooling) -> None:
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        self.pooling = pooling

    def pool(self, out: Any) -> torch.Tensor:
        if self.kind == "cnn":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone(pixel_values=pixel_values))


class ImageEncoder:
    """Embeds images with one checkpoint; see the module docstring for the choices made."""

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        processor: Any,
        model_id: str,
        kind: ImageKind,
        folder: Path,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        pooling: Pooling,
        backend: Backend,
        onnx_threads: int | None = None,
        head: torch.nn.Module | None = None,
        labels: Sequence[str] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.kind: ImageKind = kind
        self.folder = folder
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.pooling: Pooling = pooling
        self.backend: Backend = backend
        self.embedder = _Embedder(model, kind, pooling).eval()
        # A fine-tuned classifier's own head (CNN only): what Grad-CAM explains when it names
        # the finding asked about (encoders/explain_image.py); never used for embeddings.
        self.head = head.eval() if head is not None else None
        self.labels = list(labels) if head is not None else []
        self._attn_lock = threading.Lock()
        # channels_last was measured (benchmarks/encoders.py, ResNet-50, torch 2.13 CPU): ~10%
        # slower at batch 1 and 4x slower at batch 8 than NCHW, so the default layout stays.
        self.onnx_threads = onnx_threads
        self._ort: OrtEmbedder | None = None
        self._ort_fp32: OrtEmbedder | None = None  # for embed_float32, made on first use
        if backend == "onnx":
            self._ort = self._fp32_graph()
        elif backend == "onnx-int8":
            from mmcds.encoders.onnx import load_int8

            self._ort = load_int8(self.fp32_graph_path, threads=onnx_threads)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        backend: BackendChoice = "torch",
        pooling: Pooling = "cls",
        onnx_threads: int | None = None,
    ) -> ImageEncoder:
        """Load a CNN or ViT checkpoint (hub id or local folder, safetensors only, every key
        matched). ``backend="onnx"`` runs inference in ONNX Runtime on the CPU (exported once,
        cached next to the checkpoint); ``"onnx-int8"`` runs the int8 graph ``quantize`` wrote
        there; ``"auto"`` picks one of the three (``BackendChoice``); ``feature_maps`` always
        runs in PyTorch. ``model_id`` names the checkpoint whatever the backend (as for fp16 on
        GPUs); ``backend`` tells them apart."""
        folder = resolve_checkpoint(name_or_path)
        model_id = model_id_for(name_or_path, weight_files(folder))
        processor = AutoImageProcessor.from_pretrained(folder)
        if backend == "auto":
            cuda = select_device(device).type == "cuda"
            backend = auto_backend(folder, model_id, pooling, processor, cuda=cuda)
        full, config = load_strict(folder)
        model_type = config.model_type
        if model_type in CNN_TYPES:
            kind: ImageKind = "cnn"
        elif model_type in VIT_TYPES:
            kind = "vit"
        else:
            raise CheckpointError(
                f"{name_or_path}: model_type {model_type!r} is not a supported image backbone "
                f"(CNN: {sorted(CNN_TYPES)}; ViT: {sorted(VIT_TYPES)})"
            )
        if backend != "torch":
            if device not in (None, "cpu"):
                raise ValueError(f"backend={backend!r} runs on the CPU; use 'torch' for GPUs")
            dev = torch.device("cpu")
        else:
            dev = select_device(device)
        dt = torch_dtype(dtype, dev)
        if backend != "torch" and dt != torch.float32:
            raise ValueError(f"backend={backend!r} exports a float32 graph; leave dtype unset")
        # A classification checkpoint was loaded with its head so every key matched; the
        # embedding is the body's output.
        backbone = cast(PreTrainedModel, full.base_model.to(device=dev, dtype=dt))
        head = getattr(full, "classifier", None) if kind == "cnn" else None
        id2label: dict[Any, str] = dict(config.id2label or {})
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        if not isinstance(head, torch.nn.Module) or head is backbone:
            head = None
        return cls(
            model=backbone,
            processor=processor,
            model_id=model_id,
            kind=kind,
            folder=folder,
            device=dev,
            dtype=dt,
            batch_size=batch_size,
            pooling=pooling,
            backend=backend,
            onnx_threads=onnx_threads,
            head=head.to(device=dev, dtype=dt) if head is not None else None,
            labels=labels,
        )

    @property
    def fp32_graph_path(self) -> Path:
        """Where this checkpoint's fp32 ONNX graph is cached; int8 graphs sit beside it."""
        from mmcds.encoders.onnx import fp32_graph_path

        return fp32_graph_path(self.folder, self.model_id, self.pooling, self.processor)

    def _fp32_graph(self) -> OrtEmbedder:
        from mmcds.encoders.onnx import load_or_export

        example = self.preprocess([np.zeros((32, 32), np.float32)])
        return load_or_export(
            self.embedder, example, self.fp32_graph_path, threads=self.onnx_threads
        )

    def quantize(self, calibration_pixels: Sequence[np.ndarray]) -> ImageEncoder:
        """This float32 CPU encoder, sharing its model, on the ``"onnx-int8"`` backend: the int8
        graph is built beside the fp32 one (unless built before from the same weights and
        calibration) and recorded as what ``from_pretrained(backend="onnx-int8")`` loads.
        ``calibration_pixels``, images as ``embed`` takes them, must be representative: the CNN
        recipe fixes its activation ranges from them (~16 do); the ViT recipe ignores them."""
        from mmcds.encoders.onnx import INT8_RECIPES, load_int8, quantize_int8

        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("quantize needs device='cpu' and dtype unset (float32)")
        fp32 = self._ort if self.backend == "onnx" and self._ort else self._fp32_graph()
        calibration = self.preprocess(calibration_pixels).numpy() if calibration_pixels else None
        quantize_int8(fp32.path, calibration, INT8_RECIPES[self.kind])
        int8 = copy.copy(self)  # same model, processor, head and attention lock
        int8.backend, int8._ort = "onnx-int8", load_int8(fp32.path, threads=self.onnx_threads)
        return int8

    @property
    def dim(self) -> int:
        config = self.model.config
        sizes = getattr(config, "hidden_sizes", None)
        return int(sizes[-1]) if self.kind == "cnn" and sizes else int(config.hidden_size)

    # -- preprocessing --------------------------------------------------------------------

    def _processor_input(self, pixels: np.ndarray) -> np.ndarray:
        arr = np.asarray(pixels)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ValueError(f"expected a grey image of shape (H, W), got {arr.shape}")
        arr = arr.astype(np.float32, copy=False)
        lo, hi = float(arr.min()), float(arr.max())  # NaN fails both tests, +-inf one of them
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError("pixels must be finite and in [0, 1] (see ImageInput.pixels)")
        if getattr(self.processor, "do_rescale", False):
            # The processor rescales itself (by 1/255 for every HF vision checkpoint we know):
            # hand it what it was built for, an 8-bit image, instead of rescaling twice. Its PIL
            # resize quantises to 8 bits anyway, so nothing is lost here. Quantised before the
            # channels are copied: a third of the work on a full-size radiograph.
            arr = np.rint(arr * 255.0).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)  # grey -> the 3 channels the stem expects

    def preprocess(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, H, W) float32 on the CPU, from the checkpoint's image processor."""
        batch = [self._processor_input(p) for p in pixels]
        out = self.processor(images=batch, return_tensors="pt", input_data_format="channels_last")
        values = out["pixel_values"]
        if isinstance(values, list):  # processors that do not resize return ragged lists
            raise ValueError("the image processor does not resize to a fixed size")
        return values.float()

    # -- inference ------------------------------------------------------------------------

    def _to_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(device=self.device, dtype=self.dtype)

    def embed_preprocessed(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, dim) float32 from ``preprocess`` output, on the chosen backend (no batching)."""
        if self._ort is not None:
            return self._ort(pixel_values.numpy())
        with torch.inference_mode():
            emb = self.embedder(self._to_model(pixel_values))
        return emb.float().cpu().numpy()

    def embed_float32(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, dim) float32 from ``preprocess`` output through the float32 weights, whatever
        ``backend`` embeds with: what the PyTorch maps of ``feature_maps`` belong to, for the
        many forward passes of occlusion. On the ONNX backends it runs the fp32 ONNX graph (the
        same weights and function, exported once): with it one patient's explanation took p50
        0.94 s instead of 1.84 s (benchmarks/explain.py, one thread each)."""
        if self.backend == "torch":
            with torch.inference_mode():
                return self.embedder(self._to_model(pixel_values)).float()
        if self._ort_fp32 is None:
            self._ort_fp32 = self._ort if self.backend == "onnx" else self._fp32_graph()
        assert self._ort_fp32 is not None
        return torch.from_numpy(self._ort_fp32(pixel_values.detach().cpu().numpy()))

    def embed(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32, in batches of at most ``batch_size`` images."""
        chunks = [
            self.embed_preprocessed(self.preprocess(pixels[i : i + self.batch_size]))
            for i in range(0, len(pixels), self.batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)

    def encode(self, images: Sequence[ImageInput]) -> ModalityEncoding:
        """One token per image, tied to its SOP UID and content hash (the cache key)."""
        tokens = self.embed([im.pixels for im in images])
        return ModalityEncoding(
            modality="image",
            tokens=tokens,
            spans=[im.sop_uid for im in images],
            model_id=self.model_id,
            input_hashes=[im.content_hash or _pixels_hash(im.pixels) for im in images],
        )

    # -- for explanations -----------------------------------------------------------------

    def randomised(self, seed: int) -> ImageEncoder:
        """A copy whose backbone weights are re-drawn (each tensor from a normal of its own
        std), for the model-randomisation check of saliency (Adebayo et al. 2018). It runs in
        PyTorch only: a cached ONNX graph of this checkpoint holds the real weights."""
        out = copy.copy(self)
        out.model = copy.deepcopy(self.model)
        out.embedder = _Embedder(out.model, self.kind, self.pooling).eval()
        out.backend, out._ort, out._ort_fp32 = "torch", None, None
        out.model_id = f"{self.model_id}+random{seed}"
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in out.model.parameters():
                if p.dim() > 1:
                    std = float(p.std()) or 0.02
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
        return out

    def feature_maps(self, pixels: Sequence[np.ndarray], *, grad: bool = False) -> FeatureMaps:
        """One PyTorch forward pass keeping the maps explanations need. With ``grad=True`` the
        input requires grad so the graph from ``pixel_values`` through the maps to ``embedding``
        is kept (Grad-CAM differentiates a score w.r.t. ``feature_map``); otherwise it runs
        under inference mode. Batch as you like: it is not split."""
        pixel_values = self._to_model(self.preprocess(pixels))
        if self.kind == "cnn":
            with _grad_mode(grad):
                if grad:
                    pixel_values.requires_grad_(True)
                out = self.model(pixel_values=pixel_values, output_hidden_states=True)
                pooled = out.pooler_output
                return FeatureMaps(
                    kind="cnn",
                    pixel_values=pixel_values,
                    embedding=pooled.flatten(1),
                    feature_map=out.last_hidden_state,
                    stage_maps=tuple(out.hidden_states[1:]),
                    head_logits=self.head(pooled) if self.head is not None else None,
                )
        patch = self.model.config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        # SDPA kernels do not return attention weights; switch to eager attention for this pass.
        with self._attn_lock, _grad_mode(grad):
            if grad:
                pixel_values.requires_grad_(True)
            previous = self.model.config._attn_implementation
            self.model.set_attn_implementation("eager")
            try:
                out = self.model(pixel_values=pixel_values, output_attentions=True)
            finally:
                self.model.set_attn_implementation(previous)
        return FeatureMaps(
            kind="vit",
            pixel_values=pixel_values,
            embedding=self.embedder.pool(out),
            tokens=out.last_hidden_state,
            attentions=tuple(out.attentions),
            grid=grid,
        )


def auto_backend(
    folder: Path, model_id: str, pooling: Pooling, processor: Any, *, cuda: bool
) -> Backend:
    """What ``backend="auto"`` means for this checkpoint: PyTorch on CUDA; on a CPU the int8
    graph when one was built for these weights, else fp32 ONNX."""
    if cuda:
        return "torch"
    from mmcds.encoders.onnx import current_int8, fp32_graph_path

    built = current_int8(fp32_graph_path(folder, model_id, pooling, processor))
    return "onnx" if built is None else "onnx-int8"


def _grad_mode(grad: bool) -> Any:
    return torch.enable_grad() if grad else torch.inference_mode()


def _pixels_hash(pixels: np.ndarray) -> str:
    arr = np.ascontiguousarray(pixels)
    return content_hash(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes())
