"""Write the image branch (up to the global average pool) as an ONNX graph.

Every BatchNormalization is folded into the convolution that feeds it, so the
graph is Conv / Relu / MaxPool / Add only: fewer nodes for tract, and the int8
quantizer sees conv + bias pairs it can turn into integer convolutions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from keras_archive import ImageEncoder, Layer

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
OPSET = 13
# IR version 8 (ONNX 1.10 era) loads in every onnxruntime 1.x and in tract 0.23.
IR_VERSION = 8


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Keras 'same': the odd padding pixel goes after (bottom/right).

    ONNX auto_pad=SAME_UPPER would agree, but explicit pads keep the graph
    unambiguous for every runtime.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _GraphWriter:
    def __init__(self, encoder: ImageEncoder):
        self.encoder = encoder
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.tensor: dict[str, str] = {}  # Keras layer name -> ONNX tensor name
        self.spatial: dict[str, tuple[int, int]] = {}  # Keras layer name -> (H, W)

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def pads(self, hw: tuple[int, int], kernel: list[int], stride: int, padding: str) -> list[int]:
        if padding == "valid":
            return [0, 0, 0, 0]
        top, bottom = same_padding(hw[0], kernel[0], stride)
        left, right = same_padding(hw[1], kernel[1], stride)
        return [top, left, bottom, right]

    @staticmethod
    def out_hw(hw, kernel, stride, pads):
        return (
            (hw[0] + pads[0] + pads[2] - kernel[0]) // stride + 1,
            (hw[1] + pads[1] + pads[3] - kernel[1]) // stride + 1,
        )

    def conv(self, name, x, weight_oihw, bias, hw, kernel, stride, padding, group=1):
        pads = self.pads(hw, kernel, stride, padding)
        inputs = [x, self.constant(f"{name}.weight", weight_oihw)]
        if bias is not None:
            inputs.append(self.constant(f"{name}.bias", bias))
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [name], name=name,
                kernel_shape=kernel, strides=[stride, stride], pads=pads, group=group,
            )
        )
        return name, self.out_hw(hw, kernel, stride, pads)

    def folded_batch_norm(self, conv_layer: Layer) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, shift) of the BN that alone consumes conv_layer, if any."""
        followers = [l for l in self.encoder.layers if conv_layer.name in l.inputs]
        if len(followers) != 1 or followers[0].kind != "BatchNormalization":
            return None
        bn = followers[0]
        gamma, beta, mean, variance = (w.astype(np.float64) for w in bn.weights)
        scale = gamma / np.sqrt(variance + bn.config["epsilon"])
        return scale, beta - mean * scale

    def add_conv_layer(self, layer: Layer):
        cfg = layer.config
        assert cfg["dilation_rate"] == [1, 1] and cfg["strides"][0] == cfg["strides"][1]
        assert cfg["activation"] == "linear"
        stride = cfg["strides"][0]
        kernel = list(cfg["kernel_size"])
        source = layer.inputs[0]
        x, hw = self.tensor[source], self.spatial[source]
        weights = [w.astype(np.float64) for w in layer.weights]
        bias = weights[-1] if cfg["use_bias"] else np.zeros(cfg["filters"])

        if layer.kind == "SeparableConv2D":
            depthwise, pointwise = weights[0], weights[1]
            channels = depthwise.shape[2]
            x, hw = self.conv(
                f"{layer.name}.depthwise", x, depthwise.transpose(2, 3, 0, 1), None,
                hw, kernel, stride, cfg["padding"], group=channels,
            )
            kernel_oihw, kernel, stride, padding = pointwise.transpose(3, 2, 0, 1), [1, 1], 1, "valid"
        else:
            kernel_oihw, padding = weights[0].transpose(3, 2, 0, 1), cfg["padding"]

        output_layer = layer.name
        folded = self.folded_batch_norm(layer)
        if folded is not None:
            scale, shift = folded
            kernel_oihw = kernel_oihw * scale[:, None, None, None]
            bias = bias * scale + shift
            # The BN layer's output is this conv's output.
            output_layer = next(l.name for l in self.encoder.layers if layer.name in l.inputs)
        has_bias = folded is not None or cfg["use_bias"]
        name, hw = self.conv(output_layer, x, kernel_oihw, bias if has_bias else None, hw, kernel, stride, padding)
        self.tensor[output_layer], self.spatial[output_layer] = name, hw

    def add_layer(self, layer: Layer):
        cfg = layer.config
        if layer.kind == "InputLayer":
            self.tensor[layer.name] = INPUT_NAME
            self.spatial[layer.name] = tuple(cfg["batch_shape"][1:3])
        elif layer.kind in ("Conv2D", "SeparableConv2D"):
            self.add_conv_layer(layer)
        elif layer.kind == "BatchNormalization":
            if layer.name not in self.tensor:
                raise NotImplementedError(f"{layer.name}: BatchNormalization not preceded by a conv")
        elif layer.kind == "Activation":
            assert cfg["activation"] == "relu"
            self.simple("Relu", layer)
        elif layer.kind == "Add":
            self.simple("Add", layer)
        elif layer.kind == "MaxPooling2D":
            stride = cfg["strides"][0]
            source = layer.inputs[0]
            hw = self.spatial[source]
            kernel = list(cfg["pool_size"])
            # MaxPool pads are ignored cells (like TF's -inf), not zeros.
            pads = self.pads(hw, kernel, stride, cfg["padding"])
            self.nodes.append(
                helper.make_node(
                    "MaxPool", [self.tensor[source]], [layer.name], name=layer.name,
                    kernel_shape=kernel, strides=[stride, stride], pads=pads,
                )
            )
            self.tensor[layer.name], self.spatial[layer.name] = layer.name, self.out_hw(hw, kernel, stride, pads)
        elif layer.kind == "GlobalAveragePooling2D":
            pooled = f"{layer.name}.nchw11"
            self.nodes.append(helper.make_node("GlobalAveragePool", [self.tensor[layer.inputs[0]]], [pooled], name=pooled))
            self.nodes.append(helper.make_node("Flatten", [pooled], [layer.name], name=layer.name, axis=1))
            self.tensor[layer.name], self.spatial[layer.name] = layer.name, (1, 1)
        else:
            raise NotImplementedError(layer.kind)

    def simple(self, op: str, layer: Layer):
        inputs = [self.tensor[name] for name in layer.inputs]
        self.nodes.append(helper.make_node(op, inputs, [layer.name], name=layer.name))
        self.tensor[layer.name], self.spatial[layer.name] = layer.name, self.spatial[layer.inputs[0]]


def build_model(encoder: ImageEncoder, embedding_dim: int) -> onnx.ModelProto:
    writer = _GraphWriter(encoder)
    for layer in encoder.layers:
        writer.add_layer(layer)
    writer.nodes.append(helper.make_node("Identity", [writer.tensor[encoder.output]], [OUTPUT_NAME], name=OUTPUT_NAME))

    height, width, channels = encoder.input_shape
    graph = helper.make_graph(
        writer.nodes,
        "sklesion_xception_embedding",
        # Fixed batch of 1: a symbolic batch makes tract several times slower.
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, channels, height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, embedding_dim])],
        writer.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="dermascope-models",
        ir_version=IR_VERSION,
    )
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model
