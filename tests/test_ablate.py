"""tools/ablate.py: ranks against models counted one by one, the runner end to end (reuse, resume, refusals)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from tools import ablate
import configurator
import train
from checkpoint import load_for_inference
from model import ModelConfig, Transformer
from conftest import table_cells


def counted(c, **changes):
    """Non-embedding parameters of a model built and counted tensor by tensor (the oracle)."""
    with torch.device("meta"):
        m = Transformer(ModelConfig(**{**{k: c[k] for k in ModelConfig.field_names()}, "vocab_size": 257, **changes}))
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("wte", "wpe", "lm_head")))


@pytest.mark.parametrize("argv", [[], ["configs/ablate_llama_60m.py"], ["configs/crnet_llama_130m.py"],
                                  ["configs/crnet_gpt2_124m.py"]], ids=["cpu-default", "60m", "130m", "gpt2"])
def test_matched_ranks_are_the_nearest_and_within_2_percent(argv):
    c = ablate.load_config(argv)[1]
    target = counted(c, param="crnet", rank=c["rank"])
    for param in ("lowrank", "cola"):
        r = ablate.variant_changes(c, param)["rank"]
        err = lambda rr: abs(counted(c, param=param, rank=rr) - target)
        assert err(r) <= 0.02 * target and err(r) <= err(r - 1) and err(r) <= err(r + 1), (param, r)
    ratio = target / counted(c, param="full")
    assert 0.4 < ratio < 0.6  # "crnet at about half of full": 0.547 (CPU default), 0.47 (60M)


@pytest.mark.parametrize("n_layer,rank", [(4, 48), (8, 128), (24, 256), (3, 7)])
def test_middle_heavy_ranks_keep_crnet_count_and_peak_in_the_middle(n_layer, rank):
    c = {**configurator.defaults("train.py"), "n_layer": n_layer, "rank": rank, "n_embd": 1024, "n_head": 8, "intermediate_size": 2736}
    ranks = ablate.variant_changes(c, "crnet_middle_heavy")["rank"]
    inner = ranks[1:]
    assert len(ranks) == n_layer and sum(inner) == (n_layer - 1) * rank
    assert counted(c, param="crnet", rank=ranks) == counted(c, param="crnet", rank=rank)
    assert all(abs(a - b) <= 1 for a, b in zip(inner, inner[::-1]))  # symmetric up to the rounding
    if n_layer >= 4:
        assert max(inner) == inner[(n_layer - 1) // 2] > inner[0] and inner[-1] < max(inner)


def test_variant_errors():
    c = configurator.load([], "train.py")[0]
    with pytest.raises(ValueError, match="unknown variant 'crnet_fixed'"):
        ablate.variant_changes(c, "crnet_fixed")
    with pytest.raises(ValueError, match="needs one CR-Net rank"):
        ablate.variant_changes({**c, "rank": [48] * 4}, "lowrank")
    tiny = {**c, "n_layer": 2, "n_embd": 8, "n_head": 2, "intermediate_size": 8, "rank": 1}
    with pytest.raises(ValueError, match="no cola rank matches CR-Net's"):  # one rank step is ~20% of the count here
        ablate.variant_changes(tiny, "cola")
    assert ablate.variant_changes({**c, "recompute": "crnet"}, "cola")["recompute"] == "block"
    # a variant without lanes everywhere falls back to block checkpointing, keep_z with it, and passes train.py's checks
    moe = {**c, "arch": "qwen3_moe", "n_expert": 4, "recompute": "reversible", "keep_z": False}
    for name in ("full", "crnet_nolane"):
        v = ablate.variant_changes(moe, name)
        assert (v["recompute"], v["keep_z"]) == ("block", True)
        ablate.check_run([f"--{k}={x!r}" for k, x in {**moe, **v}.items() if x != c[k]], {"nproc": 1, "stop_iter": 0})
    assert "recompute" not in ablate.variant_changes(moe, "crnet")  # the base config's reversible stays


SMALL = ["configs/cpu_debug.py", "--max_iters=8", "--eval_interval=4", "--log_interval=2", "--eval_tokens=2048", "--plot=False"]


def test_runner_end_to_end_reuse_resume_and_refusals(tmp_path, capsys):
    out = tmp_path / "abl"
    argv = SMALL + [f"--ablate_dir={out}", "--variants=full,crnet,crnet_fixed_beta"]
    results = ablate.main(argv)
    table = (out / "results.md").read_text()
    for r in results:
        metrics = [json.loads(l) for l in (out / r["variant"] / "metrics.jsonl").read_text().splitlines()]
        assert r["val_loss"] == metrics[-1]["val_loss"] and metrics[-1]["iter"] == 8
        assert f"| {r['variant']} |" in table and f"{r['val_loss']:.4f}" in table
    by = {r["variant"]: r for r in results}
    assert by["full"]["param"] == "full" and by["crnet_fixed_beta"]["non_embedding"] == by["crnet"]["non_embedding"]
    fixed, learnable = (load_for_inference(out / v)[0].blocks[1].qkv.beta for v in ("crnet_fixed_beta", "crnet"))
    assert torch.equal(fixed, torch.full_like(fixed, 0.5 ** 0.5)) and not torch.equal(learnable, fixed)

    # the same command again: nothing is trained, the table is the same
    log = out / "crnet" / "train.log"
    stamp = log.stat().st_mtime_ns
    capsys.readouterr()
    again = ablate.main(argv)
    assert "finished earlier" in capsys.readouterr().out and log.stat().st_mtime_ns == stamp
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in results]

    # other arguments into the same dir: refused, naming the variant; nothing is touched
    with pytest.raises(ValueError, match="holds variant 'crnet' trained with other arguments"):
        ablate.main(SMALL + [f"--ablate_dir={out}", "--variants=crnet", "--learning_rate=0.01"])
    assert log.stat().st_mtime_ns == stamp

    # interrupted at iteration 4, then continued by the same command: equal to the uninterrupted run
    for _ in range(2):  # the stopped command repeated: it stays at its stop_iter (it once trained on to the end)
        with pytest.raises(SystemExit, match="not finished: crnet"):
            ablate.main(SMALL + [f"--ablate_dir={tmp_path / 'b'}", "--variants=crnet", "--stop_iter=4"])
    assert [r["iter"] for r in ablate.read_metrics(tmp_path / "b" / "crnet") if "val_loss" in r][-1] == 4
    resumed = ablate.main(SMALL + [f"--ablate_dir={tmp_path / 'b'}", "--variants=crnet"])
    assert resumed[0]["val_loss"] == by["crnet"]["val_loss"]


def test_runner_refuses_a_foreign_checkpoint(tmp_path):
    train.main(["configs/cpu_debug.py", "--max_iters=2", "--eval_interval=2", "--eval_tokens=2048",
                f"--out_dir={tmp_path / 'abl' / 'crnet'}"])
    before = (tmp_path / "abl" / "crnet" / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match="did not write"):
        ablate.main(SMALL + [f"--ablate_dir={tmp_path / 'abl'}", "--variants=crnet"])
    assert (tmp_path / "abl" / "crnet" / "ckpt.pt").read_bytes() == before


def test_lr_and_seed_sweep_reports_each_variant_at_its_best_lr(tmp_path):
    out = tmp_path / "sweep"
    ablate.main(SMALL + ["--max_iters=4", "--eval_interval=4", f"--ablate_dir={out}", "--variants=full,crnet",
                         "--lrs=1e-4,3e-3", "--seeds=1,2"])
    table = (out / "results.md").read_text()
    for v in ("full", "crnet"):
        finals = {(lr, s): [json.loads(l) for l in (out / v / f"lr{lr}_seed{s}" / "metrics.jsonl").read_text().splitlines()
                            if "val_loss" in l][-1]["val_loss"] for lr in ("0.0001", "0.003") for s in (1, 2)}
        mean = {lr: (finals[(lr, 1)] + finals[(lr, 2)]) / 2 for lr in ("0.0001", "0.003")}
        best = min(mean, key=mean.get)
        assert best == "0.003"  # 4 steps at lr 1e-4 barely move the loss
        spread = abs(finals[(best, 1)] - finals[(best, 2)])
        assert f"| {v} |" in table and f"| {float(best):g} | {mean[best]:.4f} | {spread:.4f} |" in table
    with pytest.raises(ValueError, match="lrs='0.1,x': must be comma-separated floats"):
        ablate.main(SMALL + [f"--ablate_dir={out}", "--lrs=0.1,x"])
    # seeds_at=best: seed 1's runs are reused, seed 3 trains only at each variant's best lr on seed 1
    ablate.main(SMALL + ["--max_iters=4", "--eval_interval=4", f"--ablate_dir={out}", "--variants=full,crnet",
                         "--lrs=1e-4,3e-3", "--seeds=1,3", "--seeds_at=best"])
    assert (out / "crnet" / "lr0.003_seed3").is_dir() and not (out / "crnet" / "lr0.0001_seed3").exists()
    table = (out / "results.md").read_text()
    assert "best lr on the first seed, the others run there only" in table and table.count("(1 seed)") == 2


def test_a_diverging_lr_counts_as_inf_not_a_crash(tmp_path):
    """train.py's non-finite stop (iteration 1, before any row is logged) is read from its diverged.json mark."""
    out = tmp_path / "div"
    ablate.main(SMALL + ["--max_iters=4", "--eval_interval=4", f"--ablate_dir={out}", "--variants=full",
                         "--lrs=1e30", "--seeds=1,2", "--plot=False"])
    assert json.loads((out / "full" / "lr1e+30_seed1" / "ablate.json").read_text())["diverged"] is True
    assert "| full | " in (table := (out / "results.md").read_text()) and "| 1e+30 | inf | - | inf |" in table


