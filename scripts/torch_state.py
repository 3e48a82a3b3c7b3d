#!/usr/bin/env python3
"""Convert between orthoconv checkpoints and state dicts of the PyTorch reference code (numpy + safetensors only).

    python3 scripts/torch_state.py to-torch   runs/paper/last.safetensors lipconvnet_state.safetensors
    python3 scripts/torch_state.py from-torch lipconvnet_state.safetensors model.safetensors [options]

The state dict is the one of the GS-SOC code's LipConvNet (lip_convnets.py) built from its SOC modules
(skew_ortho_conv.py); load it there with safetensors.torch.load_file and model.load_state_dict (README.md).

Names:   stage<s>.block<b>.conv          -> layer<s>.<b>.conv            (--conv soc: one SOC)
         stage<s>.block<b>.conv.first    -> layer<s>.<b>.conv.soc1       (--conv gs-soc: the grouped k x k SOC)
         stage<s>.block<b>.conv.second   -> layer<s>.<b>.conv.soc2       (the 1 x 1 SOC with b groups)
         head                            -> last_layer                   (SOC head; lln head: weight and bias)
Tensors of one SOC, with C = max(c_out, c_in * s^2) / g (orthoconv layout -> reference layout, same values):
         weight [g, C, C, k, k]  -> random_conv_filter [g, C, C, k, k]
         bias [c_out]            -> bias [c_out]
         u1 [g, C*k] -> [g, 1, C, 1, k]      v1 [g, C*k] -> [g, C, 1, k, 1]
         u2 [g, C*k] -> [g, 1, C, k, 1]      v2 [g, C*k] -> [g, C, 1, 1, k]
         u3 [g, C*k*k] -> [g, 1, C, k, k]    v3 [g, C] -> [g, C, 1, 1, 1]
         u4 [g, C*k*k] -> [g, C, 1, k, k]    v4 [g, C] -> [g, 1, C, 1, 1]
         (none)                  -> correction [1]: 0.7 for k > 1, 1.0 for k = 1 (fixed in orthoconv's LipConvnet)
Every value is copied bit for bit (float32). Format version 1 checkpoints (u4 and v4 under each other's names)
are read too. The state dict's metadata keeps the checkpoint's model description under "orthoconv.<key>"
(architecture, normalization, series terms, step counters; the reference's SOC.total_iters), so that
from-torch restores them exactly; training state (momentum, history) is not part of a state dict and is dropped.

from-torch on a state dict without that metadata (a model trained in PyTorch) reads the architecture from the
tensor names and shapes; what shapes do not fix comes from the options (defaults: orthoconv's).
Errors are one line on stderr and exit status 1; the output is written to a temporary file and renamed.
"""

import argparse
import math
import os
import re
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CHECKPOINT_FORMAT = "orthoconv.lipconvnet"
CHECKPOINT_VERSION = 2  # include/orthoconv/model_state.hpp kCheckpointVersion
STATE_FORMAT = "orthoconv.torch-state"
META_PREFIX = "orthoconv."
# Metadata of a checkpoint that describes the model (kept); the rest (train.*, optimizer*) is training state.
MODEL_META = re.compile(r"^(architecture|model\..+|series\..+|normalization\..+|step\..+)$")
SOC_TENSORS = ("weight", "bias", "u1", "v1", "u2", "v2", "u3", "v3", "u4", "v4")


class ConversionError(Exception):
    pass


def read_safetensors(path):
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConversionError(f"{path}: not a readable safetensors file ({e})")
    for name, t in tensors.items():
        if t.dtype != np.float32:
            raise ConversionError(f"{path}: tensor '{name}' is {t.dtype}, expected float32")
    return metadata, tensors


def write_safetensors(path, tensors, metadata):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConversionError(f"{path}: cannot write ({e.strerror})")


# ---- names ----

def torch_module(soc_name):
    """orthoconv SocConv name -> reference module name."""
    if soc_name == "head":
        return "last_layer"
    m = re.fullmatch(r"stage(\d+)\.block(\d+)\.conv(\.first|\.second)?", soc_name)
    if not m:
        raise ConversionError(f"unexpected layer name '{soc_name}'")
    suffix = {None: "", ".first": ".soc1", ".second": ".soc2"}[m.group(3)]
    return f"layer{m.group(1)}.{m.group(2)}.conv{suffix}"


def orthoconv_soc(module):
    """Reference module name -> orthoconv SocConv name."""
    if module == "last_layer":
        return "head"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.conv(\.soc1|\.soc2)?", module)
    if not m:
        raise ConversionError(f"unexpected module name '{module}'")
    suffix = {None: "", ".soc1": ".first", ".soc2": ".second"}[m.group(3)]
    return f"stage{m.group(1)}.block{m.group(2)}.conv{suffix}"


def vector_shape(name, g, c, k):
    """The reference's 5-D layout of power-iteration vector `name` (u1..v4)."""
    return {"u1": (g, 1, c, 1, k), "v1": (g, c, 1, k, 1), "u2": (g, 1, c, k, 1), "v2": (g, c, 1, 1, k),
            "u3": (g, 1, c, k, k), "v3": (g, c, 1, 1, 1), "u4": (g, c, 1, k, k), "v4": (g, 1, c, 1, 1)}[name]


