#!/usr/bin/env python3
"""Check models written by `cargo xtask export` with the official tools.

For each MODEL.onnx and the folder written by `--check-data DIR`:
  - onnx.checker.check_model(path, full_check=True): valid ONNX, strict shape inference passes, and for
    a model with external data, its data file and the tensors' locations are valid;
  - with external data (`--external-data`, or a model over 2 GiB): one data file beside the model,
    every external tensor at an offset that is a multiple of 4096 and inside that file;
  - only standard operators of the default domain; one float32 NCHW input `images`;
    the preprocessing (mean, std, input_size) in the metadata;
  - onnxruntime's outputs for DIR/images.npy against swav-model's (DIR/<output>.npy):
    max |ort - ref| / max |ref| < 1e-4 for every output;
  - with a dynamic batch dimension, a batch of one image and the batch doubled give the same rows.

Usage: python3 scripts/onnx_check.py MODEL.onnx CHECK_DIR [MODEL.onnx CHECK_DIR ...]
       python3 scripts/onnx_check.py --ci
`--ci` (what .ci/run does) first writes three random model files (swav-export's `random_checkpoint`
example), exports them with `cargo xtask export ... --check-data` (ResNet-50 with the head, default
opset, folded batch norms; ResNet-18 small stem, backbone only, opset 13, BatchNormalization nodes;
ResNet-18 with the head and forced external data) into target/onnx-check/, then checks all three.
Needs: pip install onnx onnxruntime numpy
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort

TOLERANCE = 1e-4
STANDARD_OPS = {
    "Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten",
    "Gemm", "MatMul", "ReduceL2", "Max", "Div",
}


def rel_err(got, want):
    scale = float(np.abs(want).max())
    if scale == 0.0:
        raise AssertionError("reference output is all zeros")
    return float(np.abs(got - want).max()) / scale


def check_external_data(model_path, model):
    """Validates the external data layout; returns a one-line summary, or None without external data."""
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return None
    folder = os.path.dirname(os.path.abspath(model_path))
    locations = set()
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert not t.raw_data, f"{t.name}: external tensor also has raw_data"
        location, offset, length = info["location"], int(info["offset"]), int(info["length"])
        assert os.path.basename(location) == location, f"{t.name}: location {location!r} is not beside the model"
        assert offset % 4096 == 0, f"{t.name}: offset {offset} is not a multiple of 4096"
        expected = int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        assert length == expected, f"{t.name}: length {length}, dims {list(t.dims)} need {expected}"
        size = os.path.getsize(os.path.join(folder, location))
        assert offset + length <= size, f"{t.name}: bytes {offset}..{offset + length} past the end of {location} ({size})"
        locations.add(location)
    assert len(locations) == 1, f"external data in several files: {sorted(locations)}"
    location = locations.pop()
    return (f"external data: {len(external)} of {len(model.graph.initializer)} tensors in {location} "
            f"({os.path.getsize(os.path.join(folder, location))} bytes), offsets 4096-aligned")


def check(model_path, data_dir):
    # The path form also checks external data files; the graph is inspected without loading them.
    onnx.checker.check_model(model_path, full_check=True)
    model = onnx.load(model_path, load_external_data=False)
    external = check_external_data(model_path, model)
    opset = {o.domain: o.version for o in model.opset_import}
    ops = sorted({n.op_type for n in model.graph.node})
    foreign = [(n.op_type, n.domain) for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in STANDARD_OPS]
    assert not foreign, f"non-standard operators: {foreign}"

    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert [i.name for i in inputs] == ["images"], f"inputs {[i.name for i in inputs]}"
    tensor_type = inputs[0].type.tensor_type
    assert tensor_type.elem_type == onnx.TensorProto.FLOAT, "input is not float32"
    dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
    assert len(dims) == 4, f"input dims {dims}"
    dynamic_batch = isinstance(dims[0], str)

    meta = {p.key: p.value for p in model.metadata_props}
    mean, std, size = json.loads(meta["mean"]), json.loads(meta["std"]), int(meta["input_size"])
    assert len(mean) == len(std) == dims[1], f"mean/std {mean}/{std} for {dims[1]} channels"

    images = np.load(os.path.join(data_dir, "images.npy"))
    assert images.dtype == np.float32 and images.shape[1] == dims[1], images.shape
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {"images": images})
    errors = {}
    for name, got in zip(names, outputs):
        want = np.load(os.path.join(data_dir, f"{name}.npy"))
        assert got.shape == want.shape, f"{name}: shape {got.shape}, reference {want.shape}"
        errors[name] = rel_err(got, want)

    if dynamic_batch and images.shape[0] > 1:
        one = session.run(None, {"images": images[:1]})
        doubled = session.run(None, {"images": np.concatenate([images, images])})
        for name, full, o, d in zip(names, outputs, one, doubled):
            assert o.shape[0] == 1 and d.shape[0] == 2 * images.shape[0], f"{name}: dynamic batch shapes {o.shape}, {d.shape}"
            errors[f"{name} (batch 1)"] = rel_err(o, full[:1])
            errors[f"{name} (batch x2)"] = rel_err(d[images.shape[0]:], full)

    print(f"{model_path}: onnx {onnx.__version__} checker ok, opset {opset.get('', opset.get('ai.onnx'))}, IR {model.ir_version}, "
          f"ops {ops}, input {dims}, metadata mean {mean} std {std} input_size {size}")
    if external:
        print(f"  {external}")
    print(f"  onnxruntime {ort.__version__} vs swav-model on {images.shape[0]} images of {images.shape[2]}x{images.shape[3]}:")
    failed = []
    for name, e in errors.items():
        ok = e < TOLERANCE
        print(f"    {name:24s} max relative error {e:.2e} {'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(name)
    return failed


def ci_models():
    """Exports the CI's models with the real CLI; returns [model, check_dir, ...]."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "target", "onnx-check")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cases = [
        ("r50", ["resnet50", "16", "standard", "64"], ["--with-head", "--check-batch", "3"]),
        ("r18s", ["resnet18", "16", "small", "32"], ["--opset", "13", "--no-fold-batchnorm"]),
        ("r18x", ["resnet18", "16", "standard", "48"], ["--with-head", "--external-data"]),
    ]
    args = []
    for name, model, export in cases:
        ckpt, onnx_path, data = (os.path.join(out, name + ext) for ext in (".safetensors", ".onnx", ""))
        run = lambda cmd: subprocess.run(cmd, cwd=root, check=True)
        run(["cargo", "run", "--release", "-q", "-p", "swav-export", "--example", "random_checkpoint", "--", ckpt, *model])
        run(["cargo", "xtask", "export", "--checkpoint", ckpt, "--output", onnx_path, "--check-data", data, *export])
        args += [onnx_path, data]
    return args


def main(argv):
    if argv == ["--ci"]:
        argv = ci_models()
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    failed = []
    for model_path, data_dir in zip(argv[0::2], argv[1::2]):
        try:
            failed += [f"{model_path}: {n}" for n in check(model_path, data_dir)]
        except Exception as e:  # report every model, then fail
            print(f"{model_path}: {type(e).__name__}: {e}")
            failed.append(f"{model_path}: {e}")
    checked = len(argv) // 2
    bad = len({f.split(": ")[0] for f in failed})
    print(f"onnx-check: {checked - bad} passed, {bad} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
