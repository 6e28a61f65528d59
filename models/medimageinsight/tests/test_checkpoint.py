"""The torch-free checkpoint reader and writer, and the mapping onto the image tower."""

from __future__ import annotations

import hashlib
import json
import struct
import unittest
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np

import mii_fixtures as fx
import checkpoint
from checkpoint import CheckpointError, TorchZipWriter, load_image_tower, read_state_dict, write_torch_zip
from davit_config import CI, expected_shapes


PINNED_CI_SHA256 = "ff24025c646a902bce4f90829901b8870e1670ed696c8eeadc9b6232f64192ff"


def chunks_of(array: np.ndarray, dtype: str):
    if dtype == "bf16":
        data = (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        data = array.astype(dtype).tobytes()
    return lambda: iter([data[i: i + 1000] for i in range(0, len(data), 1000)] or [b""])


def write_arrays(path: Path, arrays: dict, dtype: str = "<f4") -> None:
    write_torch_zip(path, [(k, v.shape, dtype, chunks_of(v, dtype)) for k, v in arrays.items()], "0" * 40)


def raw_pickle_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] = {}) -> None:
    writer = TorchZipWriter(path, "archive")
    writer.write_bytes("data.pkl", data_pkl)
    writer.write_bytes("byteorder", b"little")
    for key, raw in storages.items():
        writer.write_bytes(f"data/{key}", raw)
    writer.write_bytes("version", b"3\n")
    writer.close()


def tensor_pickle(key: str, storage_key: str, numel: int, offset: int, size, stride, storage="FloatStorage") -> bytes:
    p = checkpoint
    return b"".join([
        b"\x80\x02ccollections\nOrderedDict\n)R(",
        p._pickle_str(key),
        b"ctorch._utils\n_rebuild_tensor_v2\n(",
        b"(", p._pickle_str("storage"), f"ctorch\n{storage}\n".encode(), p._pickle_str(storage_key),
        p._pickle_str("cpu"), p._pickle_int(numel), b"tQ",
        p._pickle_int(offset), p._pickle_tuple(size), p._pickle_tuple(stride), b"\x89",
        b"ccollections\nOrderedDict\n)RtR",
        b"u.",
    ])


class Base(unittest.TestCase):
    ci_path: Path
    ci_sha: str

    @classmethod
    def setUpClass(cls):
        cls.tmp = fx.TempDir()
        cls.ci_path = cls.tmp.path / "ci.pt"
        cls.ci_sha = checkpoint.write_random_checkpoint(CI, cls.ci_path, seed=7)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name: str) -> Path:
        return self.tmp.path / name


