"""MedImageInsight's image tower (a DaViT, "davit_v1") as plain data.

Everything the export needs to know about the architecture lives here: the
configuration (`DavitConfig`, read from the published `config.yaml` by
`from_yaml`) and the exact state-dict keys and shapes a checkpoint of that
configuration holds (`expected_shapes`). The checkpoint reader, the random
checkpoint writer and the ONNX graph all derive from these two, so a config
that disagrees with the weights is caught by comparing key sets and shapes,
never by a graph that silently mis-wires.

The module structure mirrored by `expected_shapes` (from the published
davit_v1 image encoder, standard parametrisation):

  convs.<i>            patch embedding of stage i: proj (Conv2d k x k, stride s,
                       pad p) and a LayerNorm, applied before the conv (on the
                       previous width) when patch_prenorm[i], else after it
  blocks.<i>.<j>       depth j of stage i: a spatial_block (windowed
                       multi-head attention) then a channel_block (grouped
                       channel attention); each is
                         conv1.fn.dw   depthwise 3x3 positional conv, residual
                         <attn>.norm   LayerNorm, <attn>.fn.qkv / .fn.proj
                         conv2.fn.dw   depthwise 3x3, residual
                         ffn.norm      LayerNorm, ffn.fn.net.fc1 / fc2 (GELU)
  norms                LayerNorm after the global average pool
  image_projection     [dims[-1], projection_dim], applied as x @ P (UniCL)
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_PREFIX = "image_encoder."
PROJECTION_KEY = "image_projection"


class ConfigError(ValueError):
    """A config that is not a MedImageInsight (davit_v1) image tower we can export."""


@dataclass(frozen=True)
class DavitConfig:
    image_size: int
    patch_size: tuple[int, int, int, int]
    patch_stride: tuple[int, int, int, int]
    patch_padding: tuple[int, int, int, int]
    patch_prenorm: tuple[bool, bool, bool, bool]
    dims: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    groups: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    window: int
    mlp_ratio: float = 4.0
    projection_dim: int = 1024
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bicubic"
    center_crop: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("patch_size", "patch_stride", "patch_padding", "patch_prenorm",
                     "dims", "heads", "groups", "depths"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 4:
                problems.append(f"{name} must be a tuple of 4 (one per stage), got {value!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        for i, (d, h, g) in enumerate(zip(self.dims, self.heads, self.groups)):
            if h <= 0 or d % h:
                problems.append(f"stage {i}: width {d} is not divisible by {h} heads")
            if g <= 0 or d % g:
                problems.append(f"stage {i}: width {d} is not divisible by {g} groups")
        if any(x <= 0 for x in self.depths):
            problems.append(f"depths must be positive, got {self.depths}")
        if int(self.dims[0] * self.mlp_ratio) != self.dims[0] * self.mlp_ratio:
            problems.append(f"mlp_ratio {self.mlp_ratio} gives a fractional hidden width")
        if self.window <= 0 or self.image_size <= 0 or self.projection_dim <= 0:
            problems.append("window, image_size and projection_dim must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean/std must be 3 values with std > 0, got {self.mean}/{self.std}")
        if self.resize != "bicubic":
            problems.append(f"resize {self.resize!r}: only 'bicubic' (the published one) is supported")
        if problems:
            raise ConfigError("; ".join(problems))

    def hidden(self, stage: int) -> int:
        """Width of the MLP's hidden layer in a stage (int(dim * mlp_ratio), as published)."""
        return int(self.dims[stage] * self.mlp_ratio)

    def grid(self, stage: int) -> int:
        """Side of the token grid after stage `stage`'s patch embedding."""
        side = self.image_size
        for i in range(stage + 1):
            side = (side + 2 * self.patch_padding[i] - self.patch_size[i]) // self.patch_stride[i] + 1
        return side


# The published MedImageInsight v20240927 image tower (config.yaml, IMAGE_ENCODER
# and UNICL_MODEL.DIM_PROJECTION): about 0.36 B parameters with the projection.
PUBLISHED = DavitConfig(
    image_size=480,
    patch_size=(7, 3, 3, 3),
    patch_stride=(4, 2, 2, 2),
    patch_padding=(3, 1, 1, 1),
    patch_prenorm=(False, True, True, True),
    dims=(256, 512, 1024, 2048),
    heads=(8, 16, 32, 64),
    groups=(8, 16, 32, 64),
    depths=(1, 1, 9, 1),
    window=12,
)

