"""Weight equalisation: per-channel accuracy from per-tensor int8 weights.

tract 0.23 fuses a per-tensor requantization into its int8 matmul kernel but
runs a per-channel one as five element-wise passes over the i32 accumulator,
more than half the int8 plan's time (docs/benchmarks.md). Per-channel weights
exist because output channels of one convolution have very different weight
ranges, and one scale for all of them wastes most of the int8 levels on the
small ones.

The rewrite here makes the ranges equal before quantization instead. Each
output channel c of a full or pointwise convolution is divided by s_c (its
weights and bias), so every row reaches the same largest |weight|; the
convolution's output channel c is then y_c / s_c. What follows undoes that
exactly, in float:

- Relu, MaxPool (and GlobalAveragePool) commute with a positive per-channel
  scale, so the scale is carried through them;
- a following convolution absorbs it into its input-channel weights: a float
  depthwise filter c, or column c of a full / pointwise convolution (which is
  then equalised itself);
- anything else (an Add with the residual branch, the graph output) gets an
  explicit per-channel Mul right after the convolution: one float pass, much
  cheaper than tract's per-channel requantization.

In float the rewritten graph computes the same function (checked by the build
to within float rounding); only the int8 rounding changes.

`alpha` interpolates between no equalisation (0) and equal row ranges (1):
equal weight ranges make a channel's activations larger in proportion, and
the activations are quantized per tensor too, so the best point can lie in
between.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from integer_conv import node_attribute

# A Relu, MaxPool or GlobalAveragePool output is a positive per-channel scale
# of its input's, so a scale can be carried through them to the next conv.
SCALE_EQUIVARIANT = {"Relu", "MaxPool", "GlobalAveragePool"}
# Rows whose largest weight is below this fraction of the largest row's are
# dead channels: scaling them up would only amplify rounding noise.
MIN_ROW_FRACTION = 1e-4


@dataclass
class EqualisationReport:
    equalised: int  # convolutions whose rows were rescaled
    folded: int  # of those, compensated inside the following convolutions
    compensating_muls: int  # of those, compensated by an explicit Mul
    largest_scale_ratio: float  # max over convs of max(s) / min(s)


def equalise(model: onnx.ModelProto, alpha: float = 1.0) -> tuple[onnx.ModelProto, EqualisationReport]:
    """Returns a copy of `model` whose full and pointwise convolutions have
    equal per-row weight ranges (alpha = 1), and the report of what moved."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    weights = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {output.name for output in graph.output}

    def frontier(tensor: str) -> list[tuple[onnx.NodeProto | None, str]]:
        """(consumer, tensor it reads) past every scale-equivariant op; None
        for a graph output."""
        found, pending = [], [tensor]
        while pending:
            current = pending.pop()
            if current in graph_outputs:
                found.append((None, current))
            for node in consumers[current]:
                if node.op_type in SCALE_EQUIVARIANT:
                    pending.append(node.output[0])
                else:
                    found.append((node, current))
        return found

    new_nodes: list[onnx.NodeProto] = []
    equalised = folded = muls = 0
    largest_ratio = 1.0
    for node in list(graph.node):  # the exporter writes nodes in topological order
        new_nodes.append(node)
        if node.op_type != "Conv" or node_attribute(node, "group", 1) != 1:
            continue
        weight_name = node.input[1]
        weight = weights[weight_name]
        row_range = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
        top = row_range.max()
        if top == 0:
            continue
        relative = np.maximum(row_range / top, MIN_ROW_FRACTION)
        scale = relative**alpha  # new row range: row_range / scale
        largest_ratio = max(largest_ratio, float(scale.max() / scale.min()))
        weights[weight_name] = weight / scale[:, None, None, None]
        if len(node.input) > 2:
            weights[node.input[2]] = weights[node.input[2]] / scale
        equalised += 1

        readers = frontier(node.output[0])
        if all(reader is not None and reader.op_type == "Conv" and reader.input[0] == tensor
               for reader, tensor in readers):
            for reader, _ in readers:
                reader_weight = weights[reader.input[1]]
                if node_attribute(reader, "group", 1) == 1:
                    weights[reader.input[1]] = reader_weight * scale[None, :, None, None]
                else:  # depthwise: one filter per channel
                    weights[reader.input[1]] = reader_weight * scale[:, None, None, None]
            folded += 1
        else:
            # Undo the scale right here: rename the conv's output and let a Mul
            # write the original tensor name, so no reader changes.
            original = node.output[0]
            node.output[0] = f"{original}.equalised"
            scale_name = f"{original}.equalisation_scale"
            weights[scale_name] = scale.reshape(1, -1, 1, 1)
            graph.initializer.append(numpy_helper.from_array(weights[scale_name].astype(np.float32), scale_name))
            new_nodes.append(helper.make_node("Mul", [node.output[0], scale_name], [original], name=scale_name))
            muls += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    for init in graph.initializer:
        init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model, EqualisationReport(equalised, folded, muls, largest_ratio)
