"""
Checkpoints: saving, finding, reading and resuming them, safely. What a run in out_dir can be continued from.

Both formats hold the same state dicts (torch.distributed.checkpoint.state_dict's: parameter names as keys, for
the optimizer too), so a run resumes in either mode from either format: DCP reshards to any layout, and a full
ckpt.pt is split into shards by set_state_dict.
  data_parallel = "ddp":  one file, out_dir/ckpt.pt, written by rank 0.
  data_parallel = "fsdp": a torch.distributed.checkpoint directory out_dir/ckpt_dcp/iter_XXXXXXX/, one file per
                          process, loadable on any number of processes.
Each save keeps the previous checkpoint beside the new one (ckpt.prev.pt, or the previous iter_ directory): a
latest file damaged after the fact falls back to it. Once a save has completed, the latest name never vanishes (a
job script tests for it to choose between start and resume): ckpt.pt is linked to ckpt.prev.pt before the new
file replaces it; an iter_ directory saved again at the same iteration is renamed iter_N.old (still listed) until
the new one is in place.

train.py's side: start() turns init_from (scratch, resume, auto, a run to fine-tune) into the run's config and
checkpoint, restore() loads it into the model, optimizer and RNG, save() writes one; StopSignals turns a
preemption notice into a save at the end of the step.
"""
import fcntl
import functools
import os
import shutil
import signal
import socket
import threading
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from configurator import RENAMED, ConfigError, check_folder, fsync
from model import ModelConfig, Transformer

CKPT_FILE, PREV_FILE, DCP_DIR = "ckpt.pt", "ckpt.prev.pt", "ckpt_dcp"

TRAIN_KEYS = ("iter", "config", "model_config", "rng", "best_val_loss")  # what makes a checkpoint one of ours


class CheckpointError(ValueError):
    def __init__(self, message, damaged=True):
        super().__init__(message)
        self.damaged = damaged  # False: unreadable now (an OS error, no memory), not shown to be broken


def checkpoints(out):
    """Every checkpoint in out, newest first: ("ddp", file) and ("fsdp", DCP directory). A DCP directory gets its
    iter_ name only when complete; a ckpt.pt only when torch.save has finished (written as .tmp, then renamed).
    Within a format the order is by name (ckpt.pt, then ckpt.prev.pt; iter_ numbers, highest first), which a
    copy keeps; only between formats (a run that changed mode) does mtime decide the order."""
    out = Path(out)
    ddp = [("ddp", out / f) for f in (CKPT_FILE, PREV_FILE) if (out / f).is_file()]
    root = out / DCP_DIR
    dirs = {p.name for p in root.glob("iter_*") if p.is_dir()} if root.is_dir() else set()
    names = [n for n in dirs if n[5:].isdigit() or (n.endswith(".old") and n[5:-4].isdigit() and n[:-4] not in dirs)]
    fsdp = [("fsdp", root / n) for n in sorted(names, key=lambda n: int(n[5:].removesuffix(".old")), reverse=True)]
    if not (ddp and fsdp):
        return ddp + fsdp
    slots = sorted(ddp + fsdp, key=lambda kp: kp[1].stat().st_mtime_ns, reverse=True)  # which format, when
    queues = {"ddp": iter(ddp), "fsdp": iter(fsdp)}
    return [next(queues[kind]) for kind, _ in slots]  # each format's slots filled in its name order


def find_checkpoint(out):
    """The newest (kind, path), or (None, None); not opened (see read_checkpoint)."""
    return next(iter(checkpoints(out)), (None, None))


