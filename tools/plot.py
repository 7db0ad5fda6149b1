"""
Training curves of one or more runs, from their metrics.jsonl: train loss (every log_interval), val loss (every
eval) and the learning rate. Needs matplotlib (optional: pip install matplotlib).

    python tools/plot.py out                                  # writes out/curves.png
    python tools/plot.py out/ablate/crnet out/ablate/full --out=crnet_vs_full.png --x=tokens

Run directories are given as bare arguments (or --runs=a,b); a run may still be training: its rows so far are drawn.
"""
import json
import sys
import os
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python tools/x.py: the core modules are one folder up

import configurator

# ----------------------------------------------------------------------------- config
runs = ""           # comma-separated run directories; bare directory arguments are added to them
out = ""            # the image; "" = <first run>/curves.png
x = "iter"          # the x axis: optimizer steps or tokens seen {iter|tokens}
# -----------------------------------------------------------------------------


def read_rows(run):
    """metrics.jsonl's rows; a last line cut short (a run killed while appending) is skipped."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} is not a train.py run directory (or has logged nothing yet)")
    raw = path.read_bytes()
    try:
        rows, lines = [], raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:  # (train.py writes ASCII: a binary file, not a row cut short)
        at = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{at}: not UTF-8 text ({e.reason}); is it a binary file?") from None
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}:{n} is not a JSON row") from None
    return rows


def draw(curves, path, x="iter"):
    """curves: [(label, metrics rows)]. Writes path (whole, then renamed); False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for label, rows in curves:
        step_tokens = next((r["tokens"] // r["iter"] for r in rows if "tokens" in r), 1)  # eval rows carry none
        at = lambda r: r["iter"] * step_tokens if x == "tokens" else r["iter"]
        tr, ev = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
        line, = ax.plot([at(r) for r in tr], [r["loss"] for r in tr], lw=1, alpha=0.6, label=f"{label} train")
        ax.plot([at(r) for r in ev], [r["val_loss"] for r in ev], "o-", color=line.get_color(), label=f"{label} val")
        ax_lr.plot([at(r) for r in tr], [r["lr"] for r in tr], color=line.get_color())
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen" if x == "tokens" else "iteration")
    for a in (ax, ax_lr):
        a.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def save_figure(fig, path):
    """fig written whole to a temporary name beside path, then renamed (a kill leaves the old image or the new);
    the figure is closed either way. tools/analyze.py saves through this too."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same directory: the rename is atomic
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def image_path(key, value):
    """The config value `key` as a path an image can be written to, checked before any work: its extension
    names an image format and its directory exists."""
    path = Path(value)
    if path.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise configurator.ConfigError(key, value, "needs an image extension: .png, .pdf, .svg or .jpg")
    if not path.parent.is_dir():
        raise configurator.ConfigError(key, value, f"its directory {path.parent} does not exist")
    return path


def main(argv):
    dirs = [a for a in argv if not a.startswith("-") and not a.endswith(".py")]
    c, _ = configurator.load([a for a in argv if a not in dirs], "tools/plot.py", doc=__doc__)
    runs = dirs + [r.strip() for r in c["runs"].split(",") if r.strip()]
    if not runs:
        raise ValueError("no runs given: python tools/plot.py <run dir> [<run dir> ...]")
    path = image_path("out", c["out"]) if c["out"] else Path(runs[0]) / "curves.png"
    curves = [(str(r).rstrip("/"), read_rows(r)) for r in runs]
    if not draw(curves, path, c["x"]):
        raise ValueError("tools/plot.py needs matplotlib, which is optional: pip install matplotlib")
    print(f"wrote {path}")


if __name__ == "__main__":
    configurator.main_guard(main)