def test_runner_checks_data_and_keys_before_making_a_run_dir(tmp_path, capsys):
    """Missing data and train.py keys tools/ablate.py cannot honour are errors before any directory is made; a stamp
    left by a launch that trained nothing does not refuse the corrected command."""
    out = tmp_path / "abl"
    with pytest.raises(FileNotFoundError, match="nowhere holds no prepared data"):
        ablate.main(SMALL + [f"--ablate_dir={out}", "--variants=full", f"--data_dir={tmp_path / 'nowhere'}"])
    for bad, match in [("--init_from=out/x", "init_from='out/x': is not for tools/ablate.py: every variant trains from scratch"),
                       ("--preflight", "preflight=True: is not for tools/ablate.py"),
                       ("--eval_only", "eval_only=True: is not for tools/ablate.py")]:
        with pytest.raises(ValueError, match=match):
            ablate.main(SMALL + [f"--ablate_dir={out}", "--variants=full", bad])
    assert not out.exists()
    (out / "full").mkdir(parents=True)  # what a launch that failed before its first checkpoint leaves
    (out / "full" / "ablate.json").write_text(json.dumps({"args": ["--learning_rate=0.5"], "seconds": 0.0}))
    assert ablate.main(SMALL + ["--max_iters=2", "--eval_interval=2", f"--ablate_dir={out}", "--variants=full"])[0]["val_loss"] < 6


