"""Dense encoder backends side by side (torch, ONNX float32, ONNX int8), and the cold start of a query, in one run.

    python benchmarks/bench_encoders.py [--sets squad-v1.1-dev qmsum pubmedqa-pqal leval-longdoc] [--questions 500]

Model: the embedded all-MiniLM-L6-v2 (chunks of at most 256 tokens, as ragkit cuts them for it). Per eval set:
- encoding rate: tokens/s of each backend over the same chunk texts (those of the set's index, without their
  context prefix), batched as ragkit batches them, in this process, one after the other;
- quality: the set is indexed with the torch and with the onnx-int8 backend (no late stage) and recall@1, recall@5
  and evidence_hit@5 measured in dense and hybrid mode on the first N dev questions (ONNX float32 gives torch's
  vectors, so its index is not built again: its largest difference to torch's vectors is reported instead).
Long chunks: the same three backends on a ModernBERT-base-shaped encoder (22 layers, 768 wide, 8,192 positions) with
random weights, built here (no long-context model can be downloaded; weights do not change the work), on texts of
512 and 2,048 tokens (ONNX Runtime's unfused attention holds tokens² scores per head: at 8,192 tokens a first run
ran out of 24 GiB while checking its export, and a second one reached 22 GiB at 2,048; the ONNX backends now take
chunks of at most MAX_TOKENS).
Cold query: wall time and peak memory of `ragkit search` (hybrid, the default) and `ragkit ask --reader extractive`
in a fresh process, query through ONNX Runtime against RAGKIT_ONNX_QUERIES=false (torch), median of 5 runs each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, minilm_model, record  # noqa: E402

BACKENDS = ("torch", "onnx", "onnx-int8")
QUALITY_KEYS = ("recall@1", "recall@5", "evidence_hit@5")


def encoding_rates(model: str, texts: list[str], n_tokens: list[int], repeats: int = 1) -> dict[str, float]:
    """Tokens/s of each backend over `texts` (best of `repeats`), and ONNX float32's largest difference to torch."""
    import numpy as np

    from ragkit.encoders.dense import DenseEncoder

    out, vectors = {}, {}
    for backend in BACKENDS:
        encoder = DenseEncoder(model, device="cpu", backend=backend)
        encoder.encode_documents(texts[:64], n_tokens[:64])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            vectors[backend] = encoder.encode_documents(texts, n_tokens)
            best = min(best, time.perf_counter() - started)
        out[backend] = sum(n_tokens) / best
    out["onnx_max_abs_diff"] = float(np.abs(vectors["onnx"] - vectors["torch"]).max())
    out["int8_mean_cosine"] = float((vectors["onnx-int8"] * vectors["torch"]).sum(axis=1).mean())
    return out


def quality(dataset: Path, model: str, backend: str, workdir: Path, n_questions: int) -> dict:
    """Index `dataset` with `backend` and measure dense and hybrid retrieval on its first questions."""
    from ragkit.api import Index
    from ragkit.config import Settings
    from ragkit.evaluate import evaluate, load_questions

    idx = Index(workdir / f"{dataset.name}-{backend}", Settings(dense_model=model, dense_backend=backend, late=False))
    started = time.perf_counter()
    report = idx.add(dataset / "docs")
    seconds = time.perf_counter() - started
    questions = load_questions(dataset / "questions.jsonl", dataset / "docs", limit=n_questions)
    out = {"index_seconds": seconds, "chunks": report.chunks, "tokens": report.encoded_tokens}
    for mode in ("dense", "hybrid"):
        summary = evaluate(idx, questions, mode, answer=False).summary
        out[mode] = {key: summary[key] for key in QUALITY_KEYS}
    return out


