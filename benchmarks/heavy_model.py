"""Build a compute-heavy ONNX classifier (a wide MLP) and its manifest, for benchmarks/inference.py.

Runs on a workstation, once: ``python benchmarks/heavy_model.py --out /tmp/heavy`` writes a registry
version (``<out>/heavy_mlp/1/{model.onnx,manifest.json}``). The benchmark imports :func:`mlp` directly.

The MLP is ``30 -> hidden x layers -> 2`` with ReLU and a softmax, random (seeded) weights: the scores
mean nothing, the cost is real (about ``30*h + (layers-1)*h*h + 2*h`` multiply-adds per row).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamhydro.registry import Manifest, Registry, TensorSpec, sha256_bytes

FEATURES = tuple(f"f{i:02d}" for i in range(30))
LABELS = ("class_0", "class_1")


def mlp(name: str, hidden: int, layers: int, features: Sequence[str] = FEATURES, seed: int = 0) -> tuple[bytes, Manifest]:
    """A softmax MLP over ``features`` with ``layers`` hidden layers of width ``hidden``."""
    rng = np.random.default_rng(seed)
    widths = [len(features)] + [hidden] * layers + [len(LABELS)]
    nodes, initializers = [], []
    current = "features"
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        weight = (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"W{i}"), numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [f"h{i}"]))
        current = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Softmax", [current], ["scores"], axis=1))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", len(features)])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", len(LABELS)])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    manifest = Manifest(
        name=name,
        version=1,
        sha256=sha256_bytes(data),
        inputs=(TensorSpec("features", "float32", (-1, len(features)), tuple(features)),),
        outputs=(TensorSpec("scores", "float32", (-1, len(LABELS))),),
        labels=LABELS,
        created="1970-01-01T00:00:00Z",
        description=f"benchmark MLP {'-'.join(map(str, widths))}, random weights (seed {seed})",
        provenance={"command": f"python benchmarks/heavy_model.py --hidden {hidden} --layers {layers}"},
    )
    return data, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="registry root to publish into")
    parser.add_argument("--hidden", type=int, default=1024, help="width of each hidden layer (default 1024)")
    parser.add_argument("--layers", type=int, default=3, help="number of hidden layers (default 3)")
    args = parser.parse_args()
    data, manifest = mlp("heavy_mlp", args.hidden, args.layers)
    version = Registry(args.out).publish(manifest, data)
    print(version.path)


if __name__ == "__main__":
    main()
