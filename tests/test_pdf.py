"""PDF parsing (ragkit.ingest.pdf through parse_file): pages, encryption, damaged and cut-short files, and the
library's messages kept off stderr."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from test_parsers import offset_of, reason, write

from ragkit.ingest.parsers import parse_file

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one Helvetica line per string, one page per list."""
    n = len(pages)
    font_id = 3 + 2 * n
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [{}] /Count {} >>".format(" ".join(f"{3 + 2 * i} 0 R" for i in range(n)), n),
    ]
    for i, lines in enumerate(pages):
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops += [f"({escaped}) Tj", "T*"]
        stream = "\n".join(ops + ["ET"])
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> /Contents {4 + 2 * i} 0 R >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1"))
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def encrypt_pdf(
    data: bytes, user_password: str, owner_password: str | None = None, algorithm: str | None = None
) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password, owner_password, algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


PDF_PAGES = [
    ["First page title", "alpha line"],
    ["Second page", "beta line", "gamma line"],
    ["Third page omega"],
]


def test_pdf_pages(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "three.pdf", make_pdf(PDF_PAGES)))
    assert len(doc.pages) == 3 and doc.pages[0] == 0
    for number, lines in enumerate(PDF_PAGES, start=1):
        start = doc.pages[number - 1]
        end = doc.pages[number] - 2 if number < len(PDF_PAGES) else len(doc.text)
        page_text = doc.text[start:end]
        assert page_text.startswith(lines[0])
        assert [line.strip() for line in page_text.splitlines() if line.strip()] == lines
        for line in lines:
            assert doc.page_at(offset_of(doc.text, line)) == number
    assert doc.text[doc.pages[1] - 2 : doc.pages[1]] == "\n\n"
    assert doc.line_at(offset_of(doc.text, "gamma line")) == 3  # line within its page
    assert doc.line_at(offset_of(doc.text, "Third page")) == 1


def test_pdf_encrypted(tmp_path: Path) -> None:
    locked = encrypt_pdf(make_pdf(PDF_PAGES), "secret")
    assert "encrypted" in reason(write(tmp_path, "locked.pdf", locked))


def test_pdf_with_owner_password_only_is_read(tmp_path: Path) -> None:
    restricted = encrypt_pdf(make_pdf(PDF_PAGES), "", "owner")
    doc = parse_file(write(tmp_path, "restricted.pdf", restricted))
    assert "beta line" in doc.text and len(doc.pages) == 3


@pytest.mark.parametrize("algorithm", ["AES-128", "AES-256"])
def test_pdf_aes_with_empty_password_is_read(tmp_path: Path, algorithm: str) -> None:
    opened = encrypt_pdf(make_pdf(PDF_PAGES), "", algorithm=algorithm)
    doc = parse_file(write(tmp_path, "aes.pdf", opened))
    assert "beta line" in doc.text and len(doc.pages) == 3


def test_pdf_aes_with_password_is_skipped(tmp_path: Path) -> None:
    locked = encrypt_pdf(make_pdf(PDF_PAGES), "secret", algorithm="AES-256")
    assert reason(write(tmp_path, "locked.pdf", locked)) == "encrypted PDF (password required)"