def long_chunk_rates(workdir: Path, lengths=(512, 2048), budget_tokens: int = 16384) -> dict[int, dict]:
    """Tokens/s of each backend on a ModernBERT-base-shaped model with random weights, per text length."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertModel

    from ragkit.encoders.dense import DenseEncoder
    from ragkit.encoders.onnx import MAX_TOKENS as ONNX_MAX_TOKENS

    folder = workdir / "modernbert-base-shaped"
    if not (folder / "modules.json").is_file():
        config = ModernBertConfig(vocab_size=30522, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                                  num_attention_heads=12, max_position_embeddings=8192, pad_token_id=0,
                                  cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102)
        raw = workdir / "modernbert-raw"
        ModernBertModel(config).save_pretrained(raw)
        AutoTokenizer.from_pretrained(minilm_model()).save_pretrained(raw)
        transformer = models.Transformer(str(raw), max_seq_length=8192)
        pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
        SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(folder))
    words = (DATA / "qmsum" / "docs").glob("*")
    text = " ".join(p.read_text(errors="replace") for p in sorted(words))
    out: dict[int, dict] = {}
    encoders = {backend: DenseEncoder(str(folder), device="cpu", backend=backend) for backend in BACKENDS}
    tokenizer = encoders["torch"].tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for length in lengths:
        count = max(1, budget_tokens // length)
        texts = [tokenizer.decode(ids[i * length : (i + 1) * length - 2]) for i in range(count)]
        n_tokens = [encoders["torch"].count_tokens(t) for t in texts]
        out[length] = {}
        for backend, encoder in encoders.items():
            if backend != "torch" and length > ONNX_MAX_TOKENS:
                continue
            encoder.encode_documents(texts[:1], n_tokens[:1])  # warm-up
            started = time.perf_counter()
            encoder.encode_documents(texts, n_tokens)
            out[length][backend] = sum(n_tokens) / (time.perf_counter() - started)
    return out


def cold_runs(args: list[str], env: dict[str, str], runs: int = 5) -> dict[str, float]:
    """Median wall seconds and peak resident memory (MiB, as GNU time reports it) of a fresh `ragkit` process."""
    seconds, peaks = [], []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "peak-kb %M", sys.executable, "-m", "ragkit.cli", *args],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"ragkit {' '.join(args)} failed: {done.stderr[-500:]}")
        peaks.append(int(done.stderr.rsplit("peak-kb ", 1)[1].split()[0]) / 1024)
    return {"seconds": statistics.median(seconds), "peak_mib": statistics.median(peaks)}


def cold_queries(index: Path) -> dict[str, dict]:
    """`ragkit search` and `ragkit ask --reader extractive`, queries through ONNX against torch."""
    question = "Which NFL team represented the AFC at Super Bowl 50?"
    out = {}
    for label, flag in (("onnx", "true"), ("torch", "false")):
        env = {**os.environ, "RAGKIT_ONNX_QUERIES": flag}
        out[label] = {"search": cold_runs(["search", question, "--index", str(index), "-k", "5"], env),
                      "ask_extractive": cold_runs(["ask", question, "--index", str(index), "--reader", "extractive"],
                                                  env)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="*", default=["squad-v1.1-dev", "qmsum", "pubmedqa-pqal", "leval-longdoc"])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--parts", default="sets,long,cold", help="what to measure, comma-separated")
    parser.add_argument("--name", default="bench_encoders", help="the raw numbers' file: results/NAME.json")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from ragkit import store
    from ragkit.api import Index

    model = minilm_model()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-encoders-"))
    raw: dict = {"model": model, "threads": args.threads, "questions": args.questions, "sets": {}}
    parts = args.parts.split(",")
    for name in args.sets if "sets" in parts else ():
        dataset = DATA / name
        entry = {backend: quality(dataset, model, backend, workdir, args.questions)
                 for backend in ("torch", "onnx-int8")}
        table = store.load_chunks(Index(workdir / f"{name}-torch").searcher.generation)
        texts, n_tokens = table.column("text").to_pylist(), table.column("n_tokens").to_pylist()
        entry["rates"] = encoding_rates(model, texts, n_tokens)
        raw["sets"][name] = entry
        print(name, entry, flush=True)
    if "long" in parts:
        raw["long_chunks"] = long_chunk_rates(workdir)
        print("long", raw["long_chunks"], flush=True)
    if "cold" in parts:
        raw["cold"] = cold_queries(workdir / "squad-v1.1-dev-torch")
        print("cold", raw["cold"], flush=True)
    if not args.no_record:
        record(args.name, "Dense encoder backends (torch, ONNX, ONNX int8) and the cold start of a query",
               raw, tables(raw), command=" ".join(["python benchmarks/bench_encoders.py", *sys.argv[1:]]))


def tables(raw: dict) -> str:
    """The rates, the quality per backend and the cold starts as markdown tables."""
    lines = ["| set | torch tok/s | onnx tok/s (×) | onnx-int8 tok/s (×) | int8 mean cosine | dense R@5 torch → int8 "
             "| hybrid R@5 torch → int8 | hybrid evidence@5 torch → int8 |", "|---|---|---|---|---|---|---|---|"]
    def change(before: float | None, after: float | None) -> str:
        return "–" if before is None or after is None else f"{before:.3f} → {after:.3f}"

    for name, entry in raw["sets"].items():
        r, t, q = entry["rates"], entry["torch"], entry["onnx-int8"]
        lines.append(
            f"| {name} | {r['torch']:,.0f} | {r['onnx']:,.0f} ({r['onnx'] / r['torch']:.2f}×) | "
            f"{r['onnx-int8']:,.0f} ({r['onnx-int8'] / r['torch']:.2f}×) | {r['int8_mean_cosine']:.4f} | "
            f"{change(t['dense']['recall@5'], q['dense']['recall@5'])} | "
            f"{change(t['hybrid']['recall@5'], q['hybrid']['recall@5'])} | "
            f"{change(t['hybrid']['evidence_hit@5'], q['hybrid']['evidence_hit@5'])} |")
    if "long_chunks" in raw:
        lines += ["", "| ModernBERT-base-shaped, tokens per text | torch tok/s | onnx (×) | onnx-int8 (×) |",
                  "|---|---|---|---|"]
    for length, rates in raw.get("long_chunks", {}).items():
        cells = [f"{rates[b]:,.0f} ({rates[b] / rates['torch']:.2f}×)" if b in rates else "over the limit"
                 for b in ("onnx", "onnx-int8")]
        lines.append(f"| {int(length):,} | {rates['torch']:,.0f} | {cells[0]} | {cells[1]} |")
    if "cold" in raw:
        lines += ["", "| cold command (fresh process) | queries through ONNX | through torch | ratio |",
                  "|---|---|---|---|"]
    for command in ("search", "ask_extractive") if "cold" in raw else ():
        fast, slow = raw["cold"]["onnx"][command], raw["cold"]["torch"][command]
        lines.append(f"| `ragkit {command.replace('_', ' --reader ')}` | {fast['seconds']:.2f} s, "
                     f"{fast['peak_mib']:,.0f} MiB | {slow['seconds']:.2f} s, {slow['peak_mib']:,.0f} MiB | "
                     f"{slow['seconds'] / fast['seconds']:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
