"""
Ablations side by side: full-rank, CR-Net, vanilla low-rank and CoLA (and the paper's CR-Net ablations)
trained on the same data, tokens, seed and schedule, each in a fresh train.py process; then one table
(parameters, final validation loss, tokens/s, peak memory) and a loss-curve plot from the runs' metrics.

    python tools/ablate.py                                  # CPU default (train.py's defaults, byte Shakespeare): ~14 min, 2 cores
    python tools/ablate.py --variants=crnet,crnet_fixed_beta,crnet_lowrank_first,crnet_middle_heavy
    python tools/ablate.py configs/ablate_llama_60m.py       # the paper's 60M dimensions, for a GPU
    python tools/ablate.py --lrs=1e-3,3e-3,1e-2 --seeds=1337,1338   # each variant at its best lr, mean and spread
    python tools/ablate.py --lrs=1e-3,3e-3,1e-2 --seeds=1337,1338 --seeds_at=best   # 2nd seed at the best lr only
    python tools/ablate.py configs/ablate_llama_60m.py --nproc=8 --total_batch_tokens=131072   # torchrun, 8 GPUs

Ranks. The config's `rank` is CR-Net's (layers 2..L). lowrank and cola get the rank whose non-embedding
parameter count is nearest CR-Net's (an error if none is within 2%); crnet_middle_heavy spreads the same
total rank over layers 2..L as sin(pi k / L), k = 1..L-1, so its count equals crnet's exactly;
crnet_lowrank_first keeps the rank and simply drops layer 1's full-rank weights (fewer parameters, shown).
Each run writes to ablate_dir/<variant>/ (its train.log, metrics.jsonl, checkpoint). Running the same command
again reuses finished runs, resumes interrupted ones from their checkpoint (Ctrl-C, SIGTERM and SIGUSR1 are passed
on to the run in progress, which saves before the ablation stops), and refuses (naming the variant) a
directory trained with other arguments unless --overwrite=True. --stop_iter=N stops every run at N, to split an
ablation across several sittings. Config files and --key=value set train.py's keys (shared by every run) and
tools/ablate.py's own keys below; each run is launched with the merged config spelled out as --key=value.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python tools/x.py: the core modules are one folder up

import torch

import configurator
import checkpoint as ck
import plan
import recompute as rc
from prepare_data import check_data, ready_data
from model import Transformer, model_config
from tools.plot import draw, read_rows
from runlog import write_atomic

# ----------------------------------------------------------------------------- config
# tools/ablate.py also takes every train.py key: they set the base config shared by every variant
ablate_dir = "out/ablate"                # each variant trains in ablate_dir/<variant>/
variants = "full,crnet,lowrank,cola"     # comma-separated names from VARIANTS below
nproc = 1                                # processes per run: > 1 launches each run under torchrun [>=1]
plot = True                              # write ablate_dir/loss.png (needs matplotlib, optional)
lrs = ""                                 # e.g. "1e-3,3e-3,1e-2": every variant at every lr; the table takes each one's best
seeds = ""                               # e.g. "1337,1338": every run at every seed; the table gives mean and spread
seeds_at = "all"                         # "best": seeds after the first run only at each variant's best lr on the first {all|best}
# -----------------------------------------------------------------------------

HERE = Path(__file__).resolve().parents[1]  # the repository root, where train.py is
VARIANTS = {  # name -> what it changes in the base config ("matched" / "middle_heavy": ranks computed below)
    "full": dict(param="full"),
    "crnet": dict(param="crnet"),
    "lowrank": dict(param="lowrank", rank="matched"),
    "cola": dict(param="cola", rank="matched"),
    "cola_mlp": dict(param="cola_mlp", rank="matched"),                 # CoLA without the SiLU in attention
    "crnet_fixed_beta": dict(param="crnet", beta_learnable=False),      # paper: learnable beta converges better
    "crnet_lowrank_first": dict(param="crnet", first_layer="lowrank"),  # paper (350M): ppl 18.95 -> 19.68
    "crnet_middle_heavy": dict(param="crnet", rank="middle_heavy"),     # paper: larger ranks in the middle work best
    "crnet_nolane": dict(param="crnet", moe_lane=False),                # qwen3_moe: low-rank experts, no lane on D
}
MATCH_TOL = 0.02


def param_counts(c, **changes):
    """Transformer.num_params() of the config, plus "non_embedding": the parameters outside the token/position
    embeddings and the LM head (the part the methods differ in)."""
    with torch.device("meta"):
        n = Transformer(model_config(c, **changes)).num_params()
    return {**n, "non_embedding": n["total"] - n["embeddings"] - n["lm_head"]}


def non_embedding_params(c, **changes):
    return param_counts(c, **changes)["non_embedding"]


def matched_rank(c, param, target):
    """The uniform rank of `param` whose non-embedding count is nearest `target`. Counts are linear in the rank
    (P(r) = P(1) + (r - 1) k), so two counted models give it; the result is counted again and checked."""
    p1, p2 = non_embedding_params(c, param=param, rank=1), non_embedding_params(c, param=param, rank=2)
    m = model_config(c, param="crnet")
    limit = min(m.n_embd, m.ff_dim, m.q_dim, m.kv_dim) - 1  # ModelConfig's bound: r below every width
    r = min(limit, max(1, round(1 + (target - p1) / (p2 - p1))))
    got = non_embedding_params(c, param=param, rank=r)
    if abs(got / target - 1) > MATCH_TOL:
        raise ValueError(f"no {param} rank matches CR-Net's {target:,} non-embedding parameters within {MATCH_TOL:.0%}: "
                         f"the nearest, r={r}, gives {got:,}; change --rank or the model size")
    return r


def middle_heavy_ranks(n_layer, rank):
    """Ranks of layers 2..L proportional to sin(pi k / L), k = 1..L-1, summing to (L-1) * rank (largest
    remainders rounded up), so the parameter count is crnet's; layer 1's entry is unused (full-rank)."""
    w = [math.sin(math.pi * k / n_layer) for k in range(1, n_layer)]
    exact = [(n_layer - 1) * rank * x / sum(w) for x in w]
    ranks = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: ranks[i] - exact[i])[:(n_layer - 1) * rank - sum(ranks)]:
        ranks[i] += 1
    return [rank] + ranks


def variant_changes(c, name):
    """The train.py config keys that turn the base config c into variant `name`."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if not isinstance(c["rank"], int):
        raise ValueError(f"rank={c['rank']!r}: tools/ablate.py needs one CR-Net rank (an int) to derive the others from")
    v = {"beta_learnable": True, "first_layer": "full", "moe_lane": True, "rank": c["rank"], **VARIANTS[name]}
    if v["rank"] == "matched":
        v["rank"] = matched_rank(c, v["param"], non_embedding_params(c, param="crnet", rank=c["rank"]))
    elif v["rank"] == "middle_heavy":
        v["rank"] = middle_heavy_ranks(c["n_layer"], c["rank"])
    if c["recompute"] in ("crnet", "reversible") and (v["param"] != "crnet" or not v["moe_lane"]):
        v["recompute"], v["keep_z"] = "block", True  # Eq. 6 inverted needs CR-Net's lanes; the others checkpoint blocks
    return v


