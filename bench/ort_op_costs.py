"""What one ONNX Runtime CPU node costs at the fast export's shapes (1 thread, sequential).

    OMP_WAIT_POLICY=PASSIVE python bench/ort_op_costs.py --length 51 --channels 16

Builds, per op kind, a chain of ``--chain`` copies of the op on a ``[B, L, C]`` activation
(the U-Net's level-0 shape at width 16 is ``[B, 51, 16]`` in the pad-row layout), runs the
chains interleaved under the service's session options and prints the median thread CPU
time per op.  ORT's own profiler adds several microseconds to every node, more than most of
these ops cost, so it cannot rank them; a chain can.  ``identity`` is the per-node floor.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# op kind -> list of (op_type, extra inputs, attributes, domain); "$" is the chain's input
KINDS: dict[str, list[tuple[str, list[str], dict[str, object], str]]] = {
    "identity": [("Identity", [], {}, "")],
    "add_per_position": [("Add", ["bias_lc"], {}, "")],
    "add_channel_bias": [("Add", ["bias_c"], {}, "")],
    "mul_scalar": [("Mul", ["half"], {}, "")],
    "layer_norm": [("LayerNormalization", ["g", "b"], {"axis": -1, "epsilon": 1e-5}, "")],
    "skip_layer_norm": [
        ("SkipLayerNormalization", ["bias_lc", "g", "b"], {"epsilon": 1e-5}, "com.microsoft")
    ],
    "quick_gelu": [("QuickGelu", [], {"alpha": 1.0}, "com.microsoft")],
    "matmul_c_c": [("MatMul", ["w"], {}, "")],
    # the plain layout's im2col padding: Pad + Gather (less gather_rows: the Pad)
    "pad_gather": [("Pad", ["pads"], {}, ""), ("Gather", ["perm"], {"axis": 1}, "")],
    "gather_rows": [("Gather", ["perm"], {"axis": 1}, "")],
    # a convolution's product and its per-position bias, as the export runs them ([B, L, C]:
    # ORT leaves MatMul + Add) and as one Gemm would on a 2-D B = 1 activation ([L, C]:
    # ORT's MatMulAddFusion makes that pair one Gemm; 3-D inputs are not fused)
    "matmul_bias": [("MatMul", ["w"], {}, ""), ("Add", ["bias_lc"], {}, "")],
    "gemm_bias_2d": [("Gemm", ["w", "bias_lc"], {}, "")],
}
TWO_D = {"gemm_bias_2d"}  # chains on a [L, C] input: timed at B = 1 only


def _chain(kind: str, length: int, channels: int, chain: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    consts = {
        "bias_lc": rng.standard_normal((length, channels)).astype(np.float32),
        "bias_c": rng.standard_normal(channels).astype(np.float32),
        "half": np.array(0.5, np.float32),
        "g": np.ones(channels, np.float32),
        "b": np.zeros(channels, np.float32),
        "w": np.eye(channels, dtype=np.float32),
        "pads": np.array([0, 1, 0, 0, 1, 0], np.int64),
        "perm": (np.arange(length) * 7 % length).astype(np.int64),
    }
    nodes, current = [], "x"
    for i in range(chain):
        for j, (op, extra, attrs, domain) in enumerate(KINDS[kind]):
            out = f"n{i}_{j}"
            nodes.append(helper.make_node(op, [current, *extra], [out], domain=domain, **attrs))
            current = out
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes,
        kind,
        [
            helper.make_tensor_value_info(
                "x",
                TensorProto.FLOAT,
                [length, channels] if kind in TWO_D else ["B", length, channels],
            )
        ],  # fmt: skip
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items() if k in used],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_reuse = False
    options.log_severity_level = 3
    # no optimisation: the chain must run as built (ORT would drop identities, fold Adds)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=51)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    for batch in [int(b) for b in args.batches.split(",") if b]:
        kinds = [k for k in KINDS if batch == 1 or k not in TWO_D]
        sessions = {k: _chain(k, args.length, args.channels, args.chain) for k in kinds}
        x = np.random.default_rng(1).standard_normal((batch, args.length, args.channels))
        feed = {"x": x.astype(np.float32)}
        cpu: dict[str, list[float]] = {k: [] for k in sessions}
        for call in range(args.runs + 3):
            for kind, session in sessions.items():
                started = time.thread_time()
                session.run(None, {"x": feed["x"][0]} if kind in TWO_D else feed)
                if call >= 3:  # warm-up
                    cpu[kind].append(time.thread_time() - started)
        cost = {k: float(np.median(v)) / args.chain * 1e6 for k, v in cpu.items()}
        print(f"B={batch} [{args.length}, {args.channels}] us per op (thread CPU time):")
        for kind, microseconds in cost.items():
            print(f"  {kind:18s} {microseconds:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
