"""Convert the sklesion wheel's Keras model into the Dermascope encoder bundle.

Called by models/build with the verified wheel; see models/README.md.
Writes fp32 + int8 ONNX, reference tensors for the Rust tests, and
manifest.toml, into a staging directory that replaces the bundle only once
every validation has passed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

import equalize
import export_onnx
import integer_conv
import reference_forward
from dermoscopy_data import CHECK_IMAGES, ImageSource, ImageSplit, Normalization, split_by_lesion, synthetic_split
from keras_archive import load_image_encoder, normalization_std

MODEL_ID = "sklesion-xception-gap2048-v1"  # bump whenever the weights or the graph change
EMBEDDING_DIM = 2048
SOURCE = {"registry": "pypi", "package": "sklesion", "version": "0.2.2", "license": "MIT"}
KERAS_ARCHIVE_IN_WHEEL = "sklesion/model.keras"

NUMPY_CHECK_IMAGES = 3
MAX_RELATIVE_ERROR = 1e-3  # numpy reference vs ONNX, relative to the largest embedding value
MIN_MEAN_COSINE = 0.98
CALIBRATION_CHUNK = 10  # images per calibration pass: bounds the memory of collected activations
CALIBRATION_CACHE = Path(__file__).resolve().parent / "cache" / "calibration"

# onnxruntime.quantization warns that s8s8 QOperator is slow on x64 and that
# the model was not pre-processed: both are deliberate here (the target is
# tract on aarch64; the graph is already folded and fully shaped).
logging.getLogger().setLevel(logging.ERROR)

CALIBRATION_METHODS = {
    "MinMax": CalibrationMethod.MinMax,
    "Percentile": CalibrationMethod.Percentile,
    "Entropy": CalibrationMethod.Entropy,
}
# The calibration the shipped int8 uses. Percentile had the best cosine to
# fp32 in every real-data build that tried all three (2026-11-28, 128
# validation images: mean 0.98990 against Entropy 0.98729 and MinMax 0.98302),
# so the default build calibrates with it alone (each method costs minutes);
# --experiments still scores MinMax and Entropy.
DEFAULT_CALIBRATION = "Percentile"


def log(message: str) -> None:
    print(f"[models] {message}", flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TensorReader(CalibrationDataReader):
    """Feeds preprocessed calibration tensors; set_range lets onnxruntime
    calibrate in chunks (CalibStridedMinMax) instead of holding every
    activation of every image at once."""

    def __init__(self, batch: np.ndarray):
        self.batch = batch
        self.set_range(0, len(batch))

    def __len__(self) -> int:
        return len(self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.rows = iter(range(start_index, end_index))

    def get_next(self):
        row = next(self.rows, None)
        return None if row is None else {export_onnx.INPUT_NAME: self.batch[row : row + 1]}


@dataclass
class Int8Recipe:
    name: str
    description: str
    quant_format: QuantFormat
    per_channel: bool
    activation_type: QuantType
    reduce_range: bool = False
    # None quantizes every op onnxruntime can; the calibration cache is keyed
    # by this list because it decides which tensors get ranges.
    op_types: tuple[str, ...] | None = ("Conv",)
    # Depthwise convolutions (group = channels) stay in float.
    float_depthwise: bool = False
    # Dynamic quantization: ConvInteger on u8 activations quantized at run
    # time (DynamicQuantizeLinear), float rescale after; no calibration.
    dynamic: bool = False
    # Static ConvInteger with a float rescale, written by integer_conv.py
    # rather than onnxruntime's quantizer; the format fields above do not
    # apply to it (it has one form).
    convinteger: bool = False
    # Weight equalisation (equalize.py) before per-tensor quantization.
    equalise_alpha: float | None = None

    def quantize(self, fp32: Path, out: Path, calibration: np.ndarray, method: str, cache_dir: Path) -> None:
        if self.convinteger:
            ranges = integer_conv.activation_ranges(
                fp32, TensorReader(calibration), CALIBRATION_METHODS[method], CALIBRATION_CHUNK,
                cache_dir / f"{method}-conv.json",
            )
            onnx.save(integer_conv.to_convinteger(onnx.load(str(fp32)), ranges), out)
            return
        cache_suffix = ""
        if self.equalise_alpha is not None:
            equalised, report = equalize.equalise(onnx.load(str(fp32)), self.equalise_alpha)
            log(f"  equalised {report.equalised} convolutions: {report.folded} folded into the next, "
                f"{report.compensating_muls} with a Mul; largest scale ratio {report.largest_scale_ratio:.1f}")
            fp32 = out.with_name(out.stem + ".fp32-equalised.onnx")
            onnx.save(equalised, fp32)
            cache_suffix = f"-equalised{self.equalise_alpha}"
        try:
            self._quantize_with_onnxruntime(fp32, out, calibration, method, cache_dir, cache_suffix)
        finally:
            if self.equalise_alpha is not None:
                fp32.unlink(missing_ok=True)

    def _quantize_with_onnxruntime(self, fp32, out, calibration, method, cache_dir, cache_suffix) -> None:
        exclude = depthwise_conv_names(fp32) if self.float_depthwise else None
        if self.dynamic:
            quantize_dynamic(
                str(fp32),
                str(out),
                op_types_to_quantize=list(self.op_types) if self.op_types else None,
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
            )
            return
        # Ranges depend only on the calibration method and the set of
        # calibrated tensors, so variants share one calibration pass.
        tensors = "-".join(t.lower() for t in self.op_types) if self.op_types else "all"
        cache = cache_dir / f"{method}-{tensors}{cache_suffix}.json"
        # The histogram calibrators print progress chatter on stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(fp32),
                str(out),
                TensorReader(calibration),
                quant_format=self.quant_format,
                op_types_to_quantize=list(self.op_types) if self.op_types else None,
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                activation_type=self.activation_type,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=CALIBRATION_METHODS[method],
                extra_options={"CalibStridedMinMax": CALIBRATION_CHUNK},
                calibration_cache_path=cache,
            )


def depthwise_conv_names(model_path: Path) -> list[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    names = []
    for node in model.graph.node:
        if node.op_type == "Conv" and integer_conv.node_attribute(node, "group", 1) > 1:
            names.append(node.name)
    return names


# What tract 0.23 really executes in int8 and fast: ConvInteger (s8 x s8,
# per-channel weights) with a float rescale, on the 1x1 convolutions only
# (integer_conv.py says why; QDQ convs run in float in tract, and QLinearConv
# with per-channel weights pays a requantization that costs more than the
# int8 arithmetic saves). Figures for every form tried: docs/benchmarks.md.
DEFAULT_INT8 = Int8Recipe(
    name="int8",
    description="ConvInteger on the 1x1 convolutions (per-tensor 8-bit activations, quantized inside the preceding depthwise convolution where there is one; s8 per-channel weights) with a float rescale; depthwise and 3x3 convolutions in float",
    quant_format=QuantFormat.QOperator,
    per_channel=True,
    activation_type=QuantType.QInt8,
    convinteger=True,
)

EXPERIMENT_RECIPES = [
    Int8Recipe(
        "qoperator-s8s8-perchannel-pointwise",
        "QOperator: QLinearConv on the full and pointwise convolutions, depthwise convolutions in float, s8 activations, s8 per-channel weights (the shipped int8 until the ConvInteger form)",
        QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QInt8, float_depthwise=True,
    ),
    # Equal weight ranges per row (equalize.py) so per-tensor weights keep
    # per-channel resolution: at alpha 1 the activations it scales up wreck
    # the per-tensor output quantization (cosine 0.877); 0.5 (0.980) is the
    # better of the two tried, and still below the ConvInteger form.
    Int8Recipe(
        "qoperator-s8s8-pertensor-equalised",
        "QOperator QLinearConv on the full and pointwise convolutions, per-tensor s8 weights after weight equalisation (alpha 0.5), depthwise in float, s8 activations",
        QuantFormat.QOperator, per_channel=False, activation_type=QuantType.QInt8, float_depthwise=True,
        equalise_alpha=0.5,
    ),
    Int8Recipe(
        "qoperator-s8s8-pertensor",
        "QOperator QLinearConv only, s8 activations, s8 per-tensor weights",
        QuantFormat.QOperator, per_channel=False, activation_type=QuantType.QInt8,
    ),
    Int8Recipe(
        "qdq-s8s8-perchannel",
        "QDQ around Conv only, s8 activations, s8 per-channel weights (tract runs these convs in float)",
        QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
    ),
    Int8Recipe(
        "qdq-s8s8-perchannel-allops",
        "QDQ on every quantizable op (Conv, Add, MaxPool, GlobalAveragePool), s8 activations, s8 per-channel weights",
        QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8, op_types=None,
    ),
    Int8Recipe(
        "qoperator-u8s8-perchannel-reducerange",
        "QOperator QLinearConv only, u8 activations, s8 per-channel 7-bit weights (reduce_range, safe without VNNI)",
        QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QUInt8, reduce_range=True,
    ),
    Int8Recipe(
        "qoperator-u8s8-perchannel",
        "QOperator QLinearConv only, u8 activations, s8 per-channel weights, no reduce_range (u8s8 kernels can saturate on CPUs without VNNI)",
        QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QUInt8,
    ),
    Int8Recipe(
        "qoperator-s8s8-perchannel-allconvs",
        "QOperator QLinearConv on every convolution including the depthwise ones (the shipped int8 until 2026-11-28), s8 activations, s8 per-channel weights",
        QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QInt8,
    ),
    # tract 0.23 fuses a per-tensor requantization into its int8 matmul kernel
    # but runs a per-channel one as separate element-wise passes (--profile
    # figures in docs/benchmarks.md): this form runs at fp32 speed, and the
    # build's cosine says whether per-tensor pointwise weights are faithful
    # enough (they were not: 0.973 mean).
    Int8Recipe(
        "qoperator-s8s8-pertensor-pointwise",
        "QOperator QLinearConv on the full and pointwise convolutions only, per-tensor s8 weights, depthwise convolutions in float, s8 activations",
        QuantFormat.QOperator, per_channel=False, activation_type=QuantType.QInt8, float_depthwise=True,
    ),
    Int8Recipe(
        "convinteger-dynamic-u8s8-perchannel",
        "ConvInteger with dynamically quantized u8 activations (DynamicQuantizeLinear), s8 per-channel weights, float rescale",
        QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QUInt8, dynamic=True,
    ),
    Int8Recipe(
        "qoperator-s8s8-perchannel-relu-maxpool",
        "QOperator QLinearConv with Relu folded into the convolution's output range and MaxPool on int8, so only Add and the pool dequantize; s8 activations, s8 per-channel weights",
        QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QInt8, op_types=("Conv", "Relu", "MaxPool"),
    ),
]


class Embedder:
    def __init__(self, model: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the build shares the machine with cargo
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [self.session.run([export_onnx.OUTPUT_NAME], {export_onnx.INPUT_NAME: x[None]})[0] for x in batch]
        )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def toml_floats(values) -> str:
    return "[" + ", ".join(np.format_float_positional(np.float32(v), trim="-") for v in values) + "]"


def extract_keras_archive(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(KERAS_ARCHIVE_IN_WHEEL)


def select_images(data_dir: Path) -> tuple[ImageSplit, Path | None]:
    labels = data_dir / "labels.csv"
    images = data_dir / "images"
    if labels.is_file() and images.is_dir():
        return split_by_lesion(labels), images
    log("!" * 72)
    log(f"NO DERMOSCOPY DATA at {data_dir}: calibrating on SYNTHETIC images.")
    log("The int8 model is NOT validated against real images (set DERMASCOPE_DERM_DATA).")
    log("!" * 72)
    return synthetic_split(), None


def check_numpy_reference(encoder, fp32: Embedder, inputs: np.ndarray) -> float:
    """Validation (a): the ONNX graph against an independent numpy forward."""
    reference = reference_forward.embed(encoder, inputs)
    onnx_out = fp32(inputs)
    max_abs_err = float(np.abs(onnx_out - reference).max())
    scale = float(np.abs(reference).max())
    log(f"numpy vs onnx fp32 on {len(inputs)} images: max abs err {max_abs_err:.3e} "
        f"(embedding max |value| {scale:.3f}, relative {max_abs_err / scale:.2e})")
    if max_abs_err > MAX_RELATIVE_ERROR * scale:
        sys.exit(f"[models] FAIL: ONNX graph disagrees with the numpy reference (> {MAX_RELATIVE_ERROR:g} relative)")
    return max_abs_err


def calibration_ranges_dir(fp32_path: Path, calibration: np.ndarray) -> Path:
    """Where calibrated activation ranges are kept between builds. They are a
    pure function of the graph, the calibration tensors and onnxruntime, so a
    rebuild that changes only the quantization recipes (or adds experiments)
    skips the minutes of calibration inference."""
    digest = hashlib.sha256()
    digest.update(fp32_path.read_bytes())
    digest.update(np.ascontiguousarray(calibration, dtype="<f4").tobytes())
    digest.update(f"onnxruntime {ort.__version__} chunk {CALIBRATION_CHUNK}".encode())
    ranges = CALIBRATION_CACHE / digest.hexdigest()[:24]
    ranges.mkdir(parents=True, exist_ok=True)
    return ranges


def quantize_and_score(recipe, method, fp32_path, out, calibration, cache_dir, validation, fp32_embeddings):
    started = time.monotonic()
    recipe.quantize(fp32_path, out, calibration, method, cache_dir)
    if validation is None:
        log(f"  {out.name} [{method}]: {time.monotonic() - started:.0f}s (no real validation images)")
        return None
    cos = cosines(Embedder(out)(validation), fp32_embeddings)
    log(f"  {out.name} [{method}]: cosine to fp32 mean {cos.mean():.5f} min {cos.min():.5f} "
        f"({len(cos)} images, {time.monotonic() - started:.0f}s)")
    return cos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--wheel-sha256", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--experiments", action="store_true")
    args = parser.parse_args()

    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "check").mkdir(parents=True)

    log(f"reading {KERAS_ARCHIVE_IN_WHEEL} from {args.wheel.name}")
    encoder = load_image_encoder(extract_keras_archive(args.wheel))
    mean = encoder.mean.astype(np.float32)
    std = normalization_std(encoder.variance.astype(np.float32)).astype(np.float32)
    # A mean around 100-200 means the Normalization layer sees raw 0..255
    # pixels (no Rescaling in the model), hence pixel_scale = 1.
    if not mean.max() > 2.0:
        sys.exit(f"[models] FAIL: normalisation mean {mean} does not look like a 0..255 input")
    log(f"image input {encoder.input_shape} HWC, pixel_scale {encoder.pixel_scale}, "
        f"mean {toml_floats(mean)}, std {toml_floats(std)}")
    height, width, _ = encoder.input_shape
    normalization = Normalization(height, width, encoder.pixel_scale, mean, std)

    fp32_path = staging / "encoder-fp32.onnx"
    model = export_onnx.build_model(encoder, EMBEDDING_DIM)
    onnx.save(model, fp32_path)
    log(f"wrote {fp32_path.name}: {len(model.graph.node)} nodes, input {export_onnx.INPUT_NAME} "
        f"[1,3,{height},{width}], output {export_onnx.OUTPUT_NAME} [1,{EMBEDDING_DIM}]")
    fp32 = Embedder(fp32_path)

    split, images_dir = select_images(args.data)
    source = ImageSource(split, images_dir, normalization)
    disjoint = ", disjoint lesions" if split.source == "derm" else ""
    log(f"images ({split.source}): {len(split.calibration)} calibration, {len(split.validation)} validation{disjoint}")
    check_inputs = source.batch(split.validation[:CHECK_IMAGES])

    numpy_max_abs_err = check_numpy_reference(encoder, fp32, check_inputs[:NUMPY_CHECK_IMAGES])

    calibration = source.batch(split.calibration)
    real_data = split.source == "derm"
    validation = source.batch(split.validation) if real_data else None
    fp32_embeddings = fp32(validation) if real_data else None

    int8_path = staging / "encoder-int8.onnx"
    experiments: list[tuple[str, str, np.ndarray | None]] = []
    ranges_dir = calibration_ranges_dir(fp32_path, calibration)
    with tempfile.TemporaryDirectory(prefix="calibration-", dir=staging) as cache:
        cache_dir = Path(cache)
        # Without real validation images there is nothing to rank methods
        # by, so synthetic builds use MinMax alone. Real-data builds ship
        # DEFAULT_CALIBRATION; --experiments also scores the other methods and
        # says so if one of them beats it.
        chosen = DEFAULT_CALIBRATION if real_data else "MinMax"
        methods = [chosen]
        if args.experiments and real_data:
            methods += [m for m in CALIBRATION_METHODS if m != chosen]
        log(f"calibrating int8 ({DEFAULT_INT8.description}) with {', '.join(methods)}:")
        scores = {
            method: quantize_and_score(DEFAULT_INT8, method, fp32_path, cache_dir / f"int8-{method}.onnx",
                                       calibration, ranges_dir, validation, fp32_embeddings)
            for method in methods
        }
        if real_data:
            best = max(scores, key=lambda m: (scores[m].mean(), scores[m].min()))
            if best != chosen:
                log(f"NOTE: {best} calibration scores better than the shipped {chosen}: "
                    "consider changing DEFAULT_CALIBRATION")
        int8_cosines = scores[chosen]
        shutil.copyfile(cache_dir / f"int8-{chosen}.onnx", int8_path)
        log(f"int8 calibration chosen: {chosen}")

        if args.experiments:
            (staging / "experiments").mkdir()
            log(f"experiments (calibration {chosen}):")
            for method in methods:
                if method != chosen:
                    name = f"convinteger-{method.lower()}"
                    shutil.copyfile(cache_dir / f"int8-{method}.onnx", staging / "experiments" / f"{name}.onnx")
                    experiments.append((name, f"{DEFAULT_INT8.description}, {method} calibration", scores[method]))
            for recipe in EXPERIMENT_RECIPES:
                out = staging / "experiments" / f"{recipe.name}.onnx"
                cos = quantize_and_score(recipe, chosen, fp32_path, out, calibration, ranges_dir, validation,
                                         fp32_embeddings)
                experiments.append((recipe.name, f"{recipe.description}, {chosen} calibration", cos))

    if real_data:
        log(f"int8 vs fp32 on {len(int8_cosines)} validation images: cosine mean {int8_cosines.mean():.5f} "
            f"min {int8_cosines.min():.5f}")
        if int8_cosines.mean() < MIN_MEAN_COSINE:
            sys.exit(f"[models] FAIL: int8 mean cosine {int8_cosines.mean():.5f} < {MIN_MEAN_COSINE}")
    else:
        log("!" * 72)
        log("SKIPPED int8-vs-fp32 validation: no real dermoscopy images.")
        log("!" * 72)

    write_check(staging / "check", split, check_inputs, fp32(check_inputs), Embedder(int8_path)(check_inputs))
    if experiments:
        write_experiment_index(staging / "experiments" / "index.toml", experiments, split.source)
    write_manifest(
        staging, args, normalization, chosen, split.source, numpy_max_abs_err, int8_cosines,
    )

    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    log(f"bundle ready: {args.out}")


def write_check(check_dir: Path, split, inputs, fp32_out, int8_out) -> None:
    names = split.validation[:CHECK_IMAGES]
    inputs.astype("<f4").tofile(check_dir / "inputs.f32")
    fp32_out.astype("<f4").tofile(check_dir / "ort-fp32.f32")
    int8_out.astype("<f4").tofile(check_dir / "ort-int8.f32")
    (check_dir / "images.txt").write_text("".join(f"{name}\n" for name in names))
    (check_dir / "check.toml").write_text(
        "# Reference tensors for the Rust tests: raw little-endian f32, row-major.\n"
        f"n = {len(names)}\n"
        f"input_shape = {list(inputs.shape)}\n"
        f"dim = {fp32_out.shape[1]}\n"
        f'data = "{split.source}"  # "derm": images from DERMASCOPE_DERM_DATA/images; "synthetic": generated\n'
        'inputs = "inputs.f32"\n'
        'fp32 = "ort-fp32.f32"\n'
        'int8 = "ort-int8.f32"\n'
        f"images = [{', '.join(f'{chr(34)}{n}{chr(34)}' for n in names)}]\n"
    )
    log(f"wrote check/: {len(names)} inputs ({split.source}) with onnxruntime fp32 and int8 embeddings")


def write_experiment_index(path: Path, experiments, data_source: str) -> None:
    scored = f"; cosine vs fp32 on {data_source} validation images" if data_source == "derm" else ""
    lines = [f"# int8 variants for benchmarking{scored}.\n"]
    for name, description, cos in experiments:
        lines.append(f'\n[[variant]]\nname = "{name}"\nfile = "{name}.onnx"\ndescription = "{description}"\n')
        if cos is not None:
            lines.append(f"cosine_mean = {cos.mean():.5f}\ncosine_min = {cos.min():.5f}\n")
    path.write_text("".join(lines))
    log(f"wrote experiments/index.toml ({len(experiments)} variants)")


def write_manifest(bundle: Path, args, normalization, calibration_method, data_source, numpy_max_abs_err,
                   int8_cosines) -> None:
    fp32_sha = sha256_file(bundle / "encoder-fp32.onnx")
    int8_sha = sha256_file(bundle / "encoder-int8.onnx")
    if int8_cosines is not None:
        int8_validation = (
            f"int8_vs_fp32_cosine_mean = {int8_cosines.mean():.5f}\n"
            f"int8_vs_fp32_cosine_min = {int8_cosines.min():.5f}\n"
            f"int8_vs_fp32_images = {len(int8_cosines)}\n"
        )
    else:
        int8_validation = "int8_vs_fp32_images = 0  # skipped: calibrated on synthetic images\n"
    manifest = f"""format = 1
