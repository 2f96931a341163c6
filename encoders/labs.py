"""The lab encoder: a patient's lab frame -> one token per catalogue lab for the fusion model.

Per lab, over the window ending at ``at``: latest, min, max, trend (least-squares slope per
day), hours since the last value, an abnormal flag, the count and a missingness flag. The raw
features (canonical units) are kept for explanations; ``encode`` scales them with per-lab
robust statistics (``fit``) and appends a one-hot of the lab, because the fusion model treats
tokens as a set and would otherwise not know which lab a token describes.

Skewed analytes (CRP, procalcitonin, NT-proBNP, troponin) are scaled on a log axis: their
clinically meaningful changes are multiplicative, and a linear z-score would let one septic
patient's CRP dominate the statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmcds.encoders.catalogue import BY_NAME, LABS, LabSpec
from mmcds.encoders.lab_frame import empty_lab_frame, observations_to_frame, parse_time
from mmcds.records import LAB_COLUMNS, ModalityEncoding, content_hash

__all__ = [
    "FEATURE_NAMES",
    "LabEncoder",
    "LabFeatureConfig",
    "LabFeatures",
    "LatestLab",
    "empty_lab_frame",
    "observations_to_frame",
    "parse_time",
]

CONFIG_NAME = "lab_encoder.json"  # beside the fusion checkpoint's config.json, so not that name
FEATURE_NAMES = (
    "latest",
    "min",
    "max",
    "trend_per_day",
    "hours_since_last",
    "abnormal",
    "count",
    "missing",
)
_VALUE_PART = FEATURE_NAMES[:-1]  # zeroed when the lab is missing
ABNORMAL_CODES = {"H", "HH", "HU", "L", "LL", "LU", "A", "AA", ">", "<"}
LOG_LABS = ("crp", "procalcitonin", "ntprobnp", "troponin")
_Z_CLIP = 8.0  # a z-score beyond this carries no more information, only instability


@dataclass
class LabFeatureConfig:
    window_hours: float = 72.0
    names: tuple[str, ...] = tuple(s.name for s in LABS)
    log_labs: tuple[str, ...] = LOG_LABS
    # name -> (centre, scale) on the lab's scaling axis (log for log_labs); from ``fit`` or,
    # before it, from the catalogue's reference range
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    fitted: bool = False
    version: str = "labs-features-v1"

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        self.log_labs = tuple(self.log_labs)
        unknown = [n for n in (*self.names, *self.log_labs) if n not in BY_NAME]
        if unknown:
            raise ValueError(f"labs {unknown} are not in the catalogue; known: {sorted(BY_NAME)}")
        if not self.window_hours > 0:
            raise ValueError(f"window_hours must be positive, got {self.window_hours}")
        self.stats = {k: (float(v[0]), float(v[1])) for k, v in self.stats.items()}
        for name in self.names:
            self.stats.setdefault(name, _default_stats(BY_NAME[name], name in self.log_labs))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LabFeatureConfig:
        data = json.loads(text)
        data["stats"] = {k: tuple(v) for k, v in data.get("stats", {}).items()}
        return cls(**data)


def _offset(spec: LabSpec) -> float:
    # keeps log() finite at zero; small against the reference range, so it barely bends it
    return 0.01 * (spec.ref_high or 1.0)


def _axis(spec: LabSpec, log: bool, values: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(values, 0.0) + _offset(spec)) if log else values


def _default_stats(spec: LabSpec, log: bool) -> tuple[float, float]:
    """Centre and scale that put the reference range at about +-2 before any fit."""
    low = spec.ref_low if spec.ref_low is not None else 0.0
    high = spec.ref_high if spec.ref_high is not None else 2 * low + 1.0
    a, b = _axis(spec, log, np.array([low, high], dtype=float))
    return float((a + b) / 2), float(max((b - a) / 4, 1e-6))


@dataclass(frozen=True)
class LatestLab:
    """The row behind a lab's latest value, for explanations ("CRP 180 mg/L at 08:10, H")."""

    value: float
    unit: str
    time: pd.Timestamp
    ref_low: float
    ref_high: float
    interpretation: str | None
    reference: str | None


