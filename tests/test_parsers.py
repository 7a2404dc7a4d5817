"""Parsers: text and structure for every supported format, and clear reasons for bad files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from ragkit.ingest.parsers import ParseError, decode_text, is_supported, parse_file

def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def reason(path: Path) -> str:
    with pytest.raises(ParseError) as info:
        parse_file(path)
    return info.value.reason


def offset_of(text: str, needle: str) -> int:
    assert needle in text, needle
    return text.index(needle)


# --- supported types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a.md", "b.MARKDOWN", "c.txt", "d.rst", "e.html", "f.HTM", "g.pdf", "h.docx", "i.py", "j.pyi",
             "k.ts", "l.go", "m.rs", "n.json", "o.yaml", "p.csv", "q.log", "Makefile", "dockerfile", "README",
             "LICENSE", "ChangeLog"],
)
def test_supported(name: str) -> None:
    assert is_supported(Path(name))


@pytest.mark.parametrize("name", ["a.png", "b.ipynb", "c.exe", "d.zip", "notes", "Makefile.bak", "e.doc"])
def test_unsupported(name: str) -> None:
    assert not is_supported(Path(name))


def test_unsupported_file_raises_with_reason(tmp_path: Path) -> None:
    assert reason(write(tmp_path, "x.png", b"\x89PNG")) == "unsupported file type .png"
    assert reason(write(tmp_path, "data", "text")) == "unsupported file type"


# --- decoding --------------------------------------------------------------------------------

FRENCH = "Café crème brûlée, naïve résumé à la française.\nDeuxième ligne.\n"


def test_utf8_text_is_kept_verbatim(tmp_path: Path) -> None:
    text = "  indented first line\n\ttab line\n\nlast — ok\n"
    doc = parse_file(write(tmp_path, "notes.txt", text))
    assert doc.text == text
    assert doc.headings == [] and doc.pages == []
    assert doc.line_at(offset_of(doc.text, "last")) == 4


def test_newlines_are_normalised_and_lines_map(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "crlf.txt", b"one\r\ntwo\rthree\nfour"))
    assert doc.text == "one\ntwo\nthree\nfour"
    assert doc.line_at(offset_of(doc.text, "three")) == 3
    assert doc.line_at(offset_of(doc.text, "four")) == 4


def test_latin1_text(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "fr.txt", FRENCH.encode("latin-1")))
    assert doc.text == FRENCH


@pytest.mark.parametrize("text", ["Tschüß", "caf\u00e9 na\u00efve", "Die Größe der Straße wären übel.\n"])
def test_short_latin1_text(text: str) -> None:
    assert decode_text(text.encode("latin-1")) == text


def test_cp1252_text(tmp_path: Path) -> None:
    text = "He said \u201cquoted\u201d \u2014 it costs \u20ac5 and it\u2019s na\u00efve.\r\nSecond line.\r\n"
    doc = parse_file(write(tmp_path, "win.txt", text.encode("cp1252")))
    assert doc.text == text.replace("\r\n", "\n")


def test_cyrillic_legacy_encoding_is_detected() -> None:
    text = "Привет, мир! Это тестовый текст на русском языке для проверки кодировки.\n"
    assert decode_text(text.encode("cp1251")) == text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_bom(tmp_path: Path, encoding: str) -> None:
    text = "Ünïcode with BOM\nsecond line\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    doc = parse_file(write(tmp_path, "bom.txt", data))
    assert doc.text == text
    assert doc.line_at(offset_of(doc.text, "second")) == 2


def test_binary_content(tmp_path: Path) -> None:
    assert reason(write(tmp_path, "blob.txt", bytes(range(256)) * 8)) == "binary content"


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n  ", b"\xef\xbb\xbf\n"])
def test_empty_and_whitespace_files(tmp_path: Path, content: bytes) -> None:
    assert reason(write(tmp_path, "empty.md", content)) == "empty file"


# --- read errors -----------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "secret.txt", "hidden")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # running as root: permissions do not block reads

            def denied(self: Path) -> bytes:
                raise PermissionError(13, "Permission denied", str(self))

            monkeypatch.setattr(Path, "read_bytes", denied)
        assert reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


def test_other_read_error(tmp_path: Path) -> None:
    (tmp_path / "folder.txt").mkdir()
    assert reason(tmp_path / "folder.txt").startswith("unreadable: ")
    assert reason(tmp_path / "missing.txt") == "unreadable: No such file or directory"


# --- Markdown --------------------------------------------------------------------------------

MARKDOWN = """\
# Guide

