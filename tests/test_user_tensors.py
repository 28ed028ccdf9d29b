"""SNGM leaves the user's tensors alone: params, grads, checkpoints and memory behave as with SGD.

Every test runs real torch objects (modules, autograd, torch.save, pickle, safetensors) and holds
SNGM to what torch.optim.SGD does in the same test; where values are compared, the fused backend is
held to backend="reference" run the same way. These are the guarantees the fused backends lost when
they re-pointed ``p.data`` / ``p.grad`` into flat buckets: each test here fails under such a design.
"""

import collections
import copy
import functools
import io
import pickle
import types
import warnings

import pytest
import torch
from torch import nn

from bounds import step_error_bounds
from kit import (Magnitudes, Problem, Task, assert_runs_close, assert_within, convnet, mlp,
                 values)
from sngm_ext import SNGM

LR, MOMENTUM, WD = 0.05, 0.9, 1e-3


# ---------------------------------------------------------------- models, data, optimizers


# Several Linear layers, the middle one without bias; a small convnet; inputs in the model's dtype.
MLP = Problem(functools.partial(mlp, (12, 32, 24, 5), bias=(True, False, True)),
              Task((16, 12), 5, seed=1000))
WIDE_MLP = Problem(functools.partial(mlp, (64, 256, 256, 10), bias=(True, False, True)),
                   Task((16, 64), 5, seed=1000))  # ~85k params, 21 chunks
CONVNET = Problem(convnet, Task((4, 3, 8, 8), 5, seed=1000))


def make_opt(kind, params, nib=False):
    """``kind`` is "sgd" (torch.optim.SGD, same hyper-parameters) or an SNGM backend name."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    return SNGM(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, backend=kind,
                norm_in_backward=nib)


def kinds(backend):
    """SGD, the backend under test and the reference (once each)."""
    return list(dict.fromkeys(("sgd", backend, "reference")))


def nib_or_skip(backend, nib):
    if nib and backend == "reference":
        pytest.skip("norm_in_backward needs a fused backend")
    return nib


NIB = pytest.mark.parametrize("nib", [False, True], ids=["hooks_off", "norm_in_backward"])


def own_storage(t):
    """t's storage holds exactly t (no bucket, no neighbour)."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def check_step_uses_grads_as_they_are(kind, opt, params):
    """Run opt.step() and check it used each ``p`` and ``p.grad`` as they are now, by hand in fp64.

    SGD and SNGM take the same direction ``d = g + wd * w``: SGD's buffer becomes
    ``momentum * u + d``, SNGM's ``momentum * u + d / n`` with ``n`` the global norm of ``d``
    (which SNGM reports as ``grad_norm``); then ``w -= lr * u`` for both. Each within
    bounds.step_error_bounds of the fp64 values: a few units of the dtype at each element's scale
    (SGD's torch ops round every result to the param's dtype).
    """
    dtype = params[0].dtype
    w0 = [p.detach().to(torch.float64, copy=True) for p in params]  # fp64 params: a copy
    d = [p.grad.detach().double() + WD * w for p, w in zip(params, w0)]
    # SNGM's momentum follows the param's dtype: a buffer of another dtype is converted first
    u0 = [(opt.state[p]["momentum_buffer"] if kind == "sgd" else
           opt.state[p]["momentum_buffer"].to(p.dtype)).to(torch.float64, copy=True)
          if p in opt.state else torch.zeros_like(w) for p, w in zip(params, w0)]
    n = torch.sqrt(sum((x * x).sum() for x in d))
    # SGD keeps a buffer in the dtype it was made in (model.double() does not convert it)
    buf_dtypes = {opt.state[p]["momentum_buffer"].dtype for p in params if p in opt.state}
    sgd_buf = (buf_dtypes.pop() if len(buf_dtypes) == 1 else dtype) if kind == "sgd" else None
    bound = step_error_bounds(dtype, lr=LR, beta=MOMENTUM, wd=WD, nesterov=False, ws=w0, ds=d,
                              us=u0, n=None if kind == "sgd" else n.item(),
                              torch_sgd_momentum=sgd_buf)
    opt.step()
    scale = 1.0 if kind == "sgd" else 1.0 / n
    if kind != "sgd":
        torch.testing.assert_close(opt.grad_norm.double(), n, rtol=bound.norm_rtol, atol=0)
    for i, (p, w, di, u) in enumerate(zip(params, w0, d, u0)):
        u_new = MOMENTUM * u + di * scale
        assert_within(opt.state[p]["momentum_buffer"], u_new, bound.momentum[i],
                      f"{kind}: momentum {i}")
        assert_within(p, w - LR * u_new, bound.params[i], f"{kind}: param {i}")


