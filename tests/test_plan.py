"""plan.py against what we can count: activation bytes of a real forward, closed-form parameter counts."""
import math

import pytest
import torch

import configurator
import plan
import recompute
from model import ModelConfig, Transformer
from plan import held_activation_bytes
from conftest import ROOT, TINY
from test_model import closed_form
from test_reversible import run_worker, worker_done

CASES = [(arch, param, mode) for arch in ("llama", "gpt2") for param in ("full", "crnet", "lowrank", "cola")
         for mode in ("none", "block", "crnet") if mode != "crnet" or param == "crnet"]
ABLATIONS = {"lowrank-first": dict(first_layer="lowrank"), "fixed-beta": dict(beta_learnable=False)}
CASES += [("llama", f"crnet:{a}", mode) for a in ABLATIONS for mode in ("none", "block", "crnet")]
CASES += [(arch, param, f"reversible:{keep_z}") for arch in ("llama", "gpt2") for param in ("crnet", "crnet:lowrank-first")
          for keep_z in (True, False)]
# grouped-query attention with a head_dim of its own (q 96, k and v 24 wide: packed lanes), and Qwen-3's QK-norm
ARCHS = {"llama-gqa": dict(arch="llama", n_kv_head=1, head_dim=24), "qwen3": dict(arch="qwen3", n_kv_head=1, head_dim=24),
         "qwen3_moe": dict(arch="qwen3_moe", n_kv_head=1, head_dim=24, n_expert=4, expert_top_k=2)}
CASES += [(arch, param, mode) for arch in ARCHS for param, mode in (("full", "none"), ("full", "block"), ("crnet", "none"),
                                                                   ("crnet", "crnet"), ("crnet", "reversible:False"))]
ABLATIONS["no-moe-lane"] = dict(moe_lane=False)
CASES += [("qwen3_moe", "crnet:no-moe-lane", mode) for mode in ("none", "block")]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("arch,param,mode", CASES)
def test_activation_figures_match_counted_bytes(arch, param, mode, dtype):
    """The planner's activations (plus, under autocast, the bf16 weight copies it books under params) against
    the bytes still alive after a real training forward, counted tensor by tensor. Measured: within 1%; the
    test holds it to 2%. (Ranks vary per layer to catch a formula that assumes one rank.)"""
    param, _, ablation = param.partition(":")
    mode, _, keep_z = mode.partition(":")
    keep_z = keep_z != "False"
    cfg = ModelConfig(**ARCHS.get(arch, dict(arch=arch)), n_layer=5, n_head=4, n_embd=64, intermediate_size=160, vocab_size=97, block_size=32,
                      param=param, rank=[16, 12, 16, 8, 16], **ABLATIONS.get(ablation, {}))
    torch.manual_seed(0)
    m = recompute.apply(Transformer(cfg), mode, 2, keep_z)
    idx = torch.randint(0, 97, (3, 32))
    held, _ = held_activation_bytes(m, idx, idx, whole=True, autocast=dtype)
    c = {**configurator.defaults("train.py"), **{k: getattr(cfg, k) for k in ModelConfig.field_names()}, "batch_size": 3,
         "block_size": 32, "dtype": "bfloat16" if dtype else "float32", "recompute_every": 2, "keep_z": keep_z}
    r, P = plan.plan(c, "ddp", mode, 1)
    predicted = r["activations"] + (r["params"] - 4 * P)
    assert predicted == pytest.approx(held, rel=0.02), (predicted, held)


