"""Read the sklesion Keras 3 archive (config.json + model.weights.h5) without Keras.

Keras 3 does not store weights under the layer names of config.json: each
container (a Functional model) saves its layers, in `model.layers` order,
under `layers/<snake_case(class name)>[_<n>]`, with a counter per class name.
We rebuild those names from the config to attach weights to layers, and check
every weight shape against the layer config so a wrong mapping cannot pass.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field

import h5py
import numpy as np

IMAGE_BRANCH_MODEL = "xception"


@dataclass
class Layer:
    name: str
    kind: str  # Keras class name, e.g. "SeparableConv2D"
    config: dict
    inputs: list[str]
    weights: list[np.ndarray] = field(default_factory=list)


@dataclass
class ImageEncoder:
    """The image branch: input normalisation followed by the Xception trunk."""

    pixel_scale: float
    mean: np.ndarray  # per RGB channel, in units of pixel_scale * raw 0..255
    variance: np.ndarray
    input_shape: tuple[int, int, int]  # H, W, C
    layers: list[Layer]  # topologically ordered, first is the InputLayer
    output: str


def _snake_case(class_name: str) -> str:
    # Same transform as keras.src.utils.naming.to_snake_case.
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _weight_group_names(layer_configs: list[dict]) -> list[str]:
    used: dict[str, int] = {}
    names = []
    for layer in layer_configs:
        base = _snake_case(layer["class_name"])
        if base in used:
            used[base] += 1
            names.append(f"{base}_{used[base]}")
        else:
            used[base] = 0
            names.append(base)
    return names


def _inbound_layers(layer_config: dict) -> list[str]:
    inbound = []
    for node in layer_config["inbound_nodes"]:
        args = node["args"][0]
        tensors = args if isinstance(args, list) else [args]
        inbound += [t["config"]["keras_history"][0] for t in tensors]
    return inbound


def _read_vars(group: h5py.Group) -> list[np.ndarray]:
    if "vars" not in group:
        return []
    variables = group["vars"]
    return [np.asarray(variables[str(i)][()]) for i in range(len(variables))]


def _expected_shapes(layer: Layer, in_channels: int | None) -> list[tuple]:
    cfg = layer.config
    if layer.kind == "Conv2D":
        kh, kw = cfg["kernel_size"]
        shapes = [(kh, kw, in_channels, cfg["filters"])]
        return shapes + ([(cfg["filters"],)] if cfg["use_bias"] else [])
    if layer.kind == "SeparableConv2D":
        kh, kw = cfg["kernel_size"]
        assert cfg["depth_multiplier"] == 1
        shapes = [(kh, kw, in_channels, 1), (1, 1, in_channels, cfg["filters"])]
        return shapes + ([(cfg["filters"],)] if cfg["use_bias"] else [])
    if layer.kind == "BatchNormalization":
        assert cfg["center"] and cfg["scale"], "BN layout assumes gamma, beta, mean, variance"
        return [(in_channels,)] * 4
    return []


def _out_channels(layer: Layer, in_channels: int | None) -> int | None:
    if layer.kind in ("Conv2D", "SeparableConv2D"):
        return layer.config["filters"]
    if layer.kind == "InputLayer":
        return layer.config["batch_shape"][-1]
    return in_channels


def _load_container(config: dict, group: h5py.Group) -> list[Layer]:
    layer_configs = config["layers"]
    layers = []
    channels: dict[str, int | None] = {}
    for layer_config, group_name in zip(layer_configs, _weight_group_names(layer_configs)):
        layer = Layer(
            name=layer_config["name"],
            kind=layer_config["class_name"],
            config=layer_config["config"],
            inputs=_inbound_layers(layer_config),
        )
        if layer.kind != "Functional":
            layer.weights = _read_vars(group["layers"][group_name])
            in_channels = channels[layer.inputs[0]] if layer.inputs else None
            shapes = [w.shape for w in layer.weights]
            expected = _expected_shapes(layer, in_channels)
            if layer.kind in ("Conv2D", "SeparableConv2D", "BatchNormalization") or shapes:
                if shapes != expected:
                    raise ValueError(f"{layer.name} ({group_name}): weights {shapes}, expected {expected}")
            channels[layer.name] = _out_channels(layer, in_channels)
        layers.append(layer)
    return layers


def load_image_encoder(keras_archive: bytes) -> ImageEncoder:
    with zipfile.ZipFile(io.BytesIO(keras_archive)) as archive:
        config = json.loads(archive.read("config.json"))
        weights_bytes = archive.read("model.weights.h5")

    with h5py.File(io.BytesIO(weights_bytes), "r") as weights:
        top_configs = config["config"]["layers"]
        top_groups = dict(zip((c["name"] for c in top_configs), _weight_group_names(top_configs)))
        by_name = {c["name"]: c for c in top_configs}

        trunk_config = by_name[IMAGE_BRANCH_MODEL]
        # Walk back from the trunk to the image input: only a Normalization is
        # expected in between. A Rescaling layer here would change pixel_scale.
        preprocessing = []
        cursor = _inbound_layers(trunk_config)[0]
        while by_name[cursor]["class_name"] != "InputLayer":
            preprocessing.append(by_name[cursor])
            cursor = _inbound_layers(by_name[cursor])[0]
        image_input = by_name[cursor]
        if [c["class_name"] for c in preprocessing] != ["Normalization"]:
            raise ValueError(f"unexpected image preprocessing layers: {[c['class_name'] for c in preprocessing]}")
        norm = preprocessing[0]
        if norm["config"]["axis"] != [-1] or norm["config"].get("invert"):
            raise ValueError(f"unsupported Normalization config {norm['config']}")
        mean, variance, _count = _read_vars(weights["layers"][top_groups[norm["name"]]])

        trunk_layers = _load_container(trunk_config["config"], weights["layers"][top_groups[IMAGE_BRANCH_MODEL]])

    (output_name, _, _), = trunk_config["config"]["output_layers"]
    _, height, width, channels = image_input["config"]["batch_shape"]
    return ImageEncoder(
        pixel_scale=1.0,
        mean=mean.astype(np.float64),
        variance=variance.astype(np.float64),
        input_shape=(height, width, channels),
        layers=trunk_layers,
        output=output_name,
    )


def normalization_std(variance: np.ndarray) -> np.ndarray:
    # keras.layers.Normalization divides by max(sqrt(variance), epsilon()).
    return np.maximum(np.sqrt(variance), 1e-7)

