"""The shared token helpers: word tokens, a tokenizer's ids of a whole document, length-bounded batches."""

from __future__ import annotations

import subprocess
import sys

from ragkit.tokens import token_batches, token_ids, tokenize


def test_importing_the_helpers_loads_no_model_library():
    code = ("import sys, ragkit.tokens; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'bm25s') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_word_tokens_are_stemmed_without_stop_words():
    assert tokenize(["The prices of oil are rising"]) == [["price", "oil", "rise"]]


def test_batches_bound_the_padded_tokens():
    n_tokens = [10, 8, 5, 5, 1]
    assert token_batches([0, 1, 2, 3, 4], n_tokens, 20) == [[0, 1], [2, 3, 4]]
    assert token_batches([0], n_tokens, 4) == [[0]]  # a text longer than the budget still gets a batch


def test_token_ids_of_a_whole_document_skip_specials_and_the_length_check(tmp_path):
    from models import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    tokenizer.model_max_length = 4
    text = "the quick brown fox jumps over the lazy dog " * 5
    ids = token_ids(tokenizer, text)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4 and tokenizer.cls_token_id not in ids


def test_token_ids_fall_back_to_encode_without_a_backend():
    class Plain:
        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()] + ([0] if add_special_tokens else [])

    assert token_ids(Plain(), "ab cde") == [2, 3]
