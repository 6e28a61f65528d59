"""int8 (quantize.py): its form, and that it stays close to fp32 on the CI configuration."""

from __future__ import annotations

import unittest

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from fixtures import TINY, published_init_weights, random_weights

import bundle
import davit_config
import graph
import quantize
from build_bundle import cosines
from dermoscopy_data import synthetic_image


def embed(model, batch):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {graph.INPUT_NAME: x[None]})[0] for x in batch])


def synthetic_batch(names, cfg):
    return np.concatenate([bundle.preprocess_image(synthetic_image(name), cfg) for name in names])


class Int8Form(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fp32 = graph.build_fp32(TINY, random_weights(TINY))
        calibration = synthetic_batch([f"cal-{i}" for i in range(2)], TINY)
        cls.ranges = quantize.activation_ranges(cls.fp32, (x[None] for x in calibration))
        cls.int8 = quantize.to_int8(cls.fp32, cls.ranges)

    def test_every_block_linear_is_an_s8_matmul_integer(self):
        linear = [n.name for n in quantize.linear_matmuls(self.fp32)]
        self.assertEqual(len(linear), 4 * 2 * 4)  # 4 stages x 2 blocks x (qkv, proj, fc1, fc2)
        nodes = {n.name: n for n in self.int8.graph.node}
        inits = {i.name: i for i in self.int8.graph.initializer}
        for name in linear:
            integer = nodes[f"{name}.matmul_integer"]
            self.assertEqual(integer.op_type, "MatMulInteger")
            self.assertEqual(inits[integer.input[1]].data_type, TensorProto.INT8, name)
            self.assertEqual(inits[integer.input[2]].data_type, TensorProto.UINT8, name)
            self.assertEqual(nodes[f"{name}.quantize"].op_type, "Cast")  # after scalar Mul, Add, Clip
            self.assertNotIn(name, nodes)  # the float MatMul is gone
            # tract's fast paths: the rescale is [1, out], never a rank-1 vector.
            self.assertEqual(len(inits[f"{name}.rescale"].dims), 2, name)
            # qkv and fc1 carry their LayerNorm's beta as an added term.
            self.assertEqual(f"{name}.norm_shift" in nodes, name.endswith((".qkv", ".fc1")), name)
        self.assertFalse(any(n.op_type == "QuantizeLinear" for n in self.int8.graph.node))
        float_matmuls = [n.name for n in self.int8.graph.node
                         if n.op_type == "MatMul" and n.input[1] in inits]
        self.assertEqual(float_matmuls, [graph.OUTPUT_NAME])  # only the final projection stays float

    def test_layer_norm_folding_is_exact_in_float(self):
        # Folding gamma into the weights and beta into a shift changes no
        # number before rounding; with random (not unit) gamma and beta the
        # int8 graph still tracks fp32.
        x = synthetic_batch(["fold-0", "fold-1"], TINY)
        self.assertGreater(cosines(embed(self.int8, x), embed(self.fp32, x)).min(), 0.995)

    def test_per_column_weights_round_trip(self):
        inits = {i.name: numpy_helper.to_array(i) for i in self.fp32.graph.initializer}
        q = {i.name: numpy_helper.to_array(i) for i in self.int8.graph.initializer}
        name = "stage1.block0.spatial.ffn.fc2"  # a QuantizeLinear-fed one: its x_scale is stored
        w = inits[f"{name}.weight"]
        x_scale = 1 / float(q[f"{name}.x_inv_scale"])
        w_scale = q[f"{name}.rescale"] / x_scale
        self.assertEqual(np.abs(q[f"{name}.weight_q"]).max(axis=0).min(), 127)  # every column uses its range
        np.testing.assert_allclose(q[f"{name}.weight_q"] * w_scale, w, atol=float(w_scale.max()) / 2 + 1e-7)

    def test_gelu_outputs_get_an_asymmetric_grid(self):
        fc2_input = next(n.input[0] for n in quantize.linear_matmuls(self.fp32) if n.name.endswith(".fc2"))
        lowest, highest = self.ranges[fc2_input]
        self.assertGreater(lowest, -0.2)  # GELU's minimum is -0.17
        scale, zero_point = quantize.activation_quantization(lowest, highest)
        self.assertLess(zero_point, -100)
        self.assertAlmostEqual(scale, (highest - lowest) / 255, places=6)
        self.assertEqual(quantize.activation_quantization(-2.0, 3.0), (3.0 / 127, 0))


class Int8CloseToFp32(unittest.TestCase):
    def test_ci_configuration_cosine_above_the_bundle_floor(self):
        cfg = davit_config.CI
        fp32 = graph.build_fp32(cfg, published_init_weights(cfg, seed=7))
        calibration = synthetic_batch([f"calibration-{i}" for i in range(4)], cfg)
        validation = synthetic_batch([f"validation-{i}" for i in range(3)], cfg)
        int8 = quantize.quantize(fp32, (x[None] for x in calibration))
        reference = embed(fp32, validation)
        cos = cosines(embed(int8, validation), reference)
        floor_mean, floor_min = bundle.MIN_COSINE_RANDOM
        self.assertGreaterEqual(cos.min(), floor_min, cos)
        self.assertGreaterEqual(cos.mean(), floor_mean, cos)

        # The floor means something: with the quantized branches' rescale
        # doubled (a wrong scale), the same comparison falls far below it.
        broken = onnx.ModelProto.FromString(int8.SerializeToString())
        for init in broken.graph.initializer:
            if init.name.endswith(".rescale"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
        self.assertLess(cosines(embed(broken, validation), reference).mean(), floor_min)


if __name__ == "__main__":
    unittest.main()
