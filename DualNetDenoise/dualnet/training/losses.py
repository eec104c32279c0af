"""Training losses (torch). Tensors are (N, C, H, W) for 2D or (N, C, D, H, W) for 3D, in the
normalised intensity units of :mod:`dualnet.training.data`.

Supervised synthetic pretraining (``supervised_loss``)::

    L = mse MSE(out, clean) + l1 |out - clean| + ssim (1 - SSIM(out, clean))
        + edge |grad out - grad clean| + blind |blind - clean| + neb KL(N(0, std^2) || N(0, sigma^2))
        + alpha BCE(alpha, exp(-((blind - clean) / std)^2 / 2)) + sr SR-loss + tv TV(out)

NEB confidence (``lambda_alpha``): ``alpha`` learns how close the blind-spot estimate is to the
truth in noise standard deviations (``confidence_target``), so it drops at edges and fine detail
the blind spot cannot restore and where the noise is not what the noise map says.

NEB calibration: the simulated per-voxel noise standard deviation ``std`` is known, so the
predicted ``sigma`` is fitted with the KL divergence between the zero-mean Gaussians
``KL(N(0, std^2) || N(0, sigma^2)) = log(sigma / std) + std^2 / (2 sigma^2) - 1/2``
(minimum 0 at sigma = std; ``neb_loss = "kl"``). Without a known std (self-supervised, or
``neb_loss = "nll"``) it is the Gaussian negative log-likelihood of the residual
``r = noisy - blind`` (blind detached): ``log sigma + r^2 / (2 sigma^2)``.

Self-supervised (``selfsup_loss``; Noise2Void / Noise2Self): the input has ``mask_ratio`` of its
voxels replaced by random neighbours; the output is compared with the NOISY image ON THE MASKED
VOXELS ONLY (``masked_loss``); the blind-spot branch (blind by construction) is fitted to the
noisy image everywhere; the SRB output is pulled toward the blind-spot estimate weighted by the
NEB confidence ``alpha`` (consistency); a weak TV term regularises.

Self-supervised with ``ss_loss = "sure"``: the network sees the whole noisy image (no masking,
so it can keep what is signal) and the data term is Stein's unbiased estimate of the MSE to the
unknown clean image (``sure_mse``) with the noise variance estimated from the scan itself
(:func:`dualnet.training.data.noise_variance_model`). The blind-spot branch terms are unchanged.

SURE assumes zero-mean noise, which a magnitude (Rician) image does not have: its mean is above the
signal (sigma sqrt(pi/2) where there is none), so in the plain form the unbiased optimum is that
mean, and fine-tuning lifts the background to the noise floor. For MRI (``sure_domain = "auto"``)
the data term and the blind-spot term are therefore computed in the Rician VST domain
(:mod:`dualnet.vst`), where the noise is close to unit Gaussian: the noisy image ``y`` maps to
``z = f(y / sigma)``, the network's estimate ``x`` of the clean magnitude to ``E[f(M) | x / sigma]``
(what ``z`` averages to when ``x`` is the truth), and the probe perturbs ``z`` (``sure_input``).
Its optimum is the clean magnitude, the background at 0 included (``rician_sure``).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import MSE_WEIGHT_POWER

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# SSIM (differentiable, 2D and 3D)
# ---------------------------------------------------------------------------------------------
def _gauss_1d(sigma: float, radius: int, device, dtype) -> Tensor:
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filtering (valid convolution) along every spatial axis of (N, C, *S)."""
    nd = x.dim() - 2
    c = x.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    k = g.numel()
    for ax in range(nd):
        shape = [1] * nd
        shape[ax] = k
        w = g.view(1, 1, *shape).expand(c, 1, *shape).contiguous()
        x = conv(x, w, groups=c)
    return x


