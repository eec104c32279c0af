"""Training loops: supervised synthetic pretraining and self-supervised fine-tuning.

``pretrain(config, out_dir=...)`` trains DUAL-NET (or the DnCNN / Noise2Void baselines, chosen by
``config.model``) on clean scans degraded on the fly; ``finetune(inputs, base_model_path,
out_path, config)`` adapts a trained model to real noisy scans with Noise2Void/Noise2Self masking.

Both share one engine:

* AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr``; gradient clipping; bf16
  autocast on CUDA (``amp``); early stopping on validation SSIM (``patience`` rounds).
* Checkpoints (``checkpoint.pt`` in ``out_dir``) are written atomically (temporary file +
  ``os.replace``) every ``checkpoint_every`` steps, on cancel (``CancelToken``) and on
  SIGINT/SIGTERM (handlers installed only in the main thread and restored afterwards). They hold
  model, optimiser, scheduler and RNG states, the step, the best-validation weights, the log and a
  SHA-256 of all of it (checked on resume, with the step range and finite weights), and are read
  with ``torch.load(weights_only=True)`` only. Temporaries of a killed run are removed by the next
  save. A second Ctrl-C within a second of the first is taken as one; later, it stops at once.
  Every batch and every dropout mask is a deterministic function of ``(seed, rank, step)``, so
  ``resume`` continues exactly.
* Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
  ``DistributedDataParallel`` (gloo on CPU, nccl on CUDA), each rank draws its own batches
  (per-rank seeds) and only rank 0 validates, logs, checkpoints and exports.
* Outputs in ``out_dir``: ``config.toml``, ``checkpoint.pt``, ``train_log.csv`` (step, loss
  terms, lr, val PSNR/SSIM, seconds), ``loss_curve.png`` and the exported model
  (``model.safetensors`` + JSON card via :func:`dualnet.modelfile.save_model`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..errors import CancelledError, InputError, ModelError
from ..progress import CancelToken, ProgressFn, report
from .config import TrainConfig, default_data_dir
from .run_fingerprint import fingerprint_changes, run_fingerprint
from .stop_request import STOP_FILE, clear_stop, stop_requested
from . import data as tdata
from .weight_average import WeightAverage, maybe_applied

CHECKPOINT_FORMAT = "dualnet-checkpoint"
#: 2: the checkpoint carries ``sha256``, a digest of all its other entries, checked on resume.
#: 3: and ``fingerprint``, what the run trains (:mod:`.run_fingerprint`), which a resumed run must match.
CHECKPOINT_VERSION = 3
CHECKPOINT_NAME = "checkpoint.pt"
LOG_COLUMNS = ["step", "loss", "mse", "views", "l1", "ssim", "edge", "blind", "neb", "alpha", "sr", "n2v", "consistency", "tv",
               "anchor", "sure", "lr", "val_psnr", "val_psnr_pooled", "val_ssim", "val_loss", "seconds"]
PROGRESS_PREFIX = "DUALNET_PROGRESS"


@dataclass
class TrainResult:
    """What a training run produced (paths are ``None`` on non-zero DDP ranks)."""

    out_dir: Path
    model_path: Optional[Path]
    checkpoint_path: Optional[Path]
    log_path: Optional[Path]
    curve_path: Optional[Path]
    steps: int
    first_loss: float
    last_loss: float
    val_psnr: Optional[float]
    val_ssim: Optional[float]
    val_loss: Optional[float]
    best_step: int
    seconds: float
    stopped_early: bool = False
    card: Dict[str, Any] = field(default_factory=dict)
    #: fine-tuning: the whole-scan check kept the base model (:mod:`dualnet.training.base_check`)
    kept_base: bool = False


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str):
    """``torch.device`` for ``"auto" | "cpu" | "cuda[:N]" | "mps"`` (InputError if unavailable)."""
    import torch

    if name in ("", "auto", None):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return dev


def hardware_info(device, cfg: Optional[TrainConfig] = None) -> Dict[str, Any]:
    """CPU / GPU description for the model card (with ``cfg``: whether the CPU steps ran in bf16)."""
    import torch

    info: Dict[str, Any] = {"device": str(device), "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if cfg is not None and device.type == "cpu" and cpu_bf16_on(cfg):
        info["cpu_bf16"] = True  # the training steps ran under bf16 autocast
    return info


def lr_lambda(cfg: TrainConfig, horizon: Optional[Dict[str, int]] = None) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a step: linear warm-up, then cosine to ``min_lr_ratio``.

    ``horizon["total"]`` (mutable, default ``cfg.steps``) is the step count the cosine reaches its
    floor at; a time budget may shorten it during the run.
    """
    warm, floor = max(0, cfg.warmup_steps), cfg.min_lr_ratio
    horizon = horizon if horizon is not None else {"total": cfg.steps}

    def f(step: int) -> float:
        total = max(1, int(horizon["total"]))
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rank), int(step), 7]).generate_state(1, np.uint64)[0] % (2**63 - 1))


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    import torch

    from ..io import atomic_path

    from ..io import check_output_path

    path = check_output_path(path, formats=None)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def checkpoint_digest(ck: Dict[str, Any]) -> str:
    """SHA-256 over every entry of a checkpoint except ``sha256`` (tensor bytes, dtypes, shapes,
    numbers, strings, in key order): a flipped byte or an edited step changes it."""
    import hashlib

    h = hashlib.sha256()
    _digest_into(h, {k: v for k, v in ck.items() if k != "sha256"})
    return h.hexdigest()