@pytest.mark.parametrize("mode,beta_init", [("reversible", 0.5 ** 0.5), ("crnet", 0.5)])
def test_activation_figures_count_what_the_guard_stores_at_the_initial_betas(mode, beta_init):
    """8 layers, every 8: at the initial betas the round-off guard stores more than the checkpoint set (reversible:
    a block input inside the segment; crnet at beta 0.5: lanes). The plan counts them: 4-5% of the activations
    here, which a plan of the checkpoint set alone left out."""
    cfg = ModelConfig(n_layer=8, n_head=4, n_embd=64, intermediate_size=160, vocab_size=97, block_size=32, rank=16,
                      beta_init=beta_init)
    m = recompute.apply(Transformer(cfg), mode, 8)
    store = plan.stored_lanes(m.blocks, 8, torch.float32, mode == "reversible")
    assert store > {(7, g) for g in range(4 + (mode == "reversible"))}
    idx = torch.randint(0, 97, (3, 32))
    held, _ = held_activation_bytes(m, idx, idx, whole=True)
    c = {**configurator.defaults("train.py"), **{k: getattr(cfg, k) for k in ModelConfig.field_names()}, "batch_size": 3,
         "block_size": 32, "dtype": "float32", "recompute_every": 8}
    r, P = plan.plan(c, "ddp", mode, 1)
    assert r["activations"] == pytest.approx(held, rel=0.005), (r["activations"], held)


def test_paper_table_matches_closed_form_counts(capsys):
    rows = plan.paper_table({**configurator.defaults("train.py"), **configurator.defaults("plan.py")})
    text = capsys.readouterr().out
    assert len(rows) == 10 and text.count("\n| ") == 11  # header + 10 configs
    for path, P, ddp, fsdp in rows:
        c = configurator.load([path], "train.py")[0]
        assert P == closed_form("llama", c["param"], c["n_embd"], c["intermediate_size"], c["n_head"], c["n_layer"],
                                50257, c["rank"])
        assert f"| {P / 1e6:.1f}M |" in text
        # independent arithmetic: AdamW is 8 bytes per parameter, sharded 8 ways; fp32 gradients 4
        assert ddp["optimizer"] == 8 * P and fsdp["optimizer"] == pytest.approx(P)
        assert ddp["grads"] == 4 * P and fsdp["total"] < ddp["total"]
    seven = {p.split("/")[-1]: (d, f) for p, _, d, f in rows}
    assert seven["full_llama_7b.py"][0]["total"] > 80 * plan.GiB  # full 7B needs FSDP on 80 GiB GPUs...
    assert seven["crnet_llama_7b.py"][0]["total"] < 0.9 * 80 * plan.GiB  # ...CR-Net 7B with crnet recompute does not


@pytest.mark.parametrize("mode", ["none", "crnet"])
def test_fsdp_params_grads_and_backward_by_hand(mode):
    """The module docstring's FSDP arithmetic on counted tensors: each GPU holds 4P/N of the float32 parameters and
    gradients; gathered bf16 copies of the root (embeddings, head, final norm) and two blocks (the current one and
    the prefetched one); unsharded gradients of the root and one block. Backward: the float32 logits' gradient and
    its bf16 copy (4 + 2 bytes per logit), plus one layer replayed under recompute."""
    c = {**configurator.defaults("train.py"), "n_layer": 4, "n_head": 4, "n_embd": 64, "intermediate_size": 160,
         "vocab_size": 97, "block_size": 32, "rank": 16, "batch_size": 3, "dtype": "bfloat16"}
    m = Transformer(plan.model_config(c))
    P = sum(p.numel() for p in m.parameters())
    block = sum(p.numel() for p in m.blocks[1].parameters())  # layers 2..L: CR-Net's; layer 1 (full rank) is larger
    block = max(block, sum(p.numel() for p in m.blocks[0].parameters()))
    root = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("blocks."))
    r, _ = plan.plan(c, "fsdp", mode, 4)
    assert r["params"] == pytest.approx(4 * P / 4 + 2 * (root + 2 * block))
    assert r["grads"] == pytest.approx(4 * P / 4 + 2 * (root + block))
    tokens, replayed = 3 * 32, 0
    if mode != "none":
        f, a = plan.layer_numbers(m.cfg, 2, True, True)
        replayed = tokens * (4 * f + 2 * a)
    assert r["backward"] == tokens * 97 * (4 + 2) + replayed


