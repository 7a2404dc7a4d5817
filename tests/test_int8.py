"""int8 quantisation of an export: the few input channels that carry outliers stay float32, the rest become int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragkit.encoders.int8 import SPLIT_RATIO, outlier_channels, quantize_int8, step_ratio


def test_the_step_ratio_is_the_range_an_8_bit_scale_covers_over_the_rms():
    assert step_ratio(np.array([0.0] * 99 + [100.0])) == pytest.approx(100 / 10)
    assert step_ratio(np.array([1.0, 1.0])) == pytest.approx(1.0)  # zero is always in the range
    assert step_ratio(np.array([-3.0, 3.0])) == pytest.approx(2.0)
    assert step_ratio(np.zeros(4)) == 0.0


def two_products(folder: Path) -> Path:
    """x (n, 512) → plain = x @ A; spiky = (x · s) @ B, where s multiplies one channel of 512 by 1,000."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    spike = np.ones(512, dtype=np.float32)
    spike[7] = 1000.0
    weights = [numpy_helper.from_array(rng.standard_normal((512, 32)).astype(np.float32), name) for name in "AB"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["plain"], "plain_product"),
         helper.make_node("Mul", ["x", "s"], ["spiky_x"], "spike"),
         helper.make_node("MatMul", ["spiky_x", "B"], ["spiky"], "spiky_product")],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 512])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 32]) for name in ("plain", "spiky")],
        [*weights, numpy_helper.from_array(spike, "s")])
    path = folder / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_the_outlier_channels_are_the_fewest_that_bring_the_rest_under_the_split_ratio():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((50, 3, 384))
    assert outlier_channels(values).size == 0  # nothing to split
    values[..., 17] *= 400
    values[..., 250] *= 100
    found = outlier_channels(values)
    assert found.tolist() == [17, 250]
    assert step_ratio(values[..., np.setdiff1d(np.arange(384), found)]) <= SPLIT_RATIO
    assert step_ratio(values[..., np.setdiff1d(np.arange(384), [17])]) > SPLIT_RATIO  # one channel is not enough
    values[..., :40] *= np.linspace(100, 400, 40)  # more outliers than a split may take: at most 1/64 of the channels
    assert outlier_channels(values).size == 384 // 64


def test_a_product_whose_input_has_an_outlier_channel_splits_it_off_in_float32(tmp_path):
    import onnx

    source = two_products(tmp_path)
    x = np.random.default_rng(1).standard_normal((40, 512)).astype(np.float32)
    kept, fused = quantize_int8(source, tmp_path / "int8.onnx", {"x": x})
    assert kept == {"spiky_product/outlier_matmul": 1} and not fused  # no attention shape given: nothing to fuse
    assert not (tmp_path / "int8.onnx.split.onnx").exists()
    ops = {node.name: node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert ops["spiky_product/outlier_matmul"] == "MatMul" and ops["spiky_product/gather"] == "Gather"
    assert "MatMulInteger" in [ops.get("plain_product_quant"), ops.get("spiky_product/ordinary_matmul_quant")] \
        and sum(op == "MatMulInteger" for op in ops.values()) == 2
    exact = run(source, x)
    mixed = run(tmp_path / "int8.onnx", x)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(tmp_path / "all.onnx"), weight_type=QuantType.QUInt8, per_channel=True)
    every = run(tmp_path / "all.onnx", x)
    signal = float(np.sqrt(np.mean(exact[0] ** 2)))  # what 511 ordinary channels add up to in either product

    def error(ours, theirs):
        return float(np.abs(ours - theirs).max()) / signal

    assert error(mixed[0], exact[0]) < 0.1 and error(mixed[1], exact[1]) < 0.1  # both int8 and close
    assert error(every[1], exact[1]) > 0.5  # quantised whole, the spike's 8-bit step swamps the ordinary channels