def _digest_into(h, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}=".encode())
            _digest_into(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for item in obj:
            _digest_into(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def stopped_run_step(run_dir: Union[str, Path]) -> Optional[int]:
    """The step at which the run whose checkpoint is in ``run_dir`` stopped before its end (cancelled,
    killed by a signal, out of time), or None: no checkpoint, a finished run's (its model was exported:
    a new run may replace it), or one that cannot be read (nothing to resume)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        ck = load_checkpoint(path)
    except ModelError:
        return None
    step, total = int(ck["step"]), int(ck.get("total_steps", json.loads(ck["config"]).get("steps", 0)))
    return None if ck.get("finished") or step >= total else step


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a training checkpoint with ``torch.load(weights_only=True)`` and check it.

    Checks: the digest of its contents (version 2+; :func:`checkpoint_digest`), a step in
    ``0..config.steps``, valid JSON config / architecture / log, finite weights.

    Raises:
        ModelError: one line naming the file when it is missing, corrupt, edited or not a checkpoint.
    """
    from ..modelfile import check_finite_weights, safe_torch_load

    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no checkpoint to resume from")
    ck = safe_torch_load(p, "checkpoint (corrupt or unsafe)")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{p}: not a dualnet training checkpoint")
    version = ck.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ModelError(f"{p}: checkpoint version {version!r} is newer than this dualnet")
    for key in ("model", "optimizer", "scheduler", "step", "config", "arch"):
        if key not in ck:
            raise ModelError(f"{p}: checkpoint lacks '{key}'")
    if version >= 2 and ck.get("sha256") != checkpoint_digest(ck):
        raise ModelError(f"{p}: checkpoint corrupt or edited (its contents do not match its SHA-256)")
    config = _json_entry(ck, "config", p, dict)
    _json_entry(ck, "arch", p, dict)
    if version >= 3:
        _json_entry(ck, "fingerprint", p, dict)
    _json_entry(ck, "log", p, list, "[]")
    step, steps = ck["step"], config.get("steps")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ModelError(f"{p}: invalid step {step!r} in checkpoint (must be an integer >= 0)")
    if isinstance(steps, int) and step > steps:
        raise ModelError(f"{p}: checkpoint step {step} exceeds its run length of {steps} steps")
    for key in ("model", "best_model", "ema"):
        if not isinstance(ck.get(key, {}), dict):
            raise ModelError(f"{p}: checkpoint entry '{key}' is not a state dict")
        check_finite_weights(ck.get(key) or {}, f"{p} ({key})")
    return ck


def _json_entry(ck: Dict[str, Any], key: str, path: Path, kind: type, default: str = "") -> Any:
    """A JSON-encoded checkpoint entry, decoded and of type ``kind``; ModelError otherwise."""
    text = ck.get(key, default)
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        raise ModelError(f"{path}: checkpoint '{key}' is not valid JSON") from None
    if not isinstance(value, kind):
        raise ModelError(f"{path}: checkpoint '{key}' is not a JSON {kind.__name__}")
    return value


class _SignalStop:
    """SIGINT / SIGTERM (/ SIGBREAK) -> a stop flag (main thread only); previous handlers restored on exit."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.signame = ""
        self._first = 0.0
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "_SignalStop":
        if threading.current_thread() is threading.main_thread():  # SIGBREAK: a Windows CTRL_BREAK (the panel)
            for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])):
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                    pass
        return self

    #: A second Ctrl-C sooner than this after the first is a double press, not "stop at once".
    REPEAT_S = 1.0

    def _handler(self, signum, frame) -> None:  # noqa: ANN001
        now = time.monotonic()
        if self.flag.is_set():
            if signum == signal.SIGINT and now - self._first > self.REPEAT_S:
                raise KeyboardInterrupt  # a deliberate second Ctrl-C: stop at once
            return
        self._first = now
        self.signame = signal.Signals(signum).name
        self.flag.set()

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):  # pragma: no cover
                pass


class _Dist:
    """torch.distributed state: initialised here when ``WORLD_SIZE > 1`` and not yet set up."""

    def __init__(self, device_name: str) -> None:
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owned = False
        self.rank = 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            if not dist.is_initialized():
                use_cuda = torch.cuda.is_available() and device_name not in ("cpu",)
                if use_cuda:
                    torch.cuda.set_device(self.local_rank)
                dist.init_process_group("nccl" if use_cuda else "gloo")
                self.owned = True
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, device_name: str):
        import torch

        dev = resolve_device(device_name)
        if self.active and dev.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return dev

    def max_flag(self, value: int, device) -> int:
        """All-reduce (max) of an int flag across ranks."""
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=device if self.backend_cuda() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def backend_cuda(self) -> bool:
        import torch.distributed as dist

        return self.active and dist.get_backend() == "nccl"

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# model building / card
# ---------------------------------------------------------------------------------------------
def build_network(cfg: TrainConfig):
    """The network named by ``cfg.model`` (DUAL-NET or a baseline) for ``cfg.dim``."""
    import torch

    from .. import models

    torch.manual_seed(int(cfg.seed))  # same initial weights for the same seed (and on every rank)
    if cfg.model == "dualnet":
        return models.build_model(cfg.preset, cfg.dim, sr=cfg.sr, use_neb=cfg.use_neb,
                                  use_nonlocal=cfg.use_nonlocal, dropout=cfg.dropout,
                                  context=cfg.context, noise_map=cfg.noise_map,
                                  dropout_mode=cfg.dropout_mode, confidence_head=cfg.confidence_head,
                                  blocks=cfg.blocks or None)
    return models.build_baseline(cfg.model, cfg.dim, cfg.preset)


def architecture_of(model) -> Dict[str, Any]:
    """The architecture dict of ``model`` (``model.config`` when the network provides one)."""
    cfg = getattr(model, "config", None)
    return dict(cfg) if isinstance(cfg, dict) else {"class": type(model).__name__}


def _data_sources(cfg: TrainConfig, data_dir: Optional[Path], images: Sequence[tdata.CleanImage],
                  in_memory: bool) -> List[Dict[str, Any]]:
    table = tdata.licences_from_readme(data_dir)
    out = []
    if in_memory or not cfg.data:
        names = sorted({im.name for im in images})
        for n in names[:50]:
            row = tdata.licence_for(n, table)
            out.append({"path": n, "licence": row.get("licence", "unknown (supplied by the user)"),
                        "source": row.get("source", "")})
        return out
    for src in cfg.data:
        row = tdata.licence_for(src.path, table)
        item = {"path": src.path, "split": src.split, "licence": src.licence or row.get("licence", "unknown"),
                "source": row.get("source", "")}
        if src.frames:
            item["frames"] = list(src.frames)
        if src.frame is not None:
            item["frame"] = src.frame
        if src.crop:
            item["crop"] = list(src.crop)
        if src.brain_mask:
            item["brain_mask"] = list(src.brain_mask)
            item["skull_stripped"] = "outside the brain set to exactly 0 (dualnet.training.skull_strip)"
        if src.coarsen:
            item["coarsen"] = list(src.coarsen)
        if src.weight != 1.0:
            item["weight"] = float(src.weight)
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def _print_progress(payload: Dict[str, Any]) -> None:
    """One ``DUALNET_PROGRESS {json}`` line (``--progress-json``; the Slicer panel reads them)."""
    print(f"{PROGRESS_PREFIX} {json.dumps(payload, separators=(',', ':'))}", flush=True)


class _Run:
    """State of one training run (shared by :func:`pretrain` and :func:`finetune`)."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, *, selfsup: bool, masked: bool,
                 progress: Optional[ProgressFn], cancel: Optional[CancelToken], progress_json: bool,
                 show_bar: bool, command: Optional[str]) -> None:
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.selfsup, self.masked = selfsup, masked
        self.progress, self.cancel = progress, cancel
        self.progress_json, self.show_bar, self.command = progress_json, show_bar, command
        self.rows: List[Dict[str, Any]] = []
        self.best_score = -math.inf
        self.best_step = 0
        self.bad_rounds = 0
        self.best_state: Optional[Dict[str, Any]] = None
        self.elapsed_before = 0.0
        self.last_val: Dict[str, float] = {}

    # -- output ---------------------------------------------------------------------------------
    def emit(self, payload: Dict[str, Any]) -> None:
        if self.progress_json:
            _print_progress(payload)

    def write_log(self) -> Path:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                        for k in LOG_COLUMNS})
        from ..io import atomic_write_bytes

        return atomic_write_bytes(self.out_dir / "train_log.csv", buf.getvalue().encode())

    def plot(self) -> Optional[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except Exception:  # pragma: no cover - matplotlib missing
            return None
        steps = [r["step"] for r in self.rows if r.get("loss") is not None]
        loss = [r["loss"] for r in self.rows if r.get("loss") is not None]
        vs = [(r["step"], r["val_ssim"]) for r in self.rows if r.get("val_ssim") is not None]
        vl = [(r["step"], r["val_loss"]) for r in self.rows if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, loss, lw=1, label="training loss")
        if loss and min(loss) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if vs or vl:
            ax2 = ax.twinx()
            pts, lab = (vs, "val SSIM") if vs else (vl, "val self-supervised loss")
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:red", ms=3, label=lab)
            ax2.set_ylabel(lab)
        ax.set_title(f"{self.cfg.model} {self.cfg.modality} {self.cfg.preset} {self.cfg.dim}D ({self.cfg.stage})")
        fig.tight_layout()
        from ..io import save_figure

        try:
            return save_figure(fig, self.out_dir / "loss_curve.png")
        finally:
            plt.close(fig)


def _to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _evaluate(model, val: Dict[str, Any], cfg: TrainConfig, device, selfsup: bool, masked: bool,
              anchor_model=None) -> Dict[str, float]:
    """Validation on the fixed set: PSNR / SSIM against the clean patches (when known; whole patch,
    normalised units, data range 1 = the normalisation window: MRI p0.5..p99.5 of the volume,
    CT -1000..1000 HU, US 0..255) and the masked self-supervised loss (when masking)."""
    import torch

    from .losses import floor_output, psnr_t, selfsup_loss, ssim, sure_input

    was_training = model.training
    model.eval()
    res: Dict[str, float] = {}
    n = next(iter(val.values())).shape[0]
    bs = max(1, min(n, cfg.batch_size))
    psnrs, ssims, sslosses, sq_err = [], [], [], {}
    with torch.no_grad():
        for i in range(0, n, bs):
            b = {k: torch.as_tensor(v[i:i + bs]).to(device) for k, v in val.items()}
            sure = selfsup and not masked and "var" in b  # fp32, as in the training steps
            with contextlib.nullcontext() if sure else _autocast(cfg, device):
                o = model(tdata.network_input(b))
            pred = floor_output(o["out"].float(), b, cfg)
            if "clean" in b:  # data range 1 = the normalisation window (MRI p0.5-p99.5, CT 2000 HU, US 255)
                dr = torch.ones(b["clean"].shape[0], device=pred.device)
                psnrs.append(psnr_t(pred, b["clean"], dr).cpu())
                if "level" in b:  # squared error summed per level (pooled PSNR)
                    se = ((pred - b["clean"]) ** 2).flatten(1)
                    for lev, e in zip(b["level"].tolist(), se.sum(1).tolist()):
                        tot = sq_err.setdefault(round(float(lev), 8), [0.0, 0])
                        tot[0] += e
                        tot[1] += se.shape[1]
                ssims.append(ssim(pred, b["clean"], data_range=dr, reduction="none").cpu())
            if masked and "mask" in b:
                with _autocast(cfg, device):
                    om = model(tdata.network_input(b, b["input"]))
                    anc = anchor_model(tdata.network_input(b, b["input"]))["out"] if anchor_model is not None else None
                om = {k: (v.float() if v is not None else None) for k, v in om.items()}
                loss, _ = selfsup_loss(om, b, cfg, anchor=anc)
                sslosses.append(float(loss) * b["noisy"].shape[0])
            elif selfsup and "var" in b:  # SURE: estimated MSE to the clean patches (fixed probe)
                gen = torch.Generator().manual_seed(int(cfg.seed) + i)
                b["probe"] = torch.randn(b["noisy"].shape, generator=gen).to(device)
                pe = model(tdata.network_input(b, sure_input(b, cfg)))["out"].float()
                anc = anchor_model(tdata.network_input(b))["out"] if anchor_model is not None else None
                om = {k: (v.float() if v is not None else None) for k, v in o.items()}
                loss, _ = selfsup_loss(om, b, cfg, anchor=anc, perturbed=pe)
                sslosses.append(float(loss) * b["noisy"].shape[0])
    if psnrs:
        res["val_psnr"] = float(torch.cat(psnrs).mean())
        res["val_ssim"] = float(torch.cat(ssims).mean())
    if sq_err:
        res["val_psnr_pooled"] = pooled_psnr(sq_err)
    if sslosses:
        res["val_loss"] = float(sum(sslosses) / n)
    model.train(was_training)
    return res


def pooled_psnr(sq_err: Dict[float, List[float]]) -> float:
    """Mean over the noise levels of ``-10 log10(MSE)``, the MSE pooled over each level's patches
    (``{level: [summed squared error, voxels]}``, data range 1): what a whole-image PSNR measures,
    background included, rather than the mean of the patches' PSNRs."""
    return float(np.mean([-10.0 * math.log10(max(e / max(m, 1), 1e-20)) for e, m in sq_err.values()]))


def _snapshot(model) -> Dict[str, Any]:
    """A CPU copy of ``model``'s weights (the best-so-far state ``export_best`` exports)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _score(res: Dict[str, float], cfg: TrainConfig) -> float:
    """The validation score ``export_best`` / ``patience`` maximise (``cfg.select_on``)."""
    key = {"psnr": "val_psnr", "psnr_pooled": "val_psnr_pooled"}.get(cfg.select_on, "val_ssim")
    return res[key] if key in res else -res.get("val_loss", 0.0)


def _autocast(cfg: TrainConfig, device, *, training: bool = False):
    """bf16 autocast on CUDA (``cfg.amp``), and on CPU for the training steps (``cfg.cpu_bf16``)."""
    import torch

    if cfg.amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if training and device.type == "cpu" and cpu_bf16_on(cfg):
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_bf16_on(cfg: TrainConfig) -> bool:
    """Whether the CPU training steps run in bf16: ``cfg.cpu_bf16``, "auto" resolved on this host."""
    from ..device import cpu_has_fast_bf16

    return cfg.cpu_bf16 is True or (cfg.cpu_bf16 == "auto" and cpu_has_fast_bf16())


def _train(cfg: TrainConfig, model, train_images, val_images, out_dir: Path, *, selfsup: bool, masked: bool,
           progress: Optional[ProgressFn], cancel: Optional[CancelToken], resume: Union[bool, str, Path, None],
           progress_json: bool, show_bar: bool, command: Optional[str], card_extra: Dict[str, Any],
           export_path: Optional[Path], anchor_model=None, data_dir: Optional[Path] = None,
           in_memory: bool = False, protected: Sequence[Union[str, Path]] = ()) -> TrainResult:
    import torch

    from .losses import selfsup_loss, supervised_loss, sure_input
    from .gain_tuning import fold_gains, has_gains

    t_start = time.time()
    dist_state = _Dist(cfg.device)
    try:
        device = dist_state.device(cfg.device)
        rank, world = dist_state.rank, dist_state.world
        is_main = rank == 0
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        dist_state.barrier()
        ck_path = out_dir / CHECKPOINT_NAME
        stopped = None if resume else stopped_run_step(out_dir)
        if stopped is not None:  # never replace a stopped run's checkpoint
            raise InputError(f"{out_dir} holds the checkpoint of a run stopped at step {stopped}: "
                             "resume it (--resume), or start this run in another folder (or delete that one)")
        if is_main:
            clear_stop(out_dir)  # a request left by an earlier run is not for this one
        run = _Run(cfg, out_dir, selfsup=selfsup, masked=masked, progress=progress if is_main else None,
                   cancel=cancel, progress_json=progress_json and is_main, show_bar=show_bar and is_main,
                   command=command)

        model = model.to(device)
        if cfg.dim == 2 and torch.device(device).type == "cpu":  # 22 % faster steps here (docs/design_sweep.md)
            model = model.to(memory_format=torch.channels_last)
        elif cfg.dim == 3 and torch.device(device).type == "cpu" and cpu_bf16_on(cfg):
            model = model.to(memory_format=torch.channels_last_3d)  # bf16 3D steps 1.4x faster (session 18)
        model.train()
        if anchor_model is not None:
            anchor_model = anchor_model.to(device).eval()
            for p in anchor_model.parameters():
                p.requires_grad_(False)
        if cfg.train_only:  # e.g. a new confidence head on a trained model: the rest stays as it is
            for name, p in model.named_parameters():
                p.requires_grad_(any(name.startswith(pre) for pre in cfg.train_only))
            if not any(p.requires_grad for p in model.parameters()):
                raise InputError(f"train_only {cfg.train_only}: no parameter of the model has these prefixes")
        new = set(card_extra.get("initialised_from", {}).get("transplant", {}).get("new", ()))
        opt = torch.optim.AdamW(param_groups(model, cfg, new), lr=cfg.lr)
        horizon = {"total": int(cfg.steps)}
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, horizon))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        arch = architecture_of(model)
        fingerprint = run_fingerprint(cfg, train_images, val_images, selfsup=selfsup, masked=masked)
        start = 0
        average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

        # ---- resume
        if resume:
            rp = Path(resume) if isinstance(resume, (str, Path)) and not isinstance(resume, bool) else ck_path
            if rp.is_dir():
                rp = rp / CHECKPOINT_NAME
            ck = load_checkpoint(rp)
            if json.loads(ck["arch"]) != json.loads(json.dumps(arch)):
                raise ModelError(f"{rp}: checkpoint architecture {ck['arch']} does not match the configured model")
            changes = fingerprint_changes(json.loads(ck["fingerprint"]), fingerprint) if "fingerprint" in ck else []
            if changes:
                raise InputError(f"{rp}: this run trains other settings or data than the checkpoint's run "
                                 f"({'; '.join(changes[:6])}{'; ...' if len(changes) > 6 else ''}): resume it with "
                                 "its own config and data, or start a new run in another folder")
            try:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                sched.load_state_dict(ck["scheduler"])
                if average is not None:  # a run that had none starts its average at the resumed weights
                    average = WeightAverage(model, cfg.ema_decay, ck.get("ema") or None)
            except (RuntimeError, ValueError, KeyError) as err:
                raise ModelError(f"{rp}: incompatible checkpoint ({str(err).splitlines()[0][:160]})") from None
            start = int(ck["step"])
            ck_steps = json.loads(ck["config"]).get("steps", cfg.steps)
            # same run length: keep the (possibly time-budget-shortened) horizon; --steps override wins
            horizon["total"] = int(ck.get("total_steps", cfg.steps)) if ck_steps == cfg.steps else int(cfg.steps)
            run.rows = json.loads(ck.get("log", "[]"))
            run.best_score = float(ck.get("best_score", -math.inf))
            run.best_step = int(ck.get("best_step", 0))
            run.bad_rounds = int(ck.get("bad_rounds", 0))
            run.elapsed_before = float(ck.get("elapsed", 0.0))
            run.best_state = ck.get("best_model") or None
            if isinstance(ck.get("rng_torch"), torch.Tensor):
                torch.set_rng_state(ck["rng_torch"])
            if is_main:
                report(progress, start / max(1, cfg.steps), f"resumed from {rp} at step {start}")

        ddp_model = model
        if dist_state.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                            find_unused_parameters=True)

        sampler = tdata.PatchSampler(train_images, cfg, rank=rank, selfsup=selfsup, masked=masked)
        val_set = None
        card_input_val: Dict[str, float] = {}
        if is_main:
            vs = tdata.PatchSampler(val_images, cfg, rank=0, selfsup=selfsup, masked=masked,
                                    min_foreground=cfg.val_min_foreground if cfg.val_min_foreground >= 0 else None)
            val_set = vs.fixed_set(cfg.val_patches)
            cfg.save(out_dir / "config.toml")
            if "clean" in val_set:  # reference: the noisy input itself
                from .losses import psnr_t, ssim as _ssim

                nz, cl = torch.as_tensor(val_set["noisy"]), torch.as_tensor(val_set["clean"])
                one = torch.ones(nz.shape[0])
                card_input_val = {"input_psnr_db": float(psnr_t(nz, cl, one).mean()),
                                  "input_ssim": float(_ssim(nz, cl, data_range=one))}
            else:
                card_input_val = {}

        def save_checkpoint(step: int, finished: bool = False) -> Optional[Path]:
            if not is_main:
                return None
            # never replace the last good checkpoint with unusable weights (the run can resume from it)
            from ..modelfile import check_finite_weights

            weights = model.state_dict()
            check_finite_weights(weights, f"{ck_path} not updated at step {step}")
            state = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step),
                "model": weights, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng_torch": torch.get_rng_state(), "config": json.dumps(cfg.to_dict()), "arch": json.dumps(arch),
                "log": json.dumps(run.rows), "best_score": float(run.best_score), "best_step": int(run.best_step),
                "bad_rounds": int(run.bad_rounds), "elapsed": float(run.elapsed_before + time.time() - t_start),
                "best_model": run.best_state or {}, "selfsup": bool(selfsup), "total_steps": int(horizon["total"]),
                "ema": average.state_dict() if average is not None else {},
                "fingerprint": json.dumps(fingerprint),
                "finished": bool(finished),  # the run ended (its model is exported): a new run may replace it
                "np_rng_note": "batches are drawn from default_rng([seed, rank, step]); no numpy state needed",
            }
            state["sha256"] = checkpoint_digest(state)
            atomic_torch_save(state, ck_path)
            run.write_log()
            return ck_path

        bar = None
        if run.show_bar and cfg.steps > start:
            try:
                from tqdm import tqdm

                bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.modality}", unit="step",
                           dynamic_ncols=True, file=sys.stderr)
            except Exception:  # pragma: no cover
                bar = None

        if is_main and start == 0 and cfg.steps > 0:  # baseline validation before any update
            run.last_val = _evaluate(model, val_set, cfg, device, selfsup, masked, anchor_model)
            run.rows.append({"step": 0, "lr": float(sched.get_last_lr()[0]), "seconds": 0.0, **run.last_val})
            if cfg.init_from and not (cfg.init_partial or cfg.train_only):
                # a continuation of a whole model: its starting weights are a candidate for export_best
                # too (a run that only drifts exports them); not when parts start untrained or frozen
                run.best_score, run.best_step = _score(run.last_val, cfg), 0
                run.best_state = _snapshot(model)
            report(progress, 0.0, "initial validation: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                                   {**run.last_val, **card_input_val}.items()))

        loader = tdata.make_loader(sampler, start + 1, cfg.steps + 1, cfg.num_workers,
                                   pin_memory=device.type == "cuda")
        first_loss: Optional[float] = None
        last_loss = float("nan")
        acc: Dict[str, float] = {}
        acc_n = 0
        stopped_early = False
        step = start
        t_loop = time.time()
        stopper = _SignalStop()
        with stopper:
            it = iter(loader)
            t_calib: Optional[float] = None
            while step < horizon["total"]:
                # ---- stop requests (cancel token, signals), agreed by all ranks
                asked = stop_requested(out_dir)
                flag = 1 if ((cancel is not None and cancel.cancelled) or stopper.flag.is_set() or asked) else 0
                flag = dist_state.max_flag(flag, device)
                if flag:
                    path = save_checkpoint(step)
                    if is_main:
                        clear_stop(out_dir)
                    run.emit({"event": "cancelled", "step": step, "steps": horizon["total"], "checkpoint": str(ck_path)})
                    if bar is not None:
                        bar.close()
                    why = f"signal {stopper.signame}" if stopper.signame else \
                        f"a stop request ({out_dir / STOP_FILE})" if asked else "cancel request"
                    raise CancelledError(f"training stopped by {why} at step {step}/{horizon['total']}; "
                                         f"checkpoint saved to {path or ck_path} (continue with --resume)")
                try:
                    batch = next(it)
                except StopIteration:  # pragma: no cover - loader covers exactly the steps
                    break
                step += 1
                step_seed = _step_seed(cfg.seed, rank, step)
                torch.manual_seed(step_seed)  # dropout masks depend on the step only
                batch = _to_device(batch, device)
                sure = selfsup and not masked and cfg.ss_loss == "sure"
                # SURE's divergence is a difference of two outputs for inputs 1e-3 noise stds apart:
                # in bf16 (8 bits of mantissa) the step itself is rounded away, so SURE runs in fp32
                with contextlib.nullcontext() if sure else _autocast(cfg, device, training=True):
                    centre = batch["input"] if masked else batch["noisy"]
                    out = ddp_model(tdata.network_input(batch, centre))
                    perturbed = None
                    if sure:  # second pass at y + eps b with the SAME dropout masks
                        batch["probe"] = torch.randn_like(batch["noisy"])
                        torch.manual_seed(step_seed)
                        perturbed = ddp_model(tdata.network_input(batch, sure_input(batch, cfg)))["out"]
                    anc = None
                    if anchor_model is not None and cfg.lambda_anchor > 0:
                        with torch.no_grad():
                            anc = anchor_model(tdata.network_input(batch, centre))["out"]
                out = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
                if masked or sure:
                    loss, terms = selfsup_loss(out, batch, cfg, anchor=anc, perturbed=perturbed)
                else:
                    loss, terms = supervised_loss(out, batch, cfg)
                if not torch.isfinite(loss):
                    raise ModelError(f"training diverged at step {step} (loss {float(loss)}); lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # the gradient's norm (clipped to grad_clip when set): a finite loss can still give an
                # infinite gradient element, and one step with it puts NaN into every weight
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if not torch.isfinite(gnorm):
                    raise ModelError(f"training diverged at step {step} (gradient {float(gnorm)}); lower lr")
                opt.step()
                sched.step()
                if average is not None:
                    average.update(model, step)
                lv = float(loss.detach())
                # ---- time budget: after 40 timed steps, shorten the run (and its cosine) to fit
                # (also after a resume that came before it: the horizon is then still the full run)
                if cfg.time_budget_s > 0 and start < 50 and horizon["total"] == cfg.steps:
                    if step == start + 10:
                        t_calib = time.time()
                    elif step == start + 50 and t_calib is not None:
                        rate = (time.time() - t_calib) / 40.0
                        rate *= 1.0 + 0.5 * cfg.val_patches / max(1, cfg.batch_size * cfg.val_every)
                        left = cfg.time_budget_s - (run.elapsed_before + time.time() - t_start)
                        fit = step + max(1, int(left / max(rate, 1e-6)))
                        horizon["total"] = int(dist_state.max_flag(min(cfg.steps, fit), device))
                        if bar is not None:
                            bar.total = horizon["total"]
                        report(run.progress, step / max(1, horizon["total"]),
                               f"time budget {cfg.time_budget_s:.0f} s at {rate * 1000:.0f} ms/step: "
                               f"training {horizon['total']} of {cfg.steps} steps")
                        run.emit({"event": "budget", "steps": horizon["total"], "ms_per_step": round(rate * 1000, 1)})
                # ---- hard wall-clock stop: the calibrated horizon assumes a steady speed; a machine
                # that gets slower (other jobs) would overrun the budget, so end the run here instead
                if cfg.time_budget_s > 0 and step % cfg.log_every == 0 and step < horizon["total"]:
                    over = int(run.elapsed_before + time.time() - t_start > cfg.time_budget_s)
                    if dist_state.max_flag(over, device):
                        horizon["total"] = step
                        report(run.progress, 1.0, f"time budget {cfg.time_budget_s:.0f} s reached at step {step}")
                        run.emit({"event": "budget_reached", "step": step})
                if first_loss is None:
                    first_loss = lv
                last_loss = lv
                for k, v in terms.items():
                    acc[k] = acc.get(k, 0.0) + v
                acc["loss"] = acc.get("loss", 0.0) + lv
                acc_n += 1

                # ---- validation / early stopping (rank 0), then agree on stopping
                n_total = int(horizon["total"])
                do_val = step % cfg.val_every == 0 or step >= n_total or step == cfg.steps
                early = 0
                if is_main and do_val:
                    with maybe_applied(average, model):  # the averaged weights, when there is an average
                        res = _evaluate(model, val_set, cfg, device, selfsup, masked, anchor_model)
                        run.last_val = res
                        score = _score(res, cfg)
                        if score > run.best_score + 1e-5:
                            run.best_score, run.best_step, run.bad_rounds = score, step, 0
                            run.best_state = _snapshot(model)
                        else:
                            run.bad_rounds += 1
                            if cfg.patience > 0 and run.bad_rounds >= cfg.patience:
                                early = 1
                if is_main and (step % cfg.log_every == 0 or do_val):
                    elapsed = run.elapsed_before + time.time() - t_start
                    row: Dict[str, Any] = {k: v / max(1, acc_n) for k, v in acc.items()}
                    row.update(step=step, lr=float(sched.get_last_lr()[0]), seconds=round(elapsed, 3))
                    if do_val:
                        row.update(run.last_val)
                    run.rows.append(row)
                    acc, acc_n = {}, 0
                    rate = (time.time() - t_loop) / max(1, step - start)
                    eta = rate * (n_total - step)
                    msg = f"step {step}/{n_total} loss {row.get('loss', lv):.4g}"
                    if run.last_val.get("val_ssim") is not None:
                        msg += f" val PSNR {run.last_val['val_psnr']:.2f} dB SSIM {run.last_val['val_ssim']:.4f}"
                    elif run.last_val.get("val_loss") is not None:
                        msg += f" val loss {run.last_val['val_loss']:.4g}"
                    msg += f" ETA {eta:.0f} s"
                    report(run.progress, step / max(1, n_total), msg)
                    run.emit({"event": "step", "task": cfg.stage, "message": msg, "step": step, "steps": n_total, "fraction": step / max(1, n_total),
                              "loss": row.get("loss"), "lr": row["lr"], "val_psnr": run.last_val.get("val_psnr"),
                              "val_ssim": run.last_val.get("val_ssim"), "val_loss": run.last_val.get("val_loss"),
                              "elapsed_s": round(elapsed, 2), "eta_s": round(eta, 1)})
                    if bar is not None:
                        post = {"loss": f"{row.get('loss', lv):.4g}"}
                        if run.last_val.get("val_ssim") is not None:
                            post.update(psnr=f"{run.last_val['val_psnr']:.2f}", ssim=f"{run.last_val['val_ssim']:.4f}")
                        bar.set_postfix(post, refresh=False)
                if bar is not None:
                    bar.update(1)
                if step % cfg.checkpoint_every == 0 and step < n_total:
                    save_checkpoint(step)
                if dist_state.max_flag(early, device):
                    stopped_early = True
                    if is_main:
                        report(run.progress, step / max(1, horizon["total"]),
                               f"early stop at step {step}: no val SSIM gain for {cfg.patience} rounds")
                    break
        if bar is not None:
            bar.close()
        del it, loader

        # ---- final checkpoint, log, plot, export (rank 0)
        seconds = run.elapsed_before + time.time() - t_start
        result = TrainResult(out_dir=out_dir, model_path=None, checkpoint_path=None, log_path=None, curve_path=None,
                             steps=step, first_loss=float(first_loss if first_loss is not None else float("nan")),
                             last_loss=last_loss, val_psnr=run.last_val.get("val_psnr"),
                             val_ssim=run.last_val.get("val_ssim"), val_loss=run.last_val.get("val_loss"),
                             best_step=run.best_step, seconds=seconds, stopped_early=stopped_early)
        if is_main:
            result.checkpoint_path = save_checkpoint(step, finished=True)
            result.log_path = out_dir / "train_log.csv"
            try:
                result.curve_path = run.plot()
            except Exception:  # pragma: no cover - plotting must never fail a run
                result.curve_path = None
            export_model = model
            best_val = dict(run.last_val)
            exported_best = cfg.export_best and bool(run.best_state) and run.best_step != step
            if exported_best:
                export_model = copy.deepcopy(model)
                export_model.load_state_dict(run.best_state)
                best_val = {r_k: r_v for r in run.rows if r.get("step") == run.best_step
                            for r_k, r_v in r.items() if r_k.startswith("val_")} or best_val
            elif average is not None:  # the average is what was validated last
                export_model = copy.deepcopy(model)
                average.copy_to(export_model)
            if has_gains(export_model):  # fine-tuned gains folded into the weights: the base's format
                export_model = fold_gains(export_model)
            export_model.eval()
            card = _make_card(cfg, export_model, device, seconds, step, best_val, command, data_dir,
                              train_images, val_images, in_memory, card_extra,
                              exported_step=run.best_step if exported_best else step)
            card["validation"].update(card_input_val)
            target = export_path or (out_dir / "model.safetensors")
            from .. import modelfile

            modelfile.save_model(target, export_model.cpu(), card, inputs=protected)
            model.to(device)
            result.model_path = Path(target)
            result.card = card
            result.val_psnr = best_val.get("val_psnr", result.val_psnr)
            result.val_ssim = best_val.get("val_ssim", result.val_ssim)
            run.emit({"event": "done", "step": step, "steps": horizon["total"], "fraction": 1.0, "model": str(target),
                      "val_psnr": result.val_psnr, "val_ssim": result.val_ssim, "seconds": round(seconds, 2)})
            report(progress, 1.0, f"done: {step} steps in {seconds:.0f} s; model {target}")
        dist_state.barrier()
        return result
    finally:
        # The DDP reducer holds the process group: release it first, or a rank can abort with
        # "terminate called without an active exception" while the interpreter exits.
        ddp_model = None  # noqa: F841
        import gc

        gc.collect()
        dist_state.close()


def _make_card(cfg: TrainConfig, model, device, seconds: float, step: int, val: Dict[str, float],
               command: Optional[str], data_dir: Optional[Path], train_images, val_images, in_memory: bool,
               extra: Dict[str, Any], exported_step: int) -> Dict[str, Any]:
    """Model card: architecture, modality, normalisation, data + licences, config, hardware, time,
    validation metrics, command."""
    import datetime

    from .. import __version__

    lv = tdata.level_range(cfg) if not (cfg.stage == "finetune") else None
    card: Dict[str, Any] = {
        "name": f"dualnet-{cfg.model}-{cfg.modality}-{cfg.preset}-{cfg.dim}d",
        "architecture": architecture_of(model),
        "modality": cfg.modality,
        "normalisation": tdata.normalisation_spec(cfg.modality),
        "dim": cfg.dim,
        "stage": cfg.stage,
        "noise_levels": list(lv) if lv else None,
        "lr_factor": cfg.lr_factor,
        "data_sources": _data_sources(cfg, data_dir, list(train_images) + list(val_images), in_memory),
        "config": cfg.to_dict(),
        "training": {
            "steps": int(step),
            "exported_step": int(exported_step),
            "seconds": round(float(seconds), 2),
            "hardware": hardware_info(device, cfg),
            "command": command,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dualnet_version": __version__,
        },
        "validation": {
            "psnr_db": val.get("val_psnr"), "ssim": val.get("val_ssim"), "selfsup_loss": val.get("val_loss"),
            "set": f"{cfg.val_patches} fixed patches of {cfg.patch_size} px (LR) from held-out cases, "
                   + (f"levels {list(cfg.val_levels)} cycled" if cfg.val_levels else
                      "levels evenly spread over the training range")
                   + (f", at least {cfg.val_min_foreground:g} foreground" if cfg.val_min_foreground >= 0 else ""),
            "psnr_pooled_db": val.get("val_psnr_pooled"), "selected_on": cfg.select_on,
            "data_range": "1.0 in normalised units = the normalisation window (MRI p0.5-p99.5 of the volume, "
                          "CT -1000..1000 HU, US 0..255)", "mask": "whole patch",
        },
    }
    card["metrics"] = {k: v for k, v in {"val_psnr_db": val.get("val_psnr"), "val_ssim": val.get("val_ssim"),
                                         "val_psnr_pooled_db": val.get("val_psnr_pooled"),
                                         "val_selfsup_loss": val.get("val_loss")}.items() if v is not None}
    if cfg.nonnegative:  # physical units; inference floors every forward pass there, as the loss did
        card["output_floor"] = 0.0
    elif cfg.modality == "ct":  # no clean CT voxel lies below the scanner's air (degrade floors it there)
        from ..degrade import CT_FLOOR_HU

        card["output_floor"] = CT_FLOOR_HU
    card["version"] = __version__
    card.update(extra)
    return card


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def _data_dir(cfg: TrainConfig, data_dir: Optional[Union[str, Path]]) -> Path:
    if data_dir:
        return Path(data_dir)
    if cfg.data_dir:
        return Path(cfg.data_dir)
    return default_data_dir()


def param_groups(model, cfg: TrainConfig, new: Set[str] = frozenset()) -> List[Dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: weight decay on weights (not on biases and
    norms); the parameters named in ``new`` (added by a transplant) at ``cfg.new_lr_factor`` x ``lr``.
    Empty groups are left out."""
    groups: Dict[Tuple[bool, bool], List[Any]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim > 1, name in new), []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0,
             "lr": cfg.lr * (cfg.new_lr_factor if is_new else 1.0)}
            for (decays, is_new), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def load_init_weights(model, path: str, data_dir: Optional[Path], partial: bool = False) -> Dict[str, Any]:
    """Copy the weights of model file ``path`` into ``model``; card summary.

    The architectures must match, or with ``partial`` differ only in the transplant switches
    (:func:`dualnet.models.dualnet.transplant_weights`; the summary then lists what was not copied).
    """
    from .. import modelfile
    from ..models.dualnet import transplant_weights

    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        p = Path(__file__).resolve().parents[1] / p  # relative to the dualnet package (weights/...)
    net, card = modelfile.load_model(p, "cpu")
    summary = {"path": str(p), "name": card.get("name"), "sha256": card.get("sha256"),
               "training": card.get("training", {})}
    parent = card.get("initialised_from") or {}
    if parent.get("training"):  # the runs the starting model grew from, oldest first
        summary["lineage"] = [*parent.get("lineage", []), parent["training"]]
    if partial:
        try:
            moved = transplant_weights(net, model)
        except (ValueError, AttributeError) as e:
            raise InputError(f"init_from {p}: {e}") from None
        summary["transplant"] = {k: moved[k] for k in ("partial", "dropped", "new")}
        summary["transplant"]["copied"] = len(moved["copied"])
        return summary
    want, have = architecture_of(model), architecture_of(net)
    if json.loads(json.dumps(want)) != json.loads(json.dumps(have)):
        raise InputError(f"init_from {p}: architecture {have} does not match the configured model {want}")
    model.load_state_dict(net.state_dict())
    return summary