def fsdp_activations_worker():
    """One process under torch.distributed.run: FSDP2 with bf16 parameters and bf16 autocast, as train.py runs
    dtype=bfloat16 with data_parallel="fsdp". The plan's activations, plus the root's gathered bf16 parameters
    (which FSDP2 keeps for the backward and the plan books under params), against the bytes counted after a real
    forward. The residual stream is float32 here as under DDP (Transformer.embed): with bf16 weights it had been
    bf16, and the plan 33% above the bytes of a full-rank model under block recompute."""
    import torch.distributed as dist

    import parallel as par
    dist.init_process_group("gloo")
    for arch in ("llama", "gpt2", "qwen3_moe"):
        for param, mode in (("full", "none"), ("full", "block"), ("crnet", "none"), ("crnet", "crnet"), ("crnet", "reversible")):
            cfg = ModelConfig(**ARCHS.get(arch, dict(arch=arch)), n_layer=5, n_head=4, n_embd=64, intermediate_size=160,
                              vocab_size=97, block_size=32, param=param, rank=[16, 12, 16, 8, 16])
            model, raw = par.build_model(cfg, "fsdp", torch.device("cpu"), 0, True, recompute=(mode, 2, True))
            seen = []
            raw.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
            held, _ = held_activation_bytes(model, torch.randint(0, 97, (3, 32)), torch.randint(0, 97, (3, 32)),
                                            whole=True, autocast=torch.bfloat16)
            c = {**configurator.defaults("train.py"), **{k: getattr(cfg, k) for k in ModelConfig.field_names()},
                 "batch_size": 3, "block_size": 32, "dtype": "bfloat16", "recompute_every": 2}
            root = sum(p.numel() for n, p in raw.named_parameters() if not n.startswith("blocks."))
            predicted = plan.plan(c, "fsdp", mode, 1)[0]["activations"] + 2 * root
            assert seen == [torch.float32], (arch, param, mode, seen)
            assert predicted == pytest.approx(held, rel=0.02), (arch, param, mode, predicted, held)
    worker_done()


def test_fsdp_bf16_activation_figures_match_counted_bytes():
    run_worker("fsdp_activations_worker", 1, "test_plan")


def test_report_and_errors(capsys):
    plan.main(["configs/crnet_llama_7b.py", "--gpus=4", "--gpu_gib=40"])
    out = capsys.readouterr().out
    assert "| FSDP x4 | crnet |" in out and "| FSDP x4 | reversible, keep_z=False |" in out and "3092.9M parameters" in out
    with pytest.raises(ValueError, match="unknown config key 'gpu'"):
        plan.main(["--gpu=4"])


def test_auto_recompute_picks_the_fastest_mode_that_fits():
    """recompute='auto' against the plan itself: none where it fits, else crnet, else reversible (block for
    models without lanes); below every mode's need, an error naming each."""
    c = configurator.load(["configs/crnet_llama_1b.py", "--vocab_size=32000"], "train.py")[0]
    need = {m: plan.plan({**c, "recompute": m}, "ddp", m, 1)[0]["total"] for m in ("none", "crnet", "reversible")}
    assert need["none"] > need["crnet"] > need["reversible"]
    for mode, room in (("none", need["none"]), ("crnet", need["crnet"]), ("reversible", need["reversible"])):
        assert plan.auto_recompute(c, 1, room / 0.9)[0] == mode
        assert plan.auto_recompute(c, 1, room / 0.9 * 1.001)[0] == mode
    assert plan.auto_recompute(c, 1, need["none"] / 0.9 * 0.999)[0] == "crnet"
    full = configurator.load(["configs/full_llama_1b.py", "--vocab_size=32000"], "train.py")[0]
    block = plan.plan({**full, "recompute": "block"}, "ddp", "block", 1)[0]["total"]
    assert plan.auto_recompute(full, 1, block / 0.9)[0] == "block"
    with pytest.raises(ValueError, match=r"no mode fits 90% of 1.0 GiB per GPU \(GiB needed: none .*, crnet .*, reversible"):
        plan.auto_recompute(c, 1, plan.GiB)
    assert "recompute auto -> crnet" in plan.auto_recompute(c, 1, need["crnet"] / 0.9)[1]
    moe = {**configurator.load(["configs/crnet_qwen3_moe_60m.py", "--vocab_size=32000"], "train.py")[0],
           "moe_lane": False}  # CR-Net without the MoE's lane: nothing to invert there, so block, as full rank
    block = plan.plan({**moe, "recompute": "block"}, "ddp", "block", 1)[0]["total"]
    assert plan.auto_recompute(moe, 1, block / 0.899)[0] == "block"
    with pytest.raises(ValueError, match=r"\(GiB needed: none [0-9.]+, block [0-9.]+\)"):
        plan.auto_recompute(moe, 1, plan.GiB / 100)