def correction_for(kernel):
    return np.array([0.7 if kernel > 1 else 1.0], dtype=np.float32)


# ---- orthoconv -> reference ----

def to_torch(source, target):
    meta, tensors = read_safetensors(source)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConversionError(f"{source}: format '{meta.get('format', '')}' is not '{CHECKPOINT_FORMAT}'")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        version = -1
    if not 1 <= version <= CHECKPOINT_VERSION:
        raise ConversionError(f"{source}: format version {meta.get('format_version', '')!r} is not supported "
                              f"(this script reads versions 1 to {CHECKPOINT_VERSION})")
    if version == 1:  # u4 was the in-channel vector, v4 the (out, h, w) vector
        for name in [n for n in tensors if n.endswith(".u4")]:
            other = name[:-3] + ".v4"
            tensors[name], tensors[other] = tensors[other], tensors[name]

    socs = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".u1")})
    out = {}
    for soc in socs:
        weight = tensors.get(soc + ".weight")
        if weight is None or weight.ndim != 5:
            raise ConversionError(f"{source}: '{soc}.weight' is missing or not [g, C, C, k, k]")
        g, c, _, k, _ = weight.shape
        module = torch_module(soc)
        out[module + ".random_conv_filter"] = weight
        if soc + ".bias" in tensors:
            out[module + ".bias"] = tensors[soc + ".bias"]
        out[module + ".correction"] = correction_for(k)
        for name in SOC_TENSORS[2:]:
            t = tensors.get(f"{soc}.{name}")
            shape = vector_shape(name, g, c, k)
            if t is None or t.size != math.prod(shape):
                raise ConversionError(f"{source}: '{soc}.{name}' is missing or does not hold {math.prod(shape)} values")
            out[f"{module}.{name}"] = t.reshape(shape)
    if "head.weight" in tensors and "head" not in socs:  # the lln head: W [classes, F], b [classes]
        out["last_layer.weight"] = tensors["head.weight"]
        out["last_layer.bias"] = tensors["head.bias"]
    known = {f"{s}.{n}" for s in socs for n in SOC_TENSORS} | {"head.weight", "head.bias"}
    unknown = [n for n in tensors if n not in known and not n.startswith("optimizer.")]
    if unknown:
        raise ConversionError(f"{source}: unexpected tensor '{unknown[0]}'")

    state_meta = {"format": STATE_FORMAT, "format_version": "1"}
    for key, value in meta.items():
        if MODEL_META.match(key):
            state_meta[META_PREFIX + key] = value
    for soc in socs:  # the reference keeps the step counter as SOC.total_iters (not in state_dict)
        if "step." + soc in meta:
            state_meta[f"total_iters.{torch_module(soc)}"] = meta["step." + soc]
    write_safetensors(target, out, state_meta)
    return len(out)


# ---- reference -> orthoconv ----

def conv_label(conv, groups_first, groups_second):
    if conv == "soc":
        return "soc" if groups_first == 1 else f"soc(g{groups_first})"
    return f"gs-soc({groups_first},{'-' if groups_second is None else groups_second})"


def float_text(values):
    return ",".join("%.9g" % float(np.float32(v)) for v in values)


def infer_model(tensors, options):
    """ModelConfig fields from the reference's tensor names and shapes (ModelConfig::architecture() order)."""
    blocks = {}
    for name in tensors:
        m = re.match(r"layer(\d+)\.(\d+)\.conv", name)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != [1, 2, 3, 4, 5] or any(blocks[s] != blocks[1] for s in blocks):
        raise ConversionError("the state dict does not hold layer1..layer5 with the same number of blocks")
    block_size = len(blocks[1])
    gs = any(n.startswith("layer1.0.conv.soc1.") for n in tensors)
    first = "layer1.0.conv.soc1" if gs else "layer1.0.conv"
    groups_first = int(tensors[first + ".random_conv_filter"].shape[0])
    groups_second = None
    if gs and "layer1.0.conv.soc2.random_conv_filter" in tensors:
        groups_second = int(tensors["layer1.0.conv.soc2.random_conv_filter"].shape[0])
    last = f"layer1.{block_size - 1}.conv" + (".soc1" if gs else "")
    width = int(tensors[last + ".bias"].shape[0]) // 2  # the stride-2 block doubles the width
    head = "soc" if "last_layer.random_conv_filter" in tensors else "lln"
    classes = int(tensors["last_layer.bias"].shape[0])
    side = options.input_side
    features = int(tensors["last_layer.weight"].shape[1]) if head == "lln" else \
        int(tensors["last_layer.random_conv_filter"].shape[1])
    if head == "lln" or features > classes:  # features = 32 * width * (side / 32)^2
        cells = features // (32 * width)
        root = math.isqrt(cells)
        if cells * 32 * width != features or root * root != cells:
            raise ConversionError(f"the head's {features} input features are not 32 * width * (side/32)^2")
        side = 32 * root
    return {"conv": "gs-soc" if gs else "soc", "groups_first": groups_first, "groups_second": groups_second,
            "depth": 5 * block_size, "width": width, "classes": classes, "head": head, "side": side}


