import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A tiny model that trains in a second or two: every training test starts from these keys.
TINY = ["--n_layer=3", "--n_head=2", "--n_embd=32", "--intermediate_size=64", "--rank=8", "--block_size=32",
        "--batch_size=4", "--total_batch_tokens=128", "--eval_tokens=512", "--learning_rate=3e-3",
        "--warmup_iters=5", "--log_interval=1", "--cpu_threads=1"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """300 KB of the bundled corpus, byte-tokenized."""
    from prepare_data import prepare
    d = tmp_path_factory.mktemp("data")
    src = d / "small.txt"
    src.write_text((ROOT / "data" / "shakespeare.txt").read_text()[:300_000])
    prepare(d / "byte", tokenizer="byte", files=[src], piece_chars=5000)
    return d / "byte"


@pytest.fixture(autouse=True)
def no_lock_left_behind():
    """A test that locks an out_dir through checkpoint's functions themselves (ablate.run_variant, runlog.start_logs),
    not through train.main, has it freed here: each test starts with no lock held, as a fresh process would."""
    yield
    import checkpoint
    for out in list(checkpoint.HELD):
        checkpoint.release_out_dir(out)
    checkpoint.SINKS.clear()


def read_metrics(out_dir):
    import json
    return [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def table_cells(line):
    """The cells of one markdown table row, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]