def check_run(args, a):
    """A run's train.py arguments checked as train.py checks them (the model, the recompute settings, the batch
    arithmetic at nproc processes and stop_iter: plan.grad_accum), before any run trains or its directory is made."""
    c = configurator.load(args, "train.py")[0]
    model_config(c)
    rc.check(c["recompute"], c["param"], c["recompute_every"], c["keep_z"], c["recompute_rtol"], c["moe_lane"])
    plan.grad_accum({**c, "stop_iter": a["stop_iter"]}, a["nproc"])


def read_metrics(run):
    """A run's metrics rows (none yet: []), read as tools/plot.py reads them: a last line a kill cut short is skipped."""
    return read_rows(run) if (run / "metrics.jsonl").is_file() else []


def diverged(run):
    stamp = run / "ablate.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("diverged", False)


def finished(run, max_iters):
    """Trained to max_iters, or stopped by train.py's non-finite-loss check (a result too: that lr diverges)."""
    return diverged(run) or any(r.get("iter") == max_iters and "val_loss" in r for r in read_metrics(run))


# torchrun passes on SIGTERM, SIGINT, SIGHUP and SIGQUIT only, unless told, and SIGKILLs its workers 30 s after a
# signal unless given the time for a step and a save. An older torchrun refuses a flag it lacks (torch 2.11's has no
# --shutdown_timeout), so each is passed where known, with what its absence means said where not.
TORCHRUN_FLAGS = {  # flag: what its absence means
    "--signals_to_handle=SIGTERM,SIGINT,SIGUSR1,SIGHUP,SIGQUIT": "SIGUSR1 kills it and leaves its workers training",
    "--shutdown_timeout=900": "its workers get 30 s after a signal to finish a step and save"}