def pretrain(config: TrainConfig, *, data: Any = None, progress: Optional[ProgressFn] = None,
             cancel: Optional[CancelToken] = None, resume: Union[bool, str, Path, None] = None,
             out_dir: Union[str, Path], data_dir: Optional[Union[str, Path]] = None,
             progress_json: bool = False, show_bar: bool = False, command: Optional[str] = None,
             export_path: Optional[Union[str, Path]] = None) -> TrainResult:
    """Supervised pretraining on synthetic degradations of clean scans.

    Args:
        config: hyperparameters (``stage`` is forced to ``"pretrain"``).
        data: optional in-memory clean images (arrays (z,y,x)/(y,x), ``(array, spacing_zyx)``
            pairs, Volumes or paths) replacing ``config.data`` (e.g. handed over by Slicer).
        progress: ``progress(fraction, message)`` callback.
        cancel: token; when set, a checkpoint is written and :class:`CancelledError` raised.
        resume: ``True`` = continue from ``out_dir/checkpoint.pt``; a path = that checkpoint.
        out_dir: run folder (created): config.toml, checkpoint.pt, train_log.csv,
            loss_curve.png, model.safetensors + card.
        data_dir: base of relative data paths (default ``config.data_dir`` /
            ``$DUALNET_SHARED_DATA`` / ``../shared/data``).
        progress_json: print ``DUALNET_PROGRESS {json}`` lines on stdout.
        show_bar: tqdm bar on stderr.
        command: the exact command line, recorded in the card.
        export_path: also write the model here (it is always written to ``out_dir/model.safetensors``);
            ``TrainResult.model_path`` then names this copy.

    Raises:
        CancelledError: stopped by the token or SIGINT/SIGTERM (message names the checkpoint).
        ModelError: corrupt/incompatible checkpoint on resume; InputError: bad config / data.
    """
    cfg = config.replace(stage="pretrain")
    ddir = _data_dir(cfg, data_dir)
    train_images, val_images = tdata.load_split(cfg, data, ddir)
    model = build_network(cfg)
    if getattr(model, "neb", None) is not None:
        model.neb.detach_alpha_features = bool(cfg.alpha_detach)
    extra: Dict[str, Any] = {}
    if cfg.init_from:
        extra["initialised_from"] = load_init_weights(model, cfg.init_from, ddir, cfg.init_partial)
    masked = cfg.model == "n2v"
    protected = [extra["initialised_from"]["path"]] if cfg.init_from else []
    from .. import modelfile

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    modelfile.check_model_output(Path(out_dir) / "model.safetensors", protected)  # before the work, not after
    if export_path:
        Path(export_path).parent.mkdir(parents=True, exist_ok=True)
        modelfile.check_model_output(export_path, protected)
    res = _train(cfg, model, train_images, val_images, Path(out_dir), selfsup=False, masked=masked,
                 progress=progress, cancel=cancel, resume=resume, progress_json=progress_json,
                 show_bar=show_bar, command=command, card_extra=extra, data_dir=ddir, in_memory=data is not None,
                 export_path=None, protected=protected)
    if export_path and res.model_path is not None:  # a second copy (e.g. the shipped weights folder)
        from .. import modelfile

        net, card = modelfile.load_model(res.model_path, "cpu")
        card = {k: v for k, v in card.items() if k not in ("sha256", "weights")}
        res.model_path = modelfile.save_model(Path(export_path), net, card, inputs=protected)
    return res