def ssim(x: Tensor, y: Tensor, *, data_range: float | Tensor = 1.0, sigma: float = 1.5,
         radius: Optional[int] = None, reduction: str = "mean") -> Tensor:
    """Structural similarity of ``x`` and ``y`` (Wang et al. 2004), differentiable.

    Gaussian window (``sigma`` voxels, truncated at ``radius``; default 5 for 2D, 3 for 3D),
    constants ``K1 = 0.01``, ``K2 = 0.03`` of ``data_range`` (scalar or (N,) per sample), valid
    windows only (the window radius is shrunk for small images).

    Returns:
        scalar mean SSIM (``reduction="mean"``) or per-sample (N,) values (``"none"``).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    nd = x.dim() - 2
    r = radius if radius is not None else (5 if nd == 2 else 3)
    r = int(max(1, min(r, (min(x.shape[2:]) - 1) // 2)))
    x32, y32 = x.float(), y.float()
    g = _gauss_1d(sigma, r, x.device, torch.float32)
    dr = torch.as_tensor(data_range, device=x.device, dtype=torch.float32)
    if dr.dim() == 1:
        dr = dr.view(-1, *([1] * (x.dim() - 1)))
    c1 = (0.01 * dr) ** 2
    c2 = (0.03 * dr) ** 2
    mx, my = _blur(x32, g), _blur(y32, g)
    sxx = _blur(x32 * x32, g) - mx * mx
    syy = _blur(y32 * y32, g) - my * my
    sxy = _blur(x32 * y32, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    per = s.flatten(1).mean(1)
    return per.mean() if reduction == "mean" else per


def ssim_loss(x: Tensor, y: Tensor, data_range: float | Tensor = 1.0) -> Tensor:
    """``1 - SSIM(x, y)``."""
    return 1.0 - ssim(x, y, data_range=data_range)


# ---------------------------------------------------------------------------------------------
# elementary terms
# ---------------------------------------------------------------------------------------------
def gradients(x: Tensor) -> list:
    """Forward differences along each spatial axis of (N, C, *S)."""
    return [torch.diff(x, dim=d) for d in range(2, x.dim())]


def edge_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean over axes of the L1 distance between finite-difference gradients."""
    gx, gy = gradients(x), gradients(y)
    return sum((a - b).abs().mean() for a, b in zip(gx, gy)) / len(gx)


def tv_loss(x: Tensor) -> Tensor:
    """Anisotropic total variation: mean |forward difference|, averaged over axes."""
    g = gradients(x)
    return sum(d.abs().mean() for d in g) / len(g)


def charbonnier(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """Charbonnier (smooth L1) loss ``mean sqrt((x - y)^2 + eps^2)``."""
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


def gaussian_kl(sigma_pred: Tensor, std_true: Tensor, eps: float = 1e-4) -> Tensor:
    """Mean ``KL(N(0, std^2) || N(0, sigma^2)) = log(sigma/std) + std^2/(2 sigma^2) - 1/2``.

    Both in normalised intensity units, same shape; ``eps`` floors both std's.
    """
    s = sigma_pred.float().clamp_min(eps)
    t = std_true.float().clamp_min(eps)
    return (torch.log(s / t) + t * t / (2 * s * s) - 0.5).mean()


def gaussian_nll(residual: Tensor, sigma_pred: Tensor, eps: float = 1e-4) -> Tensor:
    """Mean Gaussian NLL of ``residual`` under std ``sigma_pred`` (constant ``log sqrt(2 pi)`` dropped)."""
    s = sigma_pred.float().clamp_min(eps)
    return (torch.log(s) + residual.float() ** 2 / (2 * s * s)).mean()


def masked_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "l2") -> Tensor:
    """Mean error over the voxels where ``mask`` is 1 (voxels with mask 0 do not contribute).

    ``kind``: ``"l2"`` (squared error, Noise2Void) or ``"l1"``.
    """
    d = pred.float() - target.float()
    e = d * d if kind == "l2" else d.abs()
    m = mask.float()
    return (e * m).sum() / m.sum().clamp_min(1.0)


def sr_loss(sr: Tensor, hr: Tensor, lr_ref: Optional[Tensor] = None) -> Tensor:
    """SR head: Charbonnier to the clean HR + 0.5 gradient L1 (structure) + 0.1 L1 between the
    block-averaged SR output and ``lr_ref`` (consistency with the LR grid), when given."""
    loss = charbonnier(sr, hr) + 0.5 * edge_loss(sr, hr)
    if lr_ref is not None:
        f = sr.shape[-1] // lr_ref.shape[-1]
        pool = F.avg_pool2d if sr.dim() == 4 else F.avg_pool3d
        if f >= 1 and all(a == b * f for a, b in zip(sr.shape[2:], lr_ref.shape[2:])):
            loss = loss + 0.1 * (pool(sr, f) - lr_ref).abs().mean()
    return loss