Intro paragraph.

Install
-------

Run `pip install`.

```sh
# not a heading
echo hi
```

### Options *for* `ragkit`

Option text.

# Appendix
Last words.
"""


def test_markdown(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "guide.md", MARKDOWN))
    assert doc.text == MARKDOWN
    assert [(h.level, h.title) for h in doc.headings] == [
        (1, "Guide"),
        (2, "Install"),
        (3, "Options for ragkit"),
        (1, "Appendix"),
    ]
    assert [h.start for h in doc.headings] == [
        0,
        offset_of(MARKDOWN, "Install\n"),
        offset_of(MARKDOWN, "### Options"),
        offset_of(MARKDOWN, "# Appendix"),
    ]
    assert doc.heading_path(offset_of(MARKDOWN, "Intro")) == "Guide"
    assert doc.heading_path(offset_of(MARKDOWN, "echo hi")) == "Guide > Install"
    assert doc.heading_path(offset_of(MARKDOWN, "Option text")) == "Guide > Install > Options for ragkit"
    assert doc.heading_path(offset_of(MARKDOWN, "Last words")) == "Appendix"
    assert doc.line_at(offset_of(MARKDOWN, "echo hi")) == 12


def test_markdown_keeps_leading_whitespace_and_crlf_lines(tmp_path: Path) -> None:
    source = "\r\n\r\n   \r\n## Late heading\r\nbody\r\n"
    doc = parse_file(write(tmp_path, "late.markdown", source.encode()))
    assert doc.text == source.replace("\r\n", "\n")
    assert doc.headings[0].start == offset_of(doc.text, "## Late")
    assert doc.line_at(offset_of(doc.text, "body")) == 5
    assert doc.heading_path(offset_of(doc.text, "body")) == "Late heading"


# --- reStructuredText ------------------------------------------------------------------------

RST = """\
=========
 Manual
=========

Preface text.

Usage
=====

Usage text.

Details
-------

Detail text::

    Not a title
    ===========

Second usage
============

Final text.
Trailing paragraph
line that is not a title
"""


def test_rst(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "manual.rst", RST))
    assert doc.text == RST
    assert [(h.start, h.level, h.title) for h in doc.headings] == [
        (0, 1, "Manual"),
        (offset_of(RST, "Usage\n"), 2, "Usage"),
        (offset_of(RST, "Details"), 3, "Details"),
        (offset_of(RST, "Second usage"), 2, "Second usage"),
    ]
    assert doc.heading_path(offset_of(RST, "Preface")) == "Manual"
    assert doc.heading_path(offset_of(RST, "Not a title")) == "Manual > Usage > Details"
    assert doc.heading_path(offset_of(RST, "Final text")) == "Manual > Second usage"


def test_rst_short_underline_is_not_a_title(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "short.rst", "A long title\n===\n\ntext\n"))
    assert doc.headings == []


# --- code ------------------------------------------------------------------------------------

PYTHON = '''\
"""Module docstring."""
import os


@decorator
class Store(Base):
    """A store."""

    limit = 3

    def open(self) -> None:
        def helper():
            pass

    async def close(self) -> None:
        pass


if TYPE_CHECKING:
    def typed() -> None: ...


def main() -> None:
    class Local:
        def hidden(self):
            pass


VALUE = 1


async def serve() -> None:
    pass
'''


def test_python(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "store.py", PYTHON))
    assert doc.text == PYTHON
    assert [(h.level, h.title) for h in doc.headings] == [
        (1, "class Store"),
        (2, "def open"),
        (2, "async def close"),
        (1, "def main"),
        (1, "async def serve"),
    ]
    assert doc.headings[1].start == offset_of(PYTHON, "def open")
    assert doc.heading_path(offset_of(PYTHON, "pass")) == "class Store > def open"
    assert doc.heading_path(offset_of(PYTHON, "hidden")) == "def main"
    assert doc.heading_path(offset_of(PYTHON, "VALUE")) == "def main"
    assert doc.line_at(offset_of(PYTHON, "async def close")) == 15
    assert doc.heading_path(offset_of(PYTHON, "typed")) == "class Store > async def close"


def test_other_code_has_no_headings(tmp_path: Path) -> None:
    source = "// main\nfunction main() {\n  return 1;\n}\n"
    doc = parse_file(write(tmp_path, "main.js", source))
    assert doc.text == source and doc.headings == []


# --- HTML ------------------------------------------------------------------------------------

HTML = """<!DOCTYPE html>
<html><head><title>Ignored title</title><style>body { color: red }</style></head>
<body>
<script>var secret = "do not index";</script>
<noscript>enable js</noscript>
<h1>Main   <em>Title</em></h1>
<p>First    paragraph
   spans lines.<br>After break.</p>