@dataclass
class LabFeatures:
    """Raw features, (n_labs, n_features), in canonical units; NaN value part where missing."""

    matrix: np.ndarray
    feature_names: tuple[str, ...]
    lab_names: tuple[str, ...]
    latest: dict[str, LatestLab | None]
    at: pd.Timestamp | None
    series: dict[str, pd.DataFrame]  # per lab: the window's (time, value) rows, oldest first

    def row(self, name: str) -> dict[str, float]:
        return dict(zip(self.feature_names, self.matrix[self.lab_names.index(name)], strict=True))


def _slope_per_day(times: pd.Series, values: np.ndarray) -> float:
    if len(values) < 2:
        return 0.0
    days = (times - times.iloc[0]).dt.total_seconds().to_numpy() / 86400.0
    spread = days - days.mean()
    denom = float((spread**2).sum())
    if denom == 0.0:  # all at the same instant: no time axis to fit
        return 0.0
    return float((spread * (values - values.mean())).sum() / denom)


def _abnormal(latest: pd.Series, spec: LabSpec) -> bool:
    if latest["interpretation"] in ABNORMAL_CODES:
        return True
    low = latest["ref_low"] if pd.notna(latest["ref_low"]) else spec.ref_low
    high = latest["ref_high"] if pd.notna(latest["ref_high"]) else spec.ref_high
    value = float(latest["value"])
    return bool((low is not None and value < low) or (high is not None and value > high))


def _check_frame(labs: pd.DataFrame) -> None:
    absent = [c for c in ("name", "value", "time") if c not in labs.columns]
    if absent:
        raise ValueError(
            f"lab frame lacks columns {absent}; build it with observations_to_frame "
            f"(columns: {LAB_COLUMNS})"
        )


