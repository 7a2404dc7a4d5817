"""Whole documents are read for the memory readers only from inside the indexed folder."""

from __future__ import annotations

import pytest

from ragkit.errors import RagkitError
from ragkit.readers.generative import document_texts


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "inside.txt").write_text("Inside the folder.\n")
    (tmp_path / "secret.txt").write_text("Outside the folder.\n")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "near.txt").symlink_to(root / "inside.txt")
    return root


def test_files_inside_the_folder_are_read(folder):
    assert document_texts(folder, ["inside.txt", "near.txt", "inside.txt"]) == ["Inside the folder.\n"] * 2


@pytest.mark.parametrize("rel", ["link.txt", "../secret.txt"])
def test_a_path_leading_outside_is_refused(folder, rel):
    with pytest.raises(RagkitError, match="leads outside the indexed folder"):
        document_texts(folder, [rel])


def test_an_index_built_to_follow_links_reads_through_them(folder):
    assert document_texts(folder, ["link.txt"], follow_links=True) == ["Outside the folder.\n"]
