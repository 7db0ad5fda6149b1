"""The model against independent oracles: Eq. 6 by hand, closed-form counts, a hand-written reference forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Projection, Transformer
from parallel import estimate_mfu, peak_flops_for
from sample import generate

SIZES = {  # the LLaMA sizes arXiv 2509.18993 trains: (h, h_ff, heads, layers, full-rank params)
    "60M": (512, 1376, 8, 8, 58.1e6), "130M": (768, 2048, 12, 12, 134.1e6), "350M": (1024, 2736, 16, 24, 368.0e6),
    "1B": (2048, 5461, 32, 24, 1339.1e6), "7B": (4096, 11008, 32, 32, 6738.4e6),
}


def cfg(**kw):
    base = dict(n_layer=3, n_head=2, n_embd=32, intermediate_size=48, vocab_size=50, block_size=16, rank=8)
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------- the projection formulas, by hand
@pytest.mark.parametrize("widths", [(10, 10, 10), (10, 6, 6)])  # equal (B, T, n, w); q, k, v packed (B, T, 1, 22)
@pytest.mark.parametrize("kind", ["full", "lowrank", "cola", "crnet"])
def test_projection_matches_formula(kind, widths):
    torch.manual_seed(0)
    c = cfg()
    h_in, n, r = 12, 3, 4
    p = Projection(h_in, widths, "full" if kind == "full" else ("lowrank" if kind == "crnet" else kind), r,
                   bias=False, std=0.5, cfg=c, lane_in=kind == "crnet")
    x = torch.randn(2, 5, h_in)
    lanes = [torch.randn(2, 5, w) for w in widths]  # Y_{l-1} of each projection
    lane = torch.cat(lanes, -1)[:, :, None] if len(set(widths)) > 1 else torch.stack(lanes, 2)
    if kind == "crnet":
        with torch.no_grad():
            p.beta.copy_(torch.tensor([-0.7, 0.3, -2e-7]))  # negative, positive, tinier than eps
    y = p(x, lane if kind == "crnet" else None)
    assert y.shape == lane.shape
    got = y[:, :, 0].split(widths, -1) if len(set(widths)) > 1 else y.unbind(2)
    col = [sum(widths[:j]) for j in range(n + 1)]
    for j in range(n):  # each of the n projections on its own, with plain matmuls
        if kind == "full":
            want = x @ p.weight[:, col[j]:col[j + 1]]
        else:
            z = x @ p.A[:, j * r:(j + 1) * r]
            b = p.B[:, col[j]:col[j + 1]] if len(set(widths)) > 1 else p.B[j]
            want = (F.silu(z) if kind == "cola" else z) @ b
        if kind == "crnet":
            b = p.beta[j].item()
            want = math.copysign(abs(b) + 1e-6, b) * lanes[j] + want  # Eq. 6
        torch.testing.assert_close(got[j], want, rtol=1e-5, atol=1e-6)


def test_crnet_first_layer_is_full_rank_and_the_rest_low_rank():
    m = Transformer(cfg(param="crnet"))
    first, rest = m.blocks[0], m.blocks[1:]
    for proj in (first.qkv, first.o, first.up, first.down):
        assert hasattr(proj, "weight") and not hasattr(proj, "A") and not hasattr(proj, "beta")
    for block in rest:
        for proj in (block.qkv, block.o, block.up, block.down):
            assert proj.A.shape[1] == 8 * proj.n and proj.B.shape[1] == 8 and proj.beta.shape == (proj.n,)


def reference_forward(m, idx):
    """An independent forward written from the paper (Eq. 6): explicit per-position lanes and matmuls,
    reading only the model's parameters."""
    c = m.cfg
    B, T = idx.shape
    h, nh = c.n_embd, c.n_head
    hd = h // nh
    x = m.wte.weight[idx]
    if c.arch == "gpt2":
        x = x + m.wpe.weight[:T]
    positions = {"qkv": ["q", "k", "v"], "o": ["o"], "up": ["gate", "up"] if c.arch == "llama" else ["fc"], "down": ["down"]}
    prev = {}  # lane per position name: Y_{l-1}^P
    norm = (lambda t, mod: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * mod.weight) if c.arch == "llama" else \
        (lambda t, mod: F.layer_norm(t, (h,), mod.weight, mod.bias))

    def proj(mod, group, inp):
        outs = {}
        for j, name in enumerate(positions[group]):
            if hasattr(mod, "weight"):
                y = inp @ mod.weight[:, j * mod.h_out:(j + 1) * mod.h_out]
            else:
                z = inp @ mod.A[:, j * mod.rank:(j + 1) * mod.rank]
                silu = c.param == "cola" or (c.param == "cola_mlp" and group in ("up", "down"))
                y = (F.silu(z) if silu else z) @ mod.B[j]
            if mod.bias is not None:
                y = y + mod.bias[j]
            if c.param == "crnet" and name in prev:  # layers 2..L: Eq. 6
                b = mod.beta[j]
                y = torch.sign(b) * (b.abs() + c.beta_eps) * prev[name] + y
            outs[name] = y
        if c.param == "crnet":
            prev.update(outs)
        return outs

    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda t: torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in m.blocks:
        qkv = proj(blk.qkv, "qkv", norm(x, blk.norm_attn))
        q, k, v = (qkv[n].view(B, T, nh, hd).transpose(1, 2) for n in "qkv")
        if c.arch == "llama":
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + proj(blk.o, "o", (att @ v).transpose(1, 2).reshape(B, T, h))["o"]
        up = proj(blk.up, "up", norm(x, blk.norm_mlp))
        act = F.silu(up["gate"]) * up["up"] if c.arch == "llama" else F.gelu(up["fc"])
        x = x + proj(blk.down, "down", act)["down"]
    return norm(x, m.norm_f) @ m.lm_head.weight.T


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("param,first_layer", [("full", "full"), ("crnet", "full"), ("lowrank", "full"), ("cola", "full"),
                                               ("cola_mlp", "full"), ("crnet", "lowrank")])
