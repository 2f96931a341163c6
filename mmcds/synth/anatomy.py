"""A frontal chest radiograph drawn from shapes: density map plus one mask per finding.

Coordinates are fractions of the image (x to the viewer's right, y down); a PA view shows the
patient's right lung on the viewer's left. Density is in [0, 1], bright = dense. Findings are
drawn with a strength set by the latent visibility, so some are plain and some barely there;
the mask marks where the lesion is whatever its visibility. Heart failure that the radiograph
does not show (``image_visibility`` 0) gets a normal heart, no congestion and no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from mmcds.synth.latent import LOBES, LatentPatient

# chance of a pneumonia look-alike opacity in a patient without pneumonia, and its visibility
LOOKALIKE_BASE = 0.15
LOOKALIKE_RISK = 0.40  # added with COPD, smoking or a malignancy
LOOKALIKE_VISIBILITY = (1.2, 1.8)  # as pneumonia's own (latent.IMAGE_VISIBILITY)

LOBE_CENTRES = {
    "RLL": (0.29, 0.66),
    "LLL": (0.71, 0.68),
    "RML": (0.36, 0.55),
    "RUL": (0.30, 0.30),
    "LUL": (0.69, 0.32),
    "lingula": (0.64, 0.56),
}
OPPOSITE = {
    "RLL": "LLL",
    "LLL": "RLL",
    "RML": "lingula",
    "lingula": "RML",
    "RUL": "LUL",
    "LUL": "RUL",
}


@dataclass
class Drawing:
    density: np.ndarray  # float32 (H, W) in [0, 1]
    masks: dict[str, np.ndarray]  # finding -> bool (H, W), only for findings present
    ctr: float  # cardiothoracic ratio as drawn


@dataclass(frozen=True)
class Hemithorax:
    cx: float
    cy: float
    ax: float  # half-width
    ay: float  # half-height
    dome: float  # height of the diaphragm dome at its peak
    lateral: float  # +1 when the lateral side is to the viewer's right


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> np.ndarray:
    r: np.ndarray = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    return r


def _dome(x: np.ndarray, h: Hemithorax) -> np.ndarray:
    # the diaphragm falls away laterally, which makes the sharp costophrenic angle
    out: np.ndarray = h.dome + 0.16 * ((x - h.cx) / h.ax) ** 2 * (
        1.0 + 0.6 * np.sign((x - h.cx) * h.lateral)
    )
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    out: np.ndarray = n / (n.std() + 1e-6)
    return out


def draw(p: LatentPatient, rng: np.random.Generator) -> Drawing:
    rows, cols = p.site.shape
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    # the site's positioning protocol plus a little patient-to-patient jitter
    zoom = p.site.fov_zoom
    jx, jy = rng.normal(0.0, 0.012, size=2)
    x = (x / cols - 0.5) / zoom + 0.5 - p.site.fov_shift[0] - jx
    y = (y / rows - 0.5) / zoom + 0.5 - p.site.fov_shift[1] - jy
    hab = p.habitus
    # ---- thorax and body
    d = np.full((rows, cols), 0.03, np.float32)
    body = _ellipse(x, y, 0.5, 0.62, 0.49 * hab, 0.62) < 1.0
    d[body] = 0.34
    thorax = _ellipse(x, y, 0.5, 0.5, 0.38 * hab, 0.42) < 1.0
    d[thorax] = 0.50  # mediastinum and chest wall; lungs are cut out below
    sides = {
        "right": Hemithorax(0.5 - 0.185 * hab, 0.49, 0.155 * hab, 0.37, 0.69, -1.0),
        "left": Hemithorax(0.5 + 0.19 * hab, 0.50, 0.15 * hab, 0.37, 0.72, 1.0),
    }
    lung: dict[str, np.ndarray] = {}
    hemi: dict[str, np.ndarray] = {}
    for s, h in sides.items():
        hemi[s] = _ellipse(x, y, h.cx, h.cy, h.ax, h.ay) < 1.0
        lung[s] = hemi[s] & (y < _dome(x, h))
    # ---- heart (enlarged in heart failure; a little in hypertension / CKD as look-alikes)
    ctr = p.ctr_base + 0.02 * (p.comorbid["hypertension"] + p.comorbid["ckd"])
    hf_shows = p.image_visibility["heart_failure"] > 0  # heart failure without a radiographic sign
    if hf_shows:
        ctr += 0.02 + 0.13 * p.image_visibility["heart_failure"]
    thorax_w = 0.76 * hab
    hw = ctr * thorax_w / 2
    heart = _ellipse(x, y, 0.5 + 0.28 * hw, 0.68, hw, 0.08 + 0.1 * ctr) < 1.0
    heart &= y > 0.52
    # ---- lung parenchyma with vessel markings, denser toward the hila
    marks = np.clip(_smooth_noise(rng, (rows, cols), max(rows / 160, 1.0)), 0, None)
    hilar = np.exp(-(((np.abs(x - 0.5) - 0.12) / 0.14) ** 2 + ((y - 0.48) / 0.25) ** 2))
    congestion = 0.0
    if hf_shows:
        congestion = 0.6 * p.image_visibility["heart_failure"]
    texture = (0.025 + 0.035 * hilar * (1 + congestion)) * marks
    lungs = lung["right"] | lung["left"]
    d[lungs] = 0.10 + texture[lungs]
    d[heart] = np.maximum(d[heart], 0.58)
    spine = np.abs(x - 0.5) < 0.03
    d[spine & thorax] += 0.06 * (1 + 0.3 * np.sin(y[spine & thorax] * 2 * np.pi * 14))
    # ---- ribs (posterior arcs) and clavicles
    rib_field = np.zeros_like(d)
    for h in sides.values():
        wall = _ellipse(x, y, h.cx, h.cy, h.ax * 1.15, h.ay * 1.04) < 1.0
        ribs = np.zeros_like(d)
        for k in range(10):
            yk = h.cy - h.ay + 0.05 + 0.068 * k - 0.05 * ((x - h.cx) / h.ax) * h.lateral
            yk = yk + 0.04 * ((x - h.cx) / h.ax) ** 2
            ribs += np.exp(-(((y - yk) / 0.011) ** 2))
        rib_field += ribs * wall
    clav = 0.17 + 0.08 * np.abs(x - 0.5)
    rib_field += 1.4 * np.exp(-(((y - clav) / 0.012) ** 2)) * (np.abs(x - 0.5) < 0.3)
    d += 0.075 * np.clip(rib_field, 0, 1.5) * thorax * np.where(heart, 0.3, 1.0)
    masks: dict[str, np.ndarray] = {}
    # ---- findings
    if hf_shows:  # nothing to point at when the radiograph shows no sign
        masks["heart_failure"] = heart.copy()
    inside = lungs & ~heart
    # Look-alike opacity (atelectasis, old scarring) in patients without pneumonia: the same
    # kind of blob, more often with COPD, smoking or a malignancy. Only the notes and labs (or
    # the lack of infection there) tell it from a consolidation, so pneumonia needs fusion
    # against a learned image model too. Drawn from the image stream only: notes and labs of
    # every patient stay as they were.
    risk = p.comorbid["copd"] or p.comorbid["smoker"] or p.comorbid["malignancy"]
    mimic_p = LOOKALIKE_BASE + LOOKALIKE_RISK * risk
    mimic = not p.findings["pneumonia"] and rng.random() < mimic_p
    if p.findings["pneumonia"] or mimic:
        if p.findings["pneumonia"]:
            vis, sev = p.image_visibility["pneumonia"], p.severity["pneumonia"]
            lobes = [p.lobe] + ([OPPOSITE[p.lobe]] if p.side["pneumonia"] == "bilateral" else [])
        else:
            vis, sev = float(rng.beta(*LOOKALIKE_VISIBILITY)), float(rng.uniform(0.2, 0.8))
            lobes = [LOBES[int(rng.integers(0, len(LOBES)))]]
        blob = np.zeros_like(d)
        for lobe in lobes:
            cx, cy = LOBE_CENTRES[lobe]
            for _ in range(4):
                r = (0.03 + 0.05 * sev) * rng.uniform(0.7, 1.3)
                ox, oy = rng.normal(0, 0.03, size=2)
                blob += np.exp(-_ellipse(x, y, cx + ox, cy + oy, r, r * 1.2))
        blob = np.clip(blob * (1 + 0.4 * _smooth_noise(rng, (rows, cols), rows / 60)), 0, 1)
        if p.findings["pneumonia"]:
            masks["pneumonia"] = (blob > 0.35) & inside
        d[inside] += ((0.02 + 0.22 * vis) * blob)[inside]
    if p.findings["pleural_effusion"]:
        vis = p.image_visibility["pleural_effusion"]
        which = (
            ["right", "left"]
            if p.side["pleural_effusion"] == "bilateral"
            else [p.side["pleural_effusion"]]
        )
        fluid = np.zeros_like(d, dtype=bool)
        for s in which:
            h = sides[s]
            depth = 0.015 + 0.2 * vis  # small ones only blunt the angle
            lat = np.clip((x - h.cx) * h.lateral / h.ax, -1, 1)
            level = h.dome + 0.13 - depth - 0.05 * (1 + lat) * (0.5 + vis)  # meniscus
            fluid |= hemi[s] & (y > level)
        fluid &= ~heart
        masks["pleural_effusion"] = fluid
        soft = gaussian_filter(fluid.astype(np.float32), 1.5)
        d = d * (1 - soft) + 0.5 * soft
    if p.findings["pneumothorax"]:
        vis = p.image_visibility["pneumothorax"]
        h = sides[p.side["pneumothorax"]]
        shrink = 0.06 + 0.3 * vis
        # the lung falls toward the hilum: air collects laterally and at the apex
        collapsed = _ellipse(
            x,
            y,
            h.cx - 0.9 * shrink * h.ax * h.lateral,
            h.cy + 0.7 * shrink * h.ay,
            h.ax * (1 - shrink),
            h.ay * (1 - 0.7 * shrink),
        )
        ptx = lung[p.side["pneumothorax"]] & (collapsed >= 1.0)
        masks["pneumothorax"] = ptx
        d[ptx] = 0.06 + 0.075 * np.clip(rib_field[ptx], 0, 1.5)  # ribs stay, markings go
        line = lung[p.side["pneumothorax"]] & (np.abs(np.sqrt(collapsed) - 1.0) < 0.012)
        d[line] += 0.05 + 0.1 * vis
    return Drawing(np.clip(d, 0, 1).astype(np.float32), masks, float(ctr))
