#!/usr/bin/env python
"""Export the ONNX graph of 2D DUAL-NET models beside their weights and name it in their cards.

    python scripts/export_onnx.py                      # the shipped dualnet_{mri,ct,us} models
    python scripts/export_onnx.py path/to/model.safetensors ...

For each model: the graphs of its eval forward and of its restoration branch on given NEB maps
(:func:`dualnet.onnx_backend.export_bytes`) are run by ONNX Runtime against PyTorch on random
inputs of a few sizes (refused above ``--tol`` in normalised units), written atomically to
``<stem>.onnx`` and ``<stem>.restore.onnx``, and the card gets its ``onnx`` entry (files,
SHA-256s, the weights' SHA-256 they were made from, the largest difference measured). Needs
the ``onnx`` and ``onnxruntime`` packages (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DualNetDenoise"))

from dualnet.io import atomic_write_bytes  # noqa: E402
from dualnet.modelfile import card_path, load_model, rewrite_card, sha256_file  # noqa: E402
from dualnet import onnx_backend  # noqa: E402

SHIPPED = [ROOT / "DualNetDenoise" / "dualnet" / "weights" / f"dualnet_{m}.safetensors" for m in ("mri", "ct", "us")]
#: (batch, height, width) of the inputs the graph is checked on: a tile, odd sizes, a thin strip
CHECK_SHAPES = ((2, 128, 128), (1, 87, 60), (3, 33, 17))


def largest_difference(model, graph: str, data: bytes, seed: int = 0) -> float:
    """Largest |ONNX Runtime - PyTorch| over the graph's outputs and :data:`CHECK_SHAPES`
    (normalised units). ``restore`` is fed the NEB maps of the forward pass, as inference does."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.inference_mode():
        for n, h, w in CHECK_SHAPES:
            x = torch.rand(n, model.input_channels, h, w, generator=gen)
            if graph == "restore":
                res = model(x)
                x = torch.cat([x, res["blind"], torch.log(res["sigma"]), res["gate"]], 1)
                ref = model.restore(x)
            else:
                ref = model(x)
            for name, got in zip(names, session.run(None, {"x": x.numpy()})):
                worst = max(worst, float(np.max(np.abs(ref[name].numpy() - got))))
    return worst


def export(weights: Path, tol: float) -> dict:
    """Export, check and register one model's graphs; returns its card entry."""
    model, card = load_model(weights, "cpu")
    model.onnx_graphs = None
    entry = {"weights_sha256": card["sha256"], "opset": onnx_backend.OPSET,
             "inputs": "x: (N, C, H, W) float32; C = the slices, the noise map (restore: then the NEB's "
                       "blind estimate, log sigma and gate map)",
             "graphs": {}}
    worst = 0.0
    for graph in onnx_backend.graphs_for(model, card):
        data = onnx_backend.export_bytes(model, graph)
        diff = largest_difference(model, graph, data)
        if not np.isfinite(diff) or diff > tol:
            raise SystemExit(f"{weights}: ONNX Runtime's {graph} differs from PyTorch by {diff:.3g} (> {tol:g}); "
                             "nothing written")
        worst = max(worst, diff)
        name = weights.stem + (".onnx" if graph == "forward" else f".{graph}.onnx")
        entry["graphs"][graph] = {"file": name, "data": data, "outputs": list(onnx_backend.output_names(model, graph))}
    outputs = []
    for g in entry["graphs"].values():
        target = weights.parent / g["file"]
        atomic_write_bytes(target, g.pop("data"), inputs=[weights, card_path(weights)])
        g["sha256"] = sha256_file(target)
        outputs.append(target)
    entry["max_abs_diff_vs_torch"] = float(f"{worst:.3g}")
    card["onnx"] = entry
    rewrite_card(weights, card, outputs=outputs)  # key order and indent kept
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="*", type=Path, help="model .safetensors files (default: the shipped ones)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest accepted difference (normalised units)")
    args = ap.parse_args()
    for weights in args.weights or SHIPPED:
        entry = export(weights, args.tol)
        files = ", ".join(f"{g['file']} ({g['sha256'][:12]})" for g in entry["graphs"].values())
        print(f"{weights.name}: {files}; largest difference {entry['max_abs_diff_vs_torch']:.2g}")


if __name__ == "__main__":
    main()
