"""The diagnosis-support summary, built from templates (no generative model: every sentence can
be traced to a number in the analysis or the explanation).

Three renderings of the same content: a line under 140 characters for the card's ``summary``,
Markdown for the card's ``detail`` and HTML for the DiagnosticReport's ``presentedForm``. Each
always says it is preliminary, what was missing and what the model cannot do.

Probability words are tied to the calibrated operating points, not to fixed cut-offs: "high
probability" at or above the high-specificity (critical) threshold; "possible" between the
warning and the critical threshold (the warning point is set for high sensitivity, so a flagged
finding can still have a low probability: "moderate" would overstate it); "low probability"
below the warning threshold. Operating points differ per finding (a rare finding's
high-specificity point can sit at 15%), so on one card the words are also made monotone in the
probability: a finding is never called "high probability" beside a likelier one called
"possible"; its critical alert is then said in words instead ("critical alert: above its
high-specificity point").

Evidence says which way it points ("supports" / "argues against", from the sign of its
attribution) and what a quoted sentence asserts ("(negated)", "(uncertain)", "(historical)",
"(family)"); labs say their value in clinical units, whether it is high, low or normal, and
which way it moved the probability, in percentage points ("pp", defined on the card;
``mmcds.explain.wording``). Upstream failures are one plain line, never a server's answer.

Findings that may not be acted on (not validated, insufficient inputs, or inputs outside what
the model was validated on) are never flagged; the summary lists them with the reason.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mmcds.explain.wording import PP_DEFINITION, evidence_phrase, lab_phrase, plain_reason, pp
from mmcds.findings import display
from mmcds.records import (
    Analysis,
    EvidenceSpan,
    Explanation,
    FindingScore,
    ImageSaliency,
    Level,
)

LINE_LIMIT = 140
MODALITY_WORDS = {"image": "imaging", "text": "notes", "labs": "labs"}
LIMITS = (
    "Decision support only: preliminary until a clinician reviews it. Trained on a synthetic "
    "cohort; performance at a new site must be checked locally. Heatmaps and evidence show what "
    "moved the model's score, not proof of disease; absence of a flag does not rule a finding out."
)
UNTRAINED = "UNTRAINED model: its scores are random and carry no clinical meaning."


_RANK = {Level.info: 0, Level.warning: 1, Level.critical: 2}
_WORDS = ("low probability", "possible", "high probability")


def probability_words(score: FindingScore) -> str:
    """The operating-point word of one score on its own (``card_words`` for a whole card)."""
    return _WORDS[_RANK[score.level]]


def card_words(scores: Sequence[FindingScore]) -> dict[str, str]:
    """The probability phrase of each score on one card: the operating-point word, lowered where
    needed so that the words never decrease as the probability rises (``probability_words``)."""
    out: dict[str, str] = {}
    cap = 2
    for f in sorted(scores, key=lambda f: -f.probability):
        rank = min(_RANK[f.level], cap)
        cap = rank
        words = _WORDS[rank]
        if rank < _RANK[f.level]:
            point = _percent(f.critical_threshold)
            words += f" (critical alert: above its high-specificity point {point})"
        out[f.finding] = words
    return out


def _word(score: FindingScore, words: dict[str, str]) -> str:
    return words[score.finding].split()[0]


def _percent(p: float) -> str:
    return "<1%" if p < 0.01 else f"{p * 100:.0f}%"


@dataclass(frozen=True)
class Evidence:
    """The top evidence for one finding, one short phrase per modality."""

    image: str | None
    text: str | None
    labs: str | None
    weights: str | None

    def rows(self) -> list[tuple[str, str]]:
        """(label, phrase) for the modalities that have evidence, in reading order."""
        rows = (
            ("Image", self.image),
            ("Notes", self.text),
            ("Labs", self.labs),
            ("Contribution by input", self.weights),
        )
        return [(label, value) for label, value in rows if value]


def _quote(text: str, limit: int = 90) -> str:
    flat = " ".join(text.split())
    return f"“{flat if len(flat) <= limit else flat[: limit - 1] + '…'}”"


def _text_phrase(spans: Sequence[EvidenceSpan]) -> str | None:
    """The strongest supporting sentence and the strongest one against, each with its status."""
    picks = [
        next((e for e in spans if e.direction == way), None)
        for way in ("supports", "argues_against")
    ]
    return "; ".join(evidence_phrase(e, _quote(e.text)) for e in picks if e) or None


def _peak_in_top_box(inner: ImageSaliency, outer: ImageSaliency) -> bool:
    """Whether ``inner``'s heatmap maximum lies inside ``outer``'s top box."""
    if not outer.boxes or inner.heatmap.size == 0:
        return False
    y, x = inner.peak()  # original pixels, as the boxes are
    x0, y0, x1, y1, _ = outer.boxes[0]
    return x0 <= x < x1 and y0 <= y < y1


def shared_region(
    explanation: Explanation, best: ImageSaliency, others: Sequence[str]
) -> list[str]:
    """Which of ``others`` (findings) point at the same image region as ``best``: their map of
    the same image, by the same method, peaks inside ``best``'s top box and ``best`` peaks inside
    theirs. On the synthetic cohort, with a CNN trained on labels only (no lesion masks to
    localise with), most heart failure maps that missed the heart peaked in the patient's
    effusion (``docs/results/explain.md``): the CNN read the effusion as evidence of heart
    failure. Saying so lets the clinician see that one image sign carries both findings."""
    out = []
    for s in explanation.images:
        if (
            s.finding in others
            and s.finding != best.finding
            and s.sop_uid == best.sop_uid
            and s.method == best.method
            and _peak_in_top_box(s, best)
            and _peak_in_top_box(best, s)
        ):
            out.append(s.finding)
    return out


def evidence_for(
    explanation: Explanation, finding: str, also_flagged: Sequence[str] = ()
) -> Evidence:
    """One phrase per modality for ``finding``. ``also_flagged``: the findings shown with it; the
    image phrase names those whose map points at the same region (``shared_region``)."""
    heat = [s for s in explanation.images if s.finding == finding and s.boxes]
    image = None
    if heat:
        best = max(heat, key=lambda s: s.boxes[0][4] if s.method.endswith("cnn") else -1.0)
        x0, y0, x1, y1, _ = best.boxes[0]
        h, w = best.original_shape
        vertical = (
            "upper" if (y0 + y1) / 2 < h / 3 else "lower" if (y0 + y1) / 2 > 2 * h / 3 else "mid"
        )
        # image left is the patient's right on a frontal (PA/AP) film
        side = "right" if (x0 + x1) / 2 < w / 2 else "left"
        image = f"{vertical} {side} hemithorax region (box {x0},{y0}–{x1},{y1})"
        shared = shared_region(explanation, best, also_flagged)
        if shared:
            names = " and ".join(display(f).lower() for f in shared)
            image += f", the same region as the {names} evidence"
    text = _text_phrase([e for e in explanation.evidence if e.finding == finding])
    # the labs that moved it most, either way: a normal value that lowers it is evidence too
    labs = sorted(
        (c for c in explanation.labs if c.finding == finding and abs(c.contribution) >= 0.005),
        key=lambda c: -abs(c.contribution),
    )
    lab = "; ".join(lab_phrase(c) for c in labs[:2]) or None
    shap = next((m for m in explanation.modalities if m.finding == finding), None)
    weights = None
    if shap is not None:
        weights = ", ".join(
            f"{MODALITY_WORDS[m]} {pp(v)}"
            for m, v in sorted(shap.values.items(), key=lambda kv: -abs(kv[1]))
        )
    return Evidence(image, text, lab, weights)


def _flagged(analysis: Analysis) -> list[FindingScore]:
    a = analysis.assessment
    if not a.trained:
        return []
    return sorted((f for f in a.findings if f.level != Level.info), key=lambda f: -f.probability)


def _not_assessed(analysis: Analysis) -> list[FindingScore]:
    return [f for f in analysis.assessment.findings if not f.assessed]


def _held_short(held: Sequence[FindingScore]) -> str:
    """Why every finding was held back, in a few words for the summary line."""
    statuses = {f.status for f in held}
    if "abstained" in statuses:
        return "inputs outside what the model was validated on"
    if "insufficient_inputs" in statuses:
        return "insufficient inputs"
    return "findings not validated"


def _held_lines(analysis: Analysis) -> list[str]:
    """One line per distinct reason: which findings were not assessed, and why."""
    by_reason: dict[str, list[str]] = {}
    for f in _not_assessed(analysis):
        by_reason.setdefault(f.reason or f.status, []).append(display(f.finding))
    return [f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()]


def _missing(analysis: Analysis) -> list[str]:
    rec, used = analysis.record, set(analysis.assessment.modalities_used)
    lines = [
        f"no {MODALITY_WORDS[m]} available"
        for m in ("image", "text", "labs")
        if m not in used and m not in analysis.assessment.unused_modalities
    ]
    grouped = Counter((m.modality, plain_reason(m)) for m in rec.missing)
    lines += [
        f"{MODALITY_WORDS.get(mod, mod)}: {reason}" + (f" (×{n})" if n > 1 else "")
        for (mod, reason), n in grouped.items()
    ]
    lines += [
        f"{MODALITY_WORDS[m]} not used by this model (it was not trained on them)"
        for m in analysis.assessment.unused_modalities
    ]
    return lines


def summary_line(analysis: Analysis) -> str:
    """Under 140 characters; names the flagged findings in words and numbers."""
    if not analysis.assessment.trained:
        text = "AI summary (UNTRAINED model, no clinical meaning): review inputs manually"
    else:
        flagged = _flagged(analysis)
        words = card_words(flagged)
        held = _not_assessed(analysis)
        if flagged:
            parts = [
                f"{display(f.finding)} {_word(f, words)} ({_percent(f.probability)})"
                for f in flagged[:3]
            ]
            text = "AI (preliminary): " + ", ".join(parts)
        elif held and len(held) == len(analysis.assessment.findings):
            text = f"AI (preliminary): not assessed, {_held_short(held)}"
        else:
            text = "AI (preliminary): no finding above threshold"
        if held and len(held) < len(analysis.assessment.findings):
            text += f"; {len(held)} not assessed"
        if any(m not in analysis.assessment.modalities_used for m in ("image", "text", "labs")):
            text += "; inputs incomplete"
    return text if len(text) < LINE_LIMIT else text[: LINE_LIMIT - 2] + "…"


def _shown(analysis: Analysis, explanation: Explanation) -> list[tuple[FindingScore, Evidence]]:
    """The findings a summary details, each with its evidence: the flagged ones (every finding
    for an untrained model, whose scores mean nothing and so flag nothing)."""
    a = analysis.assessment
    shown = _flagged(analysis) or ([] if a.trained else a.findings)
    names = [f.finding for f in shown]
    return [(f, evidence_for(explanation, f.finding, names)) for f in shown]


def summary_markdown(analysis: Analysis, explanation: Explanation) -> str:
    a = analysis.assessment
    lines = [f"**{UNTRAINED}**", ""] if not a.trained else []
    lines += ["Preliminary AI decision support; the clinician decides.", ""]
    flagged = _flagged(analysis)
    words = card_words(flagged)
    if a.trained and not flagged:
        lines += ["No finding above its alert threshold.", ""]
    detailed = _shown(analysis, explanation)
    for f, ev in detailed:
        shown = words[f.finding] if a.trained else "score"
        lines.append(f"**{display(f.finding)}**: {shown} ({_percent(f.probability)})")
        lines += [f"- {label}: {value}" for label, value in ev.rows()]
        lines.append("")
    if any(ev.labs or ev.weights for _, ev in detailed):
        lines += [f"_{PP_DEFINITION}_", ""]
    held = _held_lines(analysis) if a.trained else []
    if held:
        lines += ["**Not assessed** (never raises an alert):", *[f"- {h}" for h in held], ""]
    others = [f for f in a.findings if f not in flagged and f.assessed] if a.trained else []
    if others:
        lines.append(
            "Below threshold: "
            + ", ".join(f"{display(f.finding)} {_percent(f.probability)}" for f in others)
            + "."
        )
        lines.append("")
    missing = _missing(analysis)
    if missing:
        lines += ["**Not available to the model:**", *[f"- {m}" for m in missing], ""]
    lines.append(f"_Limits:_ {LIMITS}")
    lines.append(f"Model {a.model_id} {a.model_version}, calibration: {a.calibration}.")
    return "\n".join(lines)


def summary_html(analysis: Analysis, explanation: Explanation) -> str:
    a = analysis.assessment
    esc = html.escape
    parts = ["<div><h2>AI diagnosis-support summary (preliminary)</h2>"]
    if not a.trained:
        parts.append(f"<p><strong>{esc(UNTRAINED)}</strong></p>")
    flagged = _flagged(analysis)
    words = card_words(flagged)
    if a.trained and not flagged:
        parts.append("<p>No finding above its alert threshold.</p>")
    detailed = _shown(analysis, explanation)
    for f, ev in detailed:
        shown = words[f.finding] if a.trained else "score"
        parts.append(
            f"<h3>{esc(display(f.finding))}: {esc(shown)} ({esc(_percent(f.probability))})</h3><ul>"
        )
        parts += [f"<li><b>{esc(label)}:</b> {esc(value)}</li>" for label, value in ev.rows()]
        parts.append("</ul>")
    if any(ev.labs or ev.weights for _, ev in detailed):
        parts.append(f"<p><i>{esc(PP_DEFINITION)}</i></p>")
    held = _held_lines(analysis) if a.trained else []
    if held:
        parts.append("<h3>Not assessed (never raises an alert)</h3><ul>")
        parts += [f"<li>{esc(h)}</li>" for h in held]
        parts.append("</ul>")
    missing = _missing(analysis)
    if missing:
        parts.append("<h3>Not available to the model</h3><ul>")
        parts += [f"<li>{esc(m)}</li>" for m in missing]
        parts.append("</ul>")
    parts.append(f"<p><i>Limits:</i> {esc(LIMITS)}</p>")
    parts.append(
        f"<p>Model {esc(a.model_id)} {esc(a.model_version)}, "
        f"calibration: {esc(a.calibration)}.</p></div>"
    )
    return "".join(parts)
