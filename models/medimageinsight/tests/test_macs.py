"""macs.py's closed-form count against the multiply-adds of the graph itself."""

from __future__ import annotations

import unittest

import numpy as np

from fixtures import published_init_weights

import davit_config
import graph
import macs


def graph_macs(model) -> dict[str, int]:
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    out = dict.fromkeys(macs.KINDS, 0)
    for node in model.graph.node:
        if node.op_type == "Conv":
            w, y = inits[node.input[1]], shapes[node.output[0]]
            out["conv"] += int(np.prod(y[1:]) * np.prod(w[1:]))
        elif node.op_type == "MatMul":
            a = shapes[node.input[0]]
            b = inits.get(node.input[1]) or shapes[node.input[1]]
            product = int(np.prod(a) * b[-1])  # every output element is a K-long dot product
            if node.output[0] == graph.OUTPUT_NAME:
                out["projection"] += product
            elif node.input[1] in inits:
                out["linear"] += product
            else:
                out["attention"] += product
    return out


class MacsMatchTheGraph(unittest.TestCase):
    def test_ci_configuration(self):
        cfg = davit_config.CI
        model = graph.build_fp32(cfg, published_init_weights(cfg))
        counted = graph_macs(model)
        table = macs.count(cfg)
        for kind in macs.KINDS:
            self.assertEqual(sum(row[kind] for row in table.values()), counted[kind], kind)

    def test_full_configuration_total(self):
        # Closed form only (the full graph is 1.4 GB): the linear layers are
        # every block Linear parameter times its tokens.
        cfg = davit_config.PUBLISHED
        linear = sum(12 * cfg.dims[s] ** 2 * 2 * cfg.grid(s) ** 2 * cfg.depths[s] for s in range(4))
        table = macs.count(cfg)
        self.assertEqual(sum(row["linear"] for row in table.values()), linear)
        self.assertEqual(round(sum(sum(row.values()) for row in table.values()) / 1e9, 1), 291.9)


if __name__ == "__main__":
    unittest.main()