def test_runner_reuses_a_finished_run_only_on_the_same_tokens(tmp_path, tiny_data):
    import shutil
    from prepare_data import prepare
    data, out = tmp_path / "data", tmp_path / "abl"
    shutil.copytree(tiny_data, data)
    argv = SMALL + ["--max_iters=2", "--eval_interval=2", f"--data_dir={data}", f"--ablate_dir={out}", "--variants=full"]
    ablate.main(argv)
    for f in (out / "full").glob("ckpt*.pt"):  # deleted after the sweep to free the disk: metrics.jsonl has the result
        f.unlink()
    log = (out / "full" / "train.log").read_text()
    ablate.main(argv)  # reused, not trained again
    assert (out / "full" / "train.log").read_text() == log
    other = tmp_path / "other.txt"
    other.write_text((ablate.HERE / "data" / "shakespeare.txt").read_text()[-300_000:])
    prepare(data, tokenizer="byte", files=[other], piece_chars=5000)  # prepared again, from other text
    log = (out / "full" / "train.log").read_text()
    with pytest.raises(ValueError, match="holds variant 'full' trained on other tokens than its data_dir holds now"):
        ablate.main(argv)
    assert (out / "full" / "train.log").read_text() == log
    ablate.main(argv + ["--overwrite=True"])  # trains it again, on the new tokens
    assert (out / "full" / "train.log").read_text() != log


@pytest.mark.parametrize("n_layer,rank", [(5, 10), (6, 7), (8, 128), (7, 33)])
def test_middle_heavy_rounds_up_the_largest_remainders(n_layer, rank):
    w = [math.sin(math.pi * k / n_layer) for k in range(1, n_layer)]
    exact = [(n_layer - 1) * rank * x / sum(w) for x in w]
    got = ablate.middle_heavy_ranks(n_layer, rank)[1:]
    up = [e - math.floor(e) for g, e in zip(got, exact) if g > math.floor(e)]
    down = [e - math.floor(e) for g, e in zip(got, exact) if g == math.floor(e)]
    assert all(g in (math.floor(e), math.floor(e) + 1) for g, e in zip(got, exact))
    assert not up or not down or min(up) >= max(down) - 1e-12


def ablation_row(variant, param, ne, vs_crnet, tps, val, best):
    return {"variant": variant, "param": param, "rank": 8, "non_embedding": ne, "vs_crnet": vs_crnet, "total": ne + 10,
            "val_loss": val, "best_val": best, "train_loss": 3.0, "tokens_per_s": tps, "peak_mem_mb": 100.0,
            "seconds": 60.0}


