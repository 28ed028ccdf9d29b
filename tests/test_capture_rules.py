"""The rules that make the cached device tables safe under CUDA graph capture and across streams
(sngm_ext/device_cache.py), checked on CPU: the capture flag, the current stream and the stream
ordering are replaced by fakes that record what the caches asked for. The same rules on a GPU,
with a real capture and no warm-up step, are the GPU kit's (tests/test_gpu*.py)."""

import importlib.util

import pytest
import torch

from sngm_ext import SNGM, device_cache, layout
from sngm_ext.device_cache import Built, DeviceCache

CPU = torch.device("cpu")


class FakeDevice:
    """What the caches see of CUDA: whether a capture is on, the current stream, the waits."""

    def __init__(self, monkeypatch):
        self.capturing = False
        self.stream = "s0"
        self.orders = []  # (tensors, producer, consumer) per wait the cache queued
        monkeypatch.setattr(device_cache, "_capturing", lambda device: self.capturing)
        monkeypatch.setattr(device_cache, "_current_stream", lambda device: self.stream)
        monkeypatch.setattr(device_cache, "_order_after",
                            lambda ts, producer, consumer: self.orders.append(
                                (list(ts), producer, consumer)))


@pytest.fixture
def fake(monkeypatch):
    return FakeDevice(monkeypatch)


def _builder(log):
    def build(name):
        log.append(name)
        t, src = torch.full((4,), float(len(log))), torch.zeros(4)
        return Built((name, t), [t], [src])
    return build


def test_a_value_built_during_a_capture_is_never_served_again(fake):
    """Built in a capture: its memory is filled only at replay, so the capturing call gets it and
    no one else (a second call in the capture and the next eager call build their own); it and
    the host buffer its copy node reads are kept for the cache's life."""
    built = []
    cache = DeviceCache(limit=8)
    fake.capturing = True
    a = cache.get("k", CPU, _builder(built), "a")
    b = cache.get("k", CPU, _builder(built), "b")
    fake.capturing = False
    c = cache.get("k", CPU, _builder(built), "c")
    d = cache.get("k", CPU, _builder(built), "d")
    assert (a[0], b[0], c[0], d[0]) == ("a", "b", "c", "c") and built == ["a", "b", "c"]
    assert cache.graph_only() == 2 and len(cache) == 1
    kept = cache._graph_only
    assert kept[0].value is a and kept[0].device_tensors[0] is a[1] and kept[0].host_sources


def test_entries_a_graph_uses_are_never_dropped_and_the_rest_go_least_recently_used(fake):
    built = []
    build = _builder(built)
    cache = DeviceCache(limit=2)
    cache.get("g", CPU, build, "g")
    fake.capturing = True
    g = cache.get("g", CPU, build, "never")  # a capture reads the eager entry: pinned
    fake.capturing = False
    assert g[0] == "g" and cache.pinned() == 1
    cache.get("x", CPU, build, "x")
    cache.get("y", CPU, build, "y")  # the limit counts droppable entries only: g, x, y kept
    cache.get("x", CPU, build, "never")  # x is now the most recently used
    cache.get("z", CPU, build, "z")  # drops y, the least recently used
    assert set(cache.entries()) == {"g", "x", "z"}
    for i in range(10):
        cache.get(i, CPU, build, i)
    assert "g" in cache.entries() and cache.get("g", CPU, build, "never")[0] == "g"
    assert len(cache) == 3 and "never" not in built


def test_a_use_on_another_stream_waits_for_the_last_stream_and_marks_the_memory(fake):
    """Once per change of stream: the new stream waits for what the entry's last stream queued
    (its upload, kernels that wrote it) and its memory counts as used there; nothing is waited on
    inside a capture."""
    cache = DeviceCache(limit=4)
    v = cache.get("k", CPU, _builder([]), "k")
    cache.get("k", CPU, _builder([]), "k")
    assert fake.orders == []
    fake.stream = "s1"
    cache.get("k", CPU, _builder([]), "k")
    cache.get("k", CPU, _builder([]), "k")
    assert [(o[1], o[2]) for o in fake.orders] == [("s0", "s1")]
    assert fake.orders[0][0][0] is v[1]
    fake.stream = "s0"
    cache.get("k", CPU, _builder([]), "k")
    fake.capturing, fake.stream = True, "capture"
    cache.get("k", CPU, _builder([]), "k")
    assert [(o[1], o[2]) for o in fake.orders] == [("s0", "s1"), ("s1", "s0")]


