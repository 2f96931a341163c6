"""Notes out of FHIR R4: the spec's example resources plus hand-built attachments."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from mmcds.encoders.notes import (
    NoteError,
    html_to_text,
    note_from_document_reference,
    notes_from_diagnostic_report,
    parse_fhir_datetime,
)


def _example(shared_data: Path, name: str) -> dict[str, Any]:
    path = shared_data / "fhir-r4-examples" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return dict(json.loads(path.read_text()))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _docref(*attachments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": "n1",
        "status": "current",
        "content": [{"attachment": a} for a in attachments],
        **extra,
    }


def test_spec_example_cda_is_refused_by_name(shared_data: Path) -> None:
    res = _example(shared_data, "documentreference-example.json")
    with pytest.raises(NoteError, match=r"application/hl7-v3\+xml"):
        note_from_document_reference(res, fetch=lambda url: b"never called")


def test_spec_example_with_text_binary_fetched_by_url(shared_data: Path) -> None:
    res = _example(shared_data, "documentreference-example.json")
    att = res["content"][0]["attachment"]
    att["contentType"] = "text/plain; charset=ISO-8859-1"
    att["url"] = "Binary/07a6483f-732b-461e-86b6-edb665c45510"
    asked: list[str] = []

    def fetch(url: str) -> bytes:
        asked.append(url)
        return "Fièvre 38,5 °C, toux productive.".encode("iso-8859-1")

    note = note_from_document_reference(res, fetch)
    assert asked == ["Binary/07a6483f-732b-461e-86b6-edb665c45510"]
    assert note.text == "Fièvre 38,5 °C, toux productive."
    assert note.reference == "DocumentReference/example"
    assert note.note_type == "Outpatient Note"
    assert note.date == datetime(2005, 12, 24, 9, 43, 41, tzinfo=timezone(timedelta(hours=11)))
    assert len(note.content_hash) == 64

    del res["date"]  # falls back to context.period.start
    assert note_from_document_reference(res, fetch).date == datetime(
        2004, 12, 23, 8, 0, tzinfo=timezone(timedelta(hours=11))
    )


def test_spec_binary_pdf_is_refused_by_name(shared_data: Path) -> None:
    binary = _example(shared_data, "binary-example.json")
    res = _docref({"contentType": binary["contentType"], "data": binary["data"]})
    with pytest.raises(NoteError, match="application/pdf"):
        note_from_document_reference(res)


def test_url_without_fetch_says_what_to_do() -> None:
    res = _docref({"contentType": "text/plain", "url": "https://ehr.example/Binary/1"})
    with pytest.raises(NoteError, match="pass fetch"):
        note_from_document_reference(res)
    res = _docref({"contentType": "text/plain", "url": "ftp://ehr.example/x"})
    with pytest.raises(NoteError, match="neither absolute"):
        note_from_document_reference(res, fetch=lambda url: b"x")


def test_inline_base64_with_line_breaks_crlf_and_bom_kept_exactly() -> None:
    text = "HPI: 71F, dyspnoea.\r\nIMPRESSION: small effusion — µg/L ✓\r\n"
    encoded = _b64(("\ufeff" + text).encode("utf-8"))
    wrapped = "\n".join(encoded[i : i + 20] for i in range(0, len(encoded), 20))
    res = _docref(
        {"contentType": "text/plain", "data": wrapped},
        type={"text": "Progress note"},
        date="2024-03",
    )
    note = note_from_document_reference(res)
    assert note.text == text  # no BOM, CRLF untouched: offsets index the source
    assert note.note_type == "Progress note"
    assert note.date == datetime(2024, 3, 1, tzinfo=UTC)


def test_html_stripped_with_the_parser() -> None:
    html = (
        "<html><head><title>T</title><style>p {color:red}</style></head><body>"
        "<h1>Discharge&nbsp;summary</h1><script>alert('<p>x</p>')</script>"
        "<p>Temp &gt; 38 &amp; cough,\n   productive</p><div>Plan:<br/>abx</div>"
        "<table><tr><td>WBC</td><td>14.2</td></tr></table><p>caf&eacute; &#x2713;</p>"
        "</body></html>"
    )
    text = html_to_text(html)
    assert text == (
        "Discharge\xa0summary\n\nTemp > 38 & cough, productive\n\nPlan:\nabx\n\nWBC\t14.2\n\ncafé ✓"
    )
    assert "alert" not in text and "color" not in text and "<" not in text.replace("> 38", "")


def test_plain_preferred_over_html_and_charset_honoured() -> None:
    html = {"contentType": "text/html", "data": _b64(b"<p>html version</p>")}
    plain = {
        "contentType": "text/plain;charset=utf-16",
        "data": _b64("plain version".encode("utf-16")),
    }
    assert note_from_document_reference(_docref(html, plain)).text == "plain version"
    assert note_from_document_reference(_docref(html)).text == "html version"


@pytest.mark.parametrize(
    ("attachment", "message"),
    [
        ({"contentType": "text/plain", "data": "%%%notbase64"}, "not valid base64"),
        ({"contentType": "text/plain; charset=klingon", "data": _b64(b"x")}, "unknown charset"),
        ({"contentType": "text/plain", "data": _b64(b"\xff\xfe\xfa")}, "not valid utf-8"),
        ({"contentType": "text/plain", "data": _b64(b"  \n ")}, "empty"),
        ({"contentType": "text/plain"}, "neither data nor url"),
    ],
)
def test_bad_attachments_give_clear_errors(attachment: dict[str, Any], message: str) -> None:
    with pytest.raises(NoteError, match=message):
        note_from_document_reference(_docref(attachment))


def test_length_bound() -> None:
    res = _docref({"contentType": "text/plain", "data": _b64(b"a" * 101)})
    with pytest.raises(NoteError, match="101 characters, over the limit of 100"):
        note_from_document_reference(res, max_chars=100)
    assert len(note_from_document_reference(res, max_chars=101).text) == 101
    # Refused before decoding when even the raw bytes cannot fit.
    with pytest.raises(NoteError, match="byte limit"):
        note_from_document_reference(res, max_chars=10)
    fetched = _docref({"contentType": "text/plain", "url": "Binary/big"})
    with pytest.raises(NoteError, match="byte limit"):
        note_from_document_reference(fetched, lambda url: b"b" * 1000, max_chars=10)


def test_wrong_resource_and_entered_in_error() -> None:
    with pytest.raises(NoteError, match="expected a DocumentReference"):
        note_from_document_reference({"resourceType": "Observation", "id": "x"})
    bad = _docref({"contentType": "text/plain", "data": _b64(b"x")}, status="entered-in-error")
    with pytest.raises(NoteError, match="entered-in-error"):
        note_from_document_reference(bad)


def test_diagnostic_report_examples(shared_data: Path) -> None:
    us = _example(shared_data, "diagnosticreport-example-ultrasound.json")
    (note,) = notes_from_diagnostic_report(us)
    assert note.text == "Unremarkable study"
    assert note.reference == "DiagnosticReport/ultrasound"
    assert note.note_type == "Ultrasonography of abdomen (conclusion)"
    assert note.date == datetime(2012, 12, 1, 11, 0, tzinfo=UTC)

    ct = _example(shared_data, "diagnosticreport-example-f201-brainct.json")
    assert notes_from_diagnostic_report(ct)[0].text == ct["conclusion"]

    # The lipid panel example is a Bundle; its report has no narrative at all.
    bundle = _example(shared_data, "diagnosticreport-example-lipids.json")
    with pytest.raises(NoteError, match="expected a DiagnosticReport, got 'Bundle'"):
        notes_from_diagnostic_report(bundle)
    lipids = bundle["entry"][0]["resource"]
    assert notes_from_diagnostic_report(lipids) == []


def test_diagnostic_report_presented_forms(shared_data: Path) -> None:
    base = _example(shared_data, "diagnosticreport-example-ultrasound.json")
    pdf = {"contentType": "application/pdf", "data": _b64(b"%PDF-1.5")}
    html = {"contentType": "text/html", "url": "https://ehr.example/Binary/r1"}

    with_html = copy.deepcopy(base)
    with_html["presentedForm"] = [pdf, html]
    (note,) = notes_from_diagnostic_report(
        with_html, lambda url: b"<p>Liver normal.</p><p>IMPRESSION: unremarkable</p>"
    )
    assert note.text == "Liver normal.\n\nIMPRESSION: unremarkable"
    assert note.note_type == "Ultrasonography of abdomen"

    pdf_only = copy.deepcopy(base)
    pdf_only["presentedForm"] = [pdf]
    (fallback,) = notes_from_diagnostic_report(pdf_only)
    assert fallback.text == "Unremarkable study" and fallback.note_type.endswith("(conclusion)")

    del pdf_only["conclusion"]
    with pytest.raises(NoteError, match="application/pdf"):
        notes_from_diagnostic_report(pdf_only)


def test_partial_and_zoned_dates() -> None:
    assert parse_fhir_datetime("2019") == datetime(2019, 1, 1, tzinfo=UTC)
    assert parse_fhir_datetime("2019-05-02") == datetime(2019, 5, 2, tzinfo=UTC)
    assert parse_fhir_datetime("2019-05-02T10:00:00Z") == datetime(2019, 5, 2, 10, tzinfo=UTC)
    with pytest.raises(NoteError, match="not a FHIR date"):
        parse_fhir_datetime("yesterday")