class ReaderRoundTrip(Base):
    def test_writer_then_reader_is_bit_exact_for_fp32_fp16_bf16(self):
        rng = np.random.default_rng(3)
        arrays = {"a": rng.standard_normal((3, 5, 2)).astype(np.float32),
                  "b": rng.standard_normal((7,)).astype(np.float32),
                  "scalar": np.array(2.5, np.float32)}
        for dtype in ("<f4", "<f2", "bf16"):
            with self.subTest(dtype=dtype):
                path = self.path(f"rt-{dtype.strip('<')}.pt")
                write_arrays(path, arrays, dtype)
                state = read_state_dict(path)
                self.assertEqual(list(state), list(arrays))
                for key, value in arrays.items():
                    got = checkpoint._to_float32(state[key], key)
                    if dtype == "<f4":
                        want = value
                    elif dtype == "<f2":
                        want = value.astype(np.float16).astype(np.float32)
                    else:  # bfloat16 = the top 16 bits of the float32
                        want = ((value.view(np.uint32) >> 16) << 16).view(np.float32)
                    self.assertEqual(got.dtype, np.float32)
                    self.assertEqual(got.shape, value.shape)
                    self.assertTrue(np.array_equal(got.view(np.uint32), want.view(np.uint32)), key)

    def test_storage_offset_and_strides_are_honoured(self):
        # A [3, 4] tensor stored transposed and offset by 5 elements inside a
        # larger storage: element (i, j) lives at 5 + i + 3 * j.
        storage = np.arange(20, dtype="<f4")
        path = self.path("strided.pt")
        raw_pickle_zip(path, tensor_pickle("t", "0", 20, 5, (3, 4), (1, 3)), {"0": storage.tobytes()})
        got = read_state_dict(path)["t"].array("t")
        want = np.array([[5 + i + 3 * j for j in range(4)] for i in range(3)], np.float32)
        self.assertTrue(np.array_equal(got, want))

    def test_a_view_past_its_storage_is_refused(self):
        path = self.path("overrun.pt")
        raw_pickle_zip(path, tensor_pickle("t", "0", 20, 15, (3, 4), (1, 3)), {"0": np.zeros(20, "<f4").tobytes()})
        with self.assertRaises(CheckpointError) as e:
            read_state_dict(path)["t"].array("t")
        self.assertIn("runs past its storage", str(e.exception))

    def test_members_are_64_byte_aligned_as_torch_writes_them(self):
        with zipfile.ZipFile(self.ci_path) as z:
            names = z.namelist()
            self.assertEqual(names[:4], ["archive/data.pkl", "archive/.format_version",
                                         "archive/.storage_alignment", "archive/byteorder"])
            self.assertEqual(names[-2:], ["archive/version", "archive/.data/serialization_id"])
            for info in z.infolist():
                self.assertEqual(info.compress_type, zipfile.ZIP_STORED)
                start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                self.assertEqual(start % 64, 0, info.filename)

    def test_safetensors_file_is_read_too(self):
        # The published loader calls safetensors' load_file on its .pt.
        a = np.arange(6, dtype="<f4").reshape(2, 3)
        b = np.array([1.5, -2.0], dtype="<f2")
        header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                  "b": {"dtype": "F16", "shape": [2], "data_offsets": [24, 28]}, "__metadata__": {"x": "y"}}
        h = json.dumps(header).encode()
        path = self.path("st.pt")
        path.write_bytes(struct.pack("<Q", len(h)) + h + a.tobytes() + b.tobytes())
        state = read_state_dict(path)
        self.assertTrue(np.array_equal(checkpoint._to_float32(state["a"], "a"), a))
        self.assertTrue(np.array_equal(checkpoint._to_float32(state["b"], "b"), b.astype(np.float32)))


class RandomCheckpoint(Base):
    def test_same_seed_same_bytes_other_seed_other_bytes(self):
        again = self.path("ci-again.pt")
        self.assertEqual(checkpoint.write_random_checkpoint(CI, again, seed=7), self.ci_sha)
        self.assertEqual(checkpoint.sha256_file(again), self.ci_sha)
        other = self.path("ci-other.pt")
        self.assertNotEqual(checkpoint.write_random_checkpoint(CI, other, seed=8), self.ci_sha)

    def test_the_ci_file_for_the_build_seed_is_pinned(self):
        # The build caches generated files by checkpoint.RECIPE_VERSION: a
        # change to the generated bytes must bump it, then update this hash.
        path = self.path("ci-16.pt")
        self.assertEqual(checkpoint.write_random_checkpoint(CI, path, seed=16),
                         PINNED_CI_SHA256, "random checkpoint bytes changed: bump RECIPE_VERSION")

    def test_published_initialisation(self):
        weights = load_image_tower(self.ci_path, CI)
        self.assertEqual(list(weights), list(expected_shapes(CI)))
        fc1 = weights["image_encoder.blocks.3.0.spatial_block.ffn.fn.net.fc1.weight"]
        self.assertAlmostEqual(float(fc1.std()), 0.02, delta=0.0005)
        self.assertAlmostEqual(float(fc1.mean()), 0.0, delta=0.0005)
        stem = weights["image_encoder.convs.0.proj.weight"]
        self.assertAlmostEqual(float(stem.std()), 0.02, delta=0.002)
        self.assertTrue(np.all(weights["image_encoder.blocks.0.0.channel_block.ffn.norm.weight"] == 1))
        self.assertTrue(np.all(weights["image_encoder.convs.1.norm.bias"] == 0))
        self.assertTrue(np.all(weights["image_encoder.blocks.1.0.spatial_block.conv1.fn.dw.bias"] == 0))
        projection = weights["image_projection"]
        self.assertEqual(projection.shape, (512, 1024))
        self.assertAlmostEqual(float(projection.std()), 0.02, delta=0.0005)
        # Each key has its own stream: two tensors of one shape differ.
        a = weights["image_encoder.blocks.0.0.spatial_block.window_attn.fn.proj.weight"]
        b = weights["image_encoder.blocks.0.0.channel_block.channel_attn.fn.proj.weight"]
        self.assertFalse(np.array_equal(a, b))

    def test_text_tower_and_logit_scale_are_ignored_and_counted(self):
        lines = []
        load_image_tower(self.ci_path, CI, log=lines.append)
        self.assertIn("ignored 2 ", lines[0])