def read_checkpoint(kind, path):
    """The checkpoint's train state (a ckpt.pt's weights too, memory-mapped), or CheckpointError saying why not."""
    try:
        if kind == "fsdp":  # every shard file the metadata names must be there, whole
            meta = dcp.FileSystemReader(str(path)).read_metadata()
            for info in meta.storage_data.values():
                f = path / info.relative_path
                if not f.is_file() or f.stat().st_size < info.offset + info.length:
                    raise CheckpointError(f"shard {f.name} is missing or truncated")
        # mmap: every DDP rank reads the file, and a 7B ckpt.pt is tens of GB; pages load only where touched
        ckpt = torch.load(path if kind == "ddp" else path / "train_state.pt", map_location="cpu", weights_only=True,
                          mmap=kind == "ddp")
    except CheckpointError:
        raise
    except Exception as e:  # torch's zip reader, pickle, EOF, os errors: all mean "cannot be read"
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'empty'}"
        raise CheckpointError(f"cannot be read ({why})", damaged=not isinstance(e, (OSError, MemoryError))) from None
    missing = [k for k in TRAIN_KEYS + (("model", "optimizer") if kind == "ddp" else ()) if k not in (ckpt if isinstance(ckpt, dict) else {})]
    if missing:
        raise CheckpointError(f"is not a train.py checkpoint (no {', '.join(map(repr, missing))})")
    return {**ckpt, "kind": kind, "path": path}


def load_train_state(out, say=print):
    """The newest readable checkpoint's train state: config, iteration, RNG states... (a ckpt.pt's weights too).
    A damaged newer one is skipped with a note and listed in the state's "damaged" (see set_aside); none readable
    is an error naming every file and why."""
    tried = []
    for kind, path in checkpoints(out):
        try:
            ckpt = read_checkpoint(kind, path)
        except CheckpointError as e:
            tried.append((path, e))
            continue
        for bad, why in tried:
            say(f"note: checkpoint {bad} {why}; falling back to {path} (iteration {ckpt['iter']})")
        return {**ckpt, "damaged": [bad for bad, why in tried if why.damaged]}
    if not tried:
        out = Path(out)  # a checkpoint itself (ckpt.pt, a DCP iter_ directory) instead of its run's directory?
        run = out.parent if out.is_file() else out.parent.parent if out.parent.name == DCP_DIR else None
        raise FileNotFoundError(f"no checkpoint in {out} (neither {CKPT_FILE} nor {DCP_DIR}/iter_*)"
                                + (f"; give the run's directory, {run}" if run else ""))
    raise CheckpointError("no readable checkpoint: " + "; ".join(f"{p} {e}" for p, e in tried) + ". Restore the "
                          f"file (or start a new run there: train.py --out_dir={out} --init_from=scratch --overwrite)")


def set_aside(damaged, out, say=print):
    """A resumed run (rank 0, once every check has passed) renames the damaged checkpoints it fell back past to
    out/<name>.damaged: kept for inspection, but out of the rotation, so that the next save cannot keep a
    damaged file as its fallback."""
    for bad in damaged:
        aside = Path(out) / f"{bad.name}.damaged"
        try:
            shutil.rmtree(aside) if aside.is_dir() else aside.unlink(missing_ok=True)
            os.replace(bad, aside)
            say(f"note: moved the damaged {bad} to {aside}")
        except OSError as e:  # a read-only directory, say: the run goes on, and prune removes it later
            say(f"note: could not move the damaged {bad} aside ({e})")


def load_weights(ckpt, model, optimizer=None):
    """Fill model (and optimizer) from a checkpoint of either format, whatever the current mode and process count."""
    # the model's own (sharded or not) state dicts, AdamW's state created so that loading can fill it
    msd, osd = get_state_dict(model, optimizer) if optimizer else (get_model_state_dict(model), None)
    if ckpt["kind"] == "fsdp":
        state = {"model": msd, **({"optimizer": osd} if optimizer else {})}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=ckpt["path"], no_dist=not dist.is_initialized())  # reshards to this layout
        msd, osd, opts = state["model"], state.get("optimizer"), None
    else:  # full tensors: under FSDP each process keeps its shard
        msd, osd, opts = ckpt["model"], ckpt["optimizer"], StateDictOptions(full_state_dict=True)
        if optimizer and any(isinstance(k, int) for k in osd["state"]):
            osd = named_optimizer_state(model, optimizer, osd)
    if optimizer:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)
    else:
        set_model_state_dict(model, msd, options=opts)


