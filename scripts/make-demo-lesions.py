"""Draws a few synthetic 'lesion' photographs for demos on machines without
the real dermoscopy folder. They are labelled SYNTHETIC in their file names:
they are not clinical images and say nothing about any diagnosis.

    models/.venv/bin/python scripts/make-demo-lesions.py OUT_DIR
"""

import pathlib
import random
import sys

from PIL import Image, ImageDraw, ImageFilter


def lesion(seed: int) -> Image.Image:
    rng = random.Random(seed)
    skin = (rng.randint(200, 235), rng.randint(150, 185), rng.randint(130, 160))
    image = Image.new("RGB", (200, 150), skin)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.randint(80, 120), rng.randint(60, 90)
    for ring in range(6, 0, -1):
        r = ring * rng.randint(5, 8)
        shade = 40 + ring * 18
        colour = (shade + 30, int(shade * 0.7), int(shade * 0.55))
        draw.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1.5))


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(5):
        lesion(seed).save(out / f"SYNTHETIC_demo_{seed}.jpg", quality=90)


if __name__ == "__main__":
    main()