def test_model_matches_reference_forward(arch, param, first_layer):
    """Lanes flow across blocks exactly as Eq. 6 says, with betas of both signs and a per-layer rank list;
    first_layer="lowrank" (CR-Net's ablation) makes layer 1 X A B and starts the lanes from it."""
    torch.manual_seed(1)
    m = Transformer(cfg(arch=arch, param=param, n_layer=4, rank=[8, 4, 6, 5], bias=arch == "gpt2", first_layer=first_layer))
    assert hasattr(m.blocks[0].qkv, "weight") == (param == "full" or (param == "crnet" and first_layer == "full"))
    with torch.no_grad():
        for p in m.parameters():  # random everything, so a swapped factor or a skipped lane cannot hide
            p.add_(0.05 * torch.randn_like(p))
        for blk in m.blocks[1:]:
            for proj in (blk.qkv, blk.o, blk.up, blk.down):
                if hasattr(proj, "beta"):
                    proj.beta.uniform_(-1.5, 1.5)
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = m(idx, idx)
    torch.testing.assert_close(logits, reference_forward(m, idx), rtol=1e-4, atol=1e-5)
    assert loss is not None and m(idx)[1] is None


def test_crnet_lanes_carry_layer1_outputs_scaled_by_the_betas():
    """With B = 0 in layers 2..L, Eq. 6 leaves Y_l^P = s_l ... s_2 * Y_1^P at every position P."""
    torch.manual_seed(2)
    m = Transformer(cfg(param="crnet", n_layer=4))
    with torch.no_grad():
        for blk in m.blocks[1:]:
            for proj in (blk.qkv, blk.o, blk.up, blk.down):
                proj.B.zero_()
                proj.beta.uniform_(-1.2, 1.2)
    outs = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: outs.__setitem__(name, o.detach()))
             for name, mod in m.named_modules() if isinstance(mod, Projection)]
    m(torch.randint(0, 50, (2, 8)))
    for h in hooks:
        h.remove()
    for pos in ("qkv", "o", "up", "down"):
        scale = torch.ones(getattr(m.blocks[0], pos).n)
        for l in range(1, 4):
            scale = scale * getattr(m.blocks[l], pos).scale().detach()
            torch.testing.assert_close(outs[f"blocks.{l}.{pos}"], scale.view(-1, 1) * outs[f"blocks.0.{pos}"])


