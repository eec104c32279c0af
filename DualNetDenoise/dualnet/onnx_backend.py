"""ONNX Runtime for the deterministic CPU forward pass of a 2D DUAL-NET.

On the project's 2-core CPU (AVX2, no BF16) ONNX Runtime runs the shipped 2.5D networks 15-25 %
faster per slice than PyTorch in isolation, with the same results (largest difference about 1e-6
in normalised units; ``docs/design_sweep.md``, session 13), and without importing PyTorch
(:class:`GraphNet`). A model ships its graphs beside its weights:

- ``dualnet_mri.onnx`` (the forward pass) and ``dualnet_mri.restore.onnx`` (the restoration branch
  on given NEB maps) next to ``dualnet_mri.safetensors``, exported by ``scripts/export_onnx.py``
  from those weights (``torch.onnx`` needs the ``onnx`` package; running them needs only
  ``onnxruntime``);
- the card's ``onnx`` entry: ``{weights_sha256, opset, graphs: {forward: {file, sha256}, restore:
  {...}}, ...}``.

The graphs are untrusted input like the weights: :func:`attach` (called by
:func:`dualnet.modelfile.load_model`) refuses one whose SHA-256 differs from the card's, and
ignores, with a warning, graphs exported from other weights (``weights_sha256``). The network
they are attached to keeps a fingerprint of its parameters; :func:`forward_for` hands out a graph
only while they are unchanged (a model fine-tuned in memory falls back to PyTorch), for a 2D
model on the CPU, in eval mode (Monte-Carlo dropout passes run in PyTorch), and when
``onnxruntime`` can be imported. ``DUALNET_BACKEND=torch`` turns it off.

Tensors are (N, C, H, W): ``C`` = the model's ``input_channels`` (slices, then the noise map).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import ModelError

#: the graphs a model ships: its forward pass, and the restoration branch on given NEB maps
#: (:meth:`dualnet.models.dualnet.DualNet.restore`, for the second and third orthogonal views)
GRAPHS = ("forward", "restore")
#: the forward graph's outputs, in this order (without an NEB: ``out`` only)
OUTPUTS_NEB = ("out", "sigma", "alpha", "blind", "gate")
OPSET = 17
#: environment switch: "torch" = never use the graphs
BACKEND_ENV = "DUALNET_BACKEND"


def available() -> bool:
    """Whether ONNX Runtime can be imported and is not switched off (``DUALNET_BACKEND=torch``)."""
    if os.environ.get(BACKEND_ENV, "").strip().lower() == "torch":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def fingerprint(model: Any) -> str:
    """Digest of a network's parameters and buffers (its state dict, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for key, val in model.state_dict().items():
        h.update(key.encode())
        h.update(val.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def graphs_for(model: Any, card: Optional[Dict[str, Any]] = None) -> Tuple[str, ...]:
    """The graphs this network ships: ``restore`` for a model with an NEB that runs orthogonal
    views (:func:`dualnet.orthoviews.model_allows`; ultrasound frames have one view)."""
    from .orthoviews import model_allows

    return GRAPHS if getattr(model, "neb", None) is not None and model_allows(card) else GRAPHS[:1]


def output_names(model: Any, graph: str = "forward") -> Tuple[str, ...]:
    """A graph's outputs for this network."""
    if graph == "restore" or getattr(model, "neb", None) is None:
        return ("out",)
    return OUTPUTS_NEB


def input_channels(model: Any, graph: str = "forward") -> int:
    """A graph's input channels: the model's, plus the NEB maps for ``restore``."""
    from .presets import NEB_MAPS

    return int(model.input_channels) + (len(NEB_MAPS) if graph == "restore" else 0)


def graph_supported(arch: Dict[str, Any]) -> bool:
    """Whether an architecture config has ONNX graphs here: a 2D DUAL-NET without the SR head."""
    return arch.get("kind") == "dualnet" and int(arch.get("dim", 2)) == 2 and not arch.get("sr")


def export_bytes(model: Any, graph: str = "forward", example_hw: Tuple[int, int] = (37, 45)) -> bytes:
    """The ONNX graph of a 2D DUAL-NET's eval ``forward`` or ``restore``, (N, C, H, W) with N, H, W
    dynamic.

    The example size is odd, so never a multiple of the network's stride: the padding to
    one is traced with the size as a variable (any H, W runs). Needs the ``onnx`` package.
    """
    import torch

    if not graph_supported(getattr(model, "config", {}) or {}):
        raise ModelError("an ONNX graph is made for 2D DUAL-NET models without the SR head only")
    if graph not in GRAPHS or (graph == "restore" and getattr(model, "neb", None) is None):
        raise ModelError(f"no {graph!r} graph for this model")
    names = output_names(model, graph)

    class _Outputs(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            res = self.net.restore(x) if graph == "restore" else self.net(x)
            return tuple(res[k] for k in names)

    was_training = model.training
    model.eval()
    x = torch.rand(1, input_channels(model, graph), *example_hw)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the size checks
            torch.onnx.export(_Outputs(model), (x,), buf, input_names=["x"], output_names=list(names),
                              dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, opset_version=OPSET,
                              dynamo=False)
    finally:
        model.train(was_training)
    return buf.getvalue()


class OnnxGraphs:
    """Checked graphs (name -> the bytes whose SHA-256 was checked, and the file they came from)
    attached to the network they were exported from. The sessions are made from those bytes, not
    from the file read again later (it may have been replaced since)."""

    def __init__(self, graphs: Dict[str, Tuple[Path, bytes]], model_fingerprint: Optional[str]) -> None:
        self.paths = {k: Path(path) for k, (path, _) in graphs.items()}
        self._data = {k: data for k, (_, data) in graphs.items()}
        self.fingerprint = model_fingerprint
        self._sessions: Dict[Tuple[str, int], Any] = {}

    def session(self, graph: str, threads: int) -> Any:
        """An ONNX Runtime session of ``graph`` with ``threads`` intra-op threads (made once)."""
        key = (graph, max(1, int(threads)))
        if key not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = key[1]
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._sessions[key] = ort.InferenceSession(self._data[graph], opts,
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]


def check_graphs(weights_path: Path, card: Dict[str, Any]) -> Optional[Dict[str, Tuple[Path, bytes]]]:
    """The graph files the card names beside ``weights_path``, each read once and checked against
    its SHA-256 (name -> (path, bytes)); None without an ``onnx`` entry, or (with a warning) when a
    file is missing or the graphs were exported from other weights.

    Raises:
        ModelError: the entry is malformed, or a file's SHA-256 differs from the card's.
    """
    import hashlib

    from .modelfile import card_path

    entry = card.get("onnx")
    if entry is None:
        return None
    where = card_path(weights_path)
    graphs = entry.get("graphs") if isinstance(entry, dict) else None
    if not isinstance(graphs, dict) or not graphs or any(
            k not in GRAPHS or not isinstance(g, dict) or not all(isinstance(g.get(f), str) for f in ("file", "sha256"))
            for k, g in graphs.items()):
        raise ModelError(f"{where}: card 'onnx' entry needs 'graphs' of {GRAPHS}, each with 'file' and 'sha256'")
    paths = {}
    for name, g in graphs.items():
        file = g["file"]
        if Path(file).name != file or not file.endswith(".onnx"):
            raise ModelError(f"{where}: card 'onnx' file must be a .onnx file name beside the weights, got {file!r}")
        path = Path(weights_path).parent / file
        if not path.is_file():
            warnings.warn(f"{path}: ONNX graph named by the card is missing; running the network in PyTorch")
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != g["sha256"].lower():
            raise ModelError(f"{path}: SHA-256 mismatch with its card (file corrupt or tampered)")
        paths[name] = (path, data)
    if str(entry.get("weights_sha256", "")).lower() != str(card.get("sha256", "")).lower():
        warnings.warn(f"{where}: its ONNX graphs were exported from other weights; running the network in "
                      "PyTorch (re-export them with scripts/export_onnx.py)")
        return None
    return paths


def attach(model: Any, weights_path: Path, card: Dict[str, Any]) -> Optional[OnnxGraphs]:
    """Check the card's graphs (:func:`check_graphs`) and attach them to the PyTorch ``model``
    (``model.onnx_graphs``, with the fingerprint of its parameters); None when there are none."""
    paths = check_graphs(weights_path, card)
    model.onnx_graphs = None if paths is None else OnnxGraphs(paths, fingerprint(model))
    return model.onnx_graphs


class GraphNet:
    """A shipped 2D DUAL-NET as its checked ONNX graphs alone: what inference needs of a network
    (architecture, input channels, eval mode), with no PyTorch import (:func:`load_graph_net`).
    It runs only through :func:`forward_for`; Monte-Carlo dropout and training need the PyTorch
    network (:func:`dualnet.modelfile.load_model`)."""

    training = False

    def __init__(self, card: Dict[str, Any], paths: Dict[str, Tuple[Path, bytes]]) -> None:
        self.config = dict(card["architecture"])
        self.neb = True if self.config.get("use_neb", True) else None
        self.onnx_graphs = OnnxGraphs(paths, None)

    @property
    def input_channels(self) -> int:
        from .presets import input_channels

        return input_channels(self.config)

    def eval(self) -> "GraphNet":
        return self

    def train(self, mode: bool = True) -> "GraphNet":
        if mode:
            raise ModelError("a network loaded as its ONNX graphs cannot train; load it with dualnet.modelfile.load_model")
        return self


def load_graph_net(weights_path: Path, card: Dict[str, Any]) -> Optional[GraphNet]:
    """The card's checked graphs as a :class:`GraphNet` (None where there is no usable forward graph,
    the model is not a 2D DUAL-NET, or ONNX Runtime cannot run: the caller loads it with PyTorch)."""
    if not available() or not graph_supported(card.get("architecture") or {}):
        return None
    paths = check_graphs(weights_path, card)
    if paths is None or "forward" not in paths:
        return None
    return GraphNet(card, paths)


def can_restore(model: Any) -> bool:
    """Whether ``model`` can run the restoration branch on given NEB maps (orthogonal views)."""
    if getattr(model, "neb", None) is None:
        return False
    if isinstance(model, GraphNet):
        return "restore" in model.onnx_graphs.paths
    return hasattr(model, "restore")


def forward_for(model: Any, dev: Any, threads: Optional[int], graph: str = "forward"
                ) -> Optional[Callable[[Any], Dict[str, Any]]]:
    """A function running ``model`` (``graph = "forward"``) or ``model.restore`` in eval mode on a
    float32 (N, C, H, W) numpy batch through the attached graph on the CPU, returning float32 numpy
    maps by name; None where PyTorch must run it (no such graph, not the CPU, ONNX Runtime missing or
    switched off, or the network's parameters changed since the graphs were attached)."""
    graphs = getattr(model, "onnx_graphs", None)
    if graphs is None or graph not in graphs.paths or getattr(dev, "type", str(dev)) != "cpu" \
            or not available():
        return None
    if graphs.fingerprint is not None and fingerprint(model) != graphs.fingerprint:
        return None
    import numpy as np

    session = graphs.session(graph, int(threads or 1))
    names = [o.name for o in session.get_outputs()]

    def run(x: Any) -> Dict[str, Any]:
        return dict(zip(names, session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})))

    return run
