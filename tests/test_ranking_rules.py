"""The ranking rules of hybrid search: retriever weights and the numbers of document names."""

from __future__ import annotations

from test_context import FILINGS, write

from ragkit.api import Index
from ragkit.config import Settings
from ragkit.fusion import FusionRule, fuse
from ragkit.names import NameMatcher, terms


def test_a_weight_of_zero_leaves_a_retriever_out():
    runs = {"dense": [(1, 0.9), (2, 0.8), (3, 0.7)], "bm25": [(3, 12.0), (2, 9.0)]}
    assert [row for row, _, _ in fuse(runs, FusionRule())] == [3, 2, 1]
    assert [row for row, _, _ in fuse(runs, FusionRule(weights={"bm25": 0.0}))] == [1, 2, 3]
    assert fuse(runs, FusionRule(method="convex", weights={"dense": 0.0}))[0][0] == 3


def test_the_year_a_question_names_picks_that_years_filing(tmp_path, tiny_encoder):
    """Without contexts BM25 cannot see the names: only the name rule tells 2018's filing from 2022's."""
    docs = write(tmp_path / "docs", FILINGS)
    top = {}
    for weight in (0.0, 1.0):
        index = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False, context_tokens=0,
                                                   dense_weight=0.0, name_weight=weight))
        index.add(docs)
        top[weight] = [h.chunk.path for h in index.search("What was Acme's total revenue in FY2018?", k=2)]
    assert top[0.0][0] == "acme_2022_annual.txt"
    assert top[1.0] == ["acme_2018_annual.txt", "acme_2022_annual.txt"]


def test_only_the_numbers_of_a_name_are_matched():
    matcher = NameMatcher(["European_Union_law.txt", "Apollo_program.txt", "1973_oil_crisis.txt",
                           "reports/2019/q3.txt", "reports/2020/q3.txt"])
    assert matcher.scores("What law imposed the speed limit?") == {}
    assert matcher.scores("What did the oil embargo of 1973 cost?") == {"1973_oil_crisis.txt": 1.0}
    scores = matcher.scores("Revenue in Q3 2019")  # q3 is in two names, 2019 in one
    assert set(scores) == {"reports/2019/q3.txt", "reports/2020/q3.txt"}
    assert scores["reports/2019/q3.txt"] == 1.0 > scores["reports/2020/q3.txt"]


def test_periods_yield_their_years():
    assert {"2018"} <= terms("FY2018") and {"2018"} <= terms("fy18") and {"2021"} <= terms("Q3-2021")
    assert "2020" in terms("in H1 2020") and "2018" not in terms("on page 18 of the report")
    assert not {"2002", "2003"} & terms("FY 2-3 weeks")


def test_a_quarter_finds_the_quarterly_report_of_its_year():
    matcher = NameMatcher(["AMCOR_2023Q2_10Q.txt", "AMCOR_2023_10K.txt", "AMCOR_2022_10K.txt"])
    scores = matcher.scores("What was Amcor's net sales in Q2 2023?")
    assert max(scores, key=scores.get) == "AMCOR_2023Q2_10Q.txt" and "AMCOR_2022_10K.txt" not in scores


def test_the_name_rule_holds_through_the_maxsim_rerank(tmp_path, tiny_encoder, tiny_colbert, monkeypatch):
    """With a late stage the top candidates are re-ordered by MaxSim; a named year still decides, even when MaxSim
    puts that year's filing last."""
    import numpy as np

    from ragkit.indexes.late import LateIndex

    years = (2016, 2017, 2018, 2019, 2020)
    docs = write(tmp_path / "docs", {f"acme_{year}_annual.txt": "Total revenue grew in the year under review.\n"
                                     for year in years})
    named_row = years.index(2018)  # one chunk per file, files in path order
    monkeypatch.setattr(LateIndex, "maxsim", lambda self, query, rows: np.where(rows == named_row, 9.0,
                                                                                 10.0 + 0.1 * rows))
    order = {}
    for weight in (0.0, 0.5):
        index = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert),
                                                   context_tokens=0, name_weight=weight))
        index.add(docs)
        order[weight] = [h.chunk.path for h in index.search("What was Acme's total revenue in FY2018?", k=5)]
    assert order[0.0][-1] == "acme_2018_annual.txt"  # MaxSim alone
    assert order[0.5][0] == "acme_2018_annual.txt"