def test_ablate_table_columns_and_ratios():
    c = configurator.defaults("train.py")
    text = ablate.table([ablation_row("full", "full", 2000, 2.0, 1000.0, 1.5, 1.4),
                         ablation_row("crnet", "crnet", 1000, 1.0, 1500.0, 1.25, 1.2)], c, "cpu")
    lines = [l for l in text.splitlines() if l.startswith("|")]
    head = table_cells(lines[0])
    row = table_cells(lines[3])
    assert row[head.index("final val loss")] == "1.2500" and row[head.index("best val")] == "1.2000"
    assert row[4] == "0.500" and row[10] == "1.500"  # vs full: non-emb params, tokens/s (crnet / full)


def test_summarize_vs_crnet_is_variant_over_crnet(tmp_path):
    c = {**configurator.defaults("train.py"), "param": "full", "vocab_size": 257}
    (tmp_path / "config.json").write_text(json.dumps(c))
    (tmp_path / "metrics.jsonl").write_text('{"iter": 1, "loss": 3.0, "tokens_per_s": 10, "peak_mem_mb": 1}\n'
                                            '{"iter": 1, "val_loss": 2.5, "train_loss": 3.0}\n')
    base = ablate.non_embedding_params(c, param="crnet", rank=c["rank"])
    r = ablate.summarize("full", tmp_path, 1.0, base)
    assert r["vs_crnet"] == pytest.approx(r["non_embedding"] / base) and r["vs_crnet"] > 1


def test_resumed_run_keeps_its_earlier_seconds(tmp_path, monkeypatch):
    run = tmp_path / "crnet"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"x")  # found, not opened: resume
    args = ["--param='crnet'"]
    (run / "ablate.json").write_text(json.dumps({"args": args, "seconds": 100.0, "data": "d"}))
    fake = SimpleNamespace(stdout=iter(["step\n"]), wait=lambda: 0, returncode=0)
    monkeypatch.setattr(ablate.subprocess, "Popen", lambda *a, **k: fake)
    a = {"overwrite": False, "data": "d", "nproc": 1, "stop_iter": 0, "ablate_dir": str(tmp_path)}
    assert ablate.run_variant("crnet", args, run, a, 8) >= 100.0


