"""recompute="reversible" against the same oracles as "crnet": plain autograd, float64 gradcheck, block
checkpointing's bf16 error, the stored-bytes formula, and one process against two (DDP, FSDP2)."""
import os
import subprocess
import sys

import pytest
import torch

import recompute
from plan import BETA_DRIFT, LANE_RTOL, STREAM, adamw_drift, checkpoint_layers, from_stale, held_activation_bytes
from plan import min_betas, min_scales, stored_lanes, stored_numbers_per_token
from test_recompute import assert_grads_close, loss_and_grads, make, randomize_betas

KEEP_Z = pytest.mark.parametrize("keep_z", [True, False], ids=["keep_z", "recompute_z"])


def twins(keep_z, every=8, randomize=True, **kw):
    """A plain-autograd model with random betas of both signs (or the default ones), and a reversible copy."""
    torch.manual_seed(0)
    ref = make("none", **kw)
    if randomize:
        randomize_betas(ref)
    rev = recompute.apply(make("none", **kw), "reversible", every, keep_z)
    rev.load_state_dict(ref.state_dict())
    return ref, rev


def assert_exact(ref, rev, idx, seed=0):
    l_ref, g_ref = loss_and_grads(ref, idx, seed)
    l_rev, g_rev = loss_and_grads(rev, idx, seed)
    assert torch.equal(l_ref, l_rev) and g_ref.keys() == g_rev.keys()
    assert_grads_close(g_ref, g_rev)


@KEEP_Z
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("every,n_layer", [(1, 4), (2, 4), (2, 5), (8, 4), (8, 10), (3, 10)])
def test_reversible_matches_plain_autograd(arch, every, n_layer, keep_z):
    ref, rev = twins(keep_z, every, arch=arch, n_layer=n_layer, bias=arch == "gpt2",
                     rank=[8, 4, 6, 5, 7, 8, 3, 6, 5, 4][:n_layer])
    assert_exact(ref, rev, torch.randint(0, 50, (3, 16)))


@KEEP_Z
@pytest.mark.parametrize("kw", [dict(first_layer="lowrank"), dict(beta_learnable=False), dict(arch="gpt2", bias=True,
                                first_layer="lowrank", beta_learnable=False)], ids=["lowrank-first", "fixed-beta", "both"])
def test_reversible_matches_plain_autograd_in_the_ablations(kw, keep_z):
    ref, rev = twins(keep_z, 2, n_layer=5, rank=[5, 4, 6, 5, 7], **kw)
    assert_exact(ref, rev, torch.randint(0, 50, (3, 16)))


@KEEP_Z
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropout_masks_are_the_forwards(arch, keep_z):
    """The residual stream is inverted with the forward's masks (attention dropout, and the two residual ones,
    which the inversion subtracts): a different mask would give a different x_l and gradients far off."""
    ref, rev = twins(keep_z, 2, arch=arch, bias=arch == "gpt2", dropout=0.2, n_layer=5)
    idx = torch.randint(0, 50, (2, 16))
    assert_exact(ref, rev, idx, seed=7)
    # the loss's own RNG use is untouched: the step after draws what plain autograd's would
    assert torch.equal(torch.rand(3), (loss_and_grads(ref, idx, seed=7), torch.rand(3))[1])


@KEEP_Z
def test_tiny_betas_are_guarded_in_lanes_and_stream(keep_z):
    ref, rev = twins(keep_z, 8, randomize=False, n_layer=6)  # as crnet's guard test: random betas there too
    with torch.no_grad():
        for m in (ref, rev):
            m.blocks[3].qkv.beta.fill_(1e-4)  # inverting it amplifies round-off 1e4 times
    plan = stored_lanes(rev.blocks, 8, torch.float32, stream=True, keep_z=keep_z)
    assert {(5, g) for g in range(5)} | {(2, 0)} <= plan
    assert_exact(ref, rev, torch.randint(0, 50, (2, 16)))


