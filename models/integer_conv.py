"""The shipped int8 form: ConvInteger with a float rescale, written by hand.

Every 1x1 convolution (the pointwise half of each separable convolution and
the residual shortcuts, 93% of the network's multiply-adds) becomes

    QuantizeLinear(x, x_scale, x_zero_point)          per-tensor, calibrated
    ConvInteger(x_q, w_q, x_zero_point) -> int32       s8 x s8, per-channel w
    Cast(float) * (x_scale * w_scale[c]) + bias[c]     float, per channel

instead of onnxruntime's QLinearConv. Where the input comes straight from a
depthwise convolution (34 of the 38), the QuantizeLinear is folded into that
convolution's filter and bias and becomes Clip + Cast to u8, see
_quantize_in_depthwise. Two reasons for the form, both measured
(docs/benchmarks.md):

- Speed in tract 0.23: QLinearConv's per-channel output requantization runs
  as five element-wise passes over the int32 accumulator, more than half of
  the int8 plan's time; here the rescale is one float multiply-add that tract
  chains with the following Relu (`OptBinChain`).
- Fidelity: the output is never rounded to int8, so the only int8 rounding is
  of weights and of each convolution's input.

Depthwise convolutions and the two 3x3 entry convolutions stay in float:
tract runs an int8 depthwise through im2col and a grouped matmul, and an
int8 3x3 convolution through a materialised im2col, while its float paths
avoid both, and together they are 7% of the multiply-adds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data, save_tensors_data

INT8_MAX = 127


def node_attribute(node: onnx.NodeProto, name: str, default):
    """An ONNX node's attribute value, or `default` when the node omits it."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def is_integer_conv(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """1x1 and not grouped: what this form computes in int8."""
    return node.op_type == "Conv" and node_attribute(node, "group", 1) == 1 and weight.shape[2:] == (1, 1)


def activation_ranges(fp32: Path, reader, method, chunk: int, cache_file: Path) -> dict[str, tuple[float, float]]:
    """Calibrated (lowest, highest) of every Conv input and output.

    Same calibrator, options and cache file format as onnxruntime's
    quantize_static(op_types_to_quantize=["Conv"], calibration_cache_path=...),
    so the two share one cache and one calibration pass."""
    if cache_file.is_file():
        tensors = load_tensors_data(cache_file)
    else:
        calibrator = create_calibrator(
            fp32, ["Conv"], augmented_model_path=str(cache_file.with_suffix(".augmented.onnx")),
            calibrate_method=method,
        )
        for start in range(0, len(reader), chunk):
            reader.set_range(start_index=start, end_index=start + chunk)
            calibrator.collect_data(reader)
        tensors = calibrator.compute_data()
        del calibrator
        cache_file.with_suffix(".augmented.onnx").unlink(missing_ok=True)
        save_tensors_data(tensors, cache_file)
    return {name: tuple(float(np.asarray(v)) for v in data.range_value) for name, data in tensors.data.items()}


def _activation_quantization(lowest: float, highest: float) -> tuple[float, int]:
    """(scale, zero point) for an s8 activation. Signed ranges are symmetric
    (zero point 0: tract then skips the zero-point correction); non-negative
    ones (after a Relu) use all 256 levels from 0 up."""
    lowest, highest = min(lowest, 0.0), max(highest, 0.0)
    if highest == lowest:
        return 1.0, 0
    if lowest < 0:
        return max(-lowest, highest) / INT8_MAX, 0
    scale = highest / 255.0
    return scale, -128


def _depthwise_producer(graph: onnx.GraphProto, tensor: str, initializers) -> onnx.NodeProto | None:
    """The depthwise convolution that writes `tensor` and nothing else reads
    (so its output may be rescaled), if any."""
    readers = [node for node in graph.node if tensor in node.input]
    for node in graph.node:
        if node.output and node.output[0] == tensor:
            weight = initializers.get(node.input[1]) if node.op_type == "Conv" else None
            if weight is not None and node_attribute(node, "group", 1) > 1 and len(readers) == 1:
                return node
    return None