#: squared-error floor of the "psnr" weighting (normalised units: caps a sample at 60 dB)
PSNR_WEIGHT_EPS = 1e-6


#: squared error (normalised units) at which a sample's weight is 1 when the weights are not
#: normalised over the batch (:func:`weighted_mse` with ``absolute``): about a 40 dB patch
ABSOLUTE_WEIGHT_MSE = 1e-4


def weighted_mse(pred: Tensor, clean: Tensor, weighting: str = "none", *, absolute: bool = False) -> Tensor:
    """Mean squared error over the batch, each sample weighted by ``(its MSE + eps)^-p``
    (weights normalised to mean 1 and not differentiated): ``"none"`` p = 0 (the noisiest patches
    dominate), ``"psnr"`` p = 1 (the gradient of the batch's mean PSNR: every noise level counts
    alike in dB), ``"rmse"`` p = 1/2 (the gradient of the mean RMSE, between the two), ``"mild"``
    p = 1/4 (between ``"none"`` and ``"rmse"``: more of the gradient to the noisier patches).

    ``absolute``: the weights are ``((MSE + eps) / ABSOLUTE_WEIGHT_MSE)^-p`` instead, not normalised
    over the batch. For batches of one noise level (the view loss's cubes), where normalising would
    make every weight 1 and give the noisiest steps most of the training."""
    per = (pred - clean).pow(2).flatten(1).mean(1)
    p = MSE_WEIGHT_POWER[weighting]
    if p == 0:
        return per.mean()
    if absolute:
        return (per * ((per.detach() + PSNR_WEIGHT_EPS) / ABSOLUTE_WEIGHT_MSE).pow(-p)).mean()
    w = (per.detach() + PSNR_WEIGHT_EPS).pow(-p)
    return (per * (w / w.mean())).mean()


def view_mean_loss(pred: Tensor, cube_clean: Tensor, weighting: str = "none") -> Tensor:
    """Squared error of the three views' mean over cubes (:meth:`PatchSampler.sample_cube`):
    ``pred`` (C * 3 P, 1, P, P) holds each cube's slices along z, then y, then x (each view cut with
    ``moveaxis(cube, axis, 0)``), ``cube_clean`` (C, 1, P, P, P) the clean cubes (z, y, x). The views
    are put back in (z, y, x) order and averaged, as inference averages them; per-cube weighting as
    :func:`weighted_mse` with absolute weights (one noise level per cube)."""
    c, p = cube_clean.shape[0], cube_clean.shape[-1]
    v = pred.reshape(c, 3, p, p, p)
    mean = (v[:, 0] + v[:, 1].permute(0, 2, 1, 3) + v[:, 2].permute(0, 2, 3, 1)) / 3.0
    return weighted_mse(mean.unsqueeze(1), cube_clean, weighting, absolute=True)


def confidence_target(blind: Tensor, clean: Tensor, std: Tensor) -> Tensor:
    """What the NEB confidence map learns: ``exp(-z^2 / 2)`` with ``z = (blind - clean) / std``, the
    blind-spot estimate's error in noise standard deviations (1 where it is exact, 0.61 at one std,
    0.14 at two). Not differentiated."""
    z = (blind.detach().float() - clean) / std.clamp_min(1e-6)
    return torch.exp(-0.5 * z * z)


def _range(clean: Tensor) -> Tensor:
    """Per-sample data range of the clean target (N,), floored at 0.1 (flat patches would
    otherwise make the SSIM constants vanish)."""
    flat = clean.detach().float().flatten(1)
    return (flat.max(1).values - flat.min(1).values).clamp_min(0.1)