def test_guard_plans_the_stream_like_a_lane_with_unit_scale():
    m = make("none", n_layer=200)
    ckpt = checkpoint_layers(200, 8)
    with torch.no_grad():
        for blk in m.blocks[1:]:
            for p in blk.projections():
                p.beta.fill_(1.0)  # lanes do not amplify: b = 1, 2, .., 7 eps; x: sum of (1 + 2b) = 63 < 84
    assert stored_lanes(m.blocks, 8, torch.float32, stream=True) == {(l, g) for l in ckpt for g in range(5)}
    with torch.no_grad():
        for blk in m.blocks[1:]:
            for p in blk.projections():
                p.beta.fill_(0.5 ** 0.5)  # the default: lanes 1.4 .. 35 eps, x's sum passes 84 six layers down
    keys = stored_lanes(m.blocks, 8, torch.float32, stream=True)
    assert keys == {(l, g) for l in ckpt for g in range(5)} | {(c - 6, STREAM) for c in ckpt}
    assert stored_lanes(m.blocks, 8, torch.float64, stream=True) == {(l, g) for l in ckpt for g in range(5)}
    assert stored_lanes(m.blocks, 8, torch.float32) == {(l, g) for l in ckpt for g in range(4)}  # crnet as before


@KEEP_Z
def test_float64_gradcheck(keep_z):
    torch.manual_seed(0)
    m = recompute.apply(make("none", n_layer=3, n_head=2, n_embd=8, intermediate_size=12, rank=2, vocab_size=11,
                             block_size=5, dropout=0.1).double(), "reversible", 2, keep_z)
    randomize_betas(m)
    idx = torch.randint(0, 11, (1, 5))

    def loss(*params):
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        return m(idx, idx)[1]
    assert torch.autograd.gradcheck(loss, tuple(m.parameters()), fast_mode=True)


def bf16_errors(modes, cast, **kw):
    """Per-tensor relative gradient error against float32 plain autograd, for each (mode, keep_z)."""
    torch.manual_seed(0)
    kw = dict(n_layer=6, n_embd=64, n_head=4, intermediate_size=128, rank=16, **kw)
    ref = make("none", **kw)
    randomize_betas(ref, 0.3, 1.2)
    idx = torch.randint(0, 50, (4, 16))
    g32 = loss_and_grads(ref, idx)[1]
    err = {}
    for mode, keep_z in modes:
        m = recompute.apply(make("none", **kw), mode, 3, keep_z)
        m.load_state_dict(ref.state_dict())
        for p in (p for b in m.blocks for p in b.projections()):
            p.lane_dtype = torch.float32  # block checkpointing of the model reversible runs: float32 lanes
        if cast == "params":  # as FSDP's mixed precision: bf16 parameters, under autocast as train.py runs them
            m.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = loss_and_grads(m, idx)[1]
        err[mode, keep_z] = torch.stack([(g[n].float() - g32[n]).norm() / g32[n].norm() for n in g32])
    return err


@pytest.mark.parametrize("cast", ["autocast", "params"])
def test_bf16_error_is_no_worse_than_block_checkpointing(cast):
    """bf16 autocast on float32 parameters and on bf16 ones (as FSDP gathers them): either way the stream is float32
    from the embedding on (a bf16 one: test_a_bf16_stream_stores_the_inputs_it_cannot_invert)."""
    err = bf16_errors([("block", True), ("reversible", True), ("reversible", False)], cast)
    block = err["block", True]
    assert block.max() > 1e-4  # bf16 really was in use
    for keep_z in (True, False):  # stated factor as for crnet: per tensor 1.5x block's (+1e-3), on average 1.2x
        assert (err["reversible", keep_z] <= 1.5 * block + 1e-3).all(), (keep_z, err["reversible", keep_z], block)
        assert err["reversible", keep_z].mean() <= 1.2 * block.mean()