def _quantize_in_depthwise(depthwise, x_scale, initializers, added, prefix) -> list[onnx.NodeProto]:
    """Quantize a depthwise convolution's output without QuantizeLinear.

    tract's QuantizeLinear is a scalar loop (17% of the int8 plan). Folding
    1/scale and the zero point into the depthwise filter and bias leaves
    Clip (vectorised) and a Cast to u8, which truncates: adding 0.5 first
    makes that round-half-up, exact because the clipped value is >= 0. u8
    with zero point 128 holds the same levels as s8 with zero point 0."""
    zero_point = 128
    weight = initializers[depthwise.input[1]].astype(np.float64)
    bias = (initializers[depthwise.input[2]].astype(np.float64) if len(depthwise.input) > 2
            else np.zeros(weight.shape[0]))
    added[f"{prefix}.depthwise_weight_q"] = (weight / x_scale).astype(np.float32)
    added[f"{prefix}.depthwise_bias_q"] = (bias / x_scale + zero_point + 0.5).astype(np.float32)
    added[f"{prefix}.u8_low"] = np.array(0, np.float32)
    added[f"{prefix}.u8_high"] = np.array(255, np.float32)
    added[f"{prefix}.x_zero_point_u8"] = np.array(zero_point, np.uint8)
    del depthwise.input[1:]
    depthwise.input.extend([f"{prefix}.depthwise_weight_q", f"{prefix}.depthwise_bias_q"])
    return [
        helper.make_node("Clip", [depthwise.output[0], f"{prefix}.u8_low", f"{prefix}.u8_high"],
                         [f"{prefix}.x_clipped"], name=f"{prefix}.clip"),
        helper.make_node("Cast", [f"{prefix}.x_clipped"], [f"{prefix}.x_q"], name=f"{prefix}.quantize",
                         to=TensorProto.UINT8),
    ]


def to_convinteger(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """A copy of the folded fp32 graph with every 1x1 convolution in int8."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    unused = set()
    added: dict[str, np.ndarray] = {}
    nodes = []
    for node in list(graph.node):
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or not is_integer_conv(node, weight):
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in ranges:
            raise ValueError(f"no calibrated range for {x}, the input of {node.name}")
        x_scale, x_zero_point = _activation_quantization(*ranges[x])
        weight = weight.astype(np.float64)
        w_scale = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1) / INT8_MAX
        w_scale[w_scale == 0] = 1.0  # a dead output channel: all-zero weights either way
        w_q = np.clip(np.round(weight / w_scale[:, None, None, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        bias = initializers[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
        unused.update(node.input[1:])

        prefix = node.name
        depthwise = _depthwise_producer(graph, x, initializers) if x_zero_point == 0 else None
        if depthwise is not None:
            unused.update(depthwise.input[1:])
            quantize = _quantize_in_depthwise(depthwise, x_scale, initializers, added, prefix)
            zero_point_name = f"{prefix}.x_zero_point_u8"
        else:
            added[f"{prefix}.x_scale"] = np.array(x_scale, np.float32)
            added[f"{prefix}.x_zero_point"] = np.array(x_zero_point, np.int8)
            zero_point_name = f"{prefix}.x_zero_point"
            quantize = [helper.make_node("QuantizeLinear", [x, f"{prefix}.x_scale", zero_point_name],
                                         [f"{prefix}.x_q"], name=f"{prefix}.quantize")]
        added[f"{prefix}.weight_q"] = w_q
        added[f"{prefix}.rescale"] = (x_scale * w_scale).reshape(1, -1, 1, 1).astype(np.float32)
        added[f"{prefix}.channel_bias"] = bias.reshape(1, -1, 1, 1).astype(np.float32)
        conv_attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
        nodes += quantize + [
            helper.make_node("ConvInteger", [f"{prefix}.x_q", f"{prefix}.weight_q", zero_point_name],
                             [f"{prefix}.accumulator"], name=f"{prefix}.conv_integer", **conv_attributes),
            helper.make_node("Cast", [f"{prefix}.accumulator"], [f"{prefix}.accumulator_f32"],
                             name=f"{prefix}.cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{prefix}.accumulator_f32", f"{prefix}.rescale"], [f"{prefix}.rescaled"],
                             name=f"{prefix}.rescale"),
            helper.make_node("Add", [f"{prefix}.rescaled", f"{prefix}.channel_bias"], [node.output[0]],
                             name=f"{prefix}.channel_bias"),
        ]
    if not added:
        raise ValueError("no 1x1 convolution to quantize")
    still_used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name not in unused or init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in added.items())
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model
