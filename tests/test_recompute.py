"""recompute.py against its oracles: plain autograd ("none"), float64 gradcheck, the stored-bytes formula."""
import pytest
import torch

import plan
from plan import checkpoint_layers, held_activation_bytes, stored_lanes, stored_numbers_per_token
import recompute
from model import ModelConfig, Transformer
from sample import generate


def make(recompute_mode="none", recompute_every=8, **kw):
    base = dict(n_layer=4, n_head=2, n_embd=32, intermediate_size=48, vocab_size=50, block_size=16, rank=8, param="crnet")
    return recompute.apply(Transformer(ModelConfig(**{**base, **kw})), recompute_mode, recompute_every)


def randomize_betas(m, low=-1.5, high=1.5):
    with torch.no_grad():
        for blk in m.blocks[1:]:
            for p in blk.projections():
                if hasattr(p, "beta"):
                    p.beta.uniform_(low, high)


def loss_and_grads(m, idx, seed=0):
    torch.manual_seed(seed)
    m.zero_grad(set_to_none=True)
    _, loss = m(idx, idx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def assert_grads_close(ref, got, rtol=1e-5):
    """Each tensor against its own norm; tiny ones (a scalar beta's gradient is a sum with heavy
    cancellation) against 1e-2 of the typical gradient norm."""
    typical = torch.stack([g.norm() for g in ref.values()]).median()
    for name, g in ref.items():
        err = (got[name] - g).norm()
        assert err <= rtol * max(g.norm(), 1e-2 * typical), (name, err.item(), g.norm().item())


def twins(mode, **kw):
    torch.manual_seed(0)
    ref = make("none", **kw)
    randomize_betas(ref)
    other = make(mode, **kw)
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("every,n_layer", [(1, 4), (2, 4), (2, 5), (8, 4), (8, 10), (3, 10)])
def test_crnet_recompute_matches_plain_autograd(arch, every, n_layer):
    ref, rc = twins("crnet", arch=arch, n_layer=n_layer, recompute_every=every, bias=arch == "gpt2",
                    rank=[8, 4, 6, 5, 7, 8, 3, 6, 5, 4][:n_layer])
    idx = torch.randint(0, 50, (3, 16))
    l_ref, g_ref = loss_and_grads(ref, idx)
    l_rc, g_rc = loss_and_grads(rc, idx)
    assert torch.equal(l_ref, l_rc)
    assert_grads_close(g_ref, g_rc)


@pytest.mark.parametrize("kw", [dict(first_layer="lowrank"), dict(beta_learnable=False), dict(arch="gpt2", bias=True,
                                first_layer="lowrank", beta_learnable=False)], ids=["lowrank-first", "fixed-beta", "both"])
def test_crnet_recompute_matches_plain_autograd_in_the_ablations(kw):
    ref, rc = twins("crnet", n_layer=5, recompute_every=2, rank=[5, 4, 6, 5, 7], **kw)
    idx = torch.randint(0, 50, (3, 16))
    l_ref, g_ref = loss_and_grads(ref, idx)
    l_rc, g_rc = loss_and_grads(rc, idx)
    assert torch.equal(l_ref, l_rc) and g_ref.keys() == g_rc.keys()
    assert any("A" in n for n in g_ref if n.startswith("blocks.0.")) == (kw.get("first_layer") == "lowrank")
    assert any(n.endswith("beta") for n in g_ref) == kw.get("beta_learnable", True)
    assert_grads_close(g_ref, g_rc)
    m = make("crnet", n_layer=5, recompute_every=2, rank=[5, 4, 6, 5, 7], **kw)
    held, _ = held_activation_bytes(m, idx, idx)  # layer 1's Z is kept too when it is low-rank
    assert held == stored_numbers_per_token(m.cfg, "crnet", 2) * 4 * idx.numel()


GQA = {"llama-gqa": dict(n_kv_head=1), "gpt2-gqa-bias": dict(arch="gpt2", n_kv_head=1, bias=True),
       "qwen3-gqa": dict(arch="qwen3", n_kv_head=1, head_dim=12), "qwen3-head-dim": dict(arch="qwen3", head_dim=24)}


@pytest.mark.parametrize("mode", ["crnet", "reversible"])
@pytest.mark.parametrize("kw", GQA.values(), ids=list(GQA))
def test_recompute_matches_plain_autograd_with_grouped_query_attention_and_qk_norm(kw, mode):
    """q, k, v of different widths (one packed lane, a beta each: Eq. 6 inverted per projection at its own width),
    a head_dim of its own, QK-norm; the held bytes are the formula's (q + 2 kv lane numbers)."""
    ref, rc = twins(mode, n_layer=5, recompute_every=2, rank=[5, 4, 6, 5, 7], **kw)
    assert ref.blocks[1].qkv.packed == ("n_kv_head" in kw) and ref.blocks[1].qkv.beta.shape == (3,)
    idx = torch.randint(0, 50, (3, 16))
    l_ref, g_ref = loss_and_grads(ref, idx)
    l_rc, g_rc = loss_and_grads(rc, idx)
    assert torch.equal(l_ref, l_rc)
    assert_grads_close(g_ref, g_rc)
    m = make(mode, n_layer=5, recompute_every=2, rank=[5, 4, 6, 5, 7], **kw)
    store = stored_lanes(m.blocks, 2, torch.float32, mode == "reversible")  # with the guard's entries, if any
    held, _ = held_activation_bytes(m, idx, idx)
    assert held == stored_numbers_per_token(m.cfg, mode, 2, store) * 4 * idx.numel()


def test_dropout_is_replayed_exactly():
    ref, rc = twins("crnet", dropout=0.2, n_layer=5, recompute_every=2)
    idx = torch.randint(0, 50, (2, 16))
    assert_grads_close(loss_and_grads(ref, idx, seed=7)[1], loss_and_grads(rc, idx, seed=7)[1])


@pytest.mark.parametrize("param", ["full", "lowrank", "cola", "crnet"])
def test_block_checkpointing_matches_plain_autograd(param):
    ref, rc = twins("block", param=param, arch="gpt2", bias=True)
    idx = torch.randint(0, 50, (2, 16))
    assert_grads_close(loss_and_grads(ref, idx)[1], loss_and_grads(rc, idx)[1])


def test_checkpoint_set():
    assert checkpoint_layers(16, 8) == {15, 7}  # 0-based: layers 16 and 8, never layer 1
    assert checkpoint_layers(10, 8) == {9, 1}
    assert checkpoint_layers(8, 8) == {7}
    assert checkpoint_layers(4, 1) == {3, 2, 1}
    assert checkpoint_layers(1, 8) == {0}  # a 1-layer model keeps its only (last) layer


def test_guard_stores_lanes_below_tiny_betas_and_is_needed():
    torch.manual_seed(0)
    ref, rc = make("none", n_layer=6), make("crnet", n_layer=6, recompute_every=8)  # default betas 0.707
    rc.load_state_dict(ref.state_dict())
    with torch.no_grad():  # layer 4's q, k, v scales ~1e-4: inverting them amplifies round-off 1e4 times
        for m in (ref, rc):
            m.blocks[3].qkv.beta.fill_(1e-4)
    store = stored_lanes(rc.blocks, 8, torch.float32)
    assert store == {(5, g) for g in range(4)} | {(2, 0)}  # the last layer, plus the qkv lane of layer 3
    idx = torch.randint(0, 50, (2, 16))
    g_ref = loss_and_grads(ref, idx)[1]
    assert_grads_close(g_ref, loss_and_grads(rc, idx)[1])
    # without the guard the same step's gradients are visibly wrong: the guard is what keeps them exact
    recompute.apply(rc, "crnet", 8, rtol=float("inf"))
    with pytest.raises(AssertionError):
        assert_grads_close(g_ref, loss_and_grads(rc, idx)[1])


@pytest.mark.parametrize("margin", [plan.BETA_DRIFT, 0.0])
def test_a_plan_from_the_previous_steps_betas_is_safe_after_they_move(margin):
    """On CUDA the plan reads the betas of the previous forward, each |beta| lowered by the planner's margin (here
    the default BETA_DRIFT; plan.from_stale, from plan.LanePlanner.inv_scales), so that no step waits for the GPU.
    For betas that then move by up to that margin (an optimizer step), the plan must be one the guard accepts at the
    new betas; without the margin it is not."""
    torch.manual_seed(0)
    m = make("crnet", n_layer=12)
    unsafe = 0
    for trial in range(20):
        randomize_betas(m, 0.02, 0.3)
        with torch.no_grad():
            for p in (p for b in m.blocks[1:] for p in b.projections()):
                p.beta.mul_(torch.randint(0, 2, p.beta.shape) * 2 - 1)  # both signs
        inv_old = plan.from_stale(plan.min_betas(m.blocks), m.blocks, margin)[0]
        store = stored_lanes(m.blocks, 4, torch.float32, inv_s=inv_old)
        with torch.no_grad():
            for p in (p for b in m.blocks[1:] for p in b.projections()):
                p.beta.add_(torch.empty_like(p.beta).uniform_(-plan.BETA_DRIFT, plan.BETA_DRIFT))
        unsafe += stored_lanes(m.blocks, 4, torch.float32, store=store) != store
    assert unsafe == 0 if margin else unsafe > 0


def test_low_precision_lanes_are_always_stored():
    m = make("crnet", n_layer=5)
    assert stored_lanes(m.blocks, 8, torch.bfloat16) == {(l, g) for l in range(5) for g in range(4)}
    assert stored_lanes(m.blocks, 8, torch.float32) == {(4, g) for g in range(4)}  # default betas: no guard


def test_float64_gradcheck():
    torch.manual_seed(0)
    m = make("crnet", n_layer=3, n_head=2, n_embd=8, intermediate_size=12, rank=2, vocab_size=11, block_size=5,
             recompute_every=2).double()
    randomize_betas(m)
    idx = torch.randint(0, 11, (1, 5))
    # gradcheck perturbs the model's own parameters in place; they enter every block's autograd Function
    assert torch.autograd.gradcheck(lambda *params: m(idx, idx)[1], tuple(m.parameters()), fast_mode=True)


def test_bf16_autocast_error_is_no_worse_than_block_checkpointing():
    torch.manual_seed(0)
    kw = dict(n_layer=6, n_embd=64, n_head=4, intermediate_size=128, rank=16, recompute_every=3)
    ref = make("none", **kw)
    randomize_betas(ref, 0.3, 1.2)
    models = {mode: make(mode, **kw) for mode in ("block", "crnet")}
    for m in models.values():
        m.load_state_dict(ref.state_dict())
    # crnet forms its lanes in float32 (the inversion needs them); block checkpointing of that same model, so that
    # the comparison measures the recomputation's error, not the lanes' precision
    for p in (p for b in models["block"].blocks for p in b.projections()):
        p.lane_dtype = torch.float32
    idx = torch.randint(0, 50, (4, 16))
    g32 = loss_and_grads(ref, idx)[1]
    err = {}
    for mode, m in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = loss_and_grads(m, idx)[1]
        err[mode] = torch.stack([(g[n] - g32[n]).norm() / g32[n].norm() for n in g32])
    assert err["block"].max() > 1e-4  # bf16 really was in use
    # stated factor: per tensor at most 1.5x block's error (+1e-3 absolute for tensors both get ~exact)
    assert (err["crnet"] <= 1.5 * err["block"] + 1e-3).all(), (err["crnet"], err["block"])
    assert err["crnet"].mean() <= 1.2 * err["block"].mean()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["none", "block", "crnet", "reversible"])
