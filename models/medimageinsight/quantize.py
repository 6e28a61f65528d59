"""int8 form of the MedImageInsight graph: MatMulInteger on the Linear layers.

Every Linear inside a block (qkv, proj, fc1, fc2: 93% of the multiply-adds
at 480x480, see macs.py) becomes

    x / s + (z + 128.5), Clip 0..255, Cast u8        per-tensor, calibrated
    MatMulInteger(x_q, w_q, z + 128) -> int32         u8 x s8, per-column w
    Cast(float) * (s * w_scale[col])                  float rescale, [1, out]
    (+ beta @ W where the LayerNorm's beta was folded) and graph.py's bias Add

the MatMul counterpart of models/integer_conv.py's ConvInteger form, for the
same reasons: tract 0.23.9 wires MatMulInteger as an integer EinSum (its
onnx/ops/math/mat_mul_integer.rs: s8 or u8 inputs whose zero points have the
input's type, i32 out), so the products run in its int8 kernels
(avx512vnni_mmm_i32_16x16 here), and the output is never rounded to int8, so
the only roundings are of the weights and of each Linear's input. u8 with
zero point z + 128 holds exactly the levels of s8 with zero point z; to_int8
says why the quantization is written as scalar float ops. LayerNorm,
softmax, the attention products (activation x activation), the depthwise
convolutions, the stem and patch-embedding convolutions and the final
projection (2 M multiply-adds, on one pooled vector) stay in float.

Activation ranges: onnxruntime's histogram collector with the default
build's Percentile settings (99.999th percentile of |x|, 2048 bins,
clipped to the observed min/max), collected only for the Linear inputs (and,
for those that come from a LayerNorm, their values before its gamma and
beta) by an onnxruntime session whose extra outputs are exactly those
tensors (the stock calibrator would also hold every attention product). A
range that is not clearly two-sided (after a GELU: min about -0.17, max
several units) gets an asymmetric zero point; the rest are symmetric.
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


class QuantizeError(RuntimeError):
    pass


def linear_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The block Linear layers: MatMul by a 2-D initializer named by graph.py."""
    initializers = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers and node.name.endswith(QUANTIZED_SUFFIXES)]


def normalised_key(tensor: str) -> str:
    """Where activation_ranges keeps the range of a LayerNorm's output before
    its gamma and beta (what to_int8 quantizes once they are folded away)."""
    return f"{tensor}#normalised"


def folded_layer_norm(tensor: str, producers, readers, initializers):
    """(node, gamma, beta) of the LayerNorm that writes `tensor` and that
    nothing else reads, if its gamma has no zero (so its output can be
    un-scaled back to the normalised values); else None."""
    norm = producers.get(tensor)
    if norm is None or norm.op_type != "LayerNormalization" or readers.get(tensor) != 1 or len(norm.input) < 3:
        return None
    if norm.input[1] not in initializers or norm.input[2] not in initializers:
        return None
    gamma = numpy_helper.to_array(initializers[norm.input[1]]).astype(np.float64)
    beta = numpy_helper.to_array(initializers[norm.input[2]]).astype(np.float64)
    if not np.all(gamma != 0):
        return None
    return norm, gamma, beta


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
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    norms = {t: f for t in tensors if (f := folded_layer_norm(t, producers, readers, initializers)) is not None}
    seen = 0
    for batch in batches:
        outputs = dict(zip(tensors, session.run(tensors, {graph.INPUT_NAME: batch})))
        for tensor, (_, gamma, beta) in norms.items():
            outputs[normalised_key(tensor)] = ((outputs[tensor] - beta) / gamma).astype(np.float32)
        with contextlib.redirect_stdout(io.StringIO()):  # the collector prints progress
            collector.collect(outputs)
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


