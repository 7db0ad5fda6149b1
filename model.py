"""
CR-Net (Cross-layer Low-Rank residual Network, arXiv 2509.18993) in one file: a compact LLaMA / GPT-2 transformer
whose linear projections can be full-rank, CR-Net (Eq. 6), vanilla low-rank or CoLA. Row vectors, as in the
paper: Y = X W. The model knows nothing about DDP, FSDP or torch.compile (parallel.py applies them from outside),
and of activation recomputation (recompute.py) one knob: Projection.lane_dtype (see Projection.lane_add).
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe

ARCHS = ("llama", "gpt2", "qwen3", "qwen3_moe")
PARAMS = ("full", "crnet", "lowrank", "cola", "cola_mlp")
SILU_SECOND_MOMENT = 0.3557  # E[silu(z)^2] for z ~ N(0, 1): CoLA's bottleneck shrinks variance by this


@dataclass
class ModelConfig:
    arch: str = "llama"            # "llama" (RMSNorm, RoPE, SwiGLU, untied), "gpt2" (LayerNorm, learned pos, GELU, tied),
                                   # "qwen3" (LLaMA with QK-norm: an RMSNorm on every query and key head before RoPE),
                                   # "qwen3_moe" (qwen3 with a sparse mixture of SwiGLU experts as its MLP: MoE below)
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    intermediate_size: int = 1376  # LLaMA SwiGLU width (qwen3_moe: each expert's); GPT-2 always uses 4 * n_embd
    vocab_size: int = 32000
    block_size: int = 256
    bias: bool = False             # GPT-2 only: biases in projections and LayerNorms
    dropout: float = 0.0
    param: str = "crnet"           # "full" | "crnet" (Eq. 6) | "lowrank" (X A B) | "cola" (silu(X A) B) | "cola_mlp"
                                   # (silu(X A) B in the MLP only, X A B in attention: where CoLA's gain comes from)
    rank: int | list = 128         # one rank for every low-rank layer, or a list of n_layer ranks
    # CR-Net specifics. Paper: eps = 1e-6, beta learnable; the rest is our choice (results/init.md).
    beta_init: float = 0.5 ** 0.5  # initial beta of every CR layer: the lane carries beta_init^2 of the output variance
    beta_eps: float = 1e-6         # Eq. 6: s = sign(beta) * (|beta| + eps)
    beta_learnable: bool = True    # False: every beta stays at beta_init (the paper's fixed-beta ablation)
    first_layer: str = "full"      # CR-Net's layer 1: "full" (paper) or "lowrank" (the paper's ablation: X A B, no lane in)
    init_std: float = 0.02         # std of a full-rank projection; the low-rank factors are scaled to match it
    n_kv_head: int = 0             # key/value heads; 0 = n_head; fewer = grouped-query attention
    head_dim: int = 0              # 0 = n_embd // n_head; q is n_head * head_dim wide, k and v n_kv_head * head_dim
    tie_embeddings: bool | None = None  # lm_head shares wte; None = the arch's default: tied gpt2, untied llama, qwen3
    n_expert: int = 0              # qwen3_moe: experts per layer (0 for the dense archs)
    expert_top_k: int = 2          # qwen3_moe: experts each token is routed to
    router_aux_coef: float = 0.001  # qwen3_moe: weight of the load-balancing loss added to a training loss (as HF's)
    moe_lane: bool = True          # crnet + qwen3_moe: Eq. 6 on the MoE output (False: the ablation without that lane)
    # Set by pretrained checkpoints (tools/hf.py); training configs keep the defaults, so they are not train.py keys.
    rope_theta: float | None = None  # RoPE base; None = the arch's: 1e4 (llama), 1e6 (qwen3)
    norm_eps: float | None = None  # None = the arch's default: 1e-6 (RMSNorm, llama), 1e-5 (LayerNorm, gpt2)
    gelu_approx: str = "none"      # GPT-2's GELU: "none" (exact erf) or "tanh" (OpenAI / HF GPT-2's gelu_new)
    norm_topk: bool = True         # qwen3_moe: renormalise the top-k router weights to sum 1 (HF's norm_topk_prob)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")  # as configurator.ConfigError words it
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for name, choices in (("arch", ARCHS), ("param", PARAMS), ("first_layer", ("full", "lowrank")),
                              ("gelu_approx", ("none", "tanh"))):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {choices}")
        if self.param != "crnet" and (self.first_layer != "full" or not self.beta_learnable):
            bad("first_layer" if self.first_layer != "full" else "beta_learnable",
                f"is a CR-Net ablation and needs param='crnet' (got param={self.param!r})")
        for name in ("n_layer", "n_head", "n_embd", "intermediate_size", "vocab_size", "block_size", "n_kv_head", "head_dim",
                     "n_expert", "expert_top_k"):
            low = 0 if name in ("n_kv_head", "head_dim", "n_expert") else 1  # 0: n_head heads, n_embd // n_head wide
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                bad(name, "must be a positive integer" if low else "must be a non-negative integer (0 = the default)")
        # rope_theta None becomes the arch's; derived sizes are attributes, not fields, so asdict (checkpoints) skips them
        self.qwen3 = self.arch.startswith("qwen3")  # QK-norm
        self.rope_theta = (1e6 if self.qwen3 else 1e4) if self.rope_theta is None else self.rope_theta
        self.kv_heads, self.hd = self.n_kv_head or self.n_head, self.head_dim or self.n_embd // self.n_head
        self.q_dim, self.kv_dim = self.n_head * self.hd, self.kv_heads * self.hd  # q, and each of k and v, this wide
        self.ff_dim = 4 * self.n_embd if self.arch == "gpt2" else self.intermediate_size
        self.tied = self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings
        self.norm_eps_value = self.norm_eps if self.norm_eps is not None else 1e-5 if self.arch == "gpt2" else 1e-6
        checks = [  # (broken, key, why)
            (not self.head_dim and self.n_embd % self.n_head, "n_embd", f"must be divisible by n_head={self.n_head}"),
            (self.arch != "gpt2" and self.hd % 2, "head_dim" if self.head_dim else "n_head",
             f"RoPE needs an even head dim, got {self.hd}"),
            (self.arch != "gpt2" and self.bias, "bias", f"the {self.arch} architecture has no biases"),
            (not 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)"),
            (not 0.0 < abs(self.beta_init) <= 1.0, "beta_init",
             "must satisfy 0 < |beta_init| <= 1 (the rest of the variance goes to X A B)"),
            (not self.beta_eps >= 0.0, "beta_eps", "must be non-negative"),
            (not self.init_std > 0.0, "init_std", "must be positive"),
            (not (is_num(self.rope_theta) and self.rope_theta > 0), "rope_theta", "must be a positive number"),
            (self.norm_eps is not None and not (is_num(self.norm_eps) and 0.0 <= self.norm_eps < 1.0), "norm_eps",
             "must be None (the arch's default) or a number in [0, 1)"),
            (self.n_head % self.kv_heads, "n_kv_head", f"must divide n_head={self.n_head}"),
            (self.tie_embeddings not in (None, True, False) or is_int(self.tie_embeddings), "tie_embeddings",
             "must be None (the arch's default), True or False"),
            ((self.arch == "qwen3_moe") != (self.n_expert > 0), "n_expert", "must be >= 1 for arch='qwen3_moe', else 0"),
            (self.n_expert and self.expert_top_k > self.n_expert, "expert_top_k", f"must be <= n_expert={self.n_expert}"),
            (not (is_num(self.router_aux_coef) and self.router_aux_coef >= 0), "router_aux_coef", "must be a number >= 0"),
            (self.n_expert and self.param.startswith("cola"), "param", "qwen3_moe's experts are full, crnet or lowrank"),
            (not self.moe_lane and not (self.n_expert and self.param == "crnet"), "moe_lane",
             "is a CR-Net ablation of qwen3_moe: needs param='crnet' and arch='qwen3_moe'"),
        ]
        for broken, name, why in checks:
            if broken:
                bad(name, why)
        if self.param == "full":
            return
        ranks = self.rank if isinstance(self.rank, (list, tuple)) else [self.rank] * self.n_layer
        if len(ranks) != self.n_layer:
            bad("rank", f"a rank list needs n_layer={self.n_layer} entries, got {len(ranks)}")
        limit = min(self.n_embd, self.ff_dim, self.q_dim, self.kv_dim)  # every projection's h_in and h_out
        for l, r in enumerate(ranks):
            if self.layer_kind(l) != "full" and not (is_int(r) and 1 <= r < limit):  # CR-Net's full layer 1: unused
                bad("rank", f"layer {l + 1} rank {r!r} must be an integer with 1 <= r < min(n_embd, ff_dim, q, k/v "
                            f"widths) = {limit}")
        self.rank = list(ranks) if isinstance(self.rank, (list, tuple)) else self.rank

    def layer_rank(self, l):
        return self.rank[l] if isinstance(self.rank, list) else self.rank

    def layer_kind(self, l):
        """Parameterization of layer l (0-based): CR-Net's layer 1 is full-rank (Sec. 2), or X A B as the paper's
        ablation; either way it has no lane in and its outputs start the lanes."""
        return self.first_layer if self.param == "crnet" and l == 0 else self.param

    @classmethod
    def field_names(cls, pretrained=False):
        """The fields a training config sets (train.py's keys); pretrained=True adds those only pretrained
        checkpoints change (rope_theta .. norm_topk), which training keeps at their defaults."""
        names = [f.name for f in fields(cls)]
        return names if pretrained else names[:names.index("rope_theta")]


def model_config(c, **changes):
    """The ModelConfig of a train.py config c (a dict), with `changes`, validated. Before the data is read its
    vocab_size may be None: GPT-2's 50257 stands in (a wider tokenizer, up to 65536, makes a memory plan err low)."""
    keys = {**{k: c[k] for k in ModelConfig.field_names()}, **changes}
    return ModelConfig(**{**keys, "vocab_size": keys["vocab_size"] or 50257})


class Projection(nn.Module):
    """n projections that share one input X (B, T, h_in), of output widths `widths`; output Y (B, T, n, w) when
    the widths are equal, else Y (B, T, 1, sum w), "packed" (q, k, v under grouped-query attention: k, v narrower).

    Sharing the input lets q/k/v (and gate/up) use one fused input-side matmul X @ [A_q A_k A_v]; each projection
    keeps its own B and beta, so Eq. 6 holds per projection at its own width.
        full:    Y = X W
        lowrank: Y = (X A) B
        cola:    Y = silu(X A) B
        crnet:   Y = s * Y_prev + (X A) B,   s = sign(beta) (|beta| + eps)      # Eq. 6
    CR-Net's layer 1 (full-rank, or low-rank in the paper's ablation) has no lane in; its output is the first lane.
    lane_dtype: None (lanes in the compute dtype) or a dtype the lanes are formed in at least; see lane_add.
    """
    lane_dtype = None

    def __init__(self, h_in, widths, kind, rank, bias, std, cfg, lane_in=False):
        super().__init__()
        self.widths, self.n, self.kind, self.rank, self.std = tuple(widths), len(widths), kind, rank, std
        self.lane_in, self.beta_eps, self.beta_init = lane_in, cfg.beta_eps, cfg.beta_init
        self.packed = len(set(widths)) > 1
        self.slots, self.h_out = (1, sum(widths)) if self.packed else (self.n, widths[0])  # Y is (B, T, slots, h_out)
        if kind == "full":
            self.weight = nn.Parameter(torch.empty(h_in, sum(widths)))
        elif kind != "moe":  # MoE (below) has its router and experts instead
            self.A = nn.Parameter(torch.empty(h_in, self.n * rank))  # fused over the n projections
            # one r x w factor per projection: (n, r, w), or side by side (r, sum w) when packed
            self.B = nn.Parameter(torch.empty(rank, sum(widths)) if self.packed else torch.empty(self.n, rank, self.h_out))
        if lane_in:
            self.beta = nn.Parameter(torch.empty(self.n), requires_grad=cfg.beta_learnable)  # one per layer and position
        self.bias = nn.Parameter(torch.empty(self.slots, self.h_out)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def init_tensor(self, leaf, t, generator=None):
        """Write parameter `leaf`'s initial value into t (its full shape). See Transformer's docstring."""
        if leaf == "weight":
            return nn.init.normal_(t, std=self.std, generator=generator)
        if leaf == "A":
            return nn.init.normal_(t, std=t.shape[0] ** -0.5, generator=generator)  # Z = X A has the variance of X
        if leaf == "B":
            h_in = self.A.shape[0]
            gain = {"lowrank": 1.0, "cola": 1.0 / SILU_SECOND_MOMENT}.get(self.kind, 1.0 - self.beta_init ** 2)
            return nn.init.normal_(t, std=self.std * math.sqrt(h_in / self.rank * gain), generator=generator)
        return t.fill_(self.beta_init if leaf == "beta" else 0.0)  # beta, bias

    def reset_parameters(self):
        for leaf, p in self.named_parameters(recurse=False):  # an MoE's experts are Projections of their own
            self.init_tensor(leaf, p)

    def scale(self):
        """Eq. 6: s = sign(beta) (|beta| + eps), in float32 at least (bf16 betas under FSDP): eps survives rounding."""
        beta = self.beta.to(torch.promote_types(self.beta.dtype, torch.float32))
        return torch.sign(beta) * (beta.abs() + self.beta_eps)

    def lane_scale(self):
        """s shaped to multiply Y: (n, 1), or (1, sum w) with each projection's s repeated over its columns."""
        s = self.scale()
        return torch.cat([s[i:i + 1].expand(w) for i, w in enumerate(self.widths)])[None] if self.packed else s[:, None]

    def pieces(self, y):  # the n projections' outputs (B, T, w) in Y
        return y[:, :, 0].split(self.widths, -1) if self.packed else y.unbind(2)

    def split_input(self, xa):  # (B, T, n * r) -> Z (B, T, n, r); (B, T, sum w) -> X W (B, T, slots, h_out)
        return xa.unflatten(-1, (self.slots if self.kind == "full" else self.n, -1))

    def input_product(self, x):
        """X A (B, T, n, r), or X W (B, T, slots, h_out): the input-side matmul, which recompute.py keeps (Z) or knows."""
        return self.split_input(x @ (self.weight if self.kind == "full" else self.A))

    def output_product(self, z):
        """Z B (B, T, slots, h_out) from Z (B, T, n, r): one r x w factor per projection."""
        if self.packed:
            return torch.cat([z[:, :, i] @ b for i, b in enumerate(self.B.split(self.widths, -1))], -1)[:, :, None]
        # n = 1 (o, down) as a plain matmul: einsum's gradient for a (1, r, h) factor comes out with strides
        # that differ from DDP's bucket view in the size-1 dim (a warning and a copy on every step)
        return (z[:, :, 0] @ self.B[0]).unsqueeze(2) if self.n == 1 else torch.einsum("btnr,nrh->btnh", z, self.B)

    def delta(self, x, xa=None):
        """Everything but the lane term: X W, (X A) B or silu(X A) B, plus the bias; xa: input_product(x) if known."""
        xa = self.input_product(x) if xa is None else xa
        d = xa if self.kind == "full" else self.output_product(F.silu(xa) if self.kind == "cola" else xa)
        return d if self.bias is None else d + self.bias.to(d.dtype)  # in the matmul's dtype, as F.linear adds it

    def lane_add(self, d, lane):
        """Eq. 6, layers 2..L: Y_l = s * Y_{l-1} + d with s = sign(beta) (|beta| + eps).

        Precision. A lane is as wide as the projection's output, so its dtype is what a CR layer streams through
        memory. It is the compute dtype (bf16 under autocast): addcmul multiplies and adds in float32 inside the
        kernel and rounds once, and s is rounded to bf16 first, as autocast rounds every weight it multiplies.
        Inverting Eq. 6 (recompute.py) divides a rounded lane by s and so amplifies its rounding by 1/|s| per
        layer: within recompute_rtol in float32 (the round-off guard), not in bf16. So recompute.apply sets
        lane_dtype = float32 for "crnet" and "reversible"; then s stays float32 and addcmul promotes to it."""
        dtype = d.dtype if self.lane_dtype is None else torch.promote_types(d.dtype, self.lane_dtype)
        return torch.addcmul(d, self.lane_scale().to(dtype), lane)

    def forward(self, x, lane=None, xa=None):
        d = self.delta(x, xa)
        return self.lane_add(d, lane) if self.lane_in else d


class MoE(Projection):
    """Qwen-3-MoE's MLP as one projection group of output D (B, T, 1, h) (moe.py: the routing, the experts, and why
    CR-Net's lane is on D): D = sum_{e in top-k(x)} g_e(x) down_e(silu(gate_e(x)) * up_e(x)); CR-Net layers 2..L
    add Eq. 6 on it, Y^moe_l = s * Y^moe_{l-1} + D_l. weight: the router (h, n_expert), full-rank in every param."""

    def __init__(self, cfg, kind, rank, lane_in):
        super().__init__(cfg.n_embd, (cfg.n_embd,), "moe", rank, False, cfg.init_std, cfg, lane_in)
        h, ff, self.top_k, self.norm_topk = cfg.n_embd, cfg.ff_dim, cfg.expert_top_k, cfg.norm_topk
        self.weight = nn.Parameter(torch.empty(h, cfg.n_expert))
        # a CR-Net layer's experts are X A B; with a lane in, down's factor is scaled as a crnet projection's (D + lane)
        up_kind, down_kind = (kind, kind) if kind in ("full", "lowrank") else ("lowrank", "crnet" if lane_in else "lowrank")
        self.experts = nn.ModuleList(nn.ModuleDict({
            "up": Projection(h, (ff, ff), up_kind, rank, False, cfg.init_std, cfg),
            "down": Projection(ff, (h,), down_kind, rank, False, cfg.init_std / math.sqrt(2 * cfg.n_layer), cfg),
        }) for _ in range(cfg.n_expert))
        self.reset_parameters()

    def mix(self, x, idx=None):  # -> D, the router's statistics, the experts chosen (given: recompute.py's replay)
        return moe.mix(x, self.weight, self.experts, self.top_k, self.norm_topk, idx)

    def forward(self, x, lane=None, idx=None):
        d, stats, _ = self.mix(x, idx)
        return (self.lane_add(d, lane) if self.lane_in else d), stats


def rope_tables(head_dim, block_size, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, T, nh, hd); rotate the two halves of each head (GPT-NeoX / HF LLaMA layout)."""
    T = x.shape[1]
    cos, sin = cos[:T, None].to(x.dtype), sin[:T, None].to(x.dtype)  # (T, 1, hd/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LayerNorm(nn.LayerNorm):  # GPT-2's. A weight coarser than x (FSDP's bf16 weights in autocast's float32 stream)
    def forward(self, x):       # is promoted to x's dtype: CPU's kernel refuses the mix
        w, b = (t if t is None else t.to(torch.promote_types(t.dtype, x.dtype)) for t in (self.weight, self.bias))
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.RMSNorm):  # LLaMA's, likewise: with the weight in another dtype than x, the fused kernel declines
    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(torch.promote_types(self.weight.dtype, x.dtype)), self.eps)


class Block(nn.Module):
    """One transformer layer. CR-Net lanes go in and come out explicitly: no hidden state on modules.

    lanes: tuple (Y^qkv (B,T,3,q) or packed (B,T,1,q+2kv), Y^o (B,T,1,h), Y^up (B,T,2|1,ff), Y^down (B,T,1,h)) of
    the layer below, or None for layer 1 / non-CR-Net models; qwen3_moe: (Y^qkv, Y^o, Y^moe (B,T,1,h)).
    """

    def __init__(self, cfg, l):
        super().__init__()
        h, ff, L = cfg.n_embd, cfg.ff_dim, cfg.n_layer
        kind, r, lane_in = cfg.layer_kind(l), cfg.layer_rank(l), cfg.param == "crnet" and l > 0
        self.layer_idx, self.emits_lanes, self.cfg = l, cfg.param == "crnet", cfg
        llama = cfg.arch != "gpt2"  # llama and qwen3
        resid_std = cfg.init_std / math.sqrt(2 * L)  # GPT-2: scale the projections that write to the residual stream
        Norm = lambda d: RMSNorm(d, cfg.norm_eps_value) if llama else LayerNorm(d, cfg.norm_eps_value, bias=cfg.bias)
        attn_kind, mlp_kind = ("lowrank", "cola") if kind == "cola_mlp" else (kind, kind)
        P = lambda h_in, widths, std, kind: Projection(h_in, widths, kind, r, cfg.bias, std, cfg, lane_in)
        self.norm_attn, self.norm_mlp = Norm(h), Norm(h)
        self.qkv = P(h, (cfg.q_dim, cfg.kv_dim, cfg.kv_dim), cfg.init_std, attn_kind)
        self.o = P(cfg.q_dim, (h,), resid_std, attn_kind)
        if cfg.n_expert:
            self.moe = MoE(cfg, kind, r, lane_in and cfg.moe_lane)
        else:
            self.up = P(h, (ff, ff) if llama else (ff,), cfg.init_std, mlp_kind)  # LLaMA: gate and up share the input
            self.down = P(ff, (h,), resid_std, mlp_kind)
        if cfg.qwen3:  # QK-norm: one RMSNorm over head_dim for every query head, one for every key head
            self.q_norm, self.k_norm = Norm(cfg.hd), Norm(cfg.hd)

    def attention(self, y_qkv, rope):
        """Y^qkv -> attention output (B, T, q_dim), before the o projection."""
        cfg = self.cfg
        bsz, T = y_qkv.shape[:2]  # bsz, not B: B is the low-rank factor
        q, k, v = (t.view(bsz, T, -1, cfg.hd) for t in self.qkv.pieces(y_qkv))  # (B, T, heads, hd)
        if cfg.qwen3:  # QK-norm; weights in q's dtype (autocast's; a float32 lane's) let the fused kernel run
            q, k = (F.rms_norm(t, (cfg.hd,), n.weight.to(t.dtype), n.eps) for t, n in ((q, self.q_norm), (k, self.k_norm)))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # (B, nh, T, hd) as views: SDPA's output keeps the (B, T, nh, hd) layout, so the reshape below is a view
        # too, not one more (B, T, h) copy kept for the o projection's backward
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        p = self.cfg.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=cfg.kv_heads != cfg.n_head)
        return a.transpose(1, 2).reshape(bsz, T, cfg.q_dim)

    def mlp_act(self, y_up):
        if self.cfg.arch != "gpt2":
            return F.silu(y_up[:, :, 0]) * y_up[:, :, 1]  # SwiGLU
        return F.gelu(y_up[:, :, 0], approximate=self.cfg.gelu_approx)

    def projections(self):
        return (self.qkv, self.o, self.moe) if self.cfg.n_expert else (self.qkv, self.o, self.up, self.down)  # lanes

    def forward(self, x, lanes, rope=None, project=None):
        """x (B, T, h) and the lanes of the layer below -> (x out, this layer's lanes, the MoE router's statistics
        or None). project(proj, input, lane) computes one projection group (default: proj(input, lane); an MoE's
        returns (Y, statistics)); it is the one hook recompute.py uses, to keep Z = X A in forward and to replay
        known outputs in backward, so this is the only definition of a layer."""
        project = project if project is not None else (lambda proj, inp, lane: proj(inp, lane))  # (`or`: a torch 2.11 graph break)
        lq, lo, *lm = lanes if lanes is not None else (None,) * 4
        drop = lambda t: F.dropout(t, self.cfg.dropout, self.training)
        y_qkv = project(self.qkv, self.norm_attn(x), lq)
        y_o = project(self.o, self.attention(y_qkv, rope), lo)
        x = x + drop(y_o[:, :, 0])
        if self.cfg.n_expert:
            y_out, router = project(self.moe, self.norm_mlp(x), lm[0])
            mlp = (y_out,)
        else:
            y_up, router = project(self.up, self.norm_mlp(x), lm[0]), None
            mlp = y_up, (y_out := project(self.down, self.mlp_act(y_up), lm[1]))
        x = x + drop(y_out[:, :, 0])
        return x, ((y_qkv, y_o, *mlp) if self.emits_lanes else None), router


class Transformer(nn.Module):
    """
    Initialization (every tensor; the paper states none of these, so they are our choices):

    | tensor                         | init                                    | why |
    |--------------------------------|-----------------------------------------|-----|
    | wte (token embedding)          | N(0, init_std)                          | GPT-2 / LLaMA convention |
    | wpe (GPT-2 positions)          | N(0, init_std)                          | GPT-2 |
    | lm_head (untied, as in LLaMA)  | N(0, init_std)                          | as wte |
    | full W of q,k,v,gate,up,fc     | N(0, init_std)                          | GPT-2 |
    | full W of o, down, mlp-out     | N(0, init_std / sqrt(2 n_layer))        | GPT-2: residual writes grow with depth |
    | low-rank A (h_in x n*r)        | N(0, 1 / sqrt(h_in))                    | Z = X A keeps the variance of X (what recompute stores) |
    | low-rank B (n x r x w, packed r x sum w) | N(0, std_W * sqrt(h_in / r * gain))     | Var(X A B) = gain * Var(X W_full) |
    |   gain, crnet layers 2..L      | 1 - beta_init^2                         | Var(Y_l) = b^2 Var(Y_{l-1}) + (1-b^2) Var(full) = Var(full) at every depth |
    |   gain, lowrank / cola         | 1 / 1 / E[silu(z)^2] = 1 / 0.3557       | same output variance as full-rank (so is a low-rank CR-Net layer 1) |
    | beta (crnet, layers 2..L)      | beta_init (default 1/sqrt(2))           | results/init.md: measured per-layer output std ratio |
    | MoE router W (h x n_expert)    | N(0, init_std)                          | as a full W |
    | MoE experts (gate/up, down)    | as full W / A, B above; down's B with the crnet gain where D has a lane in | D is what enters Eq. 6 |
    | norm weights                   | 1 (biases 0)                            | standard |
    | projection biases (GPT-2)      | 0                                       | standard |

    So at init a projection of any parameterization outputs about the full-rank model's variance, but CR-Net's o
    (0.58-0.72x: its lane carries the layer below's smaller one); python tools/bench.py init measures it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, h = cfg, cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, h)
        self.wpe = nn.Embedding(cfg.block_size, h) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layer))
        self.norm_f = LayerNorm(h, cfg.norm_eps_value, bias=cfg.bias) if cfg.arch == "gpt2" else RMSNorm(h, cfg.norm_eps_value)
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.tie_weights()
        for name in ("rope_cos", "rope_sin") if cfg.arch != "gpt2" else ():  # the RoPE tables, filled by reset_buffers
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def init_tensor(self, name, t, generator=None):
        """Write parameter `name`'s initial value (the table above) into t, of its full shape: a sharded model draws
        each full tensor here and keeps its shard, so every process count starts from the same weights."""
        path, _, leaf = name.rpartition(".")
        owner = self.get_submodule(path)
        if isinstance(owner, Projection):
            return owner.init_tensor(leaf, t, generator)
        if isinstance(owner, (nn.RMSNorm, nn.LayerNorm)):
            return t.fill_(1.0 if leaf == "weight" else 0.0)
        return nn.init.normal_(t, std=self.cfg.init_std, generator=generator)  # wte, wpe, lm_head

    def init_order(self):
        """Parameter names in the order their values are drawn: embeddings and head first, then the layers."""
        names = [n for n, _ in self.named_parameters()]  # a tied tensor once
        return sorted(names, key=lambda n: not n.startswith(("wte", "wpe", "lm_head")))

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        params = dict(self.named_parameters())
        for name in self.init_order():
            self.init_tensor(name, params[name], generator)
        self.reset_buffers()

    def tie_weights(self):
        """GPT-2 (or tie_embeddings=True) shares wte with the head; again after to_empty(), which unties them."""
        if self.cfg.tied:
            self.lm_head.weight = self.wte.weight

    def reset_buffers(self):
        """The RoPE tables: computed, not stored, so that a meta-device model can be materialized."""
        if self.cfg.arch != "gpt2":
            cos, sin = rope_tables(self.cfg.hd, self.cfg.block_size, self.cfg.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def forward(self, idx, targets=None):
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size={self.cfg.block_size}")
        x = self.embed(idx)
        lanes, rope, routers = None, None if self.cfg.arch == "gpt2" else (self.rope_cos, self.rope_sin), []
        for block in self.blocks:  # recompute.apply changes what a block does in a training step, not this loop
            x, lanes, router = block(x, lanes, rope)
            routers.append(router)
        logits, loss = self.head(x, targets)
        if loss is not None and self.training and self.cfg.n_expert and self.cfg.router_aux_coef:  # eval: CE alone
            loss = loss + self.cfg.router_aux_coef * moe.load_balance(routers, self.cfg.n_expert, x.shape[0] * x.shape[1] * len(routers))
        return logits, loss

    # embed and head are separate so that parallel.build_model can compile them as regions of their own when
    # recompute="crnet" | "reversible" runs the blocks through an autograd Function a whole-model compile can't trace
    def embed(self, idx):
        x = self.wte(idx)  # (B, T, h); under autocast a float32 residual stream, also where FSDP made wte bf16
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta has none (is_autocast_available: a 2.11 graph break)
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # as DDP's: its numerics, plan.py's bytes
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return F.dropout(x, self.cfg.dropout, self.training)

    def head(self, x, targets=None):
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
        return logits, F.cross_entropy(logits32.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    # ----- accounting -----
    def param_groups_by_role(self):
        """name -> role for every parameter, roles as in num_params()."""
        leaf = {"A": "low_rank", "B": "low_rank", "beta": "betas", "bias": "biases", "weight": "full_rank"}
        return {n: "embeddings" if n.startswith(("wte", "wpe")) else "lm_head" if n.startswith("lm_head") else
                "norms" if "norm" in n else leaf[n.rsplit(".", 1)[-1]] for n, _ in self.named_parameters()}

    def num_params(self):
        """Per-group parameter counts; tied weights are counted once (as embeddings)."""
        counts = dict.fromkeys(("embeddings", "lm_head", "full_rank", "low_rank", "betas", "norms", "biases"), 0)
        params = dict(self.named_parameters())  # named_parameters() yields a tied tensor once
        for name, role in self.param_groups_by_role().items():
            counts[role] += params[name].numel()
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters())
        return counts

    def flops_per_token(self):
        """Training FLOPs per token: 6 * the matmul parameters a token uses (low-rank factors, LM head, k of n_expert
        experts) + 12 * L * q_dim * T for attention (QK^T, AV as full T x T, as PaLM, nanoGPT); elementwise not counted."""
        c = self.num_params()
        n_matmul = c["full_rank"] + c["low_rank"] + self.lm_head.weight.numel()
        if self.cfg.n_expert:  # a token runs k of the n_expert experts
            experts = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n)
            n_matmul -= experts // self.cfg.n_expert * (self.cfg.n_expert - self.cfg.expert_top_k)
        return 6 * n_matmul + 12 * self.cfg.n_layer * self.cfg.q_dim * self.cfg.block_size

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; decay on weight matrices and low-rank factors, none on norms, biases, betas."""
        roles = self.param_groups_by_role()
        named = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in named.items() if roles[n] in ("embeddings", "lm_head", "full_rank", "low_rank")]
        no_decay = [p for n, p in named.items() if roles[n] in ("norms", "biases", "betas")]
        ids = [id(p) for p in decay + no_decay]
        assert len(ids) == len(set(ids)) == len(named), "every parameter must be in exactly one group"
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