def test_under_bf16_lanes_are_float32_only_where_recompute_inverts_them(mode, arch):
    """Every tensor an op writes inside a projection, counted under bf16 autocast (a TorchDispatchMode entered
    around each Projection call): none of lane size is float32 unless recompute inverts Eq. 6."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from model import Projection
    m = make(mode, arch=arch, bias=arch == "gpt2", n_layer=4, n_embd=64, n_head=4, intermediate_size=128, rank=16)
    idx = torch.randint(0, 50, (32, 16))  # 512 tokens: a lane (>= 512 x 64 numbers) outsizes every parameter
    written = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            written.extend((t.dtype, t.numel()) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    tracking = Track()
    hooks = [h for p in m.modules() if isinstance(p, Projection) for h in (
        p.register_forward_pre_hook(lambda *_: (tracking.__enter__(), None)[1]),
        p.register_forward_hook(lambda *_: (tracking.__exit__(None, None, None), None)[1]))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(idx, idx)[1].backward()
    for h in hooks:
        h.remove()
    lane_sized = [dt for dt, n in written if n >= idx.numel() * 64]
    assert torch.bfloat16 in lane_sized
    assert (torch.float32 in lane_sized) == (mode in ("crnet", "reversible")), set(lane_sized)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_held_bytes_match_the_formula_and_crnet_beats_block(arch):
    kw = dict(arch=arch, n_layer=16, n_head=4, n_embd=128, intermediate_size=344, vocab_size=64, block_size=64,
              rank=32, recompute_every=8)
    idx = torch.randint(0, 64, (2, 64))
    held = {}
    for mode in ("none", "block", "crnet"):
        m = make(mode, **kw)
        held[mode], loss = held_activation_bytes(m, idx, idx)
        loss.backward()
        if mode != "none":
            assert held[mode] == stored_numbers_per_token(m.cfg, mode, 8) * 4 * idx.numel()
    assert held["crnet"] < 0.4 * held["block"] < held["none"]  # 0.363 (llama), 0.370 (gpt2) at this shape


def test_reversible_backward_drops_each_rebuilt_block_input_once_used(monkeypatch):
    """While block l replays, the stash holds of the rebuilt block inputs x_l alone (for block l - 1): the x_{l+1}
    block l + 1 rebuilt is dropped also where x_l was stored and x_{l+1} went unused (it was held to the end); and
    after backward it holds only stored tensors."""
    stashes, seen, replay = [], [], recompute.BODIES["replay"]
    init = recompute.LaneStash.__init__
    monkeypatch.setattr(recompute.LaneStash, "__init__", lambda self, *a, **k: (init(self, *a, **k), stashes.append(self))[0])
    monkeypatch.setitem(recompute.BODIES, "replay", lambda block, *a: (seen.append((block.layer_idx, sorted(
        k[0] for k in stashes[-1].lanes if k[1] == plan.STREAM and k not in stashes[-1].store))), replay(block, *a))[1])
    m = make("reversible", n_layer=6, recompute_every=2)
    m(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))[1].backward()
    store = stashes[-1].store
    assert {l for l, _ in seen} == set(range(6)) and (3, plan.STREAM) in store and (4, plan.STREAM) not in store
    for l, rebuilt in seen:
        assert set(rebuilt) <= {l}, (l, rebuilt)
    assert set(stashes[-1].lanes) <= store  # after backward, nothing rebuilt is left (a second one rebuilds again)


@pytest.mark.parametrize("mode", ["crnet", "reversible"])
def test_held_bytes_of_a_mixture_of_experts_are_the_formulas_exactly(mode):
    """Qwen-3-MoE: besides the lanes (one MoE lane a layer) recompute keeps each layer's chosen experts (int64 indices)
    and the D that feeds the lane; the count is exact, as for the dense models."""
    m = make(mode, arch="qwen3_moe", n_layer=5, recompute_every=2, n_expert=4, expert_top_k=2, n_kv_head=1, head_dim=12)
    idx = torch.randint(0, 50, (3, 16))
    store = stored_lanes(m.blocks, 2, torch.float32, mode == "reversible")
    held, _ = held_activation_bytes(m, idx, idx)
    assert plan.route_numbers(m.cfg) == 2 * 2 * 5  # top 2 experts x 5 layers, an int64 (2 float32 numbers) each
    assert held == stored_numbers_per_token(m.cfg, mode, 2, store) * 4 * idx.numel()


def test_guard_lanes_are_counted():
    m = make("crnet", n_layer=6)
    with torch.no_grad():
        m.blocks[3].qkv.beta.fill_(1e-4)
    idx = torch.randint(0, 50, (2, 16))
    held, _ = held_activation_bytes(m, idx, idx)
    store = stored_lanes(m.blocks, 8, torch.float32)
    assert held == stored_numbers_per_token(m.cfg, "crnet", 8, store) * 4 * idx.numel()
    assert held > stored_numbers_per_token(m.cfg, "crnet", 8) * 4 * idx.numel()


def test_held_bytes_leave_out_the_planners_host_copy(monkeypatch):
    """On CUDA the planner keeps a pinned host copy of the betas until the next step (plan.LanePlanner.inv_scales):
    memory off the batch's device, not an activation. Emulated on the CPU by a copy on another device (meta)."""
    m = make("crnet", n_layer=6)
    planned = plan.LanePlanner.inv_scales

    def keeps_a_copy(self):
        self.pending = torch.empty(256, device="meta")  # counted as 1 KiB were the device not checked
        return planned(self)

    monkeypatch.setattr(plan.LanePlanner, "inv_scales", keeps_a_copy)
    idx = torch.randint(0, 50, (2, 16))
    held, _ = held_activation_bytes(m, idx, idx)
    assert m.blocks[0].forward.args[0].planner.pending is not None
    assert held == stored_numbers_per_token(m.cfg, "crnet", 8) * 4 * idx.numel()