def to_int8(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], copy: bool = True) -> onnx.ModelProto:
    """The fp32 graph with every block Linear as MatMulInteger: a copy, or
    (copy=False, for the 1.4 GB full graph) `model` itself rewritten.

    The form is chosen from tract 0.23.9's profile of the CI graph
    (bench_encoder --profile): its QuantizeLinear is a scalar loop and a
    binary op with a rank-1 vector operand ([C] broadcast over [N, C]) takes
    a slow generic path, 10 to 20 times slower than one whose operand is
    [1, C] or a scalar. So:

    - the input is quantized by scalar float ops, x / s + (z + 128.5), Clip
      to 0..255 and a Cast to u8 (which truncates, so the +0.5 rounds half
      up; u8 with zero point z + 128 holds the same levels as s8 with z);
    - where that input is a LayerNorm read by nothing else (qkv, fc1), the
      LayerNorm's gamma moves into the weight rows and beta into an added
      [1, out] term (beta @ W, applied right after the rescale: before
      window attention's padding, whose tokens must stay the plain bias),
      and the LayerNorm keeps gamma 1 and beta 0, which tract drops;
    - the per-column rescale is a [1, out] tensor."""
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

    def const(name: str, array: np.ndarray) -> str:
        added.append(numpy_helper.from_array(array, name))
        return name

    for node in g.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        x, w_name = node.input
        if x not in ranges:
            raise QuantizeError(f"no calibrated range for {x}, the input of {node.name}")
        p = node.name
        w = numpy_helper.to_array(initializers[w_name]).astype(np.float64)  # [in, out]
        replaced.add(w_name)
        x_range = ranges[x]
        folded_shift = None
        folded = folded_layer_norm(x, producers, readers, initializers)
        if folded is not None and normalised_key(x) in ranges:
            norm, gamma, beta = folded
            replaced.update(norm.input[1:3])
            folded_shift = beta @ w
            w = gamma[:, None] * w
            x_range = ranges[normalised_key(x)]
            norm.input[1] = const(f"{p}.norm_ones", np.ones(gamma.size, np.float32))
            norm.input[2] = const(f"{p}.norm_zeros", np.zeros(gamma.size, np.float32))
        x_scale, x_zero_point = activation_quantization(*x_range)
        w_scale = np.abs(w).max(axis=0) / INT8_MAX
        w_scale[w_scale == 0] = 1.0  # a dead column: all-zero weights either way
        w_q = np.clip(np.round(w / w_scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        zero_point_u8 = x_zero_point + 128
        nodes += [
            helper.make_node("Mul", [x, const(f"{p}.x_inv_scale", np.array(1.0 / x_scale, np.float32))],
                             [f"{p}.x_scaled"], name=f"{p}.x_scale"),
            helper.make_node("Add", [f"{p}.x_scaled", const(f"{p}.x_offset", np.array(zero_point_u8 + 0.5, np.float32))],
                             [f"{p}.x_levels"], name=f"{p}.x_offset"),
            helper.make_node("Clip", [f"{p}.x_levels", const(f"{p}.u8_low", np.array(0, np.float32)),
                                      const(f"{p}.u8_high", np.array(255, np.float32))],
                             [f"{p}.x_clipped"], name=f"{p}.clip"),
            helper.make_node("Cast", [f"{p}.x_clipped"], [f"{p}.x_q"], name=f"{p}.quantize", to=TensorProto.UINT8),
            helper.make_node("MatMulInteger", [f"{p}.x_q", const(f"{p}.weight_q", w_q),
                                               const(f"{p}.x_zero_point", np.array(zero_point_u8, np.uint8))],
                             [f"{p}.accumulator"], name=f"{p}.matmul_integer"),
            helper.make_node("Cast", [f"{p}.accumulator"], [f"{p}.accumulator_f32"], name=f"{p}.cast",
                             to=TensorProto.FLOAT),
        ]
        rescale = const(f"{p}.rescale", (x_scale * w_scale).reshape(1, -1).astype(np.float32))
        if folded_shift is None:
            nodes.append(helper.make_node("Mul", [f"{p}.accumulator_f32", rescale], [node.output[0]],
                                          name=f"{p}.rescale"))
        else:
            nodes += [
                helper.make_node("Mul", [f"{p}.accumulator_f32", rescale], [f"{p}.rescaled"], name=f"{p}.rescale"),
                helper.make_node("Add", [f"{p}.rescaled", const(f"{p}.norm_shift",
                                                                folded_shift.reshape(1, -1).astype(np.float32))],
                                 [node.output[0]], name=f"{p}.norm_shift"),
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
