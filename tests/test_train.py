"""train.py: config handling, learning, exact resume, DDP equivalence, the non-finite stop, sample.py."""
import glob
import json
import os
import signal
import shutil
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

import pytest
import torch

import checkpoint as ck
import configurator
import parallel as par
import plan
import prepare_data
import sample
import train
from conftest import ROOT, TINY, read_metrics, train_losses
from model import ModelConfig, Transformer


def run(tiny_data, out, *extra):
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={out}", *extra])


# ---------------------------------------------------------------- config
def test_config_merging_and_type_checks(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layer = 2\nlearning_rate = 1  # an int where a float is expected\nrank = [8, 4]\neval_tokens = 10 * 128\n")
    c = configurator.load([str(f), "--n_layer=3", "--out_dir=somewhere", "--max_iters=1e3", "--torch_compile"], "train.py")[0]
    assert (c["n_layer"], c["learning_rate"], c["rank"], c["out_dir"], c["max_iters"]) == (3, 1.0, [8, 4], "somewhere", 1000)
    assert isinstance(c["learning_rate"], float) and c["torch_compile"] is True and c["eval_tokens"] == 1280
    for text, value in (("false", False), ("False", False), ("true", True)):  # a string, not bool("false") == True
        assert configurator.load([f"--torch_compile={text}"], "train.py")[0]["torch_compile"] is value
    for arg, words in [("--learning_rate=True", "learning_rate=True: expected float"),  # a bool is not a number
                       ("--n_layer=True", "n_layer=True: expected int"), ("--min_lr_ratio=1.01", r"must be in \[0,1\]"),
                       ("--learning_rate=1e999", "learning_rate=inf: must be a finite number")]:
        with pytest.raises(ValueError, match=words):
            configurator.load([arg], "train.py")
    assert configurator.load(["--min_lr_ratio=1.0"], "train.py")[0]["min_lr_ratio"] == 1.0  # [0,1]: 1 is inside
    f.write_text("rank = (8, 4, 8)\n")  # a tuple is a list
    assert configurator.load([str(f)], "train.py")[0]["rank"] == [8, 4, 8]
    rank = configurator.load(["--rank=[8, 1e1, 4.0]"], "train.py")[0]["rank"]  # whole floats in a list, as alone
    assert rank == [8, 10, 4] and all(type(r) is int for r in rank)
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate' on the command line \\(did you mean 'learning_rate'\\?\\); python train.py --help"):
        configurator.load(["--lerning_rate=1e-3"], "train.py")[0]
    f.write_text("n_layers = 2\n")
    with pytest.raises(ValueError, match=f"unknown config key 'n_layers' in {f}"):
        configurator.load([str(f)], "train.py")[0]
    for bad, words in [("n_layer: 1\n", ":1: `n_layer: 1` is not a plain `key = value` assignment"),
                       ("import math\n", ":1: `import math` is not a plain"), ("n_layer = (\n", ":1: not Python"),
                       ("ablate_dir = 'x'\n", "'ablate_dir' .* is a key of tools/ablate.py, not of train.py: .* is a config for tools/ablate.py")]:
        f.write_text(bad)
        with pytest.raises(ValueError, match=words):
            configurator.load([str(f)], "train.py")[0]
    with pytest.raises(ValueError, match="'out_dir' .* is a key of train.py, not of tools/plot.py: .* is a config for train.py"):
        configurator.load(["configs/crnet_llama_60m.py"], "tools/plot.py")  # (out_dir is prepare_data.py's too)
    for arg, words in [("--n_layer=three", "n_layer='three': expected int"), ("--torch_compile=1", "torch_compile=1: expected bool"),
                       ("--max_iters=2.5", "max_iters=2.5: expected int"), ("--n_layer", "--n_layer needs a value: --n_layer=..."),
                       ("--max_iters=-5", "max_iters=-5: must be >= 1"), ("--grad_clip=-1", "grad_clip=-1.0: must be >= 0"),
                       ("--weight_decay=-0.1", "weight_decay=-0.1: must be >= 0"), ("--dropout=1.0", r"dropout=1.0: must be in \[0,1\)"),
                       ("--dtype=fp16", "dtype='fp16': must be one of auto, float32, bfloat16"), ("--rank=[8, 0]", "rank=\\[8, 0\\]: must be >= 1"),
                       ("--variants=full", "'variants' .* is a key of tools/ablate.py")]:
        with pytest.raises(ValueError, match=words):
            configurator.load([arg], "train.py")[0]
    with pytest.raises(FileNotFoundError, match="config file not found"):
        configurator.load(["configs/nope.py"], "train.py")[0]


def test_every_shipped_config_loads_and_builds():
    from tools import ablate
    configs = sorted((ROOT / "configs").glob("*.py"))
    assert len(configs) >= 13
    for path in configs:  # ablate_*.py may also set tools/ablate.py's keys
        c = ablate.load_config([str(path)])[1] if path.name.startswith("ablate_") else configurator.load([str(path)], "train.py")[0]
        ModelConfig(**{k: (c[k] if c[k] is not None or k != "vocab_size" else 50257) for k in ModelConfig.field_names()})


def test_lr_schedule():
    c = dict(learning_rate=1.0, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    assert train.lr_at(0, c) == pytest.approx(0.1) and train.lr_at(9, c) == pytest.approx(1.0)
    assert train.lr_at(60, c) == pytest.approx(0.55) and train.lr_at(110, c) == pytest.approx(0.1)
    c["learning_rate"] = 3e-3  # the floor is a ratio of the peak (at 1.0 the two read the same)
    assert train.lr_at(110, c) == pytest.approx(3e-4) and train.lr_at(60, c) == pytest.approx(1.65e-3)


def test_a_warmup_longer_than_the_run_is_noted_with_the_peak_it_reaches(tiny_data, tmp_path, capsys):
    run(tiny_data, tmp_path / "short", "--max_iters=4", "--warmup_iters=10", "--learning_rate=1e-2")
    note = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("note: warmup_iters=10 > max_iters=4"))
    last_lr = [r["lr"] for r in read_metrics(tmp_path / "short") if "lr" in r][-1]  # iteration 4's: 0.004
    assert f"only rises to {last_lr:.3g} (learning_rate=0.01)" in note, note
    run(tiny_data, tmp_path / "full", "--max_iters=4", "--warmup_iters=3")
    assert "note: warmup" not in capsys.readouterr().out


# ---------------------------------------------------------------- training
def test_short_run_learns(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--max_iters=60", "--eval_interval=60")
    losses = list(train_losses(tmp_path).values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    evals = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert len(evals) == 1 and evals[0]["val_loss"] < 3.7  # ln(257) = 5.55 at init
    assert (tmp_path / "ckpt.pt").is_file() and (tmp_path / "config.json").is_file()
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_compiled_crnet_recompute_trains_like_eager(tiny_data, tmp_path):
    """train.py --torch_compile with the paper's recomputation (compiled bodies, embedding and head as regions,
    evaluation through the compiled forward) logs the eager run's losses."""
    args = ["--max_iters=6", "--eval_interval=3", "--recompute=crnet", "--recompute_every=2"]
    run(tiny_data, tmp_path / "eager", *args)
    run(tiny_data, tmp_path / "compiled", *args, "--torch_compile")
    assert_same_losses(tmp_path / "eager", tmp_path / "compiled", rel=1e-4)  # fused kernels round differently


def test_evaluation_runs_full_batches_and_averages_exactly_the_windows():
    """evaluate() calls the model with full batches only, the last padded with ignored targets: one shape, so a
    compiled model needs no second graph per block kind (a smaller last batch took Block.forward past dynamo's
    recompile limit). Its loss is still the mean over exactly the windows, each computed here on its own."""
    import contextlib
    import numpy as np
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, intermediate_size=48, vocab_size=50, block_size=16,
                                rank=8))
    data = np.random.default_rng(0).integers(0, 50, 16 * 20, dtype=np.uint16)
    shapes = []
    m.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    rt = {"proc": 0, "world": 1, "device": torch.device("cpu"), "autocast": contextlib.nullcontext()}
    got = train.evaluate(m, data, {"block_size": 16, "batch_size": 4, "eval_tokens": 6 * 16}, rt)
    assert shapes == [(4, 16)] * 2  # 6 windows: 4 + 2 padded to 4
    window = lambda s: torch.from_numpy(data[s:s + 16].astype(np.int64))[None]
    with torch.no_grad():
        ref = sum(m(window(s), window(s + 1))[1].item() for s in range(0, 6 * 16, 16)) / 6
    assert got == pytest.approx(ref, rel=1e-5)


def test_batches_land_on_the_device_asked_for():
    """windows() moves a batch to any device, not CUDA alone (on mps the batches stayed on the CPU); the meta device
    stands in for one this machine lacks."""
    import numpy as np
    data = np.arange(100, dtype=np.uint16)
    x, y = train.windows(data, torch.tensor([0, 10]), 8, torch.device("meta"))
    assert x.device.type == y.device.type == "meta" and x.shape == y.shape == (2, 8)
    x, y = train.windows(data, torch.tensor([0, 10]), 8, torch.device("cpu"))
    assert x[1, 0] == 10 and y[1, 0] == 11


def test_compiled_training_and_a_partial_evaluation_batch_stay_within_the_recompile_limit(tiny_data, tmp_path, caplog):
    """--torch_compile, no recompute (each block compiled), 4 layers and an evaluation of 6 windows at batch 4:
    the eager run's losses, and no block falls back to eager for hitting dynamo's recompile limit."""
    torch._dynamo.reset()  # graphs compiled by earlier tests count toward the limit
    args = ["--max_iters=4", "--eval_interval=2", "--n_layer=4", "--eval_tokens=192"]
    run(tiny_data, tmp_path / "eager", *args)
    run(tiny_data, tmp_path / "compiled", *args, "--torch_compile")
    assert_same_losses(tmp_path / "eager", tmp_path / "compiled", rel=1e-4)  # fused kernels round differently
    assert "recompile_limit" not in caplog.text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path, arch):
    args = ["--max_iters=16", "--eval_interval=8", "--dropout=0.1", f"--arch={arch}"]  # dropout: the RNG state matters
    run(tiny_data, tmp_path / "a", *args)
    run(tiny_data, tmp_path / "b", *args, "--stop_iter=8")
    assert max(train_losses(tmp_path / "b")) == 8
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # rows an interrupted run wrote past its checkpoint
        f.write('{"iter": 9, "loss": 123.0}\n{"iter": 10, "lo')  # and a line cut short by a kill
    torch.manual_seed(999)  # a fresh process's generator, not the one the stopped run left: the checkpoint's counts
    run(tiny_data, tmp_path / "b", *args, "--init_from=resume")
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert list(b) == list(range(1, 17))
    for it in range(9, 17):
        assert b[it] == pytest.approx(a[it], rel=1e-6, abs=0), (it, a[it], b[it])
    assert len([r for r in read_metrics(tmp_path / "b") if r["iter"] == 9]) == 1