def named_optimizer_state(model, optimizer, osd):
    """An optimizer.state_dict() (parameters numbered 0, 1, ... in param_groups order, as ckpt.pt files written
    before both formats shared one layout hold them) keyed by parameter names instead, as set_state_dict wants.
    The numbering is the order configure_optimizers puts parameters in, which this version keeps."""
    names = {p: n for n, p in model.named_parameters()}
    sizes = [(len(g["params"]), len(h["params"])) for g, h in zip(osd["param_groups"], optimizer.param_groups)]
    if len(osd["param_groups"]) != len(optimizer.param_groups) or any(a != b for a, b in sizes):
        raise CheckpointError(f"holds optimizer groups of {[a for a, _ in sizes]} parameters, the optimizer has "
                              f"{[len(g['params']) for g in optimizer.param_groups]}: written by another version")
    fqn = {i: names[p] for g, h in zip(osd["param_groups"], optimizer.param_groups) for i, p in zip(g["params"], h["params"])}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for i, state in osd["state"].items():
        if "exp_avg" in state and state["exp_avg"].shape != shapes[fqn[i]]:
            raise CheckpointError(f"holds optimizer state of shape {tuple(state['exp_avg'].shape)} for {fqn[i]}, "
                                  f"which has {tuple(shapes[fqn[i]])}: written by another version")
    return {"state": {fqn[i]: v for i, v in osd["state"].items()},
            "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in osd["param_groups"]]}


def save_checkpoint(out, data_parallel, model, optimizer, train_state, proc, best=False):
    """Atomic in both modes: a kill at any instant leaves the last good checkpoint readable. Once the new one is
    complete, the one before it (of either format) stays as the fallback and older ones are removed.
    best=True also links it as out/best/, the best-val checkpoint."""
    out = Path(out)
    msd, osd = get_state_dict(model, optimizer)
    if data_parallel == "ddp":
        final = out / CKPT_FILE
        if proc == 0:
            tmp = out / (CKPT_FILE + ".tmp")
            torch.save({"model": msd, "optimizer": osd, **train_state}, tmp)
            fsync(tmp)
            if final.exists():  # ckpt.pt keeps its name throughout: linked (or copied) to ckpt.prev.pt, then replaced
                prev_tmp = out / (PREV_FILE + ".tmp")
                prev_tmp.unlink(missing_ok=True)
                link_or_copy(final, prev_tmp)
                fsync(prev_tmp)
                os.replace(prev_tmp, out / PREV_FILE)
            os.replace(tmp, final)
            fsync(out)
            prune(out, final)
    else:
        root = out / DCP_DIR
        final = root / f"iter_{train_state['iter']:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if proc == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        dist.barrier()
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)  # returns once every process has written
        if proc == 0:  # (and synced: DCP's file writer fsyncs each file by default)
            torch.save(train_state, tmp / "train_state.pt")
            fsync(tmp / "train_state.pt")
            if final.exists():  # the same iteration saved again: iter_N.old is listed until the new one is in
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            fsync(tmp)
            os.replace(tmp, final)
            fsync(root)
            prune(out, final)
    if best and proc == 0:
        link_best(final, out / "best")
    if dist.is_initialized():
        dist.barrier()
    return final


class StopSignals:
    """SIGTERM and SIGUSR1 (a cluster's notice before it kills a job) and Ctrl-C (SIGINT) ask a run to stop: the
    handler only records the first one, so the step in progress and the save that follows finish (a save must not
    be cut short; a repeated signal, which torchrun adds to Ctrl-C, is ignored). train.py reduces the flag across
    ranks with the step's loss, so every rank stops and saves at the same iteration."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum, self.old = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs handlers only there
            self.old = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def prune(out, final):
    """Keep the new checkpoint and the newest one before it (of either format: the fallback); remove the rest,
    with anything an interrupted save left in the DCP directory."""
    keep = {final, *[p for _, p in checkpoints(out) if p != final][:1]}
    for f in (CKPT_FILE, PREV_FILE, PREV_FILE + ".tmp"):
        if out / f not in keep:
            (out / f).unlink(missing_ok=True)
    root = out / DCP_DIR
    for p in (root.iterdir() if root.is_dir() else ()):
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def link_best(src, best):
    """best/ holds hard links to the checkpoint's files (no copy; later saves replace names, not these files), or
    copies where the file system has no hard links. Built as best.tmp/; the old best/ is renamed to best.old/
    until the new one is in place, and restored from there if a kill came between the two renames."""
    tmp, old = best.with_name(best.name + ".tmp"), best.with_name(best.name + ".old")
    recover_best(best.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    dst = tmp / (src.relative_to(best.parent) if src.is_dir() else src.name)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy)
    else:
        link_or_copy(src, dst)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def recover_best(out):
    """A kill between link_best's two renames leaves best.old/ and no best/: put it back (a resumed run does)."""
    best, old = Path(out) / "best", Path(out) / "best.old"
    if old.is_dir() and not best.exists():
        os.replace(old, best)


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (some network and FAT file systems), or another device
        shutil.copy2(src, dst)


