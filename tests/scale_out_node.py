"""One node's ranks of the two-node test (tests/test_scale_out.py::test_two_nodes...).

Started by ``torchrun --nnodes=2 --nproc_per_node=2 --node_rank=i ... tests/scale_out_node.py
--seed S --layers-cuts 0,a,b,c,n --out DIR``; each rank writes ``DIR/rank<r>.npz`` (the outputs
of the cases "pairs_hybrid" and "layers_hybrid") and ``DIR/rank<r>.json`` (their reports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scale_out_cases as cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--layers-cuts", required=True, help="comma-separated unit indices")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    cuts = tuple(int(c) for c in args.layers_cuts.split(","))
    pairs = cases.run_case(args.seed, "pairs_hybrid")
    layers = cases.run_case(args.seed, "layers_hybrid", stage_cuts=cuts)
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), pairs=pairs["out"], layers=layers["out"])
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"pairs": pairs["report"], "layers": layers["report"]}, f)


if __name__ == "__main__":
    main()