class LabEncoder:
    def __init__(self, config: LabFeatureConfig | None = None) -> None:
        self.config = config or LabFeatureConfig()

    # --- identity and persistence -----------------------------------------------------------

    @property
    def model_id(self) -> str:
        digest = hashlib.sha256(self.config.to_json().encode()).hexdigest()[:12]
        return f"{self.config.version}:{digest}"

    @property
    def token_dim(self) -> int:
        return len(FEATURE_NAMES) + len(self.config.names)

    def save_pretrained(self, path: str | Path) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(self.config.to_json())

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LabEncoder:
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: a lab encoder is saved with LabEncoder.save_pretrained "
                "next to the fusion checkpoint it was trained with"
            )
        return cls(LabFeatureConfig.from_json(file.read_text()))

    # --- features ---------------------------------------------------------------------------

    def _window(
        self, labs: pd.DataFrame, at: pd.Timestamp | None
    ) -> tuple[pd.DataFrame, pd.Timestamp | None]:
        _check_frame(labs)
        times = pd.to_datetime(labs["time"], utc=True)
        if at is None:
            at = times.max() if len(times) and times.notna().any() else None
        else:
            at = pd.Timestamp(at)
            at = at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")
        if at is None:
            return labs.iloc[0:0], None
        start = at - pd.Timedelta(hours=self.config.window_hours)
        # (start, at]: nothing after `at`, so training at a past time never sees the future
        keep = (times > start) & (times <= at) & labs["name"].isin(self.config.names)
        keep &= pd.to_numeric(labs["value"], errors="coerce").notna()
        window = labs.loc[keep].assign(time=times[keep])
        return window.sort_values("time", kind="stable"), at

    def features(self, labs: pd.DataFrame, at: pd.Timestamp | None = None) -> LabFeatures:
        window, at = self._window(labs, at)
        names = self.config.names
        matrix = np.full((len(names), len(FEATURE_NAMES)), np.nan)
        latest: dict[str, LatestLab | None] = {}
        series: dict[str, pd.DataFrame] = {}
        groups = dict(tuple(window.groupby("name", sort=False)))
        for i, name in enumerate(names):
            rows = groups.get(name)
            if rows is None or rows.empty:
                matrix[i, FEATURE_NAMES.index("abnormal")] = 0.0
                matrix[i, FEATURE_NAMES.index("count")] = 0.0
                matrix[i, FEATURE_NAMES.index("missing")] = 1.0
                latest[name] = None
                series[name] = pd.DataFrame({"time": [], "value": []})
                continue
            assert at is not None
            values = rows["value"].to_numpy(dtype=float)
            last = rows.iloc[-1]
            matrix[i] = [
                values[-1],
                values.min(),
                values.max(),
                _slope_per_day(rows["time"], values),
                (at - last["time"]).total_seconds() / 3600.0,
                float(_abnormal(last, BY_NAME[name])),
                float(len(values)),
                0.0,
            ]
            latest[name] = LatestLab(
                value=float(last["value"]),
                unit=str(last.get("unit", BY_NAME[name].unit)),
                time=last["time"],
                ref_low=float(last.get("ref_low", math.nan)),
                ref_high=float(last.get("ref_high", math.nan)),
                interpretation=last.get("interpretation"),
                reference=last.get("reference"),
            )
            series[name] = rows[["time", "value"]].reset_index(drop=True)
        return LabFeatures(matrix, FEATURE_NAMES, names, latest, at, series)

    # --- tokens -----------------------------------------------------------------------------

    def scale(self, feats: LabFeatures) -> np.ndarray:
        """(n_labs, token_dim) float32: scaled features, then a one-hot of the lab."""
        names = self.config.names
        out = np.zeros((len(names), self.token_dim), dtype=np.float32)
        col = {f: j for j, f in enumerate(FEATURE_NAMES)}
        for i, name in enumerate(names):
            out[i, len(FEATURE_NAMES) + i] = 1.0
            raw = feats.matrix[i]
            if raw[col["missing"]] == 1.0:
                out[i, col["missing"]] = 1.0  # value part stays zero: absence is not a value
                continue
            spec, log = BY_NAME[name], name in self.config.log_labs
            centre, sd = self.config.stats[name]
            axis = _axis(spec, log, raw[[col["latest"], col["min"], col["max"]]])
            out[i, [col["latest"], col["min"], col["max"]]] = np.clip(
                (axis - centre) / sd, -_Z_CLIP, _Z_CLIP
            )
            s = feats.series[name]
            slope = _slope_per_day(s["time"], _axis(spec, log, s["value"].to_numpy(float)))
            out[i, col["trend_per_day"]] = np.clip(slope / sd, -_Z_CLIP, _Z_CLIP)
            out[i, col["hours_since_last"]] = (
                raw[col["hours_since_last"]] / self.config.window_hours
            )
            out[i, col["abnormal"]] = raw[col["abnormal"]]
            out[i, col["count"]] = math.log1p(raw[col["count"]])
        return out

    def encode(self, labs: pd.DataFrame, at: pd.Timestamp | None = None) -> ModalityEncoding:
        feats = self.features(labs, at)
        return ModalityEncoding(
            modality="labs",
            tokens=self.scale(feats),
            spans=list(self.config.names),
            model_id=self.model_id,
            input_hashes=[frame_hash(labs, at)],
        )

    # --- fitting ----------------------------------------------------------------------------

    def fit(self, frames: Iterable[pd.DataFrame]) -> LabEncoder:
        """Learn per-lab median and robust spread (IQR / 1.349) from every value in ``frames``.

        A lab with fewer than 5 values or no spread keeps its reference-range default. The
        model id changes with the statistics, so cached tokens of an older fit are not reused.
        """
        pooled: dict[str, list[np.ndarray]] = {n: [] for n in self.config.names}
        for frame in frames:
            _check_frame(frame)
            numeric = pd.to_numeric(frame["value"], errors="coerce")
            for name, vals in numeric.groupby(frame["name"]):
                if name in pooled:
                    pooled[str(name)].append(vals.dropna().to_numpy(float))
        stats = dict(self.config.stats)
        for name, chunks in pooled.items():
            pooled_values = np.concatenate(chunks) if chunks else np.empty(0)
            if len(pooled_values) < 5:
                continue
            axis = _axis(BY_NAME[name], name in self.config.log_labs, pooled_values)
            q1, median, q3 = np.percentile(axis, [25, 50, 75])
            spread = (q3 - q1) / 1.349
            if spread > 1e-9:
                stats[name] = (float(median), float(spread))
        self.config.stats = stats
        self.config.fitted = True
        return self


def frame_hash(labs: pd.DataFrame, at: pd.Timestamp | None = None) -> str:
    """Content hash of a lab frame, independent of row order; ``at`` joins it when given,
    since the tokens depend on the window's end."""
    cols = [c for c in LAB_COLUMNS if c in labs.columns]
    table = labs[cols].copy()
    if "time" in table:
        table["time"] = pd.to_datetime(table["time"], utc=True).map(
            lambda t: t.isoformat() if pd.notna(t) else None
        )
    records = sorted(
        json.dumps(r, sort_keys=True, default=str) for r in table.astype(object).to_dict("records")
    )
    suffix = f"|at={at.isoformat()}" if at is not None else ""
    return content_hash("\n".join(records) + suffix)
