"""Assertion status of an evidence sentence: affirmed, negated, uncertain, historical or family.

A sentence quoted as evidence must say whether it asserts the finding: "No acute airspace
disease." is about pneumonia, but denies it. The status comes from negspacy's NegEx (Chapman
et al. 2001) on a blank spaCy pipeline (no model download): its clinical termset for negation,
and the same algorithm with ConText-style trigger lists (Harkema et al. 2009) for uncertainty,
history and family history. medspaCy's ConText itself would be the fuller component, but it pins
spaCy < 3.8 and so NumPy < 2, which the rest of mmcds has left behind.

Targets are the clinical concepts of the sentence: the findings' own words where the sentence
names them, else any content word that is not part of a trigger phrase. The sentence is
``affirmed`` when any target is; otherwise the strongest status its targets carry.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import negspacy.negation  # noqa: F401  (registers the "negex" factory with spaCy)
import spacy
from negspacy.termsets import termset
from spacy.lang.en.stop_words import STOP_WORDS
from spacy.language import Language
from spacy.matcher import PhraseMatcher
from spacy.tokens import Doc, Span

from mmcds.records import Assertion

#: Words that name each finding in notes and reports (synonyms and the signs that carry it).
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "pneumonia": (
        "pneumonia",
        "pna",
        "cap",
        "consolidation",
        "consolidations",
        "infiltrate",
        "infiltrates",
        "airspace disease",
        "airspace opacity",
        "airspace opacities",
        "opacity",
        "opacities",
    ),
    "heart_failure": (
        "heart failure",
        "chf",
        "hfref",
        "hfpef",
        "cardiomegaly",
        "pulmonary edema",
        "vascular congestion",
        "pulmonary vascular congestion",
        "edema",
        "jvd",
        "orthopnea",
    ),
    "pleural_effusion": (
        "effusion",
        "effusions",
        "pleural effusion",
        "pleural effusions",
        "blunting",
        "costophrenic angle",
    ),
    "pneumothorax": ("pneumothorax", "ptx", "pleural line", "lung markings"),
}

# negspacy's clinical termset counts "rule out" / "r/o" / "evaluate for" as negation; ConText
# (and clinicians) read them as a question still open, so they move to the uncertainty list.
_OPEN_QUESTION = ["rule out", "r/o", "ro", "evaluate for", "rules out", "rule patient out"]

_UNCERTAIN = {
    "pseudo_negations": ["no change", "not excluded by"],
    "preceding_negations": [
        "possible",
        "possibly",
        "probable",
        "probably",
        "likely",
        "may represent",
        "may be",
        "could represent",
        "could be",
        "cannot exclude",
        "cannot be excluded",
        "cannot rule out",
        "can not rule out",
        "questionable",
        "question of",
        "suspicious for",
        "suspected",
        "suspect",
        "concern for",
        "concerning for",
        "c/w",
        "favor",
        "differential includes",
        "differential diagnosis",
        *_OPEN_QUESTION,
        "?",
    ],
    "following_negations": ["is possible", "cannot be excluded", "not excluded", "suspected", "?"],
    "termination": ["but", "however", "although", "though", "except", "which", "aside from"],
}

_HISTORICAL = {
    "pseudo_negations": ["history of present illness", "history and physical", "no prior"],
    "preceding_negations": [
        "history of",
        "hx of",
        "h/o",
        "s/p",
        "status post",
        "past medical history",
        "pmh",
        "prior",
        "previous",
        "previously",
        "remote",
        "in the past",
        "ago",
        "years ago",
        "treated with",
        "admitted for",
    ],
    "following_negations": ["that resolved", "resolved", "in the past", "ago", "previously"],
    "termination": ["now", "currently", "presents", "today", "but", "however"],
}

_FAMILY = {
    "pseudo_negations": ["family updated", "family at bedside", "family updated at bedside"],
    "preceding_negations": [
        "family history",
        "family hx",
        "fhx",
        "fh",
        "mother",
        "father",
        "sister",
        "brother",
        "son",
        "daughter",
        "aunt",
        "uncle",
        "grandmother",
        "grandfather",
        "parent",
        "parents",
        "sibling",
        "siblings",
    ],
    "following_negations": ["in family", "in the family", "runs in the family"],
    "termination": ["patient", "pt", "he", "she", "but", "however"],
}

_NEGATED = {
    # hedges built on "not" leave the question open: uncertainty, not negation
    "pseudo_negations": [
        *termset("en_clinical").get_patterns()["pseudo_negations"],
        "cannot exclude",
        "cannot be excluded",
        "cannot rule out",
        "can not rule out",
        "not excluded",
    ],
    "preceding_negations": [
        p
        for p in termset("en_clinical").get_patterns()["preceding_negations"]
        if p not in _OPEN_QUESTION
    ]
    + ["doubt", "unlikely", "less likely", "low suspicion for", "do not suspect", "not c/w"],
    "following_negations": [
        *termset("en_clinical").get_patterns()["following_negations"],
        "unlikely",
        "not suspected",
        "was excluded",
    ],
    "termination": [*termset("en_clinical").get_patterns()["termination"]],
}

#: Status -> its trigger lists, strongest first (a target with two statuses takes the first).
_STATUSES: tuple[tuple[Assertion, dict[str, list[str]]], ...] = (
    ("negated", _NEGATED),  # "No family hx of VTE." denies; it does not report a relative's
    ("family", _FAMILY),
    ("uncertain", _UNCERTAIN),
    ("historical", _HISTORICAL),
)


@lru_cache(maxsize=1)
def _nlp() -> tuple[Language, PhraseMatcher, PhraseMatcher]:
    """The pipeline (built once per process, about 0.1 s) and matchers for targets/triggers."""
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    for status, terms in _STATUSES:
        nlp.add_pipe(
            "negex",
            name=f"assert_{status}",
            config={"neg_termset": terms, "extension_name": f"assert_{status}"},
        )
    concepts = PhraseMatcher(nlp.vocab, attr="LOWER")
    for finding, words in FINDING_TERMS.items():
        concepts.add(finding, [nlp.make_doc(w) for w in words])
    triggers = PhraseMatcher(nlp.vocab, attr="LOWER")
    phrases = {p for _, terms in _STATUSES for key in terms for p in terms[key]}
    triggers.add("trigger", [nlp.make_doc(p) for p in sorted(phrases)])
    return nlp, concepts, triggers


def _targets(
    doc: Doc, concepts: PhraseMatcher, triggers: PhraseMatcher, finding: str | None
) -> list[Span]:
    """The finding's own words if the sentence names them, else any concept word, else every
    content word outside a trigger phrase."""
    matches = [(doc.vocab.strings[m], a, b) for m, a, b in concepts(doc)]
    own = [doc[a:b] for label, a, b in matches if label == finding]
    chosen = own or [doc[a:b] for _, a, b in matches]
    if not chosen:
        covered = {i for _, a, b in triggers(doc) for i in range(a, b)}
        chosen = [
            doc[t.i : t.i + 1]
            for t in doc
            if t.i not in covered and t.is_alpha and len(t) > 2 and t.lower_ not in STOP_WORDS
        ]
    return [Span(doc, s.start, s.end, label="CONCEPT") for s in spacy.util.filter_spans(chosen)]


def _status(doc: Doc, targets: Iterable[Span]) -> Assertion:
    found: list[Assertion] = []
    for span in targets:
        status: Assertion = next((s for s, _ in _STATUSES if span._.get(f"assert_{s}")), "affirmed")
        if status == "affirmed":
            return "affirmed"
        found.append(status)
    order = [s for s, _ in _STATUSES]
    return min(found, key=order.index) if found else "affirmed"


def assertion(sentence: str, finding: str | None = None) -> Assertion:
    """The assertion status of one sentence, about ``finding`` where it names it."""
    nlp, concepts, triggers = _nlp()
    doc = nlp.make_doc(sentence)
    targets = _targets(doc, concepts, triggers, finding)
    if not targets:
        return "affirmed"
    doc.ents = targets
    for _, component in nlp.pipeline:
        doc = component(doc)
    return _status(doc, doc.ents)


def assertions(sentences: Iterable[tuple[str, str | None]]) -> list[Assertion]:
    """``assertion`` of each (sentence, finding)."""
    return [assertion(s, f) for s, f in sentences]
