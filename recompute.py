"""
Activation recomputation for training steps, applied from outside the model (as torchtitan applies activation
checkpointing): recompute.apply(model, mode, every) changes what each block does in a training step; evaluation
and no_grad calls run the plain forward and pay nothing.

  "none":  autograd keeps every intermediate.
  "block": torch.utils.checkpoint (non-reentrant) around every block; keeps each block's input and its input
           lanes. What a user would reach for, and the paper's baseline.
  "crnet": the paper's Algorithm 1 (arXiv 2509.18993). Forward keeps only
             1. every block's input x_l                                   (h numbers per token)
             2. every low-rank intermediate Z_l^P = X_l^P A_l^P           (r per position, layers 2..L; 1 too if low-rank)
             3. the lanes Y_l of the checkpoint set (every k-th layer counted down from the last, never
                the first), plus any lane the round-off guard below decides to keep.
           Backward of block l rebuilds its own *input* lanes by inverting Eq. 6,
                Y_{l-1} = (Y_l - Z_l B_l) / s_l,
           and hands them to block l-1 through a LaneStash made per forward pass; the norms, RoPE,
           attention, residual adds and SwiGLU/GELU are replayed from x_l and the lanes. No X A or X W
           product is recomputed: the replay reuses the saved Z (KnownMatmul) and the known Y; the only
           forward matmul redone is Z B, which the inversion needs anyway. Every parameter is touched only
           inside its own block's forward and backward, so DDP hooks fire as usual and FSDP2 can gather a
           block's parameters around its own backward.

Round-off guard. A rebuilt lane carries the forward's rounding amplified by 1/|s| at every inversion:
relative error ~ eps * sum_{i=j+1..c} prod_{t=j+1..i} 1/|s_t| for layer j rebuilt from a stored layer c
(assuming lane norms of similar size, which the init makes them). Before each forward we walk the layers
top-down with the current betas and store a lane whenever that bound would exceed LANE_RTOL. For float32
lanes the budget is LANE_RTOL / eps = 84: betas near 0.7 and k = 8 stay under it (35); a |s| below
~0.012 stores the lane below it outright. For bfloat16/float16 lanes the budget is below 1, so every
lane is stored: recompute never silently degrades gradients.

This file knows a block only through what it uses: blocks[l].projections(), .forward(x, lanes, rope,
project), .layer_idx, .cfg.dropout, and each projection's kind, input_product, delta, lane_add, scale.
The stored-numbers formulas and the held-bytes counter live in plan.py, beside the planner that uses them.
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("none", "block", "crnet")
LANE_RTOL = 1e-5   # the largest relative round-off we accept in a rebuilt lane


class LaneStash:
    """Lanes of one forward pass, keyed by (layer, group): kept in forward (checkpoint set and guard),
    rebuilt in backward. A rebuilt lane is dropped once the block below has used it; stored lanes live as long as
    the autograd graph (so a retain_graph backward can run again): drop the loss after backward to free them."""

    def __init__(self, store):
        self.store = store        # set of (layer, group) whose lanes forward keeps
        self.lanes = {}
        self.dtypes = {}


def checkpoint_layers(n_layer, every):
    """0-based layers whose lanes are stored: the last, then every `every`-th below it, never the first."""
    return {n_layer - 1} | set(range(n_layer - 1, 0, -every))


def plan_stored_lanes(blocks, every, dtype):
    """The checkpoint set plus the round-off guard (module docstring), per (layer, group); dtype is the one
    the lanes are formed in. Works on FSDP2-sharded betas: each process takes min |s| over its own shard
    and one all-reduce finds the global minimum, so no block has to be gathered."""
    budget = LANE_RTOL / torch.finfo(dtype).eps
    ckpt = checkpoint_layers(len(blocks), every)
    # min |s| per (layer, group): the bound below only needs the largest 1/|s| of each group
    betas = [p.beta for blk in blocks[1:] for p in blk.projections()]
    local = [b.to_local() if hasattr(b, "to_local") else b for b in betas]  # DTensor shard, or the tensor
    min_abs = [(p.detach().abs().min() if p.numel() else p.new_tensor(float("inf"))).double() for p in local]
    min_s = torch.stack(min_abs) + blocks[1].qkv.beta_eps if betas else torch.zeros(0)  # |s| = |beta| + eps
    if betas and hasattr(betas[0], "device_mesh"):
        torch.distributed.all_reduce(min_s, op=torch.distributed.ReduceOp.MIN, group=betas[0].device_mesh.get_group())
    inv_s = (1.0 / min_s).view(-1, 4).tolist()  # one host copy of all betas per step: one GPU sync
    store = set()
    for g in range(4):
        bound = 0.0  # the round-off bound of layer l's lane if rebuilt, as we walk down
        for l in range(len(blocks) - 1, -1, -1):
            if l in ckpt:
                store.add((l, g))
                bound = 0.0
                continue
            bound = (1.0 + bound) * inv_s[l][g]  # rebuilt by inverting layer l + 1 (row l of inv_s)
            if bound > budget:
                store.add((l, g))
                bound = 0.0
    return store


class KnownMatmul(torch.autograd.Function):
    """Z = X @ W where Z is already known (saved in forward): returns Z without the matmul; the backward
    is the matmul's (dX = dZ W^T, dW = X^T dZ), computed in Z's dtype as autocast did in forward."""

    @staticmethod
    def forward(ctx, x, w, z):
        ctx.save_for_backward(x, w)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, gz):
        x, w = ctx.saved_tensors
        dt = gz.dtype
        gx = (gz @ w.to(dt).t()).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = (x.reshape(-1, x.shape[-1]).to(dt).t() @ gz.reshape(-1, gz.shape[-1])).to(w.dtype)
        return gx, gw, None


def autocast_state(device_type):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class CRNetBlock(torch.autograd.Function):
    """One block under CR-Net recomputation. Tensor inputs: x, the 4 input lanes (none for layer 1) and the
    block's parameters; outputs: x_out and the 4 output lanes. Backward returns the gradients of all inputs
    (computed by autograd on the replay), so torch.autograd.grad, gradcheck and DDP's hooks see them."""

    @staticmethod
    def forward(ctx, x, stash, block, layer, rope, n_lanes, *lanes_and_params):
        lanes, params = lanes_and_params[:n_lanes], lanes_and_params[n_lanes:]
        l = block.layer_idx
        ctx.stash, ctx.block, ctx.layer, ctx.rope, ctx.params = stash, block, layer, rope, params
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if x.is_cuda else None) if block.cfg.dropout else None
        ctx.set_materialize_grads(False)
        zs = []

        def project(proj, inp, lane):  # Eq. 6 as always, keeping Z = X A
            if proj.kind == "full":
                return proj(inp, lane)
            z = proj.input_product(inp)
            zs.append(z)
            return proj(inp, lane, z)

        with torch.autocast(x.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
            x_out, lanes_out = layer(x, lanes or None, rope, project)  # the plain forward: hooks ran outside
        for g, y in enumerate(lanes_out):
            stash.dtypes[(l, g)] = y.dtype
            if (l, g) in stash.store:
                stash.lanes[(l, g)] = y.detach()
        ctx.save_for_backward(x, *zs)
        return (x_out, *lanes_out)

    @staticmethod
    def backward(ctx, g_x, *g_lanes):
        stash, block = ctx.stash, ctx.block
        l = block.layer_idx
        x_in, *zs = ctx.saved_tensors
        # Y_l: stored (kept while the graph lives, so a retain_graph backward can run again), or rebuilt by
        # block l + 1 (dropped now: a second backward rebuilds it again)
        own = [stash.lanes[(l, g)] if (l, g) in stash.store else stash.lanes.pop((l, g)) for g in range(4)]
        leaves = []
        zs_iter = iter(zs)
        projs = block.projections()

        def project(proj, inp, lane_unused):  # replay: known Y, exact gradient, no X A / X W product
            g = projs.index(proj)
            y_known = own[g]
            if proj.kind == "full":  # CR-Net's layer 1: Y = X W (+ b), so X W is known
                xw = y_known if proj.bias is None else y_known - proj.bias.detach()
                return proj.delta(inp, KnownMatmul.apply(inp, proj.weight, xw.flatten(-2)).unflatten(-1, (proj.n, -1)))
            z = KnownMatmul.apply(inp, proj.A, next(zs_iter).flatten(-2)).unflatten(-1, (proj.n, -1))
            d = proj.delta(inp, z)  # Z B (+ b): the one forward matmul redone
            if not proj.lane_in:    # a low-rank layer 1 (first_layer="lowrank"): Y = Z B, no lane below
                return d
            prev = stash.lanes.get((l - 1, g))
            if prev is None:  # invert Eq. 6 and hand the lane to the block below
                s = proj.scale().detach().view(proj.n, 1)
                prev = torch.sub(y_known, d.detach()).div_(s).to(stash.dtypes[(l - 1, g)])
                stash.lanes[(l - 1, g)] = prev
            prev = prev.detach().requires_grad_()
            leaves.append(prev)
            return proj.lane_add(d, prev)  # = y_known up to round-off; its graph gives the gradients

        x = x_in.detach().requires_grad_()
        state = torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=ctx.rng is not None)
        with torch.enable_grad(), state, torch.autocast(x.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1])
            x_out, lanes_out = ctx.layer(x, [None] * 4 if l else None, ctx.rope, project)
        pairs = [(y, g) for y, g in zip((x_out, *lanes_out), (g_x, *g_lanes)) if g is not None]
        inputs = [x, *leaves, *ctx.params]
        wanted = [t for t in inputs if t.requires_grad]  # not frozen parameters (beta_learnable=False)
        found = iter(torch.autograd.grad([y for y, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in inputs]
        return (grads[0], None, None, None, None, None, *grads[1:])


class Recompute:
    """What apply() installs: the mode, k, and (crnet) the lane stash of the forward in flight."""

    def __init__(self, model, mode, every):
        self.blocks, self.mode, self.every, self.stash = model.blocks, mode, every, None

    def block_forward(self, block, layer, x, lanes, rope=None):
        """Replaces block.forward (inside block.__call__, so FSDP2's hooks gather the block around it)."""
        if not (block.training and torch.is_grad_enabled()):
            return layer(x, lanes, rope)  # evaluation, generation, no_grad: the plain forward
        if self.mode == "block":
            return checkpoint(layer, x, lanes, rope, use_reentrant=False)
        l = block.layer_idx
        if l == 0:
            # Round-off enters where Y_l = s Y_{l-1} + Z B is formed, in the dtype of s: at least float32
            # (Projection.scale), so bf16 parameters or autocast do not force every lane to be stored.
            beta = self.blocks[-1].qkv.beta if len(self.blocks) > 1 else x
            dtype = torch.promote_types(beta.dtype, torch.float32)
            self.stash = LaneStash(plan_stored_lanes(self.blocks, self.every, dtype))
        stash = self.stash
        if stash is None:
            raise RuntimeError("crnet recompute: a training forward must run the blocks in order from the first")
        if l == len(self.blocks) - 1:
            self.stash = None  # the autograd graph holds it now, and frees it with the graph
        lanes = lanes or ()
        x, *lanes = CRNetBlock.apply(x, stash, block, layer, rope, len(lanes), *lanes, *block.parameters())
        return x, lanes


def apply(model, mode, every=8):
    """Make model's training steps run with recomputation `mode` ("none" | "block" | "crnet"), keeping the
    lanes of every `every`-th layer (crnet). Changes model in place and returns it; call it after building the
    model and before torch.compile or sharding. Applying again replaces the earlier mode."""
    if mode not in MODES:
        raise ValueError(f"recompute={mode!r} must be one of {MODES}")
    if mode == "crnet" and model.cfg.param != "crnet":
        raise ValueError(f"recompute='crnet' inverts Eq. 6 and needs param='crnet' (got param={model.cfg.param!r}); "
                         f"use recompute='block'")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"recompute_every={every!r} must be a positive integer")
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # back to the class's plain forward
    model.recompute = (mode, every)
    if mode != "none":
        rc = Recompute(model, mode, every)
        for block in model.blocks:
            # module-level functions in a partial: copy.deepcopy copies rc and block with the model
            block.forward = functools.partial(eager_block_forward if mode == "crnet" else Recompute.block_forward,
                                              rc, block, block.forward)
    return model


# Under torch.compile a CR-Net block runs eagerly: traced by dynamo (inductor, CPU and CUDA), the replay in
# CRNetBlock's backward re-entered the compiled graph's backward and failed ("backward through the graph a second
# time"). Embeddings and head still compile, and so does every block under "block".
eager_block_forward = torch.compiler.disable(Recompute.block_forward)
