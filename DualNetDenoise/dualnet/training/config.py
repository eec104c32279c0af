"""Training configuration: one dataclass holding every hyperparameter, read from / written to TOML.

A :class:`TrainConfig` is loaded from a TOML file (``TrainConfig.from_toml``), can be overridden
from the command line, and is saved beside every checkpoint as ``config.toml`` together with a
``config_version`` field so that old run folders stay readable.

Units: ``patch_size`` is the edge of a LOW-RESOLUTION training patch in voxels (the clean
high-resolution crop is ``patch_size * lr_factor`` voxels per axis before degradation);
``lr`` is the peak AdamW learning rate; ``levels`` are noise levels in the units of
``dualnet.noise.add_noise`` (MRI sigma as a fraction of the clean maximum, CT dose fraction,
US number of looks); ``steps``, ``warmup_steps``, ``checkpoint_every``, ``val_every`` count
optimiser steps; ``patience`` counts validation rounds.

Data sources are files (NIfTI/NRRD/MHA/PNG or DICOM folders) or folders of PNG frames, given
relative to ``data_dir``. The train/validation split is made per FILE (patient / case level),
never per slice: each source has ``split = "train"`` or ``"val"``; when no source is marked
``"val"`` the files listed last are held out (``val_fraction`` of the distinct files; every entry of a
file listed twice, e.g. a ``coarsen`` copy, goes to the same side).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
try:
    import tomllib
except ImportError:  # Python < 3.11 (e.g. Slicer's Python 3.9)
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import InputError

#: ``mse_weighting`` -> exponent p of the per-sample weight ``(MSE + eps)^-p``
MSE_WEIGHT_POWER = {"none": 0.0, "mild": 0.25, "rmse": 0.5, "psnr": 1.0}

#: Bumped whenever a field changes meaning; written into every saved config.
CONFIG_VERSION = 1

MODALITIES = ("mri", "ct", "us")
MODELS = ("dualnet", "dncnn", "n2v")
STAGES = ("pretrain", "finetune")
#: validation scores export_best / patience can select on (TrainConfig.select_on)
SELECT_ON = ("ssim", "psnr", "psnr_pooled")


@dataclass
class DataSource:
    """One training / validation source.

    Attributes:
        path: file, DICOM folder or folder of PNG frames; relative paths are resolved
            against ``TrainConfig.data_dir``.
        split: ``"train"`` or ``"val"`` (the split is per source = per case / patient).
        frame: for a 4D file, the volume index along the 4th axis (0-based).
        crop: optional crop in array order, ``[z0, z1, y0, y1, x0, x1]`` (3D) or
            ``[y0, y1, x0, x1]`` (2D), half-open voxel ranges.
        frames: for a folder of PNG frames, the inclusive range ``[first, last]`` of the frame
            NUMBER parsed from the file name (e.g. ``0150.png`` -> 150); contiguous blocks keep
            neighbouring (correlated) frames on the same side of the split.
        licence: licence of the data (copied into the model card); filled from the shared
            data README when empty.
        brain_mask: tissue probability maps of this (3D) scan, on its grid (e.g. FSL FAST grey
            and white matter partial-volume maps; paths resolved like ``path``): the scan is read
            skull-stripped, every voxel outside the brain set to exactly 0
            (:mod:`dualnet.training.skull_strip`). List the scan twice, once with and once
            without, to train on both kinds of input.
        coarsen: integer factors (z, y, x) (or (y, x)) by which the clean scan is block-averaged
            when read, with the Gaussian anti-aliasing of :func:`dualnet.degrade.downsample`, its
            voxel size multiplied: a coarser clean scan (after ``brain_mask`` and ``crop``), so the
            network also learns at voxel sizes no source has (e.g. 3 mm CT from a 1 mm scan).
        weight: factor on this source's share of the training samples. Sources are drawn in
            proportion to their voxel count (after ``crop`` and ``coarsen``) times ``weight``, so a
            coarsened copy, which has few voxels, can be given the share it is meant to have.
    """

    path: str
    split: str = "train"
    frame: Optional[int] = None
    crop: Optional[List[int]] = None
    frames: Optional[List[int]] = None
    licence: str = ""
    brain_mask: Optional[List[str]] = None
    coarsen: Optional[List[int]] = None
    weight: float = 1.0


@dataclass
class TrainConfig:
    """Every hyperparameter of synthetic pretraining and self-supervised fine-tuning."""

    config_version: int = CONFIG_VERSION
    stage: str = "pretrain"  #: "pretrain" (supervised, synthetic noise) | "finetune" (self-supervised)
    model: str = "dualnet"  #: "dualnet" | "dncnn" (supervised residual) | "n2v" (masked, self-supervised)
    modality: str = "mri"
    preset: str = "tiny"  #: model size preset "tiny" | "small" | "base"
    dim: int = 2  #: 2 = slice-wise model (N,C,H,W); 3 = volumetric model (N,C,D,H,W)
    sr: bool = False  #: train the super-resolution head too (target: clean HR patch)
    use_neb: bool = True
    use_nonlocal: bool = True
    dropout: float = 0.1
    dropout_mode: str = "element"  #: "element" (voxel-wise) | "channel" (whole feature maps: cheaper on CPU)
    context: int = 1  #: 2D models: adjacent slices fed as input channels (2.5D; odd: 1, 3, 5, ...)
    #: DUAL-NET: residual dense blocks per scale of the restoration branch, full resolution first and
    #: the bottleneck last (levels + 1 ints); [] = the preset's
    blocks: List[int] = field(default_factory=list)
    noise_map: bool = False  #: feed the physics noise-std map as an input channel (the NEB refines it)
    noise_map_jitter: float = 0.25  #: training: the map's std is off by a random factor up to 1 + this (estimation error)
    # data / patches
    patch_size: int = 64  #: LR patch edge in voxels
    batch_size: int = 16
    slice_axes: List[int] = field(default_factory=lambda: [0])  #: 2D models: array axes slices are cut along
    #: 2D models: cut an image along an axis only where that slice's in-plane voxel sizes are within
    #: this ratio (e.g. no coronal slices of 5 mm axial CT); 0 = every axis of ``slice_axes``
    slice_max_anisotropy: float = 0.0
    min_foreground: float = 0.15  #: reject patches with less than this fraction of voxels above 5 % of scale
    levels: List[float] = field(default_factory=list)  #: [low, high] noise level range; empty = noise.LEVEL_RANGES
    level_sampling: str = "uniform"  #: "uniform" in [low, high] | "loguniform" (needs low > 0; favours low noise)
    lr_factor: int = 2  #: down-sampling factor of the simulated low-resolution acquisition (1 = denoise only)
    anisotropy: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  #: extra (z,y,x) down-sampling of degrade()
    slab_degrade: bool = True  #: 2D models on 3D images: degrade a 3-LR-slice slab in 3D, keep the middle slice
    blur_fwhm: float = 0.0  #: PSF FWHM in LR voxels passed to degrade(); 0 = degrade's default
    augment_flip: bool = True
    augment_rot90: bool = True
    elastic_prob: float = 0.25  #: probability of a light elastic deformation of the clean crop
    elastic_alpha: float = 2.0  #: elastic displacement amplitude in voxels
    intensity_jitter: float = 0.1  #: random +-fraction on the normalisation scale (robust to scale estimate)
    #: supervised pretraining on magnitude images (MRI, US): the clean crop's contrast is changed by a
    #: random power law, peak * (x / peak) ** g with log g uniform in [-log(1 + j), log(1 + j)], before
    #: the noise is simulated (more tissue contrasts from few scans; 0 = off)
    gamma_jitter: float = 0.0
    #: 2.5D models on near-isotropic 3D images: weight of the squared error of the three views' mean.
    #: Each step is then ``cubes_per_step`` low-resolution cubes of ``cube_size``^3 voxels; every slice
    #: of a cube along z, y and x is a 2.5D sample (3 x cube_size samples per cube, the usual per-slice
    #: losses), and the mean of the three views' outputs, as inference averages them, is scored
    #: against the clean cube (0 = off: independent slices, ``batch_size`` of them per step)
    view_loss: float = 0.0
    cube_size: int = 32
    cubes_per_step: int = 1
    #: with the view loss, every ``view_every``-th step (step 0, N, 2N, ...) is made of cubes and the
    #: others are ordinary batches of ``batch_size`` independent slices, so the 2D training images and
    #: the axes that cubes cannot be cut from are still seen (1 = every step cubes)
    view_every: int = 1
    val_fraction: float = 0.2  #: files held out when no source is marked split="val"
    val_patches: int = 24  #: fixed validation patches (pre-generated with seed + 12345)
    #: noise levels of the fixed validation patches, cycled over them (e.g. the levels a quality gate
    #: is judged at); empty = evenly spread over ``levels``
    val_levels: List[float] = field(default_factory=list)
    #: foreground fraction the validation patches need; -1 = as ``min_foreground``. 0 = patches
    #: anywhere in the held-out images, background included, as a whole-image PSNR sees them (a
    #: model that drifts in the background is then not selected)
    val_min_foreground: float = -1.0
    data_dir: str = ""  #: base folder of relative data paths; "" = $DUALNET_SHARED_DATA or ../shared/data
    data: List[DataSource] = field(default_factory=list)
    # optimisation
    steps: int = 1000
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.02  #: cosine schedule floor as a fraction of lr
    #: exponential moving average of the weights (``training.weight_average``): validation,
    #: ``export_best`` and the exported model use the average over about 1 / (1 - ema_decay) steps
    #: (0 = off: the weights after the last step)
    ema_decay: float = 0.0
    grad_clip: float = 1.0  #: max global gradient norm; 0 = off
    amp: bool = True  #: bf16 autocast on CUDA (ignored on CPU)
    #: bf16 autocast of the training steps on CPU (validation stays fp32): true | false | "auto" (on
    #: where the CPU has AVX-512 BF16 / AMX, ``device.cpu_has_fast_bf16``: measured 1.3-1.7x per step
    #: there; about 9x slower on AVX2-only CPUs, so "auto" leaves it off on those)
    cpu_bf16: Union[bool, str] = False
    # losses
    lambda_mse: float = 0.0  #: squared error (what PSNR measures)
    #: "none": the batch's mean squared error (the noisiest patches dominate); "psnr": each
    #: sample weighted by 1 / its own error (the gradient of the mean PSNR: every noise level
    #: counts alike in dB); "rmse": by 1 / sqrt(its error) (the mean RMSE, between the two);
    #: "mild": by its error ** -1/4 (between "none" and "rmse")
    mse_weighting: str = "none"
    #: MRI pretraining: "remove" takes the Rician noise floor of the clean scans' own acquisition
    #: out of the references (sqrt(max(m^2 - 2 sigma0^2, 0)), sigma0 estimated per scan), so the
    #: network learns the signal, not the source scanner's background floor; "keep" = as read
    clean_floor: str = "keep"
    #: magnitude images (MRI): the output is floored at physical 0 in the loss (per forward pass)
    #: and, through the card's ``output_floor``, at inference. A residual network otherwise has
    #: to copy the Rician floor of the air exactly to cancel it, and leaves a positive bias there
    nonnegative: bool = False
    lambda_l1: float = 1.0
    lambda_ssim: float = 0.2
    lambda_edge: float = 0.1
    lambda_neb: float = 0.05  #: NEB noise-std calibration (Gaussian KL, see losses.neb_kl)
    lambda_blind: float = 0.5  #: supervision of the blind-spot branch (pretraining)
    #: NEB confidence map (pretraining): binary cross-entropy of alpha against how close the blind-spot
    #: estimate is to the truth in noise stds (losses.confidence_target); 0 = alpha is an unsupervised gate
    lambda_alpha: float = 0.0
    #: the confidence head is trained by lambda_alpha alone: it reads the NEB features detached (a strong term
    #: otherwise disturbs the features the restoration branch reads and costs PSNR) and the restoration
    #: branch's gates read its output detached (the denoising loss otherwise keeps the map flat)
    alpha_detach: bool = False
    #: NEB confidence map: "gate" (the skip gates' own map, as in the v6 models) or "sigma_mlp" (a separate
    #: head of the features and the log noise std predicts it: the target depends on the level, which the
    #: features barely carry; the gates, hence the denoised output, are unchanged)
    confidence_head: str = "gate"
    lambda_sr: float = 1.0  #: SR head (Charbonnier + structure consistency)
    lambda_consistency: float = 0.1  #: self-supervised: alpha-weighted |out - blind|
    lambda_tv: float = 0.0  #: weak total variation on the output
    lambda_anchor: float = 0.0  #: fine-tuning: L1 to the frozen base model's output (keeps pretrained behaviour)
    neb_loss: str = "kl"  #: "kl" (known simulated std) | "nll" (residual NLL, no std needed)
    mask_ratio: float = 0.2  #: fraction of voxels masked for Noise2Void / Noise2Self
    mask_radius: int = 2  #: neighbour replacement radius (voxels)
    ss_loss: str = "l2"  #: self-supervised loss: masked "l2" | "l1" (Noise2Void), or "sure" (unmasked, Stein's unbiased risk estimate with the estimated noise model)
    sure_eps: float = 1e-3  #: SURE finite-difference step in normalised units
    #: SURE's domain: "auto" = the modality's noise model where plain SURE is biased (MRI: the Rician
    #: VST domain, whose optimum is the clean magnitude, not the noise floor), else plain;
    #: "gaussian" = the plain zero-mean form everywhere (what fine-tuning used before session 27)
    sure_domain: str = "auto"
    #: what fine-tuning trains: "all" weights, or "gains" = one gain per convolution filter, the
    #: rest frozen (:mod:`dualnet.training.gain_tuning`; GainTuning, Mohan et al. 2021)
    finetune_params: str = "all"
    #: fine-tuning: whole scans (the held-out ones, else the fitted one) on which the fine-tuned model
    #: must have a lower SURE than its base, or the base is written instead
    #: (:mod:`dualnet.training.base_check`); 0 = no check
    base_check: int = 2
    init_from: str = ""  #: pretraining: start from this model file's weights (same architecture); "" = random init
    #: init_from may differ from the configured DUAL-NET in the ablation switches (use_neb, use_nonlocal)
    #: or the confidence head (confidence_head): the weights both share are copied
    #: (models.dualnet.transplant_weights), for final-budget ablations and new heads on trained models
    init_partial: bool = False
    #: with init_partial: the learning rate of the parameters init_from did not have (added blocks, a new
    #: head), as a multiple of lr, so a continuation's low lr does not keep them at their initialisation
    new_lr_factor: float = 1.0
    #: train only the parameters whose names start with one of these prefixes (e.g. ["neb.confidence_head"]);
    #: [] = all. The others keep their (init_from) values.
    train_only: List[str] = field(default_factory=list)
    # run control
    seed: int = 0
    device: str = "auto"  #: "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    num_workers: int = 0  #: data-generation worker processes per rank
    checkpoint_every: int = 200
    val_every: int = 100
    log_every: int = 10
    patience: int = 0  #: early stop after this many validation rounds without SSIM gain; 0 = off
    export_best: bool = True  #: export the weights of the best validation score (else the last)
    #: validation score for export_best / patience: "ssim" | "psnr" (mean of the patches' PSNRs) |
    #: "psnr_pooled" (per validation level, the PSNR of the patches' pooled squared error, as a
    #: whole-image PSNR; then the mean over the levels)
    select_on: str = "ssim"
    threads: int = 0  #: torch CPU threads; 0 = torch default
    time_budget_s: float = 0.0  #: wall-clock budget; > 0: after 50 steps the run (and cosine) is shortened to fit

    # ------------------------------------------------------------------ validation
    def _blocks_fit_preset(self) -> bool:
        """``blocks`` holds one int >= 1 per scale of the preset (:func:`dualnet.presets.scale_blocks`)."""
        from ..presets import PRESETS, scale_blocks

        if self.preset not in PRESETS or not all(isinstance(b, int) and not isinstance(b, bool) for b in self.blocks):
            return False
        try:
            scale_blocks(list(self.blocks), PRESETS[self.preset]["levels"])
        except ValueError:
            return False
        return True

    def _check_types(self) -> None:
        """Each field of the type its declaration says (TOML gives "1000" or 1e3 where a number or a
        whole number is meant), numbers finite; :class:`InputError` naming the field."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            whole = isinstance(value, int) and not isinstance(value, bool)
            if kind == "int":
                ok = whole
            elif kind == "float":
                ok = (whole or isinstance(value, float)) and math.isfinite(value)
            elif kind in ("bool", "str"):
                ok = isinstance(value, bool if kind == "bool" else str)
            elif kind in ("List[int]", "List[float]", "List[str]"):
                item = {"List[int]": int, "List[float]": (int, float), "List[str]": str}[kind]
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, item) and not isinstance(v, bool) and (not isinstance(v, float) or math.isfinite(v))
                    for v in value)
            else:
                continue
            if not ok:
                what = {"int": "a whole number", "float": "a finite number", "bool": "true or false",
                        "str": "a string", "List[int]": "a list of whole numbers",
                        "List[float]": "a list of finite numbers", "List[str]": "a list of strings"}[kind]
                raise InputError(f"training config: {f.name} must be {what}, got {value!r}")

    def validate(self) -> "TrainConfig":
        """Check values; raise :class:`InputError` naming the first bad field."""
        self._check_types()
        if self.config_version > CONFIG_VERSION:
            raise InputError(f"config_version {self.config_version} is newer than this dualnet ({CONFIG_VERSION})")
        checks = [
            (self.val_patches >= 1, "val_patches must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.time_budget_s >= 0, "time_budget_s must be >= 0 (0 = none)"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]"),
            (0 <= self.seed < 2 ** 32, "seed must be in 0..2^32-1"),
            (0.0 <= self.intensity_jitter < 1.0, "intensity_jitter must be in [0, 1)"),
            (min(self.patience, self.warmup_steps, self.mask_radius, self.num_workers, self.threads) >= 0,
             "patience, warmup_steps, mask_radius, num_workers and threads must be >= 0"),
            (min(self.weight_decay, self.grad_clip, self.elastic_alpha, self.blur_fwhm) >= 0,
             "weight_decay, grad_clip, elastic_alpha and blur_fwhm must be >= 0"),
            (0.0 <= self.elastic_prob <= 1.0 and 0.0 <= self.min_foreground <= 1.0,
             "elastic_prob and min_foreground must be in [0, 1]"),
            *((getattr(self, f.name) >= 0, f"{f.name} must be >= 0 (a loss weight)")
              for f in dataclasses.fields(self) if f.name.startswith("lambda_")),
            (self.stage in STAGES, f"stage must be one of {STAGES}"),
            (self.model in MODELS, f"model must be one of {MODELS}"),
            (self.modality in MODALITIES, f"modality must be one of {MODALITIES}"),
            (self.dim in (2, 3), "dim must be 2 or 3"),
            (self.patch_size >= 8, "patch_size must be >= 8"),
            (self.context >= 1 and self.context % 2 == 1, "context must be an odd number of slices >= 1"),
            (self.context == 1 or self.dim == 2, "context > 1 needs dim = 2"),
            (not (self.context > 1 or self.noise_map) or (self.model == "dualnet" and not self.sr),
             "context / noise_map need model = 'dualnet' and sr = false"),
            (self.noise_map_jitter >= 0, "noise_map_jitter must be >= 0"),
            (self.select_on in SELECT_ON, f"select_on must be one of {SELECT_ON}"),
            (all(v > 0 for v in self.val_levels), "val_levels must be > 0"),
            (self.val_min_foreground == -1.0 or 0.0 <= self.val_min_foreground <= 1.0,
             "val_min_foreground must be -1 (as min_foreground) or in [0, 1]"),
            (self.mse_weighting in MSE_WEIGHT_POWER, "mse_weighting must be one of " + ", ".join(map(repr, MSE_WEIGHT_POWER))),
            (self.clean_floor in ("keep", "remove"), "clean_floor must be 'keep' or 'remove'"),
            (self.dropout_mode in ("element", "channel"), "dropout_mode must be 'element' or 'channel'"),
            (isinstance(self.nonnegative, bool), "nonnegative must be true or false"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_factor >= 1, "lr_factor must be >= 1"),
            (not self.sr or (self.lr_factor == 2 and self.model == "dualnet"), "sr = true needs model = 'dualnet' and lr_factor = 2 (x2 SR head)"),
            (0.0 < self.mask_ratio < 1.0, "mask_ratio must be in (0, 1)"),
            (self.neb_loss in ("kl", "nll"), "neb_loss must be 'kl' or 'nll'"),
            (self.ss_loss in ("l1", "l2", "sure"), "ss_loss must be 'l1', 'l2' or 'sure'"),
            (self.sure_eps > 0, "sure_eps must be > 0"),
            (self.sure_domain in ("auto", "gaussian"), "sure_domain must be 'auto' or 'gaussian'"),
            (self.finetune_params in ("all", "gains"), "finetune_params must be 'all' or 'gains'"),
            (self.base_check >= 0, "base_check must be >= 0"),
            (self.level_sampling in ("uniform", "loguniform"), "level_sampling must be 'uniform' or 'loguniform'"),
            (self.level_sampling != "loguniform" or (len(self.levels) == 2 and self.levels[0] > 0),
             "level_sampling = 'loguniform' needs levels = [low, high] with low > 0"),
            (len(self.levels) in (0, 2), "levels must be [] or [low, high]"),
            (all(a in (0, 1, 2) for a in self.slice_axes) and len(self.slice_axes) > 0, "slice_axes must be in 0..2"),
            (self.lambda_alpha >= 0, "lambda_alpha must be >= 0"),
            (self.gamma_jitter >= 0, "gamma_jitter must be >= 0"),
            (isinstance(self.alpha_detach, bool), "alpha_detach must be true or false"),
            (isinstance(self.init_partial, bool), "init_partial must be true or false"),
            (isinstance(self.cpu_bf16, bool) or self.cpu_bf16 == "auto", "cpu_bf16 must be true, false or 'auto'"),
            (not self.init_partial or (self.init_from and self.model == "dualnet"),
             "init_partial needs init_from and model = 'dualnet'"),
            (isinstance(self.new_lr_factor, (int, float)) and not isinstance(self.new_lr_factor, bool)
             and math.isfinite(self.new_lr_factor) and self.new_lr_factor > 0, "new_lr_factor must be a number > 0"),
            (self.new_lr_factor == 1 or self.init_partial, "new_lr_factor needs init_partial (the new parameters)"),
            (all(isinstance(x, str) and x for x in self.train_only), "train_only must be a list of parameter-name prefixes"),
            (self.confidence_head in ("gate", "sigma_mlp"), "confidence_head must be 'gate' or 'sigma_mlp'"),
            (not self.blocks or (self.model == "dualnet" and self._blocks_fit_preset()),
             "blocks needs model = 'dualnet' and one int >= 1 per scale of the preset (its levels + 1, "
             "full resolution first, bottleneck last)"),
            (self.gamma_jitter == 0 or self.modality in ("mri", "us"),
             "gamma_jitter needs a magnitude modality (mri or us): CT values are calibrated HU"),
            (self.slice_max_anisotropy == 0 or self.slice_max_anisotropy >= 1,
             "slice_max_anisotropy must be 0 (no limit) or >= 1"),
            (self.view_loss >= 0, "view_loss must be >= 0"),
            (self.view_loss == 0 or (self.dim == 2 and not self.sr and self.lr_factor >= 1 and
                                     sorted(set(self.slice_axes)) == [0, 1, 2]),
             "view_loss needs dim = 2, sr = false and slice_axes = [0, 1, 2] (the views inference averages)"),
            (self.cube_size >= 8, "cube_size must be >= 8"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0 = off)"),
            (self.cubes_per_step >= 1, "cubes_per_step must be >= 1"),
            (self.view_every >= 1, "view_every must be >= 1"),
            (self.checkpoint_every >= 1 and self.val_every >= 1 and self.log_every >= 1, "*_every must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(f"training config: {msg}")
        for src in self.data:
            if src.split not in ("train", "val"):
                raise InputError(f"training config: data source {src.path}: split must be 'train' or 'val'")
            if src.brain_mask is not None and (isinstance(src.brain_mask, str) or not src.brain_mask):
                raise InputError(f"training config: data source {src.path}: brain_mask must be a non-empty list of files")
            if src.coarsen is not None and (isinstance(src.coarsen, (str, int)) or len(src.coarsen) not in (2, 3) or any(
                    not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in src.coarsen)):
                raise InputError(f"training config: data source {src.path}: coarsen must be 2 or 3 integers >= 1 (z, y, x)")
            if (isinstance(src.weight, bool) or not isinstance(src.weight, (int, float))
                    or not math.isfinite(src.weight) or src.weight <= 0):
                raise InputError(f"training config: data source {src.path}: weight must be a finite number > 0, "
                                 f"got {src.weight!r}")
        return self

    # ------------------------------------------------------------------ dict / TOML
    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (JSON / TOML serialisable; ``None`` values dropped)."""
        return _drop_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a dict (unknown keys -> InputError naming them)."""
        raw = dict(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise InputError(f"{source}: unknown training option(s): {', '.join(unknown)}")
        data = raw.pop("data", [])
        src_names = {f.name for f in dataclasses.fields(DataSource)}
        sources = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                item = {"path": item}
            bad = sorted(set(item) - src_names)
            if bad or "path" not in item:
                raise InputError(f"{source}: data source #{i + 1}: unknown key(s) {bad} or missing 'path'")
            sources.append(DataSource(**item))
        try:
            cfg = cls(**raw, data=sources)
        except TypeError as err:
            raise InputError(f"{source}: {err}") from None
        for name in ("levels", "anisotropy"):  # whole numbers from TOML / JSON as floats (validate checks the rest)
            value = getattr(cfg, name)
            if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in value):
                setattr(cfg, name, [float(v) for v in value])
        return cfg.validate()

    @classmethod
    def from_toml(cls, path: Union[str, os.PathLike]) -> "TrainConfig":
        """Read a TOML config file; errors name the file."""
        p = Path(path)
        try:
            with open(p, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise InputError(f"{p}: no such config file") from None
        except tomllib.TOMLDecodeError as err:
            raise InputError(f"{p}: invalid TOML ({err})") from None
        return cls.from_dict(raw, source=str(p))

    def to_toml(self) -> str:
        """TOML text of this config (scalars first, then ``[[data]]`` tables)."""
        return dumps_toml(self.to_dict())

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``to_toml()`` atomically to ``path``."""
        from ..io import atomic_write_bytes

        return atomic_write_bytes(path, self.to_toml().encode("utf-8"))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes).validate()


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(d: Dict[str, Any]) -> str:
    """Minimal TOML writer: top-level scalars and lists, plus arrays of flat tables.

    Enough for :class:`TrainConfig` (tomllib reads it back to the same dict).
    """
    lines: List[str] = [f"# dualnet training config (config_version {d.get('config_version', CONFIG_VERSION)})"]
    tables: List[tuple] = []
    for key, value in d.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            tables.append((key, value))
        elif isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        items = value if isinstance(value, list) else [value]
        for item in items:
            lines.append("")
            lines.append(f"[[{key}]]" if isinstance(value, list) else f"[{key}]")
            for k, v in item.items():
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def load_config(path: Optional[Union[str, os.PathLike]] = None, **overrides: Any) -> TrainConfig:
    """Config from ``path`` (or defaults) with keyword overrides (``None`` overrides ignored)."""
    cfg = TrainConfig.from_toml(path) if path else TrainConfig()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**changes) if changes else cfg.validate()


def default_data_dir() -> Path:
    """``$DUALNET_SHARED_DATA`` or ``<repo>/../shared/data`` (the real scans beside the checkout)."""
    env = os.environ.get("DUALNET_SHARED_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "data"


def config_dir() -> Path:
    """Folder of the shipped TOML configs (``dualnet/configs``)."""
    return Path(__file__).resolve().parents[1] / "configs"
