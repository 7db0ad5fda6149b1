"""Qwen-3-MoE (arch="qwen3_moe") against its oracles: transformers' Qwen3MoeForCausalLM (logits, and the training
loss with its load-balancing term), the mixture computed by hand token by token, Eq. 6 on the MoE output by hand,
plain autograd for crnet / reversible / block recomputation, closed-form parameter counts, one process vs two."""
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import configurator
import moe
import recompute
from conftest import TINY, train_losses
from model import ModelConfig, Transformer
from test_hf import assert_same_logits, randomize
from test_recompute import assert_grads_close, loss_and_grads, make, twins

MOE = dict(arch="qwen3_moe", n_expert=4, expert_top_k=2, n_kv_head=1, head_dim=12, intermediate_size=24)


def hf_moe(norm_topk, **kw):
    c = transformers.Qwen3MoeConfig(**{**dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=norm_topk, router_aux_loss_coef=0.05, bos_token_id=0, eos_token_id=0), **kw})
    return randomize(transformers.Qwen3MoeForCausalLM(c), 7)


@pytest.fixture(scope="module", params=[True, False], ids=["norm-topk-gqa-untied", "raw-topk-mha-tied"])
def saved_moe(request, tmp_path_factory):
    kw = {} if request.param else dict(num_key_value_heads=4, head_dim=8, tie_word_embeddings=True, num_experts=5,
                                       num_experts_per_tok=3)
    theirs = hf_moe(request.param, **kw)
    d = tmp_path_factory.mktemp("qwen3_moe")
    theirs.save_pretrained(d)
    return theirs, d


