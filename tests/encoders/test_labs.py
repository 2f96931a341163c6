"""Lab parsing (FHIR R4 Observation -> frame) and the lab encoder's features and tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mmcds.encoders.catalogue import BY_NAME, LABS, to_canonical
from mmcds.encoders.labs import (
    FEATURE_NAMES,
    LabEncoder,
    LabFeatureConfig,
    frame_hash,
    observations_to_frame,
)
from mmcds.records import LAB_COLUMNS

UCUM = "http://unitsofmeasure.org"
T0 = pd.Timestamp("2024-03-01T08:00:00Z")


def obs(
    oid: str,
    loinc: str,
    value: float | None,
    unit: str | None,
    when: pd.Timestamp | str = T0,
    *,
    status: str = "final",
    ref: tuple[float | None, float | None] | None = None,
    interp: str | None = None,
    ucum: bool = True,
) -> dict[str, Any]:
    """A FHIR R4 Observation as an EHR sends it (UCUM code when `ucum`, else a unit string)."""
    qty: dict[str, Any] = {"value": value}
    if unit is not None:
        qty.update({"unit": unit, "system": UCUM, "code": unit} if ucum else {"unit": unit})
    o: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "effectiveDateTime": when if isinstance(when, str) else when.isoformat(),
        "valueQuantity": qty,
    }
    if ref is not None:
        rr = {}
        for key, v in zip(("low", "high"), ref, strict=True):
            if v is not None:
                rr[key] = {"value": v, "unit": unit, "system": UCUM, "code": unit}
        o["referenceRange"] = [rr]
    if interp:
        o["interpretation"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": interp,
                    }
                ]
            }
        ]
    return o


def spec_examples(shared_data: Path) -> list[dict[str, Any]]:
    files = sorted((shared_data / "fhir-r4-examples").glob("observation-*.json"))
    assert len(files) >= 7, files
    return [json.loads(f.read_text()) for f in files]


# --- parsing: real FHIR examples -----------------------------------------------------------


def test_fhir_spec_examples_parse(shared_data: Path) -> None:
    frame, missing = observations_to_frame(spec_examples(shared_data))
    assert list(frame.columns) == LAB_COLUMNS
    by_ref = {r: g for r, g in frame.groupby("reference")}

    glucose = by_ref["Observation/f001"].iloc[0]  # not in the catalogue: kept, unconverted
    assert glucose["loinc"] == "15074-8" and glucose["name"] is None
    assert glucose["value"] == 6.3 and glucose["unit"] == "mmol/L"
    assert (glucose["ref_low"], glucose["ref_high"]) == (3.1, 6.2)
    assert glucose["interpretation"] == "H"
    # effectivePeriod.start at +01:00, in UTC
    assert glucose["time"] == pd.Timestamp("2013-04-02T08:30:10Z")

    hb = by_ref["Observation/f005"].iloc[0]
    assert (hb["loinc"], hb["value"], hb["unit"], hb["interpretation"]) == (
        "718-7",
        7.2,
        "g/dL",
        "L",
    )

    spo2 = by_ref["Observation/satO2"]  # coded twice (2708-6, 59408-5): one row, not two
    assert len(spo2) == 1 and spo2.iloc[0]["name"] == "spo2" and spo2.iloc[0]["value"] == 95

    egfr = by_ref["Observation/f205"]  # panel: one row per component, ">60" keeps its bound
    assert sorted(egfr["loinc"]) == ["48642-3", "48643-1"] and set(egfr["value"]) == {60.0}

    # entered-in-error temperature, blood-group and vitals panels (hasMember only): no rows
    assert not any("f202" in r or "vitals" in r or "bgpanel" in r for r in by_ref)
    # creatinine coded only with a local code: reported, not silently dropped
    assert [m.reference for m in missing] == ["Observation/f204"]
    assert "without a LOINC" in missing[0].reason and "intranet.aumc.nl" in missing[0].reason
    assert frame["time"].dt.tz is not None


def synthea_observations(shared_data: Path) -> list[dict[str, Any]]:
    files = sorted((shared_data / "synthea-r4").glob("*.json"))
    assert files, "no Synthea bundles"
    out = []
    for f in files:
        bundle = json.loads(f.read_text())
        out += [
            e["resource"]
            for e in bundle["entry"]
            if e.get("resource", {}).get("resourceType") == "Observation"
        ]
    return out


def test_synthea_bundles_parse(shared_data: Path) -> None:
    observations = synthea_observations(shared_data)
    frame, missing = observations_to_frame(observations)
    numeric = sum(
        ("valueQuantity" in o) + sum("valueQuantity" in c for c in o.get("component", []))
        for o in observations
    )
    assert len(frame) == numeric and not missing
    bp = frame[frame["loinc"].isin(["8480-6", "8462-4"])]  # blood pressure components
    assert len(bp) == 2 * sum(o["code"]["coding"][0]["code"] == "55284-4" for o in observations)
    assert set(bp["unit"]) == {"mm[Hg]"} and bp["value"].between(40, 250).all()
    temps = frame[frame["name"] == "temperature"]  # Synthea codes oral temperature, 8331-1
    assert len(temps) and set(temps["unit"]) == {"Cel"} and temps["value"].between(35, 42).all()
    wbc = frame[frame["name"] == "wbc"]
    assert len(wbc) and set(wbc["unit"]) == {"10*3/uL"}
    assert frame["time"].is_monotonic_increasing and frame["time"].notna().all()


# --- parsing: units ------------------------------------------------------------------------


def test_wbc_units_agree() -> None:
    frame, missing = observations_to_frame(
        [
            obs("a", "6690-2", 7.5, "10*3/uL"),
            obs("b", "6690-2", 7.5, "10*9/L"),
            obs("c", "6690-2", 7500, "/uL"),
            obs("d", "6690-2", 7.5, "10^9/L", ucum=False),  # a unit string, no UCUM code
            obs("e", "26464-8", 7.5, "K/uL", ucum=False),  # alias LOINC, lab-system spelling
        ]
    )
    assert not missing
    assert set(frame["name"]) == {"wbc"} and set(frame["unit"]) == {"10*3/uL"}
    np.testing.assert_allclose(frame["value"], 7.5)
    refs = frame["reference"].str.removeprefix("Observation/")
    sent = dict(zip(refs, frame["source_unit"], strict=True))
    assert sent == {"a": "10*3/uL", "b": "10*9/L", "c": "/uL", "d": "10*9/L", "e": "10*3/uL"}


def test_crp_mg_dl_is_ten_mg_l_with_range() -> None:
    frame, _ = observations_to_frame([obs("c", "1988-5", 1.2, "mg/dL", ref=(None, 0.5))])
    row = frame.iloc[0]
    assert row["value"] == pytest.approx(12.0) and row["unit"] == "mg/L"
    assert (row["source_value"], row["source_unit"]) == (1.2, "mg/dL")
    assert row["ref_high"] == pytest.approx(5.0) and np.isnan(row["ref_low"])


def test_fahrenheit_to_celsius() -> None:
    frame, _ = observations_to_frame(
        [obs("t1", "8310-5", 98.6, "[degF]"), obs("t2", "8310-5", 102.2, "degF", ucum=False)]
    )
    np.testing.assert_allclose(frame["value"], [37.0, 39.0])
    assert set(frame["unit"]) == {"Cel"}
    assert to_canonical(BY_NAME["temperature"], 212.0, "[degF]") == pytest.approx(100.0)
    # no NaN placeholders left in the catalogue
    assert all(np.isfinite(f) for s in LABS for f in s.conversions.values())


def test_synthetic_site_units_round_trip() -> None:
    """Every unit the synthetic sites send converts back to the canonical value."""
    from mmcds.synth.labs import to_site_unit
    from mmcds.synth.sites import SITES

    pairs = {(name, unit) for site in SITES.values() for name, unit in site.units.items()}
    assert pairs
    for name, unit in pairs:
        spec = BY_NAME[name]
        canonical = (spec.ref_high or 1.0) * 0.8
        sent = to_site_unit(spec, canonical, unit)
        assert to_canonical(spec, sent, unit) == pytest.approx(canonical), (name, unit)


def test_unknown_unit_is_missing_not_mixed() -> None:
    frame, missing = observations_to_frame(
        [obs("ok", "6690-2", 8.0, "10*3/uL"), obs("bad", "6690-2", 8000.0, "g/L")]
    )
    assert list(frame["reference"]) == ["Observation/ok"]
    (m,) = missing
    assert m.modality == "labs" and m.reference == "Observation/bad"
    assert m.reason.startswith("unknown unit 'g/L' for wbc (LOINC 6690-2)")
    # and a catalogue lab sent with no unit at all is just as unusable
    _, missing = observations_to_frame([obs("nounit", "1988-5", 3.0, None)])
    assert "unknown unit None for crp" in missing[0].reason


# --- parsing: what is skipped, and why -----------------------------------------------------


def test_malformed_and_non_numeric_never_raise() -> None:
    absent = obs("abs", "1988-5", None, "mg/L")
    del absent["valueQuantity"]
    absent["dataAbsentReason"] = {"coding": [{"code": "not-performed"}]}
    text_value = obs("txt", "94500-6", None, None)  # non-catalogue, coded/text result
    del text_value["valueQuantity"]
    text_value["valueString"] = "Detected"
    no_time = obs("notime", "6690-2", 7.0, "10*3/uL")
    del no_time["effectiveDateTime"]
    inputs = [
        "not an observation",
        None,
        obs("when", "6690-2", 7.0, "10*3/uL", when="yesterday"),
        obs("us-date", "6690-2", 7.0, "10*3/uL", when="03/01/2024"),  # not FHIR, ambiguous
        no_time,
        obs("str", "6690-2", "7.0", "10*3/uL"),  # type: ignore[arg-type]
        obs("cancel", "33959-8", 0.2, "ng/mL", status="cancelled"),
        obs("cancel-other", "2345-7", 5.0, "mmol/L", status="cancelled"),
        obs("eie", "6690-2", 99.0, "10*3/uL", status="entered-in-error"),
        absent,
        text_value,
        {"resourceType": "Patient", "id": "p"},
        obs("good", "6690-2", 7.0, "10*3/uL", when="2024-03-01T09:00:00"),  # no offset: as UTC
        obs("day", "1988-5", 4.0, "mg/L", when="2024-03-02"),  # a date: midnight UTC
    ]
    frame, missing = observations_to_frame(inputs)
    assert list(frame["reference"]) == ["Observation/good", "Observation/day"]
    assert list(frame["time"]) == [
        pd.Timestamp("2024-03-01T09:00Z"),
        pd.Timestamp("2024-03-02T00:00Z"),
    ]
    reasons = {m.reference: m.reason for m in missing}
    assert "not a JSON object" in missing[0].reason and missing[0].reference is None
    assert "not a FHIR dateTime: 'yesterday'" in reasons["Observation/when"]
    assert "no effectiveDateTime" in reasons["Observation/notime"]
    assert "not a finite number" in reasons["Observation/str"]
    assert "'cancelled'" in reasons["Observation/cancel"]
    assert "not-performed" in reasons["Observation/abs"]
    assert "Patient" in reasons["Observation/p"]
    # silent: a retracted value, a cancelled lab nobody encodes, a non-catalogue text result
    for silent in ("eie", "cancel-other", "txt"):
        assert f"Observation/{silent}" not in reasons
    assert "not a FHIR dateTime" in reasons["Observation/us-date"]
    assert len(missing) == 9


def test_corrected_version_replaces_original() -> None:
    first = obs("x", "6690-2", 70.0, "10*3/uL", status="preliminary")
    fixed = obs("x", "6690-2", 7.0, "10*3/uL", status="corrected")
    frame, _ = observations_to_frame([first, fixed])
    assert list(frame["value"]) == [7.0]


# --- features ------------------------------------------------------------------------------


def series_frame() -> pd.DataFrame:
    h = pd.Timedelta(hours=1)
    frame, missing = observations_to_frame(
        [
            obs("old", "6690-2", 30.0, "10*3/uL", T0 - 100 * h),  # before the 72 h window
            obs("w1", "6690-2", 8.0, "10*3/uL", T0),
            obs("w2", "6690-2", 11.0, "10*3/uL", T0 + 12 * h),
            obs("w3", "6690-2", 14.0, "10*3/uL", T0 + 24 * h, ref=(4.0, 11.0), interp="H"),
            obs("future", "6690-2", 50.0, "10*3/uL", T0 + 40 * h),  # after `at`
            obs("crp", "1988-5", 2.0, "mg/dL", T0 + 6 * h),
            obs("t", "8310-5", 98.6, "[degF]", T0 + 29 * h),
        ]
    )
    assert not missing
    return frame


def test_features_known_answers() -> None:
    at = T0 + pd.Timedelta(hours=30)
    feats = LabEncoder().features(series_frame(), at=at)
    assert feats.matrix.shape == (len(LABS), len(FEATURE_NAMES))
    wbc = feats.row("wbc")
    assert (wbc["latest"], wbc["min"], wbc["max"]) == (14.0, 8.0, 14.0)
    assert wbc["trend_per_day"] == pytest.approx(6.0)  # +3 per 12 h, exactly linear
    assert wbc["hours_since_last"] == pytest.approx(6.0)
    assert (wbc["abnormal"], wbc["count"], wbc["missing"]) == (1.0, 3.0, 0.0)
    crp = feats.row("crp")  # one value: no trend; 20 mg/L is above the catalogue's 5
    assert (crp["latest"], crp["trend_per_day"], crp["abnormal"], crp["count"]) == (
        20.0,
        0.0,
        1.0,
        1.0,
    )
    temp = feats.row("temperature")
    assert temp["latest"] == pytest.approx(37.0) and temp["abnormal"] == 0.0
    proc = feats.row("procalcitonin")
    assert proc["missing"] == 1.0 and proc["count"] == 0.0 and np.isnan(proc["latest"])
    latest = feats.latest["wbc"]
    assert latest is not None and latest.reference == "Observation/w3"
    assert (latest.value, latest.unit, latest.ref_high, latest.interpretation) == (
        14.0,
        "10*3/uL",
        11.0,
        "H",
    )
    assert feats.latest["procalcitonin"] is None

    # a shorter window drops the first two WBC values; the default `at` is the latest time
    short = LabEncoder(LabFeatureConfig(window_hours=10)).features(series_frame(), at=at)
    assert short.row("wbc")["count"] == 1.0 and short.row("wbc")["min"] == 14.0
    default = LabEncoder().features(series_frame())
    assert default.at == T0 + pd.Timedelta(hours=40) and default.row("wbc")["latest"] == 50.0


def test_encode_tokens_mask_and_hash() -> None:
    enc = LabEncoder()
    frame = series_frame()
    at = T0 + pd.Timedelta(hours=30)
    out = enc.encode(frame, at=at)
    n, f = len(LABS), len(FEATURE_NAMES)
    assert out.modality == "labs" and out.tokens.shape == (n, enc.token_dim) == (n, f + n)
    assert out.tokens.dtype == np.float32 and np.isfinite(out.tokens).all()
    assert out.spans == [s.name for s in LABS]
    assert out.model_id.startswith("labs-features-v1:")
    np.testing.assert_array_equal(out.tokens[:, f:], np.eye(n))  # which lab each token is
    i_proc, i_missing = out.spans.index("procalcitonin"), FEATURE_NAMES.index("missing")
    assert out.tokens[i_proc, i_missing] == 1.0 and not out.tokens[i_proc, : f - 1].any()
    i_wbc = out.spans.index("wbc")
    assert out.tokens[i_wbc, i_missing] == 0.0 and out.tokens[i_wbc, 0] > 0  # 14 > mid-range
    # the hash is of content, not row order; it changes with a value and with `at`
    shuffled = frame.sample(frac=1.0, random_state=1)
    assert frame_hash(shuffled) == frame_hash(frame)
    assert enc.encode(shuffled, at=at).input_hashes == out.input_hashes
    changed = frame.copy()
    changed["value"] = changed["value"] + np.eye(len(changed))[0]
    assert frame_hash(changed) != frame_hash(frame)
    assert enc.encode(frame).input_hashes != out.input_hashes
    # no labs at all: every token is "missing"
    empty, _ = observations_to_frame([])
    none = enc.encode(empty)
    assert (none.tokens[:, i_missing] == 1).all() and not none.tokens[:, : f - 1].any()


def test_fit_learns_robust_scale_and_changes_model_id() -> None:
    rng = np.random.default_rng(0)
    frames = []
    for k in range(20):
        values = rng.normal(9.0, 2.0, size=5)
        frames.append(
            observations_to_frame(
                [
                    obs(f"{k}-{j}", "6690-2", float(v), "10*3/uL", T0 + pd.Timedelta(hours=j))
                    for j, v in enumerate(values)
                ]
                + [obs(f"{k}-crp", "1988-5", float(rng.lognormal(2, 1)), "mg/L")]
            )[0]
        )
    enc = LabEncoder()
    before = enc.model_id
    enc.fit(frames)
    assert enc.config.fitted and enc.model_id != before
    wbc = np.concatenate([f.loc[f["name"] == "wbc", "value"].to_numpy() for f in frames])
    q1, med, q3 = np.percentile(wbc, [25, 50, 75])
    centre, scale = enc.config.stats["wbc"]
    assert centre == pytest.approx(med) and scale == pytest.approx((q3 - q1) / 1.349)
    assert 1.0 < scale < 3.0
    crp_centre, _ = enc.config.stats["crp"]  # log axis: centre near log(e^2)
    assert crp_centre == pytest.approx(2.0, abs=0.5)
    assert enc.config.stats["lactate"] == LabFeatureConfig().stats["lactate"]  # no data: default
    tokens = enc.encode(frames[0]).tokens
    latest = frames[0].loc[frames[0]["name"] == "wbc", "value"].iloc[-1]
    assert tokens[0, 0] == pytest.approx((latest - med) / scale, rel=1e-5)


def test_save_from_pretrained_round_trip(tmp_path: Path) -> None:
    enc = LabEncoder(LabFeatureConfig(window_hours=48, names=("wbc", "crp", "spo2")))
    enc.fit([series_frame()])
    enc.save_pretrained(tmp_path)
    loaded = LabEncoder.from_pretrained(tmp_path)
    assert loaded.config == enc.config and loaded.model_id == enc.model_id
    frame = series_frame()
    np.testing.assert_array_equal(loaded.encode(frame).tokens, enc.encode(frame).tokens)
    assert loaded.encode(frame).tokens.shape == (3, len(FEATURE_NAMES) + 3)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        LabEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not in the catalogue"):
        LabFeatureConfig(names=("wbc", "glucose"))
