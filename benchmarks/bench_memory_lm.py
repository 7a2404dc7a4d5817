"""Does a trained memory let a real language model use text beyond its window? Perplexity per position on held-out
real documents, for memory readers trained by `ragkit reader train --recipe recipes/lm-*-smollm2.toml`.

    python benchmarks/bench_memory_lm.py --checkpoint ck/infini --checkpoint ck/hmt     # trained readers
    python benchmarks/bench_memory_lm.py --checkpoint ck/infini --docs 4 --tokens 1024 --no-record

The documents are those the recipe held out of training (a share of the files of its data folders, chosen by a
hash of their names), each cut to its first `--tokens` tokens. Every token is scored in four ways:
- backbone, whole text: the backbone reads the whole cut at once (exact attention over everything before);
- backbone, one segment at a time: each segment of the reader's length read alone (what the reader sees locally);
- memory reader: the trained reader, segment by segment, with its memory;
- memory off: the same reader with its memory shut (Infini-attention: gates shut, which is exactly the segment-at-
  a-time backbone; HMT: no memory tokens, the sensory tokens kept).
Perplexity is exp(mean negative log-likelihood) over the tokens of each position bucket, pooled over documents. The
first segment has nothing before it, so there the memory cannot help; a memory gain that does not grow with position
is not a memory gain.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record  # noqa: E402

MODES = ("backbone, whole text", "backbone, one segment at a time", "memory reader", "memory off")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, action="append", required=True,
                        help="a reader checkpoint written by `ragkit reader train --recipe` on documents")
    parser.add_argument("--docs", type=int, default=6, help="held-out documents scored (the first, by name)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens read of each document")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print the table, add no RESULTS.md entry")
    return parser.parse_args(argv)


def buckets(segment: int, tokens: int) -> list[tuple[int, int]]:
    """Position buckets: the first segment, then doubling ranges up to `tokens`.

    >>> buckets(128, 1024)
    [(0, 128), (128, 256), (256, 512), (512, 1024)]
    """
    edges = [0, segment]
    while edges[-1] < tokens:
        edges.append(min(edges[-1] * 2, tokens))
    return list(zip(edges[:-1], edges[1:]))


def held_out_documents(recipe: dict[str, Any], tokenizer: Any, count: int, tokens: int) -> list[tuple[str, list[int]]]:
    """(name, first `tokens` ids) of the first `count` held-out documents of the recipe with at least that many."""
    from ragkit.ingest.parsers import parse_file
    from ragkit.ingest.sources import scan_folder
    from ragkit.memory.tasks import held_out
    from ragkit.tokens import token_ids

    task = recipe["task"]
    files = sorted((s.path for folder in task["data"] for s in scan_folder(Path(folder)).files
                    if held_out(s.path.name, task.get("holdout", 0.0))), key=lambda p: p.name)
    docs = []
    for path in files:
        ids = token_ids(tokenizer, parse_file(path).text)
        if len(ids) >= tokens:
            docs.append((path.name, ids[:tokens]))
        if len(docs) == count:
            break
    return docs


def trained_steps(meta: dict[str, Any]) -> int | None:
    """Steps the checkpoint was trained for (both of HMT's stages)."""
    stages = meta.get("stages")
    return stages["stage1_steps"] + stages["stage2_steps"] if stages else meta.get("step")


def token_nll(logits: Any, ids: Any) -> Any:
    """Negative log-likelihood of each next token: logits (1, n, V), ids (1, n) → (n - 1,)."""
    import torch

    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return -logp.gather(1, ids[0, 1:, None]).squeeze(1)


def score(reader: Any, backbone: Any, ids: list[int]) -> dict[str, Any]:
    """The negative log-likelihood of every token of `ids` in each mode (positions 1 … n - 1)."""
    import torch

    x = torch.tensor([ids])
    step = reader.config.segment_length
    out: dict[str, Any] = {}
    with torch.no_grad():
        out[MODES[0]] = token_nll(backbone(input_ids=x, use_cache=False).logits, x)
        pieces = [backbone(input_ids=x[:, i : i + step], use_cache=False).logits for i in range(0, x.shape[1], step)]
        out[MODES[1]] = token_nll(torch.cat(pieces, dim=1), x)
        out[MODES[2]] = token_nll(reader(x), x)
        with reader.memory_off():
            out[MODES[3]] = token_nll(reader(x), x)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from ragkit.memory.checkpoints import load_checkpoint, read_checkpoint_meta
    from ragkit.models import load_causal_lm
    from ragkit.readers.lm import load_reader_tokenizer

    runs = []
    started = time.perf_counter()
    for folder in args.checkpoint:
        meta = read_checkpoint_meta(folder)
        recipe = meta["recipe"]
        if not recipe or recipe["objective"] not in ("lm", "facts"):
            raise SystemExit(f"{folder} was not trained on documents by a recipe")
        reader = load_checkpoint(folder)
        backbone = load_causal_lm(recipe["backbone"]).eval()
        docs = held_out_documents(recipe, load_reader_tokenizer(recipe["backbone"]), args.docs, args.tokens)
        edges = buckets(recipe["segment_length"], args.tokens)
        sums = {mode: [0.0] * len(edges) for mode in MODES}
        counts = [0] * len(edges)
        for name, ids in docs:
            t0 = time.perf_counter()
            nll = score(reader, backbone, ids)
            for b, (lo, hi) in enumerate(edges):
                lo = max(lo, 1) - 1  # nll[i] scores token i + 1
                for mode in MODES:
                    sums[mode][b] += float(nll[mode][lo : hi - 1].sum())
                counts[b] += max(hi - 1 - lo, 0)
            print(f"{meta['reader']}: {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        ppl = {mode: [math.exp(s / c) for s, c in zip(sums[mode], counts)] for mode in MODES}
        runs.append({"checkpoint": str(folder), "reader": meta["reader"], "recipe": recipe["name"],
                     "steps": trained_steps(meta), "segment_length": recipe["segment_length"],
                     "docs": [name for name, _ in docs], "buckets": edges,
                     "tokens_per_bucket": counts, "perplexity": ppl,
                     "gates": reader.gate_values().tolist() if reader.gate_values() is not None else None})
    raw = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
           "seconds": time.perf_counter() - started}
    table = tables(raw)
    if args.no_record:
        print(json.dumps(raw, default=str))
        print(table)
    else:
        readers = " and ".join(dict.fromkeys(r["reader"] for r in runs))
        record("bench_memory_lm", f"Memory on a real model: perplexity per position, {readers} around SmolLM2-135M-"
               f"Instruct, held-out documents of {args.tokens:,} tokens", raw, table,
               notes(raw), command=" ".join(["python benchmarks/bench_memory_lm.py", *(argv or sys.argv[1:])]))
    return raw


def tables(raw: dict[str, Any]) -> str:
    lines = []
    for run in raw["runs"]:
        lines += [f"{run['reader']} ({run['recipe']}, {run['steps']} steps), {len(run['docs'])} documents:", "",
                  "| positions | tokens | " + " | ".join(MODES) + " | memory ÷ one segment at a time |",
                  "|---|---|" + "---|" * (len(MODES) + 1)]
        ppl = run["perplexity"]
        for b, (lo, hi) in enumerate(run["buckets"]):
            cells = " | ".join(f"{ppl[mode][b]:.2f}" for mode in MODES)
            gain = ppl[MODES[2]][b] / ppl[MODES[1]][b]
            lines.append(f"| {lo:,}–{hi:,} | {run['tokens_per_bucket'][b]:,} | {cells} | {gain:.3f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def notes(raw: dict[str, Any]) -> str:
    docs = "; ".join(f"{r['reader']}: {', '.join(r['docs'])}" for r in raw["runs"])
    return (f"Perplexity (lower is better) per position bucket, pooled over the documents (held out of training): "
            f"{docs}. Whole command {raw['seconds']:.0f} s.")


if __name__ == "__main__":
    main()
