"""Image encoders: tiny CNN and ViT checkpoints built here, saved, and loaded back through the
same ``from_pretrained`` path a real checkpoint takes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcds.encoders.checkpoint import CheckpointError
from mmcds.encoders.image import ImageEncoder, auto_backend
from mmcds.encoders.tiny import build_tiny_cnn, build_tiny_vit
from mmcds.records import ImageInput

IMAGE_SIZE = 64  # small inputs keep the suite fast; the code path is the same as at 224
Builder = Callable[..., Path]
BUILDERS: dict[str, Builder] = {"cnn": build_tiny_cnn, "vit": build_tiny_vit}


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    square = rng.random((96, 96), dtype=np.float32)
    tall = rng.random((120, 80), dtype=np.float32)  # non-square, portrait
    wide = np.linspace(0.0, 1.0, 70 * 150, dtype=np.float32).reshape(70, 150)
    return [square, tall, wide]


@pytest.fixture(scope="module", params=["cnn", "vit"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    return BUILDERS[request.param](folder, seed=1, image_size=IMAGE_SIZE)


def test_loads_back_with_right_kind_shape_and_determinism(checkpoint: Path) -> None:
    enc = ImageEncoder.from_pretrained(str(checkpoint), device="cpu", batch_size=2)
    assert enc.kind == checkpoint.name.rstrip("0123456789")
    name, digest = enc.model_id.split("@")
    assert name == checkpoint.name and len(digest) == 12
    images = _images()
    first = enc.embed(images)  # 3 images at batch_size 2: exercises the batching
    assert first.shape == (3, enc.dim) and first.dtype == np.float32
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, enc.embed(images))
    # A second load of the same files gives the same id and the same numbers.
    again = ImageEncoder.from_pretrained(str(checkpoint), device="cpu")
    assert again.model_id == enc.model_id
    np.testing.assert_allclose(again.embed(images), first, rtol=0, atol=1e-5)
    # Each image's embedding does not depend on what it is batched with.
    np.testing.assert_allclose(enc.embed(images[1:2])[0], first[1], rtol=0, atol=1e-5)
    # Different images give different embeddings (the model is not ignoring its input).
    assert np.abs(first[0] - first[2]).max() > 1e-4
    assert enc.embed([]).shape == (0, enc.dim)


def test_preprocess_replicates_grey_and_does_not_rescale_twice(checkpoint: Path) -> None:
    enc = ImageEncoder.from_pretrained(str(checkpoint), device="cpu")
    ramp = np.tile(np.linspace(0.0, 1.0, 90, dtype=np.float32), (50, 1))
    flat = [np.full((50, 90), 1.0, np.float32), np.zeros((90, 50), np.float32), ramp]
    values = enc.preprocess(flat)
    assert values.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    mean = torch.tensor(enc.processor.image_mean).view(3, 1, 1)
    std = torch.tensor(enc.processor.image_std).view(3, 1, 1)
    raw = values * std + mean  # undo the per-channel normalisation: channels must be equal
    torch.testing.assert_close(raw[:, 0], raw[:, 1])
    torch.testing.assert_close(raw[:, 1], raw[:, 2])
    assert raw[2, 0].std() > 0.1  # the ramp survives preprocessing (centre crop) as a ramp
    # White must map to (1 - mean) / std and black to -mean / std: a double rescale would put
    # white near -mean / std too.
    torch.testing.assert_close(values[0], ((1 - mean) / std).expand_as(values[0]))
    torch.testing.assert_close(values[1], (-mean / std).expand_as(values[1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc.preprocess([np.full((8, 8), 255.0, np.float32)])


def test_encode_ties_tokens_to_sop_uids_and_hashes(checkpoint: Path) -> None:
    enc = ImageEncoder.from_pretrained(str(checkpoint), device="cpu")
    pixels = _images()[:2]
    images = [
        ImageInput(pixels=p, study_uid="1.2", series_uid="1.2.3", sop_uid=f"1.2.3.{i}")
        for i, p in enumerate(pixels)
    ]
    images[0].content_hash = "a" * 64
    encoding = enc.encode(images)
    assert encoding.modality == "image" and encoding.model_id == enc.model_id
    assert encoding.spans == ["1.2.3.0", "1.2.3.1"]
    assert encoding.input_hashes[0] == "a" * 64
    assert len(encoding.input_hashes[1]) == 64  # computed from the pixels when absent
    np.testing.assert_allclose(encoding.tokens, enc.embed(pixels), rtol=0, atol=1e-6)


def test_feature_maps_keep_graph_for_explanations(checkpoint: Path) -> None:
    enc = ImageEncoder.from_pretrained(str(checkpoint), device="cpu")
    maps = enc.feature_maps(_images()[:2], grad=True)
    np.testing.assert_allclose(
        maps.embedding.detach().numpy(), enc.embed(_images()[:2]), rtol=0, atol=1e-4
    )
    if enc.kind == "cnn":
        assert maps.feature_map is not None and maps.feature_map.ndim == 4
        target = maps.feature_map
    else:
        assert maps.tokens is not None and maps.attentions is not None and maps.grid is not None
        h, w = maps.grid
        assert maps.tokens.shape[1] == 1 + h * w
        assert len(maps.attentions) == enc.model.config.num_hidden_layers
        assert maps.attentions[0].shape[-1] == 1 + h * w
        # rows of an attention matrix are softmax outputs
        torch.testing.assert_close(
            maps.attentions[-1].sum(-1), torch.ones_like(maps.attentions[-1][..., 0])
        )
        target = maps.tokens
    (grad,) = torch.autograd.grad(maps.embedding[:, 0].sum(), target)
    assert grad.shape == target.shape and grad.abs().sum() > 0
    assert not enc.feature_maps(_images()[:1]).embedding.requires_grad


def test_onnx_matches_eager_and_is_cached(checkpoint: Path) -> None:
    eager = ImageEncoder.from_pretrained(str(checkpoint), device="cpu")
    ort = ImageEncoder.from_pretrained(str(checkpoint), backend="onnx", batch_size=2)
    cached = sorted((checkpoint / "onnx").glob("*.onnx"))
    assert [p.name.split(".")[0] for p in cached] == [eager.model_id]
    images = _images()
    diff = np.abs(ort.embed(images) - eager.embed(images)).max()
    assert diff <= 1e-4, f"ONNX Runtime differs from eager by {diff}"
    mtime = cached[0].stat().st_mtime_ns
    ImageEncoder.from_pretrained(str(checkpoint), backend="onnx")
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not re-exported
    # A truncated cache file (a crash elsewhere, a full disk) is replaced, not trusted.
    cached[0].write_bytes(cached[0].read_bytes()[:100])
    healed = ImageEncoder.from_pretrained(str(checkpoint), backend="onnx")
    assert np.abs(healed.embed(images) - eager.embed(images)).max() <= 1e-4


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _calibration(seed: int, n: int = 8) -> list[np.ndarray]:
    """Images of the kinds ``_images`` holds (noise, ramps), none of them the same image."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(60, 160, 2))
        ramp = np.linspace(0.0, 1.0, w if i % 4 else h, dtype=np.float32)
        ramp_2d = ramp[None, :] if i % 4 else ramp[:, None]
        noise = rng.random((h, w), dtype=np.float32)
        out.append(noise if i % 2 else np.broadcast_to(ramp_2d, (h, w)).copy())
    return out


