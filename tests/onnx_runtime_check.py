#!/usr/bin/env python3
"""Runs an ONNX model written by `orthoconv export --onnx` in ONNX Runtime, for tests/test_onnx_export.cpp.

  onnx_runtime_check.py CIFAR_DIR IMAGES MODEL.onnx OUT.f32 [MODEL.onnx OUT.f32 ...]

For each model (one Python start for all of them: importing onnxruntime costs more than running a small model):
checks the file with the `onnx` package's checker (full_check: shape inference too), reads the first IMAGES
records of CIFAR_DIR/test.bin as a person would feed the model (pixels = byte / 255 in float32, [N, 3, 32, 32]),
runs them through onnxruntime's CPU provider, writes the logits as raw float32 [IMAGES, classes] to OUT.f32 and
prints one line of JSON: the opset, the operator types used (how often, and their domains), the graph's input and output
shapes, and the model's metadata. The comparison with orthoconv's own logits (and its tolerance) is the C++ test's.
Exits 1 with a message on stderr when the checker refuses a model.
"""
import collections
import json
import sys

import numpy as np
import onnx
import onnxruntime

RECORD = 3074  # 1 coarse label, 1 fine label, 3 x 32 x 32 pixels


def check(model_path: str, x: np.ndarray, out_path: str) -> dict:
    model = onnx.load(model_path)
    onnx.checker.check_model(model, full_check=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": x})
    np.ascontiguousarray(logits, dtype=np.float32).tofile(out_path)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "model": model_path,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "operators": sorted({n.op_type for n in model.graph.node}),
        "operator_counts": dict(collections.Counter(n.op_type for n in model.graph.node)),
        "domains": sorted({n.domain for n in model.graph.node}),
        "input": {i.name: dims(i) for i in model.graph.input},
        "output": {o.name: dims(o) for o in model.graph.output},
        "logits_shape": list(logits.shape),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def main() -> int:
    if len(sys.argv) < 5 or len(sys.argv) % 2 != 1:
        print(__doc__, file=sys.stderr)
        return 2
    data_dir, images = sys.argv[1], int(sys.argv[2])
    raw = np.fromfile(f"{data_dir}/test.bin", dtype=np.uint8, count=images * RECORD)
    pixels = raw.reshape(images, RECORD)[:, 2:].reshape(images, 3, 32, 32)
    x = pixels.astype(np.float32) / np.float32(255.0)  # one float32 division, correctly rounded
    for model_path, out_path in zip(sys.argv[3::2], sys.argv[4::2]):
        try:
            report = check(model_path, x, out_path)
        except onnx.checker.ValidationError as error:
            print(f"onnx checker: {model_path}: {error}", file=sys.stderr)
            return 1
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