def test_a_bf16_stream_stores_the_inputs_it_cannot_invert():
    m = recompute.apply(make("none", n_layer=5).to(torch.bfloat16), "reversible", 8, False)
    seen = []
    real = recompute.LaneStash.__init__
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(recompute.LaneStash, "__init__", lambda self, *a: (real(self, *a), seen.append(self))[0])
        embed = m.embed  # under autocast the model's own embed makes the stream float32: here a bf16 one instead
        mp.setattr(m, "embed", lambda idx: embed(idx).bfloat16())
        m(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[1].backward()
    stash = seen[0]
    # layer 1 (full-rank, bf16 lanes) writes a bf16 stream: its input is stored. Layers 2.. write float32 lanes,
    # so their outputs are float32 (x_2 and up are exact to float32) and only the checkpoint set is stored.
    assert {l for l, g in stash.store if g == STREAM} == {0, 4}
    dtype = lambda l: stash.layouts[(l, STREAM)][0]
    assert dtype(0) == dtype(1) == torch.bfloat16 and dtype(2) == torch.float32
    assert stash.keep_z  # Z in bf16: recomputed from a rebuilt input it would not be the forward's, so it is kept


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_held_bytes_match_the_formula(arch):
    kw = dict(arch=arch, n_layer=16, n_head=4, n_embd=128, intermediate_size=344, vocab_size=64, block_size=64,
              rank=32, bias=arch == "gpt2")
    idx = torch.randint(0, 64, (2, 64))
    held = {}
    # keep_z=False at k = 8: the guard stores more at any betas (a recomputed Z inherits its rebuilt input's
    # round-off, and the bound compounds); at k = 2 it is silent at betas of 1
    every = {"block": 8, "crnet": 8, True: 8, False: 2}
    for mode, keep_z in (("block", True), ("crnet", True), ("reversible", True), ("reversible", False)):
        k = every[mode if mode != "reversible" else keep_z]
        m = recompute.apply(make("none", **kw), mode, k, keep_z)
        store = stored_lanes(m.blocks, k, torch.float32, mode == "reversible", keep_z)
        default, _ = held_activation_bytes(m, idx, idx)  # default betas: the guard may add entries; counted too
        assert default == stored_numbers_per_token(m.cfg, mode, k, store, keep_z) * 4 * idx.numel()
        with torch.no_grad():  # betas of 1: nothing is amplified and the guard adds nothing: the formula's |C|
            for p in (p for blk in m.blocks[1:] for p in blk.projections()):
                p.beta.fill_(1.0)
        held[mode, keep_z], loss = held_activation_bytes(m, idx, idx)
        loss.backward()
        assert held[mode, keep_z] == stored_numbers_per_token(m.cfg, mode, k, keep_z=keep_z) * 4 * idx.numel()
    h, ff, r, L = 128, m.cfg.ff_dim, 32, 16  # the formulas written out (plan.py derives them); |C| = 2 (k = 8), 8 (k = 2)
    lanes, z = (5 * h + 2 * ff, 7 * r) if arch == "llama" else (9 * h, 6 * r)
    assert held["reversible", True] == (z * (L - 1) + 2 * (h + lanes)) * 4 * idx.numel()
    assert held["reversible", False] == 8 * (h + lanes) * 4 * idx.numel()
    assert held["reversible", True] < held["crnet", True] < 0.4 * held["block", True]


def test_guard_entries_are_counted():
    m = recompute.apply(make("none", n_layer=6), "reversible", 8, True)
    with torch.no_grad():
        m.blocks[3].qkv.beta.fill_(1e-4)
    idx = torch.randint(0, 50, (2, 16))
    held, _ = held_activation_bytes(m, idx, idx)
    plan = stored_lanes(m.blocks, 8, torch.float32, stream=True)
    assert held == stored_numbers_per_token(m.cfg, "reversible", 8, plan) * 4 * idx.numel()
    assert held > stored_numbers_per_token(m.cfg, "reversible", 8) * 4 * idx.numel()


def test_apply_arguments():
    m = make("none")
    assert recompute.apply(m, "reversible", 2, False).recompute == ("reversible", 2, False, LANE_RTOL, BETA_DRIFT)
    assert recompute.apply(m, "reversible", 2, beta_drift=0.5).recompute == ("reversible", 2, True, LANE_RTOL, 0.5)
    assert recompute.apply(make("none"), *m.recompute).blocks[0].forward.args[0].planner.drift == 0.5  # reapplied
    for bad in (-0.1, float("nan"), True, "0.01"):  # refused before the model changes
        with pytest.raises(ValueError, match="beta_drift must be a number >= 0"):
            recompute.apply(m, "crnet", 4, beta_drift=bad)
        assert m.recompute[:2] == ("reversible", 2) and m.blocks[0].forward.args[0].mode == "reversible"
    with pytest.raises(ValueError, match="needs param='crnet'"):
        recompute.apply(make("none", param="full"), "reversible")
    with pytest.raises(ValueError, match="keep_z=.*applies to recompute='reversible' only"):
        recompute.apply(m, "crnet", 8, False)


def test_a_deep_copy_and_a_second_backward():
    import copy
    ref, rev = twins(True, 2, n_layer=4, dropout=0.1)
    twin = copy.deepcopy(rev)
    idx = torch.randint(0, 50, (2, 16))
    assert_exact(ref, twin, idx)
    torch.manual_seed(0)
    twin.zero_grad(set_to_none=True)
    loss = twin(idx, idx)[1]
    loss.backward(retain_graph=True)  # stored entries outlive a backward; rebuilt ones are rebuilt again
    first = {n: p.grad.clone() for n, p in twin.named_parameters()}
    loss.backward()
    assert all(torch.allclose(p.grad, 2 * first[n], rtol=1e-6, atol=0) for n, p in twin.named_parameters())


def two_process_worker(parallel, keep_z):
    """Under torch.distributed.run: each of 2 processes takes half the batch; rank 0 checks the averaged
    gradients against one plain-autograd process on the whole batch."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import parallel as par
    from model import ModelConfig, Transformer
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = ModelConfig(n_layer=5, n_head=2, n_embd=32, intermediate_size=48, vocab_size=50, block_size=16, rank=8)
    model, raw = par.build_model(cfg, parallel, torch.device("cpu"), 0, recompute=("reversible", 2, keep_z))
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    model(idx[2 * rank:2 * rank + 2], idx[2 * rank:2 * rank + 2])[1].backward()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in raw.named_parameters()}
    if rank == 0:
        with torch.device("meta"):
            ref = Transformer(cfg)
        par.materialize(ref, torch.device("cpu"), 0)
        assert_grads_close(loss_and_grads(ref, idx)[1], grads)
    worker_done()


@pytest.mark.parametrize("parallel,keep_z", [("ddp", False), ("fsdp", True), ("fsdp", False)])
def test_two_processes_match_one(parallel, keep_z):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path[:0] = [{root!r}, {root + '/tests'!r}]; import test_reversible as t; " \
           f"t.two_process_worker({parallel!r}, {keep_z})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                        sys.executable, "-c", code],
                       cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def fsdp_mixed_precision_worker():
    """One process under torch.distributed.run: FSDP2 with bf16 parameters (train.py's dtype=bfloat16) and bf16
    autocast. Oracle: plain autograd of the same sharded model with float32 lanes (recompute="none" with the lane
    dtype crnet and reversible set). FSDP2 casts a module's inputs to bf16 unless told not to; bf16 lanes would
    put bf16 round-off, grown by 1/|s| per rebuilt layer, into the inverted lanes. GPT-2: its LayerNorms' bf16
    weights meet autocast's float32 stream (the CPU kernel refuses that mix unpromoted)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import parallel as par
    from model import ModelConfig
    dist.init_process_group("gloo")
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))

    def grads(cfg, mode):
        model, raw = par.build_model(cfg, "fsdp", torch.device("cpu"), 0, True, recompute=(mode, 8))
        for p in (p for b in raw.blocks for p in b.projections()):
            p.lane_dtype = torch.float32
        torch.manual_seed(0)
        with torch.no_grad():  # betas of either sign, 0.3 <= |beta| <= 1.5: the guard rebuilds most lanes
            for p in (p for b in raw.blocks[1:] for p in b.projections()):
                beta = p.beta.to_local()  # one process: its shard is the whole beta
                beta.uniform_(-1.2, 1.2).add_(beta.sign() * 0.3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, idx)[1].backward()
        return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float() for n, p in raw.named_parameters()}

    # the plan's |s| is the one the forward divides by: the bf16 gathered beta's where rounding lowers it
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, intermediate_size=48, vocab_size=50, block_size=16, rank=8)
    model, raw = par.build_model(cfg, "fsdp", torch.device("cpu"), 0, True, recompute=("crnet", 8))
    seen = []
    raw.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(mod.qkv.beta.dtype))
    with torch.no_grad():
        for p in (p for b in raw.blocks[1:] for p in b.projections()):
            p.beta.to_local().fill_(1.0)
        raw.blocks[1].o.beta.to_local()[0] = 0.7  # bf16: 0.69921875
        raw.blocks[2].qkv.beta.to_local()[:] = -0.699  # bf16: -0.69921875, further from 0: the float32 value counts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)[1].backward()
    eps = raw.blocks[1].qkv.beta_eps
    assert seen == [torch.bfloat16] and min_scales(raw.blocks).tolist() == [
        [1 + eps, 0.69921875 + eps, 1 + eps, 1 + eps], [0.6990000009536743 + eps, 1 + eps, 1 + eps, 1 + eps]]
    # the CUDA plan from a step-old beta: bf16 rounds 0.7090044 up, to 0.7109375, but one AdamW step at lr 1e-4
    # (5e-5 < drift) crosses the midpoint and the next forward reads 0.70703125: the plan lowers, then rounds
    with torch.no_grad():
        raw.blocks[1].o.beta.to_local()[0] = 0.7090044
    drift = adamw_drift(1e-4, (0.9, 0.95))
    inv, exact = from_stale(min_betas(raw.blocks), raw.blocks, drift)
    read = torch.tensor(0.7090044 - 5e-5).bfloat16().item()
    assert read == 0.70703125 and exact[0][1] == 1 / (0.7090044021606445 + eps) and inv[0][1] == 1 / (read + eps)
    for arch in ("llama", "gpt2"):
        cfg = ModelConfig(arch=arch, bias=arch == "gpt2", n_layer=8, n_head=2, n_embd=32, intermediate_size=48,
                          vocab_size=50, block_size=16, rank=8)
        ref = grads(cfg, "none")
        for mode in ("crnet", "reversible"):  # bf16 gradients, llama: 5e-4 (6e-2, 7e-2 with FSDP2 casting the lanes)
            assert_grads_close(ref, grads(cfg, mode), rtol=2e-3)
    worker_done()


