"""Dynamic int8 quantisation of an exported encoder, with the products whose inputs carry outliers left in float32.

ONNX Runtime's dynamic quantisation gives each activation tensor one 8-bit scale: a step of its range / 255. Where a
few values are far larger than the rest (in a small BERT, the input of the first layers' feed-forward output
projection, after the GELU) that step is a large share of a typical value, and the product loses most of its
precision. Those MatMuls are found on probe inputs and kept in float32; every other MatMul with a constant weight gets
int8 weights (per output channel) and 8-bit activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUTLIER_RATIO = 64.0  # range / RMS of a MatMul's input above which its 8-bit step exceeds a quarter of the RMS
RECIPE = "dynamic-per-channel-outliers-float32"  # part of an int8 index's dense fingerprint


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


def outlier_matmuls(model_path: Path, feeds: dict[str, np.ndarray], ratio: float = OUTLIER_RATIO) -> list[str]:
    """Names of the MatMuls with a constant weight whose input's `step_ratio` on `feeds` (the graph's inputs, as
    ONNX Runtime would quantise them: the whole batch, padding included) exceeds `ratio`."""
    import onnx
    import onnxruntime

    model = onnx.load(str(model_path))
    weights = {tensor.name for tensor in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    inputs = list(dict.fromkeys(node.input[0] for node in matmuls))
    outputs = {output.name for output in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs if name not in outputs)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ratios = {name: step_ratio(value) for name, value in zip(inputs, session.run(inputs, feeds))}
    return [node.name for node in matmuls if ratios[node.input[0]] > ratio]


def quantize_int8(source: Path, target: Path, feeds: dict[str, np.ndarray]) -> list[str]:
    """Write the int8 graph of the float32 graph at `source` to `target`; returns the MatMuls left in float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept = outlier_matmuls(source, feeds)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=kept)
    return kept
