"""
Activation recomputation for training steps, applied from outside the model (as torchtitan applies activation
checkpointing): recompute.apply(model, mode, every) changes what each block does in a training step; evaluation
and no_grad calls run the plain forward and pay nothing.

  "none":  autograd keeps every intermediate.
  "block": torch.utils.checkpoint (non-reentrant) around every block; keeps each block's input and its input
           lanes. What a user would reach for, and the paper's baseline.
  "crnet": the paper's Algorithm 1 (arXiv 2509.18993), all of it in CRNetBlock below:
             forward, block l:   run the block; keep x_l, every Z_l = X A, and the lanes Y_l if l is in the
                                 checkpoint set (every k-th layer counted down from the last, never the first)
                                 or the round-off guard below asks for them
             backward, block l:  Y_l is kept, or was handed down by block l + 1
                                 Y_{l-1} = (Y_l - Z_l B_l - b_l) / s_l      Eq. 6 inverted; handed to block l - 1
                                 replay block l from x_l, Y_{l-1}, Z_l and backpropagate through the replay
           The replay redoes no matmul: X A is the kept Z and Z B the product the inversion just formed (both
           enter through Known, whose backward is the matmul's); norms, RoPE, attention and SwiGLU/GELU are
           recomputed. Every parameter is touched only inside its own block's forward and backward, so DDP hooks
           fire as usual and FSDP2 can gather a block's parameters around its own backward.
  "reversible": goes beyond the paper (apply(model, "reversible", every, keep_z)). Algorithm 1 still keeps one
           x_l per layer, and that is most of what it keeps. But a block only *adds* to the residual stream, and
           what it adds are its own lanes: x_l = x_{l+1} - drop(Y^down_l) - drop(Y^o_l) (biases are inside Y).
           Block l's backward has Y_l anyway, so it takes x_{l+1} from the block above and subtracts: never a
           division, so the stream's round-off is not amplified. Block inputs are then kept only where lanes are,
           at the checkpoint set. Dropout masks are redrawn from the RNG states saved before each residual
           dropout. keep_z=False also drops Z: given x_l and Y_l every projection input of block l is computable
           without layer l - 1, so backward forms X A again first (recompute_z) and memory grows with L/k, not L.
           A recomputed Z is only as exact as its input, which is itself rebuilt; the guard accounts for that, and
           where Z is formed in a dtype coarser than the lanes (bf16) Z is kept whatever keep_z says.

Lanes are float32 under "crnet" and "reversible" (apply sets Projection.lane_dtype): the inversion divides by s.

Round-off guard. A rebuilt lane carries the forward's rounding amplified by 1/|s| at every inversion:
relative error ~ eps * sum_{i=j+1..c} prod_{t=j+1..i} 1/|s_t| for layer j rebuilt from a stored layer c
(assuming lane norms of similar size, which the init makes them). Before each forward we walk the layers
top-down with the betas and store a lane whenever that bound would exceed the budget rtol / eps (84 in float32
at rtol = LANE_RTOL: betas near 0.7 and k = 8 stay under it at 35; a |s| below ~0.012 stores the lane below it
outright; in bf16 the budget is below 1, so every lane would be stored). "reversible" adds the stream as a fifth
group with s = 1 (x_l inherits x_{l+1}'s error, one rounding, and the errors of the two lanes it subtracts); a
recomputed Z adds its input's error; a stream formed below float32 (bf16 parameters) stores the block input. The
bound assumes the worst case, yet it is not loose by much: at h=1024, L=16, k=8 (bench.py recompute),
reversible keep_z=False storing the checkpoint set alone has 10-12x the gradient error of the guarded plan.
On CUDA the walk uses the betas of the previous forward, each |s| lowered by BETA_DRIFT (more than an AdamW step
moves a beta at lr <= 1e-2), read from a copy started a step earlier: no step waits on the GPU for the plan.

Compiled (apply(..., compile=True), what train.py's compile=True does): CRNetBlock stays a thin eager
autograd.Function (a Function that hands lanes between blocks through a Python stash cannot be traced), and its
bodies forward_body, invert_lanes, recompute_z and replay are torch.compile'd: pure functions of the block and
tensors, so one graph serves every layer of a kind (layer 1; layer 2, whose input lanes have layer 1's layout;
layers 3..L). The forward body runs under no_grad,
so its graph saves nothing for backward; the replay's graph saves what its own backward, run at once, needs. So
the held bytes are those of the eager Function (tests/test_recompute.py counts them under inductor). With
dropout the bodies stay eager: a compiled graph draws its own random numbers, which a replay would not redraw.

This file knows a block only through blocks[l].projections(), its class's forward(x, lanes, rope, project),
.layer_idx, .cfg.dropout, .o, .down, and each projection's kind, lane_in, bias, weight/A/B, input_product,
output_product, lane_add and scale. The stored-numbers formulas and the held-bytes counter live in plan.py.
"""
import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MODES = ("none", "block", "crnet", "reversible")
LANE_RTOL = 1e-5   # the largest relative round-off we accept in a rebuilt lane (or block input)
BETA_DRIFT = 0.02  # CUDA: how far |s| may have moved since the betas the plan read (one optimizer step: AdamW
                   # moves a parameter by at most ~1.2 lr at beta2 = 0.95; checked one step late, see new_stash)
