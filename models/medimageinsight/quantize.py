"""int8 form of the MedImageInsight graph: MatMulInteger on the Linear layers.

Every Linear inside a block (qkv, proj, fc1, fc2: over 90% of the
multiply-adds at 480x480, see macs.py) becomes

    QuantizeLinear(x, x_scale, x_zero_point)          per-tensor s8, calibrated
    MatMulInteger(x_q, w_q, x_zero_point) -> int32    s8 x s8, per-column w
    Cast(float) * (x_scale * w_scale[col])            float rescale
    + bias                                            (graph.py's bias Add, kept)

the MatMul counterpart of models/integer_conv.py's ConvInteger form, for the
same reasons: tract 0.23.9 wires MatMulInteger as an integer EinSum (its
onnx/ops/math/mat_mul_integer.rs: s8 or u8 inputs whose zero points have the
input's type, i32 out), so the int8 arithmetic runs in its quantized matmul
kernels, and the output is never rounded to int8, so the only roundings are
of the weights and of each Linear's input. LayerNorm, softmax, the
attention products (activation x activation), the depthwise convolutions,
the stem and patch-embedding convolutions and the final projection
(2 M multiply-adds, on one pooled vector) stay in float.

Activation ranges: onnxruntime's histogram collector with the default
build's Percentile settings (99.999th percentile of |x|, 2048 bins,
clipped to the observed min/max), collected only for the Linear inputs by an
onnxruntime session whose extra outputs are exactly those tensors (the stock
calibrator would also hold every attention product). A range that is not
clearly two-sided (after a GELU: min about -0.17, max several units) gets an
asymmetric zero point; the rest are symmetric (zero point 0).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.calibrate import HistogramCollector

import graph

INT8_MAX = 127
PERCENTILE = 99.999  # onnxruntime's Percentile default, as models/build calibrates
HISTOGRAM_BINS = 2048
QUANTIZED_SUFFIXES = (".qkv", ".proj", ".fc1", ".fc2")
# A range whose negative side is under this fraction of the positive one is
# quantized asymmetrically: a symmetric grid would waste most of its
# negative half (GELU outputs).
ASYMMETRIC_BELOW = 0.5
# See to_int8: the LayerNorm-fed Linear inputs (qkv, fc1) are quantized by
# the LayerNorm itself.
FOLD_LAYER_NORM = True


class QuantizeError(RuntimeError):
    pass


def linear_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The block Linear layers: MatMul by a 2-D initializer named by graph.py."""
    initializers = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers and node.name.endswith(QUANTIZED_SUFFIXES)]


def activation_ranges(model: onnx.ModelProto, batches, threads: int = 1) -> dict[str, tuple[float, float]]:
    """Percentile (lowest, highest) of every quantized Linear's input over
    `batches` (an iterable of [1,3,H,W] float32 arrays)."""
    tensors = sorted({node.input[0] for node in linear_matmuls(model)})
    value_infos = {vi.name: vi for vi in model.graph.value_info}
    missing = [t for t in tensors if t not in value_infos]
    if missing:
        raise QuantizeError(f"no inferred shape for {missing[:3]}: run graph.check() first")
    # The Linear inputs become extra outputs only for the serialised copy the
    # session is made from: no second ModelProto of a 1.4 GB graph.
    original_outputs = len(model.graph.output)
    model.graph.output.extend(value_infos[t] for t in tensors)
    try:
        serialised = model.SerializeToString()
    finally:
        del model.graph.output[original_outputs:]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(serialised, options, providers=["CPUExecutionProvider"])
    del serialised
    collector = HistogramCollector(method="percentile", symmetric=True, num_bins=HISTOGRAM_BINS,
                                   num_quantized_bins=128, percentile=PERCENTILE, scenario="same")
    seen = 0
    for batch in batches:
        outputs = session.run(tensors, {graph.INPUT_NAME: batch})
        with contextlib.redirect_stdout(io.StringIO()):  # the collector prints progress
            collector.collect(dict(zip(tensors, outputs)))
        seen += 1
    if not seen:
        raise QuantizeError("no calibration images")
    with contextlib.redirect_stdout(io.StringIO()):
        thresholds = collector.compute_collection_result()
    return {name: (float(value[0]), float(value[1])) for name, value in thresholds.items()}


def activation_quantization(lowest: float, highest: float) -> tuple[float, int]:
    """(scale, s8 zero point) covering [lowest, highest] (and 0)."""
    lowest, highest = min(lowest, 0.0), max(highest, 0.0)
    if highest == lowest:
        return 1.0, 0
    if -lowest >= ASYMMETRIC_BELOW * highest or highest < ASYMMETRIC_BELOW * -lowest:
        return max(-lowest, highest) / INT8_MAX, 0
    scale = (highest - lowest) / 255.0
    zero_point = int(np.clip(np.round(-128 - lowest / scale), -128, 127))
    return scale, zero_point


