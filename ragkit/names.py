"""Numbers in document names as evidence: the years, periods and codes of a file's path that a question names.

A folder of filings names its files "3M_2018_10K.pdf"; a question about "3M's FY2018 capital expenditure" names
the year, while the text of every 10-K names the two years before its own too, and a dense encoder barely tells
2018 from 2022. `NameMatcher` scores each document by the inverse document frequency (over the file names) of the
name's numeric terms (terms with a digit: years, dates, periods, codes such as "10k") that the question holds, so
a term every file name shares counts for nothing and one that picks a single file counts most. Words of a name are
left to the contextual chunks (`ragkit.ingest.context`): a question's "law" or "program" says little about which
of "European_Union_law" or "Apollo_program" it is about, and matched as names they mislead.

Terms are lower-cased runs of letters and digits; a fiscal or calendar period ("FY2018", "FY18", "Q3-2021",
"H1 2020", "2023Q2") also yields its year ("2018", "2021", "2020", "2023"), so the question's "FY2018" matches the
file name's "2018" and "Q2 2023" matches "2023Q2".
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Iterable

_TERM = re.compile(r"[a-z0-9]+")
_PERIOD = re.compile(r"\b(?:fy|cy|q[1-4]|h[12])[\s'-]?(\d{4}|\d{2})\b")  # FY2018, FY18, Q3-2021, H1 2020
_YEAR_FIRST = re.compile(r"\b((?:19|20)\d{2})[\s-]?(q[1-4]|h[12])\b")  # 2023Q2, 2023-Q2, 2021 H1
STOPWORDS = frozenset("a an and are as at be by for from how in is it of on or the to was what when which who why "
                      "with".split())


def terms(text: str) -> set[str]:
    """The distinct terms of `text`: lower-cased letter-and-digit runs without stop words, and the year of each
    fiscal or calendar period.

    >>> sorted(terms("What is the FY18 capex of 3M's, and in Q3-2021?"))
    ['2018', '2021', '3m', 'capex', 'fy18', 'q3', 's']
    >>> sorted(terms("AMCOR 2023Q2 10Q"))
    ['10q', '2023', '2023q2', 'amcor', 'q2']
    """
    text = text.lower()
    found = {term for term in _TERM.findall(text) if term not in STOPWORDS}
    found.update(year if len(year) == 4 else "20" + year for year in _PERIOD.findall(text))
    for year, part in _YEAR_FIRST.findall(text):
        found.update((year, part))
    return found


def name_terms(path: str) -> set[str]:
    """The numeric terms of a relative path: those of its folders and its file name without the extension.

    >>> sorted(name_terms("filings/2019/3M_2018_10K.pdf"))
    ['10k', '2018', '2019', '3m']
    """
    parts = PurePosixPath(path).parts
    stem = PurePosixPath(parts[-1]).stem if parts else ""
    return {term for term in terms(" ".join([*parts[:-1], stem.replace("_", " ")])) if any(c.isdigit() for c in term)}


class NameMatcher:
    """Scores documents by the numeric name terms a query holds, weighted by their rarity among the names."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.names = {path: name_terms(path) for path in paths}
        df: dict[str, int] = {}
        for found in self.names.values():
            for term in found:
                df[term] = df.get(term, 0) + 1
        n = len(self.names)
        self.idf = {term: math.log(n / count) for term, count in df.items()}

    def scores(self, query: str) -> dict[str, float]:
        """Each document whose name shares a weighted term with the query, and its score in (0, 1]: its matched
        weight over the best document's.

        >>> matcher = NameMatcher(["3M_2018_10K.txt", "3M_2022_10K.txt", "ADOBE_2018_10K.txt", "ADOBE_2022_10K.txt"])
        >>> {path: round(s, 2) for path, s in matcher.scores("3M FY2018 capital expenditure").items()}
        {'3M_2018_10K.txt': 1.0, '3M_2022_10K.txt': 0.5, 'ADOBE_2018_10K.txt': 0.5}
        """
        asked = terms(query)
        raw = {path: sum(self.idf[t] for t in found & asked) for path, found in self.names.items()}
        best = max(raw.values(), default=0.0)
        return {path: score / best for path, score in raw.items() if score > 0} if best > 0 else {}
