"""A trained network as a file others load without mpl_fast:
``python -m mpl_fast.export RUN_DIR --format safetensors|torchscript|onnx|pt [--model selected] [--out FILE]``.

  safetensors  the weights (safetensors.torch.load_file); the architecture and the
               preprocessing are in the file's metadata under "mpl_fast" (JSON)
  torchscript  the traced network (torch.jit.load); metadata in the extra file mpl_fast.json
  onnx         the network with a dynamic batch dimension, input "input", output "logits"
               (onnxruntime); metadata in the model's metadata_props
  pt           {"state_dict", "metadata"} for torch.load(weights_only=True)

Every export is loaded back after it is written and its outputs compared with the network's
on a random batch (ONNX without onnxruntime: the ONNX checker only, and it says so).
safetensors, onnx, onnxscript and onnxruntime come with ``pip install mpl_fast[export]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

from mpl_fast import runs

FORMATS = ("safetensors", "torchscript", "onnx", "pt")
# "pt" gets an infix so that RUN_DIR/finetuned.export.pt never overwrites the run's own finetuned.pt.
EXTENSIONS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx", "pt": ".export.pt"}
# Largest |difference| accepted between the export's outputs and the network's (float32 logits).
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """An export that cannot be written or does not reproduce the network; one sentence."""


def _need(module: str, fmt: str):
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"--format {fmt} needs the {module} package, which is not installed: "
                          f"pip install mpl_fast[export]") from None


def metadata(opened: runs.RunNetwork) -> dict:
    """What a user of the file needs besides the weights: architecture, input, preprocessing."""
    from mpl_fast import __version__  # noqa: PLC0415

    return {"format_version": 1, "mpl_fast_version": __version__, "run_dir": os.path.abspath(opened.run_dir),
            "model": opened.name, "checkpoint_step": opened.checkpoint_step, "method": opened.config.method,
            "network": opened.spec.as_dict(), "preprocess": opened.preprocess.as_dict()}


def example_input(spec: runs.NetworkSpec, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *spec.input_shape), generator=g)


# ----------------------------------------------------------------------------- writers

def write(opened: runs.RunNetwork, fmt: str, out: str) -> None:
    net, meta = opened.network.cpu().eval(), metadata(opened)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if fmt == "safetensors":
        st = _need("safetensors.torch", fmt)
        st.save_file(_weights(net), out, metadata={"mpl_fast": json.dumps(meta)})
    elif fmt == "pt":
        torch.save({"state_dict": _weights(net), "metadata": meta}, out)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            traced = torch.jit.trace(net, example_input(opened.spec, 2))
            torch.jit.save(traced, out, _extra_files={"mpl_fast.json": json.dumps(meta)})
    elif fmt == "onnx":
        _write_onnx(net, opened.spec, meta, out)
    else:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _weights(net: torch.nn.Module) -> dict:
    """Contiguous, unshared copies of the state dict's tensors (what safetensors requires)."""
    return {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}


def _write_onnx(net: torch.nn.Module, spec: runs.NetworkSpec, meta: dict, out: str) -> None:
    onnx = _need("onnx", "onnx")
    _need("onnxscript", "onnx")  # torch.onnx's exporter is written with it
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (example_input(spec, 2),), dynamo=True, verbose=False,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), external_data=False)
    model = program.model_proto
    onnx.helper.set_model_props(model, {"mpl_fast": json.dumps(meta)})
    onnx.save(model, out)


# ----------------------------------------------------------------------------- read back

def read_back(fmt: str, path: str, spec: runs.NetworkSpec):
    """A callable (float tensor -> logits tensor) built from the exported file alone (for
    safetensors and pt: the weights in a fresh network of ``spec``), or None with a reason."""
    if fmt in ("safetensors", "pt"):
        if fmt == "safetensors":
            weights = _need("safetensors.torch", fmt).load_file(path)
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        return runs.build_network(spec, weights), None
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            return torch.jit.load(path, map_location="cpu").eval(), None
    onnx = _need("onnx", fmt)
    onnx.checker.check_model(onnx.load(path))
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError:
        return None, "onnxruntime is not installed: only the ONNX checker ran (pip install onnxruntime)"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])), None


@torch.no_grad()
def check(opened: runs.RunNetwork, fmt: str, path: str) -> tuple[float | None, str | None]:
    """(max |export - network| over a random batch of 3, None) or (None, why it was not run)."""
    loaded, reason = read_back(fmt, path, opened.spec)
    if loaded is None:
        return None, reason
    x = example_input(opened.spec, 3, seed=1)  # another batch size than the trace's
    diff = float((loaded(x).float() - opened.network.cpu()(x).float()).abs().max())
    if not diff <= TOLERANCE:
        raise ExportError(f"the {fmt} export at {path} does not reproduce the network: outputs differ by {diff:.3g}")
    return diff, None


def export(run_dir: str, fmt: str, model: str = runs.DEFAULT_MODEL, out: str | None = None) -> dict:
    """Writes and checks one export; returns {"path", "format", "max_abs_diff", "skipped_check"}."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    opened = runs.open_network(run_dir, model)
    out = out or os.path.join(run_dir, f"{model}{EXTENSIONS[fmt]}")
    write(opened, fmt, out)
    diff, reason = check(opened, fmt, out)
    return {"path": out, "format": fmt, "max_abs_diff": diff, "skipped_check": reason}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpl_fast.export",
                                description="Write a trained network to a file that loads without mpl_fast.")
    p.add_argument("run_dir", help="the training run's folder (its --output-dir)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--model", default=runs.DEFAULT_MODEL, choices=runs.MODEL_CHOICES,
                   help="which network of the run (default: selected)")
    p.add_argument("--out", default=None, metavar="FILE", help="default: RUN_DIR/<model><extension>")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export(args.run_dir, args.format, args.model, args.out)
    except (runs.RunError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result['path']} ({args.format}, {args.model} network of {args.run_dir})")
    if result["skipped_check"]:
        print(f"not compared with the network: {result['skipped_check']}")
    else:
        print(f"loaded back: outputs match the network (max |difference| {result['max_abs_diff']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