# ---------------------------------------------------------------- parameter counts against the closed form
def closed_form(arch, param, h, ff, nh, L, V, r, T=256, bias=False, first_layer="full"):
    if arch == "llama":
        full_layer, lr_layer, n_pos = 4 * h * h + 3 * h * ff, r * (11 * h + 3 * ff), 7
        fixed = 2 * V * h + 2 * h * L + h  # embeddings + untied head + 2 RMSNorms per layer + final
    else:
        ff = 4 * h
        full_layer, lr_layer, n_pos = 4 * h * h + 2 * h * ff, r * (8 * h + 2 * (h + ff)), 6
        ln = 2 * h if bias else h
        fixed = V * h + T * h + 2 * ln * L + ln  # tied head
        b = (3 * h + h + ff + h) * L if bias else 0
        fixed += b
    layers = {"full": L * full_layer, "lowrank": L * lr_layer, "cola": L * lr_layer, "cola_mlp": L * lr_layer,
              "crnet": (full_layer if first_layer == "full" else lr_layer) + (L - 1) * (lr_layer + n_pos)}[param]
    return fixed + layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_low_rank_first_layer_count(arch):
    kw = dict(arch=arch, n_embd=512, intermediate_size=1376, n_head=8, n_layer=8, vocab_size=32000, rank=128)
    with torch.device("meta"):
        m = Transformer(ModelConfig(param="crnet", first_layer="lowrank", **kw))
    assert m.num_params()["full_rank"] == 0
    assert m.num_params()["total"] == closed_form(arch, "crnet", 512, 1376, 8, 8, 32000, 128, first_layer="lowrank")


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("param", ["full", "crnet", "lowrank", "cola", "cola_mlp"])
def test_llama_param_counts_match_closed_form(size, param):
    h, ff, nh, L, full_total = SIZES[size]
    r = h // 4
    with torch.device("meta"):
        m = Transformer(ModelConfig(n_embd=h, intermediate_size=ff, n_head=nh, n_layer=L, vocab_size=32000, param=param, rank=r))
    counts = m.num_params()
    assert counts["total"] == closed_form("llama", param, h, ff, nh, L, 32000, r)
    if param == "full":
        assert round(counts["total"] / 1e6, 1) == round(full_total / 1e6, 1)
    if param == "crnet":  # each group by hand: layer 1 full-rank, layers 2..L low-rank with 7 betas each
        assert counts == {"embeddings": 32000 * h, "lm_head": 32000 * h, "full_rank": 4 * h * h + 3 * h * ff,
                          "low_rank": (L - 1) * r * (11 * h + 3 * ff), "betas": 7 * (L - 1), "norms": 2 * h * L + h,
                          "biases": 0, "total": counts["total"]}


def test_paper_1b_counts():
    """The paper's 1B numbers: full 1,339.1M; CR-Net r=448 582.4M; CoLA r=512 609.3M."""
    dims = dict(n_embd=2048, intermediate_size=5461, n_head=32, n_layer=24, vocab_size=32000)
    with torch.device("meta"):
        got = {p: Transformer(ModelConfig(**dims, param=p, rank=r)).num_params()["total"]
               for p, r in (("full", 1), ("crnet", 448), ("cola", 512))}
    assert [round(got[p] / 1e5) / 10 for p in ("full", "crnet", "cola")] == [1339.1, 582.4, 609.3]