def assert_trained_like_reference(trained, backend, dtype=torch.float32):
    """``trained[kind]``: (the tensors a run ends with, kit.Magnitudes of its optimizer); the
    backend's within the bounds of two runs around the reference's (kit.assert_runs_close)."""
    (got, _), (ref, mags) = trained[backend], trained["reference"]
    assert_runs_close(got, ref, mags, dtype)


# ---------------------------------------------------------------- 1. params and grads stay put


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
def test_params_keep_their_storage_and_grads_their_identity(backend, set_to_none):
    """Construction and steps leave each param at its data_ptr in a storage of its own size (no
    flat bucket shared with other params), and ``p.grad`` is the very tensor autograd or the user
    set: same object, same data_ptr, same values after step(). As with SGD."""
    for kind in ("sgd", backend):
        m = MLP.model()
        params = list(m.parameters())
        start = values(m)
        ptrs = [p.data_ptr() for p in params]

        def check_params():
            assert [p.data_ptr() for p in params] == ptrs, kind
            assert all(own_storage(p) for p in params), kind
            assert len({p.untyped_storage().data_ptr() for p in params}) == len(params), kind

        opt = make_opt(kind, m.parameters())
        check_params()
        accumulated = None
        for s in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            MLP.loss(m, s).backward()
            if s == 2:  # a grad the user assigns
                params[0].grad = torch.randn_like(params[0])
            grads = [p.grad for p in params]
            if not set_to_none and s == 2:
                accumulated = grads  # zero_grad() zeroes in place: autograd keeps these objects
            if not set_to_none and s == 3:
                assert all(g is a for g, a in zip(grads, accumulated)), kind
            gptrs = [g.data_ptr() for g in grads]
            gvals = [g.clone() for g in grads]
            opt.step()
            for p, g, gp, gv in zip(params, grads, gptrs, gvals):
                assert p.grad is g, kind
                assert g.data_ptr() == gp and own_storage(g), kind
                assert torch.equal(g, gv), f"{kind}: step() wrote a grad"
            check_params()
        assert all(not torch.equal(p, q) for p, q in zip(params, start)), kind


# ---------------------------------------------------------------- 2. checkpoints


def assert_one_storage_per_tensor(sd):
    ptrs = [t.untyped_storage().data_ptr() for t in sd.values()]
    assert len(set(ptrs)) == len(ptrs), "state_dict tensors share a storage"
    for k, t in sd.items():
        assert own_storage(t), f"{k}: storage of {t.untyped_storage().nbytes()} bytes"


def test_safetensors_round_trip_after_steps(backend, tmp_path):
    """After steps, safetensors' save_model/load_model restores every param exactly into a fresh
    model, save_file (which refuses aliased tensors) accepts the state_dict, and each state_dict
    tensor owns one storage of its own size; SNGM's weights equal the reference's."""
    st = pytest.importorskip("safetensors.torch")
    trained = {}
    for kind in kinds(backend):
        m = MLP.model()
        opt = make_opt(kind, m.parameters())
        mags = Magnitudes(opt)
        MLP.train(m, opt, 3)
        sd = m.state_dict()
        assert_one_storage_per_tensor(sd)
        path = str(tmp_path / f"{kind}.safetensors")
        st.save_model(m, path)
        fresh = MLP.model(seed=1)
        missing, unexpected = st.load_model(fresh, path)
        assert not missing and not unexpected, (kind, missing, unexpected)
        for (k, a), (k2, b) in zip(sd.items(), fresh.state_dict().items()):
            assert k == k2 and torch.equal(a, b), (kind, k)
        st.save_file(sd, str(tmp_path / f"{kind}.sd.safetensors"))
        loaded = st.load_file(str(tmp_path / f"{kind}.sd.safetensors"))
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
        MLP.train(m, opt, 1, start=3)  # the saved and loaded copies do not follow the model
        assert all(torch.equal(loaded[k], fresh.state_dict()[k]) for k in sd)
        assert not torch.equal(m[0].weight, fresh[0].weight)
        trained[kind] = (values(fresh), mags)
    assert_trained_like_reference(trained, backend)


