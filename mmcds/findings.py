"""The finding catalogue: which findings a model may learn, their words and their codes.

The catalogue is data (``mmcds/data/findings.json``, shipped with the package), not code: the
14 CheXpert observations plus heart failure. A site adds or overrides entries with a file of
the same shape. Which findings a given model reports is its own business: ``FusionConfig``
stores its findings (names and entries), and loading a model registers its entries here, so
cards and reports word and code exactly what that model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from mmcds.errors import InputRejected

CATALOGUE_FILE = "findings.json"
#: The findings of the synthetic cohort (mmcds.synth) and of the untrained demo model.
SYNTH_FINDINGS: tuple[str, ...] = ("pneumonia", "heart_failure", "pleural_effusion", "pneumothorax")


@dataclass(frozen=True)
class Finding:
    name: str  # stable key used in labels, configs and metrics
    display: str  # words clinicians use
    snomed: str  # SNOMED CT concept for Observation.code / conclusionCode
    checked: bool = True  # False: confirm the code with the site's terminologist first

    def entry(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        return d


class UnknownFinding(InputRejected):
    """A labels column or a model finding that no catalogue defines."""


def _parse(data: Mapping[str, Any], source: str) -> dict[str, Finding]:
    entries = data.get("findings")
    if not isinstance(entries, Mapping):
        raise InputRejected(f"{source}: a finding catalogue is {{'findings': {{name: entry}}}}")
    out = {}
    for name, e in entries.items():
        if not name.isidentifier() or name != name.lower():
            raise InputRejected(f"{source}: finding key {name!r} must be snake_case")
        try:
            out[name] = Finding(name, str(e["display"]), str(e["snomed"]), bool(e.get("checked")))
        except (KeyError, TypeError) as exc:
            raise InputRejected(f"{source}: {name} needs 'display' and 'snomed'") from exc
    return out


def _shipped() -> dict[str, Finding]:
    text = files("mmcds").joinpath("data", CATALOGUE_FILE).read_text(encoding="utf-8")
    return _parse(json.loads(text), f"mmcds/data/{CATALOGUE_FILE}")


_SHIPPED = _shipped()
# Entries registered by loaded models (their own catalogue, e.g. a site's finding).
_REGISTERED: dict[str, Finding] = {}


def load_catalogue(site_file: Path | str | None = None) -> dict[str, Finding]:
    """The shipped catalogue, with a site's file (same shape) adding or overriding entries."""
    out = dict(_SHIPPED)
    if site_file:
        path = Path(site_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputRejected(f"cannot read the finding catalogue {path}: {exc}") from exc
        out.update(_parse(data, str(path)))
    return out


def catalogue_names(site_file: Path | str | None = None) -> str:
    where = f"mmcds/data/{CATALOGUE_FILE}" + (f" + {site_file}" if site_file else "")
    return where


def resolve(names: Iterable[str], site_file: Path | str | None = None) -> list[Finding]:
    """The catalogue entries of ``names``; an unknown name is an error naming the catalogue."""
    cat = load_catalogue(site_file)
    names = list(names)
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise UnknownFinding(
            f"finding(s) {unknown} are not in the finding catalogue "
            f"({catalogue_names(site_file)}); known: {sorted(cat)}. Add them with a site "
            "catalogue file (MMCDS_FINDING_CATALOGUE or mmcds train --catalogue)."
        )
    return [cat[n] for n in names]


def register(entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Make a loaded model's own entries (``FusionConfig.finding_entries``) known to ``finding``."""
    _REGISTERED.update(_parse({"findings": dict(entries)}, "model config"))


def finding(name: str) -> Finding:
    """The entry of a finding a model reports: its registered entry, else the shipped one."""
    hit = _REGISTERED.get(name) or _SHIPPED.get(name)
    if hit is None:
        raise UnknownFinding(f"finding {name!r} is in no catalogue mmcds knows of")
    return hit


def display(name: str) -> str:
    """The words clinicians use for ``name`` (its catalogue entry's display text)."""
    return finding(name).display