def floor_output(pred: Tensor, batch: Dict[str, Tensor], cfg) -> Tensor:
    """``pred`` floored at physical 0 (``batch["zero"]``, normalised units, one per sample) when
    the config asks for a non-negative output (magnitude MRI); ``pred`` itself otherwise."""
    if not getattr(cfg, "nonnegative", False) or "zero" not in batch:
        return pred
    return torch.maximum(pred, _zero(batch, pred))


# ---------------------------------------------------------------------------------------------
# full objectives
# ---------------------------------------------------------------------------------------------
def supervised_loss(out: Dict[str, Optional[Tensor]], batch: Dict[str, Tensor], cfg) -> Tuple[Tensor, Dict[str, float]]:
    """Synthetic-pair objective (see module docstring). Returns ``(total, {term: value})``."""
    pred = floor_output(out["out"].float(), batch, cfg)
    clean = batch["clean"]
    terms: Dict[str, Tensor] = {}
    if cfg.lambda_mse > 0:
        terms["mse"] = cfg.lambda_mse * weighted_mse(pred, clean, getattr(cfg, "mse_weighting", "none"),
                                                     absolute="cube_clean" in batch)
    if getattr(cfg, "view_loss", 0.0) > 0 and "cube_clean" in batch:
        terms["views"] = cfg.view_loss * view_mean_loss(pred, batch["cube_clean"], getattr(cfg, "mse_weighting", "none"))
    if cfg.lambda_l1 > 0:
        terms["l1"] = cfg.lambda_l1 * (pred - clean).abs().mean()
    if cfg.lambda_ssim > 0:
        terms["ssim"] = cfg.lambda_ssim * ssim_loss(pred, clean, _range(clean))
    if cfg.lambda_edge > 0:
        terms["edge"] = cfg.lambda_edge * edge_loss(pred, clean)
    blind, sigma = out.get("blind"), out.get("sigma")
    if blind is not None and cfg.lambda_blind > 0 and cfg.model == "dualnet":
        terms["blind"] = cfg.lambda_blind * (blind.float() - clean).abs().mean()
    alpha = out.get("alpha")
    if alpha is not None and blind is not None and getattr(cfg, "lambda_alpha", 0.0) > 0 and "std" in batch:
        target = confidence_target(blind, clean, batch["std"])
        terms["alpha"] = cfg.lambda_alpha * F.binary_cross_entropy(alpha.float().clamp(1e-6, 1 - 1e-6), target)
    if sigma is not None and cfg.lambda_neb > 0:
        if cfg.neb_loss == "kl" and "std" in batch:
            terms["neb"] = cfg.lambda_neb * gaussian_kl(sigma, batch["std"])
        elif blind is not None:
            terms["neb"] = cfg.lambda_neb * gaussian_nll(batch["noisy"] - blind.detach().float(), sigma)
    if out.get("sr") is not None and "hr" in batch and cfg.lambda_sr > 0:
        terms["sr"] = cfg.lambda_sr * sr_loss(out["sr"].float(), batch["hr"], clean)
    if cfg.lambda_tv > 0:
        terms["tv"] = cfg.lambda_tv * tv_loss(pred)
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def selfsup_loss(out: Dict[str, Optional[Tensor]], batch: Dict[str, Tensor], cfg,
                 anchor: Optional[Tensor] = None, perturbed: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Dict[str, float]]:
    """Self-supervised objective on noisy data only (see module docstring).

    Noise2Void / Noise2Self (``ss_loss`` "l2" / "l1"): ``batch`` holds ``noisy`` (target),
    ``input`` (masked copy fed to the network) and ``mask``. SURE (``ss_loss = "sure"``): the
    network sees the unmasked ``noisy``; ``batch`` holds ``var`` (noise variance map), ``probe``
    (the random direction) and ``perturbed`` is the output for ``noisy + sure_eps * probe``.
    ``anchor`` (optional): output of the frozen base model, pulled toward with ``lambda_anchor``.
    """
    pred = floor_output(out["out"].float(), batch, cfg)  # as inference floors it (``nonnegative``)
    noisy = batch["noisy"]
    if cfg.ss_loss == "sure":
        if perturbed is None:
            raise ValueError("ss_loss = 'sure' needs the output for the perturbed input")
        perturbed = floor_output(perturbed.float(), batch, cfg)
        if _rician(cfg):
            terms: Dict[str, Tensor] = {"sure": rician_sure(pred, perturbed, batch, cfg.sure_eps)}
        else:
            terms = {"sure": sure_mse(pred, perturbed, noisy, batch["var"], batch["probe"], cfg.sure_eps)}
    else:
        terms = {"n2v": masked_loss(pred, noisy, batch["mask"], cfg.ss_loss)}
    blind, sigma, alpha = out.get("blind"), out.get("sigma"), out.get("alpha")
    if cfg.model == "dualnet" and blind is not None:
        b = blind.float()
        if cfg.lambda_blind > 0:
            d = _blind_residual(b, batch, cfg)
            squared = cfg.ss_loss == "l2" or (cfg.ss_loss == "sure" and _rician(cfg))  # the Rician form needs the mean
            terms["blind"] = cfg.lambda_blind * ((d * d).mean() if squared else d.abs().mean())
        if sigma is not None and cfg.lambda_neb > 0:
            terms["neb"] = cfg.lambda_neb * gaussian_nll(noisy - b.detach(), sigma)
        if cfg.lambda_consistency > 0:
            w = alpha.detach().float() if alpha is not None else torch.ones_like(pred)
            terms["consistency"] = cfg.lambda_consistency * (w * (pred - b.detach()).abs()).mean()
    if cfg.lambda_tv > 0:
        terms["tv"] = cfg.lambda_tv * tv_loss(pred)
    if anchor is not None and cfg.lambda_anchor > 0:
        terms["anchor"] = cfg.lambda_anchor * (pred - anchor.float()).abs().mean()
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _blind_residual(blind: Tensor, batch: Dict[str, Tensor], cfg) -> Tensor:
    """The blind-spot estimate against the noisy voxel it never sees. Its squared mean is least at
    the noisy image's mean: for Rician data (:func:`_rician`) it is taken in the VST domain (in
    noise stds times sigma), so that mean is the clean magnitude's, not the noise floor."""
    noisy = batch["noisy"]
    if not (cfg.ss_loss == "sure" and _rician(cfg) and "var" in batch):
        return blind - noisy
    zero, sd = _zero(batch, noisy), batch["var"].sqrt()
    return (rician_vst_mean(blind - zero, sd) - rician_vst(noisy - zero, sd)) * sd


