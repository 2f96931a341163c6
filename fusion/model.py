"""The fusion model: attention over modality tokens, with masks for what is missing.

Each modality's tokens (one per image, one per note chunk, one per lab) are projected to a
shared width, tagged with a modality-type embedding and attended over together with a learned
summary token; one logit per finding comes out. A modality that is absent is masked, never
zero-filled as if it were evidence.

Each present modality also adds its own logits, read off the mean and the max of its projected
tokens. One attention layer over ~90 tokens, learned from a few hundred patients, used each
modality's evidence poorly: alone, its labs and notes read heart failure far worse than
logistic regressions on raw lab values and TF-IDF. The additive per-modality term gives the
summary token a stacking baseline to improve on; it took the validation loss from 0.141 to
0.122 (``docs/results/fusion.md``, "Current default model").

The text head also adds the lexical path's logits (``mmcds.fusion.lexical``: TF-IDF + logistic
regression over the notes, fitted on the training split), times a learned per-finding scale,
when the notes are present: frozen sentence embeddings alone lost to TF-IDF on notes-only
cohorts.

A checkpoint is a folder: ``config.json``, ``model.safetensors`` and ``README.md`` (the model
card). ``from_pretrained`` loads every weight or fails.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmcds.findings import SYNTH_FINDINGS, load_catalogue, register
from mmcds.fusion.lexical import LexicalPath
from mmcds.records import MODALITIES, Encodings

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: What ``FusionModel`` builds; a checkpoint of another architecture cannot load into it.
#: The lexical path is part of it, present where ``config.lexical`` says so: a model without one
#: has exactly the weights it had before the path existed, so those checkpoints still load.
ARCHITECTURE = "summary-attention+modality-heads/2"


@dataclass
class FusionConfig:
    findings: list[str] = field(default_factory=lambda: list(SYNTH_FINDINGS))
    # The catalogue entries (display, SNOMED CT) of ``findings`` the model was trained with, so
    # a site's own finding is worded and coded the same wherever the model is served.
    finding_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The modalities the training cohort had (what the model learned and was validated on);
    # empty (an older model): those of ``input_dims``.
    modalities: list[str] = field(default_factory=list)
    input_dims: dict[str, int] = field(
        default_factory=lambda: {"image": 64, "text": 384, "labs": 9}
    )
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    dropout: float = 0.1
    modality_dropout: float = 0.25
    max_tokens: dict[str, int] = field(default_factory=lambda: {"image": 8, "text": 64, "labs": 16})
    # Encoder identities the embeddings must come from; a mismatch means the model is fed
    # vectors from a space it was never trained on.
    encoder_ids: dict[str, str] = field(default_factory=dict)
    trained: bool = False
    version: str = "untrained"
    # Calibration and operating points, set after training (temperature 1 = uncalibrated).
    temperature: dict[str, float] = field(default_factory=dict)
    warning_threshold: dict[str, float] = field(default_factory=dict)
    critical_threshold: dict[str, float] = field(default_factory=dict)
    # ``mmcds.fusion.calibrate.Calibration.to_json()``: method, global and per-site (scale, bias)
    # per finding; empty = the temperatures above (or none).
    calibration: dict[str, Any] = field(default_factory=dict)
    # ``mmcds.fusion.validation.validate_subsets``: per subset of modalities, its calibrator,
    # thresholds and validation per finding. Empty (an older model): nothing may alarm.
    subsets: dict[str, Any] = field(default_factory=dict)
    # What it was trained on: data hash, split hash and the patient keys of each split.
    training: dict[str, Any] = field(default_factory=dict)
    # ``LexicalPath.summary()`` of the model's lexical path; empty: the model has none.
    lexical: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    architecture: str = ARCHITECTURE

    def save(self, path: Path) -> None:
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> FusionConfig:
        data = json.loads((path / CONFIG_NAME).read_text())
        data.setdefault("architecture", "summary-attention/1")  # before the field existed
        config = cls(**data)
        if not config.finding_entries:  # before the field existed: the shipped catalogue's
            cat = load_catalogue()
            config.finding_entries = {n: cat[n].entry() for n in config.findings if n in cat}
        register(config.finding_entries)
        return config


@dataclass
class FusionBatch:
    """Padded tokens per modality: ``tokens[m]`` (B, T, D_m) and ``mask[m]`` (B, T), True = real;
    ``lexical`` (B, F): the lexical path's logits (0 without notes), None for a model without
    that path. It counts only while the text mask keeps a token."""

    tokens: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    lexical: torch.Tensor | None = None


def batch_from_encodings(
    config: FusionConfig, items: list[Encodings], device: torch.device | None = None
) -> FusionBatch:
    """Pad each patient's tokens per modality; an absent modality gets an all-False mask."""
    tokens: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    for modality in MODALITIES:
        dim, cap = config.input_dims[modality], config.max_tokens[modality]
        t = np.zeros((len(items), cap, dim), dtype=np.float32)
        m = np.zeros((len(items), cap), dtype=bool)
        for i, enc in enumerate(items):
            got = enc.by_modality.get(modality)
            if got is None or got.tokens.size == 0:
                continue
            if got.tokens.shape[1] != dim:
                raise ValueError(
                    f"{modality} embeddings have width {got.tokens.shape[1]}, the fusion model "
                    f"expects {dim}: encoder {got.model_id} does not match this checkpoint"
                )
            n = min(cap, got.tokens.shape[0])
            t[i, :n] = got.tokens[:n]
            m[i, :n] = True
        tokens[modality] = torch.from_numpy(t).to(device) if device else torch.from_numpy(t)
        mask[modality] = torch.from_numpy(m).to(device) if device else torch.from_numpy(m)
    return FusionBatch(tokens, mask, _lexical(config, items, device))