# CI's configuration: every structural choice of the published one (stem,
# strides, pre-norms, window 12, 480 input, 1024-d projection) and the same
# head and group width (32 channels), so attention reshapes, window padding
# (30 and 15 are not multiples of 12) and every op kind are exercised exactly as
# in the full model; only the widths are a quarter and each stage has one block,
# which makes the fp32 file ~42 MB (10.5 M parameters) instead of ~1.45 GB and the build take seconds.
CI = DavitConfig(
    image_size=480,
    patch_size=(7, 3, 3, 3),
    patch_stride=(4, 2, 2, 2),
    patch_padding=(3, 1, 1, 1),
    patch_prenorm=(False, True, True, True),
    dims=(64, 128, 256, 512),
    heads=(2, 4, 8, 16),
    groups=(2, 4, 8, 16),
    depths=(1, 1, 1, 1),
    window=12,
)

NAMED = {"full": PUBLISHED, "ci": CI}


def _block_shapes(prefix: str, d: int, hidden: int, attn: str) -> list[tuple[str, tuple]]:
    return [
        (f"{prefix}.conv1.fn.dw.weight", (d, 1, 3, 3)),
        (f"{prefix}.conv1.fn.dw.bias", (d,)),
        (f"{prefix}.{attn}.norm.weight", (d,)),
        (f"{prefix}.{attn}.norm.bias", (d,)),
        (f"{prefix}.{attn}.fn.qkv.weight", (3 * d, d)),
        (f"{prefix}.{attn}.fn.qkv.bias", (3 * d,)),
        (f"{prefix}.{attn}.fn.proj.weight", (d, d)),
        (f"{prefix}.{attn}.fn.proj.bias", (d,)),
        (f"{prefix}.conv2.fn.dw.weight", (d, 1, 3, 3)),
        (f"{prefix}.conv2.fn.dw.bias", (d,)),
        (f"{prefix}.ffn.norm.weight", (d,)),
        (f"{prefix}.ffn.norm.bias", (d,)),
        (f"{prefix}.ffn.fn.net.fc1.weight", (hidden, d)),
        (f"{prefix}.ffn.fn.net.fc1.bias", (hidden,)),
        (f"{prefix}.ffn.fn.net.fc2.weight", (d, hidden)),
        (f"{prefix}.ffn.fn.net.fc2.bias", (d,)),
    ]


def expected_shapes(cfg: DavitConfig) -> "OrderedDict[str, tuple]":
    """Every image-tower key of the published UniCL state dict, in state-dict order.

    Keys carry their `image_encoder.` prefix; `image_projection` comes last.
    The classifier head is absent (NUM_CLASSES 0 makes it an identity).
    """
    out: list[tuple[str, tuple]] = []
    p = ENCODER_PREFIX
    for i in range(4):
        cin = 3 if i == 0 else cfg.dims[i - 1]
        k = cfg.patch_size[i]
        out.append((f"{p}convs.{i}.proj.weight", (cfg.dims[i], cin, k, k)))
        out.append((f"{p}convs.{i}.proj.bias", (cfg.dims[i],)))
        norm_dim = cin if cfg.patch_prenorm[i] else cfg.dims[i]
        out.append((f"{p}convs.{i}.norm.weight", (norm_dim,)))
        out.append((f"{p}convs.{i}.norm.bias", (norm_dim,)))
    for i in range(4):
        for j in range(cfg.depths[i]):
            base = f"{p}blocks.{i}.{j}"
            out += _block_shapes(f"{base}.spatial_block", cfg.dims[i], cfg.hidden(i), "window_attn")
            out += _block_shapes(f"{base}.channel_block", cfg.dims[i], cfg.hidden(i), "channel_attn")
    out.append((f"{p}norms.weight", (cfg.dims[-1],)))
    out.append((f"{p}norms.bias", (cfg.dims[-1],)))
    out.append((PROJECTION_KEY, (cfg.dims[-1], cfg.projection_dim)))
    return OrderedDict(out)