def test_plan_cache_follows_the_rules(fake):
    plans = layout.PlanCache(limit=1)
    fake.capturing = True
    p0 = plans.get(("a",), [[10, 5000]], False, CPU)
    fake.capturing = False
    p1 = plans.get(("a",), [[10, 5000]], False, CPU)
    assert p1 is not p0 and plans.get(("a",), [[10, 5000]], False, CPU) is p1
    fake.capturing = True
    assert plans.get(("a",), [[10, 5000]], False, CPU) is p1  # now pinned
    fake.capturing = False
    plans.get(("b",), [[7]], False, CPU)
    plans.get(("c",), [[8]], False, CPU)  # drops b, never a
    assert set(plans.plans) == {("a",), ("c",)}
    fake.stream = "s1"
    plans.get(("a",), [[10, 5000]], False, CPU)
    [(tensors, _, _)] = fake.orders
    # partials are written every step: the new stream waits for them too
    assert any(t is p1.partials for t in tensors) and any(t is p1.seg_ptr for t in tensors)


def _step(opt, ps):
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()


def test_an_eager_step_after_a_captured_one_builds_its_own_plan(fake, fused_backend, monkeypatch):
    """A step captured with a layout never seen before (after the warm-up step a capture needs:
    here the second param sits the captured step out, a new plan): the next eager step with that
    layout does not read the tables the capture built (they are filled only at replay), and a
    steady loop then builds none."""
    built = []
    real = layout.make_plan
    monkeypatch.setattr(layout, "make_plan", lambda *a, **k: built.append(a) or real(*a, **k))
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 3)]
    opt = SNGM(ps, lr=0.1, momentum=0.9, backend=fused_backend)
    _step(opt, ps)  # the warm-up: momentum buffers and the counter exist from here on
    ps[1].grad = None
    fake.capturing = True
    _step(opt, ps[:1])
    fake.capturing = False
    for _ in range(3):
        _step(opt, ps[:1])
    assert len(built) == 3  # the warm-up's, the capture's, the eager steps' own


def test_a_first_step_inside_a_capture_is_refused(fake, fused_backend):
    """Without a warm-up the step would create momentum buffers inside the graph (zeroed again by
    every replay): refused, naming the warm-up, with nothing changed."""
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 3)]
    before = [p.detach().clone() for p in ps]
    opt = SNGM(ps, lr=0.1, momentum=0.9, backend=fused_backend)
    fake.capturing = True
    with pytest.raises(RuntimeError, match="warm-up"):
        _step(opt, ps)
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state


triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed")


@triton_only
def test_triton_tables_and_constants_follow_the_rules(fake, monkeypatch):
    """The Triton backend's pointer tables and constants: the same cache, the same rules."""
    from sngm_ext.triton_kernels import tables

    monkeypatch.setattr(tables, "_tables", DeviceCache(limit=2))
    monkeypatch.setattr(tables, "_constants", DeviceCache(None))
    xs = [torch.ones(3), torch.ones(5)]
    fake.capturing = True
    t0, c0 = tables.pointer_table(CPU, (xs,)), tables.constant(CPU, 1.0)
    fake.capturing = False
    t1, c1 = tables.pointer_table(CPU, (xs,)), tables.constant(CPU, 1.0)
    assert t1 is not t0 and c1 is not c0
    assert tables._tables.graph_only() == 1 and tables._constants.graph_only() == 1
    assert t1.tolist() == [3, 5, xs[0].data_ptr(), xs[1].data_ptr()]
    fake.capturing = True
    assert tables.pointer_table(CPU, (xs,)) is t1  # a graph reads it now: pinned
    fake.capturing = False
    for n in range(1, 6):
        tables.pointer_table(CPU, ([torch.ones(n)],))
    assert tables.pointer_table(CPU, (xs,)) is t1 and tables._tables.pinned() == 1
    fake.stream = "s1"
    tables.pointer_table(CPU, (xs,))
    tables.constant(CPU, 1.0)
    assert len(fake.orders) == 2
    assert fake.orders[0][0][0] is t1 and fake.orders[1][0][0] is c1


def test_the_capture_flag_is_off_on_cpu_and_while_compiling():
    assert device_cache._capturing(CPU) is False and device_cache._current_stream(CPU) is None


def test_entries_a_compiled_step_reads_are_never_dropped():
    """torch.compile looks the plan up once, at trace time; the compiled step then reads it at
    every call (and with mode="reduce-overhead" at every graph replay): pinned."""
    import torch._dynamo

    cache = DeviceCache(limit=1)

    def lookup(x):
        t = cache.get("traced", CPU, _builder([]), "traced")[1]
        return x + t

    torch._dynamo.reset()
    torch.compile(lookup, backend="eager", fullgraph=True)(torch.ones(4))
    for i in range(3):
        cache.get(i, CPU, _builder([]), i)
    assert "traced" in cache.entries() and cache.pinned() == 1