def test_logits_and_training_loss_match_transformers(saved_moe):
    """Logits, and in training mode the loss with router_aux_coef times the load-balancing loss: HF's loss with
    output_router_logits (its load_balancing_loss_func is the oracle for moe.load_balance)."""
    from tools import hf
    theirs, d = saved_moe
    ours = hf.load_pretrained(d)
    c = theirs.config
    assert (ours.cfg.arch, ours.cfg.n_expert, ours.cfg.expert_top_k, ours.cfg.norm_topk, ours.cfg.ff_dim) == \
        ("qwen3_moe", c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, c.moe_intermediate_size)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert_same_logits(theirs, ours, c.vocab_size, 24)
    idx = torch.randint(0, c.vocab_size, (3, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = theirs(idx, labels=idx, output_router_logits=True)
        ours.train()
        _, loss = ours(idx, torch.cat([idx[:, 1:], torch.full((3, 1), -1)], 1))  # HF shifts the labels itself
        ours.eval()
        _, ce = ours(idx, torch.cat([idx[:, 1:], torch.full((3, 1), -1)], 1))
    assert out.aux_loss > 1.0 and loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert (loss - ce).item() == pytest.approx(c.router_aux_loss_coef * out.aux_loss.item(), rel=1e-4)  # eval: CE alone


def test_fused_expert_tensors_load_too(saved_moe, tmp_path):
    """transformers >= 5 keeps a layer's experts as fused gate_up_proj (E, 2 ff, h) and down_proj (E, h, ff)."""
    from tools import hf
    theirs, d = saved_moe
    tensors, E = load_file(d / "model.safetensors"), theirs.config.num_experts
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for l in range(theirs.config.num_hidden_layers):
        e = lambda i, n: tensors[f"model.layers.{l}.mlp.experts.{i}.{n}.weight"]
        fused[f"model.layers.{l}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e(i, "gate_proj"), e(i, "up_proj")])
                                                                           for i in range(E)])
        fused[f"model.layers.{l}.mlp.experts.down_proj"] = torch.stack([e(i, "down_proj") for i in range(E)])
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file(fused, tmp_path / "model.safetensors")
    assert_same_logits(theirs, hf.load_pretrained(tmp_path), theirs.config.vocab_size, 16)


def test_unsupported_moe_layouts_are_named(saved_moe, tmp_path):
    from tools import hf
    from test_hf import copy_model
    with pytest.raises(ValueError, match=r"/config.json: mlp_only_layers=\[0\] is not supported: .* experts in every layer"):
        hf.load_pretrained(copy_model(saved_moe[1], tmp_path / "a", {"mlp_only_layers": [0]}))
    with pytest.raises(ValueError, match=r"/config.json: decoder_sparse_step=2 is not supported"):
        hf.load_pretrained(copy_model(saved_moe[1], tmp_path / "b", {"decoder_sparse_step": 2}))
    with pytest.raises(ValueError, match=r"/config.json: num_experts=0 is not supported"):  # transformers: dense MLPs
        hf.load_pretrained(copy_model(saved_moe[1], tmp_path / "c", {"num_experts": 0}))


def test_the_mixture_and_its_lane_by_hand():
    """D token by token from the weights (softmax, top k, renormalised, each chosen expert's SwiGLU), then
    Y^moe_l = s * Y^moe_{l-1} + D_l (Eq. 6) for a CR-Net layer."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**MOE, n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=16, rank=6))
    layer = m.blocks[1].moe
    with torch.no_grad():
        layer.beta.fill_(-0.6)
    x, lane = torch.randn(2, 5, 32), torch.randn(2, 5, 1, 32)
    y, stats = layer(x, lane)
    want = torch.empty(2, 5, 32)
    counts = torch.zeros(4)
    for b in range(2):
        for t in range(5):
            p = torch.softmax(x[b, t] @ layer.weight, -1)
            top = p.topk(2).indices
            counts[top] += 1
            want[b, t] = 0
            for e in top:
                ex = layer.experts[e]
                gate_up = torch.cat([x[b, t] @ ex["up"].A[:, :6] @ ex["up"].B[0], x[b, t] @ ex["up"].A[:, 6:] @ ex["up"].B[1]])
                h = F.silu(gate_up[:24]) * gate_up[24:]
                want[b, t] += p[e] / p[top].sum() * (h @ ex["down"].A @ ex["down"].B[0])
    s = -(0.6 + m.cfg.beta_eps)
    torch.testing.assert_close(y[:, :, 0], s * lane[:, :, 0] + want, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats[0], counts) and stats[1].sum().item() == pytest.approx(10.0)


CASES = {"crnet": ("crnet", {}), "crnet-every-2": ("crnet", dict(n_layer=5, recompute_every=2, rank=[5, 4, 6, 5, 7])),
         "crnet-lowrank-first": ("crnet", dict(first_layer="lowrank")), "reversible": ("reversible", {}),
         "reversible-no-z": ("reversible", dict(keep_z=False)), "reversible-dropout": ("reversible", dict(dropout=0.1)),
         "block": ("block", {}), "block-no-lane": ("block", dict(moe_lane=False))}


@pytest.mark.parametrize("case", list(CASES))
def test_recompute_matches_plain_autograd_through_the_routing(case):
    """Gradients of every parameter (router and experts included, with a load-balancing term that flows back
    through each block's router statistics) equal plain autograd's, float32, 1e-5."""
    mode, kw = CASES[case]
    keep_z = kw.pop("keep_z", True)
    ref, rc = twins(mode, **MOE, router_aux_coef=0.1, **kw)
    recompute.apply(rc, mode, kw.get("recompute_every", 8), keep_z)
    idx = torch.randint(0, 50, (3, 16))
    l_ref, g_ref = loss_and_grads(ref, idx)
    l_rc, g_rc = loss_and_grads(rc, idx)
    assert torch.equal(l_ref, l_rc) and g_ref.keys() == g_rc.keys()
    assert_grads_close(g_ref, g_rc)
    assert any(".moe.weight" in n for n in g_ref) and hasattr(rc.blocks[1].moe, "beta") == kw.get("moe_lane", True)


def test_the_replay_routes_as_the_forward_did(monkeypatch):
    """Under crnet recompute the backward's replay is given the forward's experts: a rebuilt input never re-runs the
    top-k."""
    m = make("crnet", **MOE)
    given = []
    mix = moe.mix
    monkeypatch.setattr(moe, "mix", lambda *a, **k: given.append(a[-1] is not None) or mix(*a, **k))
    _, loss = m(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))
    assert given == [False] * 4
    loss.backward()
    assert given == [False] * 4 + [True] * 4


def test_every_expert_gets_a_gradient_even_with_no_tokens(monkeypatch):
    """DDP expects a gradient for every parameter each step: an expert no token chose gets zeros."""
    m = make("none", **MOE)
    route = moe.route  # every token's top 2 among experts 0..2 only
    monkeypatch.setattr(moe, "route", lambda x, w, k, norm, idx=None: route(x, w, k, norm, route(x, w[:, :3], k, norm)[1]))
    idx = torch.randint(0, 50, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    unused = [p.grad for n, p in m.named_parameters() if ".experts.3." in n]
    assert unused and all(g is not None and not g.any() for g in unused)


GROUPED_CASES = [("full", "none"), ("lowrank", "none"), ("crnet", "none"), ("crnet", "crnet"), ("crnet", "reversible")]


def counting_grouped(monkeypatch, table={"cpu": (torch.float32, torch.bfloat16)}):
    """Sets moe.GROUPED (by default: the CPU runs the experts as grouped GEMMs too); returns the list each grouped
    GEMM call appends to."""
    calls, grouped = [], moe.grouped
    monkeypatch.setattr(moe, "GROUPED", table)
    monkeypatch.setattr(moe, "grouped", lambda *a: calls.append(1) or grouped(*a))
    return calls


def test_the_private_grouped_mm_is_the_public_one(monkeypatch):
    """moe.grouped_mm falls back to torch._grouped_mm where F.grouped_mm is missing (older torch): same results;
    where torch has neither, the experts run in the loop."""
    x, w = torch.randn(10, 16), torch.randn(3, 16, 8)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # expert 1 gets no row
    got = torch._grouped_mm(x, w, offs=offs)
    torch.testing.assert_close(got, torch.cat([x[:4] @ w[0], x[4:] @ w[2]]))
    torch.testing.assert_close(got, moe.grouped_mm(x, w, offs=offs), rtol=0, atol=0)
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    assert moe.find_grouped_mm() is torch._grouped_mm
    monkeypatch.delattr(torch, "_grouped_mm")
    assert moe.find_grouped_mm() is None
    monkeypatch.setattr(moe, "grouped_mm", None)
    calls = counting_grouped(monkeypatch)  # the CPU would run grouped GEMMs, but there are none
    m, idx = make("none", **MOE), torch.randint(0, 50, (2, 16))
    m(idx, idx)[1].backward()
    assert not calls


def grad_errors(g, ref):
    """Each gradient's error against ref's, relative to its norm or to 1e-2 of the typical norm (tiny ones)."""
    typical = torch.stack([r.norm() for r in ref.values()]).median()
    return torch.stack([(g[n] - r).norm() / torch.maximum(r.norm(), 1e-2 * typical) for n, r in ref.items()])


@pytest.mark.parametrize("param,mode", GROUPED_CASES)
def test_grouped_gemms_equal_the_loop(param, mode, monkeypatch):
    """The experts as grouped GEMMs (a GPU's path: no host sync) against the loop under plain autograd: loss and
    every gradient, float32, 1e-5, through recomputation's replay too. Expert 1 gets no token: an empty piece
    between others, whose factors still get (zero) gradients."""
    ref, other = twins(mode, **{**MOE, "param": param}, router_aux_coef=0.1)
    keep, route = torch.tensor([0, 2, 3]), moe.route
    monkeypatch.setattr(moe, "route", lambda x, w, k, norm, idx=None: route(
        x, w, k, norm, keep[route(x, w[:, keep], k, norm)[1]] if idx is None else idx))
    idx = torch.randint(0, 50, (3, 16))
    l_ref, g_ref = loss_and_grads(ref, idx)
    calls = counting_grouped(monkeypatch)
    l_got, g_got = loss_and_grads(other, idx)
    assert len(calls) >= 2 * other.cfg.n_layer  # up and down per layer: the grouped path really ran
    torch.testing.assert_close(l_got, l_ref, rtol=1e-6, atol=0)
    assert_grads_close(g_ref, g_got)
    empty = [g for n, g in g_got.items() if ".experts.1." in n]
    assert empty and not any(g.any() for g in empty)


def test_grouped_gemms_in_bf16_err_as_the_loop_does(monkeypatch):
    """Under bf16 autocast each gradient's error against float32 (grad_errors) is within 1.5x + 1e-3 of the loop's:
    grouped GEMMs round as the loop's matmuls do. Widths whose rows grouped_mm cannot take (rank 6 x 2 bytes is not
    a multiple of 16) fall back to the loop."""
    torch.manual_seed(0)
    m, idx = make("none", **MOE, router_aux_coef=0.1), torch.randint(0, 50, (3, 16))
    g32 = loss_and_grads(m, idx)[1]

    def bf16_errors():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return grad_errors(loss_and_grads(m, idx)[1], g32)
    loop = bf16_errors()
    calls = counting_grouped(monkeypatch, {"cpu": (torch.bfloat16,)})
    got = bf16_errors()
    assert calls and loop.max() > 1e-3  # both ran, and in bf16
    assert (got <= 1.5 * loop + 1e-3).all(), (got, loop)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        make("none", **{**MOE, "rank": 6, "param": "lowrank"})(idx, idx)
    assert not calls


def test_grouped_path_reads_nothing_on_the_host(monkeypatch):
    """The CPU stand-in for tests/test_cuda.py's sync check: with grouped GEMMs, mix (forward and crnet's replay)
    never calls .tolist() or .item(); the loop does (its piece sizes), which shows the check can fail."""
    m, idx, mix = make("crnet", **MOE), torch.randint(0, 50, (2, 16)), moe.mix

    def host_read(*_):
        raise AssertionError("host read")

    def guarded(*a, **k):
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "tolist", host_read)
            mp.setattr(torch.Tensor, "item", host_read)
            return mix(*a, **k)
    monkeypatch.setattr(moe, "mix", guarded)
    calls = counting_grouped(monkeypatch)
    m(idx, idx)[1].backward()
    assert len(calls) == 4 * m.cfg.n_layer  # forward and replay, up and down
    monkeypatch.setattr(moe, "GROUPED", {})
    with pytest.raises(AssertionError, match="host read"):
        m(idx, idx)


def test_moe_config_errors_name_the_key():
    base = dict(n_head=4, n_embd=32, rank=6, **{**MOE, "n_kv_head": 0, "head_dim": 0})
    for kw, match in ((dict(n_expert=0), "^n_expert=0: must be >= 1 for arch='qwen3_moe'"),
                      (dict(arch="llama"), "^n_expert=4: must be >= 1 for arch='qwen3_moe', else 0"),
                      (dict(expert_top_k=5), "^expert_top_k=5: must be <= n_expert=4"),
                      (dict(router_aux_coef=-1.0), "^router_aux_coef=-1.0: must be a number >= 0"),
                      (dict(param="cola"), "^param='cola': qwen3_moe's experts are full, crnet or lowrank"),
                      (dict(param="full", moe_lane=False), "^moe_lane=False: .* needs param='crnet'")):
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{**base, **kw})
    with pytest.raises(configurator.ConfigError, match="moe_lane=False leaves the MoE output without one"):
        make("crnet", **MOE, moe_lane=False)


@pytest.mark.parametrize("param", ["full", "crnet", "lowrank"])
def test_parameter_counts_match_closed_form(param):
    """Qwen3-30B-A3B's shape (h 2048, 32 heads of 128, 4 kv heads, 48 layers, 128 experts of 768, top 8, vocab
    151936, untied): full rank 30.53B parameters, 3.35B active per token. A low-rank expert: gate/up h x 2r, r x 2ff;
    down ff x r, r x h; the router h x E stays full-rank; a CR-Net layer adds 5 betas (q, k, v, o, moe)."""
    h, nh, hd, nkv, L, E, k, ff, V, r = 2048, 32, 128, 4, 48, 128, 8, 768, 151936, 256
    q, kv = nh * hd, nkv * hd
    attn_full, attn_lr = h * (q + 2 * kv) + q * h, r * (3 * h + q + 2 * kv) + r * (q + h)
    expert_full, expert_lr = 3 * h * ff, r * (2 * h + 2 * ff) + r * (ff + h)
    full_layer, lr_layer = attn_full + h * E + E * expert_full, attn_lr + h * E + E * expert_lr
    layers = {"full": L * full_layer, "lowrank": L * lr_layer, "crnet": full_layer + (L - 1) * (lr_layer + 5)}[param]
    fixed = 2 * V * h + 2 * h * L + h + 2 * hd * L  # embeddings, head, 2 norms per layer, final norm, QK-norms
    cfg = ModelConfig(arch="qwen3_moe", param=param, n_embd=h, n_head=nh, head_dim=hd, n_kv_head=nkv, n_layer=L,
                      n_expert=E, expert_top_k=k, intermediate_size=ff, vocab_size=V, rank=r, block_size=4096)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.num_params()["total"] == fixed + layers
    active = fixed - V * h + L * (attn_full + h * E + k * expert_full)  # matmul weights a token uses (not wte)
    if param == "full":
        assert round((fixed + layers) / 1e9, 2) == 30.53 and round((active + V * h) / 1e9, 2) == 3.35
        norms = 2 * h * L + h + 2 * hd * L
        assert m.flops_per_token() == 6 * (active - norms) + 12 * L * q * 4096


def test_train_py_runs_moe_crnet_with_recompute_and_resumes_exactly(tiny_data, tmp_path):
    """A tiny Qwen-3-MoE CR-Net run under crnet recompute, stopped and resumed: the losses of the run without
    recomputation, uninterrupted."""
    import train
    args = TINY + [f"--data_dir={tiny_data}", "--arch=qwen3_moe", "--n_expert=4", "--expert_top_k=2", "--n_kv_head=1",
                   "--max_iters=8", "--eval_interval=4", "--intermediate_size=24"]
    train.main(args + [f"--out_dir={tmp_path / 'a'}"])
    train.main(args + [f"--out_dir={tmp_path / 'b'}", "--recompute=crnet", "--recompute_every=2", "--stop_iter=4"])
    train.main(args + [f"--out_dir={tmp_path / 'b'}", "--recompute=reversible", "--init_from=resume"])
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert list(b) == list(range(1, 9)) and b[8] < b[1]
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=1e-5), (it, a[it], b[it])


def test_ddp_two_processes_match_one_with_experts(tiny_data, tmp_path):
    from test_train import ddp_matches_single_process
    ddp_matches_single_process(tiny_data, tmp_path, "--arch=qwen3_moe", "--n_expert=4", "--n_kv_head=1",
                               "--intermediate_size=24", "--recompute=crnet", "--recompute_every=2")


def test_analyze_measures_the_moe_output(tiny_data, tmp_path, capsys):
    """tools/analyze.py on a Qwen-3-MoE checkpoint: the combined MoE output is one position, measured at every
    layer like q, k, v and o; the hooks' figures equal the reference on collected outputs."""
    import numpy as np
    import train
    from tools import analyze
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--arch=qwen3_moe", "--n_expert=4",
                       "--param=full", "--max_iters=2", "--eval_interval=2", "--intermediate_size=24"])
    rows = analyze.main([f"--out_dir={tmp_path}", "--tokens=256", "--rank=4"])
    assert [p for l, p, _ in rows if l == 2] == ["q", "k", "v", "o", "moe"] and "| 3 | moe |" in capsys.readouterr().out
    model, _ = analyze.load_for_inference(tmp_path)
    idx = torch.from_numpy(np.memmap(tiny_data / "val.bin", dtype=np.uint16, mode="r")[:256].astype(np.int64)).view(8, 32)
    ys = analyze.collect_outputs(model, idx)
    ref = analyze.observation(ys[(1, "moe")], ys[(2, "moe")], 4)
    got = next(o for l, p, o in rows if (l, p) == (3, "moe"))
    assert got["best_ratio"] == pytest.approx(ref["best_ratio"], abs=1e-5)


def test_compiled_moe_trains_like_eager_without_recompiling(tiny_data, tmp_path, caplog):
    """torch.compile of a Qwen-3-MoE model: moe.mix stays eager (its shapes follow the routing), the rest compiles;
    the same losses as eager, and no recompile-limit fallback."""
    import train
    from test_train import assert_same_losses
    args = TINY + [f"--data_dir={tiny_data}", "--arch=qwen3_moe", "--n_expert=4", "--n_kv_head=1", "--max_iters=4",
                   "--eval_interval=4", "--intermediate_size=24"]
    train.main(args + [f"--out_dir={tmp_path / 'eager'}"])
    train.main(args + [f"--out_dir={tmp_path / 'compiled'}", "--torch_compile"])
    assert_same_losses(tmp_path / "eager", tmp_path / "compiled", rel=1e-4)
    assert "recompile_limit" not in caplog.text