def test_accelerate_save_model_keeps_every_param(backend, tmp_path):
    """accelerate's save_model drops every tensor but one per (storage pointer, storage size):
    after SNGM steps it must still write every param of the model, as after SGD steps."""
    pytest.importorskip("accelerate")
    pytest.importorskip("huggingface_hub")
    from accelerate import Accelerator
    from safetensors.torch import load_file

    acc = Accelerator(cpu=True)
    for kind in ("sgd", backend):
        m = MLP.model()
        opt = make_opt(kind, m.parameters())
        MLP.train(m, opt, 2)
        out = tmp_path / kind
        acc.save_model(m, str(out))
        loaded = load_file(str(out / "model.safetensors"))
        sd = m.state_dict()
        assert loaded.keys() == sd.keys(), kind
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), kind


# ---------------------------------------------------------------- 3. serialized sizes


def test_serialized_sizes_match_sgd(backend):
    """torch.save of one 1024-element bias, of its momentum buffer, and pickle.dumps(model) after
    steps are as big with SNGM as with SGD (a param or buffer that is a view of a bucket would
    drag the whole bucket into each). The Triton interpreter gets a smaller hidden layer (the bias
    is then 1/128 of the model, not 1/2000) to keep its run short."""
    hidden = 64 if backend == "triton" else 1024

    def sizes(kind):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(1024, hidden), nn.Tanh(), nn.Linear(hidden, 1024))
        opt = make_opt(kind, m.parameters())
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 1024, generator=g), torch.randn(8, 1024, generator=g)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        bias = m[2].bias
        assert bias.numel() == 1024

        def saved(t):
            buf = io.BytesIO()
            torch.save(t, buf)
            return buf.tell()

        return {"bias": saved(bias), "momentum": saved(opt.state[bias]["momentum_buffer"]),
                "model": len(pickle.dumps(m))}

    ref, got = sizes("sgd"), sizes(backend)
    for k in ref:
        assert abs(got[k] - ref[k]) <= max(512, 0.02 * ref[k]), (k, got[k], ref[k])


# ---------------------------------------------------------------- 4. grads re-pointed by the user


@NIB
def test_grad_data_replaced_between_steps(backend, nib):
    """``p.grad.data = p.grad.data.clone() * 2`` after backward: the step uses the new grads
    (checked by hand for SGD and SNGM, with SNGM's grad_norm the norm of those grads) and the
    fused backend equals the reference doing the same."""
    nib = nib_or_skip(backend, nib)
    trained = {}
    for kind in kinds(backend):
        m = MLP.model()
        params = list(m.parameters())
        opt = make_opt(kind, m.parameters(), nib=nib and kind == backend)
        mags = Magnitudes(opt)
        for s in range(5):
            opt.zero_grad(set_to_none=True)
            MLP.loss(m, s).backward()
            if s in (0, 2, 3):
                for p in params:
                    p.grad.data = p.grad.data.clone() * 2
            check_step_uses_grads_as_they_are(kind, opt, params)
        trained[kind] = (values(m), mags)
    assert_trained_like_reference(trained, backend)


