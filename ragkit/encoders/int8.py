"""Dynamic int8 quantisation of an exported encoder, with the few input channels that carry outliers kept in float32.

ONNX Runtime's dynamic quantisation gives each activation tensor one 8-bit scale: a step of its range / 255. Where a
few values are far larger than the rest (in a BERT, a handful of hidden channels after LayerNorm and GELU) that step
is a large share of a typical value, and the product loses much of its precision. Such a MatMul, found on probe
inputs, is split in two (as LLM.int8() splits its products): x·W = (x ⊙ m)·W + x[:, c]·W[c], where c are the
fewest channels whose removal brings the rest's range under SPLIT_RATIO × its RMS and m zeroes them. The first
product is quantised like every other MatMul with a constant weight (8-bit weights per output channel, 8-bit
activations); the second, a few channels wide, stays float32.

Weights are unsigned 8-bit (asymmetric per channel), not signed: on x86 CPUs without VNNI (AVX2 only), ONNX Runtime
multiplies unsigned activations by signed weights with an instruction that adds pairs of products into 16 bits and
saturates there, so a product's result depended on the CPU. Unsigned-by-unsigned products are summed in 32 bits on
every CPU: the same vectors everywhere.

Before quantising, a BERT-shaped graph gets ONNX Runtime's transformer fusions (each layer's attention one Attention
node, which quantises as QAttention; residual + LayerNorm and bias + GELU one node each): fewer, larger kernels and
no (batch, heads, tokens, head width) reshapes between them. A graph the fusions do not recognise is quantised as
it was exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

OUTLIER_RATIO = 40.0  # range / RMS of a MatMul's input above which its 8-bit step exceeds a sixth of the RMS: split
SPLIT_RATIO = 18.0  # range / RMS the channels left in the int8 product may have
MAX_SPLIT_SHARE = 1 / 64  # most channels of an input kept in float32
# part of an int8 index's dense fingerprint
RECIPE = "dynamic-u8u8-per-channel-outlier-channels-float32-fused-attention"


def backend_fingerprint(backend: str) -> dict[str, str]:
    """What a dense stage's fingerprint says of its backend: nothing for torch (as indexes from before backends),
    and for int8 the quantisation recipe too, so that another recipe's vectors are not mixed with these."""
    if backend == "torch":
        return {}
    return {"backend": backend, **({"int8": RECIPE} if backend == "onnx-int8" else {})}


def step_ratio(values: np.ndarray) -> float:
    """The range an 8-bit asymmetric scale must cover (zero included) over the root mean square of `values`."""
    values = values.astype(np.float64, copy=False)
    rms = float(np.sqrt(np.mean(values * values)))
    span = max(float(values.max()), 0.0) - min(float(values.min()), 0.0)
    return span / rms if rms > 0 else 0.0


def outlier_channels(values: np.ndarray) -> np.ndarray:
    """The fewest channels (last axis of `values`), largest magnitudes first, whose removal brings the rest's
    `step_ratio` to SPLIT_RATIO, at most MAX_SPLIT_SHARE of them."""
    rows = values.reshape(-1, values.shape[-1])
    order = np.argsort(-np.abs(rows).max(axis=0), kind="stable")
    keep = np.ones(rows.shape[1], dtype=bool)
    taken = 0
    while step_ratio(rows[:, keep]) > SPLIT_RATIO and taken < max(1, int(rows.shape[1] * MAX_SPLIT_SHARE)):
        keep[order[taken]] = False
        taken += 1
    return np.sort(order[:taken])


