"""A fact planted in a real document, asked at the end: does a trained memory carry it to the question, and does it
beat what a user would otherwise do, retrieving the passage that holds it?

    python benchmarks/bench_memory_facts.py --checkpoint ck/infini --checkpoint ck/hmt
    python benchmarks/bench_memory_facts.py --checkpoint ck/infini --docs 2 --lengths 512 --facts 1 --no-record

For each held-out document of the reader's recipe (as bench_memory_lm.py), each length L (a whole number of the
reader's segments; by default 1, 4, 16 and 64 segments) and each number of facts K, K sentences stating a fact ("The
access code of the Marlow archive is 48213.", distinct subjects) are put at random depths of the document's first L
tokens (`plant_fact`), and a question on one of them closes the sequence in a segment of its own ("Question: What is
the access code of the Marlow archive? Answer: The access code of the Marlow archive is"), so no fact is ever within
the question's segment. The answer's tokens are scored teacher-forced (argmax): the share of them right, and the
share of answers right in full. Five ways to read:
- memory reader: the trained reader streams the document through its memory, then reads the question;
- memory off: the same reader with its memory shut (the question's segment alone: chance);
- another document's memory: the reader streams the next held-out document (its own K facts planted), then reads
  this question: what a memory that does not hold the answer gives (chance, unless the codes leak);
- backbone, whole text: SmolLM2 reads everything at once (the bound, where the text fits its positions);
- retrieval: the document cut into segment-long chunks, ragkit's BM25 index over them, the top 2 chunks (in
  document order) and the question read by the backbone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_memory_lm import held_out_documents, trained_steps  # noqa: E402
from benchmarks.common import record  # noqa: E402

METHODS = ("memory reader", "memory off", "another document's memory", "backbone, whole text",
           "retrieval (BM25, top 2 chunks)")
SHORT = dict(zip(METHODS, ("memory", "off", "other", "whole", "retrieval")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, action="append", required=True)
    parser.add_argument("--docs", type=int, default=6, help="held-out documents, one question each per length")
    parser.add_argument("--lengths", default="128,512,2048,8192", help="tokens of document before the question")
    parser.add_argument("--facts", default="1,4,16", help="facts planted in each document (K)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args(argv)


def answer_scores(logits: Any, ids: list[int], answer: int) -> tuple[int, bool]:
    """(answer tokens right, all right) for the last `answer` tokens of `ids`, teacher-forced. logits (1, n, V)."""
    predicted = logits[0, len(ids) - answer - 1 : len(ids) - 1].argmax(-1).tolist()
    right = sum(p == t for p, t in zip(predicted, ids[-answer:]))
    return right, right == answer


def retrieved(tokenizer: Any, prefix: list[int], question: str, chunk: int, k: int = 2) -> list[int]:
    """The top `k` chunks of `prefix` (token ids, cut every `chunk` tokens) for `question` by ragkit's BM25, in
    document order, as token ids."""
    from ragkit.indexes.bm25 import LexicalIndex

    pieces = [prefix[i : i + chunk] for i in range(0, len(prefix), chunk)]
    index = LexicalIndex.build([tokenizer.decode(p) for p in pieces])
    rows = sorted(row for row, _ in index.search([question], k)[0])
    return [t for r in rows for t in pieces[r]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from ragkit.errors import ConfigError
    from ragkit.memory.checkpoints import load_checkpoint, read_checkpoint_meta
    from ragkit.memory.tasks import plant_fact
    from ragkit.models import load_causal_lm
    from ragkit.readers.lm import load_reader_tokenizer

    lengths = [int(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.facts.split(",")]
    started = time.perf_counter()
    runs = []
    for folder in args.checkpoint:
        meta = read_checkpoint_meta(folder)
        recipe = meta["recipe"]
        reader = load_checkpoint(folder)
        backbone = load_causal_lm(recipe["backbone"]).eval()
        positions = getattr(backbone.config, "max_position_embeddings", None) or max(lengths) * 2
        tokenizer = load_reader_tokenizer(recipe["backbone"])
        segment = recipe["segment_length"]
        docs = held_out_documents(recipe, tokenizer, args.docs, max(lengths))
        rng = random.Random(args.seed)
        cells: dict[str, dict[str, list[float]]] = {}
        for facts in counts:
            for length in lengths:
                if length % segment:
                    raise SystemExit(f"--lengths must be multiples of the reader's segment ({segment})")
                try:
                    planted = [plant_fact(tokenizer, doc[:length], rng, facts) for _, doc in docs]
                except ConfigError as e:  # K facts longer than the document: the cell stays empty
                    print(f"{meta['reader']} K={facts} L={length}: {e}", file=sys.stderr, flush=True)
                    continue
                for i, ((name, _), fact) in enumerate(zip(docs, planted)):
                    ids, other = fact.ids, planted[(i + 1) % len(planted)].ids[:length] + fact.ids[length:]
                    x = torch.tensor([ids])
                    with torch.no_grad():
                        scores = {METHODS[0]: answer_scores(reader(x), ids, fact.answer_tokens)}
                        with reader.memory_off():
                            scores[METHODS[1]] = answer_scores(reader(x), ids, fact.answer_tokens)
                        if len(docs) > 1:
                            scores[METHODS[2]] = answer_scores(reader(torch.tensor([other])), other,
                                                               fact.answer_tokens)
                        if len(ids) <= positions:
                            scores[METHODS[3]] = answer_scores(backbone(input_ids=x, use_cache=False).logits, ids,
                                                               fact.answer_tokens)
                        near = retrieved(tokenizer, ids[:length], fact.question, segment) + ids[length:]
                        scores[METHODS[4]] = answer_scores(backbone(input_ids=torch.tensor([near]), use_cache=False)
                                                           .logits, near, fact.answer_tokens)
                    for method, (right, whole) in scores.items():
                        cell = cells.setdefault(f"{facts}|{length}|{method}", {"tokens": [], "whole": []})
                        cell["tokens"].append(right / fact.answer_tokens)
                        cell["whole"].append(float(whole))
                    print(f"{meta['reader']} K={facts} L={length} {name}: " + ", ".join(
                        f"{SHORT[m]} {r}/{fact.answer_tokens}" for m, (r, _) in scores.items()),
                        file=sys.stderr, flush=True)
        runs.append({"checkpoint": str(folder), "reader": meta["reader"], "recipe": recipe["name"],
                     "steps": trained_steps(meta), "segment_length": segment, "docs": [n for n, _ in docs],
                     "cells": {k: {"tokens": sum(v["tokens"]) / len(v["tokens"]),
                                   "whole": sum(v["whole"]) / len(v["whole"]), "n": len(v["whole"])}
                               for k, v in cells.items()}})
    raw = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
           "seconds": time.perf_counter() - started}
    table = tables(raw, lengths)
    if args.no_record:
        print(json.dumps(raw, default=str))
        print(table)
    else:
        readers = " and ".join(dict.fromkeys(r["reader"] for r in runs))
        record("bench_memory_facts", f"Memory on a real model: a fact planted in a held-out document, {readers} "
               "around SmolLM2-135M-Instruct against retrieval", raw, table,
               f"Cells: answer tokens right (teacher-forced argmax) / answers right in full, over {args.docs} "
               f"documents per length and K, one question each; — where the text is longer than the backbone's "
               f"positions. Whole command {raw['seconds']:.0f} s.",
               command=" ".join(["python benchmarks/bench_memory_facts.py", *(argv or sys.argv[1:])]))
    return raw


def tables(raw: dict[str, Any], lengths: list[int]) -> str:
    lines = ["| reader | facts (K) | tokens before the question | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for run in raw["runs"]:
        counts = sorted({int(key.split("|")[0]) for key in run["cells"]})
        for facts in counts:
            for length in lengths:
                cells = [run["cells"].get(f"{facts}|{length}|{m}") for m in METHODS]
                text = " | ".join(f"{c['tokens']:.2f} / {c['whole']:.2f}" if c else "—" for c in cells)
                lines.append(f"| {run['reader']} ({run['recipe']}) | {facts} | {length:,} "
                             f"({length // run['segment_length']} segments) | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
