"""Benchmark helper: time onnxruntime on a bundle model, print one JSON line.

  models/.venv/bin/python models/ort_embed.py --model M --inputs F --threads N --runs R
      [--warmup W] [--outputs OUT.f32]

--inputs is raw little-endian f32 in the model's input shape, one or more
images back to back (e.g. check/inputs.f32); runs cycle through them.
--outputs writes the outputs of the timed runs, one per distinct input
(raw little-endian f32), as bench_encoder does, so the bench script can
compare both engines with the bundle's reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import onnxruntime as ort

WARMUP_RUNS = 3
# Below this a median says little; the full MedImageInsight takes up to a
# minute a run (onnxruntime int8), so its benchmark asks for this many, the
# default encoder for 20.
MIN_RUNS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=WARMUP_RUNS)
    parser.add_argument("--outputs")
    args = parser.parse_args()
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be >= {MIN_RUNS} for a median worth printing")

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    load_start = time.perf_counter()
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - load_start) * 1e3
    (model_input,) = session.get_inputs()
    shape = model_input.shape
    images = np.fromfile(args.inputs, dtype="<f4").reshape(-1, *shape[1:])

    def run(i: int):
        return session.run(None, {model_input.name: images[i % len(images)][None]})

    for i in range(args.warmup):
        run(i)
    timings_ms = []
    outputs = []
    for i in range(args.runs):
        start = time.perf_counter()
        (output, *_) = run(i)
        timings_ms.append((time.perf_counter() - start) * 1e3)
        if i < len(images):
            outputs.append(np.asarray(output, dtype="<f4").ravel())
    if args.outputs:
        np.concatenate(outputs).astype("<f4").tofile(args.outputs)

    print(json.dumps({
        "runtime": f"onnxruntime {ort.__version__}",
        "model": args.model,
        "threads": args.threads,
        "runs": args.runs,
        "load_ms": round(load_ms, 1),
        "median_ms": round(statistics.median(timings_ms), 2),
        "min_ms": round(min(timings_ms), 2),
        # ru_maxrss is in KiB on Linux
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