def test_scratch_run_does_not_clobber_a_checkpoint(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--max_iters=2", "--eval_interval=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match="init_from=resume"):
        run(tiny_data, tmp_path, "--max_iters=2")
    config = (tmp_path / "config.json").read_bytes()
    for bad, words in [("--n_layer=2", "n_layer=2: the checkpoint in .* was trained with 3"),
                       ("--learning_rate=0.1", "learning_rate=0.1: the checkpoint .* was trained with 0.003"),
                       ("--max_iters=2", "max_iters=2: the checkpoint is at iteration 2: nothing to train")]:
        with pytest.raises(ValueError, match=words):
            train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=4", bad])
    assert (tmp_path / "ckpt.pt").read_bytes() == before and (tmp_path / "config.json").read_bytes() == config
    with pytest.raises(SystemExit) as done:  # a job script repeating init_from=auto after the run has ended
        train.main([f"--out_dir={tmp_path}", "--init_from=auto"])
    assert done.value.code == 0 and (tmp_path / "ckpt.pt").read_bytes() == before


def test_resume_reads_the_saved_config_and_may_change_the_recompute_mode(tiny_data, tmp_path):
    """Recomputation is not part of the model: a crnet-recompute run resumed with none (and a micro-batch
    split differently) continues the uninterrupted run's loss sequence."""
    args = ["--max_iters=12", "--eval_interval=6", "--recompute=crnet", "--recompute_every=2"]
    run(tiny_data, tmp_path / "a", *args)
    run(tiny_data, tmp_path / "b", *args, "--stop_iter=6")
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--recompute=none", "--batch_size=2"])
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert list(b) == list(range(1, 13))
    for it in range(7, 13):
        assert b[it] == pytest.approx(a[it], rel=1e-5, abs=0), (it, a[it], b[it])
    import json
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (saved["recompute"], saved["batch_size"], saved["n_layer"]) == ("none", 2, 3)



