"""An fp16 copy of an fp32 ONNX graph, for the encoder's fp16 tests.

  python daemon/encoder/tests/to_fp16.py IN.onnx OUT.onnx [--input-name NAME] [--f32-io]

Every float initializer, Constant and Cast-to-float becomes float16, and so do
the graph's input and output (as in Azure's MedImageInsight export), unless
--f32-io keeps them f32 behind Casts. --input-name renames the input: the
"other input names" case the encoder must refuse.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def to_fp16(model: onnx.ModelProto, f32_io: bool) -> onnx.ModelProto:
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    # Inferred intermediate types would contradict the new ones.
    del graph.value_info[:]
    for io in list(graph.input) + list(graph.output):
        io.type.tensor_type.elem_type = TensorProto.FLOAT16
    if f32_io:
        (inp,), (out,) = graph.input, graph.output
        inner_in, inner_out = inp.name + ".f16", out.name + ".f16"
        for node in graph.node:
            node.input[:] = [inner_in if n == inp.name else n for n in node.input]
            if out.name in node.output:
                # Node names must stay unique; the Cast below takes this one.
                node.name = node.name + ".f16"
            node.output[:] = [inner_out if n == out.name else n for n in node.output]
        graph.node.insert(0, helper.make_node("Cast", [inp.name], [inner_in], name=inner_in, to=TensorProto.FLOAT16))
        graph.node.append(helper.make_node("Cast", [inner_out], [out.name], name=out.name, to=TensorProto.FLOAT))
        inp.type.tensor_type.elem_type = TensorProto.FLOAT
        out.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--input-name")
    parser.add_argument("--f32-io", action="store_true")
    args = parser.parse_args()
    model = to_fp16(onnx.load(args.source), args.f32_io)
    if args.input_name:
        old = model.graph.input[0].name
        model.graph.input[0].name = args.input_name
        for node in model.graph.node:
            node.input[:] = [args.input_name if n == old else n for n in node.input]
    onnx.checker.check_model(model)
    onnx.save(model, args.target)


if __name__ == "__main__":
    main()