def test_an_int8_product_is_exact_integer_arithmetic_on_any_cpu(tmp_path):
    """The int8 product equals x's 8-bit codes times the weight's, summed in 32 bits, then scaled. Signed weights
    would fail this on CPUs without VNNI, where ONNX Runtime adds pairs of u8·s8 products into saturating 16 bits."""
    import onnx
    from onnx import numpy_helper

    source = two_products(tmp_path)
    x = np.random.default_rng(1).standard_normal((40, 512)).astype(np.float32)
    x[:, 3] += 3.0  # codes far from the zero point, where 16-bit pair sums would saturate
    quantize_int8(source, tmp_path / "int8.onnx", {"x": x})
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer}
    codes, scale, zero = stored["A_quantized"], stored["A_scale"], stored["A_zero_point"]
    assert codes.dtype == np.uint8 and zero.dtype == np.uint8
    assert scale.shape == zero.shape == (32,)  # one scale and zero point per output channel
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)  # DynamicQuantizeLinear, as ONNX defines it
    x_scale = np.float32((high - low) / 255)
    x_zero = np.clip(np.rint(-low / x_scale), 0, 255)
    x_codes = np.clip(np.rint(x / x_scale) + x_zero, 0, 255)
    exact = (x_codes - x_zero).astype(np.int64) @ (codes.astype(np.int64) - zero.astype(np.int64))
    expected = exact * (x_scale * scale)
    plain = run(tmp_path / "int8.onnx", x)[0]
    assert np.abs(plain - expected).max() <= 1e-4 * np.abs(expected).max()


def test_the_minilm_export_keeps_its_outlier_channels_in_float32(minilm, tmp_path, monkeypatch):
    """On the real all-MiniLM-L6-v2: a few channels of the first layer's feed-forward output projection (whose GELU
    inputs reach about 80× their RMS) are left float32, and the int8 vectors of a meeting transcript come closer to
    float32's than those of quantising every product whole. Each layer's attention is fused into one QAttention
    node with unsigned 8-bit weights; the embeddings stay float32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ragkit.encoders.dense import DenseEncoder
    from ragkit.encoders.onnx import MODEL, MODEL_INT8, OnnxEncoder, session

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    encoder = DenseEncoder(str(minilm), backend="onnx-int8")
    export = encoder._onnx
    kept = export.meta["int8_outlier_channels"]
    assert export.meta["int8_fused"] is True
    assert any(name.endswith("/layer.0/output/dense/MatMul/outlier_matmul") for name in kept)
    assert all(0 < channels <= 1536 // 64 for channels in kept.values())
    transcript = ["Um, yeah, so I think we should uh talk about the remote control design first. "
                  "The buttons, I mean the big ones, they should be, uh, rubber. Okay. Right. " * 4,
                  "Project manager: So we agreed on the yellow case and the kinetic battery, and the budget is "
                  "twelve fifty per unit; marketing will check the trend watchers' report before Friday."]
    folder = Path(export.folder)
    quantize_dynamic(str(folder / MODEL), str(tmp_path / "all.onnx"), weight_type=QuantType.QUInt8, per_channel=True)
    reference = OnnxEncoder(folder, export.meta, int8=False).encode_texts(transcript)
    ours = export.encode_texts(transcript)
    every = OnnxEncoder(folder, export.meta, int8=False)
    every.session = session(tmp_path / "all.onnx")
    theirs = every.encode_texts(transcript)
    assert ((ours * reference).sum(axis=1) > (theirs * reference).sum(axis=1)).all()
    assert (ours * reference).sum(axis=1).min() > 0.99
    assert np.abs(ours - reference).max() > 1e-4  # the int8 graph made them, not the float32 one
    graph = onnx.load(str(folder / MODEL_INT8)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QAttention") == 6 and ops.count("SkipLayerNormalization") == 12 and "Softmax" not in ops
    # every other product with a weight is 8-bit (attention output, feed-forward in and out: three per layer);
    # the only float32 ones are the outlier channels' small products
    assert ops.count("MatMulInteger") == 18
    assert sorted(node.name for node in graph.node if node.op_type == "MatMul") == sorted(kept)
    assert "EmbedLayerNormalization" in ops and "QEmbedLayerNormalization" not in ops
    weights = {tensor.name: tensor.data_type for tensor in graph.initializer}
    assert all(weights[node.input[1]] == onnx.TensorProto.UINT8 for node in graph.node if node.op_type == "QAttention")


def test_a_graph_the_fusions_do_not_know_is_quantised_as_exported(tiny_encoder, tmp_path, monkeypatch):
    """The tiny ModernBERT is no BERT: it is not offered to the fusions, and forced through them its rotary
    embedding becomes a node ONNX Runtime refuses on a batch of three, so `fused` gives the exported graph back."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    from ragkit.encoders.dense import DenseEncoder
    from ragkit.encoders.int8 import fused, fusion_shape
    from ragkit.encoders.onnx import MODEL, MODEL_INT8, padded

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    config = AutoConfig.from_pretrained(str(tiny_encoder))
    assert config.model_type == "modernbert" and fusion_shape(config) == (0, 0)
    export = DenseEncoder(str(tiny_encoder), backend="onnx")._onnx
    source = Path(export.folder) / MODEL
    heads, width = config.num_attention_heads, config.hidden_size
    forced = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=width, opt_level=0).model
    assert any(node.domain == "com.microsoft" for node in forced.graph.node)  # the fusions did match something
    ids, mask = padded([(e.ids, [1] * len(e.ids)) for e in export.tokenizer.encode_batch(["a b", "c", "d e f"])], 0)
    exported = onnx.load(str(source))
    assert fused(exported, source, {"input_ids": ids, "attention_mask": mask}, heads, width) is exported
    int8 = DenseEncoder(str(tiny_encoder), backend="onnx-int8")._onnx
    ops = [node.op_type for node in onnx.load(str(Path(int8.folder) / MODEL_INT8)).graph.node]
    assert int8.meta["int8_fused"] is False and "QAttention" not in ops and "MatMulInteger" in ops


