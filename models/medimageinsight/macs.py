"""Multiply-adds of the image tower at its input size, by stage and kind.

    python3 models/medimageinsight/macs.py [ci|full]

Counted from the configuration the way graph.py builds the graph: window
attention's score and mix products work on the padded grid, its qkv and proj
on the real tokens only (the published code also runs them on the padding:
PUBLISHED_PADDING_MACS says how much that would add). Kinds: `linear` (qkv, proj, fc1, fc2: what int8 quantizes),
`attention` (q.k and attention.v products, activation x activation, float),
`conv` (patch embeddings and the depthwise 3x3 convolutions, float) and the
final projection. LayerNorm, softmax, GELU and adds are not multiply-adds
and are left out (a few percent of the arithmetic, more of the memory traffic).
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import davit_config
from graph import stage_sizes, window_padding

KINDS = ("linear", "attention", "conv", "projection")


def count(cfg) -> "OrderedDict[str, dict[str, int]]":
    rows: OrderedDict[str, dict[str, int]] = OrderedDict()
    in_dim = 3
    for stage, (h, w) in enumerate(stage_sizes(cfg)):
        c, n = cfg.dims[stage], h * w
        hidden = cfg.hidden(stage)
        k = cfg.patch_size[stage]
        row = dict.fromkeys(KINDS, 0)
        row["conv"] += n * c * in_dim * k * k
        pad_b, pad_r = window_padding(h, w, cfg.window)
        padded = (h + pad_b) * (w + pad_r)
        area = cfg.window * cfg.window
        group_dim = c // cfg.groups[stage]
        per_block = dict.fromkeys(KINDS, 0)
        per_block["conv"] = 4 * n * c * 9  # conv1 and conv2 of both blocks
        # spatial block: qkv and proj on the real tokens (graph.py adds the
        # padding between qkv's matmul and its bias), attention on the padded windows
        per_block["linear"] += n * c * 3 * c + n * c * c + 2 * n * c * hidden
        per_block["attention"] += 2 * padded * area * c  # scores and mix, every head
        # channel block
        per_block["linear"] += n * c * 3 * c + n * c * c + 2 * n * c * hidden
        per_block["attention"] += 2 * n * c * group_dim
        for kind in KINDS:
            row[kind] += per_block[kind] * cfg.depths[stage]
        rows[f"stage{stage} {h}x{w}x{c} depth {cfg.depths[stage]}"] = row
        in_dim = c
    rows["head"] = {**dict.fromkeys(KINDS, 0), "projection": cfg.dims[-1] * cfg.projection_dim}
    return rows


def published_padding_macs(cfg) -> int:
    """What running qkv and proj on the window padding too (as published) adds."""
    extra = 0
    for stage, (h, w) in enumerate(stage_sizes(cfg)):
        pad_b, pad_r = window_padding(h, w, cfg.window)
        c = cfg.dims[stage]
        extra += ((h + pad_b) * (w + pad_r) - h * w) * 4 * c * c * cfg.depths[stage]
    return extra


def format_table(rows) -> str:
    totals = {kind: sum(r[kind] for r in rows.values()) for kind in KINDS}
    grand = sum(totals.values())
    lines = [f"{'':34}" + "".join(f"{k:>12}" for k in KINDS) + f"{'total':>12}{'share':>8}"]
    for name, row in list(rows.items()) + [("total", totals)]:
        total = sum(row.values())
        lines.append(f"{name:34}" + "".join(f"{row[k] / 1e9:11.3f}G" for k in KINDS)
                     + f"{total / 1e9:11.3f}G{100 * total / grand:7.1f}%")
    lines.append(f"{'share of multiply-adds':34}" + "".join(f"{100 * totals[k] / grand:11.1f}%" for k in KINDS))
    lines.append(f"total {grand / 1e9:.2f} G multiply-adds = {2 * grand / 1e9:.1f} GFLOP per image")
    return "\n".join(lines)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "full"
    cfg = davit_config.NAMED[which]
    print(f"{which}: input {cfg.image_size}x{cfg.image_size}, {davit_config.parameter_count(cfg) / 1e6:.1f} M parameters")
    print(format_table(count(cfg)))
    print(f"(qkv and proj on the window padding, as the published code runs them, would add "
          f"{published_padding_macs(cfg) / 1e9:.2f} G)")


if __name__ == "__main__":
    main()
