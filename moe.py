"""
Qwen-3-MoE's sparse MLP: routing, the experts and the load-balancing loss, for model.MoE (the projection group that
holds the router and the experts' parameters). Row vectors, as model.py: Y = X W.

    g = softmax(X W_router) over the n_expert experts (float32), the top k kept and (norm_topk) renormalised to 1
    D = sum_{e in top-k(x)} g_e(x) down_e(silu(gate_e(x)) * up_e(x))            each expert a SwiGLU

as transformers' Qwen3MoeSparseMoeBlock computes it (tests/test_moe.py compares logits and losses). The experts run
in a loop, the reference form: the (token, place) pairs are sorted by expert, gathered once and cut into one
contiguous piece per expert (one host sync per layer, for the piece sizes). Every expert runs every step, some on
no token, so that every parameter gets a gradient, as DDP expects. A production MoE changes how, not what: one
grouped GEMM over all experts' pieces instead of the loop (no host sync), and experts sharded over GPUs (expert
parallelism: an all-to-all sends each token to its experts' GPU and back), usually with a capacity per expert.

CR-Net. The issue is what Eq. 6's lane is when a token's experts change from layer to layer. A lane per expert
(Y_{l,e} = s Y_{l-1,e} + X A_e B_e) would be missing wherever layer l - 1 did not route the token to e. So the lane
is on the combined output, Y^moe_l = s * Y^moe_{l-1} + D_l: it exists for every token, it is what the residual
stream receives, and its cross-layer difference is what Eq. 6 models. The experts are low-rank (X A B) without
lanes of their own; the router (h x n_expert) stays full-rank. moe_lane=False is the alternative, per-expert low-rank
factors and no lane (tools/ablate.py's crnet_nolane; results/ablate_qwen3_moe_cpu.md measures both).

Under torch.compile, mix runs eagerly (the rest of a block compiles): the tokens each expert gets, hence its
shapes, change every step. Recomputation (recompute.py) keeps each layer's D, to invert Eq. 6, and the experts
chosen, so that a replay routes every token as the forward did even where a rebuilt input would tip a near-tie in
the top k.
"""
import torch
import torch.nn.functional as F


def route(x, router, top_k, norm_topk, idx=None):
    """x (N, h) -> router probabilities (N, E) in float32, the k experts of each token (N, k), chosen by top-k unless
    given, and their weights g (N, k)."""
    probs = F.softmax(x @ router, -1, dtype=torch.float32)
    idx = probs.topk(top_k, -1).indices if idx is None else idx
    g = probs.gather(-1, idx)
    return probs, idx, g / g.sum(-1, keepdim=True) if norm_topk else g


@torch.compiler.disable  # the experts' shapes follow the routing: a graph would re-specialize on every expert and step
def mix(x, router, experts, top_k, norm_topk, idx=None):
    """x (B, T, h) -> D (B, T, 1, h), the router's statistics (2, E) for load_balance (tokens routed to each expert,
    the probability mass it got), and the experts chosen (B, T, k). experts: {"up": gate and up (B, T, 2, ff),
    "down"} projection pairs, called on (1, n_e, h)."""
    flat = x.flatten(0, 1)
    probs, idx, g = route(flat, router, top_k, norm_topk, None if idx is None else idx.flatten(0, 1))
    order = idx.flatten().argsort(stable=True)  # the N k (token, place) pairs, sorted by expert
    counts = torch.bincount(idx.flatten(), minlength=len(experts))
    ys = []
    for expert, xe in zip(experts, flat[order // top_k].split(counts.tolist())):  # one gather, one host sync
        y_up = expert["up"](xe[None])  # (1, n_e, 2, ff)
        ys.append(expert["down"](F.silu(y_up[:, :, 0]) * y_up[:, :, 1])[0, :, 0])  # (n_e, h)
    y = torch.cat(ys)[order.argsort()].view(*idx.shape, -1)  # (N, k, h): each token's k expert outputs, in place
    d = torch.einsum("nk,nkh->nh", g.to(y.dtype), y)
    stats = torch.stack([counts.to(probs.dtype), probs.sum(0)])
    return d.view(*x.shape[:2], 1, -1), stats, idx.view(*x.shape[:2], -1)


def load_balance(stats, n_expert, rows):
    """Switch Transformer's load-balancing loss over all layers at once, as HF's load_balancing_loss_func:
    E * sum_e f_e P_e, f_e the share of the (layer, token) rows routed to expert e (k per row), P_e its mean
    probability. stats: each layer's (2, E) from mix; rows: layers x tokens."""
    counts, mass = torch.stack(stats).sum(0)
    return n_expert * (counts / rows * mass / rows).sum()