def _int8_files(folder: Path) -> list[Path]:
    return sorted((folder / "onnx").glob("*.int8.*.onnx"))


def test_int8_agrees_with_eager_and_is_built_once(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    eager = ImageEncoder.from_pretrained(str(folder), device="cpu", batch_size=2)
    int8 = eager.quantize(_calibration(10))
    assert int8.backend == "onnx-int8" and eager.backend == "torch"
    assert int8.model_id == eager.model_id  # names the checkpoint; the backend is reported apart
    images = _images()
    a, b = eager.embed(images), int8.embed(images)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    relative = np.abs(a - b).max(1) / np.abs(a).max(1)
    # Measured with seeds 1-3 of both tiny models: cosine >= 0.9989, relative max-abs <= 0.073
    # (seed 1, used here: >= 0.9995 and <= 0.033). A calibration set missing the ramps gave the
    # CNN 0.24 on the ramp, hence the representative set above.
    assert cosine.min() >= 0.99, cosine
    assert relative.max() <= 0.15, relative
    # An image's embedding does not depend on its batch neighbours (the cache keys on the image).
    np.testing.assert_allclose(int8.embed(images[1:2])[0], b[1], rtol=0, atol=1e-5)
    (graph,) = _int8_files(folder)
    built = graph.read_bytes()
    mtime = graph.stat().st_mtime_ns
    # Loaded back from the manifest, and the same calibration set reuses the graph.
    again = ImageEncoder.from_pretrained(str(folder), backend="onnx-int8")
    np.testing.assert_array_equal(again.embed(images), b)
    eager.quantize(_calibration(10))
    assert _int8_files(folder) == [graph] and graph.stat().st_mtime_ns == mtime
    # Deterministic: rebuilt from scratch, the same bytes.
    graph.unlink()
    eager.quantize(_calibration(10))
    assert graph.read_bytes() == built


def test_int8_graph_is_named_by_its_calibration_set(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    eager = ImageEncoder.from_pretrained(str(folder), device="cpu")
    first = eager.quantize(_calibration(10))
    second = eager.quantize(_calibration(11))
    assert first._ort is not None and second._ort is not None
    if eager.kind == "cnn":  # static: the activation ranges come from the calibration set
        assert first._ort.path != second._ort.path and len(_int8_files(folder)) == 2
    else:  # dynamic: nothing is calibrated, so one graph serves any calibration set
        assert first._ort.path == second._ort.path and len(_int8_files(folder)) == 1
    loaded = ImageEncoder.from_pretrained(str(folder), backend="onnx-int8")
    assert loaded._ort is not None and loaded._ort.path == second._ort.path  # the latest
    if eager.kind == "cnn":
        with pytest.raises(ValueError, match="calibration images"):
            eager.quantize([])


def test_int8_without_a_graph_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"no int8 graph.*\.quantize\("):
        ImageEncoder.from_pretrained(str(folder), backend="onnx-int8")


def test_auto_backend_picks_int8_only_when_built_for_these_weights(
    checkpoint: Path, tmp_path: Path
) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    path = str(folder)
    assert ImageEncoder.from_pretrained(path, backend="auto", device="cpu").backend == "onnx"
    ImageEncoder.from_pretrained(path, device="cpu").quantize(_calibration(10))
    assert ImageEncoder.from_pretrained(path, backend="auto", device="cpu").backend == "onnx-int8"
    explicit = ImageEncoder.from_pretrained(path, backend="onnx", device="cpu")
    assert explicit.backend == "onnx"  # an explicit choice stands
    model_id, processor = explicit.model_id, explicit.processor
    assert auto_backend(folder, model_id, "cls", processor, cuda=True) == "torch"
    # New weights in the same folder: the int8 graph belongs to the old ones.
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert ImageEncoder.from_pretrained(path, backend="auto", device="cpu").backend == "onnx"


@pytest.mark.parametrize("fault", ["renamed", "removed"])
def test_checkpoint_with_unmatched_key_is_refused(
    checkpoint: Path, tmp_path: Path, fault: str
) -> None:
    broken = _copy_checkpoint(checkpoint, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    victim = sorted(k for k in weights if k.endswith(".weight"))[-1]
    tensor = weights.pop(victim)
    if fault == "renamed":
        weights[victim.replace(".weight", ".wieght")] = tensor
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing_keys") as err:
        ImageEncoder.from_pretrained(str(broken), device="cpu")
    assert victim in str(err.value)
    if fault == "renamed":
        assert "unexpected_keys" in str(err.value) and ".wieght" in str(err.value)


def test_pickle_only_checkpoint_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    torch.save(load_file(checkpoint / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        ImageEncoder.from_pretrained(str(folder), device="cpu")


def test_unknown_location_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a local folder"):
        ImageEncoder.from_pretrained(str(tmp_path / "no-such-model"), device="cpu")
