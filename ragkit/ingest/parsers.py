"""Turn one file into a ParsedDocument: plain text plus headings and pages for citations.

Every parser keeps char offsets meaningful: for text formats (Markdown, reST, code, plain text)
the document text is the decoded file itself, so offsets and line numbers map to the file's own
lines. HTML, PDF (ragkit.ingest.pdf) and DOCX are rendered to plain text first and their structure
is recorded against that rendering.

Anything that should be skipped (unreadable, binary, empty, corrupt, encrypted) raises
ParseError with a short reason for the user. Nothing is printed: what the parsing libraries warn
or log while reading a file is collected into that file's ParsedDocument.warnings (or, for a file
they cannot read, the first of it into the reason).
"""

from __future__ import annotations

import codecs
import io
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragkit.ingest.document import (MAX_MESSAGE, Heading, ParseError, ParsedDocument, line_starts, normalize_newlines,
                                    short_error)
from ragkit.ingest.pdf import parse_pdf

if TYPE_CHECKING:
    from bs4 import Tag
    from markdown_it.token import Token


_TEXT_SUFFIXES = (
    ".txt .js .jsx .ts .tsx .java .kt .scala .go .rs .c .h .cc .cpp .hpp .cs .rb .php .swift .m"
    " .sh .bash .zsh .sql .r .lua .pl .hs .ml .ex .exs .erl .clj .jl .dart .vue .css .scss"
    " .json .yaml .yml .toml .ini .cfg .xml .csv .tsv .tex .org .adoc .log"
).split()
_KINDS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "rst",
    ".py": "python",
    ".pyi": "python",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
} | dict.fromkeys(_TEXT_SUFFIXES, "text")
_TEXT_NAMES = frozenset({"makefile", "dockerfile", "readme", "license", "changelog"})
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE, whose BOM is its prefix
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_MAX_REASON = 120
_MAX_WARNINGS = 20  # library messages kept per file
_LIBRARY_LOGGERS = ("pypdf", "bs4", "docx", "charset_normalizer", "markdown_it")
_CAPTURE_LOCK = threading.RLock()  # the capture swaps process-wide logging and warnings state
_SAMPLE = 65536  # chars of a legacy-encoded file judged when choosing its encoding


def _kind(path: Path) -> str | None:
    """The parser name for `path`, or None if the type is not supported."""
    suffix = path.suffix.lower()
    if not suffix and path.name.lower() in _TEXT_NAMES:
        return "text"
    if suffix == ".txt" and Path(path.stem).suffix.lower() in (".md", ".rst"):  # e.g. Sphinx's page.rst.txt
        return _KINDS[Path(path.stem).suffix.lower()]
    return _KINDS.get(suffix)


def is_supported(path: Path) -> bool:
    """True if ragkit can parse a file with this name.

    >>> is_supported(Path("notes.MD")), is_supported(Path("Makefile")), is_supported(Path("a.png"))
    (True, True, False)
    """
    return _kind(path) is not None


def unsupported_reason(path: Path) -> str:
    """The reason shown for a file whose type is not supported.

    >>> unsupported_reason(Path("photo.PNG")), unsupported_reason(Path("data"))
    ('unsupported file type .png', 'unsupported file type')
    """
    suffix = path.suffix.lower()
    return f"unsupported file type {suffix}" if suffix else "unsupported file type"


def parse_file(path: Path) -> ParsedDocument:
    """Read and parse one file; raise ParseError if it should be skipped."""
    kind = _kind(path)
    if kind is None:
        raise ParseError(unsupported_reason(path))
    data = _read_bytes(path)
    with _library_messages() as messages:
        try:
            doc = _PARSERS[kind](data)
        except ParseError as e:
            if e.damaged and messages:
                raise ParseError(_with_cause(e.reason, messages[0]), damaged=True) from None
            raise
    doc.warnings += [m for m in messages if m not in doc.warnings]
    return doc


@contextmanager
def _library_messages() -> Iterator[list[str]]:
    """Collect what parsing libraries warn or log, instead of letting it reach stderr.

    Yields the list that receives the distinct messages (at most _MAX_WARNINGS), in order.
    """
    messages: list[str] = []
    handler = _Collector(messages)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    with _CAPTURE_LOCK, warnings.catch_warnings(record=True) as caught:
        propagate = [logger.propagate for logger in loggers]
        for logger in loggers:
            logger.addHandler(handler)
            logger.propagate = False
        try:
            yield messages
        finally:
            for logger, before in zip(loggers, propagate):
                logger.removeHandler(handler)
                logger.propagate = before
            for warning in caught:
                handler.keep(str(warning.message))