model_id = "{MODEL_ID}"
description = "Xception image branch of sklesion 0.2.2 (fine-tuned on HAM10000), up to global average pooling: 2048-d embedding, not L2-normalised"
license = "{SOURCE['license']}"

[source]
registry = "{SOURCE['registry']}"
package = "{SOURCE['package']}"
version = "{SOURCE['version']}"
sha256 = "{args.wheel_sha256}"

[input]
name = "{export_onnx.INPUT_NAME}"
layout = "NCHW"
height = {normalization.height}
width = {normalization.width}
channel_order = "RGB"
resize = "bilinear"
pixel_scale = {normalization.pixel_scale:.1f}
mean = {toml_floats(normalization.mean)}
std = {toml_floats(normalization.std)}

[output]
name = "{export_onnx.OUTPUT_NAME}"
dim = {EMBEDDING_DIM}

[[variant]]
name = "fp32"
file = "encoder-fp32.onnx"
precision = "fp32"
sha256 = "{fp32_sha}"

[[variant]]
name = "int8"
file = "encoder-int8.onnx"
precision = "int8"
quantization = "{DEFAULT_INT8.description}, {calibration_method} calibration"
calibration = "{data_source}"
sha256 = "{int8_sha}"

[validation]
numpy_vs_onnx_max_abs_err = {numpy_max_abs_err:.3e}
{int8_validation}"""
    (bundle / "manifest.toml").write_text(manifest)
    log("wrote manifest.toml")


if __name__ == "__main__":
    main()
