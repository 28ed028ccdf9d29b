"""SNGM inside a real Lightning Trainer (CPU): what ``configure_optimizers`` returns is driven by
Lightning's own loop (closure, gradient clipping, accumulation, a per-step LR scheduler,
bf16 autocast) and must give bitwise what the same plain PyTorch loop gives; Lightning's
checkpoint must carry SNGM's state and restore it exactly, and hold it in SGD's format.

scripts/setup.sh installs lightning (--no-deps); without it these tests skip, except in CI. Every
CPU backend (conftest's ``backend``); the problem is kit.py's, shared with test_hf_trainer.py.
"""

import pytest
import torch

from kit import import_tool, regression_data, trainer_net, trainer_opt
from sngm_ext import SNGM

L = import_tool("lightning")

X, Y = regression_data()
BATCH = 16


def _loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)


class Module(L.LightningModule):
    def __init__(self, backend):
        super().__init__()
        self.net = trainer_net()
        self.backend = backend

    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt, sched = trainer_opt(self.parameters(), self.backend)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(max_steps, **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def _plain_loop(backend, n_steps, accumulate=1, clip=None, bf16=False):
    """What Lightning's automatic optimization does, written out."""
    net = trainer_net()
    opt, sched = trainer_opt(net.parameters(), backend)
    batches = [(X[i:i + BATCH], Y[i:i + BATCH]) for i in range(0, len(X), BATCH)]
    done, k = 0, 0
    while done < n_steps:
        x, y = batches[k % len(batches)]
        k += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.mse_loss(net(x), y)
        (loss / accumulate).backward()
        if k % accumulate:
            continue
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        done += 1
    return net, opt


@pytest.mark.parametrize("kw,plain", [
    ({}, {}),
    (dict(gradient_clip_val=0.05, accumulate_grad_batches=2), dict(clip=0.05, accumulate=2)),
    (dict(precision="bf16-mixed"), dict(bf16=True)),
], ids=["plain", "clip+accumulate", "bf16-mixed"])
def test_fit_is_the_plain_loop(backend, kw, plain):
    module = Module(backend)
    trainer = _trainer(6, **kw)
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert isinstance(opt, SNGM)  # Lightning drives SNGM itself, not a copy
    ref, ref_opt = _plain_loop(backend, 6, **plain)
    for a, b in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])
    assert torch.equal(opt.grad_norm, ref_opt.grad_norm)
    assert int(opt.skipped_steps) == 0
    # the clipped run really was clipped: its steps differ from the unclipped loop's
    if "clip" in plain:
        free, _ = _plain_loop(backend, 6, accumulate=2)
        assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), free.parameters()))


def test_checkpoint_restores_sngm_state(backend, tmp_path):
    """trainer.save_checkpoint holds SNGM's state in SGD's format; ckpt_path= restores it exactly
    into the new run's SNGM before its first step."""
    m1 = Module(backend)
    t1 = _trainer(4)
    t1.fit(m1, _loader())
    path = str(tmp_path / "sngm.ckpt")
    t1.save_checkpoint(path)
    saved = t1.optimizers[0].state_dict()

    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, module):
            sd = trainer.optimizers[0].state_dict()  # live tensors: the run goes on stepping them
            seen["groups"] = sd["param_groups"]
            seen["momentum"] = {k: st["momentum_buffer"].clone() for k, st in sd["state"].items()}
            seen["params"] = [p.detach().clone() for p in module.net.parameters()]

    m2 = Module(backend)
    _trainer(6, callbacks=[Capture()]).fit(m2, _loader(), ckpt_path=path)
    assert seen["groups"] == saved["param_groups"]
    assert seen["momentum"].keys() == saved["state"].keys()
    for k, st in saved["state"].items():
        assert torch.equal(seen["momentum"][k], st["momentum_buffer"])
    for a, b in zip(seen["params"], m1.net.parameters()):
        assert torch.equal(a, b)

    # the file's optimizer state is SGD's format: torch.optim.SGD loads it as it is
    ckpt = torch.load(path, weights_only=False)
    net = trainer_net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(ckpt["optimizer_states"][0])
    for p, (k, st) in zip(net.parameters(), sorted(saved["state"].items())):
        assert torch.equal(sgd.state[p]["momentum_buffer"], st["momentum_buffer"])