@NIB
def test_channels_last_conversion_between_steps(backend, nib):
    """``model.to(memory_format=torch.channels_last)`` between backward and step re-lays out conv
    weights and their grads (Module._apply): the step uses them as they are (by hand, SGD and
    SNGM), writes them in place (same data_ptr, still channels_last, SGD's strides), and the fused
    backend equals the reference doing the same."""
    nib = nib_or_skip(backend, nib)
    trained, strides = {}, {}
    for kind in kinds(backend):
        m = CONVNET.model()
        params = list(m.parameters())
        opt = make_opt(kind, m.parameters(), nib=nib and kind == backend)
        mags = Magnitudes(opt)
        for s in range(5):
            opt.zero_grad(set_to_none=True)
            CONVNET.loss(m, s).backward()
            if s == 2:
                m.to(memory_format=torch.channels_last)
            convs = [p for p in params if p.dim() == 4]
            if s >= 2:
                assert all(p.is_contiguous(memory_format=torch.channels_last)
                           and not p.is_contiguous() for p in convs + [p.grad for p in convs])
            ptrs = [p.data_ptr() for p in params]
            check_step_uses_grads_as_they_are(kind, opt, params)
            assert [p.data_ptr() for p in params] == ptrs, kind
        trained[kind] = (values(m), mags)
        strides[kind] = [p.stride() for p in params]
    assert strides[backend] == strides["sgd"]
    assert_trained_like_reference(trained, backend)


# ---------------------------------------------------------------- 5. a reference kept to a grad


@NIB
def test_kept_grad_keeps_its_values(backend, nib):
    """``kept = p.grad`` before step(): after step(), zero_grad(set_to_none=True) and the next
    backward, ``kept`` still holds its old values (nobody reuses its memory for the new grad)."""
    nib = nib_or_skip(backend, nib)
    for kind in ("sgd", backend):
        m = MLP.model()
        params = list(m.parameters())
        opt = make_opt(kind, m.parameters(), nib=nib and kind != "sgd")
        MLP.train(m, opt, 1)  # buffers and tables exist from here on
        for s in range(1, 4):
            opt.zero_grad(set_to_none=True)
            MLP.loss(m, s).backward()
            kept = [p.grad for p in params]
            old = [g.clone() for g in kept]
            opt.step()
            assert all(p.grad is k for p, k in zip(params, kept)), kind
            opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in params), kind
            MLP.loss(m, 100 + s).backward()
            for p, k, o in zip(params, kept, old):
                assert torch.equal(k, o), f"{kind}: a kept grad changed"
                assert p.grad is not k and p.grad.data_ptr() != k.data_ptr(), kind
            assert not torch.equal(params[0].grad, kept[0])  # a new batch, new grads


# ---------------------------------------------------------------- 6. memory the optimizer holds


