"""Azure's fp16 ONNX export of MedImageInsight as a bundle whose only variant is fp16.

We cannot see Azure's file, so its interface is an assumption, written down
in models/README.md ("Azure fp16 export") and checked here before anything is
written; a file that differs is refused with expected vs found:

    opset       13..21 (ai.onnx)
    input       one, "image", float16 (float32 tolerated), [N or 1, 3, 480, 480]:
                RGB, bicubic-resized whole image, x/255 then ImageNet mean/std
    output      one, "image_features", float16 (float32 tolerated), [N or 1, 1024]

The preprocessing is the published one (the same as the random bundles'), so
the manifest's [input] is the published configuration's.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

import davit_config

INPUT_NAME = "image"
OUTPUT_NAME = "image_features"
OPSETS = range(13, 22)
ELEMENT_TYPES = {TensorProto.FLOAT16: "float16", TensorProto.FLOAT: "float32"}
LICENSE = "MedImageInsight licence: research use only, not clinical use"
CHECK_IMAGES = 8


class InterfaceError(ValueError):
    """The ONNX file is not the Azure export's documented interface."""


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _type_name(value_info) -> str:
    elem = value_info.type.tensor_type.elem_type
    return ELEMENT_TYPES.get(elem, TensorProto.DataType.Name(elem).lower())


def expected_interface(cfg: davit_config.DavitConfig = davit_config.PUBLISHED) -> str:
    s = cfg.image_size
    return (f"input '{INPUT_NAME}' float16 [N, 3, {s}, {s}] and output '{OUTPUT_NAME}' float16 "
            f"[N, {cfg.projection_dim}] (float32 tolerated for either), opset {OPSETS.start}..{OPSETS.stop - 1}")