class _Collector(logging.Handler):
    """A logging handler that keeps the distinct messages of warnings and errors."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.keep(record.getMessage())

    def keep(self, message: str) -> None:
        message = " ".join(message.split())
        if len(message) > 2 * MAX_MESSAGE:
            message = message[: 2 * MAX_MESSAGE - 1] + "…"
        if message and message not in self.messages and len(self.messages) < _MAX_WARNINGS:
            self.messages.append(message)


def _with_cause(reason: str, cause: str) -> str:
    """`reason` followed by what the library logged, bounded to _MAX_REASON chars.

    >>> _with_cause("corrupt PDF: Stream has ended unexpectedly", "EOF marker not found")
    'corrupt PDF: Stream has ended unexpectedly (EOF marker not found)'
    """
    if cause in reason:
        return reason
    combined = f"{reason} ({cause})"
    return combined if len(combined) <= _MAX_REASON else combined[: _MAX_REASON - 2] + "…)"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise ParseError("permission denied") from None
    except OSError as e:
        raise ParseError(f"unreadable: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# Text decoding


def decode_text(data: bytes) -> str:
    r"""Decode file bytes to text with "\n" newlines; raise ParseError for binary or empty data.

    >>> decode_text(b"caf\xe9\r\nna\xefve\rend")
    'café\nnaïve\nend'
    """
    text = normalize_newlines(_decode(data))
    if not text.strip():
        raise ParseError("empty file")
    return text


def _decode(data: bytes) -> str:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    if b"\x00" in data[:8192]:  # valid UTF-8 may hold NULs, but text files do not
        raise ParseError("binary content")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _guess_decode(data)


def _guess_decode(data: bytes) -> str:
    """charset_normalizer's best guess, but Windows-1252 wins whenever it reads no worse.

    On short Western European text the guesser often picks a rarer code page (cp1250,
    mac_turkish, even UTF-16), and Windows-1252 (a superset of Latin-1's printable range)
    is by far the most common legacy encoding.
    """
    import charset_normalizer
    from charset_normalizer.md import mess_ratio

    best = charset_normalizer.from_bytes(data).best()
    try:
        western = data.decode("cp1252")
    except UnicodeDecodeError:
        western = None
    if western is not None and (best is None or mess_ratio(western[:_SAMPLE], 1.0) <= best.chaos):
        return western
    return str(best) if best is not None else data.decode("latin-1")


def _parse_text(data: bytes) -> ParsedDocument:
    text = decode_text(data)
    return ParsedDocument(text, pages=_form_feed_pages(text))


def _form_feed_pages(text: str) -> list[int]:
    """Page starts of a text export of a paged document (pdftotext separates pages with form feeds)."""
    if "\f" not in text:
        return []
    return [0] + [m.end() for m in re.finditer("\f", text) if m.end() < len(text)]


# ---------------------------------------------------------------------------------------------
# Markdown and reStructuredText: the text is the source, headings point at their lines


def _parse_markdown(data: bytes) -> ParsedDocument:
    from markdown_it import MarkdownIt

    text = decode_text(data)
    starts = line_starts(text)
    tokens = MarkdownIt("commonmark").parse(text)
    headings = []
    for token, inline in zip(tokens, tokens[1:]):
        if token.type != "heading_open" or token.map is None:
            continue
        title = _inline_text(inline.children or [])
        if title:
            headings.append(Heading(starts[token.map[0]], int(token.tag[1:]), title))
    return ParsedDocument(text, headings)


def _inline_text(children: Iterable[Token]) -> str:
    """Plain text of a markdown-it inline token's children (markup dropped)."""
    parts = []
    for child in children:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.children:
            parts.append(_inline_text(child.children))
    return " ".join("".join(parts).split())


_RST_ADORNMENT = re.compile(r"""([=\-~^"'`#*+:._])\1+""")


def _parse_rst(data: bytes) -> ParsedDocument:
    """Section titles are levelled by the order in which their adornment styles first appear."""
    text = decode_text(data)
    styles: list[tuple[str, bool]] = []
    headings = []
    for start, title, style in _rst_titles(text.split("\n"), line_starts(text)):
        if style not in styles:
            styles.append(style)
        headings.append(Heading(start, styles.index(style) + 1, title))
    return ParsedDocument(text, headings)


def _rst_titles(lines: list[str], starts: list[int]) -> Iterator[tuple[int, str, tuple[str, bool]]]:
    """Yield (start offset, title, (adornment char, has overline)) for each section title."""
    for i, (line, under) in enumerate(zip(lines, lines[1:])):
        title, under = line.strip(), under.rstrip()
        if not title or not _RST_ADORNMENT.fullmatch(under) or len(under) < len(title):
            continue
        if _RST_ADORNMENT.fullmatch(line.rstrip()):
            continue  # an overline or a transition, not a title
        above = lines[i - 1].rstrip() if i else ""
        has_overline = above == under
        if has_overline or (not above and not line[0].isspace()):
            first = i - 1 if has_overline else i
            yield starts[first], title, (under[0], has_overline)


# ---------------------------------------------------------------------------------------------
# Python: top-level classes and functions, and the methods of top-level classes

_PY_DEF = re.compile(r"([ \t]*)(class|def|async[ \t]+def)[ \t]+(\w+)")


def _parse_python(data: bytes) -> ParsedDocument:
    text = decode_text(data)
    return ParsedDocument(text, _python_headings(text))


def _python_headings(text: str) -> list[Heading]:
    """Level 1: top-level `class`/`def`; level 2: methods directly inside a top-level class."""
    headings = []
    in_class = False
    method_indent = ""
    offset = 0
    for line in text.split("\n"):
        match = _PY_DEF.match(line)
        if match:
            indent, keyword, name = match.groups()
            title = f"{' '.join(keyword.split())} {name}"
            if not indent:
                headings.append(Heading(offset, 1, title))
                in_class, method_indent = keyword == "class", ""
            elif in_class and keyword != "class" and indent == (method_indent or indent):
                method_indent = indent
                headings.append(Heading(offset + len(indent), 2, title))
        elif line[:1].isalpha() or line[:1] == "_":
            in_class = False  # other top-level code ends the class body
        offset += len(line) + 1
    return headings


# ---------------------------------------------------------------------------------------------
# HTML: rendered to plain text; blocks are separated by blank lines, list items and table rows
# by single newlines, table cells by " | "

# Not "head": html.parser nests a body that follows an unclosed <head> inside it. The head's other
# children (meta, link, base) hold no text.
_HTML_DROP = ["script", "style", "noscript", "template", "title"]
_HTML_BLOCKS = frozenset(
    "address article aside blockquote body caption dd details dialog div dl dt fieldset"
    " figcaption figure footer form header hr html legend main nav ol p section summary"
    " table tbody tfoot thead ul".split()
)
_HTML_LINES = frozenset({"li", "tr"})
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_HTML_ENDS_HEADING = _HTML_BLOCKS | _HTML_LINES | _HTML_HEADINGS | {"pre"}  # what an unclosed heading cannot hold
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")


class _TextBuilder:
    """Accumulates rendered text; separators are written lazily, only between two pieces of text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.block_break = ""  # pending "\n" or "\n\n"
        self.inline_break = ""  # pending " " or " | "

    def write(self, chunk: str) -> int:
        """Append `chunk` after any pending separator; return the offset where it starts."""
        if self.parts:
            self._append(self.block_break or self.inline_break)
        self.block_break = self.inline_break = ""
        start = self.length
        self._append(chunk)
        return start

    def inline_text(self, raw: str) -> None:
        """Append text with whitespace collapsed as a browser would."""
        collapsed = _HTML_SPACE.sub(" ", raw)
        if collapsed.startswith(" ") and not self.inline_break:
            self.inline_break = " "
        if collapsed.strip(" "):
            self.write(collapsed.strip(" "))
            self.inline_break = " " if collapsed.endswith(" ") else ""

    def end_cell(self) -> None:
        self.inline_break = " | "

    def end_block(self, separator: str = "\n\n") -> None:
        if len(separator) > len(self.block_break):
            self.block_break = separator
        self.inline_break = ""

    def line_break(self) -> None:
        self.block_break = (self.block_break + "\n")[:2]

    def text(self) -> str:
        return "".join(self.parts)

    def _append(self, chunk: str) -> None:
        self.parts.append(chunk)
        self.length += len(chunk)


def _parse_html(data: bytes) -> ParsedDocument:
    """Render HTML to text. The <title> becomes a level-1 heading at offset 0 when there is no <h1>."""
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning, XMLParsedAsHTMLWarning

    with warnings.catch_warnings():  # a page that is only a URL, or XHTML, is still read as text
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
        soup = BeautifulSoup(decode_text(data), "html.parser")
    title = " ".join(soup.title.get_text(" ").split()) if soup.title else ""
    for tag in soup.find_all(_HTML_DROP):
        tag.decompose()
    builder = _TextBuilder()
    headings = _render_html(soup, builder)
    if not builder.parts:
        raise ParseError("no extractable text")
    if title and not any(h.level == 1 for h in headings):
        headings.insert(0, Heading(0, 1, title))
    return ParsedDocument(builder.text(), headings)


def _render_html(root: Tag, builder: _TextBuilder) -> list[Heading]:
    """Walk the tree with an explicit stack (pages can nest deeper than Python's recursion limit).

    The stack holds nodes still to visit and callbacks that close the elements being visited.
    """
    from bs4 import NavigableString, Tag
    from bs4.element import PreformattedString

    headings: list[Heading] = []
    stack: list[Any] = list(reversed(root.contents))
    while stack:
        node = stack.pop()
        if isinstance(node, Tag):
            if node.name in _HTML_HEADINGS or node.name == "pre":
                stack.extend(reversed(_render_atomic(node, builder, headings)))
            else:
                stack.extend(_html_closer(node.name, builder))
                stack.extend(reversed(node.contents))
        elif isinstance(node, PreformattedString):
            continue  # comments, doctypes, CDATA, processing instructions
        elif isinstance(node, NavigableString):
            builder.inline_text(str(node))
        else:
            node()
    return headings


def _html_closer(name: str, builder: _TextBuilder) -> list[Callable[[], None]]:
    """Open element `name`; return the callback (if any) that closes it."""
    if name == "br":
        builder.line_break()
    elif name in ("td", "th"):
        return [builder.end_cell]
    elif name in _HTML_BLOCKS or name in _HTML_LINES:
        separator = "\n" if name in _HTML_LINES else "\n\n"
        builder.end_block(separator)
        return [lambda: builder.end_block(separator)]
    return []


def _render_atomic(node: Tag, builder: _TextBuilder, headings: list[Heading]) -> list[Any]:
    """A heading (collapsed, recorded) or a <pre> block (verbatim) as a block of its own. Returns what follows a
    heading left unclosed: html.parser nests the blocks after `<h1>Title` inside it, which are the page's text, not
    its title."""
    builder.end_block()
    rest: list[Any] = []
    if node.name == "pre":
        content = node.get_text().removeprefix("\n").rstrip()
    else:
        inside = list(node.contents)
        cut = next((i for i, child in enumerate(inside) if getattr(child, "name", None) in _HTML_ENDS_HEADING),
                   len(inside))
        inside, rest = inside[:cut], inside[cut:]
        content = " ".join("".join(child.get_text() for child in inside).split())  # a comment's text is ""
    if content.strip():
        start = builder.write(content)
        if node.name != "pre":
            headings.append(Heading(start, int(node.name[1]), content))
    builder.end_block()
    return rest


# ---------------------------------------------------------------------------------------------
# DOCX: paragraphs and tables in document order, separated by blank lines.
# Heading levels: "Title" -> 1 and "Heading N" -> N, so Title and Heading 1 are both top level.

_DOCX_HEADING = re.compile(r"heading ?([1-9])", re.IGNORECASE)


def _parse_docx(data: bytes) -> ParsedDocument:
    try:
        blocks = list(_docx_blocks(data))
    except Exception as e:  # not a zip, missing parts, malformed XML
        raise ParseError(f"corrupt DOCX: {short_error(e)}", damaged=True) from None
    parts: list[str] = []
    headings = []
    offset = 0
    for text, level in blocks:
        if level is not None:
            headings.append(Heading(offset, level, " ".join(text.split())))
        parts.append(text)
        offset += len(text) + 2
    if not parts:
        raise ParseError("no extractable text")
    return ParsedDocument("\n\n".join(parts), headings)


def _docx_blocks(data: bytes) -> Iterator[tuple[str, int | None]]:
    """Yield (text, heading level or None) for each non-empty paragraph and table."""
    import docx
    from docx.table import Table

    for item in docx.Document(io.BytesIO(data)).iter_inner_content():
        if isinstance(item, Table):
            rows = [" | ".join(" ".join(cell.text.split()) for cell in row.cells) for row in item.rows]
            table = "\n".join(row for row in rows if row.strip(" |"))
            if table:
                yield table, None
        elif item.text.strip():
            yield normalize_newlines(item.text), _docx_level(item.style.name if item.style else "")


def _docx_level(style: str | None) -> int | None:
    if style == "Title":
        return 1
    match = _DOCX_HEADING.fullmatch(style or "")
    return int(match.group(1)) if match else None


_PARSERS: dict[str, Callable[[bytes], ParsedDocument]] = {
    "text": _parse_text,
    "markdown": _parse_markdown,
    "rst": _parse_rst,
    "python": _parse_python,
    "html": _parse_html,
    "pdf": parse_pdf,
    "docx": _parse_docx,
}