def tensors_reachable(root, skip):
    """{storage data_ptr: (nbytes, path)} of every tensor reachable from ``root`` through
    containers, instance dicts/slots, closures and bound methods (not module globals); tensors
    whose id is in ``skip`` are not counted."""
    out, seen, stack = {}, set(), [(root, "root")]
    leaves = (int, float, complex, str, bytes, bool, type(None), torch.device, torch.dtype, type,
              types.ModuleType, types.BuiltinFunctionType)
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen or isinstance(obj, leaves):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in skip:
                st = obj.untyped_storage()
                out.setdefault(st.data_ptr(), (st.nbytes(), path))
            continue
        children = []
        if isinstance(obj, dict):
            for k, v in obj.items():
                children += [(k, f"{path}.key"), (v, f"{path}[{k!r:.40}]")]
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            children += [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        elif isinstance(obj, types.FunctionType):
            children += [(c.cell_contents, f"{path}.<closure>") for c in obj.__closure__ or ()
                         if c.cell_contents is not None]
            children += [(v, f"{path}.<default>") for v in obj.__defaults__ or ()]
        elif isinstance(obj, types.MethodType):
            children += [(obj.__self__, f"{path}.__self__")]
        else:
            children += [(v, f"{path}.{k}") for k, v in getattr(obj, "__dict__", {}).items()]
            for cls in type(obj).__mro__:
                for k in getattr(cls, "__slots__", ()):
                    if isinstance(k, str) and hasattr(obj, k):
                        children.append((getattr(obj, k), f"{path}.{k}"))
        stack.extend(children)
    return out


@NIB
def test_optimizer_holds_only_momentum_after_zero_grad(backend, nib):
    """After steps and zero_grad(set_to_none=True): tensors reachable from opt.state are one
    model's worth (momentum), as with SGD(momentum=0.9), and every other tensor the optimizer
    object reaches (params aside) is a few KB at most: no grad, param or momentum bucket kept."""
    nib = nib_or_skip(backend, nib)
    held = {}
    for kind in ("sgd", backend):
        m = WIDE_MLP.model()
        params = list(m.parameters())
        opt = make_opt(kind, m.parameters(), nib=nib and kind != "sgd")
        WIDE_MLP.train(m, opt, 3)
        opt.zero_grad(set_to_none=True)
        model_bytes = sum(p.numel() * p.element_size() for p in params)
        skip = {id(p) for p in params}
        state = tensors_reachable(opt.state, skip)
        assert sum(n for n, _ in state.values()) == model_bytes, (kind, state)
        assert len(state) == len(params), kind
        others = {k: v for k, v in tensors_reachable(opt, skip).items() if k not in state}
        big = {path: n for n, path in others.values() if n > 4096}
        assert not big, f"{kind}: the optimizer holds {big}"
        assert sum(n for n, _ in others.values()) <= max(4096, model_bytes // 100), (kind, others)
        held[kind] = sum(n for n, _ in state.values())
    assert held[backend] == held["sgd"]


# ---------------------------------------------------------------- 7. a param given twice


def test_param_given_twice_is_refused(backend):
    """A param listed twice in one group, or in two groups, is a ValueError naming the problem at
    construction and at add_param_group (which leaves a working optimizer as it was). SGD refuses
    the two-group case too, and only warns for one group, where it would step the param twice."""
    m = MLP.model()
    w, b = m[0].weight, m[0].bias
    same_group = [w, b, w]
    two_groups = [{"params": [w]}, {"params": [b, w]}]
    message = r"twice|more than one parameter group"

    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.SGD(two_groups, lr=LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.optim.SGD(same_group, lr=LR)
        except ValueError:
            pass
        else:
            assert any("duplicate" in str(c.message) for c in caught)

    for params in (same_group, two_groups):
        with pytest.raises(ValueError, match=message):
            make_opt(backend, params)

    opt = make_opt(backend, [{"params": [w, b]}, {"params": list(m[2].parameters())}])
    ref = MLP.model()
    ref_opt = make_opt("reference", ref.parameters())
    mags = Magnitudes(ref_opt)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [m[4].weight, w]})
    assert len(opt.param_groups) == 2
    opt.add_param_group({"params": list(m[4].parameters())})
    MLP.train(m, opt, 2)
    MLP.train(ref, ref_opt, 2)
    assert_runs_close(values(m), values(ref), mags, torch.float32)


# ---------------------------------------------------------------- 8. dtype changes


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["double", "bf16"])
def test_model_dtype_change_between_steps(backend, dtype):
    """``model.double()`` / ``model.to(torch.bfloat16)`` after steps, then more steps: as with SGD
    the params keep the new dtype, are written in place and each step is the update computed by
    hand from the converted tensors; SNGM's momentum follows the param's dtype and the fused
    backend equals the reference doing the same."""
    trained = {}
    for kind in kinds(backend):
        m = MLP.model()
        opt = make_opt(kind, m.parameters())
        mags = Magnitudes(opt)
        MLP.train(m, opt, 2)
        m.to(dtype)
        params = list(m.parameters())
        converted = values(m)
        ptrs = [p.data_ptr() for p in params]
        for s in range(2, 5):
            opt.zero_grad(set_to_none=True)
            MLP.loss(m, s).backward()
            check_step_uses_grads_as_they_are(kind, opt, params)
        assert all(p.dtype == dtype for p in params), kind
        assert [p.data_ptr() for p in params] == ptrs, kind
        assert all(not torch.equal(p, c) for p, c in zip(params, converted)), kind
        if kind != "sgd":
            bufs = [opt.state[p]["momentum_buffer"] for p in params]
            assert all(u.dtype == dtype and u.shape == p.shape for u, p in zip(bufs, params))
            trained[kind] = (values(m), [u.clone() for u in bufs], mags)
    # 2 fp32 steps, then 3 in the new dtype: the bounds of 5 steps in it hold the fp32 ones too
    (got, got_bufs, _), (ref, ref_bufs, mags) = trained[backend], trained["reference"]
    assert_runs_close(got, ref, mags, dtype)
    assert_runs_close(got_bufs, ref_bufs, mags, dtype, momentum=True)


# ---------------------------------------------------------------- 9. deepcopy and load_state_dict