def test_evaluation_and_generation_do_not_recompute(monkeypatch):
    m = make("crnet")
    ref = make("none")
    ref.load_state_dict(m.state_dict())
    monkeypatch.setattr(recompute.CRNetBlock, "apply", lambda *a: pytest.fail("recompute under no_grad / eval"))
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.equal(m(idx)[0], ref(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], ref.eval()(idx)[0])  # eval with grad enabled: the plain forward too
    assert generate(m, idx, 4, temperature=0).shape == (2, 12)


def test_apply_replaces_and_undoes(monkeypatch):
    m = make("crnet", recompute_every=2)
    assert m.recompute == ("crnet", 2, True, plan.LANE_RTOL, plan.BETA_DRIFT) and "forward" in vars(m.blocks[0])
    recompute.apply(m, "none")
    assert m.recompute[:2] == ("none", 8) and all("forward" not in vars(b) for b in m.blocks)
    recompute.apply(recompute.apply(m, "block"), "crnet", 3)  # a second apply replaces the first
    calls = []
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1))
    m.train()
    m(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[1].backward()
    assert not calls and m.recompute[:2] == ("crnet", 3)
    with pytest.raises(ValueError, match="needs param='crnet'"):
        recompute.apply(make("none", param="full"), "crnet")
    with pytest.raises(ValueError, match="recompute='sometimes'"):
        recompute.apply(m, "sometimes")
    with pytest.raises(ValueError, match="recompute_every=0"):
        recompute.apply(m, "crnet", 0)


def test_model_and_recompute_do_not_import_each_other():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    assert "import recompute" not in (root / "model.py").read_text()
    assert not any(w in (root / "recompute.py").read_text() for w in ("import model", "from model"))


@pytest.mark.parametrize("mode", ["none", "block", "crnet"])
def test_inductor_compile_matches_eager(mode):
    """torch.compile with its default backend (inductor: generated C++ on the CPU, Triton on CUDA), two steps:
    per region as train.py compiles, and (crnet) a whole-model torch.compile, which steps around the blocks."""
    import parallel
    ref, rc = twins(mode, n_layer=3, recompute_every=2)
    compiled = parallel.compile_regions(rc) if mode != "crnet" else torch.compile(rc)  # crnet: see below
    idx = torch.randint(0, 50, (2, 16))
    for step in range(2):
        l_ref, g_ref = loss_and_grads(ref, idx, seed=step)
        torch.manual_seed(step)
        rc.zero_grad(set_to_none=True)
        loss = compiled(idx, idx)[1]
        loss.backward()
        assert torch.allclose(loss, l_ref, rtol=1e-5)
        assert_grads_close(g_ref, {n: p.grad for n, p in rc.named_parameters()}, rtol=1e-4)  # fused kernels round differently


def block_held_bytes(loss):
    """Bytes the autograd graph of `loss` holds for the blocks, walked node by node: what every CRNetBlock node
    saved, and the lanes (inputs) in its stash. Independent of how the bodies ran (eager or compiled)."""
    seen, storages, stack = set(), {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CRNetBlockBackward":
            for t in (*node.saved_tensors, *node.stash.lanes.values()):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize("mode", ["crnet", "reversible"])
def test_compiled_algorithm_1_matches_plain_autograd_and_holds_what_it_plans(mode):
    """Compiled as train.py's torch_compile=True compiles it (recompute.apply(compile=True) and parallel.compile_regions):
    two steps equal plain autograd; the bodies really compiled, one dynamo graph per block kind (6 layers: at most 3
    forward graphs, for layer 1, layer 2 and the rest); and the autograd graph holds exactly the formula's bytes for
    the blocks, so no compiled region saved a tensor the Function meant to drop."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as compiled_graphs
    import parallel
    torch._dynamo.reset()
    ref, rc = twins("none", n_layer=6, recompute_every=2)
    recompute.apply(rc, mode, 2, compile=True)
    parallel.compile_regions(rc)
    idx = torch.randint(0, 50, (2, 16))
    for step in range(2):
        l_ref, g_ref = loss_and_grads(ref, idx, seed=step)
        torch.manual_seed(step)
        rc.zero_grad(set_to_none=True)
        loss = rc(idx, idx)[1]
        held = block_held_bytes(loss)
        loss.backward()
        assert torch.allclose(loss, l_ref, rtol=1e-5)
        assert_grads_close(g_ref, {n: p.grad for n, p in rc.named_parameters()}, rtol=1e-4)  # fused kernels round differently
        x0 = rc.cfg.n_embd * (mode == "crnet")  # crnet also keeps block 1's input, the embedding output
        assert held == (stored_numbers_per_token(rc.cfg, mode, 2) + x0) * 4 * idx.numel()
    for body in ("forward_body", "invert_lanes", "replay"):
        assert 1 <= len(compiled_graphs(recompute.BODIES[body].__code__)) <= 3, body


@pytest.mark.parametrize("mode", ["none", "crnet", "reversible"])
def test_compiled_steps_settle_on_static_graphs_one_per_body(mode):
    """A compiled step is fast only if it runs what it compiled. Under bf16 autocast, as train.py compiles: after
    the first step dynamo compiles nothing more, also when the round-off guard's choice of stored lanes changes (a
    rebuilt lane of layer 1 once had other strides than a stored one: a replay graph per pattern); no graph takes a
    size or stride as an input (layer 2's input lanes, views of layer 1's X W, have other strides than later
    layers', which once made the strides of the graph for layers 3..L symbolic); no region breaks into pieces (torch
    2.11's dynamo broke the embedding at is_autocast_available and each layer at `project or ...`); and no method of
    model.py is compiled on its own (a body call that formed no graph once made dynamo give up on invert_lanes for
    every layer and compile its pieces one by one, leaving the inversion's arithmetic eager)."""
    import logging
    import parallel
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as compiled_graphs
    from torch._dynamo.utils import counters
    from model import Projection
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = recompute.apply(make("none", n_layer=8), mode, 4, compile=True)
    randomize_betas(m)  # the round-off guard stores lanes of some groups only: a pattern per layer
    parallel.compile_regions(m)
    symbols, log = [], logging.getLogger("torch.fx.experimental.symbolic_shapes")
    handler = logging.Handler()
    handler.emit = lambda record: symbols.append(record.getMessage()) if "create_symbol" in record.msg else None
    level, _ = log.level, log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        graphs, extra = [], set()
        if mode != "none":  # the guard's choices, forced on top of its plan: patterns of layer 1's and layer 5's lanes
            rc = m.blocks[0].forward.args[0]
            planner = rc.planner
            rc.planner = lambda *a: set(planner(*a)) | extra
        for extra in ((), (), (), ((0, 0), (0, 3)), ((0, 1), (4, 2)), ((0, 0), (0, 1), (0, 2), (0, 3), (4, 0))):
            extra = set(extra)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))[1]
            loss.backward()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert graphs[0] == graphs[-1], f"graphs compiled after the first step: {graphs}"
    assert not symbols, symbols[0]
    assert not counters["graph_break"], dict(counters["graph_break"])
    for body in ("forward_body", "invert_lanes", "replay"):  # layer 1, layer 2, the rest
        assert len(compiled_graphs(recompute.BODIES[body].__code__)) <= 3, body
    for f in (Projection.output_product, Projection.lane_scale, Projection.lane_add, type(m.blocks[0]).projections):
        assert not compiled_graphs(f.__code__), f"{f.__qualname__} was compiled on its own"


@pytest.mark.parametrize("drift", [plan.BETA_DRIFT, 0.7])
def test_a_beta_that_moved_more_than_the_margin_is_reported_a_step_late(monkeypatch, drift):
    """The CUDA plan (plan.LanePlanner.inv_scales) reads last step's betas less the planner's drift (apply's
    beta_drift), and checks the plan it used against them exactly one step later: a jump larger than the margin is a
    warning, a small move is not, and a margin as large as the jump covers it."""
    m = recompute.apply(make("none", n_layer=6), "crnet", 8, beta_drift=drift)
    rc = m.blocks[0].forward.args[0]
    history = []

    def stale(self):  # what inv_scales returns on CUDA, emulated here from the betas of the previous forward
        now = plan.min_betas(self.blocks)
        before = history[-1] if history else now
        history.append(now)
        return plan.from_stale(before, self.blocks, self.drift)

    monkeypatch.setattr(plan.LanePlanner, "inv_scales", stale)
    idx = torch.randint(0, 50, (2, 16))
    import warnings
    for jump, warned in ((0.01, False), (0.69, drift < 0.69)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m(idx, idx)[1].backward()                  # planned from the betas before
            with torch.no_grad():
                m.blocks[3].qkv.beta.sub_(jump)         # 0.707 -> 0.697, then -> 0.007: far beyond BETA_DRIFT
            m(idx, idx)[1].backward()                  # planned from stale betas: unsafe after the big jump...
            m(idx, idx)[1].backward()                  # ...which the next forward finds out
        assert any(f"moved by more than the planner's beta_drift={drift:g}" in str(w.message) for w in caught) == warned
        assert rc.planner.last_plan is not None
    eps, betas = m.cfg.beta_eps, torch.tensor([[0.5, 0.25]], dtype=torch.float64)  # the margin, by hand
    margin, exact = plan.from_stale(betas, m.blocks)
    assert exact == [[1 / (0.5 + eps), 1 / (0.25 + eps)]]
    assert margin == [[1 / (0.5 - plan.BETA_DRIFT + eps), 1 / (0.25 - plan.BETA_DRIFT + eps)]]
    assert plan.from_stale(betas, m.blocks, 0.3)[0] == [[1 / (0.5 - 0.3 + eps), 1 / eps]]  # |beta| <= drift: eps alone


def test_a_compiled_model_deep_copies_with_its_own_weights():
    import copy
    import parallel
    ref, rc = twins("none", n_layer=2)
    recompute.apply(rc, "crnet", 2, compile=True)
    parallel.compile_regions(rc)
    idx = torch.randint(0, 50, (2, 16))
    rc(idx, idx)[1].backward()
    twin = copy.deepcopy(rc)
    with torch.no_grad():
        twin.wte.weight.zero_()
        twin.lm_head.weight.zero_()
    assert twin(idx, idx)[1].item() == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=1e-5)  # uniform
    assert rc(idx, idx)[1].item() == pytest.approx(ref(idx, idx)[1].item(), rel=1e-5)  # the original untouched


def test_a_deep_copy_recomputes_its_own_blocks():
    import copy
    ref, rc = twins("crnet", n_layer=4, recompute_every=2)
    twin = copy.deepcopy(rc)
    idx = torch.randint(0, 50, (2, 16))
    l_ref, g_ref = loss_and_grads(ref, idx)
    l_twin, g_twin = loss_and_grads(twin, idx)
    assert torch.equal(l_ref, l_twin) and all(p.grad is None for p in rc.parameters())  # the original untouched
    assert_grads_close(g_ref, g_twin)