def fsdp_float32_reduction_worker():
    """One of two processes: FSDP2 with bf16 parameters computes bf16 gradients, and reduces them in float32
    (reduce_dtype): the mean of two ranks' bf16 gradients then keeps the bit a bf16 reduction would round away."""
    import torch.distributed as dist

    import parallel as par
    from model import ModelConfig
    dist.init_process_group("gloo")
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, intermediate_size=48, vocab_size=50, block_size=16, rank=8)
    model, raw = par.build_model(cfg, "fsdp", torch.device("cpu"), 0, True)
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(dist.get_rank()))  # other data per rank
    seen = []
    raw.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(mod.qkv.A.dtype))  # gathered for the forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)[1].backward()
    assert seen == [torch.bfloat16]
    g = torch.cat([p.grad.to_local().flatten() for p in raw.parameters() if p.grad is not None])
    assert g.dtype == torch.float32 and (g != g.bfloat16().float()).float().mean() > 0.3  # reduce_dtype bf16: 0
    worker_done()


def worker_done():
    """The end of a worker whose checks passed: every process waits for the others (gloo aborts a process whose
    peer tears the group down while it still works), then exits without interpreter teardown, where a gloo thread
    has aborted a process (SIGABRT)."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def run_worker(name, nproc, module="test_reversible"):
    """tests/{module}.py's function `name` in nproc processes under torch.distributed.run (gloo)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path[:0] = [{root!r}, {root + '/tests'!r}]; import {module} as t; t.{name}()"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "--no-python", sys.executable, "-c", code],
                       cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_fsdp_reduces_bf16_gradients_in_float32():
    run_worker("fsdp_float32_reduction_worker", 2)