def remove_run(out):
    """A run started over (--overwrite) removes the old run's checkpoints and best/ once every check has passed,
    so that nothing of the old run can be resumed or fallen back to."""
    out = Path(out)
    for name in (CKPT_FILE, PREV_FILE, CKPT_FILE + ".tmp", PREV_FILE + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for name in (DCP_DIR, "best", "best.tmp", "best.old"):
        shutil.rmtree(out / name, ignore_errors=True)


def load_for_inference(out, **overrides):
    """(model on the CPU in eval mode, train state) from either checkpoint format, without a process group."""
    ckpt = load_train_state(out)
    fields = set(ModelConfig.field_names())  # checkpoints from before recompute left ModelConfig still carry it
    model = Transformer(ModelConfig(**{k: v for k, v in {**ckpt["model_config"], **overrides}.items() if k in fields}))
    load_weights(ckpt, model)
    return model.eval(), ckpt


# ----------------------------------------------------------------------------- train.py's side
# what a resumed run may change; everything else defines the model, the data stream or the optimization
FREE_ON_RESUME = {"out_dir", "init_from", "overwrite", "eval_interval", "checkpoint_interval", "eval_only", "eval_tokens",
                  "log_interval", "keep_best", "log_to", "wandb_project", "recompute", "device_gib", "recompute_every",
                  "keep_z", "recompute_rtol", "batch_size", "max_iters", "stop_iter", "device", "dtype", "torch_compile",
                  "data_parallel", "cpu_threads", "peak_flops", "preflight", "world_size", "data_recipe"}


def start(c, given):
    """(config, checkpoint or None) of a launch: init_from "auto" resolved (the one command a job script repeats
    after every preemption), a resumed run's saved config, or a fine-tuned run's model keys."""
    check_folder("out_dir", c["out_dir"])
    auto = c["init_from"] == "auto"
    if auto:
        c["init_from"] = "resume" if find_checkpoint(c["out_dir"])[0] else "scratch"
    if c["eval_only"] and c["init_from"] not in ("scratch", "resume"):
        raise ConfigError("init_from", c["init_from"], "eval_only evaluates out_dir's checkpoint: drop init_from, "
                                                       "pass --out_dir=<run dir>")
    c["init_from"] = "resume" if c["eval_only"] else c["init_from"]
    if c["init_from"] == "resume":
        c, ckpt = resume_config(c, given, auto)
    else:
        c, ckpt = (c, None) if c["init_from"] == "scratch" else finetune_config(c, given)
    if c["warmup_iters"] > c["max_iters"] and not c["eval_only"]:  # e.g. a short trial run of a long run's config
        say0(f"note: warmup_iters={c['warmup_iters']} > max_iters={c['max_iters']}: the learning rate only rises to "
             f"{c['learning_rate'] * c['max_iters'] / c['warmup_iters']:.3g} (learning_rate={c['learning_rate']:g}) and "
             f"never decays")
    return c, ckpt


def refuse_to_clobber(c):
    """A new run in an out_dir that holds one would remove its checkpoints and best/: only with overwrite. Checked
    after the config, so that a config error is reported first. Then a training run (rank 0) locks an out_dir that
    exists now (hold_out_dir; start_logs locks one it makes); a preflight only tries it."""
    latest, best = find_checkpoint(c["out_dir"])[1], find_checkpoint(Path(c["out_dir"]) / "best")[1]
    if c["init_from"] != "resume" and not c["overwrite"] and (latest or best):
        how = ("continue it with --init_from=resume" if latest else  # best/ alone: nothing to resume in out_dir itself
               f"start from its weights with --init_from={Path(c['out_dir']) / 'best'} and another --out_dir")
        raise FileExistsError(f"{latest or best} exists: {how}, or pass --overwrite or another --out_dir to start over")
    if Path(c["out_dir"]).is_dir() and not c["eval_only"] and os.environ.get("RANK", "0") == "0":
        hold_out_dir(c["out_dir"])  # (a preflight's, as every lock train.main took, is freed as it returns: releasing)


HELD = {}  # each out_dir this process has locked -> its open lock file (None: a file system without locks)
SINKS = []  # close(exit_code) of each log sink train.main opened (runlog.py), called before out_dir is freed


def hold_out_dir(out, key="out_dir"):
    """One run per out_dir: two at once (a job requeued while the old one still saves, torchrun workers that outlived
    their launcher) would interleave metrics.jsonl and race on ckpt.pt.tmp. Rank 0 holds an flock on out_dir/.lock
    until train.main leaves (releasing) or its process ends: the kernel releases it on any exit, SIGKILL too. A
    file system without locks leaves the run unguarded, with a note, rather than stopped."""
    out = Path(out).resolve()
    if out in HELD:  # this process holds it already (refuse_to_clobber took it, start_logs asks again)
        return
    out.mkdir(parents=True, exist_ok=True)
    try:
        f = open(out / ".lock", "a+")
    except OSError:  # (not writable: the run's first write says so, naming the file)
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise FileExistsError(f"{key}={out} is in use by another run ({who} holds {out / '.lock'}): wait for it to "
                              f"end or stop it, or choose another {key}") from None
    except OSError as e:
        f.close()
        HELD[out] = None  # (said once)
        return print(f"note: cannot lock {out / '.lock'} ({e.strerror}): nothing stops a second run in {key}={out}")
    HELD[out] = f
    f.truncate(0)
    f.write(f"{socket.gethostname()} pid {os.getpid()}\n")  # (only what the refusal names: the lock is the flock)
    f.flush()


def release_out_dir(out):
    f = HELD.pop(Path(out).resolve(), None)
    if f is not None:
        f.close()


def releasing(main):
    """train.main, run so that however it leaves (done, a config or data error, a diverged loss, Ctrl-C) it closes
    its log sinks, then frees the out_dirs it locked: a process that lives on (a notebook, a test, a sweep calling
    main) would otherwise keep a wandb run open, and other runs out of that folder, until it exits."""
    @functools.wraps(main)
    def run(*args):
        before, code = set(HELD), 1  # (a caller's own lock stays the caller's)
        try:
            result, code = main(*args), 0
            return result
        except SystemExit as e:  # train.py's own exits: 130 after Ctrl-C's save, a message on a diverged loss
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            raise
        finally:
            try:
                while SINKS:
                    try:
                        SINKS.pop()(code)
                    except Exception as e:  # main's own error, if any, is the one to report
                        print(f"note: closing a log sink failed ({type(e).__name__}: {e})")
            finally:  # (a second Ctrl-C in a slow close)
                for out in set(HELD) - before:
                    release_out_dir(out)
    return run


def say0(*a):
    if os.environ.get("RANK", "0") == "0":
        print(*a)


def resume_config(c, given, auto=False):
    """init_from='resume': the run's saved config, with the keys given now where a resumed run may change them.
    Under init_from=auto a finished run exits 0, so that a job script repeated after its last preemption ends."""
    ckpt = load_train_state(c["out_dir"], say=say0)
    saved = {RENAMED.get(k, k): v for k, v in ckpt["config"].items()}  # a run saved before a key was renamed
    saved = {k: v for k, v in saved.items() if k in c}  # keys this version no longer has are dropped
    for k in sorted(given - FREE_ON_RESUME - ({"data_dir"} if c["eval_only"] else set())):  # eval_only: any data
        same_dir = k == "data_dir" and Path(c[k]).resolve() == Path(saved[k]).resolve()
        if c[k] != saved.get(k, c[k]) and not same_dir:
            raise ConfigError(k, c[k], f"the checkpoint in {c['out_dir']} was trained with {saved[k]!r}; a resumed run "
                                       f"keeps the model, data stream and optimization (start a new run to change it)")
    c = {**c, **saved, **{k: c[k] for k in given}, "init_from": "resume"}  # also under init_from=auto, eval_only
    if "stop_iter" not in given:
        c["stop_iter"] = 0  # the earlier process's stop: this one runs to max_iters unless told otherwise
    if "cpu_threads" not in given and c["cpu_threads"] > (os.cpu_count() or 1):  # saved on a larger machine
        say0(f"note: cpu_threads {c['cpu_threads']} -> 0 (torch's default): this machine has {os.cpu_count()} CPUs")
        c["cpu_threads"] = 0
    if c["max_iters"] <= ckpt["iter"] and not c["eval_only"] and auto:
        say0(f"{c['out_dir']}: the run is complete (checkpoint at iteration {ckpt['iter']}, max_iters={c['max_iters']}); "
             f"nothing to do")
        raise SystemExit(0)
    if c["max_iters"] <= ckpt["iter"] and not c["eval_only"]:
        raise ConfigError("max_iters", c["max_iters"], f"the checkpoint is at iteration {ckpt['iter']}: nothing to train "
                                                       f"(raise max_iters to continue)")
    if 0 < c["stop_iter"] <= ckpt["iter"] and not c["eval_only"]:  # the loop would run past it, to max_iters
        if auto:
            say0(f"{c['out_dir']}: the checkpoint is at iteration {ckpt['iter']}, stop_iter={c['stop_iter']}: nothing to do")
            raise SystemExit(0)
        raise ConfigError("stop_iter", c["stop_iter"], f"the checkpoint is already at iteration {ckpt['iter']}: nothing "
                                                       f"to train before it (raise stop_iter, or leave it out)")
    if c["max_iters"] != saved["max_iters"]:
        print(f"note: max_iters {saved['max_iters']} -> {c['max_iters']}: the cosine schedule now ends there, so the "
              f"learning rate from iteration {ckpt['iter']} on differs from the original run's")
    return c, ckpt


def finetune_config(c, given):
    """init_from=<a run's out_dir>: its newest checkpoint's weights, and so its model keys, start a new run with a
    fresh optimizer, schedule and RNG; data and optimization come from this config. dropout may change."""
    src = Path(c["init_from"])
    if not src.is_dir() or find_checkpoint(src)[0] is None:
        raise ConfigError("init_from", c["init_from"], "is neither scratch, resume nor a directory holding a checkpoint")
    if src.resolve() == Path(c["out_dir"]).resolve():
        raise ConfigError("init_from", c["init_from"], "is out_dir itself: continue that run with --init_from=resume")
    if Path(c["out_dir"]).resolve() in src.resolve().parents:
        raise ConfigError("init_from", c["init_from"], "is inside out_dir, whose checkpoints a new run there removes: "
                                                       "copy it elsewhere first")
    ckpt = load_train_state(src, say=say0)
    saved = ckpt["config"]
    model_keys = [k for k in ModelConfig.field_names() if k != "dropout" and k in saved]
    for k in sorted(given & set(model_keys)):
        if c[k] != saved[k]:
            raise ConfigError(k, c[k], f"the checkpoint in {src} has {saved[k]!r}: fine-tuning keeps its model")
    return {**c, **{k: saved[k] for k in model_keys}}, ckpt



def restore(ckpt, raw, optimizer, c, rt):
    """Load a checkpoint into the model (fine-tuning: the weights only) or, resuming, also the optimizer and every
    process's RNG state. Returns (start iteration, best val loss)."""
    if c["init_from"] != "resume":
        load_weights(ckpt, raw)
        rt["say"](f"initialized from {ckpt['path']} (iteration {ckpt['iter']}): weights only, fresh optimizer and schedule")
        return 0, float("inf")
    load_weights(ckpt, raw, optimizer)
    states, drawing = ckpt["rng"], c["dropout"] and not c["eval_only"]  # the RNG only matters to dropout
    if len(states) != rt["world"] and drawing:
        rt["say"](f"note: the checkpoint has RNG states of {len(states)} processes, running {rt['world']}: dropout draws differ")
    s = states[rt["proc"] % len(states)]
    torch.set_rng_state(s["torch"])
    if rt["device"].type == "cuda" and s.get("cuda") is not None:
        torch.cuda.set_rng_state_all(s["cuda"])
    elif bool(s.get("cuda")) != (rt["device"].type == "cuda") and drawing:
        rt["say"]("note: the checkpoint's CUDA RNG state does not apply on this device: dropout draws differ")
    rt["last_eval"] = ckpt.get("last_eval")  # the latest eval's val loss: sample.py reports it
    rt["say"](f"{'evaluating' if c['eval_only'] else 'resuming from'} {ckpt['path']} at iteration {ckpt['iter']}")
    return ckpt["iter"], ckpt["best_val_loss"]


def save(c, rt, raw, optimizer, meta, done, best_val, best=False):
    """train.py's checkpoint: the model, AdamW, and what resuming exactly needs (config, iteration, every
    process's RNG state, the data's meta)."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    states = [state]
    if rt["world"] > 1:
        states = [None] * rt["world"]
        dist.all_gather_object(states, state)
    out = Path(c["out_dir"])
    saved = save_checkpoint(out, c["data_parallel"], raw, optimizer, {
        "iter": done, "best_val_loss": best_val, "config": c, "model_config": asdict(raw.cfg), "data_meta": meta,
        "rng": states, "last_eval": rt.get("last_eval")}, rt["proc"], best=best)
    rt["say"](f"saved {saved}" + (f", linked as {out / 'best'} (best val so far)" if best else ""))


def check_same_start(c, rt, ckpt, meta):
    """Every process starts from the same checkpoint (a run still saving into init_from could hand processes
    different ones) and reads the same token files (each node its own copy of data_dir); a resumed or fine-tuned
    model reads the token ids it was trained on. Every process raises, so none waits in a collective."""
    if rt["world"] > 1:
        seen = [None] * rt["world"]
        dist.all_gather_object(seen, ((str(ckpt["path"]), ckpt["iter"]) if ckpt else None, meta.get("tokens_sha1")))
        starts, data = sorted({s for s, _ in seen}, key=str), sorted({d for _, d in seen}, key=str)
        if len(starts) > 1:
            how = ("is a run still saving there? Copy one checkpoint out and start from the copy"
                   if c["init_from"] != "resume" else "is another run writing to this out_dir?")
            raise ValueError(f"processes read different checkpoints "
                             f"({', '.join(f'{p} at iteration {i}' for p, i in starts)}): {how}")
        if len(data) > 1:
            raise ValueError(f"processes read different token files in data_dir={c['data_dir']} (fingerprints "
                             f"{', '.join(d[:12] for d in data)}, prepare_data.tokens_sha1): give every node the same copy")
    if ckpt is not None:
        check_tokenizer(c, ckpt, meta)


def check_tokenizer(c, ckpt, meta):
    """The model reads the token ids it was trained on; a resumed run also reads the same token files (its batches
    are a function of them), so data_dir prepared again since, from other text, is an error there too."""
    saved, src = ckpt["data_meta"], c["out_dir"] if c["init_from"] == "resume" else c["init_from"]
    check_same_tokenizer(saved, meta, c["data_dir"], src)
    changed = [f"{k} {saved[k]:,} -> {meta[k]:,}" for k in ("train_tokens", "val_tokens") if saved.get(k, meta[k]) != meta[k]]
    sha = saved.get("tokens_sha1"), meta.get("tokens_sha1")  # (checkpoints saved before the fingerprint lack it)
    if not changed and None not in sha and sha[0] != sha[1]:
        changed = ["the same token counts, other tokens"]
    if c["init_from"] == "resume" and not c["eval_only"] and changed:
        raise ConfigError("data_dir", c["data_dir"], f"was prepared again since the checkpoint in {src} was saved "
                          f"({', '.join(changed)}): a resumed run continues the same data; to train on this data, "
                          f"fine-tune: --init_from={src} --out_dir=<a new dir>")


def check_same_tokenizer(saved, meta, data_dir, src):
    """data_dir's tokens (meta) are the ones the checkpoint in src was trained on (its data_meta, saved)."""
    was, now = (TOKENIZER_IDS.get(t, t) for t in (saved["tokenizer"], meta["tokenizer"]))
    if was != now:
        raise ConfigError("data_dir", data_dir, f"holds {meta['tokenizer']!r} tokens, but the checkpoint in {src} was "
                          f"trained on {saved['tokenizer']!r} tokens: its embeddings would read other ids "
                          f"(prepare the data with --tokenizer={saved['tokenizer']})")


TOKENIZER_IDS = {"r50k_base": "gpt2"}  # names with identical token ids


