"""analyze.py: the observation's arithmetic against constructions with known answers, and the CLI end to end."""
import pytest
import torch

import analyze
import train
from conftest import TINY


def test_rank_r_error_matches_an_explicit_projection():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200, 24, generator=g) @ torch.diag(torch.linspace(2, 0.1, 24, dtype=torch.float32))
    u, s, vh = torch.linalg.svd(y.double(), full_matrices=False)
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]  # the rank-5 truncation, built explicitly
    assert analyze.tail_energy(y, 5) == pytest.approx((y.double() - best).norm().item(), rel=1e-9)


def test_observation_on_a_cross_layer_low_rank_residual():
    """Y_l = 0.6 Y_{l-1} + (rank 4): with beta* = 0.6 the residual would be exactly rank 4; the least-squares
    beta* is slightly off (the rank-4 part correlates with Y_{l-1} by chance), leaving a small error, while
    Y_l itself (full rank) is far from rank 4."""
    g = torch.Generator().manual_seed(1)
    prev = torch.randn(300, 32, generator=g)
    y = 0.6 * prev + torch.randn(300, 4, generator=g) @ torch.randn(4, 32, generator=g) * 0.3
    o = analyze.observation(prev, y, 4)
    assert o["residual"] < 0.01 and o["direct"] > 0.3 and o["ratio"] < 0.03
    assert o["beta"] == pytest.approx(0.6, abs=0.05)
    assert o["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(y.flatten(), prev.flatten(), dim=0).item())
    unrelated = analyze.observation(torch.randn(300, 32, generator=g), y, 4)  # no shared component: no gain
    assert unrelated["ratio"] > 0.95


def test_cli_on_a_trained_checkpoint(tiny_data, tmp_path, capsys):
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--param=full", "--max_iters=4",
                       "--eval_interval=4"])
    capsys.readouterr()
    rows = analyze.main([f"--out_dir={tmp_path}", "--tokens=256", "--rank=4"])
    out = capsys.readouterr().out
    assert len(rows) == 2 * 7 and "| 2 | q |" in out and "| 3 | down |" in out and "ratio residual/direct" in out
    with pytest.raises(ValueError, match="less than one block"):
        analyze.main([f"--out_dir={tmp_path}", "--tokens=8"])