def test_preflight_and_train_report_what_auto_chose(tiny_data, tmp_path, capsys):
    import train
    from conftest import TINY
    train.main(["configs/crnet_llama_1b.py", "--recompute=auto", "--device_gib=24", "--preflight", "--world_size=1",
                f"--out_dir={tmp_path / 'p'}", "--vocab_size=32000"])
    out = capsys.readouterr().out
    assert "recompute auto -> crnet" in out and "recompute=crnet" in out  # 1B at 32 x 256: none needs 34.8 GiB
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'r'}", "--recompute=auto", "--max_iters=2"])
    assert "recompute auto -> none" in capsys.readouterr().out  # a tiny model fits anywhere


def test_preflight_for_a_cpu_run_ignores_the_gpu_beside_it(monkeypatch, capsys):
    """--device=cpu on a machine with a (here: 1 GiB) GPU: the run will not use it, so its memory is no limit."""
    import train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(plan, "device_memory", lambda d, available=False: plan.GiB if d.type == "cuda" else 64 * plan.GiB)
    base = ["configs/laptop_60m.py", "--preflight", "--vocab_size=50257"]
    with pytest.raises(ValueError, match="over 90% of this GPU's 1.0 GiB"):
        train.main(base)
    train.main(base + ["--device=cpu", "--recompute=auto"])
    out = capsys.readouterr().out
    assert "recompute auto -> none" in out and "fits 90% of 64.0 GiB" in out and "GPU" not in out.split("preflight ok")[1]