<!-- a comment -->
<h2>Section A</h2>
<ul><li>one</li><li>two</li></ul>
<table><tr><th>Name</th> <th>Age</th></tr><tr><td>Ada</td><td>36</td></tr></table>
<h3>Deep</h3>
<pre>
  keep   this
    spacing</pre>
<h2>Section B</h2><div>tail <span>text</span></div>
</body></html>
"""


def test_html(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "page.html", HTML))
    assert doc.text == (
        "Main Title\n\nFirst paragraph spans lines.\nAfter break.\n\nSection A\n\none\ntwo\n\n"
        "Name | Age\nAda | 36\n\nDeep\n\n  keep   this\n    spacing\n\nSection B\n\ntail text"
    )
    assert [(h.start, h.level, h.title) for h in doc.headings] == [
        (0, 1, "Main Title"),
        (offset_of(doc.text, "Section A"), 2, "Section A"),
        (offset_of(doc.text, "Deep"), 3, "Deep"),
        (offset_of(doc.text, "Section B"), 2, "Section B"),
    ]
    assert doc.heading_path(offset_of(doc.text, "Ada")) == "Main Title > Section A"
    assert doc.heading_path(offset_of(doc.text, "spacing")) == "Main Title > Section A > Deep"
    assert doc.heading_path(offset_of(doc.text, "tail")) == "Main Title > Section B"
    assert doc.line_at(offset_of(doc.text, "After break")) == 4


def test_html_title_is_a_heading_without_h1(tmp_path: Path) -> None:
    page = "<html><head><title> The  Page </title></head><body><h2>Part</h2><p>x</p></body></html>"
    doc = parse_file(write(tmp_path, "t.htm", page))
    assert doc.text == "Part\n\nx"
    assert doc.heading_path(offset_of(doc.text, "x")) == "The Page > Part"


@pytest.mark.parametrize("tail", ["", "</body></html>"])
def test_html_head_left_open(tmp_path: Path, tail: str) -> None:
    # without </head>, html.parser puts the body inside <head>: its text must still be read
    page = "<html><head><title>T</title><body><p>Some text\u2026</p>" + tail
    doc = parse_file(write(tmp_path, "open-head.html", page))
    assert doc.text == "Some text\u2026"
    assert [(h.start, h.level, h.title) for h in doc.headings] == [(0, 1, "T")]


def test_html_head_left_open_keeps_its_scripts_and_styles_out(tmp_path: Path) -> None:
    page = (
        '<html><head><meta charset="utf-8"><title>Page</title><link rel="stylesheet" href="a.css">'
        "<style>p { color: red }</style><script>var hidden = 1;</script>"
        "<body><h2>Part</h2><p>Body text</p><noscript>enable scripts</noscript>"
    )
    doc = parse_file(write(tmp_path, "open-head.html", page))
    assert doc.text == "Part\n\nBody text"
    assert doc.heading_path(offset_of(doc.text, "Body")) == "Page > Part"


def test_html_without_text(tmp_path: Path) -> None:
    page = "<html><script>x()</script><p> </p></html>"
    assert reason(write(tmp_path, "blank.html", page)) == "no extractable text"


def test_deeply_nested_html(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "deep.html", "<div>" * 3000 + "bottom" + "</div>" * 3000))
    assert doc.text == "bottom"


def test_library_warnings_do_not_escape(tmp_path: Path) -> None:
    # Beautiful Soup warns when a page looks like a URL; Python would print that on stderr
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        doc = parse_file(write(tmp_path, "link.html", "https://example.com/page"))
    assert doc.text == "https://example.com/page"
    assert escaped == []


# --- DOCX ------------------------------------------------------------------------------------


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Annual Report", level=0)  # style "Title"
    document.add_paragraph("Opening paragraph.")
    document.add_heading("Results", level=1)
    document.add_paragraph("Revenue grew.")
    table = document.add_table(rows=2, cols=3)
    for row, values in zip(table.rows, [("Year", "Revenue", "Margin"), ("2024", "10", "5%")]):
        for cell, value in zip(row.cells, values):
            cell.text = value
    document.add_paragraph("")
    document.add_heading("Details", level=2)
    document.add_paragraph("Fine print.")
    document.save(path)
    return path


def test_docx(tmp_path: Path) -> None:
    doc = parse_file(make_docx(tmp_path / "report.docx"))
    assert doc.text == (
        "Annual Report\n\nOpening paragraph.\n\nResults\n\nRevenue grew.\n\n"
        "Year | Revenue | Margin\n2024 | 10 | 5%\n\nDetails\n\nFine print."
    )
    assert [(h.start, h.level, h.title) for h in doc.headings] == [
        (0, 1, "Annual Report"),
        (offset_of(doc.text, "Results"), 1, "Results"),
        (offset_of(doc.text, "Details"), 2, "Details"),
    ]
    assert doc.heading_path(offset_of(doc.text, "Opening")) == "Annual Report"
    assert doc.heading_path(offset_of(doc.text, "2024")) == "Results"
    assert doc.heading_path(offset_of(doc.text, "Fine print")) == "Results > Details"
    assert doc.line_at(offset_of(doc.text, "2024")) == 10


@pytest.mark.parametrize("content", [b"not a zip file", b"PK\x03\x04garbage"])
def test_docx_corrupt(tmp_path: Path, content: bytes) -> None:
    message = reason(write(tmp_path, "bad.docx", content))
    assert message.startswith("corrupt DOCX: ") and "\n" not in message


def test_docx_that_is_another_zip(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "fake.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    assert reason(path).startswith("corrupt DOCX: ")


def test_form_feeds_in_text_are_pages(tmp_path):
    path = tmp_path / "filing.txt"
    path.write_text("Cover page\nline two\fSecond page first line\nsecond line\fThird\n")
    doc = parse_file(path)
    assert doc.pages == [0, 20, 55]
    offset = doc.text.index("second line")
    assert (doc.page_at(offset), doc.line_at(offset)) == (2, 2)
    assert doc.page_at(doc.text.index("Third")) == 3


def test_sphinx_rst_txt_is_parsed_as_rst(tmp_path):
    path = tmp_path / "page.rst.txt"
    path.write_text("Title\n=====\n\nBody text.\n\nSection\n-------\n\nMore.\n")
    doc = parse_file(path)
    assert [(h.level, h.title) for h in doc.headings] == [(1, "Title"), (2, "Section")]


def test_html_heading_left_unclosed_ends_where_the_text_begins(tmp_path: Path) -> None:
    """html.parser nests what follows `<h1>Title` inside the heading: the blocks there are the page's text."""
    page = "<h1>Java<sup>TM</sup> guide<p>unclosed <b>bold</b> oil embargo text<h2>Next</h2><p>More text.</p>"
    doc = parse_file(write(tmp_path, "open-heading.html", page))
    assert doc.text == "JavaTM guide\n\nunclosed bold oil embargo text\n\nNext\n\nMore text."
    assert [(h.level, h.title, h.start) for h in doc.headings] == [(1, "JavaTM guide", 0),
                                                                 (2, "Next", doc.text.index("Next"))]
