"""tools/bench.py's arithmetic: tokens/s, MFU and the "vs full" ratios, with the rows' processes faked."""
from types import SimpleNamespace

import pytest
import torch

from conftest import table_cells
from model import Transformer, model_config
from tools import bench


def test_bench_sizes_vs_full_is_row_over_full(monkeypatch, capsys):
    def row(*args, **_):
        return {"step_s": 1.0, "tps": 1000.0 if "--param=full" in args else 3000.0, "peak": 2 ** 30, "mfu": None}
    monkeypatch.setattr(bench, "fresh_process", row)
    bench.main(["sizes", "--sizes=60m", "--batch=1"])
    rows = [table_cells(l) for l in capsys.readouterr().out.splitlines() if l.startswith("| 60m |")]
    assert [r[6] for r in rows if r[5] != "-"] == ["1.000x", "1.000x", "3.000x", "3.000x", "3.000x"]


def test_bench_gpu_vs_full_is_row_over_full_compiled(monkeypatch, capsys):
    def row(*args, **_):
        full = "--param=full" in args and "--mode=none" in args and "--torch_compile=True" in args
        return {"step_s": 1.0, "tps": 1000.0 if full else 4000.0, "peak": 2 ** 30, "mfu": 0.25, "first_s": 1.0}
    monkeypatch.setattr(bench, "fresh_process", row)
    bench.main(["gpu", "--sizes=60m", "--budget_s=1000"])
    rows = [table_cells(l) for l in capsys.readouterr().out.splitlines() if l.startswith("| 60m |")]
    assert rows[0][7] == "1.00x" and rows[1][7] == "4.00x" and rows[0][8] == "25.0%"


def test_bench_size_one_tokens_per_second_and_mfu(monkeypatch):
    monkeypatch.setattr(bench.par, "peak_flops_for", lambda name: 1e12)
    a = SimpleNamespace(experts="auto", size="60m", param="full", mode="none", batch=1, what="sizes", steps=1,
                        torch_compile=False)
    r = bench.size_one(a)
    assert r["tps"] == pytest.approx(1 * 256 / r["step_s"])
    with torch.device("meta"):
        fpt = Transformer(model_config(bench.size_config(a, "60m", "full", "none", "cpu"))).flops_per_token()
    assert r["mfu"] == pytest.approx(fpt * r["tps"] / 1e12)