def test_preflight_refuses_a_plan_over_90_percent_of_the_gpu(monkeypatch, capsys):
    """The 10% headroom the planner keeps (allocator fragmentation, CUDA context): a plan at 95% of the GPU is
    refused, one at 85% passes."""
    import train
    base = ["configs/laptop_60m.py", "--preflight", "--vocab_size=50257"]
    c = configurator.load(base[:1] + base[2:], "train.py")[0]
    total = plan.plan(c, "ddp", c["recompute"], 1)[0]["total"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(plan, "device_memory", lambda d, available=False: total / 0.95)
    with pytest.raises(ValueError, match=f"needs {total / plan.GiB:.1f} GiB per GPU .* over 90% of this GPU's"):
        train.main(base)
    monkeypatch.setattr(plan, "device_memory", lambda d, available=False: total / 0.85)
    train.main(base)
    assert "preflight ok" in capsys.readouterr().out


def test_preflight_plans_the_dtype_the_run_will_have(capsys):
    """dtype='auto' is bf16 autocast on CUDA and float32 elsewhere (parallel.setup): --device=cpu plans float32;
    device auto on a machine without CUDA plans CUDA's bf16 and names what a run here (float32) would need."""
    import train
    base = ["configs/laptop_60m.py", "--preflight", "--vocab_size=50257"]
    c = configurator.load(base[:1] + base[2:], "train.py")[0]
    f32, bf16 = (plan.plan({**c, "dtype": d}, "ddp", "none", 1)[0]["total"] / plan.GiB for d in ("float32", "auto"))
    assert f32 > bf16 * 1.1
    train.main(base + ["--device=cpu"])
    assert f"planned {f32:.1f} GiB per process (ddp, recompute=none, float32); data" in capsys.readouterr().out
    if not torch.cuda.is_available():
        train.main(base)
        assert (f"planned {bf16:.1f} GiB per GPU (ddp, recompute=none, bf16); {f32:.1f} GiB in float32 (a run here, "
                f"without CUDA); data") in capsys.readouterr().out


def adamw_step_bound(beta1, beta2, steps):
    """The largest |m_hat| / sqrt(v_hat) Adam can reach at each step t: Cauchy-Schwarz on m = (1 - b1) sum b1^k g and
    v = (1 - b2) sum b2^k g^2, with both bias corrections; equality where g_{t-k} is proportional to (b1/b2)^k."""
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    sums = torch.cumsum((beta1 ** 2 / beta2) ** (t - 1), 0)
    return (1 - beta1) / (1 - beta1 ** t) * ((1 - beta2 ** t) / (1 - beta2)).sqrt() * sums.sqrt()


def adamw_limit(beta1, beta2):
    """adamw_step_bound as t grows (the sum of q^k, q = beta1^2 / beta2, tends to 1 / (1 - q))."""
    return (1 - beta1) / ((1 - beta2) * (1 - beta1 ** 2 / beta2)) ** 0.5


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999), (0.0, 0.99), (0.8, 0.7), (0.9, 1 - 1e-6)])
def test_adamw_drift_is_the_furthest_one_adamw_step_moves_a_parameter(betas):
    """plan.adamw_drift is the margin the CUDA lane planner keeps for a beta moving in one optimizer step (train.py
    passes it). Checked against the Cauchy-Schwarz bound summed by hand step by step (its limit bounds every step),
    against torch's AdamW reaching that bound on the gradient sequence that makes it tight, and against random
    sequences never moving a parameter further."""
    (b1, b2), lr, T = betas, 1e-3, 400
    bound = adamw_step_bound(b1, b2, 200_000)
    limit = adamw_limit(b1, b2)
    assert bound[0].item() == pytest.approx(1.0) and bound.max().item() <= limit * (1 + 1e-12)
    if b2 < 0.9999:  # reached within the steps summed (beta2 = 1 - 1e-6 needs ~1e7: the limit alone bounds it)
        assert bound[-1].item() == pytest.approx(limit, rel=1e-6)
    drift = plan.adamw_drift(lr, betas)
    assert lr * limit <= drift == pytest.approx(lr * limit, rel=1e-4)
    if betas == (0.9, 0.95):  # train.py's default betas: the bound rises from 1 towards 1.165
        assert bool((bound[1:T] > bound[:T - 1]).all()) and drift == pytest.approx(1.165e-3, abs=1e-6)
    for t in (1, 5, 60, T):  # the tight sequence for step t: one parameter, no weight decay (betas have none)
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), weight_decay=0.0)
        for i in range(t):
            before = p.detach().clone()
            p.grad = torch.full_like(p, (b1 / b2) ** (t - 1 - i))
            opt.step()
        assert (p.detach() - before).abs().item() == pytest.approx(lr * bound[t - 1].item(), rel=1e-6)
    g = torch.Generator().manual_seed(0)  # and no sequence of ours moves it further
    p = torch.zeros(256, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), weight_decay=0.0)
    for i in range(T):
        before = p.detach().clone()
        p.grad = torch.randn(256, generator=g, dtype=torch.float64) * torch.rand(256, generator=g, dtype=torch.float64) ** 8
        opt.step()
        assert (p.detach() - before).abs().max().item() <= lr * bound[i].item() * (1 + 1e-9) <= drift


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_adamw_drift_covers_float32_betas(impl):
    """Betas are float32 parameters: torch's AdamW forms the update in float32 and rounds beta - update, so a tight
    step can move a beta past lr times its bound, by up to half an ulp of the beta (2.6e-4 of a step of lr 1e-4 at
    0.7, 2.6% at lr 1e-6); and with q = b1^2 / b2 near 1, float32's betas give a slightly other q, so a larger limit.
    adamw_drift's padding covers both, for betas from 0.2 to 2 and each AdamW implementation."""
    over = []
    for (b1, b2), t, lr in (((0.9, 0.95), 60, 1e-4), ((0.9, 0.999), 300, 1e-4), ((0.9, 0.95), 60, 1e-6)):
        p = torch.linspace(0.2, 1.2, 256).requires_grad_()
        opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), weight_decay=0.0, **impl)
        for i in range(t):
            before = p.detach().clone()
            p.grad = torch.linspace(0.5, 2, 256) * (b1 / b2) ** (t - 1 - i)
            opt.step()
        move = (p.detach() - before).abs().max().item()
        assert move <= plan.adamw_drift(lr, (b1, b2))
        over.append(move > lr * adamw_step_bound(b1, b2, t)[-1].item() * (1 + 1e-6))
    (b1, b2), lr, K = (0.9995, 0.9999), 1e-2, 20_000  # 1 - q = 9e-4: the tight sequence needs ~20,000 steps
    p0 = torch.linspace(0.3, 1.99, 64)
    p = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), weight_decay=0.0, **impl)
    p.grad = torch.zeros_like(p)
    opt.step()  # moments still 0; the step count set far on, where both bias corrections are 1: the limit's regime
    opt.state[p]["step"].fill_(10 ** 6)
    for i in range(K):
        if i == K - 1:
            with torch.no_grad():
                p.copy_(p0)  # the last step from betas below 2
        before = p.detach().clone()
        p.grad = torch.linspace(0.5, 2, 64) * (b1 / b2) ** (K - 1 - i)
        opt.step()
    move = (p.detach() - before).abs().max().item()
    assert move <= plan.adamw_drift(lr, (b1, b2))
    over.append(move > lr * adamw_limit(b1, b2) * (1 + 2 ** -18))
    assert all(over)  # what the padding is for: rounding took a step past its exact bound


