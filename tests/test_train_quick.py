"""Smoke tests of large_batch_study/train_large_batch.py (seconds, synthetic IDX data, no download), LARS
as the paper writes it, and the paper's Section 4.2 counterexample F(x) = 0.5 (x + 1)^2."""

import gzip
import json
import math
import os
import struct
import warnings

import numpy as np
import pytest
import torch

from kit import importable, load_script

STUDY = importable("large_batch_study")

from train.data import batches, load_fashion_mnist, read_idx  # noqa: E402
from train.lars import LARS  # noqa: E402
from train.runner import cosine_factor, train_run  # noqa: E402
from train.tasks import ImageTask  # noqa: E402

from sngm_ext import SNGM  # noqa: E402


def _cli():
    return load_script(os.path.join(STUDY, "train_large_batch.py"), "train_large_batch")


def _write_idx(path, arr):
    arr = np.asarray(arr)
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    """A tiny learnable stand-in for Fashion-MNIST in the real files' names and IDX format."""
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, size=(10, 28, 28))

    def make(n):
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = np.clip(protos[y] + rng.normal(0, 40, size=(n, 28, 28)), 0, 255).astype(np.uint8)
        return x, y

    xtr, ytr = make(700)
    xte, yte = make(200)
    _write_idx(d / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(d / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", yte)
    return str(d), xtr, ytr


def test_read_idx_and_splits(fake_fmnist):
    root, xtr, ytr = fake_fmnist
    assert np.array_equal(read_idx(os.path.join(root, "train-images-idx3-ubyte.gz")), xtr)
    assert np.array_equal(read_idx(os.path.join(root, "train-labels-idx1-ubyte.gz")), ytr)
    data = load_fashion_mnist(root, val_size=100, train_subset=300)
    assert data.train.x.shape == (300, 1, 28, 28) and data.val.x.shape == (100, 1, 28, 28)
    assert data.test.y.shape == (200,) and data.train.y.dtype == torch.int64
    assert abs(data.train.x.mean().item()) < 1e-4 and abs(data.train.x.std().item() - 1) < 1e-3
    # batches: every sample once per epoch, in an order set by the generator
    seen = torch.cat([y for _, y in batches(data.train, 128, torch.Generator().manual_seed(0))])
    assert seen.shape == (300,) and sorted(seen.tolist()) == sorted(data.train.y.tolist())
    again = torch.cat([y for _, y in batches(data.train, 128, torch.Generator().manual_seed(0))])
    assert torch.equal(seen, again)


def test_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


def test_cosine_schedule_is_the_papers():
    assert cosine_factor(0, 160) == 1.0
    # pi * 80 / 160 is pi / 2 within 2 ulps (4.4e-16), whose cosine (< 5e-16) 1 + cos absorbs up to
    # an ulp of 1: 0.5 within 2^-53 relative; the second is the paper's formula itself, to the bit
    assert math.isclose(cosine_factor(80, 160), 0.5, rel_tol=2.0**-52)
    assert cosine_factor(159, 160) == 0.5 * (1 + math.cos(math.pi * 159 / 160))


def test_cli_quick_tiny_writes_json_table_and_plot(fake_fmnist, tmp_path, capsys):
    root = fake_fmnist[0]
    out = str(tmp_path / "train_test")
    rc = _cli().main(["--quick", "--data-dir", root, "--val-size", "100", "--train-subset", "256",
                      "--epochs", "2", "--batch-sizes", "32,256", "--optimizers", "msgd,lars,sngm,sngd",
                      "--device", "cpu", "--threads", "1", "--out", out])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Table 2" in printed and "SNGM" in printed and "LARS" in printed
    res = json.load(open(out + ".json"))
    assert res["schema"] == "sngm-ext/train_large_batch/v1"
    for k in ("command", "settings", "environment", "data", "runs", "selection", "table", "wall_time_s"):
        assert k in res
    s = res["settings"]
    assert s["momentum"] == 0.9 and s["weight_decay"] == 1e-4 and s["epochs"] == 2
    assert res["data"]["n_train"] == 256 and res["data"]["n_val"] == 100
    assert len(res["runs"]) == 8 and len(res["table"]) == 8
    for r in res["runs"]:
        assert {"model", "optimizer", "batch_size", "lr", "seed", "steps", "final", "curves"} <= set(r)
        assert len(r["curves"]) == 2 and r["steps"] == 2 * math.ceil(256 / r["batch_size"])
        # LambdaLR: lr * cosine_factor(1, 2), and 1 + cos(pi / 2) (~6e-17) rounds to 1: half, exactly
        assert r["curves"][0]["lr"] == r["lr"] and r["curves"][1]["lr"] == r["lr"] * 0.5
        for c in r["curves"]:
            assert {"epoch", "lr", "train_loss", "test_acc", "test_loss"} <= set(c)
        assert 0 <= r["final"]["val_acc"] <= 1 and 0 <= r["final"]["test_acc"] <= 1
    assert os.path.exists(out + ".md") and os.path.exists(out + "_cnn.png")
    os.remove(out + ".md")
    assert _cli().main(["--report-only", "--out", out, "--no-plots"]) == 0
    md = open(out + ".md").read()
    assert "| MSGD |" in md and "| SNGM |" in md and "Command: `python large_batch_study/train_large_batch.py --quick" in md


def test_grid_selection_uses_validation(fake_fmnist, tmp_path):
    root = fake_fmnist[0]
    out = str(tmp_path / "train_grid")
    rc = _cli().main(["--data-dir", root, "--val-size", "100", "--train-subset", "128", "--epochs", "1",
                      "--batch-sizes", "64", "--optimizers", "sngm", "--lr", "sngm@64=0.01,0.1",
                      "--extend-edge", "0", "--device", "cpu", "--threads", "1", "--out", out, "--no-plots"])
    assert rc == 0
    res = json.load(open(out + ".json"))
    (sel,) = res["selection"]
    runs = {r["lr"]: r for r in res["runs"]}
    assert sel["grid"] == [0.01, 0.1]
    best = max(runs.values(), key=lambda r: (r["final"]["val_acc"], -r["final"]["val_loss"]))
    assert sel["chosen_lr"] == best["lr"] and res["table"][0]["lr"] == best["lr"]


def test_resnet_trains_one_epoch(fake_fmnist):
    data = load_fashion_mnist(fake_fmnist[0], val_size=50, train_subset=64, test_subset=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = train_run(ImageTask(), data, "resnet", "sngm", 32, 0.1, 0, 1)
    assert r["steps"] == 2 and math.isfinite(r["final"]["train_loss"])


def lars_fp64_tol(steps):
    """LARS against its formula by hand, both in fp64, after ``steps`` steps on params of <= 16
    elements with entries and steps of order 1: per step each side's norms (sums of <= 16 squares,
    gamma_16 each; Higham eq. 3.4), their ratio and the products and sum (a few u64) give the
    step term within 2 gamma_16 + 8 u64 and the param within one more rounding, so the two sides
    within 2 (2 gamma_16 + 10 u64) = 84 u64 at the elements' scale; each step carries the last on
    (through ||w||, by a factor 1 + lr): 128 u64 per step."""
    tol = 128 * steps * 2.0**-53
    return dict(rtol=tol, atol=tol)


def test_lars_matches_the_papers_formula():
    """Section 4.2 (momentum 0, no weight decay): w_s <- w_s - lr * ||w_s|| * g_s / ||g_s|| per block."""
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    grads = [torch.randn_like(t) for t in w]
    params = [t.clone().requires_grad_() for t in w]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    LARS(params, lr=0.1, momentum=0.0).step()
    for p, w0, gr in zip(params, w, grads):
        expect = w0 - 0.1 * w0.norm() * gr / gr.norm()
        torch.testing.assert_close(p.detach(), expect, **lars_fp64_tol(1))


def test_lars_momentum_and_weight_decay():
    """Ref. [24]'s LARS: m = b m + (g + wd w), w -= lr ||w|| m / ||m|| (the (1-b) factor cancels)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64)
    gs = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    p = w.clone().requires_grad_()
    opt = LARS([p], lr=0.05, momentum=0.9, weight_decay=1e-2)
    ref, m = w.clone(), torch.zeros_like(w)
    for gr in gs:
        p.grad = gr.clone()
        opt.step()
        m = 0.9 * m + (gr + 1e-2 * ref)
        ref = ref - 0.05 * ref.norm() * m / m.norm()
        torch.testing.assert_close(p.detach(), ref, **lars_fp64_tol(len(gs)))


def test_lars_zero_weight_takes_plain_step():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    LARS([p], lr=0.1, momentum=0.9).step()
    # fp32: fl(fl(lr) * g) and 0 - it, against the fp32 roundings of the expected values
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.2, -0.05]), rtol=3 * 2.0**-24,
                               atol=0)


def _minimize(opt_factory, x0=1.0, steps=400):
    """F(x) = 0.5 (x + 1)^2, minimum at x* = -1, with the lr decayed by the paper's cosine."""
    x = torch.tensor([x0], dtype=torch.float64, requires_grad=True)
    opt = opt_factory([x])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine_factor(t, steps))
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (x + 1) ** 2).sum().backward()
        opt.step()
        sched.step()
        traj.append(x.item())
    return traj


def test_counterexample_lars_goes_to_zero_sngm_to_minus_one():
    """Section 4.2: with phi(z) = z, LARS is x <- (1 - lr) x for x > 0: it goes to 0, never to -1."""
    lars = _minimize(lambda ps: LARS(ps, lr=0.1, momentum=0.0))
    # x_400 = prod (1 - 0.1 cosine_factor(t)) = 8.8e-10: 1e-3 is "went to 0"
    assert all(v > 0 for v in lars) and lars[-1] < 1e-3
    # the exact iteration of the paper on the first steps: x_{t+1} = (1 - lr_t) x_t
    x, expect = 1.0, []
    for t in range(5):
        x = (1 - 0.1 * cosine_factor(t, 400)) * x
        expect.append(x)
    # x (1 - lr_t) both ways, lr_t = 0.1 * cosine_factor(t) (LambdaLR's product): a few fp64
    # roundings per step on each side (LARS: ||x||, ||g||, their ratio, the products, the sum),
    # under 10 u64 per step: 5 steps within 100 u64 relative
    assert lars[:5] == pytest.approx(expect, rel=100 * 2.0**-53, abs=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sngm = _minimize(lambda ps: SNGM(ps, lr=0.05, momentum=0.9))
        sngd = _minimize(lambda ps: SNGM(ps, lr=0.05, momentum=0.0))
    # convergence, not rounding: they end 8e-5 and 4e-7 from -1 (the cosine lr shrinks the
    # steps), LARS at 0, 1 away
    assert abs(sngm[-1] + 1) < 1e-2 and abs(sngd[-1] + 1) < 1e-2
