"""MedImageInsight checkpoints without torch: read, map onto the image tower, write.

Reading. A `.pt` written by `torch.save` since 1.6 is a zip archive (every
member stored, uncompressed):

    <name>/data.pkl          pickle (protocol 2) of the object; each tensor is
                             torch._utils._rebuild_tensor_v2(storage, offset,
                             size, stride, requires_grad, hooks), its storage a
                             persistent id ('storage', torch.<T>Storage, key,
                             location, numel)
    <name>/data/<key>        the raw bytes of storage <key>
    <name>/byteorder         "little" (absent in files older than torch 1.10:
                             little-endian then too)
    <name>/version, .format_version, .storage_alignment, .data/serialization_id

The pickle is read by a restricted Unpickler whose find_class knows only what
a state dict needs, so a checkpoint can never run code; anything else is
refused by name. The published MedImageInsight loader reads its `.pt` with
safetensors' load_file, so the published file may be a safetensors file
despite its suffix: both are recognised by their first bytes.

Writing (`write_torch_zip`, `write_random_checkpoint`) produces the same
layout torch.save does (member order, 64-byte aligned data through "FB"
padding extras, the same pickle opcodes for an OrderedDict of tensors), so a
torch user can `torch.load` a generated file, with weights_only=True too. This
was checked only against our own reader and the byte layout of real torch
files, not with torch itself (none is installed here).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from davit_config import ENCODER_PREFIX, PROJECTION_KEY, DavitConfig, expected_shapes


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not fit the configuration."""

    def __init__(self, message: str, missing=(), unexpected=(), wrong_shape=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.wrong_shape = list(wrong_shape)


# --- restricted unpickling ----------------------------------------------------

class _StorageType:
    """Stands in for torch.<T>Storage: only says which dtype the bytes hold."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# bfloat16 has no numpy dtype: kept as its 16 raw bits ("bf16") until
# conversion to float32. Integer and bool storages are plain data too (a
# language tower may hold index buffers); only float ones can be image weights.
_STORAGES = {
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bf16",
    "DoubleStorage": "<f8",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
_DTYPE_TO_STORAGE = {"<f4": "FloatStorage", "<f2": "HalfStorage", "bf16": "BFloat16Storage"}


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bf16" else np.dtype(dtype).itemsize


class _Tensor:
    """A tensor as read: a view description over one storage."""

    __slots__ = ("storage", "dtype", "offset", "size", "stride")

    def __init__(self, storage: np.ndarray, dtype: str, offset: int, size: tuple, stride: tuple):
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.size, self.stride = tuple(size), tuple(stride)

    @property
    def shape(self) -> tuple:
        return self.size

    def array(self, key: str) -> np.ndarray:
        """The tensor's values, contiguous (bf16 as uint16 bits)."""
        n = len(self.storage)
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise CheckpointError(f"{key}: negative size, stride or offset in the checkpoint")
        if 0 in self.size:
            return np.zeros(self.size, dtype=self.storage.dtype)
        last = self.offset + sum((d - 1) * s for d, s in zip(self.size, self.stride))
        if last >= n:
            raise CheckpointError(
                f"{key}: view (offset {self.offset}, size {self.size}, stride {self.stride}) "
                f"runs past its storage of {n} elements: corrupt checkpoint"
            )
        item = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage[self.offset:], shape=self.size, strides=[s * item for s in self.stride], writeable=False
        )
        # np.array, not ascontiguousarray, which turns a 0-d tensor (logit_scale) into shape (1,).
        return np.array(view, order="C", copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, tuple) or len(storage) != 2:
        raise CheckpointError("_rebuild_tensor_v2 without a storage: not a state dict checkpoint")
    array, dtype = storage
    return _Tensor(array, dtype, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(data, _Tensor):
        raise CheckpointError("_rebuild_parameter around something that is not a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, members: "_Members", prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._members = members
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages: dict[str, tuple] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name, _STORAGES[name])
        raise CheckpointError(
            f"refusing to load {module}.{name}: a checkpoint may hold only tensors in (ordered) "
            "dicts, and unpickling anything else could run code"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"unsupported persistent id in the checkpoint: {pid!r:.100}")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            member = f"{self._prefix}data/{key}"
            raw = self._members.read(member)
            dtype = stype.dtype
            size = _itemsize(dtype)
            if len(raw) != int(numel) * size:
                raise CheckpointError(
                    f"storage {member}: {len(raw)} bytes, expected {numel} x {size}: truncated checkpoint"
                )
            if dtype == "bf16":
                np_dtype = np.dtype("<u2" if self._byteorder == "little" else ">u2")
            else:
                np_dtype = np.dtype(dtype)
                if self._byteorder == "big" and np_dtype.itemsize > 1:
                    np_dtype = np_dtype.newbyteorder(">")
            self._storages[key] = (np.frombuffer(raw, dtype=np_dtype), dtype)
        return self._storages[key]


# --- file formats ---------------------------------------------------------------

# torch.save's format before 1.6 starts with a pickled magic number (a long).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _Members:
    """Reads stored members straight from the file.

    torch >= 2.7 can save without checksums (every CRC-32 written as 0), which
    zipfile's reader rejects; a non-zero CRC is still verified.
    """

    def __init__(self, path: Path, archive: zipfile.ZipFile, file):
        self._path, self._archive, self._file = path, archive, file

    def read(self, name: str) -> bytes:
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self._path}: {name} is missing: truncated or not a torch zip checkpoint")
        try:
            if info.compress_type != zipfile.ZIP_STORED:
                return self._archive.read(name)
            self._file.seek(info.header_offset)
            header = self._file.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {name}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._file.seek(info.header_offset + 30 + name_len + extra_len)
            data = self._file.read(info.compress_size)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as e:
            raise CheckpointError(f"{self._path}: {name}: {e}: truncated or not a torch zip checkpoint") from e
        if len(data) != info.compress_size:
            raise CheckpointError(f"{self._path}: {name} ends early: truncated or not a torch zip checkpoint")
        if info.CRC and zlib.crc32(data) != info.CRC:
            raise CheckpointError(f"{self._path}: {name} fails its CRC-32: corrupt checkpoint")
        return data