@pytest.mark.parametrize("param", ["full", "crnet", "lowrank", "cola"])
@pytest.mark.parametrize("bias", [False, True])
def test_gpt2_param_counts_match_closed_form(param, bias):
    with torch.device("meta"):
        m = Transformer(ModelConfig(arch="gpt2", n_embd=768, n_head=12, n_layer=12, vocab_size=50304, block_size=1024,
                                    param=param, rank=192, bias=bias))
    assert m.num_params()["total"] == closed_form("gpt2", param, 768, 0, 12, 12, 50304, 192, T=1024, bias=bias)


def test_gpt2_small_full_is_124m():
    with torch.device("meta"):
        m = Transformer(ModelConfig(arch="gpt2", n_embd=768, n_head=12, n_layer=12, vocab_size=50257, block_size=1024,
                                    param="full", bias=True))
    assert m.num_params()["total"] == 124_439_808  # GPT-2 small, as published (tied head)


# ---------------------------------------------------------------- optimizer groups
@pytest.mark.parametrize("arch,param", [("llama", "crnet"), ("gpt2", "crnet"), ("llama", "full"), ("gpt2", "cola"),
                                        ("qwen3", "crnet"), ("qwen3_moe", "crnet"), ("qwen3_moe", "full")])
def test_optimizer_groups_cover_every_parameter_once(arch, param):
    """(qwen3: QK-norm weights, no decay; qwen3_moe: the router and every expert's factors decay)"""
    moe = dict(n_expert=3, expert_top_k=2) if arch == "qwen3_moe" else {}
    m = Transformer(cfg(arch=arch, param=param, bias=arch == "gpt2", **moe))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert not decay & no_decay and decay | no_decay == {id(p) for p in m.parameters()}
    for name, p in m.named_parameters():  # by name, not by the model's own role map: matrices and factors decay
        matrix = name.endswith((".A", ".B")) or (name.endswith(".weight") and "norm" not in name)
        assert (id(p) in decay) == matrix, name
        assert matrix or name.endswith((".beta", ".bias")) or "norm" in name, name
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize("kw,field", [
    (dict(rank=0), "rank"), (dict(rank=32), "rank"), (dict(rank=[8, 8]), "rank"), (dict(rank=[8, 8, 100]), "rank"),
    (dict(n_embd=30, n_head=4), "n_embd"), (dict(n_embd=30, n_head=10), "n_head"), (dict(arch="bert"), "arch"),
    (dict(param="svd"), "param"), (dict(n_layer=0), "n_layer"), (dict(vocab_size=-1), "vocab_size"),
    (dict(beta_init=0.0), "beta_init"), (dict(dropout=1.0), "dropout"), (dict(bias=True), "bias"),
    (dict(first_layer="low"), "first_layer"), (dict(param="lowrank", first_layer="lowrank"), "first_layer"),
    (dict(param="full", beta_learnable=False), "beta_learnable"),
    (dict(param="crnet", first_layer="lowrank", rank=[999, 8, 8]), "rank"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        cfg(**kw)


def test_crnet_first_rank_entry_is_unused():
    cfg(param="crnet", rank=[999, 8, 8])  # layer 1 is full-rank: its entry is not checked
    with pytest.raises(ValueError, match="layer 1 rank"):
        cfg(param="lowrank", rank=[999, 8, 8])


def test_fixed_beta_stays_put_and_the_rest_trains():
    """beta_learnable=False: no gradient, not in the optimizer, unchanged by steps; the factors still move."""
    torch.manual_seed(0)
    m = Transformer(cfg(param="crnet", beta_learnable=False, beta_init=0.6))
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    B0 = m.blocks[1].qkv.B.detach().clone()
    idx = torch.randint(0, 50, (2, 16))
    for _ in range(2):
        m(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    for blk in m.blocks[1:]:
        for proj in blk.projections():
            assert proj.beta.grad is None and id(proj.beta) not in in_opt
            assert torch.equal(proj.beta.detach(), torch.full_like(proj.beta, 0.6))
    assert not torch.equal(m.blocks[1].qkv.B, B0)


# ---------------------------------------------------------------- init, FLOPs, MFU, generate
def projection_output_stds(m, idx):
    stds = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: stds.__setitem__(name, o.std(dim=(0, 1, 3))))
             for name, mod in m.named_modules() if isinstance(mod, Projection)]
    with torch.no_grad():
        m(idx)
    for h in hooks:
        h.remove()
    return stds


@pytest.mark.parametrize("param", ["crnet", "lowrank", "cola"])
def test_init_output_variance_matches_full_rank_at_every_depth(param):
    """README 'Initialization': projection output stds at init match the full-rank model's. The exception is
    CR-Net's attention-out lane (0.66-0.74x): its input variance grows with depth in the full model, so the
    stationary-variance argument of the init (Transformer docstring) does not hold there."""
    kw = dict(n_layer=8, n_head=4, n_embd=256, intermediate_size=688, vocab_size=256, block_size=64, rank=64)
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (8, 64))
    ref = projection_output_stds(Transformer(cfg(param="full", **kw)), idx)
    got = projection_output_stds(Transformer(cfg(param=param, **kw)), idx)
    ratios = {k: got[k] / ref[k] for k in ref}
    allr = torch.cat(list(ratios.values()))
    assert 0.95 < allr.median() < 1.05 and allr.min() > 0.6 and allr.max() < 1.3, ratios
    if param == "crnet":  # (lowrank and cola scatter +-15% per position: a 64-dim bottleneck's sampling noise)
        outliers = {k for k, r in ratios.items() if (r - 1).abs().max() > 0.1}
        assert outliers <= {f"blocks.{l}.o" for l in range(1, 8)}, outliers


def test_moe_init_output_variance_matches_full_rank_at_every_depth():
    """Qwen-3-MoE: the MoE group's output (D plus the lane, Y^moe) at init has the full-rank model's std in every
    layer (measured 0.98-1.05x), which needs a lane-fed down expert's B scaled as a crnet projection's."""
    kw = dict(arch="qwen3_moe", n_layer=8, n_head=4, n_embd=256, intermediate_size=256, vocab_size=256, block_size=64,
              rank=64, n_expert=4, expert_top_k=2)

    def moe_stds(m):
        stds = {}
        hooks = [b.moe.register_forward_hook(lambda mod, i, o, l=l: stds.__setitem__(l, (o[0] if isinstance(o, tuple) else o).std()))
                 for l, b in enumerate(m.blocks)]
        with torch.no_grad():
            m(idx)
        for h in hooks:
            h.remove()
        return torch.stack([stds[l] for l in range(len(m.blocks))])
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (8, 64))
    ratios = moe_stds(Transformer(cfg(param="crnet", **kw))) / moe_stds(Transformer(cfg(param="full", **kw)))
    assert ((ratios - 1).abs() < 0.1).all(), ratios  # down's B scaled as lowrank's: 1.22-1.48x from layer 2 on