#: The base card's inference entries a fine-tuned model keeps (the MC-dropout scale is not one:
#: it was fitted to the base's errors).
FINETUNE_KEEPS_INFERENCE = ("orthogonal_views", "view_smoothing", "test_time_augmentation")


def finetune(inputs: Any, base_model_path: Union[str, Path], out_path: Union[str, Path],
             config: Optional[TrainConfig] = None, *, progress: Optional[ProgressFn] = None,
             cancel: Optional[CancelToken] = None, resume: Union[bool, str, Path, None] = None,
             out_dir: Optional[Union[str, Path]] = None, progress_json: bool = False, show_bar: bool = False,
             command: Optional[str] = None, frame: Optional[int] = None,
             sigma: Optional[float] = None) -> TrainResult:
    """Self-supervised fine-tuning of a trained model on real noisy scans (no clean reference).

    Args:
        inputs: noisy scans: paths (files / DICOM folders / PNG frame folders) or arrays
            ((z,y,x) / (y,x)), ``(array, spacing_zyx)`` pairs or Volumes. Split per case: with
            two or more inputs the last ``val_fraction`` is held out for the validation loss.
        base_model_path: model file (``.safetensors`` + card) to start from; its card fixes the
            architecture, modality and normalisation.
        out_path: where the fine-tuned model is written (``.safetensors`` + card).
        config: fine-tuning hyperparameters (default: ``configs/finetune.toml``); ``model``,
            ``modality``, ``preset`` and ``dim`` are taken from the base card.
        out_dir: run folder (checkpoint, log, curve); default ``<out_path stem>_run`` beside it.
        frame: 4D inputs: which volume to take.
        sigma: the noise level of every input when it is known, as ``dualnet denoise --sigma``
            (:func:`dualnet.training.data.noise_variance_model`): MRI the Rician sigma (image units),
            e.g. from repeated frames (``dualnet finetune --frame``); CT the noise std at water (HU;
            each scan's own fit keeps the shape); US the relative speckle std. None: estimated from
            each scan. SURE takes everything above the noise it is told about as signal, and a
            single-scan estimate can be far off (3x on the ghosted EPI of
            ``scripts/real_noise_finetune.py``; the CT gain 1.2-1.4x on small abdomen slabs).

    Returns:
        :class:`TrainResult`; ``val_loss`` is the masked self-supervised loss on fixed patches.
    """
    from .. import modelfile
    from ..sure_guard import GUARD_MODALITIES
    from .config import config_dir
    from .gain_tuning import add_gains

    if config is None:
        config = TrainConfig.from_toml(config_dir() / "finetune.toml")
    base_path = Path(base_model_path)
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise InputError(f"{out_path}: the fine-tuned model must be a .safetensors file")
    sources = [x for x in ([inputs] if isinstance(inputs, (str, Path)) else
                           inputs if isinstance(inputs, (list, tuple)) else []) if isinstance(x, (str, Path))]
    protected = [base_path, *sources]
    try:
        modelfile.check_model_output(out_path, protected)  # never the base model, its card or a scan
    except ModelError as err:
        raise InputError(str(err)) from None
    base, card = modelfile.load_model(base_path, "cpu")
    arch = architecture_of(base)
    kind = arch.get("kind", card.get("architecture", {}).get("kind", "dualnet"))
    modality = card.get("modality", config.modality)
    wanted = tdata.normalisation_spec(modality)  # what fine-tuning feeds the network (and writes on the card)
    if card.get("normalisation") != wanted:
        raise InputError(f"{base_path}: its card's intensity normalisation {card.get('normalisation')} is not the "
                         f"{modality} one fine-tuning uses ({wanted}); the fine-tuned network would see other "
                         "intensities than it was trained on")
    cfg = config.replace(stage="finetune", model=kind if kind in ("dualnet", "dncnn", "n2v") else "dualnet",
                         modality=modality, preset=arch.get("preset", config.preset),
                         dim=int(arch.get("dim", config.dim)), sr=bool(arch.get("sr", False)),
                         use_neb=bool(arch.get("use_neb", True)), use_nonlocal=bool(arch.get("use_nonlocal", True)),
                         dropout=float(arch.get("dropout", config.dropout)), lr_factor=1,
                         context=int(arch.get("context", 1)), noise_map=bool(arch.get("noise_map", False)),
                         dropout_mode=str(arch.get("dropout_mode", "element")),
                         # a magnitude model floored at 0 stays floored (its card's output_floor)
                         nonnegative=bool(card.get("config", {}).get("nonnegative", False)))
    if sigma is not None:  # refused before any scan is read (each scan's own range: noise_variance_model)
        from ..estimate import check_sigma

        check_sigma(sigma, modality)
    if isinstance(inputs, (str, Path, np.ndarray)) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], np.ndarray)):
        inputs = [inputs]
    inputs = list(inputs)
    items: List[Any] = []
    for x in inputs:
        if isinstance(x, (str, Path)):
            items.extend((a, sp) for a, sp, _ in tdata.read_source(Path(x), frame=frame))
        else:
            items.append(x)
    train_images, val_images = tdata.load_split(cfg, items, None)
    masked = cfg.ss_loss != "sure"
    noise_models: List[Dict[str, Any]] = []
    checked = cfg.base_check > 0 and modality in GUARD_MODALITIES  # the whole-scan check after the run
    # SURE, the noise-map input and the check need each scan's noise model: given, or from the scan itself
    if not masked or cfg.noise_map or checked:
        cache: Dict[int, Tuple[Tuple[float, float, float], Dict[str, Any]]] = {}
        for img in list(train_images) + list(val_images):
            key = id(img.array)
            if key not in cache:
                cache[key] = tdata.noise_variance_model(img.array, modality, sigma)
                noise_models.append({"image": img.name, **cache[key][1]})
            img.noise_var = cache[key][0]
    anchor = copy.deepcopy(base) if cfg.lambda_anchor > 0 else None
    if cfg.finetune_params == "gains":
        add_gains(base)
    run_dir = Path(out_dir) if out_dir else out_path.parent / f"{out_path.stem}_run"
    extra = {"finetuned_from": {"path": str(base_path), "name": card.get("name"),
                                "training": card.get("training", {}), "data_sources": card.get("data_sources", [])},
             "finetune_inputs": [str(x) if isinstance(x, (str, Path)) else "array" for x in inputs][:50]}
    if noise_models:
        extra["finetune_noise_models"] = noise_models[:50]
    # The same network is run as its base is: views (dualnet.orthoviews), their smoothing
    # (dualnet.view_smoothing) and test-time augmentation, each chosen on the base's validation.
    extra.update({k: card[k] for k in FINETUNE_KEEPS_INFERENCE if k in card})
    # With the check against the base, the model is exported into the run folder first and reaches
    # out_path only once checked: a cancel or crash during the check leaves out_path as it was.
    staged = run_dir / f"{out_path.stem}.unchecked{out_path.suffix}" if cfg.base_check > 0 else out_path
    res = _train(cfg, base, train_images, val_images, run_dir, selfsup=True, masked=masked, progress=progress,
                 cancel=cancel, resume=resume, progress_json=progress_json, show_bar=show_bar, command=command,
                 card_extra=extra, export_path=staged, anchor_model=anchor, data_dir=None, in_memory=True,
                 protected=protected)
    if res.model_path is not None and cfg.base_check > 0:  # (ultrasound: recorded as not checked)
        _check_against_base(res, base_path, cfg, modality, val_images, extra, protected, progress, cancel,
                            progress_json, out_path)
    return res