def to_int8(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], copy: bool = True,
            fold_layer_norm: bool = FOLD_LAYER_NORM) -> onnx.ModelProto:
    """The fp32 graph with every block Linear as MatMulInteger: a copy, or
    (copy=False, for the 1.4 GB full graph) `model` itself rewritten.

    fold_layer_norm: where a Linear's input is a LayerNorm that nothing else
    reads (qkv and fc1), the quantization moves into the LayerNorm's scale
    and shift (gamma / s, beta / s + zero point + 0.5) followed by Clip and a
    Cast to u8, which truncates and so rounds half up, instead of a
    QuantizeLinear, as integer_conv.py does inside depthwise convolutions
    (tract's QuantizeLinear is a scalar loop). u8 with zero point z + 128
    holds the same levels as s8 with zero point z."""
    if copy:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    targets = {node.name for node in linear_matmuls(model)}
    if not targets:
        raise QuantizeError("no Linear MatMul to quantize")
    initializers = {init.name: init for init in g.initializer}
    producers = {out: node for node in g.node for out in node.output}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    replaced: set[str] = set()
    added: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        x, w_name = node.input
        if x not in ranges:
            raise QuantizeError(f"no calibrated range for {x}, the input of {node.name}")
        x_scale, x_zero_point = activation_quantization(*ranges[x])
        w = numpy_helper.to_array(initializers[w_name]).astype(np.float64)  # [in, out]
        w_scale = np.abs(w).max(axis=0) / INT8_MAX
        w_scale[w_scale == 0] = 1.0  # a dead column: all-zero weights either way
        w_q = np.clip(np.round(w / w_scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        replaced.add(w_name)
        p = node.name
        added += [
            numpy_helper.from_array(w_q, f"{p}.weight_q"),
            numpy_helper.from_array((x_scale * w_scale).astype(np.float32), f"{p}.rescale"),
        ]
        norm = producers.get(x)
        if fold_layer_norm and norm is not None and norm.op_type == "LayerNormalization" and readers[x] == 1:
            gamma = numpy_helper.to_array(initializers[norm.input[1]]).astype(np.float64)
            beta = numpy_helper.to_array(initializers[norm.input[2]]).astype(np.float64)
            replaced.update(norm.input[1:3])
            zero_point_u8 = x_zero_point + 128
            added += [
                numpy_helper.from_array((gamma / x_scale).astype(np.float32), f"{p}.norm_scale_q"),
                numpy_helper.from_array((beta / x_scale + zero_point_u8 + 0.5).astype(np.float32), f"{p}.norm_bias_q"),
                numpy_helper.from_array(np.array(0, np.float32), f"{p}.u8_low"),
                numpy_helper.from_array(np.array(255, np.float32), f"{p}.u8_high"),
                numpy_helper.from_array(np.array(zero_point_u8, np.uint8), f"{p}.x_zero_point"),
            ]
            norm.input[1], norm.input[2] = f"{p}.norm_scale_q", f"{p}.norm_bias_q"
            norm.output[0] = f"{p}.x_levels"
            nodes += [
                helper.make_node("Clip", [f"{p}.x_levels", f"{p}.u8_low", f"{p}.u8_high"], [f"{p}.x_clipped"],
                                 name=f"{p}.clip"),
                helper.make_node("Cast", [f"{p}.x_clipped"], [f"{p}.x_q"], name=f"{p}.quantize",
                                 to=TensorProto.UINT8),
            ]
        else:
            added += [
                numpy_helper.from_array(np.array(x_scale, np.float32), f"{p}.x_scale"),
                numpy_helper.from_array(np.array(x_zero_point, np.int8), f"{p}.x_zero_point"),
            ]
            nodes.append(helper.make_node("QuantizeLinear", [x, f"{p}.x_scale", f"{p}.x_zero_point"], [f"{p}.x_q"],
                                          name=f"{p}.quantize"))
        nodes += [
            helper.make_node("MatMulInteger", [f"{p}.x_q", f"{p}.weight_q", f"{p}.x_zero_point"],
                             [f"{p}.accumulator"], name=f"{p}.matmul_integer"),
            helper.make_node("Cast", [f"{p}.accumulator"], [f"{p}.accumulator_f32"], name=f"{p}.cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}.accumulator_f32", f"{p}.rescale"], [node.output[0]], name=f"{p}.rescale"),
        ]
    kept = [init for init in g.initializer if init.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(kept + added)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return graph.check(model)


def quantize(model: onnx.ModelProto, calibration_batches, threads: int = 1) -> onnx.ModelProto:
    return to_int8(model, activation_ranges(model, calibration_batches, threads))


def save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))
