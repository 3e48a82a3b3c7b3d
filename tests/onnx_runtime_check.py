#!/usr/bin/env python3
"""Runs an ONNX model written by `orthoconv export --onnx` in ONNX Runtime, for tests/test_onnx_export.cpp.

  onnx_runtime_check.py MODEL.onnx CIFAR_DIR IMAGES OUT.f32

Checks the file with the `onnx` package's checker (full_check: shape inference too), reads the first IMAGES records
of CIFAR_DIR/test.bin as a person would feed the model (pixels = byte / 255 in float32, [N, 3, 32, 32]), runs
them through onnxruntime's CPU provider, writes the logits as raw float32 [IMAGES, classes] to OUT.f32 and prints
one JSON object: the opset, the operator types used (and their domains), the graph's input and output shapes, and
the model's metadata. The comparison with orthoconv's own logits (and its tolerance) is the C++ test's.
Exits 1 with a message on stderr when the checker refuses the model.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime

RECORD = 3074  # 1 coarse label, 1 fine label, 3 x 32 x 32 pixels


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    model_path, data_dir, images, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = onnx.load(model_path)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        print(f"onnx checker: {error}", file=sys.stderr)
        return 1
    raw = np.fromfile(f"{data_dir}/test.bin", dtype=np.uint8, count=images * RECORD)
    pixels = raw.reshape(images, RECORD)[:, 2:].reshape(images, 3, 32, 32)
    x = pixels.astype(np.float32) / np.float32(255.0)  # one float32 division, correctly rounded
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": x})
    np.ascontiguousarray(logits, dtype=np.float32).tofile(out_path)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    report = {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "operators": sorted({n.op_type for n in model.graph.node}),
        "domains": sorted({n.domain for n in model.graph.node}),
        "input": {i.name: dims(i) for i in model.graph.input},
        "output": {o.name: dims(o) for o in model.graph.output},
        "logits_shape": list(logits.shape),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
