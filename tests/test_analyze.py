"""tools/analyze.py: the observation's arithmetic against constructions with known answers, and the CLI end to end."""
import importlib.util
import subprocess
import sys

import pytest
import torch

from tools import analyze
import train
from conftest import ROOT, TINY, table_cells
from model import ModelConfig


def explicit_tail(m, r):
    """||M - M_r||_F with M_r the rank-r truncation built from a full SVD."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (m.double() - u[:, :r] @ torch.diag(s[:r]) @ vh[:r]).norm().item()


def power_law(n, h, g, alpha=1.0):
    """(n, h) with singular values decaying like k^-alpha, as trained activations roughly do."""
    q1, _ = torch.linalg.qr(torch.randn(n, h, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(h, h, generator=g))
    return q1 @ torch.diag(torch.arange(1, h + 1).float() ** -alpha) @ q2


def test_rank_r_error_matches_an_explicit_projection():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200, 24, generator=g) @ torch.diag(torch.linspace(2, 0.1, 24, dtype=torch.float32))
    assert analyze.tail_energy(y, 5) == pytest.approx(explicit_tail(y, 5), rel=1e-9)


def test_observation_on_a_cross_layer_low_rank_residual():
    """Y_l = 0.6 Y_{l-1} + (rank 4): the best beta is 0.6, where the residual is exactly rank 4; the
    least-squares beta is slightly off (the rank-4 part correlates with Y_{l-1} by chance), leaving a small
    error, while Y_l itself (full rank) is far from rank 4."""
    g = torch.Generator().manual_seed(1)
    prev = torch.randn(300, 32, generator=g)
    y = 0.6 * prev + torch.randn(300, 4, generator=g) @ torch.randn(4, 32, generator=g) * 0.3
    o = analyze.observation(prev, y, 4)
    assert o["direct"] > 0.3
    assert o["best_beta"] == pytest.approx(0.6, abs=1e-5) and o["best_residual"] < 1e-5 and o["best_ratio"] < 1e-5
    assert o["ls_beta"] == pytest.approx(0.6, abs=0.05) and 1e-4 < o["ls_ratio"] < 0.03
    assert o["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(y.flatten(), prev.flatten(), dim=0).item())
    unrelated = analyze.observation(torch.randn(300, 32, generator=g), y, 4)  # no shared component: no gain
    assert 0.95 < unrelated["best_ratio"] <= 1.0 and unrelated["ls_ratio"] > 0.95


def test_least_squares_beta_can_lose_to_beta_zero_where_the_best_beta_wins():
    """Y_{l-1} = L + C, Y_l = 5 L + C with L of rank 4 and large, C full rank and small. Least squares fits
    the large L: beta_ls ~ 5 and the residual -4 C has 4x the tail of Y_l (ratio > 1, worse than beta = 0).
    At beta = 1 the residual 4 L is exactly rank 4: some beta does make the rank-r tail vanish."""
    g = torch.Generator().manual_seed(2)
    L = torch.randn(400, 4, generator=g) @ torch.randn(4, 32, generator=g)
    C = 0.3 * torch.randn(400, 32, generator=g)
    o = analyze.observation(L + C, 5 * L + C, 4)
    assert o["ls_beta"] == pytest.approx(5, abs=0.2) and o["ls_ratio"] > 3
    assert o["best_beta"] == pytest.approx(1, abs=1e-5) and o["best_ratio"] < 1e-4


def test_best_beta_far_beyond_the_norm_ratio_is_found():
    """Y_{l-1} = Pn + 10 L (L rank 4, large), Y_l = 3 Pn: beta = 3 leaves -30 L, exactly rank 4, although
    rho = ||Y_l|| / ||Y_{l-1}|| is ~0.05; the geometric grid out to the bound reaches it."""
    g = torch.Generator().manual_seed(4)
    pn = 0.3 * torch.randn(400, 32, generator=g)
    prev = pn + 10 * torch.randn(400, 4, generator=g) @ torch.randn(4, 32, generator=g)
    o = analyze.observation(prev, 3 * pn, 4)
    assert (3 * pn).norm() / prev.norm() < 0.1 and abs(o["ls_beta"]) < 0.01 and o["ls_ratio"] > 0.99
    assert o["best_beta"] == pytest.approx(3, rel=1e-6) and o["best_ratio"] < 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_best_ratio_never_exceeds_one_or_the_least_squares_ratio(seed):
    g = torch.Generator().manual_seed(10 + seed)
    n, h, r = 256, 48, 12
    cases = {"independent": (torch.randn(n, h, generator=g), torch.randn(n, h, generator=g))}
    prev = power_law(n, h, g)  # trained-like: decaying spectra, partly shared, partly new directions
    cases["trained-like"] = (prev, 0.3 * prev @ power_law(h, h, g, 0.3) + power_law(n, h, g, 1.5) * (seed + 1))
    cases["anti-correlated"] = (prev, -0.8 * prev + 0.005 * torch.randn(n, h, generator=g))
    for name, (p, y) in cases.items():
        o = analyze.observation(p, y, r)
        assert o["best_ratio"] <= 1.0 and o["best_ratio"] <= o["ls_ratio"] + 1e-9, name
        if o["best_beta"] == 0.0:
            assert o["best_ratio"] == 1.0, name


def test_best_beta_tail_matches_an_explicit_svd_and_beats_a_fine_grid():
    g = torch.Generator().manual_seed(3)
    prev = power_law(200, 24, g)
    y = 0.7 * prev @ power_law(24, 24, g, 0.2) + 0.05 * torch.randn(200, 24, generator=g)
    r = 5
    beta, tail_sq = analyze.best_beta(prev, y, r)
    at_beta = explicit_tail(y.double() - beta * prev.double(), r)  # the oracle, at the returned beta
    assert tail_sq ** 0.5 == pytest.approx(at_beta, rel=1e-8)
    s = (y.norm() / prev.norm()).item()
    brute = min(explicit_tail(y.double() - b * prev.double(), r) for b in torch.linspace(-2 * s, 2 * s, 401).tolist())
    assert at_beta <= brute * (1 + 1e-9) and at_beta <= explicit_tail(y, r)


def test_rank_must_leave_a_tail():
    analyze.check_rank(31, (32, 64), 256)
    for r, n_tokens, why in [(32, 256, r"<= 31: .*width \(32\)"), (1000, 256, "<= 31"), (0, 256, "1 <= rank"),
                             (20, 20, r"<= 19: .*tokens \(20\)")]:
        with pytest.raises(ValueError, match=f"^rank={r}: must be .*{why}"):
            analyze.check_rank(r, (32, 64), n_tokens)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """{param: out_dir} of two tiny checkpoints, a full-rank one and a CR-Net one (rank 8)."""
    outs = {}
    for param in ("full", "crnet"):
        out = tmp_path_factory.mktemp(param)
        train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={out}", f"--param={param}", "--max_iters=4",
                           "--eval_interval=4"])
        outs[param] = out
    return outs


def test_cli_on_a_trained_checkpoint(trained, tmp_path, capsys):
    capsys.readouterr()
    png = tmp_path / "obs.png"
    rows = analyze.main([f"--out_dir={trained['full']}", "--tokens=256", "--rank=4", f"--plot={png}"])
    out = capsys.readouterr().out
    assert len(rows) == 2 * 7 and "| 2 | q |" in out and "| 3 | down |" in out
    assert "LS beta median" in out and "best beta median" in out and "of 14 (paper" in out and "by construction" not in out
    assert all(o["best_ratio"] <= 1.0 and o["best_ratio"] <= o["ls_ratio"] + 1e-9 for *_, o in rows)
    if importlib.util.find_spec("matplotlib"):
        assert png.is_file() and [p.name for p in tmp_path.iterdir()] == ["obs.png"]  # no temp file left
    else:
        assert "no plot: matplotlib is not installed" in out and not png.exists()
    with pytest.raises(ValueError, match="less than one block"):
        analyze.main([f"--out_dir={trained['full']}", "--tokens=8"])


def test_cli_rank_errors_name_the_rank(trained, monkeypatch):
    for r in (32, 1000):  # n_embd = 32
        monkeypatch.setattr(sys, "argv", ["tools/analyze.py", f"--out_dir={trained['full']}", "--tokens=256", f"--rank={r}"])
        with pytest.raises(SystemExit, match=f"^error: rank={r}: must be 1 <= rank <= 31: below the narrowest projection width"):
            analyze.configurator.main_guard(analyze.main)


def test_cli_rank2_errors_name_rank2(trained, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/analyze.py", f"--out_dir={trained['full']}", "--tokens=256", "--rank2=40"])
    with pytest.raises(SystemExit, match="^error: rank2=40: must be 1 <= rank2 <= 31: below the narrowest projection"):
        analyze.configurator.main_guard(analyze.main)


def test_cli_on_a_one_layer_run_says_there_is_no_pair(tiny_data, tmp_path, monkeypatch, capsys):
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--n_layer=1", "--max_iters=2",
                       "--eval_interval=2"])
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["tools/analyze.py", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="^error: .*: one layer, so no pair of layers"):
        analyze.configurator.main_guard(analyze.main)
    assert capsys.readouterr().out == ""  # before the table's header line


def test_cli_hf_that_is_a_plain_file_says_what_hf_takes(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    monkeypatch.setattr(sys, "argv", ["tools/analyze.py", f"--hf={tmp_path / 'weights.bin'}"])
    with pytest.raises(SystemExit, match=r"^error: hf='.*weights.bin': is a file, not a model: --hf takes a Hugging "
                                         r"Face model directory \(config.json and weights\), a hub name or a .gguf file$"):
        analyze.configurator.main_guard(analyze.main)


def test_crnet_checkpoint_says_the_structure_is_built_in(trained, capsys):
    capsys.readouterr()
    rows = analyze.main([f"--out_dir={trained['crnet']}", "--tokens=256", "--rank=8"])  # r = the model's rank
    out = capsys.readouterr().out
    assert "param=crnet" in out and "holds by construction" in out and "full-rank model" in out
    assert all(o["best_ratio"] < 1e-3 for *_, o in rows)  # Y_l - s Y_{l-1} = X A B has rank 8: nothing left
    model, _ = analyze.load_for_inference(trained["crnet"])
    s = {(l + 1, p): model.blocks[l].qkv.scale()[j].item() for l in (1, 2) for j, p in enumerate("qkv")}
    assert all(o["best_beta"] == pytest.approx(s[(l, p)], abs=1e-4) for l, p, o in rows if p in "qkv")  # the model's s


def test_plot_names_a_binary_metrics_file(tmp_path):
    from tools import plot
    (tmp_path / "metrics.jsonl").write_bytes(b'{"iter": 1, "loss": 2.0}\n' + bytes(range(128, 256)))
    with pytest.raises(ValueError, match=r"^.*/metrics.jsonl:2: not UTF-8 text \(invalid start byte\); is it a binary"):
        plot.read_rows(tmp_path)


def test_help_lists_the_keys_and_exits_zero():
    p = subprocess.run([sys.executable, "tools/analyze.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "arXiv 2509.18993" in p.stdout and all(f"--{k}=" in p.stdout for k in ("out_dir", "rank", "tokens", "below", "plot"))


# ---------------------------------------------------------------- the fast estimator against the reference
def fast_cases(seed):
    g = torch.Generator().manual_seed(seed)
    n, h = 400, 48
    prev = power_law(n, h, g)
    low = lambda k: torch.randn(n, k, generator=g) @ torch.randn(k, h, generator=g)
    return {"trained-like": (prev, 0.3 * prev @ power_law(h, h, g, 0.3) + power_law(n, h, g, 1.5) * (seed + 1)),
            "independent": (torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)),
            # (+ a little full-rank noise: where the best tail is exactly 0, its norm is V-shaped in beta and either
            # search pins it only to its beta tolerance times ||Y_{l-1}||)
            "cross-layer low rank": (prev, 0.6 * prev + 0.3 * low(4) + 0.01 * torch.randn(n, h, generator=g)),
            "far beta": (0.3 * prev + 10 * low(4), 0.9 * prev + 0.01 * torch.randn(n, h, generator=g)),
            "rank-deficient (SwiGLU-like)": (low(20), low(20) + 0.5 * low(20))}


@pytest.mark.parametrize("seed", range(3))
def test_fast_estimator_equals_the_reference(seed):
    """observe (one spectrum for both ranks, reduced basis, pruned grid, Brent) against observation (explicit
    SVDs, full grid, golden section): errors, ratios and cosines to 1e-5; betas to 1e-3 of max(|beta|, ||Y_l|| /
    ||Y_{l-1}||) (near its minimum the tail is flat in beta, so beta is pinned less tightly than the tail)."""
    for name, (p, y) in fast_cases(seed).items():
        fast = analyze.observe(analyze.grams(p, y), [12, 6])
        rho = (y.norm() / p.norm()).item()
        for r in (12, 6):
            ref = analyze.observation(p, y, r)
            for k, v in ref.items():
                tol = 1e-3 * max(rho, abs(v)) if "beta" in k else 1e-5
                assert abs(fast[r][k] - v) <= tol, (name, r, k, v, fast[r][k])


def test_fast_estimator_can_fail_where_the_search_is_wrong(monkeypatch):
    """Without its refinement the search stops at a grid point: the comparison above would see it."""
    p, y = fast_cases(0)["cross-layer low rank"]
    monkeypatch.setattr(analyze, "brent", lambda f, lo, hi, tol: lo)
    fast = analyze.observe(analyze.grams(p, y), [4])[4]
    assert abs(fast["best_beta"] - analyze.observation(p, y, 4)["best_beta"]) > 1e-3


def test_measure_in_the_forward_equals_the_reference_on_collected_outputs(trained, tiny_data):
    """The hooks' per-layer Grams (two layers held at a time) give what the reference gives on every output."""
    import numpy as np
    model, _ = analyze.load_for_inference(trained["full"])
    val = np.memmap(tiny_data / "val.bin", dtype=np.uint16, mode="r")
    idx = torch.from_numpy(val[:256].astype(np.int64)).view(8, 32)
    ys = analyze.collect_outputs(model, idx)
    m = analyze.Measure(model, [4, 2], controls=True)
    with torch.no_grad():
        model(idx)
    m.remove()
    outs = [row for row in m.rows if row["key"] in analyze.NAMES_ALL]
    assert len(outs) == 2 * 7 and {row["key"] for row in m.rows} - analyze.NAMES_ALL == {"resid", "attn_in", "o_in",
                                                                                          "mlp_in", "down_in"}
    for row in outs:
        l, p = row["layer"] - 1, row["key"]
        for r in (4, 2):
            ref = analyze.observation(ys[(l - 1, p)], ys[(l, p)], r)
            assert row[f"r{r}"]["best_ratio"] == pytest.approx(ref["best_ratio"], abs=1e-5)
            assert row[f"r{r}"]["direct"] == pytest.approx(ref["direct"], abs=1e-5)


def test_analyze_table_columns_match_the_header(capsys):
    o = {"cosine": 0.111, "direct": 0.2222, "ls_ratio": 0.333, "best_ratio": 0.444, "best_beta": 0.555}
    analyze.print_table([(2, "q", {**o, "at": {4: o}})], [4], 0.95)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|")]
    row = dict(zip(table_cells(lines[0]), table_cells(lines[2])))
    assert row["cosine"] == "0.111" and row["direct r=4"] == "0.2222" and row["ratio LS r=4"] == "0.333"
    assert row["ratio best r=4 (beta)"] == "0.444 (0.555)"


def test_structure_note_ignores_layer_one_rank():
    cfg = ModelConfig(param="crnet", n_layer=3, n_head=2, n_embd=64, intermediate_size=128, rank=[48, 8, 8])
    note = analyze.structure_note(cfg)
    assert "rank(X A B) <= 8 at" in note