def sure_mse(pred: Tensor, pred_eps: Tensor, noisy: Tensor, var: Tensor, probe: Tensor, eps: float) -> Tensor:
    """Monte-Carlo SURE: an unbiased estimate of the mean squared error to the unknown clean image.

    For ``y = x + n`` with independent zero-mean noise of per-voxel variance ``var`` (Gaussian,
    Stein 1981; heteroscedastic form after Ramani et al. 2008):
    ``MSE(f(y), x) ~= mean((f(y) - y)^2) - mean(var) + 2 mean(var * div f)``, with the divergence
    estimated by one random probe ``b``: ``div f ~= b * (f(y + eps b) - f(y)) / eps``.
    ``pred_eps`` is the network output for ``noisy + eps * probe`` (same dropout masks).
    All tensors (N, C, *S) in normalised units; returns a scalar (normalised units^2).
    """
    fit = (pred - noisy).pow(2).mean()
    div = (var * probe * (pred_eps - pred)).mean() / eps
    return fit - var.mean() + 2.0 * div


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear ``fp(x)`` on the increasing grid ``xp``, flat below it and with slope 1 above
    it (the Rician VST tables' ends); differentiable in ``x``."""
    inside = x.clamp(float(xp[0]), float(xp[-1])).contiguous()
    i = torch.searchsorted(xp, inside).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    y = y0 + (inside - x0) * (y1 - y0) / (x1 - x0)
    return torch.where(x > xp[-1], fp[-1] + (x - xp[-1]), y)


def _rician_tables_t(device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`dualnet.vst.rician_tables` as float32 tensors on ``device`` (sigma = 1): m, f(m), nu,
    E[f(M) | nu]; made once per device."""
    return _tables_on(str(device))


@functools.lru_cache(maxsize=4)
def _tables_on(device: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from .. import vst

    return tuple(torch.as_tensor(a.copy(), device=device, dtype=torch.float32) for a in vst.rician_tables())


def rician_vst(y: Tensor, sigma: Tensor) -> Tensor:
    """The Rician VST ``f(y / sigma)`` of a magnitude (torch twin of :func:`dualnet.vst.rician_forward`):
    noise std about 1. ``y`` and ``sigma`` in the same units, ``y`` measured from physical 0."""
    m, f, _, _ = _rician_tables_t(y.device)
    return _interp((y / sigma).clamp_min(0.0), m, f)


def rician_vst_mean(x: Tensor, sigma: Tensor) -> Tensor:
    """``E[f(M) | nu = x]`` in the VST domain: what :func:`rician_vst` of a noisy magnitude averages
    to when ``x`` is the clean one (negative ``x`` counts as 0, as the output floor does)."""
    _, _, nu, mean = _rician_tables_t(x.device)
    return _interp((x / sigma).clamp_min(0.0), nu, mean)


def rician_vst_inverse(z: Tensor, sigma: Tensor) -> Tensor:
    """The magnitude whose VST is ``z`` (the functional inverse of :func:`rician_vst`, not the
    unbiased estimate of :func:`dualnet.vst.rician_inverse`)."""
    m, f, _, _ = _rician_tables_t(z.device)
    return _interp(z, f, m) * sigma


def _rician(cfg) -> bool:
    """SURE in the Rician VST domain (MRI magnitude, ``sure_domain = "auto"``)."""
    return cfg.modality == "mri" and getattr(cfg, "sure_domain", "auto") == "auto"


def sure_input(batch: Dict[str, Tensor], cfg) -> Tensor:
    """The perturbed noisy centre ``y + eps b`` whose output SURE's divergence needs (``batch["probe"]``
    is ``b``); for Rician data the step is taken in the VST domain, ``eps / sigma`` there so it
    is as large relative to the noise as in the plain form."""
    noisy, probe = batch["noisy"], batch["probe"]
    if not _rician(cfg):
        return noisy + cfg.sure_eps * probe
    zero, sd = _zero(batch, noisy), batch["var"].sqrt()
    z = rician_vst(noisy - zero, sd)
    return zero + rician_vst_inverse(z + (cfg.sure_eps / sd) * probe, sd)


def _zero(batch: Dict[str, Tensor], like: Tensor) -> Tensor:
    """Physical 0 in normalised units, shaped to broadcast over ``like`` (N, C, *S)."""
    zero = batch.get("zero")
    if zero is None:
        return torch.zeros((), device=like.device, dtype=like.dtype)
    return zero.reshape((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def rician_sure(pred: Tensor, pred_eps: Tensor, batch: Dict[str, Tensor], eps: float) -> Tensor:
    """Monte-Carlo SURE in the Rician VST domain, scaled back to normalised units^2.

    With ``z = f(y / sigma)`` (noise std ~1) and ``g(x) = E[f(M) | x / sigma]``: ``mean((g - z)^2) - 1
    + 2 div_z g``, the divergence from the probe step of :func:`sure_input` (``eps / sigma`` in z).
    Unbiased for ``mean((g(x) - g(truth))^2)`` as far as the VST noise is Gaussian, so its optimum
    is the clean magnitude, not the Rician mean; times ``mean(sigma^2)`` to keep the scale of
    :func:`sure_mse`. ``batch`` holds ``noisy``, ``var`` (sigma^2), ``probe`` and ``zero``.
    """
    noisy, var, probe = batch["noisy"], batch["var"], batch["probe"]
    zero, sd = _zero(batch, noisy), var.sqrt()
    z = rician_vst(noisy - zero, sd)
    g = rician_vst_mean(pred - zero, sd)
    g_eps = rician_vst_mean(pred_eps - zero, sd)
    div = (probe * (g_eps - g) * sd).mean() / eps
    return ((g - z).pow(2).mean() - 1.0 + 2.0 * div) * var.mean()


def psnr_t(x: Tensor, y: Tensor, data_range: Tensor) -> Tensor:
    """Per-sample PSNR in dB of (N, C, *S) tensors with per-sample ``data_range`` (N,)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range.float() ** 2 / mse)
