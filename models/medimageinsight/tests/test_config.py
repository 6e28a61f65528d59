"""DavitConfig, config.yaml reading and the published state-dict layout."""

from __future__ import annotations

import unittest

import mii_fixtures as helpers  # noqa: F401  (sys.path)
import davit_config
from davit_config import CI, PUBLISHED, ConfigError, expected_shapes, parameter_count


def hand_count(dims, depths, patch, prenorm, projection, mlp_ratio=4):
    """The parameter total counted from the architecture, not from expected_shapes.

    One spatial or channel block of width d: two depthwise 3x3 convs with bias
    (2 x 10d), two LayerNorms (2 x 2d), qkv (3d^2 + 3d), proj (d^2 + d), fc1
    (4d^2 + 4d), fc2 (4d^2 + d): 12 d^2 + 33 d (mlp ratio 4).
    """
    total = 0
    for i, d in enumerate(dims):
        cin = 3 if i == 0 else dims[i - 1]
        total += d * cin * patch[i] ** 2 + d  # patch-embedding conv
        total += 2 * (cin if prenorm[i] else d)  # its LayerNorm
        h = mlp_ratio * d
        per_block = 2 * 10 * d + 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (h * d + h) + (d * h + d)
        total += depths[i] * 2 * per_block  # spatial + channel block
    total += 2 * dims[-1]  # norms
    total += dims[-1] * projection  # image_projection
    return total


class PublishedLayout(unittest.TestCase):
    def test_published_parameter_total_matches_the_hand_count(self):
        expected = hand_count((256, 512, 1024, 2048), (1, 1, 9, 1), (7, 3, 3, 3), (False, True, True, True), 1024)
        print(f"\n  published image tower + projection: {parameter_count(PUBLISHED):,} parameters "
              f"(hand count {expected:,}); CI: {parameter_count(CI):,}")
        self.assertEqual(parameter_count(PUBLISHED), expected)
        self.assertEqual(expected, 362_733_568)  # ~0.36 B, as published
        self.assertEqual(parameter_count(CI),
                         hand_count((64, 128, 256, 512), (1, 1, 1, 1), (7, 3, 3, 3), (False, True, True, True), 1024))

    def test_published_key_count_and_a_few_exact_shapes(self):
        shapes = expected_shapes(PUBLISHED)
        # 4 stems x 4 keys, 12 blocks x 2 sub-blocks x 16 keys, norms 2, projection 1.
        self.assertEqual(len(shapes), 16 + 12 * 2 * 16 + 2 + 1)
        self.assertEqual(shapes["image_encoder.convs.0.proj.weight"], (256, 3, 7, 7))
        self.assertEqual(shapes["image_encoder.convs.0.norm.weight"], (256,))  # post-norm stem
        self.assertEqual(shapes["image_encoder.convs.1.norm.weight"], (256,))  # pre-norm on the previous width
        self.assertEqual(shapes["image_encoder.convs.3.proj.weight"], (2048, 1024, 3, 3))
        self.assertEqual(shapes["image_encoder.blocks.2.8.channel_block.channel_attn.fn.qkv.weight"], (3072, 1024))
        self.assertEqual(shapes["image_encoder.blocks.3.0.spatial_block.ffn.fn.net.fc1.weight"], (8192, 2048))
        self.assertEqual(shapes["image_encoder.blocks.0.0.spatial_block.conv1.fn.dw.weight"], (256, 1, 3, 3))
        self.assertEqual(shapes["image_projection"], (2048, 1024))
        self.assertNotIn("image_encoder.blocks.2.9.spatial_block.conv1.fn.dw.weight", shapes)
        self.assertEqual(list(shapes)[-1], "image_projection")

    def test_ci_keeps_the_published_head_width(self):
        for cfg in (PUBLISHED, CI):
            self.assertEqual({d // h for d, h in zip(cfg.dims, cfg.heads)}, {32})
            self.assertEqual({d // g for d, g in zip(cfg.dims, cfg.groups)}, {32})
        self.assertEqual((CI.image_size, CI.window, CI.projection_dim), (480, 12, 1024))
        self.assertEqual([CI.grid(i) for i in range(4)], [120, 60, 30, 15])


class YamlConfig(unittest.TestCase):
    def setUp(self):
        self.tmp = helpers.TempDir()

    def tearDown(self):
        self.tmp.cleanup()

    def load(self, text: str):
        path = self.tmp.path / "config.yaml"
        path.write_text(text)
        return davit_config.from_yaml(path)

    def test_published_layout_reads_as_the_published_configuration(self):
        cfg = self.load(helpers.PUBLISHED_YAML)
        self.assertEqual(cfg, PUBLISHED)
        self.assertFalse(cfg.center_crop)
        self.assertEqual(cfg.resize, "bicubic")

    def test_depths_and_widths_come_from_the_file(self):
        cfg = self.load(helpers.yaml_with({"DEPTHS: [1, 1, 9, 1]": "DEPTHS: [1, 1, 1, 1]",
                                           "CENTER_CROP: false": "CENTER_CROP: true"}))
        self.assertEqual(cfg.depths, (1, 1, 1, 1))
        self.assertTrue(cfg.center_crop)

    def test_another_image_encoder_is_refused(self):
        with self.assertRaises(ConfigError) as e:
            self.load(helpers.yaml_with({"NAME: davit_v1": "NAME: focalnet"}))
        self.assertIn("expected 'davit_v1'", str(e.exception))
        self.assertIn("'focalnet'", str(e.exception))

    def test_no_image_encoder_section_is_refused(self):
        with self.assertRaises(ConfigError) as e:
            self.load("MODEL:\n  NAME: resnet50\n")
        self.assertIn("no IMAGE_ENCODER section", str(e.exception))

    def test_variants_the_graph_does_not_implement_are_refused(self):
        with self.assertRaises(ConfigError) as e:
            self.load(helpers.yaml_with({"WINDOW_SIZE: 12": "WINDOW_SIZE: 12\n    STANDPARAM: false"}))
        self.assertIn("STANDPARAM=False", str(e.exception))

    def test_malformed_spec_names_the_field(self):
        with self.assertRaises(ConfigError) as e:
            self.load(helpers.yaml_with({"NUM_HEADS: [8, 16, 32, 64]": "NUM_HEADS: [8, 16, 32]"}))
        self.assertIn("NUM_HEADS must be a list of 4", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            self.load(helpers.yaml_with({"NUM_HEADS: [8, 16, 32, 64]": "NUM_HEADS: [8, 16, 30, 64]"}))
        self.assertIn("not divisible by 30 heads", str(e.exception))

    def test_yaml_outside_the_subset_is_refused_not_guessed(self):
        with self.assertRaises(ConfigError):
            self.load(helpers.PUBLISHED_YAML + "ANCHORED: &a 3\n")
        with self.assertRaises(ConfigError):
            self.load(helpers.PUBLISHED_YAML + "TEXT: |\n  multi\n")


if __name__ == "__main__":
    unittest.main()