def _read_torch_zip(path: Path) -> dict:
    try:
        file = open(path, "rb")
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: {e}: truncated or not a torch zip checkpoint") from e
    with file, archive:
        members = _Members(path, archive, file)
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path}: a torch zip checkpoint has exactly one <name>/data.pkl, found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = members.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: byteorder {byteorder!r}, expected 'little' or 'big'")
        data = members.read(pickles[0])
        try:
            obj = _Unpickler(data, members, prefix, byteorder).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
                KeyError) as e:
            raise CheckpointError(f"{path}: cannot unpickle {pickles[0]}: {e}") from e
    return obj


_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "bf16", "F64": "<f8", "I64": "<i8",
                       "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_safetensors(path: Path, blob: bytes) -> dict:
    (length,) = struct.unpack("<Q", blob[:8])
    if 8 + length > len(blob):
        raise CheckpointError(f"{path}: safetensors header runs past the end: truncated file")
    try:
        header = json.loads(blob[8: 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from e
    body = memoryview(blob)[8 + length:]
    out: dict = OrderedDict()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: {key}: unsupported safetensors dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > len(body) or start > end:
            raise CheckpointError(f"{path}: {key}: data runs past the end of the file: truncated file")
        np_dtype = np.dtype("<u2") if dtype == "bf16" else np.dtype(dtype)
        flat = np.frombuffer(body[start:end], dtype=np_dtype)
        if flat.size != int(np.prod(shape)):
            raise CheckpointError(f"{path}: {key}: {flat.size} values for shape {shape}")
        strides = []
        acc = 1
        for d in reversed(shape):
            strides.insert(0, acc)
            acc *= d
        out[key] = _Tensor(flat, dtype, 0, shape, tuple(strides))
    return out


def read_state_dict(path: str | Path) -> "OrderedDict[str, _Tensor]":
    """Every tensor of a checkpoint, by key, before any mapping (lazy views)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from e
    if head.startswith(b"PK\x03\x04"):
        obj = _read_torch_zip(path)
    elif head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        raise CheckpointError(
            f"{path}: torch's legacy (pre-1.6, non-zip) format; re-save with torch>=1.6: "
            "torch.save(torch.load(f), g)"
        )
    elif len(head) >= 9 and struct.unpack("<Q", head[:8])[0] < (1 << 27) and head[8:9] == b"{":
        obj = _read_safetensors(path, path.read_bytes())
    else:
        raise CheckpointError(f"{path}: truncated or not a torch zip checkpoint (nor safetensors)")
    return _state_dict_of(obj, path)


NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _state_dict_of(obj, path: Path) -> "OrderedDict[str, _Tensor]":
    # Training scripts nest the weights: {"state_dict": ...}, {"model": ...}, ...
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, _Tensor) for v in obj.values()):
            for key in NESTING_KEYS:
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the checkpoint holds a {type(obj).__name__}, expected a state dict")
    out: "OrderedDict[str, _Tensor]" = OrderedDict()
    for key, value in obj.items():
        if isinstance(value, _Tensor) and isinstance(key, str):
            out[key] = value
    if not out:
        found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:12])
        raise CheckpointError(
            f"{path}: no tensors in the checkpoint: expected a state dict, bare or under one of "
            f"{list(NESTING_KEYS)}; found {{{found}}}"
        )
    # DistributedDataParallel saves every key under "module.".
    if all(k.startswith("module.") for k in out):
        out = OrderedDict((k[len("module."):], v) for k, v in out.items())
    return out


# --- mapping onto the image tower ----------------------------------------------

# Older MedImageInsight / DaViT checkpoints name the same tensors differently
# (the published loader's remap table); both generations are accepted.
_OLD_SUBLAYERS = {
    "cpe.0.proj": "conv1.fn.dw",
    "attn": "{attn}.fn",
    "cpe.1.proj": "conv2.fn.dw",
    "mlp": "ffn.fn.net",
    "norm1": "{attn}.norm",
    "norm2": "ffn.norm",
}
_OLD_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.([01])\.(cpe\.0\.proj|cpe\.1\.proj|attn|mlp|norm1|norm2)\.(.+)$")


def canonical_key(key: str) -> str:
    """The current published name of a key of either naming generation."""
    if key.startswith("visual."):
        key = ENCODER_PREFIX + key[len("visual."):]
    elif key.startswith("text."):
        key = "lang_encoder." + key[len("text."):]
    elif key == "vision_projection":
        key = PROJECTION_KEY
    elif key == "text_projection":
        key = "lang_projection"
    if not key.startswith(ENCODER_PREFIX):
        return key
    rest = key[len(ENCODER_PREFIX):]
    if rest.startswith("conv_embeds."):
        rest = "convs." + rest[len("conv_embeds."):]
    elif rest.startswith("main_blocks."):
        rest = "blocks." + rest[len("main_blocks."):]
    m = _OLD_BLOCK.match(rest)
    if m:
        stage, depth, which, sub, tail = m.groups()
        block, attn = ("spatial_block", "window_attn") if which == "0" else ("channel_block", "channel_attn")
        rest = f"blocks.{stage}.{depth}.{block}.{_OLD_SUBLAYERS[sub].format(attn=attn)}.{tail}"
    return ENCODER_PREFIX + rest


def _is_ignored(key: str) -> bool:
    # The text tower and the temperature are not part of image embedding; the
    # classifier head (NUM_CLASSES > 0) is unused by encode_image.
    return (key.startswith("lang_encoder.") or key == "lang_projection" or key == "logit_scale"
            or key.startswith(ENCODER_PREFIX + "head."))


def _to_float32(tensor: _Tensor, key: str) -> np.ndarray:
    values = tensor.array(key)
    if tensor.dtype == "bf16":
        return (values.astype(np.uint32) << 16).view(np.float32).astype(np.float32, copy=False)
    if tensor.dtype in ("<f4", "<f2", "<f8"):
        return values.astype(np.float32, copy=False)
    raise CheckpointError(f"{key}: {tensor.dtype} tensor where a float weight was expected")


def _format_list(title: str, items: list[str], limit: int | None = None) -> str:
    shown = items if limit is None else items[:limit]
    lines = [f"  {title} ({len(items)}):"] + [f"    {x}" for x in shown]
    if limit is not None and len(items) > limit:
        lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


def load_image_tower(path: str | Path, cfg: DavitConfig, log=None) -> "OrderedDict[str, np.ndarray]":
    """The image tower's weights (float32), keyed exactly as expected_shapes(cfg).

    Raises CheckpointError naming every missing key, unexpected key and wrong
    shape at once, so one run tells everything that disagrees.
    """
    path = Path(path)
    expected = expected_shapes(cfg)
    state = read_state_dict(path)
    found: dict[str, tuple[str, _Tensor]] = {}
    duplicates, unexpected = [], []
    ignored = 0
    for key, tensor in state.items():
        canon = canonical_key(key)
        if _is_ignored(canon):
            ignored += 1
            continue
        if canon not in expected:
            unexpected.append(f"{key} {list(tensor.shape)}")
            continue
        if canon in found:
            duplicates.append(f"{canon} (as {found[canon][0]} and {key})")
            continue
        found[canon] = (key, tensor)
    missing = [f"{k} {list(s)}" for k, s in expected.items() if k not in found]
    wrong = [
        f"{k}: expected {list(expected[k])}, found {list(t.shape)}"
        for k, (_, t) in found.items() if tuple(t.shape) != tuple(expected[k])
    ]
    if missing or unexpected or wrong or duplicates:
        parts = [
            f"{path}: the checkpoint does not match the MedImageInsight image tower of this configuration "
            f"(dims {list(cfg.dims)}, depths {list(cfg.depths)}, projection {cfg.projection_dim}): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape"
            + (f", {len(duplicates)} duplicate" if duplicates else "")
        ]
        if wrong:
            parts.append(_format_list("wrong shape", wrong))
        if missing:
            parts.append(_format_list("missing", missing))
        if unexpected:
            parts.append(_format_list("unexpected", unexpected))
        if duplicates:
            parts.append(_format_list("duplicate (both naming generations)", duplicates))
        raise CheckpointError("\n".join(parts), missing=missing, unexpected=unexpected, wrong_shape=wrong)
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for key in expected:
        out[key] = _to_float32(found[key][1], key)
    if log is not None:
        log(f"checkpoint {path.name}: {len(out)} image-tower tensors; ignored {ignored} "
            "text-tower / logit_scale / head tensors")
    return out


# --- writing --------------------------------------------------------------------

def _pickle_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(1 << 31) <= n < (1 << 31):
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _pickle_tuple(items: Iterable[int]) -> bytes:
    items = list(items)
    body = b"".join(_pickle_int(i) for i in items)
    if len(items) == 0:
        return b")"
    if len(items) <= 3:
        return body + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)]
    return b"(" + body + b"t"


def _state_dict_pickle(entries: list[tuple[str, str, tuple, str]]) -> bytes:
    """Protocol-2 pickle of OrderedDict{key: tensor}, the opcodes torch.save emits.

    entries: (key, storage key, shape, dtype) with contiguous storage per tensor.
    No memo is used, so repeated globals are spelled out each time (valid, a
    few hundred bytes more).
    """
    out = [b"\x80\x02", b"ccollections\nOrderedDict\n", b")R"]
    for start in range(0, len(entries), 1000):  # pickle's SETITEMS batch size
        out.append(b"(")
        for key, skey, shape, dtype in entries[start: start + 1000]:
            numel = int(np.prod(shape)) if shape else 1
            strides, acc = [], 1
            for d in reversed(shape):
                strides.insert(0, acc)
                acc *= d
            out += [
                _pickle_str(key),
                b"ctorch._utils\n_rebuild_tensor_v2\n",
                b"(",
                b"(", _pickle_str("storage"), f"ctorch\n{_DTYPE_TO_STORAGE[dtype]}\n".encode(),
                _pickle_str(skey), _pickle_str("cpu"), _pickle_int(numel), b"tQ",
                _pickle_int(0), _pickle_tuple(shape), _pickle_tuple(strides), b"\x89",
                b"ccollections\nOrderedDict\n)R",
                b"tR",
            ]
        out.append(b"u")
    out.append(b".")
    return b"".join(out)


_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_ALIGN = 64


class TorchZipWriter:
    """Writes a torch.save-layout zip member by member, data 64-byte aligned."""

    def __init__(self, path: Path, archive_name: str):
        self._file = open(path, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._name = archive_name

    def _info(self, member: str, size: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self._name}/{member}", date_time=_FIXED_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        info.create_system = 0
        # Local header: 30 bytes + name + extra; pad with an "FB" extra field
        # (as torch's writer does) so the data starts on a 64-byte boundary.
        # file_size is set first, so zipfile adds no zip64 extra for members
        # under 4 GiB and the arithmetic holds.
        start = self._file.tell() + 30 + len(info.filename.encode("utf-8")) + 4
        pad = (-start) % _ALIGN
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        return info

    def write_bytes(self, member: str, data: bytes) -> None:
        self._zip.writestr(self._info(member, len(data)), data)

    def write_chunks(self, member: str, size: int, chunks: Iterator[bytes]) -> None:
        with self._zip.open(self._info(member, size), "w", force_zip64=False) as out:
            written = 0
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise ValueError(f"{member}: wrote {written} bytes, declared {size}")

    def close(self) -> None:
        self._zip.close()
        self._file.close()


def write_torch_zip(path: str | Path, tensors: "Iterable[tuple[str, tuple, str, Iterator[bytes]]]",
                    serialization_id: str) -> None:
    """Write tensors (key, shape, dtype '<f4'|'<f2'|'bf16', chunks of little-endian bytes).

    tensors must be a sequence (it is walked twice: once for the pickle, once
    for the data; chunks are generated only in the second walk).
    """
    path = Path(path)
    items = list(tensors)
    # torch.save names the archive after the file's stem, or "archive" when
    # saving to a buffer; torch.load accepts any. The fixed name keeps the
    # bytes a function of the contents alone, whatever the file is called.
    archive = "archive"
    entries = [(key, str(i), tuple(shape), dtype) for i, (key, shape, dtype, _) in enumerate(items)]
    writer = TorchZipWriter(path, archive)
    try:
        writer.write_bytes("data.pkl", _state_dict_pickle(entries))
        writer.write_bytes(".format_version", b"1")
        writer.write_bytes(".storage_alignment", b"64")
        writer.write_bytes("byteorder", b"little")
        for (key, skey, shape, dtype), (_, _, _, chunks) in zip(entries, items):
            size = (int(np.prod(shape)) if shape else 1) * _itemsize(dtype)
            writer.write_chunks(f"data/{skey}", size, chunks() if callable(chunks) else chunks)
        writer.write_bytes("version", b"3\n")
        writer.write_bytes(".data/serialization_id", serialization_id.encode("ascii"))
    finally:
        writer.close()


# Names the bytes write_random_checkpoint produces for a given configuration
# and seed; the build caches generated files under it. Bump it with any change
# that alters those bytes (tests pin the CI file's sha256 and say so).
RECIPE_VERSION = 1


def init_kind(key: str, shape: tuple) -> str:
    """The published initialisation of a key: linear, conv, norm_weight, bias or projection."""
    if key == PROJECTION_KEY:
        return "projection"
    if key.endswith(".bias"):
        return "bias"
    if ".norm." in key or key.startswith(ENCODER_PREFIX + "norms.") or key.endswith("norm.weight"):
        return "norm_weight"
    if len(shape) == 4:
        return "conv"
    return "linear"


def _trunc_normal(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    # timm's trunc_normal_(std=0.02) truncates at the absolute bounds [-2, 2],
    # 100 standard deviations out: redrawn here anyway, so the law is exact.
    x = rng.standard_normal(n, dtype=np.float32) * np.float32(std)
    bad = np.abs(x) > 2.0
    while bad.any():
        x[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32) * np.float32(std)
        bad = np.abs(x) > 2.0
    return x


def random_tensor(key: str, shape: tuple, seed: int) -> np.ndarray:
    """One key's published-initialisation values, seeded by (seed, key) alone.

    Seeding per key makes each tensor independent of the order and of the
    other keys, so the CI and full files share nothing but the recipe.
    """
    n = int(np.prod(shape))
    kind = init_kind(key, shape)
    if kind == "bias":
        return np.zeros(shape, np.float32)
    if kind == "norm_weight":
        return np.ones(shape, np.float32)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))
    if kind == "conv":
        values = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    else:
        values = _trunc_normal(rng, n, 0.02)
    return values.reshape(shape)


def write_random_checkpoint(cfg: DavitConfig, path: str | Path, seed: int, extra_keys: bool = True) -> str:
    """A UniCL-layout checkpoint of cfg with random image-tower weights; returns its sha256.

    Deterministic for a seed (same bytes). Tensors are generated one at a
    time while writing, so memory stays at about the largest tensor. With
    extra_keys, a tiny lang_projection and logit_scale are added as a real
    UniCL checkpoint has them, so the reader's ignoring of them is exercised.
    """
    path = Path(path)
    items = []
    for key, shape in expected_shapes(cfg).items():
        items.append((key, shape, "<f4", _lazy_chunks(key, shape, seed)))
    if extra_keys:
        items.append(("lang_projection", (8, cfg.projection_dim), "<f4",
                      _lazy_chunks("lang_projection", (8, cfg.projection_dim), seed)))
        items.append(("logit_scale", (), "<f4", lambda: iter([np.float32(np.log(1 / 0.07)).tobytes()])))
    sid = str(int.from_bytes(hashlib.sha256(f"medimageinsight-random:{seed}".encode()).digest()[:16], "big"))
    sid = sid.rjust(40, "0")[:40]
    tmp = path.with_name(path.name + ".partial")
    write_torch_zip(tmp, items, sid)
    tmp.replace(path)
    return sha256_file(path)


def _lazy_chunks(key: str, shape: tuple, seed: int):
    def gen():
        values = random_tensor(key, shape, seed)
        flat = values.reshape(-1)
        step = 1 << 22  # 16 MB of float32 per write
        for start in range(0, flat.size, step):
            yield flat[start: start + step].astype("<f4", copy=False).tobytes()
    return gen


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    import argparse

    import davit_config

    parser = argparse.ArgumentParser(description="inspect or generate MedImageInsight checkpoints")
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("random")
    gen.add_argument("config", choices=sorted(davit_config.NAMED))
    gen.add_argument("out")
    gen.add_argument("--seed", type=int, default=16)
    chk = sub.add_parser("check")
    chk.add_argument("checkpoint")
    chk.add_argument("--config", default="ci")
    args = parser.parse_args()
    try:
        if args.cmd == "random":
            print(write_random_checkpoint(davit_config.NAMED[args.config], args.out, args.seed))
        else:
            cfg = davit_config.NAMED.get(args.config) or davit_config.from_yaml(args.config)
            weights = load_image_tower(args.checkpoint, cfg, log=print)
            print(f"ok: {len(weights)} tensors, {sum(w.size for w in weights.values())} parameters")
    except (CheckpointError, davit_config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