class Refusals(Base):
    def assert_refused(self, path: Path, cfg=CI) -> CheckpointError:
        with self.assertRaises(CheckpointError) as e:
            load_image_tower(path, cfg)
        return e.exception

    def test_another_models_checkpoint_names_every_missing_and_unexpected_key(self):
        path = self.path("resnet.pt")
        write_arrays(path, {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
                            "fc.weight": np.zeros((1000, 2048), np.float32)})
        err = self.assert_refused(path)
        message = str(err)
        self.assertEqual(len(err.missing), len(expected_shapes(CI)))
        for key in expected_shapes(CI):
            self.assertIn(key, message)
        self.assertIn("conv1.weight [64, 3, 7, 7]", message)
        self.assertIn("fc.weight [1000, 2048]", message)
        self.assertIn(f"{len(expected_shapes(CI))} missing, 2 unexpected", message)

    def test_config_with_other_depths_names_the_missing_blocks(self):
        deeper = replace(CI, depths=(1, 1, 2, 1))
        err = self.assert_refused(self.ci_path, deeper)
        self.assertEqual(len(err.missing), 32)
        self.assertTrue(all(".blocks.2.1." in m for m in err.missing))
        self.assertIn("image_encoder.blocks.2.1.channel_block.ffn.fn.net.fc2.weight [256, 1024]", str(err))
        self.assertIn("depths [1, 1, 2, 1]", str(err))

    def test_config_with_other_widths_names_expected_and_found_shapes(self):
        wider = replace(CI, dims=(64, 128, 256, 1024), heads=(2, 4, 8, 32), groups=(2, 4, 8, 32))
        err = self.assert_refused(self.ci_path, wider)
        self.assertFalse(err.missing)
        self.assertIn("image_projection: expected [1024, 1024], found [512, 1024]", str(err))
        self.assertIn("image_encoder.convs.3.proj.weight: expected [1024, 256, 3, 3], found [512, 256, 3, 3]", str(err))

    def test_truncated_file(self):
        data = self.ci_path.read_bytes()
        for cut in (len(data) // 2, len(data) - 10, 100):
            with self.subTest(cut=cut):
                path = self.path(f"cut-{cut}.pt")
                path.write_bytes(data[:cut])
                self.assertIn("truncated or not a torch zip checkpoint", str(self.assert_refused(path)))

    def test_not_a_checkpoint_at_all(self):
        path = self.path("notes.pt")
        path.write_text("hello, not a checkpoint\n")
        self.assertIn("truncated or not a torch zip checkpoint", str(self.assert_refused(path)))

    def test_legacy_non_zip_format_asks_for_a_resave(self):
        path = self.path("legacy.pt")
        # torch.save(..., _use_new_zipfile_serialization=False) opens with the
        # pickled magic number 0x1950a86a20f9469cfc6c.
        path.write_bytes(b"\x80\x02\x8a\x0a" + checkpoint._LEGACY_MAGIC + b".\x80\x02M\xe9\x03.")
        self.assertIn("re-save with torch>=1.6", str(self.assert_refused(path)))

    def test_a_pickle_that_would_run_code_is_refused_before_running_it(self):
        marker = self.path("ran")
        command = f"touch {marker}".encode()
        payload = b"\x80\x02cposix\nsystem\n(X" + struct.pack("<I", len(command)) + command + b"tR."
        for module_payload, name in ((payload, "posix.system"),
                                     (payload.replace(b"cposix\nsystem\n", b"cbuiltins\nexec\n"), "builtins.exec")):
            with self.subTest(name=name):
                path = self.path(f"evil-{name}.pt")
                raw_pickle_zip(path, module_payload)
                message = str(self.assert_refused(path))
                self.assertIn(f"refusing to load {name}", message)
                self.assertFalse(marker.exists(), "the pickle's code ran")

    def test_duplicate_tensor_under_both_naming_generations(self):
        state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(CI).items()}
        state["visual.convs.0.proj.bias"] = np.zeros(64, np.float32)
        path = self.path("dup.pt")
        write_arrays(path, state)
        self.assertIn("duplicate", str(self.assert_refused(path)))


