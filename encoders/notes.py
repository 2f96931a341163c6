"""Clinical notes out of FHIR R4: DocumentReference and DiagnosticReport to ``Note``.

Only text is decoded here: ``text/plain`` (charset honoured, UTF-8 by default) and ``text/html``
(markup removed with the stdlib HTML parser). Attachments come inline (base64 ``data``) or by
``url``; for a URL the caller's ``fetch(url) -> bytes`` does the HTTP (and Binary JSON decoding),
so this module never talks to a server. Anything else (PDF, CDA XML, images) is a ``NoteError``
naming the content type, so the gather stage can record it as missing rather than drop it.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import Message
from html.parser import HTMLParser
from typing import Any

from mmcds.errors import InputRejected
from mmcds.records import Note

Fetch = Callable[[str], bytes]

DEFAULT_MAX_CHARS = 200_000
# UTF-8 needs at most 4 bytes a character: a bound on the raw bytes checked before decoding, so
# an oversized attachment is refused without first materialising it as text.
_BYTES_PER_CHAR = 4

_PLAIN = "text/plain"
_HTML_TYPES = ("text/html", "application/xhtml+xml")
# Preference order when a resource offers the same document in several formats.
_SUPPORTED = (_PLAIN, *_HTML_TYPES)


class NoteError(InputRejected):
    """A resource that cannot be turned into a note; the message says why and what to do."""


# --------------------------------------------------------------------------------------- HTML


_SKIP_TAGS = frozenset({"script", "style", "head", "title", "template"})
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
        "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody",
        "tfoot", "thead", "tr", "ul",
    }
)  # fmt: skip
_VOID_TAGS = frozenset({"br", "hr"})
_CELL_TAGS = frozenset({"td", "th"})
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")


class _TextExtractor(HTMLParser):
    """Collects visible text; block elements become line breaks, table cells tabs.

    ``convert_charrefs=True`` makes the parser unescape entities (``&lt;``, ``&#233;``) itself.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
            if tag == "pre":
                self._pre_depth += 1
        elif tag in _CELL_TAGS:
            self.parts.append("\t")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK_TAGS and tag not in _VOID_TAGS:  # <br/> is one break, not two
            self.parts.append("\n")
            if tag == "pre":
                self._pre_depth = max(0, self._pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        # HTML collapses ASCII whitespace (not &nbsp;) in ordinary text; <pre> keeps its layout.
        self.parts.append(data if self._pre_depth else _HTML_SPACE.sub(" ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML document, with block boundaries kept as newlines."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = "\n".join(line.strip(" \t\r\f") for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------------------------- decoding


def _content_type(attachment: dict[str, Any]) -> tuple[str, str | None]:
    msg = Message()
    msg["content-type"] = str(attachment.get("contentType") or "")
    charset = msg.get_param("charset")
    return msg.get_content_type(), charset if isinstance(charset, str) else None


def _attachment_bytes(
    attachment: dict[str, Any], fetch: Fetch | None, max_bytes: int, where: str
) -> bytes:
    data = attachment.get("data")
    if data is not None:
        # FHIR base64 may carry line breaks or spaces (the spec's Binary example does).
        compact = re.sub(r"\s+", "", str(data))
        if len(compact) * 3 // 4 > max_bytes:
            raise NoteError(f"{where}: inline attachment is over the {max_bytes}-byte limit")
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise NoteError(f"{where}: attachment data is not valid base64 ({exc})") from exc
    url = attachment.get("url")
    if url:
        url = str(url)
        if not (url.startswith(("http://", "https://")) or re.fullmatch(r"Binary/[^/\s]+", url)):
            raise NoteError(
                f"{where}: attachment url {url!r} is neither absolute http(s) nor Binary/<id>"
            )
        if fetch is None:
            raise NoteError(
                f"{where}: attachment is by reference ({url}); pass fetch= to retrieve it"
            )
        raw = fetch(url)
        if len(raw) > max_bytes:
            raise NoteError(f"{where}: attachment {url} is over the {max_bytes}-byte limit")
        return raw
    raise NoteError(f"{where}: attachment has neither data nor url")


def _decode(raw: bytes, charset: str | None, where: str) -> str:
    name = (charset or "utf-8").strip().lower()
    try:
        codec = codecs.lookup(name).name
    except LookupError as exc:
        raise NoteError(f"{where}: unknown charset {charset!r}") from exc
    # A UTF-8 byte-order mark is not part of the note: offsets must start at the first letter.
    if codec == "utf-8":
        codec = "utf-8-sig"
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise NoteError(
            f"{where}: attachment is not valid {name} ({exc.reason} at byte {exc.start}); "
            "fix the contentType charset"
        ) from exc


def _pick_attachment(attachments: list[dict[str, Any]], where: str) -> dict[str, Any]:
    by_type: dict[str, dict[str, Any]] = {}
    for att in attachments:
        ctype, _ = _content_type(att)
        by_type.setdefault(ctype, att)
    for ctype in _SUPPORTED:
        if ctype in by_type:
            return by_type[ctype]
    found = ", ".join(sorted(by_type)) or "none"
    raise NoteError(
        f"{where}: no text attachment (content types: {found}); supported: "
        f"{', '.join(_SUPPORTED)}. Convert the document to text upstream."
    )


def _attachment_text(
    attachment: dict[str, Any], fetch: Fetch | None, max_chars: int, where: str
) -> str:
    ctype, charset = _content_type(attachment)
    raw = _attachment_bytes(attachment, fetch, max_chars * _BYTES_PER_CHAR, where)
    text = _decode(raw, charset, where)
    if ctype in _HTML_TYPES:
        text = html_to_text(text)
    return _checked_text(text, max_chars, where)


def _checked_text(text: str, max_chars: int, where: str) -> str:
    if len(text) > max_chars:
        raise NoteError(
            f"{where}: note has {len(text)} characters, over the limit of {max_chars}; "
            "raise max_chars (settings) if such notes are expected"
        )
    if not text.strip():
        raise NoteError(f"{where}: note text is empty")
    return text


# ------------------------------------------------------------------------------ FHIR fields


def parse_fhir_datetime(value: str | None) -> datetime | None:
    """FHIR date/dateTime/instant (partial dates allowed) as an aware datetime (UTC if no zone)."""
    if not value:
        return None
    text = str(value)
    if re.fullmatch(r"\d{4}", text):
        text += "-01-01"
    elif re.fullmatch(r"\d{4}-\d{2}", text):
        text += "-01"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise NoteError(f"not a FHIR date/dateTime: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _concept_label(concept: dict[str, Any] | None) -> str | None:
    if not concept:
        return None
    codings = concept.get("coding") or []
    first = codings[0] if codings else {}
    return first.get("display") or concept.get("text") or first.get("code") or None


def _reference(resource: dict[str, Any], expected: str) -> str:
    if resource.get("resourceType") != expected:
        raise NoteError(f"expected a {expected}, got {resource.get('resourceType')!r}")
    rid = resource.get("id")
    if not rid:
        raise NoteError(f"{expected} has no id: a note must point back to its source")
    if resource.get("status") == "entered-in-error":
        raise NoteError(f"{expected}/{rid} is entered-in-error and must not be used")
    return f"{expected}/{rid}"


# ------------------------------------------------------------------------------- public API


def note_from_document_reference(
    resource: dict[str, Any], fetch: Fetch | None = None, *, max_chars: int = DEFAULT_MAX_CHARS
) -> Note:
    """The note carried by a DocumentReference (text/plain preferred over HTML).

    Raises ``NoteError`` for unsupported content types, oversized or empty text, bad base64 or
    charset. Exceptions raised by ``fetch`` (network errors) propagate unchanged, so the caller can
    tell a transient failure from bad content.
    """
    ref = _reference(resource, "DocumentReference")
    attachments = [c["attachment"] for c in resource.get("content") or [] if c.get("attachment")]
    attachment = _pick_attachment(attachments, ref)
    text = _attachment_text(attachment, fetch, max_chars, ref)
    context = resource.get("context") or {}
    when = resource.get("date") or (context.get("period") or {}).get("start")
    return Note(
        text=text,
        reference=ref,
        note_type=_concept_label(resource.get("type")),
        date=parse_fhir_datetime(when),
    )


def notes_from_diagnostic_report(
    resource: dict[str, Any], fetch: Fetch | None = None, *, max_chars: int = DEFAULT_MAX_CHARS
) -> list[Note]:
    """The narrative of a DiagnosticReport: its best ``presentedForm``, else its ``conclusion``.

    A report with neither (a lab panel) has no narrative and gives ``[]``. A report whose
    presented forms are all unsupported (PDF only) falls back to ``conclusion`` when there is
    one, with ``note_type`` marked "(conclusion)"; without one it is a ``NoteError``.
    """
    ref = _reference(resource, "DiagnosticReport")
    label = _concept_label(resource.get("code"))
    period = resource.get("effectivePeriod") or {}
    when = parse_fhir_datetime(
        resource.get("effectiveDateTime") or period.get("start") or resource.get("issued")
    )
    forms = [f for f in resource.get("presentedForm") or [] if f]
    conclusion = resource.get("conclusion")
    if forms:
        try:
            attachment = _pick_attachment(forms, ref)
        except NoteError:
            if not conclusion:
                raise
        else:
            text = _attachment_text(attachment, fetch, max_chars, ref)
            return [Note(text=text, reference=ref, note_type=label, date=when)]
    if not conclusion:
        return []
    text = _checked_text(str(conclusion), max_chars, ref)
    kind = f"{label} (conclusion)" if label else "conclusion"
    return [Note(text=text, reference=ref, note_type=kind, date=when)]
