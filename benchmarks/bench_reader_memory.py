"""Peak memory and throughput against input length: full attention, Infini-attention and HMT on one backbone.

    python benchmarks/bench_reader_memory.py                  # tiny backbone on CPU, one thread, ~7 min
    python benchmarks/bench_reader_memory.py --preset gpu     # Qwen2.5-0.5B-sized, bf16, CUDA (~3 min on an H200
                                                              # with --methods infini,hmt,full --budget 270)
    python benchmarks/bench_reader_memory.py --preset smollm2 # the embedded SmolLM2-135M-Instruct, real weights

Three ways to read the same token ids, all on the SAME LlamaForCausalLM: random weights (seed 0), or with
`--backbone NAME` a real reader model (its dimensions must be the preset's, as in the smollm2 preset); each method
builds it afresh, since InfiniLM replaces the attention modules in place:

- full: the backbone reads the whole input in one forward pass with SDPA (causal, no mask tensor), keeping its KV
  cache (what a prefill keeps for decoding) and only the last position's logits;
- infini: `InfiniLM.read` streams the input segment by segment (state: M and z per layer and KV head);
- hmt: `HMTLM.read` streams it in segments of L with k sensory tokens and a cache of N memory embeddings.

Each (method, length) is timed once after a one-segment warm-up, under a wall-clock cap. A method that exceeds the
cap ("cap"), runs out of memory ("OOM"), or whose time at the previous length, scaled linearly (a lower bound for
every method here), already exceeds the cap ("cap (projected)"), is not tried at longer lengths.

Peak memory: on CPU, the growth of the peak resident set (getrusage ru_maxrss) from after the model is built and
warmed up to the end of the read, each measurement in a fresh subprocess so that peaks do not mix; on CUDA,
torch.cuda.max_memory_allocated, reset after the warm-up, both total and above the weights. Tokens/s is length /
wall time of the read. State bytes: `state_bytes()` after reading for the memory readers; for full attention, the
KV cache it keeps (2 × layers × KV heads × head_dim × length × dtype size).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import apply_preset, machine, preset_parser, record  # noqa: E402

METHODS = ("full", "infini", "hmt")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1000, dtype="float32",
                device="cpu", segment=512, hmt_segment=512, sensory=32, cache_size=300,
                lengths="4096,16384,65536,262144,1048576", cap=120.0, name="bench_reader_memory", backbone="random"),
    # Qwen2.5-0.5B dimensions (tied embeddings), random weights
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, dtype="bfloat16",
                device="cuda", segment=2048, hmt_segment=1024, sensory=32, cache_size=300,
                lengths="4096,16384,65536,262144,524288,1048576", cap=60.0, name="bench_reader_memory_gpu",
                backbone="random"),
    # the embedded SmolLM2-135M-Instruct (real weights; 8,192 positions, so full attention past them extrapolates)
    "smollm2": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, dtype="float32",
                    device="cpu", segment=1024, hmt_segment=1024, sensory=32, cache_size=300,
                    lengths="2048,8192,32768", cap=300.0, name="bench_reader_memory_smollm2", backbone="embedded"),
}


class Capped(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preset_parser(__doc__, PRESETS)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budget", type=float, default=None, help="stop starting new runs after this many seconds")
    parser.add_argument("--out", default=None, help="also write the raw JSON here (e.g. under $OUT)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "method:length", one measurement
    return apply_preset(parser.parse_args(argv), PRESETS)


# ----------------------------------------------------------------------------------------------------------------
# one measurement


def build(args: argparse.Namespace, method: str):
    """The backbone (same seed, same weights for every method) wrapped for `method`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ragkit.memory.hmt import HMTConfig, HMTLM
    from ragkit.memory.infini import InfiniConfig, InfiniLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=2 ** 21, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    if args.backbone == "random":
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    else:
        from ragkit.models import load_causal_lm

        model = load_causal_lm(args.backbone).to(args.device)
        got = (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads)
        if got != (args.hidden, args.layers, args.kv_heads):
            raise SystemExit(f"{args.backbone} has hidden, layers, KV heads {got}: give the preset's dimensions")
    model = model.to(getattr(torch, args.dtype)).eval()
    if method == "full":
        return model
    if method == "infini":
        return InfiniLM(model, InfiniConfig(segment_length=args.segment)).eval()
    return HMTLM(model, HMTConfig(segment_length=args.hmt_segment, sensory_tokens=args.sensory,
                                  cache_size=args.cache_size)).eval()


def kv_bytes(args: argparse.Namespace, length: int) -> int:
    import torch

    size = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    return 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * length * size


def measure(args: argparse.Namespace, method: str, length: int, cap: float) -> dict[str, Any]:
    """Read `length` random ids with `method`; peak memory, time and state bytes. Raises Capped past `cap` s."""
    import torch

    cuda = args.device == "cuda"
    reader = build(args, method)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, length), generator=generator).to(args.device)

    def read(x):
        if method == "full":
            return reader(input_ids=x, use_cache=True, logits_to_keep=1)
        reader.reset()
        out = reader.read(x)
        return out

    with torch.no_grad():
        read(ids[:, : args.segment])  # warm-up, excluded
    if method != "full":
        reader.reset()
    weights = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def on_alarm(signum, frame):
        raise Capped()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cap)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            out = read(ids)
            if cuda:
                torch.cuda.synchronize()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - started
    result = {"method": method, "length": length, "status": "ok", "seconds": seconds, "tokens_per_s": length / seconds}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_bytes=peak, weights_bytes=weights, peak_above_weights_bytes=peak - weights)
    else:
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(rss_before_bytes=rss_before, rss_after_bytes=rss_after, peak_growth_bytes=rss_after - rss_before)
    result["state_bytes"] = kv_bytes(args, length) if method == "full" else reader.state_bytes()
    result["state_kind"] = {"full": "KV cache (analytic)", "infini": "M, z (state_bytes)",
                            "hmt": "memory cache + sensory (state_bytes)"}[method]
    del out
    return result


def oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate" in text


def measure_safely(args: argparse.Namespace, method: str, length: int) -> dict[str, Any]:
    """measure(), turning the cap and running out of memory into a status."""
    import torch

    try:
        return measure(args, method, length, args.cap)
    except Capped:
        return {"method": method, "length": length, "status": "cap", "seconds": args.cap}
    except (RuntimeError, MemoryError) as e:
        if not oom(e):
            raise
        return {"method": method, "length": length, "status": "OOM", "error": str(e).splitlines()[0][:200]}
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()


def in_subprocess(args: argparse.Namespace, method: str, length: int) -> dict[str, Any]:
    """One measurement in a fresh Python process, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--preset", args.preset, "--worker", f"{method}:{length}"]
    for key in PRESETS["cpu"]:
        command += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    command += ["--threads", str(args.threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.cap + 180)
    except subprocess.TimeoutExpired:
        return {"method": method, "length": length, "status": "cap", "seconds": args.cap, "note": "killed"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        killed = done.returncode in (-9, 137)
        return {"method": method, "length": length, "status": "OOM" if killed else "error",
                "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------------
# the sweep and its table


def mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f}"


def state_text(n: int) -> str:
    return f"{n / 2**10:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def tables(raw: dict[str, Any]) -> str:
    cuda = raw["preset"]["device"] == "cuda"
    rows = {(r["method"], r["length"]): r for r in raw["runs"]}
    lengths = raw["lengths"]
    memory_label = "peak GPU memory above weights, MiB" if cuda else "peak RSS growth, MiB"
    head = "| length | " + " | ".join(f"{m} tok/s" for m in METHODS) + " | " + \
        " | ".join(f"{m} {memory_label.split(',')[0]}" for m in METHODS) + " | " + \
        " | ".join(f"{m} state" for m in METHODS) + " | infini / full tok/s | hmt / full tok/s |"
    weights = f" Weights: {mib(raw.get('weights_bytes'))} MiB." if cuda else ""
    lines = [f"Memory column unit: {memory_label}.{weights}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for n in lengths:
        cells, mem, state = [], [], []
        for m in METHODS:
            r = rows.get((m, n))
            if r is None:
                cells.append("—"), mem.append("—"), state.append("—")
            elif r["status"] != "ok":
                cells.append(r["status"]), mem.append(r["status"]), state.append("—")
            else:
                cells.append(f"{r['tokens_per_s']:,.0f}")
                mem.append(mib(r["peak_above_weights_bytes"] if cuda else r["peak_growth_bytes"]))
                state.append(state_text(r["state_bytes"]))
        ratios = []
        full = rows.get(("full", n))
        for m in ("infini", "hmt"):
            r = rows.get((m, n))
            ok = full and r and full["status"] == "ok" and r["status"] == "ok"
            ratios.append(f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}×" if ok else "—")
        label = f"{n // 1024:,}k" if n < 2**20 else f"{n / 2**20:g}M"
        lines.append(f"| {label} | " + " | ".join(cells + mem + state + ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        method, length = args.worker.split(":")
        print(json.dumps(measure_safely(args, method, int(length))), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the gpu preset needs CUDA")
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for method in methods:
        last: dict[str, Any] | None = None
        for n in lengths:
            if last is not None and last["status"] != "ok":
                break
            if args.budget and time.perf_counter() - started > args.budget:
                runs.append({"method": method, "length": n, "status": "not run (time budget)"})
                break
            if last is not None and last["seconds"] * n / last["length"] > args.cap:
                runs.append({"method": method, "length": n, "status": "cap (projected)",
                             "projected_seconds": last["seconds"] * n / last["length"]})
                break
            if args.device == "cuda":
                r = measure_safely(args, method, n)
            else:
                r = in_subprocess(args, method, n)
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs.append(r)
            last = r
    total = time.perf_counter() - started
    raw: dict[str, Any] = {"preset": {k: getattr(args, k) for k in PRESETS["cpu"]} | {"name": args.preset},
                           "threads": args.threads, "methods": methods, "lengths": lengths, "runs": runs,
                           "total_seconds": total, "budget_seconds": args.budget}
    raw["preset"]["device"] = args.device
    if args.device == "cuda":
        weights = [r["weights_bytes"] for r in runs if "weights_bytes" in r]
        raw["weights_bytes"] = weights[0] if weights else None
        raw["device_name"] = torch.cuda.get_device_name(0)
    table = tables(raw)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine(), **raw}, indent=2) + "\n")
    if args.no_record:
        print(table)
        return
    weights = "random weights" if args.backbone == "random" else f"the weights of {args.backbone}"
    notes = (f"Backbone: LlamaForCausalLM, {weights}, hidden {args.hidden}, {args.layers} layers, {args.heads} "
             f"heads, {args.kv_heads} KV heads, intermediate {args.intermediate}, vocab {args.vocab}, {args.dtype}. "
             f"Infini segment {args.segment}; HMT L={args.hmt_segment}, k={args.sensory}, N={args.cache_size}. "
             f"Cap {args.cap:.0f} s per run; {args.threads} CPU thread(s); one timed run per cell after a warm-up. "
             f"Total {total:.0f} s.")
    command = f"python benchmarks/bench_reader_memory.py --preset {args.preset}"
    record(args.name, f"Reader memory and throughput against length ({args.preset})", raw, table, notes, command)


if __name__ == "__main__":
    main()
