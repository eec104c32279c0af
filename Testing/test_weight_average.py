"""The moving average of the weights (``TrainConfig.ema_decay``, ``training.weight_average``).

Real seams only: the real trainer on the real T1 crop with the tiny preset, its real checkpoints
and model files.
"""

from __future__ import annotations

import pytest
import torch

from dualnet import modelfile
from dualnet.errors import CancelledError, InputError, ModelError
from dualnet.progress import CancelToken
from dualnet.training.config import TrainConfig
from dualnet.training.trainer import atomic_torch_save, checkpoint_digest, load_checkpoint, pretrain
from dualnet.training.weight_average import WeightAverage


def test_the_average_follows_the_formula_and_restores_the_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(net, 0.5)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    avg.update(net, step=100)  # d = min(0.5, 101 / 110) = 0.5
    assert torch.allclose(avg.shadow["0.weight"], w0 + 0.5)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    avg.update(net, step=0)  # d = min(0.5, 1 / 10) = 0.1: the early steps follow the weights
    assert torch.allclose(avg.shadow["0.weight"], 0.1 * (w0 + 0.5) + 0.9 * (w0 + 2.0))
    assert "1.num_batches_tracked" not in avg.shadow  # integer buffers are not averaged
    with avg.applied(net):
        assert torch.allclose(net[0].weight, avg.shadow["0.weight"])
    assert torch.allclose(net[0].weight, w0 + 2.0)  # the model's own weights are back
    with pytest.raises(ValueError, match="keys"):
        avg.load_state_dict({"0.weight": w0})
    with pytest.raises(ValueError):
        WeightAverage(net, 1.0)


def test_ema_decay_config_checks():
    for bad in (-0.1, 1.0):
        with pytest.raises(InputError, match="ema_decay"):
            TrainConfig(modality="mri", preset="tiny", ema_decay=bad).validate()


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=2, steps=8, lr=1e-3,
                warmup_steps=1, val_every=4, checkpoint_every=100, log_every=1, val_patches=2,
                elastic_prob=0.0, device="cpu", seed=3, threads=1, min_foreground=0.1, ema_decay=0.8,
                export_best=False)
    base.update(kw)
    return TrainConfig(**base).validate()


def test_training_exports_the_average_and_resumes_it(tmp_path, mri_crop):
    data = [(mri_crop[:, :48, :48], (1.0, 1.0, 1.0))]
    ref = pretrain(_cfg(), data=data, out_dir=tmp_path / "ref")
    ck = load_checkpoint(ref.checkpoint_path)
    net, card = modelfile.load_model(ref.model_path, "cpu")
    exported = net.state_dict()
    assert card["config"]["ema_decay"] == 0.8 and card["training"]["exported_step"] == 8
    for k, v in ck["ema"].items():  # the exported model is the average, not the last weights
        assert torch.allclose(exported[k].float(), v.float()), k
    assert any(not torch.allclose(ck["model"][k].float(), v.float()) for k, v in ck["ema"].items())

    # cancelled at step 4 and resumed: the average carries on as if never interrupted
    token = CancelToken()

    def prog(frac, msg):
        if msg.startswith("step 4/"):
            token.cancel()

    cut = tmp_path / "cut"
    with pytest.raises(CancelledError):
        pretrain(_cfg(), data=data, out_dir=cut, progress=prog, cancel=token)
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 4
    res = pretrain(_cfg(), data=data, out_dir=cut, resume=True)
    assert res.steps == 8
    a, b = ck["ema"], load_checkpoint(res.checkpoint_path)["ema"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k


def test_a_checkpoint_with_a_foreign_average_is_refused(tmp_path, mri_crop):
    data = [(mri_crop[:, :48, :48], (1.0, 1.0, 1.0))]
    res = pretrain(_cfg(steps=2), data=data, out_dir=tmp_path / "run")
    ck = load_checkpoint(res.checkpoint_path)
    ck["ema"] = {"not.a.weight": torch.zeros(2)}
    ck["sha256"] = checkpoint_digest(ck)
    atomic_torch_save(ck, res.checkpoint_path)
    with pytest.raises(ModelError, match="incompatible checkpoint"):
        pretrain(_cfg(steps=4), data=data, out_dir=tmp_path / "run", resume=True)
