"""graph.py against the independent numpy reference, and its static form."""

from __future__ import annotations

import unittest
from dataclasses import replace

import numpy as np
import onnxruntime as ort

from fixtures import TINY, images, random_weights

import graph
import reference


def run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([graph.OUTPUT_NAME], {graph.INPUT_NAME: row[None]})[0] for row in x])


class GraphAgreesWithReference(unittest.TestCase):
    def test_tiny_config_matches_numpy_forward(self):
        weights = random_weights(TINY)
        x = images(2, TINY.image_size)
        out = run(graph.build_fp32(TINY, weights), x)
        self.assertEqual(out.shape, (2, TINY.projection_dim))
        err = reference.compare(TINY, weights, out, x)  # raises above 1e-3 relative
        self.assertLess(err, 1e-4)

    def test_window_padding_on_a_grid_that_is_not_a_multiple_of_the_window(self):
        # 88 -> grids 22, 11, 6, 3 against window 4: every stage pads (2, 1, 2, 1).
        cfg = replace(TINY, image_size=88, window=4)
        self.assertEqual(graph.stage_sizes(cfg), [(22, 22), (11, 11), (6, 6), (3, 3)])
        self.assertEqual([graph.window_padding(h, w, 4) for h, w in graph.stage_sizes(cfg)],
                         [(2, 2), (1, 1), (2, 2), (1, 1)])
        weights = random_weights(cfg, seed=3)
        model = graph.build_fp32(cfg, weights)
        self.assertTrue(any(n.op_type == "Pad" for n in model.graph.node))
        x = images(1, cfg.image_size, seed=4)
        reference.compare(cfg, weights, run(model, x), x)

    def test_padding_tokens_take_part_in_attention(self):
        # No mask, as published: the zero-padded tokens are keys and values
        # too. A reference that attends over each window's real tokens only
        # disagrees with the graph, so the check above tells the two apart.
        cfg = replace(TINY, image_size=88, window=4)
        weights = random_weights(cfg, seed=3)
        x = images(1, cfg.image_size, seed=4)
        out = run(graph.build_fp32(cfg, weights), x)
        original = reference.window_attention

        def real_tokens_only(t, size, w, key, heads, window):
            b, n, c = t.shape
            h, wd = size
            grid = t.reshape(b, h, wd, c)
            result = np.zeros_like(grid)
            for top in range(0, h, window):
                for left in range(0, wd, window):
                    tile = grid[:, top:top + window, left:left + window]
                    th, tw = tile.shape[1:3]
                    tokens = tile.reshape(b, th * tw, c)
                    qkv = reference._linear(tokens, w, f"{key}.qkv").reshape(b, th * tw, 3, heads, c // heads)
                    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
                    attention = reference._softmax((q * (c // heads) ** -0.5) @ k.transpose(0, 1, 3, 2))
                    mixed = (attention @ v).transpose(0, 2, 1, 3).reshape(b, th * tw, c)
                    result[:, top:top + th, left:left + tw] = reference._linear(
                        mixed, w, f"{key}.proj").reshape(b, th, tw, c)
            return result.reshape(b, n, c)

        # Control: on grids that are whole windows (128 -> 32/16/8/4) there is
        # no padding and the two references are the same computation.
        whole = replace(cfg, image_size=128)
        whole_weights = random_weights(whole, seed=5)
        whole_x = images(1, whole.image_size, seed=6)
        whole_out = run(graph.build_fp32(whole, whole_weights), whole_x)
        reference.window_attention = real_tokens_only
        try:
            reference.compare(whole, whole_weights, whole_out, whole_x)
            with self.assertRaises(reference.ReferenceMismatch):
                reference.compare(cfg, weights, out, x)
        finally:
            reference.window_attention = original

    def test_reference_catches_a_wrong_weight(self):
        weights = random_weights(TINY)
        x = images(1, TINY.image_size)
        out = run(graph.build_fp32(TINY, weights), x)
        tampered = dict(weights)
        key = "image_encoder.blocks.2.0.channel_block.ffn.fn.net.fc2.bias"
        # One channel: a shift of every channel alike is what LayerNorm removes.
        tampered[key] = tampered[key].copy()
        tampered[key][0] += 0.5
        with self.assertRaises(reference.ReferenceMismatch):
            reference.compare(TINY, tampered, out, x)


class StaticGraph(unittest.TestCase):
    def test_no_shape_computation_and_readable_names(self):
        model = graph.build_fp32(TINY, random_weights(TINY))
        ops = {n.op_type for n in model.graph.node}
        self.assertFalse(ops & {"Shape", "Size", "ConstantOfShape", "Range", "NonZero", "Expand"}, ops)
        self.assertEqual(model.opset_import[0].version, 17)
        for value in list(model.graph.value_info) + list(model.graph.output):
            dims = value.type.tensor_type.shape.dim
            self.assertTrue(all(d.HasField("dim_value") for d in dims), value.name)
        names = {n.name for n in model.graph.node}
        self.assertIn("stage2.block0.spatial.attn.qkv", names)
        self.assertIn("stage3.block0.channel.ffn.fc2", names)
        self.assertEqual([i.name for i in model.graph.input], ["image"])
        self.assertEqual([o.name for o in model.graph.output], ["embedding"])

    def test_missing_weight_is_named(self):
        weights = random_weights(TINY)
        del weights["image_encoder.blocks.1.0.spatial_block.window_attn.fn.proj.weight"]
        with self.assertRaisesRegex(KeyError, "blocks.1.0.spatial_block.window_attn.fn.proj.weight"):
            graph.build_fp32(TINY, weights)


if __name__ == "__main__":
    unittest.main()
