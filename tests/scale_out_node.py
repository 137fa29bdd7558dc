"""One node's ranks of the two-node test (tests/test_scale_out.py::test_two_nodes...).

Started by ``torchrun --nnodes=2 --nproc_per_node=2 ... tests/scale_out_node.py --seed S
--layers-cuts 0,a,b,c,n --out DIR [--node-links stand-in]``; each rank writes ``DIR/rank<r>.npz``
(the outputs of the cases "pairs_hybrid" and "layers_hybrid") and ``DIR/rank<r>.json`` (their
reports). With ``--node-links stand-in`` both runs use one per-link transport
(``comm.make_link_transport``): links inside a node through a stand-in for CUDA IPC, links
between the nodes through torch.distributed.
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
    parser.add_argument("--node-links", choices=["config", "stand-in"], default="config",
                        help="config: the transport HybridConfig selects (torch on CPU); "
                             "stand-in: per-link routes with a stand-in for IPC inside a node")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    cuts = tuple(int(c) for c in args.layers_cuts.split(","))
    transport = carrier = None
    if args.node_links == "stand-in":
        import hybridiff_rt as hr
        from hybridiff_rt.comm import TorchTransport, make_link_transport

        hr.init_distributed(timeout_s=60)
        carrier = TorchTransport(60)
        transport = make_link_transport("auto", 60, torch.device("cpu"),
                                        node_link=cases.stand_in_node_link(carrier))
    try:
        pairs = cases.run_case(args.seed, "pairs_hybrid", use_transport=transport)
        layers = cases.run_case(args.seed, "layers_hybrid", use_transport=transport,
                                stage_cuts=cuts)
    finally:
        for owned in (transport, carrier):
            if owned is not None:
                owned.close()
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), pairs=pairs["out"], layers=layers["out"])
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"pairs": pairs["report"], "layers": layers["report"]}, f)


if __name__ == "__main__":
    main()