def test_deepcopy_and_load_state_dict_between_steps(backend):
    """``copy.deepcopy(model)`` and ``model.load_state_dict(copy.state_dict())`` between steps: the
    copy owns its memory and is not stepped, the steps after the load start from the loaded
    weights (checked by hand, SGD and SNGM) and still update the params in place (same data_ptr as
    before the load); the fused backend equals the reference."""
    trained = {}
    for kind in kinds(backend):
        m = MLP.model()
        params = list(m.parameters())
        ptrs = [p.data_ptr() for p in params]
        opt = make_opt(kind, m.parameters())
        mags = Magnitudes(opt)
        MLP.train(m, opt, 2)
        snap = copy.deepcopy(m)
        snap_values = values(snap)
        assert all(q.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
                   for p, q in zip(params, snap.parameters())), kind
        MLP.train(m, opt, 2, start=2)
        assert all(torch.equal(q, v) for q, v in zip(snap.parameters(), snap_values)), kind
        assert all(not torch.equal(p, v) for p, v in zip(params, snap_values)), kind
        m.load_state_dict(snap.state_dict())
        assert [p.data_ptr() for p in params] == ptrs, kind
        for s in range(4, 6):  # each step starts from the loaded weights
            opt.zero_grad(set_to_none=True)
            MLP.loss(m, s).backward()
            check_step_uses_grads_as_they_are(kind, opt, params)
        assert [p.data_ptr() for p in params] == ptrs, kind
        assert all(torch.equal(q, v) for q, v in zip(snap.parameters(), snap_values)), kind
        trained[kind] = (values(m), mags)
    assert_trained_like_reference(trained, backend)


# ---------------------------------------------------------------- 10. non-contiguous params


def strided_problem():
    """Params that are views: a transposed one (more than one 4096-element chunk), a column slice
    whose other columns must not change, and one row (storage offset) of a matrix."""
    g = torch.Generator().manual_seed(0)
    t = {
        "base": torch.randn(80, 70, generator=g),
        "big": torch.randn(80, 90, generator=g),
        "rows": torch.randn(6, 50, generator=g),
    }
    t["A"] = nn.Parameter(t["base"].t())  # (70, 80), strides (1, 70)
    t["B"] = nn.Parameter(t["big"][:, :50])  # (80, 50), strides (90, 1)
    t["C"] = nn.Parameter(t["rows"][2])  # (50,), storage offset 100
    return t


def strided_loss(t, step):
    g = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(16, 70, generator=g), torch.randn(16, 50, generator=g)
    return nn.functional.mse_loss(torch.tanh(x @ t["A"]) @ t["B"] + t["C"], y)


def test_non_contiguous_params_are_stepped_where_they_live(backend):
    """Views as params are stepped correctly (by hand, and equal to the reference) and in place:
    the base tensors see the update, the parts of them outside the params do not change, and no
    param is moved out of the memory it shares. As with SGD."""
    trained = {}
    for kind in kinds(backend):
        t = strided_problem()
        params = [t["A"], t["B"], t["C"]]
        layout = [(p.data_ptr(), p.stride(), p.untyped_storage().data_ptr()) for p in params]
        outside = (t["big"][:, 50:].clone(), torch.cat([t["rows"][:2], t["rows"][3:]]).clone())
        start = values(params)
        opt = make_opt(kind, params)
        mags = Magnitudes(opt)
        for s in range(4):
            opt.zero_grad(set_to_none=True)
            strided_loss(t, s).backward()
            check_step_uses_grads_as_they_are(kind, opt, params)
        assert [(p.data_ptr(), p.stride(), p.untyped_storage().data_ptr())
                for p in params] == layout, kind
        assert torch.equal(t["base"].t(), t["A"]) and torch.equal(t["big"][:, :50], t["B"])
        assert torch.equal(t["rows"][2], t["C"])
        assert torch.equal(t["big"][:, 50:], outside[0]), f"{kind}: wrote outside the slice"
        assert torch.equal(torch.cat([t["rows"][:2], t["rows"][3:]]), outside[1]), kind
        assert all(not torch.equal(p, q) for p, q in zip(params, start)), kind
        trained[kind] = (values(params), mags)
    assert_trained_like_reference(trained, backend)

