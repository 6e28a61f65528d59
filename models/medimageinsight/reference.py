"""Independent numpy forward of the MedImageInsight image tower, float64.

Written from davit_v1.py's semantics (ConvEmbed, PreNorm residuals,
WindowAttention with its zero padding, ChannelAttention with dynamic scale,
mean pooling, `norms`, then UniCL's `@ image_projection`), not from graph.py:
batch-first [B, tokens, C] tensors as the source keeps them, convolutions as
sliding-window sums, windows attended one by one, attention scales applied
to q as the source does (graph.py folds them into the weights). Agreement
with the ONNX graph is evidence that graph.py is the published model.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from davit_config import ENCODER_PREFIX, PROJECTION_KEY, DavitConfig

EPSILON = 1e-5
# The graph computes in float32 and the reference in float64: at the CI size
# their embeddings agree to ~1e-6 of the largest value. A relative error
# above this is a wiring mistake, not rounding.
MAX_RELATIVE_ERROR = 1e-3


class ReferenceMismatch(AssertionError):
    """The ONNX graph disagrees with the numpy reference."""


def _w(weights, key: str) -> np.ndarray:
    return np.asarray(weights[ENCODER_PREFIX + key], dtype=np.float64)


def _layer_norm(x, weights, key):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPSILON) * _w(weights, f"{key}.weight") + _w(weights, f"{key}.bias")


def _linear(x, weights, key):
    return x @ _w(weights, f"{key}.weight").T + _w(weights, f"{key}.bias")


_ERF = np.frompyfunc(math.erf, 1, 1)


def _gelu(x):
    # Exact GELU (torch.nn.GELU's default). numpy has no erf; math.erf per
    # element is exact to float64 and about a second at the CI size.
    return 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0)).astype(np.float64))


def _conv2d(x_bchw, weight, bias, stride, padding, groups=1):
    b, c, h, w = x_bchw.shape
    out_c, in_per_group, k, _ = weight.shape
    x = np.pad(x_bchw, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    patches = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # b c oh ow k k
    if groups == 1:
        out = np.einsum("bcyxij,ocij->boyx", patches, weight, optimize=True)
    else:
        assert groups == c == out_c and in_per_group == 1
        out = np.einsum("bcyxij,cij->bcyx", patches, weight[:, 0], optimize=True)
    return out + bias[None, :, None, None]


def _to_grid(tokens, size):
    b, n, c = tokens.shape
    return tokens.transpose(0, 2, 1).reshape(b, c, *size)


def _to_tokens(grid):
    b, c, h, w = grid.shape
    return grid.reshape(b, c, h * w).transpose(0, 2, 1), (h, w)


def _depthwise(tokens, size, weights, key):
    out, _ = _to_tokens(_conv2d(_to_grid(tokens, size), _w(weights, f"{key}.weight"), _w(weights, f"{key}.bias"),
                                1, 1, groups=tokens.shape[2]))
    return out


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def window_attention(x, size, weights, key, heads, window):
    b, n, c = x.shape
    h, w = size
    grid = x.reshape(b, h, w, c)
    pad_r = (window - w % window) % window
    pad_b = (window - h % window) % window
    grid = np.pad(grid, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    out = np.zeros_like(grid)
    head_dim = c // heads
    for top in range(0, grid.shape[1], window):
        for left in range(0, grid.shape[2], window):
            tokens = grid[:, top:top + window, left:left + window].reshape(b, window * window, c)
            qkv = _linear(tokens, weights, f"{key}.qkv").reshape(b, window * window, 3, heads, head_dim)
            q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # b heads n d
            attention = _softmax((q * head_dim ** -0.5) @ k.transpose(0, 1, 3, 2))
            mixed = (attention @ v).transpose(0, 2, 1, 3).reshape(b, window * window, c)
            out[:, top:top + window, left:left + window] = _linear(mixed, weights, f"{key}.proj").reshape(
                b, window, window, c)
    return out[:, :h, :w].reshape(b, n, c)


def channel_attention(x, weights, key, groups):
    b, n, c = x.shape
    qkv = _linear(x, weights, f"{key}.qkv").reshape(b, n, 3, groups, c // groups).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * n ** -0.5, qkv[1], qkv[2]  # b groups n d
    attention = _softmax(q.transpose(0, 1, 3, 2) @ k)  # b groups d d
    mixed = (attention @ v.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # b groups n d
    return _linear(mixed.transpose(0, 2, 1, 3).reshape(b, n, c), weights, f"{key}.proj")


def _block(x, size, weights, key, attend):
    attn_key = "window_attn" if "spatial" in key else "channel_attn"
    x = x + _depthwise(x, size, weights, f"{key}.conv1.fn.dw")
    x = x + attend(_layer_norm(x, weights, f"{key}.{attn_key}.norm"), f"{key}.{attn_key}.fn")
    x = x + _depthwise(x, size, weights, f"{key}.conv2.fn.dw")
    normed = _layer_norm(x, weights, f"{key}.ffn.norm")
    hidden = _gelu(_linear(normed, weights, f"{key}.ffn.fn.net.fc1"))
    return x + _linear(hidden, weights, f"{key}.ffn.fn.net.fc2")


def features(cfg: DavitConfig, weights, images_bchw: np.ndarray) -> np.ndarray:
    """forward_features: [B, 3, H, W] -> [B, dims[-1]] (pooled, normed)."""
    x = images_bchw.astype(np.float64)
    size = x.shape[2:]
    for i in range(4):
        key = f"convs.{i}"
        if x.ndim == 3:
            if cfg.patch_prenorm[i]:
                x = _layer_norm(x, weights, f"{key}.norm")
            x = _to_grid(x, size)
        x = _conv2d(x, _w(weights, f"{key}.proj.weight"), _w(weights, f"{key}.proj.bias"),
                    cfg.patch_stride[i], cfg.patch_padding[i])
        x, size = _to_tokens(x)
        if not cfg.patch_prenorm[i]:
            x = _layer_norm(x, weights, f"{key}.norm")
        for j in range(cfg.depths[i]):
            base = f"blocks.{i}.{j}"
            x = _block(x, size, weights, f"{base}.spatial_block",
                       lambda t, k, s=size, h=cfg.heads[i]: window_attention(t, s, weights, k, h, cfg.window))
            x = _block(x, size, weights, f"{base}.channel_block",
                       lambda t, k, g=cfg.groups[i]: channel_attention(t, weights, k, g))
    return _layer_norm(x.mean(1), weights, "norms")


def embed(cfg: DavitConfig, weights, images_bchw: np.ndarray) -> np.ndarray:
    """encode_image(norm=False): features @ image_projection."""
    return features(cfg, weights, images_bchw) @ np.asarray(weights[PROJECTION_KEY], dtype=np.float64)


def compare(cfg: DavitConfig, weights, onnx_embeddings: np.ndarray, images_bchw: np.ndarray) -> float:
    """Max abs error of the graph's embeddings against this reference; raises
    ReferenceMismatch above MAX_RELATIVE_ERROR of the largest |value|."""
    reference = embed(cfg, weights, images_bchw)
    err = float(np.abs(onnx_embeddings.astype(np.float64) - reference).max())
    scale = float(np.abs(reference).max())
    if not err <= MAX_RELATIVE_ERROR * scale:
        raise ReferenceMismatch(f"ONNX graph vs numpy reference: max abs err {err:.3e} > "
                                f"{MAX_RELATIVE_ERROR:g} x {scale:.3e} (largest |embedding value|)")
    return err