def test_a_signal_reaches_the_run_in_progress_which_saves_before_the_ablation_stops(tmp_path):
    """SIGTERM to tools/ablate.py alone (a scheduler's notice): passed on to train.py, which saves at the end of its
    step while ablate.py goes on reading its output (exiting first closed the pipe, and train.py died on its next
    printed line, before the save); exit 0, the next variant not started. Then Ctrl-C to the whole process group
    during the same command repeated: it resumed from that checkpoint, saves again, exits 130. Then SIGUSR1 with the
    run under torchrun (2 processes), which passes on only the signals it is told to: saved again, exit 0."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    from checkpoint import load_train_state
    out, run = tmp_path / "abl", tmp_path / "abl" / "full"
    cmd = [sys.executable, "tools/ablate.py", "configs/cpu_debug.py", "--variants=full,crnet", "--max_iters=5000",
           "--eval_interval=5000", "--log_interval=1", "--plot=False", "--cpu_threads=1", f"--ablate_dir={out}"]

    def signalled(signum, group, after, *extra):
        p = subprocess.Popen(cmd + list(extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            t0, log = time.time(), run / "train.log"
            while not log.is_file() or sum(l.startswith("iter ") for l in log.read_text().splitlines()) < after:
                assert p.poll() is None and time.time() - t0 < 120, (p.poll(), log.is_file() and log.read_text()[-2000:])
                time.sleep(0.05)
            os.killpg(p.pid, signum) if group else p.send_signal(signum)
            text = p.communicate(timeout=120)[0]
        finally:  # (its own process group: pytest would not stop it)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        stopped = [l for l in (run / "train.log").read_text().splitlines() if l.startswith("stopped at iteration")]
        assert stopped, text
        return p.returncode, text, int(stopped[-1].split()[3][:-1])

    status, text, n = signalled(signal.SIGTERM, False, 3)
    assert status == 0 and "== full: stopped by SIGTERM, train.py exit 0" in text, text
    assert load_train_state(run)["iter"] == n >= 3 and not (out / "crnet").exists()
    status, text, m = signalled(signal.SIGINT, True, n + 3)
    assert status == 130 and "== full: stopped by SIGINT, train.py exit 130" in text and "Traceback" not in text, text
    assert load_train_state(run)["iter"] == m > n and not (out / "crnet").exists()
    status, text, k = signalled(signal.SIGUSR1, False, m + 6, "--nproc=2")
    assert status == 0 and "== full: stopped by SIGUSR1, torchrun exit" in text, text
    assert load_train_state(run)["iter"] == k > m and not (out / "crnet").exists()
    assert json.loads((run / "ablate.json").read_text())["seconds"] > 0


def test_torchrun_gets_only_the_flags_it_knows(monkeypatch):
    """This torch's torchrun gets every flag ablate has that it knows, and parses them (it refuses unknown ones, and
    the run never starts); a torchrun without --shutdown_timeout (torch 2.11's, modelled here) gets the signals flag
    alone, and the printed command says what the missing flag's absence means."""
    import argparse
    import torch.distributed.run as run
    flags, note = ablate.torchrun_flags()
    run.get_args_parser().parse_args([*flags, "train.py"])  # exits 2 on an unknown flag
    known = {s for action in run.get_args_parser()._actions for s in action.option_strings}
    assert flags == [f for f in ablate.TORCHRUN_FLAGS if f.split("=")[0] in known]  # none it knows is dropped
    assert bool(note) == (len(flags) < len(ablate.TORCHRUN_FLAGS))

    def older():
        p = argparse.ArgumentParser()
        p.add_argument("--signals_to_handle")
        p.add_argument("training_script")
        p.add_argument("training_script_args", nargs=argparse.REMAINDER)
        return p
    monkeypatch.setattr(run, "get_args_parser", older)
    flags, note = ablate.torchrun_flags()
    assert flags == ["--signals_to_handle=SIGTERM,SIGINT,SIGUSR1,SIGHUP,SIGQUIT"]
    assert "has no --shutdown_timeout: its workers get 30 s after a signal" in note and "signals" not in note


def test_read_metrics_skips_a_row_cut_short_and_names_a_damaged_one(tmp_path):
    """A kill during an append leaves the last row cut short: skipped, as train.py skips it on resuming (ablate.py
    once stopped on it, naming no file). A damaged row before the last is an error naming the file and line."""
    (tmp_path / "metrics.jsonl").write_text('{"iter": 1, "loss": 3.0}\n{"iter": 2, "lo')
    assert ablate.read_metrics(tmp_path) == [{"iter": 1, "loss": 3.0}]
    assert ablate.read_metrics(tmp_path / "none") == []
    (tmp_path / "metrics.jsonl").write_text('{"iter": 1, "lo\n{"iter": 2, "loss": 3.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1 is not a JSON row"):
        ablate.read_metrics(tmp_path)


@pytest.mark.parametrize("said,status", [(["iter 5\n", "stopped at iteration 5; resume with: ...\n"], 0),
                                         (["model: ...\n"], "variant crnet: no save at the stop")],
                         ids=["saved", "not-saved"])
def test_after_a_signal_ablate_exits_cleanly_only_if_the_run_said_it_saved(tmp_path, monkeypatch, said, status):
    """torchrun exits 1 after its workers' clean stop, so the exit status cannot tell a saved stop from a run that
    died (a signal before its handlers were in place): the run's own last line does. The signal is passed on."""
    import os
    import signal
    sent = []

    def lines():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run prints
        yield from said
    fake = SimpleNamespace(stdout=lines(), wait=lambda: 1, returncode=1, send_signal=sent.append)
    monkeypatch.setattr(ablate.subprocess, "Popen", lambda *a, **k: fake)
    a = {"overwrite": False, "data": "d", "nproc": 2, "stop_iter": 0, "ablate_dir": str(tmp_path)}
    with pytest.raises(SystemExit) as e:
        ablate.run_variant("crnet", ["--param='crnet'"], tmp_path / "crnet", a, 8)
    assert sent == [signal.SIGTERM] and (e.value.code == status if status == 0 else status in str(e.value.code))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # its handlers are gone


def test_one_ablation_per_ablate_dir(tmp_path):
    """A second ablation in an ablate_dir another one runs in is refused, naming the key, before it touches a run:
    it had rewritten the running variant's stamp and log before its train.py was refused."""
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "abl"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); import checkpoint; "
                               "checkpoint.hold_out_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FileExistsError, match=f"ablate_dir={out} is in use by another run .* choose another ablate_dir"):
            ablate.main(SMALL + [f"--ablate_dir={out}", "--variants=crnet"])
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.kill()
        holder.wait()