def check_interface(model: onnx.ModelProto, path: Path,
                    cfg: davit_config.DavitConfig = davit_config.PUBLISHED) -> dict:
    """Every way the file differs from the assumed interface, in one message."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in OPSETS:
        problems.append(f"opset: expected {OPSETS.start}..{OPSETS.stop - 1}, found {opset}")
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    found_in = [f"{i.name!r} {_type_name(i)} {_dims(i)}" for i in inputs]
    found_out = [f"{o.name!r} {_type_name(o)} {_dims(o)}" for o in outputs]
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append(f"inputs: expected exactly ['{INPUT_NAME}'], found {found_in}")
    else:
        i = inputs[0]
        if i.type.tensor_type.elem_type not in ELEMENT_TYPES:
            problems.append(f"input '{INPUT_NAME}': expected float16, found {_type_name(i)}")
        dims = _dims(i)
        s = cfg.image_size
        if len(dims) != 4 or dims[1:] != [3, s, s] or not (dims[0] == 1 or isinstance(dims[0], str)):
            problems.append(f"input '{INPUT_NAME}': expected shape [N, 3, {s}, {s}], found {dims}")
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        problems.append(f"outputs: expected exactly ['{OUTPUT_NAME}'], found {found_out}")
    else:
        o = outputs[0]
        if o.type.tensor_type.elem_type not in ELEMENT_TYPES:
            problems.append(f"output '{OUTPUT_NAME}': expected float16, found {_type_name(o)}")
        dims = _dims(o)
        if len(dims) != 2 or dims[1] != cfg.projection_dim or not (dims[0] == 1 or isinstance(dims[0], str)):
            problems.append(f"output '{OUTPUT_NAME}': expected shape [N, {cfg.projection_dim}], found {dims}")
    if problems:
        raise InterfaceError(
            f"{path}: not the interface documented for Azure's MedImageInsight fp16 export "
            f"(models/README.md): expected {expected_interface(cfg)}; "
            + "; ".join(problems)
        )
    return {"opset": opset, "input_type": _type_name(inputs[0]), "output_type": _type_name(outputs[0])}


def load_checked(path: Path, cfg: davit_config.DavitConfig = davit_config.PUBLISHED) -> tuple[onnx.ModelProto, dict]:
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, OSError and others for a bad file
        raise InterfaceError(f"{path}: not a readable ONNX model: {e}") from e
    info = check_interface(model, path, cfg)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise InterfaceError(f"{path}: the ONNX checker refuses it: {e}") from e
    return model, info


def write_fp16_bundle(onnx_path: Path, out: Path, derm: Path | None, version: str,
                      cfg: davit_config.DavitConfig = davit_config.PUBLISHED) -> None:
    """Check the file, then write manifest.toml + encoder-fp16.onnx (+ check/ with images)."""
    import bundle  # A2's helpers: the preprocessing and image selection of the other bundles

    onnx_path = Path(onnx_path)
    model, info = load_checked(onnx_path, cfg)
    del model
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        target = staging / "encoder-fp16.onnx"
        shutil.copyfile(onnx_path, target)
        sha = _sha256(target)
        check_note = _write_check(staging, target, derm, cfg, info, bundle)
        _write_manifest(staging, cfg, sha, version, info, check_note)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def _write_check(staging: Path, model_path: Path, derm: Path | None, cfg, info: dict, bundle) -> str:
    if derm is None:
        bundle.log("no dermoscopy images: check/ not written for the fp16 bundle")
        return "none"
    import onnxruntime as ort

    images = bundle.select_images(derm, 0, CHECK_IMAGES)
    names = images.validation[:CHECK_IMAGES]
    inputs = np.concatenate([bundle.preprocess(images.directory / n, cfg) for n in names])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feed_type = np.float16 if info["input_type"] == "float16" else np.float32
    rows = [session.run([OUTPUT_NAME], {INPUT_NAME: x[None].astype(feed_type)})[0] for x in inputs]
    out = np.concatenate(rows).astype(np.float32)
    check = staging / "check"
    check.mkdir()
    inputs.astype("<f4").tofile(check / "inputs.f32")
    out.astype("<f4").tofile(check / "ort-fp16.f32")
    (check / "images.txt").write_text("".join(f"{n}\n" for n in names))
    quoted = ", ".join(f'"{n}"' for n in names)
    (check / "check.toml").write_text(
        "# Reference tensors for the Rust tests: raw little-endian f32, row-major.\n"
        f"n = {len(names)}\n"
        f"input_shape = {list(inputs.shape)}\n"
        f"dim = {out.shape[1]}\n"
        'data = "derm"  # "derm": images from DERMASCOPE_DERM_DATA/images\n'
        'inputs = "inputs.f32"  # float32; cast to the model\'s input type before running\n'
        'fp16 = "ort-fp16.f32"  # onnxruntime outputs of encoder-fp16.onnx, widened to float32\n'
        f"images = [{quoted}]\n"
    )
    bundle.log(f"wrote check/: {len(names)} inputs with onnxruntime fp16 embeddings")
    return "derm"


def _write_manifest(staging: Path, cfg, sha: str, version: str, info: dict, check_note: str) -> None:
    import bundle  # as in write_fp16_bundle: loaded only when a bundle is written
    text = f"""format = 1
model_id = "medimageinsight-azure-fp16-{sha[:8]}"
description = "MedImageInsight image tower, Azure's fp16 ONNX export (interface assumed, see models/README.md): {cfg.projection_dim}-d embedding, not L2-normalised"
license = "{LICENSE}"

[source]
registry = "azure"
package = "MedImageInsight (Azure AI model catalog, fp16 ONNX export)"
version = "{version}"
sha256 = "{sha}"

{bundle.input_table(cfg, INPUT_NAME)}
[output]
name = "{OUTPUT_NAME}"
dim = {cfg.projection_dim}

[[variant]]
name = "fp16"
file = "encoder-fp16.onnx"
precision = "fp16"
sha256 = "{sha}"

[validation]
opset = {info['opset']}
input_type = "{info['input_type']}"
output_type = "{info['output_type']}"
check = "{check_note}"
"""
    (staging / "manifest.toml").write_text(text)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