def test_a_stop_between_evals_leaves_the_evals_and_best_to_the_uninterrupted_run(tiny_data, tmp_path):
    """--stop_iter saves without evaluating, as a signal does: an eval there would add a val row and could pick
    another best/ than the uninterrupted run."""
    args = ["--max_iters=6", "--eval_interval=2", "--keep_best", "--learning_rate=3e-2"]
    run(tiny_data, tmp_path / "a", *args)
    run(tiny_data, tmp_path / "b", *args, "--stop_iter=3")
    run(tiny_data, tmp_path / "b", *args, "--init_from=resume")
    evals = {d: [(r["iter"], r["val_loss"]) for r in read_metrics(tmp_path / d) if "val_loss" in r] for d in "ab"}
    assert [i for i, _ in evals["b"]] == [i for i, _ in evals["a"]] == [2, 4, 6]
    best = {d: ck.load_train_state(tmp_path / d / "best")["iter"] for d in "ab"}
    assert best["a"] == best["b"]

def test_eta_counts_to_the_stop_iteration_not_past_it(tiny_data, tmp_path, capsys):
    run(tiny_data, tmp_path, "--max_iters=2000", "--stop_iter=4", "--log_interval=2", "--eval_interval=100")
    etas = [line.rsplit("ETA ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    assert len(etas) == 2 and etas[-1] == "0s"  # the last step of a --stop_iter run has nothing left


def test_the_log_lines_timings_follow_the_clock(tiny_data, tmp_path, monkeypatch, capsys):
    """A clock on which every training step takes 1 s (evaluation none): ms/iter is the mean over the log interval,
    tokens/s a step's tokens over it, and the ETA counts from this process's first step, also after a resume."""
    clock, lr_at = [0.0], train.lr_at
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(train, "lr_at", lambda it, c: (clock.__setitem__(0, clock[0] + 1), lr_at(it, c))[1])
    run(tiny_data, tmp_path, "--max_iters=8", "--stop_iter=4", "--log_interval=2", "--eval_interval=100")
    run(tiny_data, tmp_path, "--max_iters=8", "--log_interval=2", "--eval_interval=100", "--init_from=resume")
    rows = [r for r in read_metrics(tmp_path) if "ms_per_iter" in r]
    assert [(r["iter"], r["ms_per_iter"], r["tokens_per_s"], r["elapsed_s"]) for r in rows] == [
        (2, 1000, 128, 2), (4, 1000, 128, 4), (6, 1000, 128, 2), (8, 1000, 128, 4)]  # 128 tokens a step (TINY)
    etas = [line.rsplit("| ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    assert etas == ["2s elapsed, ETA 2s", "4s elapsed, ETA 0s", "2s elapsed, ETA 2s", "4s elapsed, ETA 0s"]
    assert [train.fmt_time(s) for s in (59, 90, 5400)] == ["59s", "1.5m", "1.5h"]


def test_non_finite_loss_stops_before_the_optimizer_step(tiny_data, tmp_path, monkeypatch):
    run(tiny_data, tmp_path, "--max_iters=20", "--stop_iter=2", "--eval_interval=100")
    before = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(train, "lr_at", lambda it, c: 1e30)  # the resumed run's first step blows the weights up
    steps = []  # the optimizer steps train.py's loop takes (not those of a library that builds optimizer state)
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        steps.append(any(f.filename.endswith("train.py") and f.name == "main" for f in traceback.extract_stack()[-6:])),
        real_step(self, *a, **k))[1])
    with pytest.raises(SystemExit, match="iteration 3: non-finite loss .* stopped before the optimizer step"):
        run(tiny_data, tmp_path, "--init_from=resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before and steps.count(True) == 1  # iteration 2's, not 3's
    assert json.loads((tmp_path / "diverged.json").read_text())["iter"] == 3  # the mark tools/ablate.py reads
    with pytest.raises(SystemExit, match="iteration 3: non-finite loss"):  # saving every step: the step that
        run(tiny_data, tmp_path, "--init_from=resume", "--checkpoint_interval=1")  # diverged is never saved
    assert ck.load_train_state(tmp_path)["iter"] == 3


def test_clip_grad_norm_returns_the_norm_before_clipping_and_clips_to_max():
    ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    ps[0].grad, ps[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5, by hand
    assert par.clip_grad_norm(ps, 1.0).item() == pytest.approx(5.0)
    assert torch.cat([p.grad for p in ps]).norm().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("cuda,mps,want", [(True, True, "cuda:1"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(train.torch.backends.mps, "is_available", lambda: mps)
    assert str(par.pick_device("auto", 1)) == want
    assert str(par.pick_device("cpu", 1)) == "cpu" and str(par.pick_device("cuda:3", 0)) == "cuda:3"
    with pytest.raises(ValueError, match="device='tpu': must be auto, cpu, cuda, cuda:N or mps"):
        train.check_config({**configurator.load([], "train.py")[0], "device": "tpu"}, 1)


def test_a_checkpoint_from_a_cuda_machine_resumes_on_the_cpu(tiny_data, tmp_path, monkeypatch, capsys):
    """A checkpoint carrying CUDA RNG states resumes where CUDA is absent (the note says dropout draws on the GPU
    are not reproduced); the CPU generator is restored, so the loss sequence continues exactly."""
    import torch
    args = ["--max_iters=8", "--eval_interval=4", "--dropout=0.1"]
    run(tiny_data, tmp_path / "a", *args)
    run(tiny_data, tmp_path / "b", *args, "--stop_iter=4")
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert ckpt["rng"][0]["cuda"] is None  # written here, without CUDA
    ckpt["rng"][0]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as a CUDA machine writes it
    torch.save(ckpt, tmp_path / "b" / "ckpt.pt")
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'b'}"])
    assert "CUDA RNG state does not apply on this device" in capsys.readouterr().out
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [b[i] for i in range(5, 9)] == pytest.approx([a[i] for i in range(5, 9)], rel=1e-6)


def test_a_run_saved_with_more_cpu_threads_than_this_machine_has_resumes(tiny_data, tmp_path, capsys):
    """cpu_threads may change on resume; a saved value this machine cannot run (a larger node's) falls back to torch's
    default with a note, so that --init_from=auto after a preemption onto a smaller node still resumes."""
    out = tmp_path / "r"
    run(tiny_data, out, "--max_iters=4", "--eval_interval=2", "--stop_iter=2")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    ckpt["config"]["cpu_threads"] = 4096  # as a 4096-CPU machine would have saved it
    torch.save(ckpt, out / "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the same command repeated at its stop_iter: done, not trained on to 4
        train.main(["--init_from=auto", f"--out_dir={out}", "--stop_iter=2"])
    assert e.value.code == 0 and "stop_iter=2: nothing to do" in capsys.readouterr().out
    train.main(["--init_from=auto", f"--out_dir={out}"])
    assert "note: cpu_threads 4096 -> 0 (torch's default)" in capsys.readouterr().out
    assert ck.load_train_state(out)["iter"] == 4


def test_a_resumed_run_goes_on_after_its_data_is_prepared_again_from_the_same_text(tiny_data, tmp_path):
    """The data fingerprint refuses other tokens, not the same ones written again; a checkpoint saved before the
    fingerprint (no tokens_sha1 in its data_meta) is checked on token counts only, as then."""
    from prepare_data import prepare
    data, out, src = tmp_path / "data", tmp_path / "run", tiny_data.parent / "small.txt"
    shutil.copytree(tiny_data, data)
    args = [*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=2"]
    train.main([*args, "--stop_iter=2"])
    shutil.rmtree(data)
    prepare(data, tokenizer="byte", files=[src], piece_chars=5000)
    train.main(["--init_from=resume", f"--out_dir={out}", "--stop_iter=4"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    del ckpt["data_meta"]["tokens_sha1"]
    torch.save(ckpt, out / "ckpt.pt")
    shutil.rmtree(data)
    (tmp_path / "swapped.txt").write_text(src.read_text().translate(str.maketrans("ab", "ba")))
    prepare(data, tokenizer="byte", files=[tmp_path / "swapped.txt"], piece_chars=5000)  # same counts
    train.main(["--init_from=resume", f"--out_dir={out}"])
    assert ck.load_train_state(out)["iter"] == 6


def test_eval_only_takes_any_batch_size(tiny_data, tmp_path, capsys):
    """Evaluation takes no optimizer step, so total_batch_tokens need not divide by a new batch_size."""
    run(tiny_data, tmp_path, "--max_iters=2", "--eval_interval=2")  # total_batch_tokens 128 = 4 x 32
    capsys.readouterr()
    train.main(["--eval_only", f"--out_dir={tmp_path}", "--batch_size=64"])
    assert "eval_only" in capsys.readouterr().out


def test_vocab_smaller_than_the_data_is_an_error(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100: is smaller than the data's vocabulary \\(257, tokenizer 'byte'"):
        run(tiny_data, tmp_path, "--vocab_size=100")
    meta = prepare_data.load_meta(tiny_data)  # the data's own vocabulary, or a wider one (padded), is accepted
    for vocab in (257, 320):
        prepare_data.check_data({"vocab_size": vocab, "block_size": 32}, tiny_data, meta)


def test_batch_arithmetic_error(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="total_batch_tokens=100: must be a multiple of"):
        run(tiny_data, tmp_path, "--total_batch_tokens=100")


def sample_text(out, n=1):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        sample.main([f"--out_dir={out}", f"--num_samples={n}", "--max_new_tokens=30", "--start=ROMEO:"])
    return buf.getvalue()


def test_sample_prints_text(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--max_iters=3", "--eval_interval=2")
    text = sample_text(tmp_path, 2)
    assert text.count("ROMEO:") == 2 and text.count("-" * 60) == 2
    val = [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r][-1]  # the checkpoint's latest eval
    assert text.startswith(f"sampling from {tmp_path / 'ckpt.pt'} (iteration 3, val loss {val:.4f} at iteration 3)\n")
    run(tiny_data, tmp_path / "early", "--max_iters=20", "--stop_iter=2")  # stopped before its first eval
    assert sample_text(tmp_path / "early").startswith(f"sampling from {tmp_path / 'early' / 'ckpt.pt'} (iteration 2, "
                                                      f"not evaluated yet)\n")
    threads = torch.get_num_threads()
    try:
        sample.main([f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=2", "--cpu_threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sample.main([f"--out_dir={tmp_path / 'none'}"])


def test_eval_only_prints_loss_and_perplexity_and_writes_nothing(tiny_data, tmp_path, capsys):
    import hashlib
    import math
    import shutil
    run(tiny_data, tmp_path / "run", "--max_iters=4", "--eval_interval=4")
    ev = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][0]  # the run's own eval: the oracle
    files = lambda: {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    shutil.copytree(tiny_data, tmp_path / "other")  # a data dir the run did not train on
    before = files()
    capsys.readouterr()
    train.main(["--eval_only", f"--out_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'other'}"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"eval_only {tmp_path / 'run' / 'ckpt.pt'} (iteration 4) on {tmp_path / 'other'}: val loss "
                    f"{ev['val_loss']:.4f}, perplexity {math.exp(ev['val_loss']):.3f} | train loss {ev['train_loss']:.4f}, "
                    f"perplexity {math.exp(ev['train_loss']):.3f}")
    assert files() == before


def test_cli_reports_errors_without_a_traceback(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--n_layr=2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == "error: unknown config key 'n_layr' on the command line (did you mean 'n_layer'?); python train.py --help lists every key"


# ---------------------------------------------------------------- distributed
def torchrun(nproc, tiny_data, out, *extra, script="train.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *TINY, f"--data_dir={tiny_data}", f"--out_dir={out}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # 5-7 s; compiled ~1 min
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def assert_same_losses(one, two, iters=None, rel=1e-5):
    one = [r for r in read_metrics(one) if iters is None or r["iter"] in iters]
    two = [r for r in read_metrics(two) if iters is None or r["iter"] in iters]
    assert [r["iter"] for r in one] == [r["iter"] for r in two] and one
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "train_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (key, a, b)


def ddp_matches_single_process(tiny_data, tmp_path, *extra, two_procs=(), rel=1e-5, tokens=256):
    args = ["--max_iters=6", "--eval_interval=6", f"--total_batch_tokens={tokens}", *extra]  # 256 = 2 x 4 x 32: accum 2
    # on 1 process, 1 on 2
    run(tiny_data, tmp_path / "one", *args)
    p = torchrun(2, tiny_data, tmp_path / "two", *args, *two_procs)
    assert_same_losses(tmp_path / "one", tmp_path / "two", rel=rel)
    assert "Grad strides do not match" not in p.stderr  # the low-rank factors' gradients fit DDP's buckets


def test_ddp_two_processes_match_one(tiny_data, tmp_path):
    """And MFU is per GPU: tokens/s counts both processes' tokens, the peak is one device's, so the same tokens/s
    is half the MFU on two (it once divided by one peak: 2x too high, 8x on 8 GPUs)."""
    ddp_matches_single_process(tiny_data, tmp_path, "--peak_flops=1e9")
    (one, two) = ([r["mfu"] / r["tokens_per_s"] for r in read_metrics(tmp_path / d) if "mfu" in r] for d in ("one", "two"))
    assert one and len(one) == len(two) and all(b == pytest.approx(a / 2) for a, b in zip(one, two))
    for d in ("one", "two"):  # tokens/s: every process's tokens (a step's 256) over a step's time
        assert all(r["tokens_per_s"] * r["ms_per_iter"] / 1000 == pytest.approx(256) for r in read_metrics(tmp_path / d)
                   if "tokens_per_s" in r)


def test_ddp_with_crnet_recompute_matches_one_process(tiny_data, tmp_path):
    ddp_matches_single_process(tiny_data, tmp_path, "--recompute=crnet", "--recompute_every=2", tokens=512)  # accum 2
    # on each process: gradients sync on the last micro-step only, over both micro-batches


# FSDP2: the oracle is one plain process (same seed, same sequences via grad accumulation)
@pytest.mark.parametrize("extra", [["--recompute=crnet", "--recompute_every=2"], ["--arch=gpt2", "--recompute=block"],
                                   ["--dtype=bfloat16", "--recompute=crnet", "--recompute_every=2"]],
                         ids=["llama-crnet-recompute", "gpt2-tied-block-recompute", "bf16-params-vs-autocast"])
def test_fsdp_two_processes_match_one(tiny_data, tmp_path, extra):
    # bf16: FSDP gathers bf16 parameters (MixedPrecisionPolicy), the oracle autocasts fp32 ones. Measured apart:
    # losses by <= 1e-4, gradient norms by <= 0.3% (relative)
    rel = 1e-2 if "--dtype=bfloat16" in extra else 1e-5
    ddp_matches_single_process(tiny_data, tmp_path, *extra, two_procs=["--data_parallel=fsdp"], rel=rel)
    assert (tmp_path / "two" / "ckpt_dcp" / "iter_0000006" / "train_state.pt").is_file()
    assert [p.name for p in (tmp_path / "two" / "ckpt_dcp").iterdir()] == ["iter_0000006"]


def test_fsdp_with_compiled_crnet_recompute_matches_one_eager_process(tiny_data, tmp_path):
    """FSDP2's gathers around Algorithm 1's compiled bodies (and the compiled embedding and head), 2 processes,
    against one eager process: the same losses, gradient norms and evals."""
    ddp_matches_single_process(tiny_data, tmp_path, "--recompute=crnet", "--recompute_every=2",
                               two_procs=["--data_parallel=fsdp", "--torch_compile"], rel=1e-4)


def test_checkpoints_move_between_fsdp_and_ddp(tiny_data, tmp_path, capsys):
    """A 2-process FSDP run's DCP checkpoint resumes in one DDP process, whose ckpt.pt resumes under FSDP again:
    the loss sequence is the uninterrupted run's."""
    args = ["--max_iters=12", "--eval_interval=4", "--total_batch_tokens=256", "--recompute=crnet", "--recompute_every=2"]
    run(tiny_data, tmp_path / "ref", *args)  # uninterrupted, one plain process
    b = tmp_path / "b"
    torchrun(2, tiny_data, b, *args, "--data_parallel=fsdp", "--stop_iter=4")
    (b / "ckpt_dcp" / "iter_0000005.tmp").mkdir()  # an interrupted later save: must be ignored
    train.main([f"--out_dir={b}", "--init_from=resume", "--data_parallel=ddp", "--stop_iter=8"])  # DCP -> one DDP process
    assert "dropout draws differ" not in capsys.readouterr().out  # 2 processes' RNG states, 1 process, no dropout
    # the new checkpoint and the one before it (the fallback) stay, whatever their format; the rest goes
    assert (b / "ckpt.pt").is_file() and [p.name for p in (b / "ckpt_dcp").iterdir()] == ["iter_0000004"]
    train.main([f"--out_dir={b}", "--init_from=resume", "--data_parallel=fsdp"])  # ckpt.pt -> FSDP
    assert_same_losses(tmp_path / "ref", b, iters=range(5, 13))
    assert [p.name for p in (b / "ckpt_dcp").iterdir()] == ["iter_0000012"] and (b / "ckpt.pt").is_file()
    assert not (b / "ckpt.prev.pt").exists()
    text = sample_text(b)  # inference reads a sharded checkpoint without a process group
    assert text.count("ROMEO:") == 1


@pytest.mark.parametrize("script,key", [("train.py", "--recompute_every=8"), ("sample.py", "--top_k=200"),
                                        ("plan.py", "--gpu_gib=80.0"), ("tools/ablate.py", "--variants="),
                                        ("tools/analyze.py", "--rank=0"), ("tools/bench.py", "--what='recompute'"),
                                        ("prepare_data.py", "--tokenizer='byte'"), ("tools/plot.py", "--x='iter'"),
                                        ("tools/hf.py", "--export=''")])
def test_every_script_answers_help(script, key):
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and key in p.stdout and p.stderr == "", (p.stdout[-500:], p.stderr[-500:])
    if script in ("plan.py", "tools/ablate.py"):  # they also take every train.py key
        assert "--learning_rate=0.003" in p.stdout


def test_the_limits_themselves_are_allowed():
    """A stop at max_iters itself, and a thread per CPU: each bound is inclusive where its check says so."""
    c = {"batch_size": 4, "block_size": 32, "total_batch_tokens": 128, "eval_only": False, "max_iters": 8}
    assert plan.grad_accum({**c, "stop_iter": 8}, 1) == 1
    with pytest.raises(ValueError, match="stop_iter=9: is beyond max_iters=8"):
        plan.grad_accum({**c, "stop_iter": 9}, 1)
    par.check_device("cpu", cpu_threads=os.cpu_count())
    with pytest.raises(ValueError, match="is more than this machine's"):
        par.check_device("cpu", cpu_threads=os.cpu_count() + 1)


def test_processes_on_one_cpu_share_its_threads(monkeypatch):
    """cpu_threads=0 under torchrun: each of a node's LOCAL_WORLD_SIZE processes takes its share of the cores,
    not all of them (2 processes x all cores oversubscribe the CPU)."""
    threads = []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    c = {"cpu_threads": 0, "device": "cpu", "data_parallel": "ddp", "dtype": "auto"}
    assert par.setup(c)["threads"] == 4 and threads == [4]
    assert par.setup({**c, "cpu_threads": 3})["threads"] == 3  # a given count is taken as it is


def test_h_is_help_too(capsys):
    with pytest.raises(SystemExit) as e:
        configurator.load(["-h"], "train.py")
    assert e.value.code == 0 and "--recompute_every=8" in capsys.readouterr().out


def launch_lines():
    """(config, launch command) from every config header line that launches train.py."""
    import re
    for path in sorted((ROOT / "configs").glob("*.py")):
        for line in path.read_text().splitlines():
            m = re.match(r"#\s*(?:Launch:\s*|\s*)((?:torchrun|python) .*train\.py .*)$", line)
            if m and line.startswith("#"):
                yield path.name, m.group(1).split("  ")[0].strip()


@pytest.mark.parametrize("name,command", list(launch_lines()))
def test_every_config_launch_line_passes_preflight(name, command, tmp_path, capsys):
    """The header's launch line, at the world size it names, on this machine: no GPU, no C4."""
    import re
    import shlex
    words = shlex.split(command)
    nproc = int(next(iter(re.findall(r"--nproc_per_node=(\d+)", command)), 1))
    nnodes = int(next(iter(re.findall(r"--nnodes=(\d+)", command)), 1))
    args = words[words.index("train.py") + 1:]
    train.main([*args, "--preflight", f"--world_size={nproc * nnodes}", f"--out_dir={tmp_path}"])
    assert f"preflight ok for {nproc * nnodes} process(es)" in capsys.readouterr().out


def test_preflight_fails_once_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "configs/crnet_llama_60m.py", "--preflight", "--world_size=3",
                        f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert p.stderr.startswith("error: total_batch_tokens=131072: must be a multiple of batch_size * block_size * world_size")


def test_missing_data_prints_its_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="make it with:\n  python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en"):
        train.main(["configs/crnet_llama_60m.py", f"--data_dir={tmp_path / 'c4'}", f"--out_dir={tmp_path}",
                    "--data_recipe=python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --out_dir=x"])


def test_every_data_recipe_makes_its_own_data_dir_with_the_tokens_its_schedule_reads():
    """A recipe's out_dir is its config's data_dir, which no other recipe writes (the first one run would otherwise
    decide the data every other size trains on), and its train split holds max_iters x total_batch_tokens (a
    token is read about once on average: windows start at random); its val split holds eval_tokens."""
    made = {}
    for f in sorted(set(glob.glob(os.path.join(ROOT, "configs", "*.py"))) - set(glob.glob(os.path.join(ROOT, "configs", "ablate_*")))):
        c = configurator.load([f], "train.py")[0]
        if not c["data_recipe"]:
            continue
        words = c["data_recipe"].split()
        assert words[:2] == ["python", "prepare_data.py"], f
        r = configurator.load(words[2:], "prepare_data.py")[0]
        assert r["out_dir"] == c["data_dir"] and made.setdefault(r["out_dir"], c["data_recipe"]) == c["data_recipe"], f
        train_tokens = r["max_tokens"] * (1 - r["val_fraction"]) * 0.999  # (val's share: within one document)
        assert train_tokens >= c["max_iters"] * c["total_batch_tokens"], f
        assert r["max_tokens"] * r["val_fraction"] * 0.999 >= c["eval_tokens"], f
    assert len(made) == 6


def test_config_file_errors_name_the_line_and_strings_stay_strings(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layer = 2\nbatch_size = 0\n")
    with pytest.raises(ValueError, match=f"^{f}:2: batch_size=0: must be >= 1$"):
        configurator.load([str(f)], "train.py")[0]
    f.write_text("n_layer = 2\nn_layer = 3\n")
    with pytest.raises(ValueError, match=f"{f}:2: n_layer is assigned twice \\(first at line 1\\)"):
        configurator.load([str(f)], "train.py")[0]
    f.write_text("max_iters = int(1e4)\neval_tokens = max(256, 10 * 128)\n")
    c = configurator.load([str(f), "--out_dir=123", "--data_dir='data/x'"], "train.py")[0]
    assert (c["max_iters"], c["eval_tokens"], c["out_dir"], c["data_dir"]) == (10000, 1280, "123", "data/x")


def test_devices_and_out_dirs_that_cannot_work_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train.torch.backends.mps, "is_available", lambda: False)
    for dev, words in [("cuda", "CUDA is not available here"), ("cuda:1", "CUDA is not available"), ("mps", "mps")]:
        with pytest.raises(ValueError, match=f"device='{dev}': .*{words}"):
            train.main(["configs/cpu_debug.py", f"--device={dev}", f"--out_dir={tmp_path}"])
    train.main(["configs/crnet_llama_7b.py", "--device=cuda", "--preflight", f"--out_dir={tmp_path}"])  # the GPU box has it
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=f"out_dir=.*: {tmp_path / 'f'} is a file, not a directory"):
        train.main(["configs/cpu_debug.py", f"--out_dir={tmp_path / 'f' / 'sub'}"])


def test_plot_draws_the_curves_of_several_runs(tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    from tools import plot
    run(tiny_data, tmp_path / "a", "--max_iters=4", "--eval_interval=2")
    run(tiny_data, tmp_path / "b", "--max_iters=4", "--eval_interval=2", "--param=full")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "lo')  # a line cut short by a kill: skipped
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), f"--out={tmp_path / 'c.png'}", "--x=tokens"])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".c.*"))
    (tmp_path / "a" / "metrics.jsonl").write_text('{"iter": 1}\nnot json\n{"iter": 2}\n')
    with pytest.raises(ValueError, match=r"a/metrics.jsonl:2 is not a JSON row"):
        plot.main([str(tmp_path / "a")])



# ---------------------------------------------------------------- preemption
def same_metrics(ref, got, rel=1e-6):
    keys = ("iter", "loss", "lr", "grad_norm", "val_loss", "train_loss")
    ref, got = ([{k: r[k] for k in keys if k in r} for r in read_metrics(d)] for d in (ref, got))
    assert [r["iter"] for r in got] == [r["iter"] for r in ref]  # every row once, no eval of its own at a stop
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, rel=rel), (a, b)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_finishes_the_step_saves_and_the_resumed_run_continues_exactly(tiny_data, tmp_path, monkeypatch, capsys, signum):
    args = ["--max_iters=10", "--eval_interval=5", "--dropout=0.1"]
    run(tiny_data, tmp_path / "ref", *args)
    lr_at = train.lr_at  # the signal arrives during step 6, as a cluster's would, at any moment
    monkeypatch.setattr(train, "lr_at", lambda it, c: (it == 6 and os.kill(os.getpid(), signum)) or lr_at(it, c))
    capsys.readouterr()
    run(tiny_data, tmp_path / "b", *args)  # returns: exit status 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"stopped at iteration 7; resume with: python train.py --init_from=resume --out_dir={tmp_path / 'b'}"
    assert max(train_losses(tmp_path / "b")) == 7 and ck.load_train_state(tmp_path / "b")["iter"] == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone
    monkeypatch.undo()
    train.main([f"--out_dir={tmp_path / 'b'}", "--init_from=resume"])
    same_metrics(tmp_path / "ref", tmp_path / "b")


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["ctrl-c", "SIGTERM"])
def test_the_command_line_stops_on_a_signal_with_one_line(tiny_data, tmp_path, signum, status):
    """From outside, mid-run: exit status 130 for Ctrl-C (0 for SIGTERM), no traceback, the resume line last,
    and a checkpoint at the iteration it names."""
    p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}",
                          "--max_iters=5000", "--eval_interval=5000"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    while not any(l.startswith("iter      3 |") for l in lines):
        line = p.stdout.readline()
        assert line, p.stderr.read()[-2000:]
        lines.append(line)
    p.send_signal(signum)
    out, err = p.communicate(timeout=120)
    last = out.strip().splitlines()[-1]
    assert p.returncode == status and "Traceback" not in err, (p.returncode, err[-2000:])
    n = int(last.split()[3][:-1])
    assert last == f"stopped at iteration {n}; resume with: python train.py --init_from=resume --out_dir={tmp_path}"
    assert n >= 3 and ck.load_train_state(tmp_path)["iter"] == n


SIGNALLED = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import configurator, train
lr_at = train.lr_at  # only rank 1 is signalled, during step 4: every rank must stop after it, together
train.lr_at = lambda it, c: (it == 4 and os.environ["RANK"] == "1" and os.kill(os.getpid(), signal.SIGUSR1)) or lr_at(it, c)
configurator.main_guard(train.main)
"""


def test_two_processes_stop_together_on_one_signal_and_resume_exactly(tiny_data, tmp_path):
    """Under torchrun (FSDP: every rank writes its shard) a signal to one process stops both after the same step;
    rank 0 prints the resume line, and the resumed run continues the uninterrupted 2-process run's losses."""
    args = ["--max_iters=8", "--eval_interval=4", "--data_parallel=fsdp", "--total_batch_tokens=256"]
    torchrun(2, tiny_data, tmp_path / "ref", *args)
    (tmp_path / "signalled.py").write_text(SIGNALLED)
    p = torchrun(2, tiny_data, tmp_path / "b", *args, script=tmp_path / "signalled.py")
    assert f"stopped at iteration 5; resume with: python train.py --init_from=resume --out_dir={tmp_path / 'b'}" in p.stdout
    assert ck.load_train_state(tmp_path / "b")["iter"] == 5
    torchrun(2, tiny_data, tmp_path / "b", *args, "--init_from=resume")
    same_metrics(tmp_path / "ref", tmp_path / "b", rel=1e-6)


# ---------------------------------------------------------------- sample.py, tools/plot.py
def test_greedy_generate_follows_the_last_position():
    from sample import generate
    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, intermediate_size=64, rank=8, vocab_size=50,
                                block_size=16)).eval()
    idx = torch.randint(0, 50, (2, 5))
    want = idx
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat((want, m(want[:, -16:])[0][:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(generate(m, idx, 6, temperature=0), want)


def test_sample_with_an_empty_start_and_the_tokenizers_vocabulary(tiny_data, tmp_path, monkeypatch, capsys):
    run(tiny_data, tmp_path, "--max_iters=1", "--eval_interval=1")
    seen = {}
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: seen.update(k) or real(*a, **k))
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=3", "--start=''"])
    assert capsys.readouterr().out.count("-" * 60) == 1
    assert seen["vocab"] == json.loads((tiny_data / "meta.json").read_text())["vocab_size"]


def test_plot_tokens_axis_is_iter_times_tokens_per_step(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from tools import plot
    figs = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: figs.append(fig))
    rows = [{"iter": i, "loss": 3.0, "lr": 1e-3, "tokens": 128 * i} for i in (2, 3, 4)]  # (a resumed run: the first row is not iter 1)
    plot.draw([("a", rows)], tmp_path / "c.png", x="tokens")
    assert list(figs[0].axes[0].lines[0].get_xdata()) == [256, 384, 512]
