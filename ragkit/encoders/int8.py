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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OUTLIER_RATIO = 40.0  # range / RMS of a MatMul's input above which its 8-bit step exceeds a sixth of the RMS: split
SPLIT_RATIO = 18.0  # range / RMS the channels left in the int8 product may have
MAX_SPLIT_SHARE = 1 / 64  # most channels of an input kept in float32
RECIPE = "dynamic-u8u8-per-channel-outlier-channels-float32"  # part of an int8 index's dense fingerprint


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


def matmul_inputs(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per MatMul with a constant weight in `model` (an onnx ModelProto, left as it was), its input on `feeds`."""
    import onnx
    import onnxruntime

    weights = {tensor.name for tensor in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    inputs = list(dict.fromkeys(node.input[0] for node in matmuls))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {output.name for output in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs if name not in outputs)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip(inputs, session.run(inputs, feeds)))
    return {node.name: values[node.input[0]] for node in matmuls}


def split_outliers(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Split, in place, every MatMul of `model` whose input's `step_ratio` on `feeds` (the graph's inputs, as ONNX
    Runtime would quantise them: the whole batch, padding included) exceeds OUTLIER_RATIO. Returns the float32
    products' node names, each with its number of channels."""
    from onnx import helper, numpy_helper

    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    inputs = matmul_inputs(model, feeds)
    nodes, split = [], {}
    for node in model.graph.node:
        values = inputs.get(node.name)
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


def quantize_int8(source: Path, target: Path, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Write the int8 graph of the float32 graph at `source` to `target` (outlier channels split off in float32);
    returns the float32 products, each with its number of channels."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    split = split_outliers(model, feeds)
    staged = target.with_name(target.name + ".split.onnx")
    onnx.save(model, str(staged))
    try:
        quantize_dynamic(str(staged), str(target), weight_type=QuantType.QUInt8, per_channel=True,
                         nodes_to_exclude=list(split))
    finally:
        staged.unlink(missing_ok=True)
    return split