def quantised_inputs(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per node of `model` (an onnx ModelProto, left as it was) that the quantiser makes 8-bit (a MatMul with a
    constant weight, a fused Attention), the value of its first input on `feeds`, from one run of the graph."""
    import onnx

    weights = {tensor.name for tensor in model.graph.initializer}
    nodes = [node for node in model.graph.node
             if node.op_type == "Attention" or (node.op_type == "MatMul" and node.input[1] in weights)]
    inputs = list(dict.fromkeys(node.input[0] for node in nodes))
    if not inputs:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {output.name for output in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs if name not in outputs)
    values = dict(zip(inputs, run_graph(probe, feeds, inputs)))
    return {node.name: values[node.input[0]] for node in nodes}


def split_outliers(model: Any, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """Split, in place, every MatMul of `model` whose input in `inputs` (`quantised_inputs` on the probe feeds: the
    whole batch, padding included, as ONNX Runtime would quantise it) has a `step_ratio` above OUTLIER_RATIO.
    Returns the float32 products' node names, each with its number of channels."""
    from onnx import helper, numpy_helper

    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes, split = [], {}
    for node in model.graph.node:
        values = inputs.get(node.name) if node.op_type == "MatMul" else None
        if values is None or step_ratio(values) <= OUTLIER_RATIO:
            nodes.append(node)
            continue
        channels = outlier_channels(values)
        keep = np.ones(values.shape[-1], dtype=np.float32)
        keep[channels] = 0.0
        weight = numpy_helper.to_array(weights[node.input[1]])  # (in, out)
        name = node.name
        model.graph.initializer.extend([numpy_helper.from_array(keep, f"{name}/ordinary_mask"),
                                        numpy_helper.from_array(channels.astype(np.int64), f"{name}/outlier_index"),
                                        numpy_helper.from_array(weight[channels], f"{name}/outlier_weight")])
        nodes += [
            helper.make_node("Mul", [node.input[0], f"{name}/ordinary_mask"], [f"{name}/ordinary"], f"{name}/mask"),
            helper.make_node("MatMul", [f"{name}/ordinary", node.input[1]], [f"{name}/ordinary_product"],
                             f"{name}/ordinary_matmul"),
            helper.make_node("Gather", [node.input[0], f"{name}/outlier_index"], [f"{name}/outliers"],
                             f"{name}/gather", axis=-1),
            helper.make_node("MatMul", [f"{name}/outliers", f"{name}/outlier_weight"], [f"{name}/outlier_product"],
                             f"{name}/outlier_matmul"),
            helper.make_node("Add", [f"{name}/ordinary_product", f"{name}/outlier_product"], list(node.output),
                             f"{name}/sum"),
        ]
        split[f"{name}/outlier_matmul"] = len(channels)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


FUSION_TOLERANCE = 1e-4  # largest difference in any output the fusions may make on the probe inputs
FUSED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")  # the transformers whose graphs ONNX Runtime's fusions know


def fusion_shape(config: Any) -> tuple[int, int]:
    """(attention heads, hidden width) of a transformers `config` whose graph the fusions know, else (0, 0)."""
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return 0, 0
    return int(getattr(config, "num_attention_heads", 0) or 0), int(getattr(config, "hidden_size", 0) or 0)


def fused(model: Any, source: Path, feeds: dict[str, np.ndarray], heads: int, width: int) -> Any:
    """`model`, the float32 graph at `source` (an onnx ModelProto), with ONNX Runtime's BERT fusions, given the
    model's number of attention `heads` and hidden `width`. `model` itself when either is unknown (0), when the
    fusions fail, or when the fused graph fails or its outputs on `feeds` differ from the original's: a pattern
    matched where it should not have been.

    The fused attention reads each row's attention mask as a length (padding at the end, as `padded` makes it)."""
    import onnx

    if heads <= 0 or width <= 0:
        return model
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        optimizer = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=width, opt_level=0)
        optimizer.topological_sort()
        fusion = optimizer.model
        if any(node.domain == "com.microsoft" for node in fusion.graph.node) and \
                not any(opset.domain == "com.microsoft" for opset in fusion.opset_import):
            fusion.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # the fused nodes' domain
        pairs = list(zip(run_graph(model, feeds), run_graph(fusion, feeds), strict=True))
    except Exception:  # the optimiser's or ONNX Runtime's own errors, or an output lost: the graph as exported
        return model
    for before, after in pairs:
        if before.shape != after.shape or float(np.abs(before - after).max()) > FUSION_TOLERANCE:
            return model
    return fusion


def run_graph(model: Any, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """The `outputs` (default: the graph's own) of an onnx ModelProto on `feeds`, through ONNX Runtime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a graph it refuses raises; its error log line would only repeat that
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


class Quantised(NamedTuple):
    """What `quantize_int8` made: the products kept in float32, each with its number of float32 input channels,
    and whether the int8 graph is the fused one."""

    outlier_channels: dict[str, int]
    fused: bool


def quantize_int8(source: Path, target: Path, feeds: dict[str, np.ndarray], heads: int = 0,
                  width: int = 0) -> Quantised:
    """Write the int8 graph of the float32 graph at `source` to `target`: fused (see `fused`), outlier channels
    split off in float32, then every product with a constant weight (and each fused attention's projections) in
    8 bits; embeddings stay float32. A fused attention whose input carries outliers stays float32 whole. When the
    fused graph does not quantise, the exported one is."""
    import onnx

    model = onnx.load(str(source))
    fusion = fused(model, source, feeds, heads, width)
    if fusion is not model:
        try:
            return Quantised(_quantize(fusion, target, feeds), fused=True)
        except Exception:  # ONNX Runtime's quantiser on a fused node it cannot handle: the graph as exported
            pass
    return Quantised(_quantize(model, target, feeds), fused=False)


def _quantize(model: Any, target: Path, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """quantize_int8 of an onnx ModelProto (changed in place by the outlier split)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    inputs = quantised_inputs(model, feeds)
    kept = {node.name: int(inputs[node.name].shape[-1]) for node in model.graph.node
            if node.op_type == "Attention" and step_ratio(inputs[node.name]) > OUTLIER_RATIO}
    kept.update(split_outliers(model, inputs))
    staged = target.with_name(target.name + ".split.onnx")
    onnx.save(model, str(staged))
    try:  # fused nodes come from ONNX Runtime's own domain, where shape inference finds no types: float32
        quantize_dynamic(str(staged), str(target), weight_type=QuantType.QUInt8, per_channel=True,
                         nodes_to_exclude=list(kept), op_types_to_quantize=["MatMul", "Attention"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        staged.unlink(missing_ok=True)
    return kept
