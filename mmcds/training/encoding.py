"""Reading a cohort folder and encoding it for training: examples, cached embeddings in
length-sorted batches, and the radiographs (with their lesion masks) the image encoders learn
from. ``mmcds train``, ``mmcds evaluate`` and ``mmcds calibrate`` share it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mmcds.encoders.text import Chunk
from mmcds.fusion.data import EncodedSet
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import content_hash
from mmcds.settings import Settings
from mmcds.store import EmbeddingCache
from mmcds.training.dataset import Example, encode_examples, iter_examples


def load_examples(
    data: Path, limit: int | None, progress: bool, findings: Sequence[str]
) -> list[Example]:
    n = limit
    if n is None:
        with (data / "labels.csv").open() as fh:
            n = max(0, sum(1 for _ in fh) - 1)
    return list(
        tqdm(iter_examples(data, limit, findings), total=n, desc="read", disable=not progress)
    )


def data_hash(ds: EncodedSet) -> str:
    """Content hash of what the model learned from: each patient's inputs and labels."""
    h = hashlib.sha256()
    for key, enc, y in zip(ds.keys, ds.encodings, ds.labels, strict=True):
        h.update(key.encode())
        for m in sorted(enc.by_modality):
            h.update("|".join(enc.by_modality[m].input_hashes).encode())
        h.update(y.astype(np.int8).tobytes())
    return h.hexdigest()[:16]


def prefetch_text(
    pipe: Pipeline, examples: list[Example], progress: bool, batch_size: int = 32
) -> int:
    """Embed every note chunk of the cohort not yet in the cache, length-sorted across patients.

    Encoding patient by patient pads each batch to that patient's longest chunk: on the synthetic
    cohort (about 24 chunks of 38 tokens on average per patient) that doubles the tokens MiniLM
    runs over. Sorting all chunks of the cohort by length first gives near-uniform batches; the
    per-patient ``pipe.encode`` then finds every chunk in the cache (same chunking, same keys, same
    embeddings). Returns the number of chunks embedded here."""
    if pipe.cache is None:
        return 0
    model_id = pipe.text.model_id
    todo: dict[str, Chunk] = {}
    for ex in tqdm(examples, desc="chunk", disable=not progress):
        for chunk in pipe.text.chunks(ex.record.notes):
            todo.setdefault(content_hash(chunk.text), chunk)
    keys = list(todo)
    for at in range(0, len(keys), 2000):
        found = pipe.cache.get_many([(k, model_id) for k in keys[at : at + 2000]])
        for k, _ in found:
            todo.pop(k, None)
    ordered = sorted(todo.items(), key=lambda kv: len(kv[1].text))
    group = 1024  # cache writes per transaction; batches inside stay length-sorted
    bar = tqdm(total=len(ordered), desc="text", unit="chunk", disable=not progress)
    for at in range(0, len(ordered), group):
        part = ordered[at : at + group]
        vectors = pipe.text.embed_chunks([c for _, c in part], batch_size=batch_size)
        pipe.cache.put_many((k, model_id, v) for (k, _), v in zip(part, vectors, strict=True))
        bar.update(len(part))
    bar.close()
    return len(ordered)


def prefetch_images(
    pipe: Pipeline, examples: list[Example], progress: bool, batch_size: int = 32
) -> int:
    """Embed every radiograph not yet in the cache with both image encoders, 32 at a time
    (``pipe.encode`` goes one patient, one image, at a time). Returns images embedded."""
    if pipe.cache is None:
        return 0
    done = 0
    for encoder in (pipe.cnn, pipe.vit):
        todo = {im.content_hash: im.pixels for ex in examples for im in ex.record.images}
        keys = list(todo)
        for at in range(0, len(keys), 2000):
            found = pipe.cache.get_many([(k, encoder.model_id) for k in keys[at : at + 2000]])
            for k, _ in found:
                todo.pop(k, None)
        items = list(todo.items())
        bar = tqdm(total=len(items), desc=f"image {encoder.kind}", disable=not progress)
        for at in range(0, len(items), 256):
            part = items[at : at + 256]
            vectors = encoder.embed([px for _, px in part])  # batches of encoder.batch_size
            pipe.cache.put_many(
                (k, encoder.model_id, v) for (k, _), v in zip(part, vectors, strict=True)
            )
            bar.update(len(part))
        bar.close()
        done += len(items)
    return done


def encode_all(pipe: Pipeline, examples: list[Example], progress: bool) -> EncodedSet:
    prefetch_images(pipe, examples, progress)
    prefetch_text(pipe, examples, progress)
    bar = tqdm(examples, desc="encode", disable=not progress)
    return encode_examples(bar, lambda ex: pipe.encode(ex.record), pipe.fusion.config.findings)


def model_pipeline(model_dir: Path, settings: Settings, cache_url: str | None) -> Pipeline:
    """The pipeline with the model folder's own encoders (its fine-tuned CNN and ViT)."""
    s = settings.model_copy(
        update={"fusion_model": str(model_dir), "cnn_model": "", "vit_model": ""}
    )
    pipe = Pipeline.from_settings(s)
    if cache_url:
        pipe.cache = EmbeddingCache(cache_url)
    return pipe


def training_images(
    examples: list[Example], findings: Sequence[str]
) -> tuple[list[np.ndarray], np.ndarray]:
    """One training image per radiograph, labelled with its patient's findings."""
    pixels, labels = [], []
    for ex in examples:
        for img in ex.record.images:
            pixels.append(img.pixels)
            labels.append([ex.labels[f] for f in findings])
    return pixels, np.asarray(labels, np.float32).reshape(-1, len(findings))


def training_masks(examples: list[Example], findings: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Per training image, in ``training_images`` order, its lesion masks (finding -> mask)."""
    out = []
    for ex in examples:
        for img in ex.record.images:
            found = {}
            for finding in findings:
                path = ex.masks.get(f"{img.sop_uid}:{finding}")
                if path is not None:
                    with Image.open(path) as png:
                        mask = np.asarray(png.convert("L")) > 127
                    if mask.shape != img.pixels.shape:
                        raise ValueError(
                            f"{path} is {mask.shape}, its image {img.pixels.shape}: a mask must "
                            "lie on its radiograph's pixel grid"
                        )
                    found[finding] = mask
            out.append(found)
    return out