def fsdp_bf16_forward_is_ddp_autocast_worker():
    """One process under torch.distributed.run: FSDP2 with bf16 parameters under bf16 autocast (train.py's
    data_parallel="fsdp", dtype=bfloat16) against a plain model with float32 parameters under the same autocast
    (the DDP path), both holding the same bf16-representable weights: the same loss, bit for bit, in every recompute
    mode, because the residual stream is float32 in both (Transformer.embed). With a bf16 stream under FSDP (its
    bf16 embedding's output) the losses differed by up to 8e-5."""
    import torch.distributed as dist

    import parallel as par
    from model import ModelConfig
    dist.init_process_group("gloo")
    for arch in ("llama", "gpt2"):
        for mode in ("none", "block", "crnet", "reversible"):
            cfg = ModelConfig(arch=arch, n_layer=4, n_head=4, n_embd=64, intermediate_size=160, vocab_size=97,
                              block_size=32, rank=16)
            model, raw = par.build_model(cfg, "fsdp", torch.device("cpu"), 0, True, recompute=(mode, 2))
            ref = par.build_model(cfg, "ddp", torch.device("cpu"), 0, recompute=(mode, 2))[0]
            with torch.no_grad():  # (one process: a shard is the whole tensor)
                for p, q in zip(raw.parameters(), ref.parameters()):
                    q.copy_(q.bfloat16())
                    p.to_local().copy_(q)
            idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = [m(idx, idx)[1].item() for m in (model, ref)]
            assert losses[0] == losses[1], (arch, mode, losses)
    worker_done()


