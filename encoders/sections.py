"""Section headers of clinical notes (``HPI:``, ``IMPRESSION:``, ``A/P:``...) at line starts.

Sections are split before token chunking so a chunk never straddles, say, the history and the
impression, and each chunk can say which section its evidence came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Header as written (lower-case) -> canonical section name.
SECTION_ALIASES: dict[str, str] = {
    "cc": "chief complaint",
    "chief complaint": "chief complaint",
    "reason for visit": "chief complaint",
    "hpi": "history of present illness",
    "history of present illness": "history of present illness",
    "history of the present illness": "history of present illness",
    "interval history": "history of present illness",
    "clinical history": "clinical history",
    "history": "clinical history",
    "indication": "indication",
    "indications": "indication",
    "reason for exam": "indication",
    "pmh": "past medical history",
    "past medical history": "past medical history",
    "psh": "past surgical history",
    "past surgical history": "past surgical history",
    "medications": "medications",
    "meds": "medications",
    "allergies": "allergies",
    "social history": "social history",
    "family history": "family history",
    "ros": "review of systems",
    "review of systems": "review of systems",
    "physical exam": "physical examination",
    "physical examination": "physical examination",
    "exam": "physical examination",
    "vital signs": "vital signs",
    "vitals": "vital signs",
    "labs": "laboratory data",
    "laboratory data": "laboratory data",
    "imaging": "imaging",
    "technique": "technique",
    "comparison": "comparison",
    "findings": "findings",
    "impression": "impression",
    "conclusion": "impression",
    "assessment": "assessment",
    "plan": "plan",
    "assessment and plan": "assessment and plan",
    "assessment & plan": "assessment and plan",
    "assessment/plan": "assessment and plan",
    "a/p": "assessment and plan",
    "a&p": "assessment and plan",
    "hospital course": "hospital course",
    "discharge diagnosis": "discharge diagnosis",
    "discharge diagnoses": "discharge diagnosis",
    "discharge medications": "discharge medications",
    "recommendations": "recommendations",
}

_KNOWN = "|".join(re.escape(a) for a in sorted(SECTION_ALIASES, key=len, reverse=True))
# A known header, at a line start, ending in a colon or alone on its line.
_KNOWN_RE = re.compile(rf"^[ \t]*(?P<name>{_KNOWN})[ \t]*(?::|(?=\r?\n|\Z))", re.I | re.M)
# Any other ALL-CAPS header with a colon, long enough not to be a lab or vital ("WBC:", "HR:").
_CAPS_RE = re.compile(r"^[ \t]*(?P<name>[A-Z][A-Z&/ -]{5,40}[A-Z]):", re.M)


@dataclass(frozen=True)
class Section:
    name: str | None  # canonical name; None for text before the first header
    start: int  # the header's first character (the header belongs to its section)
    end: int


def split_sections(text: str) -> list[Section]:
    """Contiguous sections covering ``text`` exactly, in order."""
    heads: dict[int, str] = {}
    for m in _CAPS_RE.finditer(text):
        heads[m.start("name")] = " ".join(m["name"].lower().split())
    for m in _KNOWN_RE.finditer(text):  # known names win over the generic reading
        heads[m.start("name")] = SECTION_ALIASES[" ".join(m["name"].lower().split())]
    starts = sorted(heads)
    sections: list[Section] = []
    if not starts or starts[0] > 0:
        sections.append(Section(None, 0, starts[0] if starts else len(text)))
    for i, at in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        sections.append(Section(heads[at], at, end))
    return sections


# A line that is only a label: words up to a colon with nothing after it ("PHYSICAL EXAM:").
_LABEL_RE = re.compile(r"[^\n:]{1,60}:")


def is_label(line: str, *, first_line: bool = False) -> bool:
    """True for a line that only labels what follows and says nothing clinical itself: a header
    with nothing after its colon (``"PHYSICAL EXAM:"``), or, as the note's first line, an
    all-capitals title without sentence punctuation (``"PROGRESS NOTE - HOSPITAL DAY 2"``).
    Capitals elsewhere are kept: some systems write whole findings that way."""
    text = line.strip()
    if _LABEL_RE.fullmatch(text):
        return True
    return first_line and text.isupper() and not text.endswith((".", ";", "!", "?"))