STREAM = 4         # the stash's group of the block input x_l ("reversible"), after the 4 lane groups


class LaneStash:
    """Lanes (and, reversible, block inputs as group STREAM) of one forward pass, keyed by (layer, group): kept in
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


def min_scales(blocks):
    """min |s| per (layer 2..L, group) as one device tensor (L - 1, 4). Works on FSDP2-sharded betas: each process
    takes the minimum over its own shard and one all-reduce finds the global one, so no block is gathered."""
    betas = [p.beta for blk in blocks[1:] for p in blk.projections()]
    if not betas:
        return torch.zeros(0, 4, dtype=torch.float64)
    local = [b.to_local() if hasattr(b, "to_local") else b for b in betas]  # DTensor shard, or the tensor
    # an empty shard (FSDP2 on more processes than a beta has entries) gives inf, made on the device: new_tensor
    # would copy from the host and wait
    mins = [p.detach().abs().min().double() if p.numel() else p.new_full((), float("inf"), dtype=torch.float64)
            for p in local]
    min_s = torch.stack(mins) + blocks[1].qkv.beta_eps  # |s| = |beta| + eps
    if hasattr(betas[0], "device_mesh"):
        torch.distributed.all_reduce(min_s, op=torch.distributed.ReduceOp.MIN, group=betas[0].device_mesh.get_group())
    return min_s.view(-1, 4)


def plan_stored_lanes(blocks, every, dtype, stream=False, keep_z=True, rtol=LANE_RTOL, inv_s=None, store=()):
    """The checkpoint set plus the round-off guard (module docstring), per (layer, group); dtype is the one the
    lanes are formed in. stream=True (reversible) plans the block inputs too, as group STREAM; keep_z=False
    counts the error a recomputed Z inherits from its input. inv_s: 1/|s| per (layer 2..L, group) as host
    numbers (default: read from blocks now, one host sync); store: (layer, group)s already kept, so that
    plan_stored_lanes(..., store=P) == P says plan P is safe for these betas."""
    budget = rtol / torch.finfo(dtype).eps
    inv_s = (1.0 / min_scales(blocks)).tolist() if inv_s is None else inv_s
    ckpt = checkpoint_layers(len(blocks), every)
    groups = range(5 if stream else 4)
    store, b = set(store), [0.0] * 5  # b: round-off bounds (in eps) of layer l's lanes and input if rebuilt
    for l in range(len(blocks) - 1, -1, -1):
        if l in ckpt:
            store |= {(l, g) for g in groups}
            b = [0.0] * 5
            continue
        # layer l's lanes are rebuilt by inverting layer l + 1 (row l of inv_s) with its Z: kept, or recomputed
        # from layer l + 1's inputs (x; attention of Y^qkv; x + drop(Y^o); act of Y^up), inheriting their error
        inputs = [0.0] * 4 if keep_z else [b[STREAM], b[0], b[STREAM] + b[1], b[2]]
        b[:4] = [(1.0 + e + bound) * s for e, bound, s in zip(inputs, b, inv_s[l])]
        b[STREAM] += 1.0  # x_l = x_{l+1} - drop(Y^down_l) - drop(Y^o_l): one rounding, plus those lanes' errors
        for g in groups:
            b[STREAM] += b[g] if g in (1, 3) and (l, g) not in store and b[g] <= budget else 0.0
            if b[g] > budget or (l, g) in store:
                store.add((l, g))
                b[g] = 0.0
    return store


class Known(torch.autograd.Function):
    """a @ b where the product ab is already known: returns it without the matmul; the backward is the matmul's
    (da = g b^T, db = a^T g), in the product's dtype, as autocast ran it in forward. a (..., k) @ b (k, m), or
    Z (B, T, n, r) @ B (n, r, h_out) per projection (n = 1 through the 2-D path, which keeps DDP's strides)."""

    @staticmethod
    def forward(ctx, a, b, ab):
        ctx.save_for_backward(a, b)
        return ab.view_as(ab)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        a_, b_ = a.to(g.dtype), b.to(g.dtype)
        if b.dim() == 3 and b.shape[0] > 1:
            ga = torch.einsum("btnh,nrh->btnr", g, b_) if ctx.needs_input_grad[0] else None
            gb = torch.einsum("btnr,btnh->nrh", a_, g)
        else:
            w, g2 = b_.reshape(b.shape[-2:]), g.reshape(-1, g.shape[-1])
            ga = (g2 @ w.t()).view(a.shape) if ctx.needs_input_grad[0] else None
            gb = (a_.reshape(-1, a.shape[-1]).t() @ g2).view(b.shape)
        return None if ga is None else ga.to(a.dtype), gb.to(b.dtype), None


# ----------------------------------------------------------------------------- the bodies (compiled under compile)
def forward_body(block, x, lanes, rope, keep_z, drop_rng=None):
    """Block l's plain forward, also returning each Z = X A it formed (keep_z). drop_rng (reversible with
    dropout): a dict that gets the RNG state just before each residual dropout."""
    zs = []

    def project(proj, inp, lane):
        if drop_rng is not None and proj in (block.o, block.down):
            drop_rng[proj] = rng_state(inp)  # nothing random runs between here and that dropout
        if proj.kind == "full" or not keep_z:
            return proj(inp, lane)
        zs.append(proj.input_product(inp))
        return proj(inp, lane, zs[-1])

    x_out, lanes_out = type(block).forward(block, x, lanes, rope, project)
    return x_out, lanes_out, zs


def recompute_z(block, x, own, rope):
    """keep_z=False: block l's Z = X A formed again from x_l and its own lanes Y_l, which give every projection's
    input without layer l - 1 (the layer's outputs are its lanes)."""
    zs, outputs = [], iter(own)

    def project(proj, inp, lane):
        if proj.kind != "full":
            zs.append(proj.input_product(inp))
        return next(outputs)

    type(block).forward(block, x, None, rope, project)
    return zs


def invert_lanes(block, zs, own, dtypes):
    """Eq. 6 inverted, per projection of block l: the product P the forward formed (Z B, or for layer 1, which has
    no lane in, Y - b itself: X W or Z B) and the lane below, Y_{l-1} = (Y_l - P - b) / s, in dtypes[g] (None: the
    lane below is stored, and not rebuilt)."""
    products, below, zs = [], [], iter(zs)
    for proj, y, dtype in zip(block.projections(), own, dtypes):
        z = next(zs) if proj.kind != "full" else None
        if not proj.lane_in:
            products.append(y if proj.bias is None else y - proj.bias.to(y.dtype))
            below.append(None)
            continue
        p = proj.output_product(z)
        d = p if proj.bias is None else p + proj.bias.to(p.dtype)  # as Projection.delta formed it
        products.append(p)
        below.append(None if dtype is None else torch.sub(y, d).div_(proj.scale().view(proj.n, 1)).to(dtype))
    return products, below


def replay(block, x, lanes, rope, zs, products):
    """Block l's forward from x_l and its input lanes, with every matmul product given (Known): the kept Z = X A
    and the products P of invert_lanes. Its autograd graph gives block l's gradients."""
    zs, products = iter(zs), iter(products)

    def project(proj, inp, lane):
        w = proj.weight if proj.kind == "full" else proj.A
        xa = Known.apply(inp, w, (next(products) if proj.kind == "full" else next(zs)).flatten(-2))
        xa = xa.unflatten(-1, (proj.n, -1))
        d = xa if proj.kind == "full" else Known.apply(xa, proj.B, next(products))
        if proj.bias is not None:
            d = d + proj.bias.to(d.dtype)
        elif not proj.lane_in and torch.compiler.is_compiling():  # layer 1's output, a view of an input (the known
            d = d.clone()  # product): a compiled graph rebuilds such an output outside the graph, losing its gradient
        return proj.lane_add(d, lane) if proj.lane_in else d

    return type(block).forward(block, x, lanes, rope, project)


def plain_forward(block, x, lanes, rope):
    """Evaluation under compile: a code object of its own, so its graphs do not count against forward_body's."""
    return type(block).forward(block, x, lanes, rope)


BODIES = {f.__name__: f for f in (forward_body, recompute_z, invert_lanes, replay, plain_forward)}


# ----------------------------------------------------------------------------- Algorithm 1
def autocast_state(device_type):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def rng_state(x):
    return torch.get_rng_state(), torch.cuda.get_rng_state() if x.is_cuda else None


@contextlib.contextmanager
def replaying(x, state, autocast):
    """Run with the RNG at `state`, as the forward was (None: the RNG untouched), and the forward's autocast."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=state is not None), \
            torch.autocast(x.device.type, enabled=autocast[0], dtype=autocast[1]):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1])
        yield


class CRNetBlock(torch.autograd.Function):
    """Algorithm 1 for one block ("crnet" or "reversible", as the stash says). Tensor inputs: x, the 4 input lanes
    (none for layer 1) and the block's parameters; outputs: x_out and the 4 output lanes. Backward returns the
    gradients of all inputs (autograd on the replay), so torch.autograd.grad, gradcheck and DDP's hooks see them."""

    @staticmethod
    def forward(ctx, x, stash, run, block, rope, n_lanes, *lanes_and_params):
        l = block.layer_idx
        lanes, ctx.params = lanes_and_params[:n_lanes], lanes_and_params[n_lanes:]
        ctx.run, ctx.stash, ctx.block, ctx.rope = run, stash, block, rope
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = rng_state(x) if block.cfg.dropout else None
        ctx.drop_rng = {} if ctx.rng is not None and stash.stream else None  # RNG before drop(Y^o), drop(Y^down)
        ctx.set_materialize_grads(False)
        x_out, lanes_out, zs = run.body("forward_body")(block, x, lanes or None, rope, stash.keep_z, ctx.drop_rng)
        # keep: Z, x_l ("crnet"; "reversible" rebuilds it), and the lanes (inputs) the plan stores
        for g, y in enumerate((*lanes_out, x) if stash.stream else lanes_out):
            stash.dtypes[(l, g)] = y.dtype
            if g == STREAM and torch.finfo(x_out.dtype).eps > stash.eps:  # the stream is coarser than the plan
                stash.store.add((l, STREAM))
            if (l, g) in stash.store:
                stash.lanes[(l, g)] = y.detach()
        ctx.save_for_backward(*zs) if stash.stream else ctx.save_for_backward(x, *zs)
        return (x_out, *lanes_out)

    @staticmethod
    def backward(ctx, g_x, *g_lanes):
        stash, block, run = ctx.stash, ctx.block, ctx.run
        l = block.layer_idx
        # Y_l (and x_l): stored (kept while the graph lives, so a retain_graph backward can run again), or rebuilt
        # by block l + 1 (dropped now: a second backward rebuilds it again)
        take = lambda key: stash.lanes[key] if key in stash.store else stash.lanes.pop(key, None)
        own = [take((l, g)) for g in range(4)]
        if stash.stream:
            zs = ctx.saved_tensors
            x_in = take((l, STREAM)) if (l, STREAM) in stash.store else invert_stream(ctx, take((l + 1, STREAM)), own)
            if l:
                stash.lanes[(l, STREAM)] = x_in  # for block l - 1
        else:
            x_in, *zs = ctx.saved_tensors
        with torch.no_grad(), replaying(x_in, ctx.rng, ctx.autocast):
            if not stash.keep_z:
                zs = run.body("recompute_z")(block, x_in, own, ctx.rope)
            rebuild = [None if (l - 1, g) in stash.store else stash.dtypes.get((l - 1, g)) for g in range(4)]
            products, below = run.body("invert_lanes")(block, zs, own, rebuild)
        leaves = []
        for g, y in enumerate(below if l else ()):  # Y_{l-1}: stored where the plan kept it, else rebuilt, handed down
            y = stash.lanes[(l - 1, g)] if y is None else stash.lanes.setdefault((l - 1, g), y)
            leaves.append(y.detach().requires_grad_())
        x = x_in.detach().requires_grad_()
        with torch.enable_grad(), replaying(x, ctx.rng, ctx.autocast):
            x_out, lanes_out = run.body("replay")(block, x, leaves or None, ctx.rope, zs, products)
        pairs = [(y, g) for y, g in zip((x_out, *lanes_out), (g_x, *g_lanes)) if g is not None]
        inputs = [x, *leaves, *ctx.params]
        wanted = [t for t in inputs if t.requires_grad]  # not frozen parameters (beta_learnable=False)
        found = iter(torch.autograd.grad([y for y, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in inputs]
        return (grads[0], None, None, None, None, None, *grads[1:])


def invert_stream(ctx, x_above, own):
    """Block l's input from its output: x_l = (x_{l+1} - drop(Y^down_l)) - drop(Y^o_l), undoing the forward's
    two adds in reverse order with the forward's dropout masks."""
    block, y_o, y_down, rngs = ctx.block, own[1], own[3], ctx.drop_rng or {}
    drop = lambda y: F.dropout(y[:, :, 0], block.cfg.dropout, block.training)
    with replaying(x_above, rngs.get(block.down), (False, None)):
        x_mid = x_above - drop(y_down)
    with replaying(x_above, rngs.get(block.o), (False, None)):
        x = x_mid - drop(y_o)
    return x.to(ctx.stash.dtypes[(block.layer_idx, STREAM)])


class Recompute:
    """What apply() installs: the mode, k, keep_z, rtol, the compiled bodies and (crnet, reversible) the lane
    stash of the forward in flight."""

    def __init__(self, model, mode, every, keep_z=True, rtol=LANE_RTOL, compile=False):
        self.blocks, self.mode, self.every, self.keep_z, self.rtol = model.blocks, mode, every, keep_z, rtol
        self.compile, self.compiled, self.stash, self.pending, self.last_plan = compile, {}, None, None, None

    def body(self, name):
        """A body of Algorithm 1: compiled (once per process; dynamo keeps one graph per block kind), or eager."""
        if not self.compile or self.blocks[0].cfg.dropout:
            return BODIES[name]
        if name not in self.compiled:
            self.compiled[name] = torch.compile(BODIES[name])
        return self.compiled[name]

    def inv_scales(self):
        """(1/|s| per (layer 2..L, group) for the plan, 1/|s| of the previous forward exactly or None), as host
        numbers. On CUDA without waiting for the GPU: the betas of the previous forward, copied to the host since,
        each |s| lowered by BETA_DRIFT."""
        min_s = min_scales(self.blocks)
        if min_s.device.type != "cuda":
            return (1.0 / min_s).tolist(), None
        with torch.cuda.device(min_s.device):  # the copy and its event on the betas' device's stream
            host = torch.empty(min_s.shape, dtype=min_s.dtype, pin_memory=True).copy_(min_s, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        previous, self.pending = self.pending, (host, done)
        if previous is None:  # the first forward: wait once, and use the betas exactly
            done.synchronize()
            return (1.0 / host).tolist(), None
        previous[1].synchronize()  # recorded a whole step ago: long done
        return (1.0 / (previous[0] - BETA_DRIFT).clamp_min(0.0)).tolist(), (1.0 / previous[0]).tolist()

    def __getstate__(self):  # copy.deepcopy, pickle: CUDA events and compiled functions stay behind
        return {**self.__dict__, "pending": None, "compiled": {}, "last_plan": None}

    def new_stash(self, x):
        # Round-off enters where Y_l = s * Y_{l-1} + Z B is formed, in the lanes' dtype: float32 (apply sets
        # lane_dtype), float64 for float64 models
        beta = self.blocks[-1].qkv.beta if len(self.blocks) > 1 else x
        dtype = torch.promote_types(beta.dtype, torch.float32)
        # Z is formed in autocast's dtype, else in the parameters' (as x_0, the embedding, is): if that is coarser,
        # a Z recomputed from a rebuilt input would not be the forward's, so keep it
        on, ac_dtype = autocast_state(x.device.type)
        keep_z = self.keep_z or torch.finfo(ac_dtype if on else x.dtype).eps > torch.finfo(dtype).eps
        stream = self.mode == "reversible"
        inv_s, exact_before = self.inv_scales()
        plan = lambda inv, kept=(): plan_stored_lanes(self.blocks, self.every, dtype, stream, keep_z, self.rtol, inv, kept)
        if exact_before is not None and self.last_plan is not None and plan(exact_before, self.last_plan) != self.last_plan:
            warnings.warn(f"{self.mode} recompute: a beta moved by more than BETA_DRIFT={BETA_DRIFT} in one optimizer "
                          f"step, so the previous step's gradients may carry more round-off than recompute_rtol="
                          f"{self.rtol:g}")
        self.last_plan = store = plan(inv_s)
        return LaneStash(store, stream, keep_z, torch.finfo(dtype).eps)

    def block_forward(self, block, layer, x, lanes, rope=None):
        """Replaces block.forward (inside block.__call__, so FSDP2's hooks gather the block around it)."""
        if not (block.training and torch.is_grad_enabled()):  # evaluation, generation, no_grad: the plain forward
            return self.body("plain_forward")(block, x, lanes, rope) if self.compile else layer(x, lanes, rope)
        if self.mode == "block":
            return checkpoint(layer, x, lanes, rope, use_reentrant=False)
        l = block.layer_idx
        if l == 0:
            self.stash = self.new_stash(x)
        if self.stash is None:
            raise RuntimeError(f"{self.mode} recompute: a training forward must run the blocks in order from the first")
        stash = self.stash
        if l == len(self.blocks) - 1:
            self.stash = None  # the autograd graph holds it now, and frees it with the graph
        lanes = lanes or ()
        x, *lanes = CRNetBlock.apply(x, stash, self, block, rope, len(lanes), *lanes, *block.parameters())
        return x, lanes


# The model-level torch.compile cannot trace CRNetBlock (it hands lanes through a Python stash), so it steps around
# the block here; the bodies inside are compiled on their own (Recompute.body), and so are embeddings and head.
eager_block_forward = torch.compiler.disable(Recompute.block_forward)


def apply(model, mode, every=8, keep_z=True, rtol=LANE_RTOL, compile=False):
    """Make model's training steps run with recomputation `mode` ("none" | "block" | "crnet" | "reversible"),
    keeping the lanes of every `every`-th layer (crnet, reversible) and, reversible with keep_z=False, no Z.
    rtol is the round-off guard's budget (module docstring): larger stores fewer lanes beyond the checkpoint set.
    compile=True compiles Algorithm 1's bodies (module docstring); the caller still compiles the model.
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
    inverts = mode in ("crnet", "reversible")
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # back to the class's plain forward
        for proj in block.projections():
            proj.lane_dtype = torch.float32 if inverts else None  # Projection.lane_add: what the inversion needs
    # apply(model, *model.recompute) applies it again; the defaults are left out
    model.recompute = (mode, every, keep_z, rtol)[:4 if rtol != LANE_RTOL else 2 if keep_z else 3]
    if mode != "none":
        rc = Recompute(model, mode, every, keep_z, rtol, compile and inverts)
        for block in model.blocks:
            # module-level functions in a partial: copy.deepcopy copies rc and block with the model
            block.forward = functools.partial(eager_block_forward if inverts else Recompute.block_forward,
                                              rc, block, block.forward)
    return model