def test_fsdp_with_bf16_parameters_computes_what_autocast_computes():
    run_worker("fsdp_bf16_forward_is_ddp_autocast_worker", 1)


def test_fsdp_mixed_precision_keeps_the_lanes_the_inversion_needs():
    run_worker("fsdp_mixed_precision_worker", 1)


@pytest.mark.parametrize("arch", [[], ["--arch=qwen3", "--n_kv_head=1", "--head_dim=12"]], ids=["llama", "qwen3-gqa"])
def test_train_py_runs_it_and_a_run_resumes_across_modes(arch, tiny_data, tmp_path):
    """train.py's keys: a reversible (keep_z=False) run with dropout logs plain autograd's losses, and resumes
    under crnet; keep_z=False with another mode is a config error. Qwen-3 with GQA: packed lanes, QK-norm."""
    import train
    from conftest import TINY, train_losses
    base = [*TINY, *arch, f"--data_dir={tiny_data}", "--max_iters=8", "--eval_interval=4", "--dropout=0.1",
            "--recompute_every=2"]
    train.main([*base, f"--out_dir={tmp_path / 'none'}"])
    train.main([*base, f"--out_dir={tmp_path / 'rev'}", "--recompute=reversible", "--keep_z=False", "--stop_iter=4"])
    train.main([f"--out_dir={tmp_path / 'rev'}", "--init_from=resume", "--recompute=crnet", "--keep_z=True"])
    a, b = train_losses(tmp_path / "none"), train_losses(tmp_path / "rev")
    assert list(b) == list(range(1, 9)) and all(b[i] == pytest.approx(a[i], rel=1e-5) for i in a)
    with pytest.raises(ValueError, match="keep_z=False: applies to recompute='reversible' only"):
        train.main([*base, f"--out_dir={tmp_path / 'x'}", "--recompute=crnet", "--keep_z=False"])


def test_recompute_rtol_trades_stored_lanes_for_round_off():
    """The guard's budget is apply's rtol (train.py's recompute_rtol): a larger one stores fewer lanes beyond the
    checkpoint set, inf none; gradients then carry more round-off, still close to plain autograd's."""
    ref, rev = twins(False, 8, randomize=False, n_layer=16, n_embd=32, rank=8)
    ckpt = checkpoint_layers(16, 8)
    extra = {t: {k for k in stored_lanes(rev.blocks, 8, torch.float32, True, False, t) if k[0] not in ckpt}
             for t in (1e-5, 1e-3, float("inf"))}
    assert len(extra[1e-5]) > len(extra[1e-3]) > 0 == len(extra[float("inf")])  # fewer as the budget grows
    recompute.apply(rev, "reversible", 8, False, float("inf"))
    assert rev.recompute[:4] == ("reversible", 8, False, float("inf"))
    idx = torch.randint(0, 50, (3, 16))
    (l_ref, g_ref), (l_rev, g_rev) = loss_and_grads(ref, idx), loss_and_grads(rev, idx)
    assert torch.equal(l_ref, l_rev)
    assert_grads_close(g_ref, g_rev, rtol=1e-3)
    for bad in (0, -1e-5, True, "1e-5"):
        with pytest.raises(ValueError, match="recompute_rtol=.* must be a positive number"):
            recompute.apply(rev, "reversible", 8, False, bad)
