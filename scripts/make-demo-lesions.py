"""Draws synthetic 'lesion' photographs for demos on machines without the
real dermoscopy folder. They are labelled SYNTHETIC in their file and lesion
names and carry no dx_type (so the library marks them unconfirmed): they are
not clinical images and say nothing about any diagnosis.

    models/.venv/bin/python scripts/make-demo-lesions.py OUT_DIR
        five camera frames, OUT_DIR/SYNTHETIC_demo_N.jpg
    models/.venv/bin/python scripts/make-demo-lesions.py OUT_DIR --library N
        also a demo reference library: OUT_DIR/library/images/*.jpg and
        OUT_DIR/library/labels.csv, N cases
"""

import pathlib
import random
import sys

from PIL import Image, ImageDraw, ImageFilter


# Each demo "diagnosis" gets its own look, so that similar-case search has
# something to find in the demo; the codes are only placeholders.
STYLES = {"nv": (1.0, 0.7, 0.55), "mel": (0.45, 0.35, 0.4), "bkl": (1.2, 0.95, 0.7), "vasc": (1.3, 0.45, 0.5)}


def lesion(seed: int, style=(1.0, 0.7, 0.55)) -> Image.Image:
    rng = random.Random(seed)
    skin = (rng.randint(200, 235), rng.randint(150, 185), rng.randint(130, 160))
    image = Image.new("RGB", (200, 150), skin)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.randint(80, 120), rng.randint(60, 90)
    for ring in range(6, 0, -1):
        r = ring * rng.randint(5, 8)
        shade = 40 + ring * 18
        colour = (min(255, int((shade + 30) * style[0])), int(shade * style[1]), int(shade * style[2]))
        draw.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=colour)
    # Skin texture and a fuzzy lesion border: a camera frame has fine detail,
    # and the daemon's quality gate refuses frames without it as blurred.
    image = image.filter(ImageFilter.GaussianBlur(0.8))
    pixels = image.load()
    for y in range(image.height):
        for x in range(image.width):
            n = rng.randint(-14, 14)
            r, g, b = pixels[x, y]
            pixels[x, y] = (max(0, min(255, r + n)), max(0, min(255, g + n)), max(0, min(255, b + n)))
    return image


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(5):
        lesion(seed).save(out / f"SYNTHETIC_demo_{seed}.jpg", quality=90)
    if "--library" in sys.argv:
        count = int(sys.argv[sys.argv.index("--library") + 1])
        images = out / "library" / "images"
        images.mkdir(parents=True, exist_ok=True)
        rows = ["image,label,lesion_id,dx_type,age,sex,anatom_site"]
        codes = list(STYLES)
        for i in range(count):
            code = codes[i % len(codes)]
            name = f"SYNTHETIC_case_{i:03d}.jpg"
            lesion(1000 + i, STYLES[code]).save(images / name, quality=90)
            rows.append(f"{name},{code},SYNTHETIC_lesion_{i:03d},,,,")
        (out / "library" / "labels.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