def bert_export(folder: Path, spike: float) -> tuple[Path, dict]:
    """A tiny BERT's ONNX export (float32 and int8) and probe feeds of three texts padded at the end."""
    from models import build_bert_encoder

    from ragkit.encoders.dense import DenseEncoder
    from ragkit.encoders.onnx import padded

    export = DenseEncoder(str(build_bert_encoder(folder, spike)), backend="onnx-int8")._onnx
    rows = export.tokenizer.encode_batch(["the quick brown fox", "a", "jumps over the lazy dog and the cat"])
    ids, mask = padded([(e.ids, [1] * len(e.ids)) for e in rows], 0)
    return Path(export.folder), {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def plain_bert(tmp_path_factory) -> tuple[Path, dict]:
    """`bert_export` of a tiny BERT without outliers, in a cache of its own."""
    folder = tmp_path_factory.mktemp("plain-bert")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAGKIT_CACHE_DIR", str(folder / "cache"))
        return bert_export(folder / "bert", spike=1.0)


def test_fusions_are_kept_only_when_they_give_the_exported_graph_s_outputs(plain_bert, tmp_path, monkeypatch):
    import onnx

    from ragkit.encoders import int8
    from ragkit.encoders.onnx import MODEL

    folder, feeds = plain_bert
    exported = onnx.load(str(folder / MODEL))
    fusion = int8.fused(exported, folder / MODEL, feeds, 4, 128)
    assert [node.op_type for node in fusion.graph.node].count("Attention") == 2
    assert int8.quantize_int8(folder / MODEL, tmp_path / "fused.onnx", feeds, 4, 128).fused
    monkeypatch.setattr(int8, "FUSION_TOLERANCE", -1.0)  # as if the fused outputs differed
    assert int8.fused(exported, folder / MODEL, feeds, 4, 128) is exported
    assert not int8.quantize_int8(folder / MODEL, tmp_path / "exported.onnx", feeds, 4, 128).fused


def test_a_fused_graph_the_quantiser_refuses_is_quantised_as_exported(plain_bert, tmp_path, monkeypatch):
    import onnx

    from ragkit.encoders import int8
    from ragkit.encoders.onnx import MODEL

    folder, feeds = plain_bert
    quantise = int8._quantize

    def refusing_fused_nodes(model, target, feeds):
        if any(node.op_type == "Attention" for node in model.graph.node):
            raise ValueError("no quantised form of this node")
        return quantise(model, target, feeds)

    monkeypatch.setattr(int8, "_quantize", refusing_fused_nodes)
    made = int8.quantize_int8(folder / MODEL, tmp_path / "int8.onnx", feeds, 4, 128)
    ops = [node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert not made.fused and "QAttention" not in ops and "Attention" not in ops and "MatMulInteger" in ops


def test_a_fused_attention_whose_input_has_an_outlier_channel_stays_float32(tmp_path, monkeypatch):
    """One channel of the embeddings' LayerNorm × 50: the first layer's attention reads it and is left float32
    whole; the second layer's is quantised."""
    import onnx

    from ragkit.encoders.onnx import MODEL_INT8, OnnxEncoder

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    folder, _ = bert_export(tmp_path / "bert", spike=50.0)
    meta = OnnxEncoder(folder).meta
    attentions = {name: channels for name, channels in meta["int8_outlier_channels"].items() if "Attention" in name}
    assert list(attentions.values()) == [128], meta["int8_outlier_channels"]
    ops = [node.op_type for node in onnx.load(str(folder / MODEL_INT8)).graph.node]
    assert [op for op in ops if op in ("Attention", "QAttention")] == ["Attention", "QAttention"] and meta["int8"]
