"""Note text that must never be quoted as evidence: it says nothing about the patient.

Deleting a template line still moves a mean-pooled embedding, so the attribution can rank it
high; a clinician shown "LABS: reviewed." or an attestation as the reason for an alert loses
trust in the rest. Filtered here: section headers and title lines (``sections.is_label``),
headers followed only by a template word ("LABS: reviewed.", "ALLERGIES: NKDA", "FAMILY HISTORY:
Non-contributory."), continuing home medicines for unnamed chronic problems, dispositions that
only say where the patient stays ("Dispo: continue inpatient care."), anything in the
allergies or attestation sections, attestation and dictation sentences ("I have personally seen
and examined the patient..."), and copy-forward markers. The lists are short on purpose: a
clinical sentence must never be hidden by them.
"""

from __future__ import annotations

import re

from mmcds.encoders.sections import is_label

# Sections whose every line is administrative for these findings.
_SECTIONS = {"allergies", "attestation"}

# What may follow a header for the line to be an empty template.
_TEMPLATE_WORDS = (
    "reviewed",
    "labs reviewed",
    "see above",
    "as above",
    "see below",
    "see hpi",
    "per hpi",
    "none",
    "none known",
    "n/a",
    "na",
    "deferred",
    "pending",
    "noncontributory",
    "non-contributory",
    "nkda",
    "nka",
    "no known allergies",
    "no known drug allergies",
    "unchanged",
    "unchanged from prior",
    "reviewed and unchanged",
    "not applicable",
    "not obtained",
)
_HEADER = r"(?:[A-Za-z][A-Za-z /&-]{0,40}:\s*)?"
_TEMPLATE_RE = re.compile(
    rf"{_HEADER}(?:{'|'.join(re.escape(w) for w in _TEMPLATE_WORDS)})[.;!]?", re.IGNORECASE
)
# A plan item that only carries the usual medicines of unnamed chronic problems on ("# Chronic
# conditions: cont home meds"); under a problem's own header ("# Heart failure: ...") it is
# kept, since the header itself says something about the patient.
_HOME_MEDS_RE = re.compile(
    r"(?:[#*•-]+\s*)?(?:(?:chronic (?:conditions|problems|medical problems)|other)\s*:\s*)?"
    r"(?:continue|cont\.?|c/w|will continue|plan to continue|resume) "
    r"home (?:meds|medications)[.;!]?",
    re.IGNORECASE,
)
# A disposition that only says where the patient stays or goes ("Dispo: continue inpatient
# care.", quoted as evidence against pneumonia on a demo card): logistics, not findings.
_DISPOSITION_RE = re.compile(
    r"(?:dispo|disposition)\s*:\s*(?:continue (?:inpatient|current) care|remains? inpatient|"
    r"inpatient|floor|home|discharge(?:d)? home|pending|tbd)[.;!]?",
    re.IGNORECASE,
)
# Allergy lines ("ALLERGIES: PCN (rash)", "Allergies: NKDA"): never evidence for these findings.
_ALLERGY_RE = re.compile(r"\s*(?:allergies|allergy|nkda|nka)\b", re.IGNORECASE)

# Attestation, dictation and documentation-process sentences, anywhere in a note.
_ATTESTATION_RE = re.compile(
    r"|".join(
        (
            r"\bI (?:have )?personally\b",
            r"\bI (?:have )?(?:seen|examined) (?:and examined )?the patient\b",
            r"\battest",
            r"\belectronically signed\b",
            r"\bdictated (?:by|but not read)\b",
            r"\bvoice recognition\b",
            r"\btranscription errors?\b",
            r"\bcontact the author\b",
            r"\bverbali[sz]ed understanding\b",
            r"\breturn precautions\b",
            r"\bcritical care time\b",
            r"\bagree with the (?:resident|fellow|findings|assessment)\b",
            r"\ball other systems (?:were )?reviewed\b",
            r"\bdata reviewed\b",
            r"\bnotes? reviewed\b",
            r"^-{2,}.*(?:copied|end of).*-{2,}$",
            r"^\(?copied forward from prior note\)?$",
        )
    ),
    re.IGNORECASE,
)


def is_boilerplate(text: str, *, section: str | None = None, first_line: bool = False) -> bool:
    """True for a sentence that must never be quoted as evidence (see the module docstring)."""
    line = " ".join(text.split())
    if not line or is_label(text, first_line=first_line):
        return True
    if section in _SECTIONS:
        return True
    if any(r.fullmatch(line) for r in (_TEMPLATE_RE, _HOME_MEDS_RE, _DISPOSITION_RE)):
        return True
    if _ALLERGY_RE.match(line):
        return True
    return bool(_ATTESTATION_RE.search(line))
