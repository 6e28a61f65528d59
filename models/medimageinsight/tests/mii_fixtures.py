"""Shared set-up for the MedImageInsight export tests (stdlib unittest)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent
MODELS = PACKAGE.parent
REPO = MODELS.parent
for path in (str(PACKAGE), str(MODELS)):
    if path not in sys.path:
        sys.path.insert(0, path)

BUILD = PACKAGE / "build"


def derm_dir() -> Path:
    return Path(os.environ.get("DERMASCOPE_DERM_DATA") or REPO.parent / "shared" / "data" / "derm")


def have_derm() -> bool:
    d = derm_dir()
    return (d / "labels.csv").is_file() and (d / "images").is_dir()


# The published config.yaml's layout (the sections the export reads, and a few
# it must step over: quoted keys, empty lists, comments), written for the tests.
PUBLISHED_YAML = """\
# MedImageInsight-style config (test fixture)
TASK: UniCLTask
VERBOSE: true
IMAGE_ENCODER:
  NAME: davit_v1
  NUM_CLASSES: 0
  #IMAGE_SIZE: [384, 384]
  IMAGE_SIZE: [480, 480]
  LOAD_PRETRAINED: true
  PRETRAINED: ''
  IMAGE_MEAN: [0.485, 0.456, 0.406]
  IMAGE_STD: [0.229, 0.224, 0.225]
  SPEC:
    DROP_RATE: 0.1
    DROP_PATH_RATE: 0.2
    PATCH_SIZE: [7, 3, 3, 3]
    PATCH_STRIDE: [4, 2, 2, 2]
    PATCH_PADDING: [3, 1, 1, 1]
    PATCH_PRENORM: [false, true, true, true]
    DIM_EMBED: [256, 512, 1024, 2048]
    NUM_HEADS: [8, 16, 32, 64]
    NUM_GROUPS: [8, 16, 32, 64]
    DEPTHS: [1, 1, 9, 1]
    WINDOW_SIZE: 12
    ENABLE_CHECKPOINT: true
LANG_ENCODER:
  NAME: transformer
  WIDTH: 1024
UNICL_MODEL:
  DIM_PROJECTION: 1024
  PRETRAINED_LAYERS: '*'
AUG:
  MIXCUT_MINMAX: []
  INTERPOLATION: 'bicubic'
CUSTOMIZED_PARAMS_CONF:
  NO_WEIGHT_DECAY_MODULES: ['dw', 'norm']
  WEIGHT_DECAY_PATTERNS:
    "\\\\.bias$": 0.0
    "logit_scale": 0.0
EVALUATION_SPLITS: ['cls-zeroshot-eval']
TEST:
  BATCH_SIZE_PER_GPU: 8
  CENTER_CROP: false
"""


def yaml_with(replacements: dict[str, str]) -> str:
    text = PUBLISHED_YAML
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


class TempDir:
    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="mii-test-")
        self.path = Path(self._dir.name)

    def cleanup(self):
        self._dir.cleanup()