def _lexical(
    config: FusionConfig, items: list[Encodings], device: torch.device | None
) -> torch.Tensor | None:
    if not config.lexical:
        return None
    z = np.zeros((len(items), len(config.findings)), dtype=np.float32)
    for i, enc in enumerate(items):
        got = enc.by_modality.get("text")
        if got is None or got.tokens.size == 0:
            continue
        if got.lexical is None or got.lexical.shape != (len(config.findings),):
            raise ValueError(
                "the notes' encoding lacks this model's lexical logits: encode them with the "
                "pipeline of the model that fuses them"
            )
        z[i] = got.lexical
    out = torch.from_numpy(z)
    return out.to(device) if device else out


class FusionModel(nn.Module):
    def __init__(self, config: FusionConfig, lexical: LexicalPath | None = None) -> None:
        super().__init__()
        self.config = config
        # fitted, not trained by gradient: saved beside the weights (lexical.json/.safetensors)
        self.lexical = lexical
        d = config.d_model
        self.project = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.LayerNorm(config.input_dims[m]), nn.Linear(config.input_dims[m], d)
                )
                for m in MODALITIES
            }
        )
        self.modality_embedding = nn.Parameter(torch.zeros(len(MODALITIES), d))
        self.summary_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.modality_embedding, std=0.02)
        nn.init.normal_(self.summary_token, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, config.n_heads, dim_feedforward=2 * d, dropout=config.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.heads = nn.Linear(d, len(config.findings))
        # per modality: logits from [mean, max] of its projected tokens
        self.modality_heads = nn.ModuleDict(
            {m: nn.Linear(2 * d, len(config.findings)) for m in MODALITIES}
        )
        if config.lexical:  # stacking: start from the lexical logits, the encoders' paths learn
            # taken as they are at first; training scales each finding's
            self.lexical_scale = nn.Parameter(torch.ones(len(config.findings)))
            text_head = cast(nn.Linear, self.modality_heads["text"])  # what they add; random
            for head in (self.heads, text_head):  # heads over weak text tokens first drowned a
                nn.init.zeros_(head.weight)  # weak lexical signal in their noise
                nn.init.zeros_(head.bias)  # (tests/fusion/test_lexical.py)

    def forward(
        self, batch: FusionBatch, drop: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits (B, n_findings). ``drop[m]`` (B,) True removes modality m for that patient."""
        parts, masks = [], []
        per_modality = []
        for i, m in enumerate(MODALITIES):
            x = self.project[m](batch.tokens[m])
            keep = batch.mask[m]
            if drop is not None and m in drop:
                keep = keep & ~drop[m][:, None]
            per_modality.append(self.modality_heads[m](_mean_max(x, keep)))
            parts.append(x + self.modality_embedding[i])
            masks.append(keep)
        b = parts[0].shape[0]
        summary = self.summary_token.expand(b, -1, -1)
        x = torch.cat([summary, *parts], dim=1)
        keep_all = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), *masks], dim=1)
        h = self.encoder(x, src_key_padding_mask=~keep_all)
        logits = self.heads(self.norm(h[:, 0]))
        for keep, z in zip(masks, per_modality, strict=True):
            logits = logits + z * keep.any(dim=1, keepdim=True).to(z.dtype)  # absent adds 0
        if batch.lexical is not None:  # with the notes only: dropped or absent notes add 0
            notes = masks[MODALITIES.index("text")].any(dim=1, keepdim=True).to(logits.dtype)
            logits = logits + self.lexical_scale * batch.lexical.to(logits.dtype) * notes
        return torch.as_tensor(logits)

    @torch.inference_mode()
    def predict_proba(
        self, items: list[Encodings], sites: list[str | None] | None = None
    ) -> np.ndarray:
        """Calibrated probabilities (B, n_findings); a known site gets its own calibration."""
        self.eval()
        device = next(self.parameters()).device
        logits = self(batch_from_encodings(self.config, items, device)).double().cpu().numpy()
        if self.config.calibration:
            from mmcds.fusion.calibrate import Calibration

            cal = Calibration.from_json(self.config.calibration, self.config.findings)
            return cal.apply(logits, sites)
        temps = np.array([self.config.temperature.get(f, 1.0) for f in self.config.findings])
        return 1.0 / (1.0 + np.exp(-logits / temps))

    def check_encoders(self, encodings: Encodings) -> None:
        for modality, enc in encodings.by_modality.items():
            expected = self.config.encoder_ids.get(modality)
            if expected and enc.model_id != expected:
                raise ValueError(
                    f"{modality} embeddings come from {enc.model_id}, but this fusion model was "
                    f"trained on {expected}: configure the same encoder or retrain"
                )

    def save_pretrained(self, path: str | Path, card: str | None = None) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out)
        if self.lexical is not None:
            self.lexical.save(out)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out / WEIGHTS_NAME)
        (out / CARD_NAME).write_text(card or default_card(self.config))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FusionModel:
        folder = Path(path)
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} is not a fusion checkpoint: {WEIGHTS_NAME} missing "
                "(only safetensors checkpoints are loaded)"
            )
        config = FusionConfig.load(folder)
        if config.architecture != ARCHITECTURE:
            raise ValueError(
                f"{folder} holds a {config.architecture!r} fusion model; this mmcds builds "
                f"{ARCHITECTURE!r}: retrain it with `mmcds train`"
            )
        model = cls(config, LexicalPath.load(folder) if config.lexical else None)
        state = load_file(folder / WEIGHTS_NAME)
        # strict: a missing or unexpected key means the file is not this architecture.
        model.load_state_dict(state, strict=True)
        model.eval()
        return model


def _mean_max(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens -> (B, 2D): mean and max over the kept tokens; zeros where none is."""
    k = keep[..., None].to(x.dtype)
    mean = (x * k).sum(dim=1) / k.sum(dim=1).clamp(min=1.0)
    top = x.masked_fill(~keep[..., None], torch.finfo(x.dtype).min).amax(dim=1)
    top = torch.where(keep.any(dim=1, keepdim=True), top, torch.zeros_like(top))
    return torch.cat([mean, top], dim=-1)


def is_current(path: str | Path) -> bool:
    """Whether the folder holds a checkpoint this mmcds can load (weights and architecture)."""
    folder = Path(path)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        return False
    return FusionConfig.load(folder).architecture == ARCHITECTURE


def default_card(config: FusionConfig) -> str:
    status = "trained" if config.trained else "UNTRAINED: random weights, scores carry no meaning"
    return (
        f"# mmcds fusion model {config.version}\n\n"
        f"Status: {status}.\n\n"
        "## Intended use\nDecision support for clinicians reviewing chest imaging, notes and "
        "labs. Every output is preliminary until a clinician accepts it. Not for autonomous "
        "diagnosis.\n\n"
        f"## Findings\n{', '.join(config.findings)}\n\n"
        f"## Encoders\n{json.dumps(config.encoder_ids, indent=2)}\n\n"
        "## Limits\nTrained on a synthetic cohort; performance at a new site must be checked on "
        "the local population before use. Labels may be noisy; saliency may mislead.\n"
    )