def torchrun_flags():
    """TORCHRUN_FLAGS that this torch's torchrun knows, and a line on any it lacks."""
    from torch.distributed.run import get_args_parser
    unknown = get_args_parser().parse_known_args([*TORCHRUN_FLAGS, "train.py"])[1]
    return ([f for f in TORCHRUN_FLAGS if f not in unknown],
            "".join(f" (torchrun {torch.__version__} has no {f.split('=')[0]}: {TORCHRUN_FLAGS[f]})" for f in unknown))


def run_variant(name, args, run, a, max_iters):
    """Train one variant into `run` (or reuse/resume it); returns the wall seconds of its training so far."""
    # one ablation per ablate_dir: a second would rewrite this run's stamp and log before its train.py, refused by
    # the run's own lock, stopped
    ck.hold_out_dir(a["ablate_dir"], "ablate_dir")
    stamp = run / "ablate.json"
    old = json.loads(stamp.read_text()) if stamp.is_file() else None
    if old is not None:  # a stamp written before configurator.RENAMED's keys were renamed
        old["args"] = [f"--{configurator.RENAMED.get(k[2:], k[2:])}{eq}{v}" for k, eq, v in (s.partition("=") for s in old["args"])]
    if old is not None and not (ck.find_checkpoint(run)[0] or old.get("diverged") or read_metrics(run)):
        old = None  # stamped by a launch that failed before training anything: nothing here to keep
    if old is not None and old["args"] != args and not a["overwrite"]:
        raise ValueError(f"{run} holds variant {name!r} trained with other arguments ({' '.join(old['args'])}); "
                         f"pass --overwrite=True or another --ablate_dir")
    if old is None and ck.find_checkpoint(run)[0] and not a["overwrite"]:
        raise FileExistsError(f"{run} holds a checkpoint that tools/ablate.py did not write; pass --overwrite=True or another "
                              f"--ablate_dir")
    same = old is not None and old["args"] == args
    if same and old.get("data", a["data"]) != a["data"]:  # (a stamp from before the fingerprint: taken as the same)
        if not a["overwrite"]:
            raise ValueError(f"{run} holds variant {name!r} trained on other tokens than its data_dir holds now (prepared "
                             f"again since): one table must not mix them; pass --overwrite=True or another --ablate_dir")
        same = False  # trained again, from scratch
    if same and finished(run, max_iters):
        print(f"== {name}: finished earlier in {run}, reused")
        return old["seconds"]
    resume = same and ck.find_checkpoint(run)[0] is not None
    extra = ["--init_from='auto'"] if resume else ["--overwrite=True"]  # auto: a run already at stop_iter exits 0
    flags, note = torchrun_flags() if a["nproc"] > 1 else ([], "")
    launch = [sys.executable] if a["nproc"] == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={a['nproc']}", *flags]
    cmd = [*launch, str(HERE / "train.py"), *args, f"--out_dir={str(run)!r}", *extra, f"--stop_iter={a['stop_iter']}"]
    print(f"== {name}: {' '.join(cmd[1 + (a['nproc'] > 1) * 3:])}{note}", flush=True)  # (from --nproc_per_node)
    run.mkdir(parents=True, exist_ok=True)
    (run / "diverged.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    seconds = (old["seconds"] if resume else 0.0)
    mark = lambda **k: write_atomic(stamp, json.dumps({"args": args, "seconds": seconds, "data": a["data"], **k}))
    mark()  # before training: marks the dir as ours
    stop, proc = [], None

    def handle(signum, frame):
        # Ctrl-C, SIGTERM or SIGUSR1 (a preemption notice): passed on to train.py, which finishes its step, saves and
        # exits, while this loop goes on reading its output: exiting now would close the pipe, and train.py would
        # die on its next print, before its save. (A signal sent to the whole group reaches train.py twice: it
        # keeps the first.)
        stop.append(signum)
        if len(stop) == 1 and proc is not None:
            proc.send_signal(signum)
    old_handlers = {sig: signal.signal(sig, handle) for sig in ck.StopSignals.SIGNALS}
    try:
        with open(run / "train.log", "a" if resume else "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})  # the log follows the run live
            if stop:  # a signal while it started
                proc.send_signal(stop[0])
            echo = saved = False  # echo: from an error on, every line (an error's advice follows it)
            for line in proc.stdout:
                log.write(line)
                log.flush()
                saved = saved or line.startswith("stopped at iteration")  # train.py's last line after a stop's save
                echo = echo or line.startswith("error")
                if echo or line.startswith(("eval", "model:", "note:")):
                    print(f"   {line.rstrip()}", flush=True)
        failed = proc.wait()
    finally:  # the time it trained counts when it resumes
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        seconds += time.perf_counter() - t0
        mark()
    diverged = failed and (run / "diverged.json").is_file()  # train.py's mark of its non-finite-loss stop
    mark(diverged=bool(diverged))
    if stop:  # the next variant does not start; the same command continues the ablation where it stopped
        who = "train.py" if a["nproc"] == 1 else "torchrun"
        print(f"== {name}: stopped by {signal.Signals(stop[0]).name}, {who} exit {proc.returncode} (its log: "
              f"{run / 'train.log'}); run the same command to continue", flush=True)
        if not (saved or finished(run, max_iters)):  # (torchrun exits 1 after its workers' clean stop: their line tells)
            raise SystemExit(f"variant {name}: no save at the stop (a signal before training began, or a failure; exit "
                             f"{failed}); its log: {run / 'train.log'}")
        raise SystemExit(130 if stop[0] == signal.SIGINT else 0)  # as train.py exits
    if diverged:
        print(f"== {name}: diverged (train.py stopped on a non-finite loss); its val loss counts as inf", flush=True)
    elif failed:
        raise SystemExit(f"variant {name} failed (exit {proc.returncode}); its log: {run / 'train.log'}")
    return seconds


def summarize(name, run, seconds, base_ne):
    c = json.loads((run / "config.json").read_text())
    rows = read_metrics(run)
    train_rows, evals = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    tps = sorted(r["tokens_per_s"] for r in train_rows[1:] or train_rows) or [math.nan]  # the first includes warmup
    n = param_counts(c)  # the run's config.json holds the data's vocabulary
    ne = n["non_embedding"]
    last = {"val_loss": math.inf, "train_loss": math.inf} if diverged(run) or not evals else evals[-1]
    return {"variant": name, "param": c["param"], "rank": c["rank"], "non_embedding": ne, "vs_crnet": ne / base_ne,
            "total": n["total"], "val_loss": last["val_loss"], "best_val": min([r["val_loss"] for r in evals] or [math.inf]),
            "train_loss": last["train_loss"], "tokens_per_s": tps[len(tps) // 2],
            "peak_mem_mb": max((r["peak_mem_mb"] for r in train_rows), default=math.nan), "seconds": seconds, "curve": rows}


def table(results, c, device):
    full = next((r for r in results if r["variant"] == "full"), None)
    mem = "max_memory_allocated" if device == "cuda" else "peak RSS of the process"
    lines = [f"{c['arch']} h={c['n_embd']} L={c['n_layer']} h_ff={c['intermediate_size']}, CR-Net rank {c['rank']}; "
             f"{c['max_iters']} steps x {c['total_batch_tokens']:,} tokens, lr {c['learning_rate']}, seed {c['seed']}, "
             f"data {c['data_dir']}; device {device}; memory = {mem}",
             "| variant | rank | non-emb params | vs crnet | vs full | total params | final val loss | best val | "
             "final train loss | tokens/s | vs full | peak mem MiB | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rank = "-" if r["param"] == "full" else (r["rank"] if isinstance(r["rank"], int) else "/".join(map(str, r["rank"][1:])))
        vs = lambda k: f"{r[k] / full[k]:.3f}" if full else "-"
        lines.append(f"| {r['variant']} | {rank} | {r['non_embedding']:,} | {r['vs_crnet']:.3f} | {vs('non_embedding')} | "
                     f"{r['total']:,} | {r['val_loss']:.4f} | {r['best_val']:.4f} | {r['train_loss']:.4f} | "
                     f"{r['tokens_per_s']:,.0f} | {vs('tokens_per_s')} | {r['peak_mem_mb']:,.0f} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def load_config(argv):
    """(tools/ablate.py's keys, train.py's keys): config files and --key=value may set both."""
    merged, _ = configurator.load(argv, "tools/ablate.py", extends=("train.py",), doc=__doc__)
    own = [*configurator.defaults("tools/ablate.py"), "overwrite"]  # overwrite: train.py's key, read here for the run dirs
    return {k: merged[k] for k in own}, {k: merged[k] for k in configurator.defaults("train.py")}


def main(argv):
    a, c = load_config(argv)
    configurator.check_folder("ablate_dir", a["ablate_dir"])
    base = configurator.defaults("train.py")  # (out_dir: a config file's is train.py's; runs go to ablate_dir/<variant>)
    for key, why in (("init_from", "every variant trains from scratch (the same command again resumes them); "
                                   "fine-tune one run with train.py --init_from"),
                     ("preflight", "tools/ablate.py checks every variant's config before the first trains; "
                                   "train.py --preflight checks one run's"),
                     ("eval_only", "evaluate one variant's run with train.py --out_dir=<ablate_dir>/<variant> --eval_only")):
        if c[key] != base[key]:
            raise configurator.ConfigError(key, c[key], f"is not for tools/ablate.py: {why}")
    data_dir, meta = ready_data(c)  # before any run directory is made (a bundled corpus is prepared here)
    check_data(c, data_dir, meta)
    a["data"] = meta["tokens_sha1"]  # stamped with each run: a finished run is reused only on the same tokens
    a["stop_iter"] = c["stop_iter"]  # every run stops there; the same command without it continues them

    def run_args(name, **sweep):  # the whole config as explicit --key=value where it differs from train.py's
        # defaults, so the arguments stamped in a run dir are canonical, whichever files and flags produced them
        v = {**c, **variant_changes(c, name), **sweep}
        skip = ("out_dir", "overwrite", "init_from", "stop_iter")  # set per run, or not part of the result
        return [f"--{k}={x!r}" for k, x in v.items() if x != base[k] and k not in skip]
    names = [v.strip() for v in a["variants"].split(",") if v.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"variants={a['variants']!r}: give distinct names from {', '.join(VARIANTS)}")
    try:  # ablate_dir is locked by the first run_variant (ck.hold_out_dir), for the whole ablation
        if a["lrs"] or a["seeds"]:
            return sweep(a, c, names, run_args)
        if a["seeds_at"] != "all":
            raise configurator.ConfigError("seeds_at", a["seeds_at"], "applies to a sweep: give --seeds (and --lrs)")
        plans = {n: run_args(n) for n in names}  # every rank is derived (and checked) up front
        for args in plans.values():
            check_run(args, a)
        out = Path(a["ablate_dir"])
        base_ne = non_embedding_params(c, param="crnet", rank=c["rank"])
        seconds = {n: run_variant(n, args, out / n, a, c["max_iters"]) for n, args in plans.items()}
        unfinished = [n for n in plans if not finished(out / n, c["max_iters"])]
        if unfinished:
            raise SystemExit(f"not finished: {', '.join(unfinished)} (stop_iter={c['stop_iter']}); run the same command "
                             f"without --stop_iter to continue them from their checkpoints")
        results = [summarize(n, out / n, seconds[n], base_ne) for n in plans]
        device = c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        publish(out, table(results, c, device), results, a["plot"])
        return results
    finally:
        ck.release_out_dir(a["ablate_dir"])


def publish(out, text, curves, with_plot):
    """out/results.md (written whole, then renamed), printed too, and the curves' plot out/loss.png."""
    write_atomic(out / "results.md", text)
    print("\n" + text + f"\nwrote {out / 'results.md'}")
    if with_plot:
        drawn = draw([(r["variant"], r["curve"]) for r in curves], out / "loss.png")
        print(f"wrote {out / 'loss.png'}" if drawn else "no plot: matplotlib is not installed (optional: pip install matplotlib)")


def parse_list(a, key, kind, default):
    try:
        xs = [kind(x) for x in a[key].split(",") if x.strip()] or [default]
    except ValueError:
        raise configurator.ConfigError(key, a[key], f"must be comma-separated {kind.__name__}s") from None
    if len(set(xs)) != len(xs) or (kind is float and min(xs) <= 0):
        raise configurator.ConfigError(key, a[key], "must be distinct (and, for lrs, positive)")
    return xs


def sweep(a, c, names, run_args):
    """Every variant at every lr and seed, each in ablate_dir/<variant>/lr<lr>_seed<seed>/; the table reports each
    variant at the lr with the best mean final val loss over the seeds, with the spread (max - min) there.
    seeds_at="best": the first seed runs at every lr, the others only at each variant's best lr on the first."""
    lrs = parse_list(a, "lrs", float, c["learning_rate"])
    seeds = parse_list(a, "seeds", int, c["seed"])
    later = seeds[1:] if a["seeds_at"] == "best" else []
    out = Path(a["ablate_dir"])
    for n in names:  # every run's config is checked before the first one trains
        for lr in lrs:
            for seed in seeds:
                check_run(run_args(n, learning_rate=lr, seed=seed), a)
    where = lambda n, lr, s: out / n / f"lr{lr:g}_seed{s}"
    base_ne = non_embedding_params(c, param="crnet", rank=c["rank"])

    def train(keys):
        seconds = {k: run_variant(f"{k[0]} lr={k[1]:g} seed={k[2]}", run_args(k[0], learning_rate=k[1], seed=k[2]),
                                  where(*k), a, c["max_iters"]) for k in keys}
        unfinished = [f"{n} lr={lr:g} seed={s}" for (n, lr, s) in keys if not finished(where(n, lr, s), c["max_iters"])]
        if unfinished:
            raise SystemExit(f"not finished: {', '.join(unfinished)}; run the same command without --stop_iter to continue")
        return {k: summarize(k[0], where(*k), seconds[k], base_ne) for k in keys}

    done = train([(n, lr, s) for n in names for lr in lrs for s in seeds if s not in later])
    vals = lambda n, lr: [done[(n, lr, s)]["val_loss"] for s in seeds if (n, lr, s) in done]
    mean = lambda n, lr: sum(vals(n, lr)) / len(vals(n, lr))
    best = {n: min(lrs, key=lambda lr: mean(n, lr)) for n in names}  # over the seeds every lr has
    if later:
        done |= train([(n, best[n], s) for n in names for s in later])
    rows, curves = [], []
    for n in names:
        v, r = vals(n, best[n]), done[(n, best[n], seeds[0])]
        spread = f"{max(v) - min(v):.4f}" if math.isfinite(max(v)) else "-"
        cell = lambda lr: f"{mean(n, lr):.4f}" + (f" ({len(vals(n, lr))} seed)" if len(vals(n, lr)) < len(seeds) else "")
        rows.append(f"| {n} | {r['non_embedding']:,} | {best[n]:g} | {mean(n, best[n]):.4f} | {spread} | "
                    + " | ".join(cell(lr) for lr in lrs) + f" | {r['tokens_per_s']:,.0f} |")
        curves.append({**r, "variant": f"{n} (lr {best[n]:g})"})
    how = "; best lr on the first seed, the others run there only" if later else ""
    text = (f"{c['arch']} h={c['n_embd']} L={c['n_layer']}, CR-Net rank {c['rank']}; {c['max_iters']} steps x "
            f"{c['total_batch_tokens']:,} tokens; seeds {', '.join(map(str, seeds))}{how}; data {c['data_dir']}\n"
            "| variant | non-emb params | best lr | mean final val loss at best lr | spread (max - min) | "
            + " | ".join(f"mean at lr {lr:g}" for lr in lrs) + " | tokens/s (best lr, first seed) |\n"
            + "|---" * (6 + len(lrs)) + "|\n" + "\n".join(rows) + "\n")
    publish(out, text, curves, a["plot"])
    return rows


if __name__ == "__main__":
    configurator.main_guard(main)