def from_torch(source, target, options):
    meta, tensors = read_safetensors(source)
    described = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
    out_meta = {"format": CHECKPOINT_FORMAT, "format_version": str(CHECKPOINT_VERSION)}
    if described:  # written by to-torch: the model's description as it was
        out_meta.update(described)
    else:
        m = infer_model(tensors, options)
        groups = str(m["groups_first"])
        if m["conv"] == "gs-soc":
            groups += "," + ("-" if m["groups_second"] is None else str(m["groups_second"]))
        std = [float(np.float32(s)) for s in options.std]
        if len(options.mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConversionError("--mean and --std need three values each, the std positive")
        out_meta.update({
            "architecture": f"lipconvnet-{m['depth']} conv={conv_label(m['conv'], m['groups_first'], m['groups_second'])}"
                            f" width={m['width']} classes={m['classes']} activation={options.activation}"
                            f" head={m['head']} keep={options.downsample_keep} side={m['side']}",
            "model.conv": m["conv"], "model.groups": groups, "model.depth": str(m["depth"]),
            "model.width": str(m["width"]), "model.classes": str(m["classes"]),
            "model.activation": options.activation, "model.head": m["head"],
            "model.downsample_keep": options.downsample_keep, "model.input_side": str(m["side"]),
            "model.seed": str(options.seed), "series.train_terms": str(options.train_terms),
            "series.eval_terms": str(options.eval_terms), "normalization.mean": float_text(options.mean),
            "normalization.std": float_text(std), "normalization.lipschitz": "%.9g" % (1.0 / min(std)),
        })

    out = {}
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".u1")})
    for module in modules:
        soc = orthoconv_soc(module)
        weight = tensors.get(module + ".random_conv_filter")
        if weight is None or weight.ndim != 5:
            raise ConversionError(f"{source}: '{module}.random_conv_filter' is missing or not 5-D")
        g, c, _, k, _ = weight.shape
        correction = tensors.get(module + ".correction")
        if correction is not None and not np.array_equal(correction, correction_for(k)):
            raise ConversionError(f"{source}: '{module}.correction' is {correction.tolist()}; orthoconv's LipConvnet "
                                  f"uses {correction_for(k).tolist()} for kernel {k}")
        out[soc + ".weight"] = weight
        if module + ".bias" in tensors:
            out[soc + ".bias"] = tensors[module + ".bias"]
        for name in SOC_TENSORS[2:]:
            t = tensors.get(f"{module}.{name}")
            if t is None or t.shape != vector_shape(name, g, c, k):
                shape = None if t is None else list(t.shape)
                raise ConversionError(f"{source}: '{module}.{name}' has shape {shape}, expected "
                                      f"{list(vector_shape(name, g, c, k))}")
            out[f"{soc}.{name}"] = t.reshape(g, -1)
        if not described:
            out_meta["step." + soc] = meta.get("total_iters." + module, str(options.step))
    if "last_layer.weight" in tensors:
        out["head.weight"] = tensors["last_layer.weight"]
        out["head.bias"] = tensors["last_layer.bias"]
    known = {f"{m}.{n}" for m in modules for n in ("random_conv_filter", "bias", "correction") + SOC_TENSORS[2:]}
    known |= {"last_layer.weight", "last_layer.bias"}
    unknown = [n for n in tensors if n not in known]
    if unknown:
        raise ConversionError(f"{source}: unexpected tensor '{unknown[0]}'")
    write_safetensors(target, out, out_meta)
    return len(out)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-torch", help="orthoconv checkpoint -> reference state dict")
    to.add_argument("checkpoint")
    to.add_argument("state")
    back = sub.add_parser("from-torch", help="reference state dict -> orthoconv checkpoint")
    back.add_argument("state")
    back.add_argument("checkpoint")
    back.add_argument("--activation", default="maxmin", choices=["maxmin", "maxmin-paired"])
    back.add_argument("--downsample-keep", default="first", choices=["first", "per-group"])
    back.add_argument("--input-side", type=int, default=32, help="used when the head's shape does not fix it")
    back.add_argument("--train-terms", type=int, default=5)
    back.add_argument("--eval-terms", type=int, default=12)
    back.add_argument("--seed", type=int, default=42)
    back.add_argument("--step", type=int, default=0, help="step counter of every SOC (power-iteration schedule)")
    back.add_argument("--mean", type=float, nargs=3, default=[0.4914, 0.4822, 0.4465])
    back.add_argument("--std", type=float, nargs=3, default=[0.2507, 0.2507, 0.2507])
    args = parser.parse_args(argv)
    try:
        if args.command == "to-torch":
            count = to_torch(args.checkpoint, args.state)
            print(f"torch_state: wrote {count} tensors to {args.state}")
        else:
            count = from_torch(args.state, args.checkpoint, args)
            print(f"torch_state: wrote {count} tensors to {args.checkpoint}")
    except ConversionError as e:
        print(f"torch_state: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
