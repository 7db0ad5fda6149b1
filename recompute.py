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
  "reversible": goes beyond the paper (apply(model, "reversible", every, keep_z)). Algorithm 1 still keeps one
           x_l per layer, and that is most of what it keeps. But a block only *adds* to the residual stream, and
           what it adds are its own lanes: x_l = x_{l+1} - drop(Y^down_l) - drop(Y^o_l) (biases are inside Y).
           Block l's backward has Y_l anyway (stored, or rebuilt by block l+1), so it takes x_{l+1} from the
           block above and subtracts: a subtraction, never a division, so the stream's round-off is not
           amplified. Block inputs are then kept only where lanes are, at the checkpoint set. Dropout masks are
           redrawn from the RNG states saved just before each residual dropout, so they are the forward's.
           keep_z=False also drops Z: given x_l and Y_l, every projection input of block l (norm of x_l,
           attention of Y^qkv_l, norm of x_l + drop(Y^o_l), activation of Y^up_l) is computable without layer
           l-1, so backward redoes X A (one matmul per projection) and memory grows with L/k, not L. A
           recomputed Z is only as exact as its input, which is now itself rebuilt; the guard below accounts
           for that, and where Z is formed in a dtype coarser than the lanes (bf16 autocast or parameters) a
           rebuilt input would flip its roundings, so Z is kept there whatever keep_z says.