def parameter_count(cfg: DavitConfig) -> int:
    total = 0
    for shape in expected_shapes(cfg).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


# --- config.yaml ---------------------------------------------------------------
#
# The published config is plain block YAML: nested mappings, flow lists of
# scalars, quoted strings, booleans and numbers, comments. A small reader for
# that subset keeps PyYAML out of the shared venv (adding a pin rebuilds the
# venv every clone shares and re-keys the default bundle's build); anything
# outside the subset (anchors, tags, multi-line scalars) is refused, never
# guessed at.

_INT = re.compile(r"^[-+]?\d+$")
_FLOAT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$")


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _scalar(text: str, where: str):
    t = text.strip()
    if t == "" or t in ("~", "null", "Null", "NULL"):
        return None
    if t[0] in "'\"":
        if len(t) < 2 or t[-1] != t[0]:
            raise ConfigError(f"{where}: unterminated string {t!r}")
        return t[1:-1]
    if t.startswith("[") or t.startswith("{"):
        if t.startswith("{") or not t.endswith("]"):
            raise ConfigError(f"{where}: only one-line flow lists are read, got {t!r}")
        inner = t[1:-1].strip()
        return [] if not inner else [_scalar(x, where) for x in _split_flow(inner, where)]
    if t[0] in "&*!|>":
        raise ConfigError(f"{where}: YAML feature {t[0]!r} is not supported in this config reader")
    if t in ("true", "True", "TRUE"):
        return True
    if t in ("false", "False", "FALSE"):
        return False
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t):
        return float(t)
    return t