class RealTorchFiles(unittest.TestCase):
    """Files torch.save wrote (tests/torch_files/README.md says which and how)."""

    files = Path(__file__).resolve().parent / "torch_files"

    def read(self, name: str) -> dict:
        state = read_state_dict(self.files / name)
        return {k: checkpoint._to_float32(t, k) if t.dtype in ("<f4", "<f2", "bf16") else t.array(k)
                for k, t in state.items()}

    def test_half_precision_storages(self):
        self.assertEqual(self.read("float16.pt")["tensor"].tolist(), [1.5, -2.25, 3.125])
        self.assertEqual(self.read("bfloat16.pt")["tensor"].tolist(), [1.5, -2.5, 3.5])

    def test_offsets_strides_and_a_zero_stride(self):
        state = self.read("non_contiguous.pt")
        backing = np.arange(32, dtype=np.float32)
        self.assertTrue(np.array_equal(state["permuted"], backing[5:29].reshape(2, 3, 4).transpose(0, 2, 1)))
        self.assertTrue(np.array_equal(state["expanded"], np.broadcast_to(backing[1:4], (2, 3))))

    def test_no_crc32_file(self):
        self.assertTrue(np.allclose(self.read("no_crc32.pt")["tensor"], [1.0, 2.5, -3.7, 0.0]))

    def test_scalar_parameter_nested_and_module_state_dict(self):
        self.assertEqual(self.read("scalar.pt")["tensor"].shape, ())
        self.assertEqual(float(self.read("scalar.pt")["tensor"]), 42.0)
        self.assertEqual(self.read("parameter.pt")["param"].shape, (3, 3))
        self.assertEqual(sorted(self.read("checkpoint.pt")), ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"])
        state = self.read("full_model_state_dict.pt")  # an OrderedDict with _metadata (BUILD)
        self.assertEqual(state["running_mean"].tolist(), [0.0, 1.0, 2.0])
        self.assertEqual(state["fc.weight"].shape, (3, 4))

    def test_a_pickled_module_and_the_legacy_format_are_refused(self):
        with self.assertRaises(CheckpointError) as e:
            read_state_dict(self.files / "full_model.pt")
        self.assertIn("refusing to load __main__.Net", str(e.exception))
        with self.assertRaises(CheckpointError) as e:
            read_state_dict(self.files / "simple_legacy.pt")
        self.assertIn("re-save with torch>=1.6", str(e.exception))

    def test_our_pickle_has_the_structure_torch_writes(self):
        # Unpickled with every global and persistent id recorded instead of
        # resolved: torch's own state dict and ours give the same calls, the
        # same persistent-id tuples and the same argument layout.
        import io
        import pickle

        class Recorded(dict):
            pass

        class Named:
            def __init__(self, name):
                self.name = name

            def __call__(self, *args):
                return Recorded() if self.name == "collections.OrderedDict" else (self.name, args)

            def __repr__(self):
                return self.name

        class Recorder(pickle.Unpickler):
            def find_class(self, module, name):
                return Named(f"{module}.{name}")

            def persistent_load(self, pid):
                return ("pid", pid)

        def record(data: bytes) -> list:
            return list(Recorder(io.BytesIO(data)).load().items())

        with zipfile.ZipFile(self.files / "full_model_state_dict.pt") as z:
            theirs = record(z.read("full_model_state_dict/data.pkl"))
        ours = record(checkpoint._state_dict_pickle([("running_mean", "0", (3,), "<f4"),
                                                    ("fc.weight", "1", (3, 4), "<f4")]))
        self.assertEqual(repr(ours), repr(theirs[:2]))
        self.assertEqual(ours[1][1][0], "torch._utils._rebuild_tensor_v2")


class KeyGenerations(Base):
    def test_older_key_names_load_the_same_tensors(self):
        new = load_image_tower(self.ci_path, CI)
        old_names = {}
        for key, value in new.items():
            old = key.replace("image_encoder.", "visual.").replace("visual.convs.", "visual.conv_embeds.")
            old = old.replace("visual.blocks.", "visual.main_blocks.")
            for now, before in (("spatial_block.conv1.fn.dw", "0.cpe.0.proj"), ("spatial_block.window_attn.fn", "0.attn"),
                                ("spatial_block.conv2.fn.dw", "0.cpe.1.proj"), ("spatial_block.ffn.fn.net", "0.mlp"),
                                ("spatial_block.window_attn.norm", "0.norm1"), ("spatial_block.ffn.norm", "0.norm2"),
                                ("channel_block.conv1.fn.dw", "1.cpe.0.proj"), ("channel_block.channel_attn.fn", "1.attn"),
                                ("channel_block.conv2.fn.dw", "1.cpe.1.proj"), ("channel_block.ffn.fn.net", "1.mlp"),
                                ("channel_block.channel_attn.norm", "1.norm1"), ("channel_block.ffn.norm", "1.norm2")):
                old = old.replace(now, before)
            old = "vision_projection" if old == "image_projection" else old
            old_names[old] = value
        self.assertIn("visual.main_blocks.0.0.0.cpe.0.proj.weight", old_names)
        self.assertIn("visual.main_blocks.3.0.1.mlp.fc2.bias", old_names)
        old_names["text.token_embedding.weight"] = np.zeros((4, 8), np.float32)
        path = self.path("old-names.pt")
        write_arrays(path, OrderedDict(old_names))
        lines = []
        loaded = load_image_tower(path, CI, log=lines.append)
        self.assertEqual(list(loaded), list(new))
        for key in new:
            self.assertTrue(np.array_equal(loaded[key], new[key]), key)
        self.assertIn("ignored 1 ", lines[0])

    def test_nested_state_dict_and_ddp_prefix(self):
        # {"state_dict": OrderedDict{"module.<key>": tensor}}: the training-loop layout.
        weights = load_image_tower(self.ci_path, CI)
        entries = [(f"module.{k}", str(i), v.shape, "<f4") for i, (k, v) in enumerate(weights.items())]
        inner = checkpoint._state_dict_pickle(entries)
        # {"state_dict": <the OrderedDict pickle without its PROTO and STOP>}
        data_pkl = b"\x80\x02}" + checkpoint._pickle_str("state_dict") + inner[2:-1] + b"s."
        path = self.path("nested.pt")
        raw_pickle_zip(path, data_pkl, {str(i): v.astype("<f4").tobytes() for i, v in enumerate(weights.values())})
        loaded = load_image_tower(path, CI)
        self.assertEqual(list(loaded), list(weights))
        self.assertTrue(all(np.array_equal(loaded[k], weights[k]) for k in weights))

    def test_half_precision_checkpoint_becomes_float32(self):
        weights = load_image_tower(self.ci_path, CI)
        path = self.path("half.pt")
        write_arrays(path, weights, "<f2")
        loaded = load_image_tower(path, CI)
        key = "image_projection"
        self.assertEqual(loaded[key].dtype, np.float32)
        self.assertTrue(np.array_equal(loaded[key], weights[key].astype(np.float16).astype(np.float32)))


if __name__ == "__main__":
    unittest.main()