Round-off guard. A rebuilt lane carries the forward's rounding amplified by 1/|s| at every inversion:
relative error ~ eps * sum_{i=j+1..c} prod_{t=j+1..i} 1/|s_t| for layer j rebuilt from a stored layer c
(assuming lane norms of similar size, which the init makes them). Before each forward we walk the layers
top-down with the current betas and store a lane whenever that bound would exceed LANE_RTOL. For float32
lanes the budget is LANE_RTOL / eps = 84: betas near 0.7 and k = 8 stay under it (35); a |s| below
~0.012 stores the lane below it outright. For bfloat16/float16 lanes the budget is below 1, so every
lane is stored: recompute never silently degrades gradients. "reversible" adds the stream to the walk as a
fifth group with s = 1: x_l inherits x_{l+1}'s error, one rounding, and the errors of the two lanes it
subtracts (assumed no larger than x, as at init), and is stored when that exceeds the budget. A recomputed Z
(keep_z=False) adds its input's error to each inversion that uses it. Where the stream itself is formed below
float32 (bf16 parameters: layer 1's output is bf16), one inversion is already over budget, so the block input
is stored there (checked per block in forward, where the dtype is known). The budget is apply's rtol
(train.py's recompute_rtol, default LANE_RTOL). The bound assumes the worst case, yet it is not loose by much:
at h=1024, L=16, k=8 (bench.py recompute), reversible keep_z=False storing the checkpoint set alone (rtol=1)
has 10-12x the gradient error of the guarded plan, 5e-5 to 1e-4 relative instead of under 1e-5.

This file knows a block only through what it uses: blocks[l].projections(), .forward(x, lanes, rope,
project), .layer_idx, .cfg.dropout, .o, .down, and each projection's kind, input_product, delta, lane_add, scale.
The stored-numbers formulas and the held-bytes counter live in plan.py, beside the planner that uses them.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MODES = ("none", "block", "crnet", "reversible")
LANE_RTOL = 1e-5   # the largest relative round-off we accept in a rebuilt lane (or block input)
X = 4              # the stash's group index of the block input x_l ("reversible"), after the 4 lane groups


class LaneStash:
    """Lanes (and, reversible, block inputs as group X) of one forward pass, keyed by (layer, group): kept in
    forward (checkpoint set and guard), rebuilt in backward. A rebuilt one is dropped once the block below has
    used it; stored ones live as long as the autograd graph (so a retain_graph backward can run again): drop the
    loss after backward to free them."""

    def __init__(self, store, stream=False, keep_z=True, eps=0.0):
        self.store = store        # set of (layer, group) whose lanes (inputs) forward keeps
        self.stream, self.keep_z, self.eps = stream, keep_z, eps  # eps: the precision the plan assumed
        self.lanes = {}
        self.dtypes = {}


def checkpoint_layers(n_layer, every):
    """0-based layers whose lanes are stored: the last, then every `every`-th below it, never the first."""
    return {n_layer - 1} | set(range(n_layer - 1, 0, -every))


def plan_stored_lanes(blocks, every, dtype, stream=False, keep_z=True, rtol=LANE_RTOL):
    """The checkpoint set plus the round-off guard (module docstring), per (layer, group); dtype is the one
    the lanes are formed in. stream=True (reversible) plans the block inputs too, as group X; keep_z=False
    counts the error a recomputed Z inherits from its input. Works on FSDP2-sharded betas: each process takes
    min |s| over its own shard and one all-reduce finds the global minimum, so no block has to be gathered."""
    budget = rtol / torch.finfo(dtype).eps
    ckpt = checkpoint_layers(len(blocks), every)
    # min |s| per (layer, group): the bound below only needs the largest 1/|s| of each group
    betas = [p.beta for blk in blocks[1:] for p in blk.projections()]
    local = [b.to_local() if hasattr(b, "to_local") else b for b in betas]  # DTensor shard, or the tensor
    min_abs = [(p.detach().abs().min() if p.numel() else p.new_tensor(float("inf"))).double() for p in local]
    min_s = torch.stack(min_abs) + blocks[1].qkv.beta_eps if betas else torch.zeros(0)  # |s| = |beta| + eps
    if betas and hasattr(betas[0], "device_mesh"):
        torch.distributed.all_reduce(min_s, op=torch.distributed.ReduceOp.MIN, group=betas[0].device_mesh.get_group())
    inv_s = (1.0 / min_s).view(-1, 4).tolist()  # one host copy of all betas per step: one GPU sync
    groups = range(5 if stream else 4)
    store, b = set(), [0.0] * 5  # b: round-off bounds (in eps) of layer l's lanes and input if rebuilt
    for l in range(len(blocks) - 1, -1, -1):
        if l in ckpt:
            store |= {(l, g) for g in groups}
            b = [0.0] * 5
            continue
        # layer l's lanes are rebuilt by inverting layer l + 1 (row l of inv_s) with its Z: kept, or recomputed
        # from layer l + 1's inputs (x; attention of Y^qkv; x + drop(Y^o); act of Y^up), inheriting their error
        inputs = [0.0] * 4 if keep_z else [b[X], b[0], b[X] + b[1], b[2]]
        b[:4] = [(1.0 + e + bound) * s for e, bound, s in zip(inputs, b, inv_s[l])]
        b[X] += 1.0  # x_l = x_{l+1} - drop(Y^down_l) - drop(Y^o_l): one rounding, plus those lanes' errors below
        for g in groups:
            b[X] += b[g] if g in (1, 3) and (l, g) not in store and b[g] <= budget else 0.0
            if b[g] > budget:
                store.add((l, g))
                b[g] = 0.0
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


def rng_state(x):
    return torch.get_rng_state(), torch.cuda.get_rng_state() if x.is_cuda else None


@contextlib.contextmanager
def replaying(x, state):
    """Run with the RNG at `state`, as the forward was (None: the RNG untouched), and put it back after."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=state is not None):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1])
        yield


class CRNetBlock(torch.autograd.Function):
    """One block under CR-Net recomputation ("crnet" or "reversible", as the stash says). Tensor inputs: x, the
    4 input lanes (none for layer 1) and the block's parameters; outputs: x_out and the 4 output lanes.
    Backward returns the gradients of all inputs (computed by autograd on the replay), so torch.autograd.grad,
    gradcheck and DDP's hooks see them."""

    @staticmethod
    def forward(ctx, x, stash, block, layer, rope, n_lanes, *lanes_and_params):
        lanes, params = lanes_and_params[:n_lanes], lanes_and_params[n_lanes:]
        l = block.layer_idx
        ctx.stash, ctx.block, ctx.layer, ctx.rope, ctx.params = stash, block, layer, rope, params
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = rng_state(x) if block.cfg.dropout else None
        ctx.drop_rng = {}  # reversible: the RNG states just before drop(Y^o) and drop(Y^down)
        ctx.set_materialize_grads(False)
        zs = []

        def project(proj, inp, lane):  # Eq. 6 as always, keeping Z = X A
            if ctx.rng is not None and stash.stream and proj in (block.o, block.down):
                ctx.drop_rng[proj] = rng_state(x)  # nothing random runs between here and that dropout
            if proj.kind == "full" or not stash.keep_z:
                return proj(inp, lane)
            z = proj.input_product(inp)
            zs.append(z)
            return proj(inp, lane, z)

        with torch.autocast(x.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
            x_out, lanes_out = layer(x, lanes or None, rope, project)  # the plain forward: hooks ran outside
        for g, y in enumerate((*lanes_out, x) if stash.stream else lanes_out):
            stash.dtypes[(l, g)] = y.dtype
            if g == X and torch.finfo(x_out.dtype).eps > stash.eps:  # the stream is coarser than the plan
                stash.store.add((l, X))
            if (l, g) in stash.store:
                stash.lanes[(l, g)] = y.detach()
        ctx.save_for_backward(*zs) if stash.stream else ctx.save_for_backward(x, *zs)
        return (x_out, *lanes_out)

    @staticmethod
    def backward(ctx, g_x, *g_lanes):
        stash, block = ctx.stash, ctx.block
        l = block.layer_idx
        # Y_l (and x_l): stored (kept while the graph lives, so a retain_graph backward can run again), or rebuilt
        # by block l + 1 (dropped now: a second backward rebuilds it again)
        take = lambda key: stash.lanes[key] if key in stash.store else stash.lanes.pop(key, None)
        own = [take((l, g)) for g in range(4)]
        if stash.stream:
            zs, x_above = ctx.saved_tensors, take((l + 1, X))
            x_in = take((l, X)) if (l, X) in stash.store else invert_stream(ctx, x_above, own)
            if l:
                stash.lanes[(l, X)] = x_in  # for block l - 1
        else:
            x_in, *zs = ctx.saved_tensors
        leaves = []
        zs_iter = iter(zs)
        projs = block.projections()

        def project(proj, inp, lane_unused):  # replay: known Y, exact gradient, no X W product
            g = projs.index(proj)
            y_known = own[g]
            if proj.kind == "full":  # CR-Net's layer 1: Y = X W (+ b), so X W is known
                xw = y_known if proj.bias is None else y_known - proj.bias.detach()
                return proj.delta(inp, KnownMatmul.apply(inp, proj.weight, xw.flatten(-2)).unflatten(-1, (proj.n, -1)))
            if stash.keep_z:
                z = KnownMatmul.apply(inp, proj.A, next(zs_iter).flatten(-2)).unflatten(-1, (proj.n, -1))
            else:
                z = proj.input_product(inp)  # keep_z=False: the one X A product redone
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
        with torch.enable_grad(), replaying(x, ctx.rng), torch.autocast(x.device.type, enabled=ctx.autocast[0],
                                                                         dtype=ctx.autocast[1]):
            x_out, lanes_out = ctx.layer(x, [None] * 4 if l else None, ctx.rope, project)
        pairs = [(y, g) for y, g in zip((x_out, *lanes_out), (g_x, *g_lanes)) if g is not None]
        inputs = [x, *leaves, *ctx.params]
        wanted = [t for t in inputs if t.requires_grad]  # not frozen parameters (beta_learnable=False)
        found = iter(torch.autograd.grad([y for y, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in inputs]
        return (grads[0], None, None, None, None, None, *grads[1:])


def invert_stream(ctx, x_above, own):
    """Block l's input from its output: x_l = (x_{l+1} - drop(Y^down_l)) - drop(Y^o_l), undoing the forward's
    two adds in reverse order with the forward's dropout masks."""
    block, y_o, y_down = ctx.block, own[1], own[3]
    drop = lambda y: F.dropout(y[:, :, 0], block.cfg.dropout, block.training)
    with replaying(x_above, ctx.drop_rng.get(block.down)):
        x_mid = x_above - drop(y_down)
    with replaying(x_above, ctx.drop_rng.get(block.o)):
        x = x_mid - drop(y_o)
    return x.to(ctx.stash.dtypes[(block.layer_idx, X)])


class Recompute:
    """What apply() installs: the mode, k, keep_z and (crnet, reversible) the lane stash of the forward in flight."""

    def __init__(self, model, mode, every, keep_z=True, rtol=LANE_RTOL):
        self.blocks, self.mode, self.every, self.keep_z, self.rtol, self.stash = model.blocks, mode, every, keep_z, rtol, None

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
            # Z is formed in autocast's dtype, else in the parameters' (as x_0, the embedding, is): if that is
            # coarser, a Z recomputed from a rebuilt input would not be the forward's, so keep it
            on, ac_dtype = autocast_state(x.device.type)
            z_eps = torch.finfo(ac_dtype if on else x.dtype).eps
            keep_z = self.keep_z or z_eps > torch.finfo(dtype).eps
            stream = self.mode == "reversible"
            self.stash = LaneStash(plan_stored_lanes(self.blocks, self.every, dtype, stream, keep_z, self.rtol), stream,
                                   keep_z, torch.finfo(dtype).eps)
        stash = self.stash
        if stash is None:
            raise RuntimeError(f"{self.mode} recompute: a training forward must run the blocks in order from the first")
        if l == len(self.blocks) - 1:
            self.stash = None  # the autograd graph holds it now, and frees it with the graph
        lanes = lanes or ()
        x, *lanes = CRNetBlock.apply(x, stash, block, layer, rope, len(lanes), *lanes, *block.parameters())
        return x, lanes


def apply(model, mode, every=8, keep_z=True, rtol=LANE_RTOL):
    """Make model's training steps run with recomputation `mode` ("none" | "block" | "crnet" | "reversible"),
    keeping the lanes of every `every`-th layer (crnet, reversible) and, reversible with keep_z=False, no Z.
    rtol is the round-off guard's budget (module docstring): larger stores fewer lanes beyond the checkpoint set.
    Changes model in place and returns it; call it after building the model and before torch.compile or
    sharding. Applying again replaces the earlier mode."""
    if mode not in MODES:
        raise ValueError(f"recompute={mode!r} must be one of {MODES}")
    if mode in ("crnet", "reversible") and model.cfg.param != "crnet":
        raise ValueError(f"recompute={mode!r} inverts Eq. 6 and needs param='crnet' (got param={model.cfg.param!r}); "
                         f"use recompute='block'")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"recompute_every={every!r} must be a positive integer")
    if not isinstance(keep_z, bool) or (not keep_z and mode != "reversible"):
        raise ValueError(f"keep_z={keep_z!r} must be True or False, and False only with recompute='reversible'")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"recompute_rtol={rtol!r} must be a positive number")
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # back to the class's plain forward
    # apply(model, *model.recompute) applies it again; the defaults are left out
    model.recompute = (mode, every, keep_z, rtol)[:4 if rtol != LANE_RTOL else 2 if keep_z else 3]
    if mode != "none":
        rc = Recompute(model, mode, every, keep_z, rtol)
        for block in model.blocks:
            # module-level functions in a partial: copy.deepcopy copies rc and block with the model
            block.forward = functools.partial(Recompute.block_forward if mode == "block" else eager_block_forward,
                                              rc, block, block.forward)
    return model


# Under torch.compile a CR-Net block runs eagerly: traced by dynamo (inductor, CPU and CUDA), the replay in
# CRNetBlock's backward re-entered the compiled graph's backward and failed ("backward through the graph a second
# time"). Embeddings and head still compile, and so does every block under "block".
eager_block_forward = torch.compiler.disable(Recompute.block_forward)
