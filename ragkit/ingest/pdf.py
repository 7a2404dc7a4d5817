"""PDF: page texts joined by blank lines; `pages` records where each page starts (pypdf reads the file)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from ragkit.ingest.document import ParsedDocument, ParseError, normalize_newlines, short_error

if TYPE_CHECKING:
    from pypdf import PdfReader


_REBUILD_XREF = b"\nstartxref\n0\n%%EOF\n"  # a trailer pointing nowhere: pypdf rebuilds the xref table
_REBUILT = "damaged PDF: read after rebuilding its cross-reference table"


class _DamagedPdf(Exception):
    """pypdf could not read the file as it is; the message says why."""


def parse_pdf(data: bytes) -> ParsedDocument:
    """The text of every page joined by blank lines, with the offset where each page starts; a file whose end
    is missing or wrong is read after rebuilding its cross-reference table, with a warning that says so."""
    try:
        texts, notes = _pdf_texts(data)
    except _DamagedPdf as damage:
        texts, notes = _rebuilt_pdf_texts(data, damage)
    if not any(text.strip() for text in texts):
        raise ParseError("no extractable text (scanned PDF?)")
    pages = []
    offset = 0
    for text in texts:
        pages.append(offset)
        offset += len(text) + 2
    return ParsedDocument("\n\n".join(texts), pages=pages, warnings=notes)


def _rebuilt_pdf_texts(data: bytes, damage: _DamagedPdf) -> tuple[list[str], list[str]]:
    """Read a PDF whose end (xref table, trailer, %%EOF) is missing or wrong, as in a cut-off download."""
    try:
        texts, notes = _pdf_texts(data + _REBUILD_XREF)
    except _DamagedPdf:
        raise ParseError(f"corrupt PDF: {damage}", damaged=True) from None
    return texts, [_REBUILT, *notes]


def _pdf_texts(data: bytes) -> tuple[list[str], list[str]]:
    """The text of every page, and a note for each page whose text could not be extracted."""
    from pypdf.errors import DependencyError

    reader = _open_pdf(data)
    try:
        pages = list(reader.pages)
    except Exception as e:  # pypdf raises many kinds of errors on damaged files
        raise _DamagedPdf(short_error(e)) from None
    texts: list[str] = []
    errors: list[str] = []
    notes = []
    for number, page in enumerate(pages, start=1):
        try:
            texts.append(normalize_newlines(page.extract_text() or ""))
        except DependencyError as e:  # e.g. AES without the `cryptography` package
            raise ParseError(_dependency_reason(e)) from None
        except Exception as e:
            texts.append("")
            errors.append(short_error(e))
            notes.append(f"page {number}: no text extracted ({errors[-1]})")
    if pages and len(errors) == len(pages):
        raise _DamagedPdf(errors[0])
    return texts, notes


def _open_pdf(data: bytes) -> PdfReader:
    """A pypdf reader, decrypted with the empty password when the file is encrypted."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(io.BytesIO(data))
        readable = not reader.is_encrypted or reader.decrypt("")
    except DependencyError as e:
        raise ParseError(_dependency_reason(e)) from None
    except Exception as e:
        raise _DamagedPdf(short_error(e)) from None
    if not readable:
        raise ParseError("encrypted PDF (password required)")
    return reader


def _dependency_reason(error: Exception) -> str:
    """The reason for a PDF that needs a package that is not installed.

    >>> _dependency_reason(Exception("cryptography>=3.1 is required for AES algorithm"))
    "encrypted PDF (AES needs the 'cryptography' package: pip install cryptography)"
    """
    if "cryptography" in str(error):
        return "encrypted PDF (AES needs the 'cryptography' package: pip install cryptography)"
    return f"PDF needs a package that is not installed: {short_error(error)}"