def _split_flow(inner: str, where: str) -> list[str]:
    parts, cur, quote = [], "", None
    for ch in inner:
        if quote:
            cur += ch
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            cur += ch
        elif ch in "[]{}":
            raise ConfigError(f"{where}: nested flow collections are not supported")
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_yaml_subset(text: str, source: str = "config") -> dict:
    """Block mappings / sequences of scalars, as the published config uses."""
    root: dict = {}
    # Stack of (indent, container); a key with an empty value opens a child
    # whose kind (mapping or list) the next deeper line decides.
    stack: list[tuple[int, object]] = [(-1, root)]
    pending: tuple[int, dict, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ConfigError(f"{where}: tab indentation")
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        if line.strip() in ("---", "..."):
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if pending is not None:
            p_indent, p_parent, p_key = pending
            pending = None
            if indent > p_indent:
                child: object = [] if body.startswith("- ") or body == "-" else {}
                p_parent[p_key] = child
                stack.append((indent, child))
            else:
                p_parent[p_key] = None
        while stack and indent < stack[-1][0]:
            stack.pop()
        if not stack or indent != stack[-1][0] and stack[-1][0] != -1:
            raise ConfigError(f"{where}: inconsistent indentation")
        if stack[-1][0] == -1 and indent != 0:
            raise ConfigError(f"{where}: top-level line is indented")
        container = stack[-1][1]
        if body.startswith("- ") or body == "-":
            if not isinstance(container, list):
                raise ConfigError(f"{where}: list item where a key was expected")
            item = body[1:].strip()
            if re.match(r"^[^'\"\[]*:\s", item + " ") and not item.startswith(("'", '"')):
                raise ConfigError(f"{where}: lists of mappings are not supported")
            container.append(_scalar(item, where))
            continue
        if not isinstance(container, dict):
            raise ConfigError(f"{where}: key inside a list")
        key, value = _split_key(body, where)
        if key in container:
            raise ConfigError(f"{where}: duplicate key {key!r}")
        if value.strip() == "":
            container[key] = None
            pending = (indent, container, key)
        else:
            container[key] = _scalar(value, where)
    return root


def _split_key(body: str, where: str) -> tuple[str, str]:
    if body[0] in "'\"":
        end = body.find(body[0], 1)
        if end < 0 or body[end + 1: end + 2] != ":":
            raise ConfigError(f"{where}: cannot read quoted key in {body!r}")
        return body[1:end], body[end + 2:]
    m = re.match(r"^([^:]+?):(\s+|$)(.*)$", body)
    if not m:
        raise ConfigError(f"{where}: expected 'key: value', got {body!r}")
    return m.group(1).strip(), m.group(3)


def _tuple4(spec: dict, key: str, kind: type, where: str) -> tuple:
    value = spec.get(key)
    if not isinstance(value, list) or len(value) != 4 or not all(
        isinstance(v, kind) and not (kind is int and isinstance(v, bool)) for v in value
    ):
        raise ConfigError(f"{where}: {key} must be a list of 4 {kind.__name__}s (one per stage), got {value!r}")
    return tuple(value)


def from_dict(config: dict, source: str = "config") -> DavitConfig:
    enc = config.get("IMAGE_ENCODER")
    if not isinstance(enc, dict):
        raise ConfigError(f"{source}: no IMAGE_ENCODER section: not a UniCL / MedImageInsight config")
    name = enc.get("NAME")
    if name != "davit_v1":
        raise ConfigError(
            f"{source}: IMAGE_ENCODER.NAME is {name!r}, expected 'davit_v1' (MedImageInsight's image tower)"
        )
    spec = enc.get("SPEC")
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: IMAGE_ENCODER.SPEC missing")
    where = f"{source}: IMAGE_ENCODER.SPEC"
    # Variants that change the forward pass or the key set, which the graph
    # does not implement: refused rather than exported wrong.
    unsupported = []
    for key, published in (("STANDPARAM", True), ("CONV_AT_ATTN", True), ("CONV_AT_FFN", True),
                           ("DYNAMIC_SCALE", True)):
        if spec.get(key, published) is not published:
            unsupported.append(f"{key}={spec.get(key)!r} (supported: {published})")
    if spec.get("MLP_RATIO", 4.0) not in (4, 4.0):
        unsupported.append(f"MLP_RATIO={spec.get('MLP_RATIO')!r} (supported: 4.0)")
    if unsupported:
        raise ConfigError(f"{where}: unsupported " + ", ".join(unsupported))
    heads = _tuple4(spec, "NUM_HEADS", int, where)
    groups = _tuple4(spec, "NUM_GROUPS", int, where)
    size = enc.get("IMAGE_SIZE")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (isinstance(size, list) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int)):
        raise ConfigError(f"{source}: IMAGE_ENCODER.IMAGE_SIZE must be a square [n, n], got {size!r}")
    mean = enc.get("IMAGE_MEAN", list(IMAGENET_MEAN))
    std = enc.get("IMAGE_STD", list(IMAGENET_STD))
    for label, value in (("IMAGE_MEAN", mean), ("IMAGE_STD", std)):
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise ConfigError(f"{source}: IMAGE_ENCODER.{label} must be 3 numbers, got {value!r}")
    unicl = config.get("UNICL_MODEL") or {}
    proj = unicl.get("DIM_PROJECTION")
    if not isinstance(proj, int) or isinstance(proj, bool):
        raise ConfigError(f"{source}: UNICL_MODEL.DIM_PROJECTION must be an integer, got {proj!r}")
    test = config.get("TEST") or {}
    crop = test.get("CENTER_CROP", False)
    if not isinstance(crop, bool):
        raise ConfigError(f"{source}: TEST.CENTER_CROP must be true or false, got {crop!r}")
    interp = (config.get("AUG") or {}).get("INTERPOLATION", "bicubic")
    window = spec.get("WINDOW_SIZE", 7)
    if not isinstance(window, int) or isinstance(window, bool):
        raise ConfigError(f"{where}: WINDOW_SIZE must be an integer, got {window!r}")
    return DavitConfig(
        image_size=size[0],
        patch_size=_tuple4(spec, "PATCH_SIZE", int, where),
        patch_stride=_tuple4(spec, "PATCH_STRIDE", int, where),
        patch_padding=_tuple4(spec, "PATCH_PADDING", int, where),
        patch_prenorm=_tuple4(spec, "PATCH_PRENORM", bool, where),
        dims=_tuple4(spec, "DIM_EMBED", int, where),
        heads=heads,
        groups=groups,
        depths=_tuple4(spec, "DEPTHS", int, where),
        window=window,
        projection_dim=proj,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        resize=str(interp),
        center_crop=crop,
    )


def from_yaml(path: str | Path) -> DavitConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    return from_dict(parse_yaml_subset(text, str(path)), str(path))
