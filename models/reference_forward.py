"""Independent numpy forward pass of the Keras image branch, straight from the
h5 weights: NHWC, float64, BatchNormalization applied as its own step (not
folded). It shares nothing with export_onnx.py except the weight reader, so an
agreement between the two is evidence that the ONNX graph is the Keras model.
"""

from __future__ import annotations

import numpy as np

from keras_archive import ImageEncoder, Layer


def _tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    # Formula from the TensorFlow "padding" docs, deliberately not the one
    # used by the ONNX writer.
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad(x: np.ndarray, kernel: tuple[int, int], stride: int, padding: str, value: float) -> np.ndarray:
    if padding == "valid":
        return x
    (top, bottom) = _tf_same_pads(x.shape[1], kernel[0], stride)
    (left, right) = _tf_same_pads(x.shape[2], kernel[1], stride)
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: int):
    """Yield (ky, kx, strided view) for every kernel tap of a padded NHWC tensor."""
    out_h = (x.shape[1] - kernel[0]) // stride + 1
    out_w = (x.shape[2] - kernel[1]) // stride + 1
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            yield ky, kx, x[:, ky : ky + stride * (out_h - 1) + 1 : stride, kx : kx + stride * (out_w - 1) + 1 : stride, :]


def _conv(x, kernel_hwio, stride, padding):
    kernel = kernel_hwio.shape[:2]
    x = _pad(x, kernel, stride, padding, 0.0)
    out = 0.0
    for ky, kx, view in _windows(x, kernel, stride):
        out = out + view @ kernel_hwio[ky, kx]
    return out


def _depthwise(x, kernel_hw_c1, stride, padding):
    kernel = kernel_hw_c1.shape[:2]
    x = _pad(x, kernel, stride, padding, 0.0)
    out = 0.0
    for ky, kx, view in _windows(x, kernel, stride):
        out = out + view * kernel_hw_c1[ky, kx, :, 0]
    return out


def _max_pool(x, pool, stride, padding):
    x = _pad(x, pool, stride, padding, -np.inf)
    out = None
    for _, _, view in _windows(x, pool, stride):
        out = view if out is None else np.maximum(out, view)
    return out


def _apply(layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
    cfg = layer.config
    w = [v.astype(np.float64) for v in layer.weights]
    x = inputs[0]
    if layer.kind == "Conv2D":
        assert cfg["dilation_rate"] == [1, 1] and cfg["strides"][0] == cfg["strides"][1]
        y = _conv(x, w[0], cfg["strides"][0], cfg["padding"])
        return y + w[1] if cfg["use_bias"] else y
    if layer.kind == "SeparableConv2D":
        assert cfg["dilation_rate"] == [1, 1] and cfg["strides"][0] == cfg["strides"][1]
        y = _depthwise(x, w[0], cfg["strides"][0], cfg["padding"]) @ w[1][0, 0]
        return y + w[2] if cfg["use_bias"] else y
    if layer.kind == "BatchNormalization":
        gamma, beta, mean, variance = w
        return (x - mean) / np.sqrt(variance + cfg["epsilon"]) * gamma + beta
    if layer.kind == "Activation":
        assert cfg["activation"] == "relu"
        return np.maximum(x, 0.0)
    if layer.kind == "MaxPooling2D":
        assert cfg["strides"][0] == cfg["strides"][1]
        return _max_pool(x, tuple(cfg["pool_size"]), cfg["strides"][0], cfg["padding"])
    if layer.kind == "Add":
        return sum(inputs)
    if layer.kind == "GlobalAveragePooling2D":
        return x.mean(axis=(1, 2))
    raise NotImplementedError(layer.kind)


def embed(encoder: ImageEncoder, normalized_nchw: np.ndarray) -> np.ndarray:
    """Embedding of already-normalised NCHW input (the ONNX graph's input)."""
    x = np.transpose(normalized_nchw.astype(np.float64), (0, 2, 3, 1))
    activations: dict[str, np.ndarray] = {}
    for layer in encoder.layers:
        if layer.kind == "InputLayer":
            activations[layer.name] = x
        else:
            activations[layer.name] = _apply(layer, [activations[name] for name in layer.inputs])
    return activations[encoder.output]