def test_adamw_drift_without_a_bound_and_without_steps():
    """beta1^2 >= beta2: the tight sequence grows without bound, so no margin holds (inf: the planner then reads the
    betas every step); lr = 0 moves nothing; betas AdamW refuses are refused."""
    assert plan.adamw_drift(1e-3, (0.9, 0.8)) == plan.adamw_drift(1e-3, (0.5, 0.0)) == math.inf
    assert plan.adamw_drift(1e-3, (0.5, 0.25)) == plan.adamw_drift(1e-3, (0.3 ** 0.5, 0.3)) == math.inf  # q = 1
    assert plan.adamw_drift(0.0, (0.9, 0.95)) == plan.adamw_drift(0.0, (0.9, 0.8)) == 0.0
    assert plan.adamw_drift(1e-3, (0.0, 0.0)) == pytest.approx(1e-3, rel=1e-4)  # sign(g): one lr
    for bad in ((0.9, 1.0), (1.0, 0.95), (-0.1, 0.95)):
        with pytest.raises(ValueError, match=r"AdamW's betas must be in \[0, 1\)"):
            plan.adamw_drift(1e-3, bad)
    moves = []
    for t in (10, 100, 400):  # the sequence that is tight at step t, as in the test above
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=1.0, betas=(0.9, 0.8), weight_decay=0.0)
        for i in range(t):
            before = p.detach().clone()
            p.grad = torch.full_like(p, (0.9 / 0.8) ** (t - 1 - i))
            opt.step()
        moves.append((p.detach() - before).abs().item())
    assert moves == pytest.approx(adamw_step_bound(0.9, 0.8, 400)[[9, 99, 399]].tolist(), rel=1e-6)
    assert moves[2] > 20 > moves[1] > moves[0]  # and it keeps rising with t


@pytest.mark.parametrize("lr, betas, learnable", [(3e-3, (0.9, 0.95), True), (1e-2, (0.9, 0.999), True),
                                                  (3e-3, (0.9, 0.95), False)])
def test_train_gives_the_lane_planner_adamws_drift(tmp_path, tiny_data, monkeypatch, lr, betas, learnable):
    """train.py's crnet recompute plans with the margin of its own optimizer: adamw_drift at the config's peak learning
    rate and betas (0.0727 at lr 1e-2 and beta2 0.999, beyond the default BETA_DRIFT); 0 where the betas are fixed."""
    import train
    made = []
    init = plan.LanePlanner.__init__
    monkeypatch.setattr(plan.LanePlanner, "__init__", lambda self, *a, **k: made.append(a) or init(self, *a, **k))
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--max_iters=1", "--recompute=crnet",
                       f"--learning_rate={lr}", f"--beta1={betas[0]}", f"--beta2={betas[1]}",
                       f"--beta_learnable={learnable}"])
    assert [a[-1] for a in made] == [plan.adamw_drift(lr, betas) if learnable else 0.0]
    if learnable:
        assert made[0][-1] > 1.1 * lr
