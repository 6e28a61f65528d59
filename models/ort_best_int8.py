"""onnxruntime's own int8 forms of the default encoder, for `scripts/bench encoder`.

  models/.venv/bin/python models/ort_best_int8.py build --bundle B [--data DIR]
      Builds (or finds in the cache) onnxruntime's int8 forms of B's fp32 file
      and prints one JSON line per form: {"name": ..., "path": ...}.
  models/.venv/bin/python models/ort_best_int8.py macs --model M
      Prints the multiply-adds of one image by kind, as one JSON line.
  models/.venv/bin/python models/ort_best_int8.py floor-model --out F [--k K --n N --hw HW]
      Writes a one-node ConvInteger graph (u8 x s8 -> i32, the shipped int8's
      form) that the floor example (daemon/encoder/examples/int8_floor.rs)
      times to measure tract's int8 multiply-add throughput.

The comparison is with what a user choosing onnxruntime would run: its own
quantizer (`quantize_static`), every op it can quantize (every Conv, the
adds, pools), per-channel s8 weights, in both formats (QOperator:
QLinearConv; QDQ: QuantizeLinear/DequantizeLinear pairs its graph optimiser
fuses) and with u8 and s8 activations; QOperator also with its convolutions
alone (see FORMS). Our shipped ConvInteger file is a form
onnxruntime runs slowly, so timing it alone says little about onnxruntime.

Calibration: MinMax (onnxruntime's default; the fastest to compute) on the
same calibration images the bundle build used (dermoscopy_data.split_by_lesion,
DERMASCOPE_DERM_DATA or ../shared/data/derm), which share no lesion with the
check inputs the benchmark scores the forms on. Without that data the forms
are calibrated on the check inputs themselves, said loudly, and their cosine
is then not a held-out figure.

Cache: ~/.cache/dermascope/ort-int8/<key>/, key = sha256 of the fp32 file, the
onnxruntime version and the calibration images, so a rebuilt bundle or another
onnxruntime gets fresh forms.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from dermoscopy_data import ImageSource, Normalization, split_by_lesion

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dermascope" / "ort-int8"
# Images per calibration pass: bounds the memory of the collected activations
# (every tensor of the graph is an output while calibrating).
CALIBRATION_CHUNK = 10
# name: (format, activations, ops to quantize; None = every op onnxruntime can).
# QOperator with every op scored cosine 0.04 to fp32 on the check inputs
# with onnxruntime 1.32 (u8 and s8 alike; the same ranges give 0.986 in
# QDQ). Quantizing Add and Relu together is what breaks it (Conv+Add 0.981,
# Conv+Relu 0.989, Conv+Add+Relu 0.07): the suspect is the quantizer folding
# away a Relu after a residual QLinearAdd whose unrectified sum the next
# shortcut also reads. So QOperator is also built without Add (and with its
# convolutions alone); the benchmark prints and excludes the broken form.
WITHOUT_ADD = ["Conv", "Relu", "MaxPool", "GlobalAveragePool"]
FORMS = {
    "ort-qoperator-u8": (QuantFormat.QOperator, QuantType.QUInt8, None),
    "ort-qoperator-s8": (QuantFormat.QOperator, QuantType.QInt8, None),
    "ort-qoperator-u8-no-add": (QuantFormat.QOperator, QuantType.QUInt8, WITHOUT_ADD),
    "ort-qoperator-u8-conv": (QuantFormat.QOperator, QuantType.QUInt8, ["Conv"]),
    "ort-qoperator-s8-conv": (QuantFormat.QOperator, QuantType.QInt8, ["Conv"]),
    "ort-qdq-u8": (QuantFormat.QDQ, QuantType.QUInt8, None),
    "ort-qdq-s8": (QuantFormat.QDQ, QuantType.QInt8, None),
}

# onnxruntime warns that s8 activations in QOperator are slow on x64 and that
# the model was not pre-processed (it is already folded and fully shaped):
# the benchmark measures the first, and the second does not apply.
logging.getLogger().setLevel(logging.ERROR)


def log(message: str) -> None:
    print(f"[ort-int8] {message}", file=sys.stderr, flush=True)


class TensorReader(CalibrationDataReader):
    def __init__(self, name: str, batch: np.ndarray):
        self.name = name
        self.batch = batch
        self.set_range(0, len(batch))

    def __len__(self) -> int:
        return len(self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.rows = iter(range(start_index, end_index))

    def get_next(self):
        row = next(self.rows, None)
        return None if row is None else {self.name: self.batch[row : row + 1]}


def calibration_images(bundle: Path, manifest: dict, data: Path) -> tuple[np.ndarray, str]:
    spec = manifest["input"]
    if (data / "labels.csv").is_file() and (data / "images").is_dir():
        split = split_by_lesion(data / "labels.csv")
        normalization = Normalization(spec["height"], spec["width"], spec["pixel_scale"],
                                      np.array(spec["mean"], np.float32), np.array(spec["std"], np.float32))
        batch = ImageSource(split, data / "images", normalization).batch(split.calibration)
        return batch, f"{len(batch)} calibration images of the bundle build (lesions disjoint from the check inputs)"
    log("!" * 72)
    log(f"NO DERMOSCOPY DATA at {data}: calibrating on the check inputs themselves;")
    log("the cosines printed for these forms are NOT held out.")
    log("!" * 72)
    batch = np.fromfile(bundle / "check/inputs.f32", dtype="<f4").reshape(-1, 3, spec["height"], spec["width"])
    return batch, f"{len(batch)} check inputs (NOT held out: no dermoscopy data)"


def build(args) -> None:
    bundle = args.bundle
    manifest = tomllib.loads((bundle / "manifest.toml").read_text())
    fp32 = bundle / next(v["file"] for v in manifest["variant"] if v["name"] == "fp32")
    calibration, described = calibration_images(bundle, manifest, args.data)
    digest = hashlib.sha256(fp32.read_bytes())
    digest.update(f"onnxruntime {ort.__version__} MinMax chunk {CALIBRATION_CHUNK}".encode())
    digest.update(np.ascontiguousarray(calibration, dtype="<f4").tobytes())
    cache = CACHE / digest.hexdigest()[:24]
    cache.mkdir(parents=True, exist_ok=True)
    log(f"calibration: {described}, MinMax; forms cached in {cache}")
    for name, (quant_format, activation_type, op_types) in FORMS.items():
        out = cache / f"{name}.onnx"
        if not out.exists():
            log(f"quantizing {name}")
            partial = out.with_suffix(".partial.onnx")
            # The calibrator prints progress on stdout, which carries the JSON.
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(fp32),
                    str(partial),
                    TensorReader(manifest["input"]["name"], calibration),
                    quant_format=quant_format,
                    op_types_to_quantize=op_types,
                    per_channel=True,
                    activation_type=activation_type,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"CalibStridedMinMax": CALIBRATION_CHUNK},
                    # Every form shares one set of ranges: they depend on the
                    # graph and the images only (a form quantizing fewer ops
                    # reads a subset of them).
                    calibration_cache_path=cache / "ranges-minmax.json",
                )
            partial.rename(out)
        print(json.dumps({"name": name, "path": str(out)}))


def multiply_adds(path: Path) -> dict[str, int]:
    """Multiply-adds of one image from the graph's inferred shapes, by kind:
    1x1 convolutions (int8 in the shipped file), depthwise, the other (3x3
    entry) convolutions, MatMul. Adds, pools and the Relus are not counted."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    kinds = {"pointwise": 0, "depthwise": 0, "other_conv": 0, "matmul": 0}
    for node in graph.node:
        out = shapes.get(node.output[0])
        if not out or 0 in out:
            continue
        if node.op_type in ("MatMul", "MatMulInteger"):
            kinds["matmul"] += int(np.prod(out, dtype=np.int64)) * shapes[node.input[0]][-1]
        elif node.op_type in ("Conv", "ConvInteger"):
            w = shapes[node.input[1]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            macs = int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
            if group > 1:
                kinds["depthwise"] += macs
            elif w[2:] == [1, 1]:
                kinds["pointwise"] += macs
            else:
                kinds["other_conv"] += macs
    kinds["total"] = sum(kinds.values())
    return kinds


def floor_model(args) -> None:
    """One 1x1 ConvInteger, u8 activations x s8 per-output-channel weights,
    as the shipped int8 writes it, large enough that tract's packing and
    call overheads are small next to the products."""
    rng = np.random.default_rng(18)
    weights = rng.integers(-127, 128, size=(args.n, args.k, 1, 1), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w", "x_zero_point"], ["y"], name="floor")],
        "int8_floor",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, args.k, args.hw, args.hw])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, args.n, args.hw, args.hw])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array(128, np.uint8), "x_zero_point")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, args.out)
    print(json.dumps({"path": str(args.out), "macs": args.n * args.k * args.hw * args.hw,
                      "k": args.k, "n": args.n, "hw": args.hw}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("DERMASCOPE_DERM_DATA", Path(__file__).resolve().parents[2] / "shared/data/derm")))
    p = sub.add_parser("macs")
    p.add_argument("--model", type=Path, required=True)
    p = sub.add_parser("floor-model")
    p.add_argument("--out", type=Path, required=True)
    # 1024 x 1024 channels at 32x32: 1.07 G multiply-adds, a few ms a run.
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--hw", type=int, default=32)
    args = parser.parse_args()
    if args.command == "build":
        build(args)
    elif args.command == "macs":
        print(json.dumps(multiply_adds(args.model)))
    else:
        floor_model(args)


if __name__ == "__main__":
    main()
