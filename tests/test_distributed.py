"""SNGM under torch.distributed with real processes (gloo on loopback, CPU): DDP, FSDP2, HSDP,
tensor parallel, FSDP2 x TP, FSDP1, ZeroRedundancyOptimizer, DeepSpeed ZeRO, and the refusals.

Each world size (2, 3 and 4 ranks) is ONE launch of tests/dist_workers.py per rank that runs every
scenario for every CPU backend (processes re-import torch: a launch per check would cost seconds
each); the tests below read back what each rank reported. Every process has a timeout, so a
deadlock fails the tests instead of hanging them.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import CPU_BACKENDS, _available

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_workers.py")
TIMEOUT_S = 240  # the whole launch; collectives themselves time out after SNGM_DIST_TIMEOUT

# scenario -> world sizes it runs at (the parity checks at 2 and 3 ranks, 2-D meshes at 4, the
# rest at 2)
SCENARIOS = {
    "ddp": (2, 3),
    "ddp_bucket_view_static_graph": (2,),
    "ddp_find_unused_no_sync": (2,),
    "ddp_norm_in_backward": (2,),
    "ddp_bucket_view_norm_in_backward": (2,),
    "fsdp": (2, 3),
    "fsdp_tensor_norm": (2, 3),
    "hsdp_mesh": (2,),
    "fsdp_nan_on_one_rank_skips_everywhere": (2,),
    "fsdp_checkpoint_resume": (2,),
    "zero": (2, 3),
    "zero_tensor_norm_bucket_view": (2,),
    "zero_rank_without_grads_and_nan": (2,),
    "dtensor_uneven_presence_tensor_norm": (2,),
    "unreducible_params_are_refused": (2,),
    "partition_by_hand": (2,),
    "fp64_any_scale": (2,),
    "ddp_with_process_group_is_refused": (2,),
    "tp_replicate_bias_plain_norm": (2,),
    "tp_tensor_norm": (2,),
    "tp_plain_param_that_differs_is_refused": (2,),
    "fsdp1_flat_params": (2,),
    "fsdp1_orig_params": (2,),
    "fsdp1_without_process_group_is_refused": (2,),
    "deepspeed_zero1": (2,),
    "deepspeed_zero2": (2,),
    "deepspeed_without_process_group_is_refused": (2,),
    "fsdp2_tp_2x2": (4,),
    "hsdp_2x2": (4,),
}
# Triton's interpreter costs about a second per scenario and rank: it runs the scenarios where its
# kernels meet distributed data (shards, a reduced norm) at 2 ranks; the fused path around them
# (tensor lists, DTensor state) is the native cpu backend's too, which runs them all.
TRITON = {"ddp", "fsdp", "fp64_any_scale", "fsdp_tensor_norm", "fsdp_nan_on_one_rank_skips_everywhere", "zero",
          "dtensor_uneven_presence_tensor_norm", "tp_replicate_bias_plain_norm"}
# What a wrapper does around SNGM, the same for every backend (SNGM sees plain tensors and a
# process group): the native cpu backend alone. And the 4-rank launch: 4 processes on 2 cores.
ONE_BACKEND = {"fsdp1_flat_params", "fsdp1_orig_params", "fsdp1_without_process_group_is_refused",
               "deepspeed_zero1", "deepspeed_zero2", "deepspeed_without_process_group_is_refused",
               "ddp_with_process_group_is_refused", "unreducible_params_are_refused",
               "fsdp2_tp_2x2", "hsdp_2x2"}


# Scenarios of an option only the fused backends have.
FUSED_ONLY = {"ddp_norm_in_backward", "ddp_bucket_view_norm_in_backward"}


# Scenarios that drive SNGM through a tool scripts/setup.sh installs: skipped where it is missing,
# an error in CI.
TOOLS = {n: "deepspeed" for n in SCENARIOS if n.startswith("deepspeed")}


def _tool_missing(name):
    tool = TOOLS.get(name)
    return tool if tool is not None and importlib.util.find_spec(tool) is None else None


def _runs_for(name, world, backend):
    if backend == "reference" and name in FUSED_ONLY:
        return False
    if name in ONE_BACKEND:
        return backend == "cpu"
    return backend != "triton" or (name in TRITON and world == 2)


def _gloo_missing():
    if not torch.distributed.is_available():
        return "torch was built without torch.distributed"
    if not torch.distributed.is_gloo_available():
        return "torch.distributed has no gloo backend here"
    return None


def _backends():
    out, missing = [], []
    for name in CPU_BACKENDS:
        (out if _available(name) else missing).append(name)
    return out, missing


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, plan, outdir):
    """Run the worker on `world` ranks with `plan` ([[scenario, [backend, ...]], ...]);
    returns ({rank: {key: result}}, combined output)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   SNGM_DIST_TIMEOUT="60")
        env.setdefault("TRITON_INTERPRET", "1")
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, outdir, json.dumps(plan)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
        ))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
        outputs.append(f"TIMEOUT after {TIMEOUT_S} s: a deadlock or a very slow machine")
    results = {}
    for rank in range(world):
        path = os.path.join(outdir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[rank] = json.load(f)
    return results, "\n".join(outputs)


_runs = {}


def run_for(world):
    """One launch per world size, shared by the tests of this module."""
    if world not in _runs:
        why = _gloo_missing()
        if why:
            pytest.skip(f"distributed tests need gloo: {why}")
        backends, _ = _backends()
        plan = [[n, [b for b in backends if _runs_for(n, world, b)]]
                for n, worlds in SCENARIOS.items() if world in worlds and not _tool_missing(n)]
        with tempfile.TemporaryDirectory() as d:
            _runs[world] = launch(world, plan, d)
    return _runs[world]


CASES = [(w, n) for n, worlds in SCENARIOS.items() for w in worlds]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("world, name", CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_distributed(world, name, backend):
    if not _available(backend):
        if os.environ.get("CI") and backend != "triton":
            pytest.fail(f"backend {backend!r} must be available in CI")
        pytest.skip(f"backend {backend!r} is not available here")
    if not _runs_for(name, world, backend):
        pytest.skip("an option of the fused backends only" if name in FUSED_ONLY else
                    "what a wrapper does around SNGM: checked with the cpu backend"
                    if name in ONE_BACKEND else
                    "Triton's interpreter is slow: this scenario runs it at 2 ranks only, or not "
                    "(its fused path is covered by the cpu backend)")
    tool = _tool_missing(name)
    if tool:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} must be installed in CI (scripts/setup.sh)")
        pytest.skip(f"{tool} is not installed")
    results, output = run_for(world)
    key = f"{name}[{backend}]"
    for rank in range(world):
        got = results.get(rank, {}).get(key)
        if got is None:
            pytest.fail(f"rank {rank} did not report {key} (an earlier scenario failed or the "
                        f"launch died); output:\n{output[-6000:]}")
        assert got == "ok", f"rank {rank}, {key}:\n{got}"


def test_process_group_without_torch_distributed_says_so():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    from sngm_ext import SNGM

    with pytest.raises(RuntimeError, match="initialized"):
        SNGM([torch.nn.Parameter(torch.zeros(3))], lr=0.1, process_group=object())


def test_single_process_optimizer_plans_no_collective():
    from sngm_ext import SNGM

    opt = SNGM([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert opt._dist_plan() is None  # plain tensors, no process_group: DDP and single process
