"""
What a training run writes for people to watch, besides its checkpoints (checkpoint.py): config.json, metrics.jsonl
(one JSON row per log line and per evaluation, appended and flushed as written) and, with log_to, TensorBoard
and Weights & Biases, imported only when asked for (both optional).
"""
import importlib.util
import json
import os
import shutil
import uuid

import checkpoint as ck
from configurator import ConfigError

SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # log_to name -> the package it needs (optional)


def sinks(c):
    return [x.strip() for x in c["log_to"].split(",") if x.strip()]


def check_sinks(c):
    """log_to names known sinks whose (optional) packages are installed: checked before any work."""
    for name in sinks(c):
        if name not in SINKS:
            raise ConfigError("log_to", c["log_to"], f"names {name!r}; choose from {', '.join(SINKS)}")
        if importlib.util.find_spec(SINKS[name]) is None:
            raise ConfigError("log_to", c["log_to"], f"needs the {SINKS[name]} package, which is optional: "
                                                     f"pip install {SINKS[name]}")


def start_logs(c, out, start_iter):
    """config.json, and metrics.jsonl without rows an interrupted run wrote after its last checkpoint (both atomic).
    A new run (scratch or fine-tuning; train.py asks for --overwrite where out_dir holds a checkpoint) removes what
    an earlier run left there (checkpoints, best/, TensorBoard), but only once wandb, the one sink that can fail,
    has started. Returns log(row): appends the row to metrics.jsonl and hands it to the log_to sinks."""
    ck.hold_out_dir(out)  # (if refuse_to_clobber has not: an out_dir made now)
    wandb_sink = [open_sink("wandb", c, out, start_iter)] if "wandb" in sinks(c) else []
    (out / "diverged.json").unlink(missing_ok=True)
    if c["init_from"] != "resume":
        ck.remove_run(out)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    else:
        ck.recover_best(out)
    write_atomic(out / "config.json", json.dumps(c, indent=2) + "\n")
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = []
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a kill during an append
        keep = [r for r in rows if r["iter"] <= start_iter] if c["init_from"] == "resume" else []
        write_atomic(metrics, "".join(json.dumps(r) + "\n" for r in keep))
    outs = wandb_sink + ([open_sink("tensorboard", c, out, start_iter)] if "tensorboard" in sinks(c) else [])

    def log(row):
        log_metrics(metrics, row)
        for sink in outs:
            sink(row)
    return log


def open_sink(name, c, out, start_iter):
    """A metrics sink beside metrics.jsonl. A resumed run continues the same TensorBoard log (steps after the
    checkpoint purged) and the same wandb run (its id kept in out_dir/wandb_id)."""
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        w = SummaryWriter(str(out / "tensorboard"), purge_step=start_iter + 1 if start_iter else None)
        ck.SINKS.append(lambda exit_code: w.close())  # (as train.main leaves: ck.releasing)

        def sink(row):
            for k, v in row.items():
                if k != "iter" and isinstance(v, (int, float)):
                    w.add_scalar(k, v, row["iter"])
            w.flush()
        return sink
    import wandb
    id_file = out / "wandb_id"
    resume = c["init_from"] == "resume" and id_file.is_file()
    run_id = id_file.read_text().strip() if resume else uuid.uuid4().hex[:12]
    try:
        run = wandb.init(project=c["wandb_project"], name=out.name, id=run_id, resume="allow", dir=str(out))
    except Exception as e:  # no login, no network, a bad project name: the user's setup, not a bug here
        raise ValueError(f"log_to='wandb': wandb.init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"run `wandb login`, or set WANDB_MODE=offline") from None
    ck.SINKS.append(lambda exit_code: run.finish(exit_code=exit_code))  # nonzero: wandb marks the run failed
    write_atomic(id_file, run_id)
    run.config.update(c, allow_val_change=True)  # a resumed run may change the keys FREE_ON_RESUME lists
    # wandb keeps the first value logged at a step: rows replayed after a kill keep their first values, which
    # equal the replayed ones (exact resume) unless max_iters was changed on resuming
    return lambda row: run.log({k: v for k, v in row.items() if k != "iter"}, step=row["iter"])


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    ck.fsync(tmp)  # on disk before the rename publishes it
    os.replace(tmp, path)


def log_metrics(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def fmt_time(s):
    return f"{s / 3600:.1f}h" if s >= 3600 else f"{s / 60:.1f}m" if s >= 60 else f"{s:.0f}s"