def test_flops_and_mfu():
    m = Transformer(cfg(param="crnet"))  # llama, L 3, h 32, h_ff 48, r 8, vocab 50, T 16
    # matmul parameters by hand: layer 1 4*32*32 + 3*32*48 = 8,704; layers 2-3 2 * 8 * (11*32 + 3*48) = 7,936;
    # head 50 * 32 = 1,600; so 6 * 18,240 = 109,440, plus attention 12 * L * h * T = 12 * 3 * 32 * 16 = 18,432
    assert m.flops_per_token() == 127_872
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12 and peak_flops_for("NVIDIA H200 NVL") == 835e12
    assert peak_flops_for("NVIDIA A100-SXM4-40GB") == 312e12
    # whole words: an L40 is not an L4, an A10G not an A10, a GH200 not an H200
    assert [peak_flops_for(f"NVIDIA {n}") for n in ("L4", "L40", "L40S", "A10", "A10G", "GH200 480GB")] == [
        121e12, 181e12, 362e12, 125e12, 70e12, 989e12]
    assert peak_flops_for("Tesla V100S-PCIE-32GB") == 130e12 and peak_flops_for("Tesla V100-SXM2-32GB") == 125e12
    assert peak_flops_for("") is None and estimate_mfu(1e6, 1e3, None) is None
    assert estimate_mfu(1e9, 1e5, 1e15) == pytest.approx(0.1)