def _check_against_base(res: TrainResult, base_path: Path, cfg: TrainConfig, modality: str, images: Sequence[Any],
                        extra: Dict[str, Any], protected: Sequence[Path], progress: Optional[ProgressFn],
                        cancel: Optional[CancelToken], progress_json: bool, out_path: Path) -> None:
    """:mod:`dualnet.training.base_check` on up to ``cfg.base_check`` whole scans (the held-out
    ones, else the fitted one): the fine-tuned model exported at ``res.model_path`` (in the run
    folder) is written to ``out_path`` only if its SURE is lower than its base's; else the base's
    weights and card are written there, with the check and the fine-tuning run recorded. Updates
    ``res`` (``model_path`` = ``out_path``, ``card``, ``kept_base``)."""
    from .. import modelfile
    from ..sure_guard import GUARD_MODALITIES
    from . import base_check

    def tell(fraction: float, message: str) -> None:
        report(progress, fraction, message)
        if progress_json:
            _print_progress({"event": "check", "fraction": None, "message": message})

    target = Path(res.model_path)
    if modality not in GUARD_MODALITIES:
        check: Dict[str, Any] = {"kept": "finetuned", "reason": f"no Gaussian noise model for {modality!r} (speckle)"}
    else:
        scans: List[base_check.Scan] = []
        for img in images:
            if len(scans) >= cfg.base_check:
                break
            if any(s.array is img.array for s in scans):
                continue
            scans.append(base_check.Scan(img.name, img.array, tuple(float(c) for c in img.noise_var),
                                         tuple(float(v) for v in img.spacing_zyx)))
        device = "cpu" if cfg.device in ("auto", "cpu") else cfg.device
        runs = {name: base_check.model_pipeline(path, modality, device, cancel)
                for name, path in (("base", base_path), ("finetuned", target))}
        check = base_check.compare(scans, runs, modality,
                                   seed=cfg.seed, progress=lambda f, m: tell(1.0, f"checking against the base: {m}"),
                                   cancel=cancel)
    if check["kept"] == "finetuned":
        net, card = modelfile.load_model(target, "cpu")
        card = {**card, "finetune_check": check}
        tell(1.0, "kept the fine-tuned model" + _check_text(check))
    else:
        net, card = modelfile.load_model(base_path, "cpu")
        card = {**card, **extra, "finetune_check": check, "finetune_training": res.card.get("training", {}),
                "finetune_validation": res.card.get("validation", {})}
        tell(1.0, "kept the base model: the fine-tuned one was not better on the whole scan" + _check_text(check))
    res.model_path = modelfile.save_model(out_path, net, card, inputs=protected)
    card = modelfile.read_card(out_path)
    res.card = card
    res.kept_base = check["kept"] != "finetuned"


def _check_text(check: Dict[str, Any]) -> str:
    """``" (SURE per voxel: base B, fine-tuned F, input I)"`` for the messages, or the reason."""
    mse = check.get("mse")
    if not mse:
        return f" ({check.get('reason', 'not checked')})"

    def num(x: Optional[float]) -> str:
        return "not finite" if x is None else f"{x:.4g}"

    return (f" (SURE per voxel: base {num(mse['base'])}, fine-tuned {num(mse['finetuned'])}, "
            f"input {num(check['mse_input'])})")
