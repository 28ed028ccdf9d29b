"""SNGM inside a real Hugging Face ``transformers.Trainer`` (CPU), handed in as
``optimizers=(SNGM, scheduler)``: the Trainer's loop (accelerate's optimizer wrapper, its gradient
clipping and accumulation, a per-step LR scheduler) must give bitwise what the same plain PyTorch
loop gives, and a run resumed from the Trainer's checkpoint (its ``optimizer.pt`` is SNGM's
``state_dict()``) must end exactly where the uninterrupted run ends.

scripts/setup.sh installs transformers (--no-deps); without it these tests skip, except in CI.
Every CPU backend (conftest's ``backend``); the problem is kit.py's, shared with test_lightning.py.
"""

import os

import pytest
import torch

from kit import import_tool, regression_data, trainer_net, trainer_opt

transformers = import_tool("transformers")
Trainer, TrainingArguments = transformers.Trainer, transformers.TrainingArguments

X, Y = regression_data()
BATCH = 16
CLIP = 0.05  # small enough that every step is clipped


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return {"x": X[i], "labels": Y[i]}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = trainer_net()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class InOrder(Trainer):
    """The batches in dataset order, so that a plain loop can replay them."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _train(backend, out, steps, accumulate=1, resume=None, save_steps=None):
    net = Net()
    opt, sched = trainer_opt(net.parameters(), backend)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps,
        gradient_accumulation_steps=accumulate, max_grad_norm=CLIP, use_cpu=True,
        report_to="none", logging_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    trainer = InOrder(model=net, args=args, train_dataset=Pairs(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    return net, opt


def _plain_loop(backend, steps, accumulate=1):
    net = Net()
    opt, sched = trainer_opt(net.parameters(), backend)
    k = 0
    for _ in range(steps):
        for _ in range(accumulate):
            i = (k % (len(X) // BATCH)) * BATCH
            k += 1
            (net(X[i:i + BATCH], Y[i:i + BATCH])["loss"] / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
    return net, opt


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_is_the_plain_loop(backend, tmp_path, accumulate):
    net, opt = _train(backend, tmp_path, 5, accumulate=accumulate)
    ref, ref_opt = _plain_loop(backend, 5, accumulate=accumulate)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])
    assert torch.equal(opt.grad_norm, ref_opt.grad_norm)
    assert int(opt.skipped_steps) == 0


def test_resume_from_checkpoint_is_exact(backend, tmp_path):
    full, full_opt = _train(backend, tmp_path, 6, save_steps=4)
    assert os.path.isfile(tmp_path / "checkpoint-4" / "optimizer.pt")
    resumed, res_opt = _train(backend, tmp_path, 6, resume=str(tmp_path / "checkpoint-4"))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(full_opt.state[a]["momentum_buffer"], res_opt.state[b]["momentum_buffer"])
    # and the 4 steps before the checkpoint did happen in the resumed run: from a fresh start,
    # 2 steps end elsewhere
    short, _ = _plain_loop(backend, 2)
    assert any(not torch.equal(a, b) for a, b in zip(short.parameters(), resumed.parameters()))