def test_generate_shapes_and_greedy_determinism():
    torch.manual_seed(0)
    m = Transformer(cfg()).eval()
    idx = torch.randint(0, 50, (2, 5))
    a, b = generate(m, idx, 20, temperature=0), generate(m, idx, 20, temperature=0)
    assert a.shape == (2, 25) and torch.equal(a, b) and torch.equal(a[:, :5], idx)
    assert generate(m, idx, 3, temperature=1.0, top_k=1).equal(generate(m, idx, 3, temperature=0))
    for tiny in (1e-40, 1e-300):  # logits / temperature overflowed to inf, and softmax to nan: now greedy's limit
        assert generate(m, idx, 3, temperature=tiny).equal(generate(m, idx, 3, temperature=0))


def test_generate_never_picks_a_padded_vocabulary_row():
    """A head padded past the tokenizer (GPT-2 configs: 50304 rows for 50257 ids) has rows no target trained; here
    they are made the likeliest, and generate(vocab=40) still samples and picks only ids the tokenizer can decode."""
    torch.manual_seed(0)
    m = Transformer(cfg()).eval()
    with torch.no_grad():
        m.lm_head.weight[40:] *= 100
    idx = torch.randint(0, 40, (4, 5))
    assert (generate(m, idx, 10, temperature=0) >= 40).any()  # the padded rows win without vocab
    for temperature, top_k in ((0, None), (1.0, None), (5.0, 3)):
        assert (generate(m, idx, 10, temperature=temperature, top_k=top_k, vocab=40) < 40).all()


@pytest.mark.parametrize("param", ["full", "crnet", "lowrank"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_grouped_query_attention_and_head_dim_counts_match_closed_form(arch, param):
    """Qwen-3-0.6B's shape (h 1024, 16 heads of 128, 8 kv heads, 28 layers, ff 3072, vocab 151936, tied): q is
    2048 wide, k and v 1024 each, o reads 2048. A low-rank layer: X [A_q A_k A_v] is h x 3r, [B_q B_k B_v] is
    r x (q + 2 kv); o: q x r, r x h; gate/up: h x 2r, r x 2ff; down: ff x r, r x h. QK-norm: 2 x head_dim per layer."""
    h, nh, hd, nkv, L, ff, V, r = 1024, 16, 128, 8, 28, 3072, 151936, 256
    q, kv = nh * hd, nkv * hd
    full_layer = h * (q + 2 * kv) + q * h + 3 * h * ff
    lr_layer = r * (3 * h + q + 2 * kv) + r * (q + h) + r * (2 * h + 2 * ff) + r * (ff + h)
    layers = {"full": L * full_layer, "lowrank": L * lr_layer, "crnet": full_layer + (L - 1) * (lr_layer + 7)}[param]
    norms = 2 * h * L + h + (2 * hd * L if arch == "qwen3" else 0)
    with torch.device("meta"):
        m = Transformer(ModelConfig(arch=arch, param=param, n_embd=h, n_head=nh, head_dim=hd, n_kv_head=nkv, n_layer=L,
                                    intermediate_size=ff, vocab_size=V, rank=r, tie_embeddings=True))
    assert m.num_params()["total"] == V * h + norms + layers
    if param == "crnet":
        assert m.blocks[1].qkv.packed and m.blocks[1].qkv.B.shape == (r, q + 2 * kv) and m.blocks[1].o.A.shape == (q, r)