def test_pdf_aes_without_the_cryptography_package_says_what_to_install(tmp_path: Path) -> None:
    path = write(tmp_path, "aes.pdf", encrypt_pdf(make_pdf(PDF_PAGES), "", algorithm="AES-128"))
    script = (
        "import sys\n"
        "sys.modules['cryptography'] = sys.modules['Crypto'] = None  # as if neither were installed\n"
        "from ragkit.ingest.parsers import ParseError, parse_file\n"
        "try:\n"
        "    parse_file(__import__('pathlib').Path(sys.argv[1]))\n"
        "except ParseError as e:\n"
        "    print(e.reason)\n"
    )
    command = [sys.executable, "-c", script, str(path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.stdout.strip() == "encrypted PDF (AES needs the 'cryptography' package: pip install cryptography)"
    assert run.stderr == ""


def test_pdf_without_eof_marker_is_read_silently(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    damaged = make_pdf(PDF_PAGES).replace(b"%%EOF\n", b"")
    doc = parse_file(write(tmp_path, "no-eof.pdf", damaged))
    assert "gamma line" in doc.text and len(doc.pages) == 3
    assert doc.warnings[0] == "damaged PDF: read after rebuilding its cross-reference table"
    assert "EOF marker not found" in doc.warnings
    assert capfd.readouterr() == ("", "")


def test_pdf_cut_short_is_reported_with_pypdfs_reason(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = make_pdf(PDF_PAGES)
    message = reason(write(tmp_path, "cut.pdf", data[: len(data) // 3]))
    assert message.startswith("corrupt PDF: ") and "(EOF marker not found)" in message
    assert len(message) <= 120
    assert capfd.readouterr() == ("", "")


def test_pdf_messages_reach_no_log_handler_and_logging_is_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pypdf_logger = logging.getLogger("pypdf")
    handlers = list(pypdf_logger.handlers)
    with caplog.at_level(logging.DEBUG):
        parse_file(write(tmp_path, "no-eof.pdf", make_pdf(PDF_PAGES).replace(b"%%EOF\n", b"")))
        assert caplog.records == []
        logging.getLogger("pypdf._reader").warning("outside ragkit")  # the application's own logging still works
    assert [r.getMessage() for r in caplog.records] == ["outside ragkit"]
    assert pypdf_logger.propagate and pypdf_logger.handlers == handlers


def test_pdf_page_that_fails_leaves_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pypdf import PageObject

    real = PageObject.extract_text

    def extract_text(page: PageObject, *args: object, **kwargs: object) -> str:
        text = real(page, *args, **kwargs)
        if "Second page" in text:
            raise ValueError("broken content stream")
        return text

    monkeypatch.setattr(PageObject, "extract_text", extract_text)
    doc = parse_file(write(tmp_path, "three.pdf", make_pdf(PDF_PAGES)))
    assert "alpha line" in doc.text and "omega" in doc.text and "beta" not in doc.text
    assert len(doc.pages) == 3 and doc.page_at(offset_of(doc.text, "omega")) == 3
    assert doc.warnings == ["page 2: no text extracted (broken content stream)"]


@pytest.mark.parametrize(
    "content", [b"this is not a PDF at all", b"%PDF-1.4\n1 0 obj\n<< /Type /Cat", b"\x00" * 64]
)
def test_pdf_corrupt(tmp_path: Path, content: bytes) -> None:
    message = reason(write(tmp_path, "broken.pdf", content))
    assert message.startswith("corrupt PDF: ")
    assert "\n" not in message and len(message) <= 120


def test_pdf_truncated(tmp_path: Path) -> None:
    data = make_pdf(PDF_PAGES)
    message = reason(write(tmp_path, "cut.pdf", data[: len(data) // 3]))
    assert message.startswith("corrupt PDF: ") and len(message) <= 120


def test_pdf_without_text(tmp_path: Path) -> None:
    assert reason(write(tmp_path, "scan.pdf", make_pdf([[], []]))) == "no extractable text (scanned PDF?)"


def test_real_pdf() -> None:
    pdfs = DATA / "financebench" / "pdfs"
    if not pdfs.is_dir():
        pytest.skip(f"evaluation data not found at {pdfs}")
    doc = parse_file(pdfs / "ULTABEAUTY_2023Q4_EARNINGS.pdf")
    assert len(doc.pages) > 1 and doc.pages[0] == 0
    assert doc.pages == sorted(doc.pages)
    assert "Ulta Beauty" in doc.text[: doc.pages[1]]
    assert "Comparable sales" in doc.text
    assert doc.page_at(offset_of(doc.text, "Ulta Beauty Announces")) == 1
    assert doc.page_at(len(doc.text) - 1) == len(doc.pages)
