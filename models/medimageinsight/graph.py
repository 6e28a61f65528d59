"""The MedImageInsight image tower (DaViT + image projection) as an ONNX graph.

Written by hand with onnx.helper, like models/export_onnx.py, from the
semantics of the published davit_v1.py and UniCLModel.encode_image:

    stem:   ConvEmbed (7x7 stride 4), then 3x3 stride 2 per stage, with the
            LayerNorm before (patch_prenorm, on the previous stage's tokens)
            or after the convolution
    block:  SpatialBlock (depthwise 3x3 residual, window attention, depthwise
            3x3 residual, MLP) then ChannelBlock (the same with channel
            attention); every attention and MLP is pre-norm and residual
    head:   mean over tokens, LayerNorm (`norms`), @ image_projection

The output is the projected embedding, not L2-normalised (the daemon
normalises). Everything is static: the token stream is a 2-D [tokens,
channels] tensor whose shapes, window padding and reshapes are computed here
from the configuration, so tract optimises one fixed graph and no shape
subgraph survives into it.

Attention scales (head_dim^-0.5 for windows, tokens^-0.5 for channel
attention, both constants at a fixed input size) are folded into the query
columns of the qkv weight and bias.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
# LayerNormalization is opset 17. IR 8 loads in tract 0.23 and every
# onnxruntime 1.x, as for the default encoder.
OPSET = 17
IR_VERSION = 8
LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, used throughout davit_v1
PREFIX = "image_encoder."


def image_hw(cfg) -> tuple[int, int]:
    size = cfg.image_size
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_sizes(cfg) -> list[tuple[int, int]]:
    """Token grid (H, W) of each stage for the configured input."""
    h, w = image_hw(cfg)
    sizes = []
    for i in range(len(cfg.dims)):
        h = conv_out(h, cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i])
        w = conv_out(w, cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i])
        sizes.append((h, w))
    return sizes


def window_padding(h: int, w: int, window: int) -> tuple[int, int]:
    """(bottom, right) zero padding that makes the grid a multiple of the
    window, as WindowAttention pads (after its LayerNorm)."""
    return (window - h % window) % window, (window - w % window) % window


def weight(weights: dict[str, np.ndarray], key: str) -> np.ndarray:
    """A tower weight by its published key (with or without `image_encoder.`)."""
    for name in (PREFIX + key, key):
        if name in weights:
            return np.asarray(weights[name])
    raise KeyError(f"missing weight {PREFIX + key}")


def projection(weights: dict[str, np.ndarray]) -> np.ndarray:
    if "image_projection" not in weights:
        raise KeyError("missing weight image_projection")
    return np.asarray(weights["image_projection"])


class _Writer:
    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.constants: dict[tuple, str] = {}

    def const(self, name: str, array: np.ndarray, dtype=np.float32) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def shape(self, dims) -> str:
        """A shared int64 shape/index constant."""
        key = ("i64", tuple(int(d) for d in dims))
        if key not in self.constants:
            name = "shape." + "x".join(str(d) for d in key[1]).replace("-", "m")
            self.constants[key] = self.const(name, np.array(key[1], np.int64), np.int64)
        return self.constants[key]

    def node(self, op: str, inputs: list[str], name: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def reshape(self, x: str, dims, name: str) -> str:
        return self.node("Reshape", [x, self.shape(dims)], name)

    def transpose(self, x: str, perm, name: str) -> str:
        return self.node("Transpose", [x], name, perm=list(perm))

    def layer_norm(self, x: str, key: str, name: str) -> str:
        scale = self.const(f"{name}.weight", weight(self.weights, f"{key}.weight"))
        bias = self.const(f"{name}.bias", weight(self.weights, f"{key}.bias"))
        return self.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=LAYER_NORM_EPSILON)

    def linear(self, x: str, key: str, name: str, w: np.ndarray | None = None, b: np.ndarray | None = None) -> str:
        """torch Linear (weight [out, in]) as MatMul by [in, out] + bias.
        The MatMul keeps the name `<name>` so quantize.py finds it by its
        readable name; the bias Add is `<name>.bias`."""
        w = weight(self.weights, f"{key}.weight") if w is None else w
        b = weight(self.weights, f"{key}.bias") if b is None else b
        y = self.node("MatMul", [x, self.const(f"{name}.weight", w.T)], f"{name}")
        return self.node("Add", [y, self.const(f"{name}.bias_value", b)], f"{name}.bias")

    def gelu(self, x: str, name: str) -> str:
        # Exact (erf) GELU, torch.nn.GELU's default: 0.5 x (1 + erf(x / sqrt 2)).
        if ("gelu",) not in self.constants:
            self.constants[("gelu",)] = (
                self.const("gelu.inv_sqrt2", np.array(1 / math.sqrt(2))),
                self.const("gelu.one", np.array(1.0)),
                self.const("gelu.half", np.array(0.5)),
            )
        inv_sqrt2, one, half = self.constants[("gelu",)]
        scaled = self.node("Mul", [x, inv_sqrt2], f"{name}.scaled")
        erf = self.node("Erf", [scaled], f"{name}.erf")
        plus = self.node("Add", [erf, one], f"{name}.one_plus")
        halved = self.node("Mul", [x, half], f"{name}.half")
        return self.node("Mul", [halved, plus], name)

    def depthwise_residual(self, x: str, key: str, name: str, hw: tuple[int, int], dim: int) -> str:
        """x + depthwise 3x3 (stride 1, pad 1) on the token grid."""
        h, w = hw
        grid = self.reshape(self.transpose(x, (1, 0), f"{name}.channels_first"), (1, dim, h, w), f"{name}.grid")
        kernel = weight(self.weights, f"{key}.weight")
        inputs = [grid, self.const(f"{name}.weight", kernel)]
        bias_key = PREFIX + f"{key}.bias"
        if bias_key in self.weights or f"{key}.bias" in self.weights:
            inputs.append(self.const(f"{name}.bias", weight(self.weights, f"{key}.bias")))
        k = kernel.shape[-1]
        conv = self.node("Conv", inputs, f"{name}.conv", kernel_shape=[k, k], pads=[k // 2] * 4, group=dim)
        tokens = self.transpose(self.reshape(conv, (dim, h * w), f"{name}.flat"), (1, 0), f"{name}.tokens")
        return self.node("Add", [x, tokens], name)

    def qkv_scaled(self, key: str, dim: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        w = weight(self.weights, f"{key}.weight").astype(np.float64).copy()
        b = weight(self.weights, f"{key}.bias").astype(np.float64).copy()
        w[:dim] *= scale
        b[:dim] *= scale
        return w, b

    def window_attention(self, x: str, key: str, name: str, hw, dim: int, heads: int, window: int) -> str:
        """Multi-head attention inside each window of the zero-padded grid.

        The published code pads the normed tokens, then runs qkv and proj on
        every padded token. qkv of a zero token is its bias, and proj is
        per token with the padding cropped afterwards, so here qkv's matmul
        runs on the real tokens, the padding is added to its output before
        the bias, and proj runs after the crop: the same numbers (the numpy
        reference pads first, as published) without the padding's share of
        the two largest matmuls (a third of stage 2's and 60% of stage 3's
        qkv and proj at 480)."""
        h, w = hw
        head_dim = dim // heads
        pad_b, pad_r = window_padding(h, w, window)
        hp, wp = h + pad_b, w + pad_r
        rows, cols = hp // window, wp // window
        windows, area = rows * cols, window * window
        qkv_w, qkv_b = self.qkv_scaled(f"{key}.qkv", dim, head_dim ** -0.5)
        qkv = self.node("MatMul", [x, self.const(f"{name}.qkv.weight", qkv_w.T)], f"{name}.qkv")
        grid = self.reshape(qkv, (h, w, 3 * dim), f"{name}.qkv_grid")
        if pad_b or pad_r:
            grid = self.node("Pad", [grid, self.shape((0, 0, 0, pad_b, pad_r, 0))], f"{name}.pad", mode="constant")
        grid = self.node("Add", [grid, self.const(f"{name}.qkv.bias_value", qkv_b)], f"{name}.qkv.bias")
        blocks = self.reshape(grid, (rows, window, cols, window, 3 * dim), f"{name}.blocks")
        partitioned = self.transpose(blocks, (0, 2, 1, 3, 4), f"{name}.partition")
        per_head = self.transpose(self.reshape(partitioned, (windows, area, 3 * heads, head_dim), f"{name}.qkv_heads"),
                                  (0, 2, 1, 3), f"{name}.qkv_heads_first")
        q, k, v = (f"{name}.{part}" for part in ("q", "k", "v"))
        self.nodes.append(helper.make_node("Split", [per_head, self.shape((heads, heads, heads))], [q, k, v],
                                           name=f"{name}.split", axis=1))
        scores = self.node("MatMul", [q, self.transpose(k, (0, 1, 3, 2), f"{name}.k_t")], f"{name}.scores")
        attention = self.node("Softmax", [scores], f"{name}.softmax", axis=-1)
        mixed = self.node("MatMul", [attention, v], f"{name}.mixed")
        back = self.reshape(self.transpose(mixed, (0, 2, 1, 3), f"{name}.heads_last"),
                            (rows, cols, window, window, dim), f"{name}.out_blocks")
        grid_out = self.reshape(self.transpose(back, (0, 2, 1, 3, 4), f"{name}.reverse"), (hp, wp, dim),
                                f"{name}.out_grid")
        if pad_b or pad_r:
            grid_out = self.node("Slice", [grid_out, self.shape((0, 0)), self.shape((h, w)), self.shape((0, 1))],
                                 f"{name}.crop")
        merged = self.reshape(grid_out, (h * w, dim), f"{name}.merged")
        return self.linear(merged, f"{key}.proj", f"{name}.proj")

    def channel_attention(self, x: str, key: str, name: str, tokens: int, dim: int, groups: int) -> str:
        group_dim = dim // groups
        # dynamic_scale: the scale is tokens^-0.5, a constant at a fixed input size.
        qkv_w, qkv_b = self.qkv_scaled(f"{key}.qkv", dim, tokens ** -0.5)
        qkv = self.linear(x, f"{key}.qkv", f"{name}.qkv", qkv_w, qkv_b)
        per_group = self.transpose(self.reshape(qkv, (tokens, 3 * groups, group_dim), f"{name}.qkv_groups"),
                                   (1, 0, 2), f"{name}.qkv_groups_first")
        q, k, v = (f"{name}.{part}" for part in ("q", "k", "v"))
        self.nodes.append(helper.make_node("Split", [per_group, self.shape((groups, groups, groups))], [q, k, v],
                                           name=f"{name}.split", axis=0))
        # [groups, group_dim, group_dim]: channels attend to channels.
        scores = self.node("MatMul", [self.transpose(q, (0, 2, 1), f"{name}.q_t"), k], f"{name}.scores")
        attention = self.node("Softmax", [scores], f"{name}.softmax", axis=-1)
        # (attention @ v^T)^T = v @ attention^T: [groups, tokens, group_dim]
        mixed = self.node("MatMul", [v, self.transpose(attention, (0, 2, 1), f"{name}.attention_t")],
                          f"{name}.mixed")
        merged = self.reshape(self.transpose(mixed, (1, 0, 2), f"{name}.groups_last"), (tokens, dim),
                              f"{name}.merged")
        return self.linear(merged, f"{key}.proj", f"{name}.proj")

    def mlp(self, x: str, key: str, name: str) -> str:
        hidden = self.linear(x, f"{key}.fc1", f"{name}.fc1")
        return self.linear(self.gelu(hidden, f"{name}.gelu"), f"{key}.fc2", f"{name}.fc2")

    def block(self, x, key, name, hw, dim, attention) -> str:
        """Spatial or channel block: conv1, attention, conv2, ffn (all residual)."""
        attn_key = "window_attn" if attention[0] == "window" else "channel_attn"
        x = self.depthwise_residual(x, f"{key}.conv1.fn.dw", f"{name}.conv1", hw, dim)
        normed = self.layer_norm(x, f"{key}.{attn_key}.norm", f"{name}.attn_norm")
        if attention[0] == "window":
            y = self.window_attention(normed, f"{key}.{attn_key}.fn", f"{name}.attn", hw, dim, attention[1],
                                      attention[2])
        else:
            y = self.channel_attention(normed, f"{key}.{attn_key}.fn", f"{name}.attn", hw[0] * hw[1], dim,
                                       attention[1])
        x = self.node("Add", [x, y], f"{name}.attn_residual")
        x = self.depthwise_residual(x, f"{key}.conv2.fn.dw", f"{name}.conv2", hw, dim)
        normed = self.layer_norm(x, f"{key}.ffn.norm", f"{name}.ffn_norm")
        y = self.mlp(normed, f"{key}.ffn.fn.net", f"{name}.ffn")
        return self.node("Add", [x, y], f"{name}.ffn_residual")

    def patch_embed(self, x: str, stage: int, cfg, in_hw, out_hw, in_dim: int) -> str:
        """ConvEmbed: tokens (or the image) -> conv -> tokens, LayerNorm before
        (patch_prenorm, on tokens only: the image itself is never normed) or after."""
        name, key = f"stage{stage}.embed", f"convs.{stage}"
        dim = cfg.dims[stage]
        if stage == 0:
            grid = x
        else:
            if cfg.patch_prenorm[stage]:
                x = self.layer_norm(x, f"{key}.norm", f"{name}.norm")
            grid = self.reshape(self.transpose(x, (1, 0), f"{name}.channels_first"), (1, in_dim, *in_hw),
                                f"{name}.grid")
        k, s, p = cfg.patch_size[stage], cfg.patch_stride[stage], cfg.patch_padding[stage]
        inputs = [grid, self.const(f"{name}.conv.weight", weight(self.weights, f"{key}.proj.weight")),
                  self.const(f"{name}.conv.bias", weight(self.weights, f"{key}.proj.bias"))]
        conv = self.node("Conv", inputs, f"{name}.conv", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
        tokens = self.transpose(self.reshape(conv, (dim, out_hw[0] * out_hw[1]), f"{name}.flat"), (1, 0),
                                f"{name}.tokens")
        if not cfg.patch_prenorm[stage]:
            tokens = self.layer_norm(tokens, f"{key}.norm", f"{name}.norm")
        return tokens


def build_fp32(cfg, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """image [1,3,H,W] (normalised) -> embedding [1, projection_dim]."""
    writer = _Writer(weights)
    sizes = stage_sizes(cfg)
    height, width = image_hw(cfg)
    x, hw, dim = INPUT_NAME, (height, width), 3
    for stage, out_hw in enumerate(sizes):
        x = writer.patch_embed(x, stage, cfg, hw, out_hw, dim)
        hw, dim = out_hw, cfg.dims[stage]
        for j in range(cfg.depths[stage]):
            base = f"blocks.{stage}.{j}"
            x = writer.block(x, f"{base}.spatial_block", f"stage{stage}.block{j}.spatial", hw, dim,
                             ("window", cfg.heads[stage], cfg.window))
            x = writer.block(x, f"{base}.channel_block", f"stage{stage}.block{j}.channel", hw, dim,
                             ("channel", cfg.groups[stage]))
    pooled = writer.node("ReduceMean", [x], "head.pool", axes=[0], keepdims=1)
    normed = writer.layer_norm(pooled, "norms", "head.norm")
    proj = writer.const("head.projection.weight", projection(weights))
    writer.node("MatMul", [normed, proj], OUTPUT_NAME)
    graph = helper.make_graph(
        writer.nodes,
        "medimageinsight_image_embedding",
        # Fixed batch of 1: a symbolic batch makes tract several times slower.
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, cfg.projection_dim])],
        writer.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dermascope-models", ir_version=IR_VERSION)
    return check(model)


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference and the checker; the checker takes a path for models
    over protobuf's 2 GB message limit, which the full graph is not (1.4 GB)."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model
