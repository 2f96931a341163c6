"""Loading Hugging Face checkpoints safely: safetensors only, every key matched.

A checkpoint whose keys do not line up with the architecture loads "fine" in transformers with a
warning and randomly initialised layers -- the known trap of CheXNet reimplementations that used
``strict=False``. Here any missing, unexpected or mismatched key is an error that names the keys.
Pickled weights (``pytorch_model.bin``) can execute code on load, so they are refused outright.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from mmcds.errors import ModelIncompatible

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ModelIncompatible):
    """A checkpoint that cannot be trusted to produce the model its config describes."""


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local checkpoint folder, or the local snapshot of a Hugging Face hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError(f"{name_or_path} is a file; give the checkpoint's folder instead")
    from huggingface_hub import snapshot_download

    try:
        # Only configs and safetensors: a pickle is never even downloaded.
        folder = snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt"]
        )
    except Exception as exc:  # the hub client raises many unrelated types
        raise CheckpointError(
            f"{name_or_path!r} is neither a local folder nor a hub model available here ({exc}). "
            "Give a local folder, or pre-fetch the model into the Hugging Face cache "
            "(HF_HUB_OFFLINE=1 reads only the cache)."
        ) from exc
    return Path(folder)


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files, sorted; refuses a folder holding only pickles."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); pickles can run code "
            "when loaded, so they are refused. Convert them once, in a sandbox you trust, with "
            "`model.save_pretrained(folder)` (transformers writes model.safetensors)."
        )
    raise CheckpointError(f"{folder} holds no *.safetensors weights")


def weights_sha256(files: list[Path]) -> str:
    """SHA-256 over the weight files' bytes, in name order: the identity of the weights."""
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_id_for(name_or_path: str, files: list[Path]) -> str:
    """``<name>@<12 hex of the weights' SHA-256>``; a local folder is named by its last part so
    the id does not change with where the folder is mounted."""
    path = Path(name_or_path).expanduser()
    name = path.resolve().name if path.is_dir() else name_or_path.rstrip("/")
    return f"{name}@{weights_sha256(files)[:12]}"


def _architecture_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class the checkpoint was saved from, so a classification checkpoint's head keys are
    expected (and loaded) rather than reported as unexpected; the caller then takes its
    ``base_model``. Falls back to ``AutoModel`` when the config names no known class."""
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModel  # type: ignore[return-value]


def load_strict(folder: Path, **kwargs: Any) -> tuple[PreTrainedModel, PretrainedConfig]:
    """Load the checkpoint's architecture from safetensors; raise on any key that does not match.

    Returns the full model (with any task head) and its config.
    """
    weight_files(folder)  # refuses pickles with a clear message before transformers sees them
    config = AutoConfig.from_pretrained(folder)
    cls = _architecture_class(config)
    try:
        loaded: Any = cls.from_pretrained(
            folder, config=config, use_safetensors=True, output_loading_info=True, **kwargs
        )
        model, info = loaded
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot load {folder}: {exc}") from exc
    problems = {
        kind: sorted(info.get(kind) or [])
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info.get(kind)
    }
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in problems.items())
        errors = "; ".join(map(str, info.get("error_msgs") or []))
        raise CheckpointError(
            f"checkpoint {folder} does not match {cls.__name__}: {detail or errors}. Refusing to "
            "run with randomly initialised or dropped weights; fix the checkpoint or its config."
        )
    model = model.eval()
    model.requires_grad_(False)  # explanations ask for input gradients explicitly
    return model, config


def torch_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``None`` means half precision on CUDA (bf16 where supported), float32 elsewhere."""
    if name is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    try:
        return aliases[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(aliases)}") from None


def select_device(preferred: str | None = None) -> torch.device:
    """The given device if it is usable, else CUDA, then Apple MPS, then CPU."""
    if preferred:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {preferred!r} requested but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {preferred!r} requested but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
