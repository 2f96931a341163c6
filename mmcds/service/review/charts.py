"""Small server-side SVG charts (no JavaScript library, nothing fetched): the modality
contributions of a finding as bars, and a lab's values over the window as a trend line.

Every chart carries its numbers as text too (and a ``<title>``), so it reads without colour and
with a screen reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from markupsafe import Markup

WORDS = {"image": "Imaging", "text": "Notes", "labs": "Labs"}


def contribution_bars(values: dict[str, float], label: str) -> Markup:
    """Horizontal bars in percentage points, positive (raises the probability) to the right."""
    items = sorted(values.items(), key=lambda kv: -abs(kv[1]))
    width, row, mid, half = 460, 30, 250, 150
    scale = half / max([abs(v) for _, v in items] + [0.01])
    parts = [
        f'<svg class="bars" role="img" viewBox="0 0 {width} {row * len(items) + 10}" '
        f'width="{width}" height="{row * len(items) + 10}" aria-label="{escape(label)}">',
        f"<title>{escape(label)}</title>",
        f'<line x1="{mid}" y1="0" x2="{mid}" y2="{row * len(items) + 10}" class="axis"/>',
    ]
    for i, (modality, value) in enumerate(items):
        y = 5 + i * row
        length = abs(value) * scale
        x = mid if value >= 0 else mid - length
        kind = "up" if value >= 0 else "down"
        points = f"{value * 100:+.1f} points"
        name = escape(WORDS.get(modality, modality))
        parts += [
            f'<text x="8" y="{y + 19}" class="label">{name}</text>',
            f'<rect x="{x:.1f}" y="{y + 4}" width="{max(length, 1):.1f}" height="{row - 10}" '
            f'class="bar {kind}"/>',
            f'<text x="{mid + half + 6 if value >= 0 else mid - half - 6}" y="{y + 19}" '
            f'class="value" text-anchor="{"start" if value >= 0 else "end"}">{points}</text>',
        ]
    parts.append("</svg>")
    return Markup("".join(parts))


def trend(
    points: Sequence[tuple[datetime, float]],
    ref_low: float | None,
    ref_high: float | None,
    label: str,
) -> Markup:
    """A sparkline of one lab over the window, with its reference range as a band."""
    if not points:
        return Markup("")
    width, height, pad = 180, 48, 5
    values = [v for _, v in points]
    lo = min(values + [r for r in (ref_low, ref_high) if r is not None])
    hi = max(values + [r for r in (ref_low, ref_high) if r is not None])
    span = (hi - lo) or 1.0
    t0 = points[0][0].timestamp()
    tspan = (points[-1][0].timestamp() - t0) or 1.0

    def y(v: float) -> float:
        return height - pad - (v - lo) / span * (height - 2 * pad)

    def x(t: datetime) -> float:
        return pad + (t.timestamp() - t0) / tspan * (width - 2 * pad)

    parts = [
        f'<svg class="trend" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" aria-label="{escape(label)}"><title>{escape(label)}</title>'
    ]
    if ref_low is not None and ref_high is not None:
        parts.append(
            f'<rect x="0" y="{y(ref_high):.1f}" width="{width}" '
            f'height="{max(y(ref_low) - y(ref_high), 1):.1f}" class="refband"/>'
        )
    if len(points) == 1:
        parts.append(f'<circle cx="{width / 2}" cy="{y(values[0]):.1f}" r="3" class="dot"/>')
    else:
        line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        parts.append(f'<polyline points="{line}" class="line"/>')
        last_t, last_v = points[-1]
        parts.append(f'<circle cx="{x(last_t):.1f}" cy="{y(last_v):.1f}" r="3" class="dot"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
