"""Bad input and interruptions: every malformed input is one `error:` line that names the key, file or line and
changes nothing; damaged checkpoints fall back; a run SIGKILLed anywhere (inside its writes too) and resumed
logs exactly what the uninterrupted run logs."""
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint as ck
import configurator
import parallel as par
import train
from model import model_config
from conftest import ROOT, TINY, read_metrics, train_losses


def run(tiny_data, out, *extra):
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={out}", *extra])


def snapshot(root):
    """Every file under root with its content hash: what 'nothing changed' is checked against."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    """A finished 2-iteration run, damaged copies of data and checkpoints, and bad input files."""
    w = tmp_path_factory.mktemp("world")
    run(tiny_data, w / "run", "--max_iters=2", "--eval_interval=2")
    shutil.copytree(tiny_data, w / "data")
    for name, edit in [("nokey", lambda m: m.pop("vocab_size")), ("short", lambda m: m.update(train_tokens=10**9))]:
        shutil.copytree(tiny_data, w / name)
        meta = json.loads((w / name / "meta.json").read_text())
        edit(meta)
        (w / name / "meta.json").write_text(json.dumps(meta))
    shutil.copytree(tiny_data, w / "tiny")  # a val split shorter than one block
    (w / "tiny" / "val.bin").write_bytes((w / "tiny" / "val.bin").read_bytes()[:40])
    meta = json.loads((w / "tiny" / "meta.json").read_text())
    (w / "tiny" / "meta.json").write_text(json.dumps({**meta, "val_tokens": 20}))
    for name, damage in [("empty", b""), ("garbage", b"not a checkpoint at all" * 10)]:
        (w / name).mkdir()
        (w / name / "ckpt.pt").write_bytes(damage)
    (w / "truncated").mkdir()
    (w / "truncated" / "ckpt.pt").write_bytes((w / "run" / "ckpt.pt").read_bytes()[:5000])
    (w / "gpt2_labelled").mkdir()  # the run, as if trained on GPT-2 tokens: byte ids fit its vocabulary
    ckpt = torch.load(w / "run" / "ckpt.pt", weights_only=False)
    torch.save({**ckpt, "data_meta": {**ckpt["data_meta"], "tokenizer": "gpt2"}}, w / "gpt2_labelled" / "ckpt.pt")
    (w / "foreign").mkdir()
    torch.save({"weight": torch.zeros(3)}, w / "foreign" / "ckpt.pt")  # a real torch file, not ours
    (w / "annotated.py").write_text("n_layer = 2\nn_head: 1\n")
    (w / "docs.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (w / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (w / "binary.py").write_bytes(bytes(range(256)) * 4)  # a config file that is not text
    (w / "prompt_dir").mkdir()
    shutil.copytree(tiny_data, w / "understated")  # a meta.json that understates the vocabulary its files use
    meta = json.loads((w / "understated" / "meta.json").read_text())
    (w / "understated" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100, "max_token_id": 99}))
    from prepare_data import prepare
    # runs whose data_dir is then prepared again: from other text, in GPT-2 BPE, from text of the same byte lengths
    text = (ROOT / "data" / "shakespeare.txt").read_text()
    (w / "other.txt").write_text(text[300_000:400_000])
    (w / "swapped.txt").write_text(text[:300_000].translate(str.maketrans("ab", "ba")))  # as tiny_data's source
    for name, tokenizer, src in (("redo", "byte", "other"), ("regpt", "gpt2", "other"), ("resame", "byte", "swapped")):
        shutil.copytree(tiny_data, w / name)
        run(w / name, w / f"run_{name}", "--max_iters=2", "--eval_interval=2")
        shutil.rmtree(w / name)
        prepare(w / name, tokenizer=tokenizer, files=[w / f"{src}.txt"], piece_chars=5000)
    return w


T = ["train.py"]  # the battery: (script, arguments, words the one-line error must contain); {w} is the fixture dir
BATTERY = [
    (T, ["--dtype=fp16"], "dtype='fp16'"),
    (T, ["--grad_clip=-1"], "grad_clip=-1"),
    (T, ["--max_iters=-5"], "max_iters=-5"),
    (T, ["--weight_decay=-0.1"], "weight_decay=-0.1"),
    (T, ["--block_size=0"], "block_size=0"),
    (T, ["--batch_size=0"], "batch_size=0"),
    (T, ["--dropout=1.0"], "dropout=1.0"),
    (T, ["--learning_rate=0"], "learning_rate=0"),
    (T, ["--eval_tokens=10"], "eval_tokens=10: is less than one block"),
    (T, ["--device=tpu"], "device='tpu'"),
    (T, ["--data_parallel=zero3"], "data_parallel='zero3'"),
    (T, ["--compile"], "'compile' on the command line is now called 'torch_compile'"),
    (T, ["--parallel=fsdp"], "'parallel' on the command line is now called 'data_parallel'"),
    (T, ["--recompute=crnet", "--param=full"], "recompute='crnet'"),
    (T, ["--rank=1000"], "rank"),
    (T, ["--n_head=5"], "n_head"),
    (T, ["--stop_iter=999"], "stop_iter=999"),
    (T, ["--total_batch_tokens=100"], "total_batch_tokens=100: must be a multiple"),
    (T, ["--log_to=neptune"], "log_to='neptune'"),
    (T, ["--init_from={w}/nowhere"], "init_from="),
    (T, ["--init_from={w}/run", "--out_dir={w}/run", "--overwrite"], "is out_dir itself"),
    (T, ["{w}/annotated.py"], "annotated.py:2"),
    (T, ["{w}/missing_config.py"], "missing_config.py"),
    (T, ["--n_layr=2"], "'n_layr'"),
    (T, ["--out_dir="], "out_dir='': is empty"),
    (T, ["--data_dir={w}/nokey"], "meta.json"),
    (T, ["--data_dir={w}/short"], "train.bin"),
    (T, ["--data_dir={w}/tiny"], "val.bin"),
    (T, ["--data_dir={w}/nowhere"], "prepare_data.py"),
    (T, ["--vocab_size=100"], "vocab_size=100"),
    (T, ["--init_from=resume", "--out_dir={w}/run", "--max_iters=2"], "max_iters=2: the checkpoint is at iteration 2"),
    (T, ["--init_from=resume", "--out_dir={w}/run", "--max_iters=4", "--n_layer=5"], "n_layer=5"),
    (T, ["--init_from=resume", "--out_dir={w}/run", "--max_iters=4", "--stop_iter=2"], "stop_iter=2: the checkpoint is "
                                                                                        "already at iteration 2"),
    (T, ["--init_from=resume", "--out_dir={w}/run_redo", "--max_iters=4"], "redo': was prepared again since the checkpoint"),
    (T, ["--init_from=resume", "--out_dir={w}/run_regpt", "--max_iters=4"], "holds 'gpt2' tokens, but the checkpoint"),
    (T, ["--init_from=resume", "--out_dir={w}/run_resame", "--max_iters=4"], "(the same token counts, other tokens)"),
    (T, ["--init_from=resume", "--out_dir={w}/run_resame", "--max_iters=4", "--preflight"], "other tokens"),
    (T, ["--init_from=resume", "--out_dir={w}/empty", "--max_iters=4"], "empty/ckpt.pt cannot be read"),
    (T, ["--init_from=resume", "--out_dir={w}/garbage", "--max_iters=4"], "garbage/ckpt.pt cannot be read"),
    (T, ["--init_from=resume", "--out_dir={w}/truncated", "--max_iters=4"], "truncated/ckpt.pt cannot be read"),
    (T, ["--init_from=resume", "--out_dir={w}/foreign", "--max_iters=4"], "foreign/ckpt.pt is not a train.py checkpoint"),
    (T, ["--init_from=resume", "--out_dir={w}/nowhere"], "no checkpoint in"),
    (T, ["--out_dir={w}/run"], "ckpt.pt exists"),
    (T, ["--out_dir={w}/run", "--total_batch_tokens=100"], "total_batch_tokens=100"),  # the key, before "exists"
    (T, ["--data_dir={w}/understated"], "understated/train.bin holds token id 1"),
    (T, ["--eval_only", "--out_dir={w}/nowhere"], "no checkpoint in"),
    (T, ["--eval_only", "--out_dir={w}/run", "--init_from={w}/run"], "eval_only evaluates out_dir's checkpoint: drop init_from"),
    (T, ["--seed=100000000000000000"], "seed=100000000000000000: must be in"),
    (T, ["--cpu_threads=100000"], "cpu_threads=100000: is more than this machine's"),
    (["sample.py"], ["--out_dir={w}/run", "--seed=99999999999999999999999"], "seed=99999999999999999999999"),
    (["sample.py"], ["--out_dir={w}/run", "--cpu_threads=100000"], "cpu_threads=100000"),
    (["sample.py"], ["--out_dir={w}/run", "--start=FILE:{w}/binary.jsonl"], "binary.jsonl': is not UTF-8 text"),
    (["sample.py"], ["--out_dir={w}/run", "--top_k=-5"], "top_k=-5"),
    (["sample.py"], ["--out_dir={w}/run", "--temperature=-1"], "temperature=-1"),
    (["sample.py"], ["--out_dir={w}/truncated"], "truncated/ckpt.pt cannot be read"),
    (["sample.py"], ["--out_dir={w}/run/ckpt.pt"], "give the run's directory, "),
    (["sample.py"], ["--out_dir={w}/run", "--start=FILE:{w}/no_prompt.txt"], "no_prompt.txt"),
    (["sample.py"], ["--out_dir={w}/run", "--start=FILE:{w}/prompt_dir"], "prompt_dir"),
    (["plan.py"], ["--gpus=0"], "gpus=0"),
    (["plan.py"], ["--batch_size=-4"], "batch_size=-4"),
    (["tools/analyze.py"], ["--out_dir={w}/run", "--rank=1000"], "rank=1000"),
    (["tools/analyze.py"], ["--out_dir={w}/foreign"], "not a train.py checkpoint"),
    (["tools/analyze.py"], ["--out_dir={w}/gpt2_labelled", "--data_dir={w}/data"], "holds 'byte' tokens, but the checkpoint in"),
    (["tools/analyze.py"], ["--out_dir={w}/gpt2_labelled"], "holds 'byte' tokens, but the checkpoint in"),  # its own data_dir
    (["plan.py"], ["--init_from=resume", "--out_dir={w}/run"], "init_from='resume': plan.py plans the config it is given"),
    (["tools/analyze.py"], ["--out_dir={w}/run", "--plot=False"], "plot='False': needs an image extension"),
    (["prepare_data.py"], ["--files={w}/docs.jsonl", "--out_dir={w}/p1"], "docs.jsonl"),
    (["prepare_data.py"], ["--files={w}/binary.jsonl", "--out_dir={w}/p2"], "binary.jsonl"),
    (["prepare_data.py"], ["--files={w}/no_such_*.txt", "--out_dir={w}/p3"], "no_such_*.txt"),
    (["prepare_data.py"], ["--tokenizer=gpt5", "--out_dir={w}/p4"], "gpt5"),
    (["prepare_data.py"], ["--val_fraction=1.5", "--out_dir={w}/p5"], "val_fraction=1.5"),
    (["tools/bench.py"], ["--what=speed"], "what='speed'"),
    (["tools/bench.py"], ["sizez"], "what='sizez': must be one of"),
    (["tools/bench.py"], ["gpu", "--sizes=1b,7c"], "sizes='1b,7c': '7c' is not one of"),
    (["plan.py"], ["configs/crnet_llama_7b.py", "--rank=5000"], "rank=5000"),
    (T, ["{w}/binary.py"], "binary.py: not a config file: not UTF-8 text"),
    (["tools/ablate.py"], ["--variants=full", "--ablate_dir={w}/annotated.py/ab"], "annotated.py is a file, not a dir"),
    (["tools/ablate.py"], ["--variants=full,bogus", "--ablate_dir={w}/ab"], "bogus"),
    (["tools/ablate.py"], ["--lrs=fast", "--ablate_dir={w}/ab"], "lrs='fast'"),
    (["tools/ablate.py"], ["--seeds_at=first", "--ablate_dir={w}/ab"], "seeds_at='first'"),
    (["tools/ablate.py"], ["--seeds=1,-1", "--variants=full", "--ablate_dir={w}/ab"], "seed=-1"),
    (["tools/ablate.py"], ["--total_batch_tokens=100", "--variants=full", "--ablate_dir={w}/ab"], "total_batch_tokens=100"),
    (["tools/ablate.py"], ["--stop_iter=99999", "--variants=full", "--ablate_dir={w}/ab"], "stop_iter=99999: is beyond"),
    (["tools/ablate.py"], ["--seeds_at=best", "--ablate_dir={w}/ab"], "seeds_at='best': applies to a sweep"),
    (["tools/bench.py"], ["recompute", "--rtol=1e-4"], "rtol=0.0001: is set per row"),
    (["tools/plot.py"], ["{w}/run", "--out={w}/curves"], "needs an image extension"),
    (["tools/plot.py"], ["{w}/run", "--out={w}/no_dir/c.png"], "no_dir does not exist"),
    (["tools/plot.py"], ["--runs= {w}/run , {w}/nowhere"], "nowhere/metrics.jsonl not found"),
]


@pytest.mark.parametrize("script,args,words", [(s[0], a, w) for s, a, w in BATTERY],
                         ids=[f"{s[0]} {' '.join(a)}" for s, a, _ in BATTERY])
def test_malformed_input_is_one_line_and_changes_nothing(world, tiny_data, script, args, words, monkeypatch, capsys):
    args = [a.replace("{w}", str(world)) for a in args]
    if script == "train.py" and "--init_from=resume" not in args:
        args = [f"--data_dir={world / 'data'}", f"--out_dir={world / 'new'}", *args]  # unless args set them
    before = snapshot(world)
    mod = importlib.import_module(script[:-3].replace("/", "."))
    monkeypatch.setattr(sys, "argv", [script, *TINY, *args] if script == "train.py" else [script, *args])
    with pytest.raises(SystemExit) as e:
        configurator.main_guard(mod.main)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg.split("; make it with")[0], msg
    assert words in msg, msg
    printed = capsys.readouterr().out
    assert "|---|" not in printed, printed  # the checks come before a table starts
    assert snapshot(world) == before  # nothing written, nothing changed
    assert not (world / "new").exists()


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_data, tmp_path, capsys):
    args = ["--max_iters=8", "--eval_interval=2"]
    run(tiny_data, tmp_path / "ref", *args)
    run(tiny_data, tmp_path / "b", *args, "--stop_iter=6")  # ckpt.pt at 6, ckpt.prev.pt at 4
    ckpt = tmp_path / "b" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # the disk lost its tail
    capsys.readouterr()
    train.main([f"--out_dir={tmp_path / 'b'}", "--init_from=resume"])
    out = capsys.readouterr().out
    assert f"note: checkpoint {ckpt} cannot be read" in out and "falling back to" in out and "(iteration 4)" in out
    a, b = train_losses(tmp_path / "ref"), train_losses(tmp_path / "b")
    assert list(b) == list(range(1, 9)) and all(b[i] == pytest.approx(a[i], rel=1e-6) for i in range(5, 9))
    # the damaged file is set aside, not rotated in as the next save's fallback
    assert (tmp_path / "b" / "ckpt.pt.damaged").is_file() and ck.read_checkpoint("ddp", tmp_path / "b" / ck.PREV_FILE)["iter"] == 6
    assert "note: moved the damaged" in out


def test_damaged_sharded_checkpoint_falls_back(tiny_data, tmp_path, capsys):
    args = ["--max_iters=6", "--eval_interval=2", "--data_parallel=fsdp"]
    run(tiny_data, tmp_path / "ref", *args)
    run(tiny_data, tmp_path / "b", *args, "--stop_iter=4")
    shard = next((tmp_path / "b" / "ckpt_dcp" / "iter_0000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    train.main([f"--out_dir={tmp_path / 'b'}", "--init_from=resume"])
    out = capsys.readouterr().out
    assert f"shard {shard.name} is missing or truncated; falling back to" in out and "iter_0000002 (iteration 2)" in out
    a, b = train_losses(tmp_path / "ref"), train_losses(tmp_path / "b")
    assert all(b[i] == pytest.approx(a[i], rel=1e-5) for i in range(3, 7))
    assert (tmp_path / "b" / "iter_0000004.damaged").is_dir()
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt_dcp").iterdir()) == ["iter_0000004", "iter_0000006"]


def test_between_formats_the_newer_checkpoint_comes_first(tmp_path):
    """After a switch between ddp and fsdp a resume continues the newest save, whichever its format; within a
    format the names give the order, since a copy may have reset the mtimes."""
    ddp, prev, dcp4 = tmp_path / ck.CKPT_FILE, tmp_path / ck.PREV_FILE, tmp_path / ck.DCP_DIR / "iter_0000004"
    dcp4.mkdir(parents=True), ddp.write_bytes(b""), prev.write_bytes(b"")
    for (t_ddp, t_prev, t_dcp), order in [((20, 10, 30), [dcp4, ddp, prev]), ((30, 10, 20), [ddp, dcp4, prev]),
                                          ((20, 30, 10), [ddp, prev, dcp4])]:
        for path, t in ((ddp, t_ddp), (prev, t_prev), (dcp4, t_dcp)):
            os.utime(path, (t, t))
        assert [path for _, path in ck.checkpoints(tmp_path)] == order, (t_ddp, t_prev, t_dcp)


def test_a_checkpoint_unreadable_for_now_is_skipped_but_not_set_aside(tiny_data, tmp_path, monkeypatch):
    """An OS error or no memory says nothing of the file: the resume falls back past it, and keeps it in rotation.
    A file that is not one of ours (no weights) is damaged."""
    run(tiny_data, tmp_path, "--max_iters=4", "--eval_interval=2")  # ckpt.pt at 4, ckpt.prev.pt at 2
    real_load, errors = torch.load, []

    def load(path, *a, **k):
        if Path(path).name == ck.CKPT_FILE and errors:
            raise errors[0]
        return real_load(path, *a, **k)
    monkeypatch.setattr(ck.torch, "load", load)
    for e in (OSError(5, "Input/output error"), MemoryError()):
        errors[:] = [e]
        state = ck.load_train_state(tmp_path, say=lambda *a: None)
        assert (state["iter"], state["damaged"]) == (2, []), e
    monkeypatch.undo()
    torch.save({k: 0 for k in ck.TRAIN_KEYS}, tmp_path / ck.CKPT_FILE)
    with pytest.raises(ck.CheckpointError, match="is not a train.py checkpoint \\(no 'model', 'optimizer'\\)"):
        ck.read_checkpoint("ddp", tmp_path / ck.CKPT_FILE)
    assert ck.load_train_state(tmp_path, say=lambda *a: None)["damaged"] == [tmp_path / ck.CKPT_FILE]


def test_a_resume_may_change_only_what_leaves_the_run_the_same(tiny_data, tmp_path):
    """seed draws the batches: a resume refuses it. checkpoint_interval is free, and the same data_dir may be named
    another way (here a symlink)."""
    run(tiny_data, tmp_path / "b", "--max_iters=4", "--eval_interval=2", "--stop_iter=2")
    with pytest.raises(ValueError, match="seed=7: the checkpoint in .* was trained with 1337"):
        train.main([f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--seed=7"])
    (tmp_path / "link").symlink_to(tiny_data)
    train.main([f"--out_dir={tmp_path / 'b'}", "--init_from=resume", f"--data_dir={tmp_path / 'link'}",
                "--checkpoint_interval=1"])
    assert ck.read_checkpoint("ddp", tmp_path / "b" / ck.PREV_FILE)["iter"] == 3  # saved at 3: the new interval
    assert max(train_losses(tmp_path / "b")) == 4


def test_each_process_resumes_with_its_own_rng_state(monkeypatch):
    monkeypatch.setattr(ck, "load_weights", lambda *a: None)
    states = [{"torch": torch.Generator().manual_seed(seed).get_state(), "cuda": None} for seed in (1, 2)]
    ckpt = {"rng": states, "iter": 3, "best_val_loss": 1.0, "path": "x"}
    with torch.random.fork_rng(devices=[]):
        for proc in (0, 1):
            ck.restore(ckpt, None, None, {"init_from": "resume", "dropout": 0.1, "eval_only": False},
                       {"world": 2, "proc": proc, "device": torch.device("cpu"), "say": lambda *a: None})
            assert torch.equal(torch.get_rng_state(), states[proc]["torch"]), proc


def test_fine_tuning_takes_the_model_keys_from_the_checkpoint(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "pre", "--max_iters=2", "--eval_interval=2", "--n_layer=2")
    train.main([a for a in TINY if not a.startswith("--n_layer")] + [  # the model keys left to the checkpoint
        f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'ft'}", f"--init_from={tmp_path / 'pre'}", "--max_iters=2"])
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["n_layer"] == 2


def test_r50k_base_tokens_are_gpt2_tokens():
    """prepare_data's gpt2 is tiktoken's r50k_base: the same ids under either name; another encoding is refused."""
    ck.check_same_tokenizer({"tokenizer": "gpt2"}, {"tokenizer": "r50k_base"}, "d", "src")
    ck.check_same_tokenizer({"tokenizer": "r50k_base"}, {"tokenizer": "gpt2"}, "d", "src")
    with pytest.raises(ValueError, match="holds 'p50k_base' tokens, but the checkpoint in src was trained on 'gpt2'"):
        ck.check_same_tokenizer({"tokenizer": "gpt2"}, {"tokenizer": "p50k_base"}, "d", "src")


def test_fine_tuning_starts_from_the_weights_with_a_fresh_optimizer(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "pre", "--max_iters=30", "--eval_interval=30")
    pre = read_metrics(tmp_path / "pre")
    with pytest.raises(ValueError, match="n_layer=2: the checkpoint in .* has 3"):
        run(tiny_data, tmp_path / "ft", f"--init_from={tmp_path / 'pre'}", "--n_layer=2")
    run(tiny_data, tmp_path / "ft", f"--init_from={tmp_path / 'pre'}", "--max_iters=4", "--eval_interval=4",
        "--learning_rate=1e-3", "--warmup_iters=2", "--dropout=0.1")  # dropout may change
    ft = read_metrics(tmp_path / "ft")
    assert [r["iter"] for r in ft if "loss" in r] == [1, 2, 3, 4]  # a new run: iteration 1, its own schedule
    assert ft[0]["lr"] == pytest.approx(5e-4)
    assert ft[0]["loss"] < pre[0]["loss"] - 1.0 and ft[0]["loss"] < pre[-2]["loss"] + 0.3  # the trained weights
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (cfg["n_layer"], cfg["dropout"], cfg["init_from"]) == (3, 0.1, str(tmp_path / "pre"))
    train.main([f"--out_dir={tmp_path / 'ft'}", "--init_from=resume", "--max_iters=6"])  # and it resumes as usual
    assert max(train_losses(tmp_path / "ft")) == 6


def test_a_resumed_run_keeps_the_best_val_loss_it_had(tiny_data, tmp_path):
    args = ["--max_iters=6", "--eval_interval=2", "--keep_best"]
    run(tiny_data, tmp_path, *args, "--stop_iter=2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    torch.save({**ckpt, "best_val_loss": -1.0}, tmp_path / "ckpt.pt")  # a best no later eval can beat
    run(tiny_data, tmp_path, *args, "--init_from=resume")
    assert ck.load_train_state(tmp_path)["best_val_loss"] == -1.0 and ck.load_train_state(tmp_path / "best")["iter"] == 2


def test_write_atomic_leaves_the_old_file_when_the_write_is_cut(tmp_path, monkeypatch):
    import runlog
    p = tmp_path / "config.json"
    p.write_text("old")
    calls = []

    def cut(fd):  # a kill once the new text is written, before it is on disk and renamed
        calls.append(os.fstat(fd).st_size)
        raise KeyboardInterrupt
    monkeypatch.setattr(runlog.os, "fsync", cut)
    with pytest.raises(KeyboardInterrupt):
        runlog.write_atomic(p, "new contents")
    monkeypatch.undo()
    assert p.read_text() == "old" and calls == [len("new contents")]  # synced whole, before the rename
    runlog.write_atomic(p, "new contents")
    assert p.read_text() == "new contents" and [f.name for f in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_save_syncs_each_file_before_the_rename_that_publishes_it(tiny_data, tmp_path, monkeypatch, parallel):
    """A rename publishes a checkpoint as complete; without an fsync first, a power or machine loss could leave a
    complete-looking but empty ckpt.pt (and fallback). Order checked on a real save (the second: ckpt.pt is linked
    to ckpt.prev.pt first), then the directory synced, so that the renames themselves last."""
    run(tiny_data, tmp_path / "o", "--max_iters=2", "--eval_interval=1", f"--data_parallel={parallel}")
    events, real_replace = [], os.replace
    monkeypatch.setattr(ck, "fsync", lambda path: events.append(("fsync", str(path))))
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    run(tiny_data, tmp_path / "o", "--max_iters=3", "--init_from=resume")
    monkeypatch.undo()
    published = [a for kind, a in events if kind == "replace" and "ckpt" in os.path.relpath(a, tmp_path) and not a.endswith(".old")]
    assert published, events
    for a in published:  # each published file (DCP: its train_state.pt) synced before its rename, the folder after
        first = [a] if parallel == "ddp" else [os.path.join(a, "train_state.pt"), a]  # DCP: and its folder's entries
        i = events.index(("replace", a))
        assert all(("fsync", f) in events[:i] for f in first) and any(k == "fsync" and os.path.isdir(p) for k, p in events[i:]), events


def test_fsync_raises_a_files_write_error_and_lets_a_directory_pass(tmp_path, monkeypatch):
    """A write error only fsync reports (EIO, a full disk) must stop the save before the rename publishes the file;
    some file systems cannot sync a directory at all, which is no reason to stop."""
    import errno
    (tmp_path / "f").write_text("x")

    def failing(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(ck.os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        ck.fsync(tmp_path / "f")
    ck.fsync(tmp_path)


def test_a_file_system_without_locks_leaves_the_run_unguarded_with_one_note(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    for _ in range(2):  # refuse_to_clobber, then start_logs
        ck.hold_out_dir(tmp_path)
    assert capsys.readouterr().out == (f"note: cannot lock {tmp_path / '.lock'} (No locks available): nothing stops a "
                                       f"second run in out_dir={tmp_path}\n")
    ck.release_out_dir(tmp_path)


HOLDER = "import sys, time; sys.path.insert(0, '.'); import checkpoint; checkpoint.hold_out_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def test_one_run_per_out_dir_and_no_stale_lock_after_a_kill(tiny_data, tmp_path):
    """A second run in an out_dir another process trains in (a requeue while the old job still saves, workers that
    outlived their launcher) is refused, naming the holder, before it changes anything: two at once interleaved
    metrics.jsonl and raced on ckpt.pt.tmp. The lock dies with its process (SIGKILL included); a run in a new
    out_dir takes it when it makes the folder."""
    out = tmp_path / "o"
    run(tiny_data, out, "--max_iters=2", "--eval_interval=2")  # ended: its lock released, though this process lives on
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(out)
        with pytest.raises(FileExistsError, match=rf"out_dir={re.escape(str(out))} is in use by another run \(\S+ pid {holder.pid} holds "):
            run(tiny_data, out, "--max_iters=4", "--init_from=auto")
        with pytest.raises(FileExistsError, match="is in use by another run"):  # what the launch would meet
            run(tiny_data, out, "--max_iters=4", "--init_from=auto", "--preflight")
        assert snapshot(out) == before
        train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={out}", "--eval_only", "--init_from=resume"])  # reads
    finally:
        holder.kill()
        holder.wait()
    run(tiny_data, out, "--max_iters=4", "--init_from=auto", "--preflight")  # the kill freed it
    assert out.resolve() not in ck.HELD  # (a preflight only tries the lock)
    run(tiny_data, out, "--max_iters=4", "--init_from=auto")
    assert ck.load_train_state(out)["iter"] == 4

    import runlog
    new = tmp_path / "new"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(new)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        c = configurator.load(TINY + [f"--out_dir={new}"], "train.py")[0]
        with pytest.raises(FileExistsError, match="is in use by another run"):
            runlog.start_logs(c, new, 0)
        assert sorted(p.name for p in new.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_run_that_raises_frees_its_out_dir_at_once(tiny_data, tmp_path):
    """train.main stopped by an error after it locked out_dir, in a process that lives on (a notebook, a test, a
    sweep calling main): another process may train in that out_dir now, not only once this one exits."""
    out = tmp_path / "o"
    out.mkdir()  # an out_dir that exists is locked by refuse_to_clobber, before the data are read
    with pytest.raises(ValueError, match="vocab_size=100"):
        run(tiny_data, out, "--vocab_size=100")  # found by the token-id check, after the lock
    assert (out / ".lock").exists() and out.resolve() not in ck.HELD
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
    finally:
        holder.kill()
        holder.wait()
    ck.hold_out_dir(tmp_path / "mine")  # a caller's own lock: not train.main's to free, though main took one too
    with pytest.raises(ValueError, match="vocab_size=100"):
        run(tiny_data, out, "--vocab_size=100")
    assert set(ck.HELD) == {(tmp_path / "mine").resolve()}
    run(tiny_data, tmp_path / "mine", "--preflight")  # nor a preflight's, in the caller's own out_dir
    assert set(ck.HELD) == {(tmp_path / "mine").resolve()}
    ck.release_out_dir(tmp_path / "mine")


def test_a_train_split_of_one_block_is_a_clear_error(tiny_data, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(tiny_data, d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[: 2 * 33])  # block_size 32 + 1 target
    (d / "meta.json").write_text(json.dumps({**meta, "train_tokens": 33}))
    with pytest.raises(ValueError, match="holds 33 tokens, not more than one block"):
        run(d, tmp_path / "o", "--max_iters=1")


def test_keep_best_links_the_best_val_checkpoint(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--max_iters=8", "--eval_interval=2", "--keep_best", "--learning_rate=0.05", "--warmup_iters=1")
    evals = {r["iter"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}
    best = ck.load_train_state(tmp_path / "best")
    assert best["iter"] == min(evals, key=evals.get) and best["best_val_loss"] == min(evals.values())
    assert ck.load_train_state(tmp_path)["iter"] == 8


def test_log_to_needs_its_package_and_says_so(tiny_data, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="log_to='wandb': needs the wandb package, which is optional: pip install wandb"):
        run(tiny_data, tmp_path, "--log_to=wandb")
    assert not tmp_path.joinpath("config.json").exists()


def test_log_to_wandb_gets_every_row(tiny_data, tmp_path, monkeypatch, capsys):
    """A stand-in wandb module (the real one needs an account or a network): init once per process, the same
    run id on resume, every metrics.jsonl row logged at its iteration."""
    calls = []

    class Config:
        def update(self, c, allow_val_change):
            calls.append(("config", c["max_iters"], allow_val_change))

    class Run:
        config = Config()

        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self, exit_code=None):
            calls.append(("finish", exit_code))
    fake = type(sys)("wandb")
    fake.init = lambda **kw: calls.append(("init", kw["id"], kw["resume"])) or Run()
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(tiny_data, tmp_path, "--max_iters=4", "--eval_interval=2", "--stop_iter=2", "--log_to=wandb")
    train.main([f"--out_dir={tmp_path}", "--init_from=resume"])
    inits = [c for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0][1] == inits[1][1]
    assert [c for c in calls if c[0] == "config"] == [("config", 4, True)] * 2  # a resumed run may change free keys
    logged = [(c[1], sorted(c[2])) for c in calls if c[0] == "log"]
    rows = [(r["iter"], sorted(k for k in r if k != "iter")) for r in read_metrics(tmp_path)]
    assert logged == rows
    # each train.main finishes its wandb run as it leaves, after its last row: the process lives on
    assert [c for c in calls if c[0] in ("init", "finish")][1::2] == [("finish", 0)] * 2 and calls[-1][0] == "finish"
    calls.clear()
    with pytest.raises(SystemExit, match="iteration 1: non-finite loss"):  # a run that stops on an error: failed
        run(tiny_data, tmp_path / "o", "--log_to=wandb", "--learning_rate=1e30")
    assert [c[0] for c in calls] == ["init", "config", "log", "finish"] and calls[-1] == ("finish", 1) and not ck.SINKS
    Run.finish = lambda self, exit_code: 1 / 0
    with pytest.raises(SystemExit, match="iteration 1: non-finite loss"):  # main's error, not finish's, is reported
        run(tiny_data, tmp_path / "o", "--log_to=wandb", "--learning_rate=1e30", "--overwrite")
    assert "note: closing a log sink failed (ZeroDivisionError: division by zero)" in capsys.readouterr().out
    assert not ck.SINKS and not ck.HELD

    def interrupted(self, exit_code):
        raise KeyboardInterrupt  # a second Ctrl-C during a slow finish: out_dir is freed all the same
    Run.finish = interrupted
    with pytest.raises(KeyboardInterrupt):
        run(tiny_data, tmp_path / "o", "--log_to=wandb", "--learning_rate=1e30", "--overwrite")
    assert not ck.SINKS and not ck.HELD

    def refuse(**kw):
        raise RuntimeError("api_key not configured (no-tty)\nmore")
    fake.init = refuse
    files = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"log_to='wandb': wandb.init failed \(RuntimeError: api_key not configured "
                                         r"\(no-tty\)\); run `wandb login`, or set WANDB_MODE=offline"):
        run(tiny_data, tmp_path, "--log_to=wandb", "--overwrite")  # fails before the old run is removed
    assert snapshot(tmp_path) == files


def test_log_to_tensorboard_writes_events(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    closed, close = [], SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: closed.append(self.log_dir) or close(self))
    ck.hold_out_dir(tmp_path)  # the caller's lock on the same out_dir: main still closes what it opened
    run(tiny_data, tmp_path, "--max_iters=4", "--eval_interval=4", "--log_to=tensorboard")
    assert closed == [str(tmp_path / "tensorboard")] and not ck.SINKS  # as train.main left (the process lives on)
    assert tmp_path.resolve() in ck.HELD
    ck.release_out_dir(tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("val_loss")] == pytest.approx([r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r])


def test_a_redirected_log_grows_while_the_run_runs(tiny_data, tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'o'}",
                              "--max_iters=5000", "--eval_interval=5000"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        grown = lambda: "\niter      3 | loss" in log.read_text()
        while not grown() and time.time() < deadline:
            assert p.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        assert grown() and p.poll() is None  # logged while still running
    finally:
        p.kill()
        p.wait()


# A process that trains until it kills itself (SIGKILL: no cleanup of any kind) at its `n`-th
#   iter     start of an iteration
#   save     torch.save, after writing only half the file
#   replace  os.replace, just before a finished temporary file takes its final name
#   metrics  an append to metrics.jsonl, after writing half the line
KILLER = """
import os, signal, sys, torch, configurator, train, parallel, runlog
kind, n = sys.argv[1], int(sys.argv[2])
count = [0]
def hit():
    count[0] += 1
    return count[0] == n
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind == "iter":
    lr_at = train.lr_at
    train.lr_at = lambda it, c: die() if hit() else lr_at(it, c)
elif kind == "save":
    save = torch.save
    def cut(obj, f, *a, **k):
        save(obj, f, *a, **k)
        if hit():
            os.truncate(f, os.path.getsize(f) // 2)
            die()
    torch.save = cut
elif kind == "replace":
    replace = os.replace
    os.replace = lambda a, b: die() if hit() else replace(a, b)
elif kind == "metrics":
    log = runlog.log_metrics
    def half(path, row):
        if hit():
            with open(path, "a") as f:
                f.write(train.json.dumps(row)[:20])
            die()
        log(path, row)
    runlog.log_metrics = half
sys.argv = ["train.py", *sys.argv[3:]]
configurator.main_guard(train.main)
"""
KILLS = [("iter", 5), ("save", 1), ("replace", 3), ("metrics", 2), ("iter", 2), ("replace", 2), ("save", 2),
         ("metrics", 5), ("replace", 4), ("iter", 7), ("save", 1), ("metrics", 1), ("replace", 1), ("iter", 4),
         ("replace", 5), ("save", 2), ("metrics", 3), ("iter", 3), ("replace", 3), ("save", 1)]


def test_sigkill_anywhere_then_resume_loses_nothing(tiny_data, tmp_path):
    """20 kills at every kind of point; each time the run is resumed (from scratch if no checkpoint survived).
    The final metrics.jsonl equals the uninterrupted run's: every iteration's loss and every eval, once each."""
    args = [*TINY, f"--data_dir={tiny_data}", "--max_iters=40", "--eval_interval=3", "--dropout=0.1"]
    run(tiny_data, tmp_path / "ref", *args[len(TINY) + 1:])
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    last = 0  # the iteration of ckpt.pt after the previous process
    for kind, n in [*KILLS, ("none", 0)]:
        start = ["--init_from=resume"] if ck.find_checkpoint(out)[0] else [*args, "--overwrite"]
        p = subprocess.run([sys.executable, "-c", KILLER, kind, str(n), *start, f"--out_dir={out}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == (0 if kind == "none" else -9), (kind, n, p.stdout[-1500:], p.stderr[-1500:])
        # once a save has completed, ckpt.pt is there and readable whatever the kill interrupted (a job script
        # tests for it), and never older than a checkpoint that was there before
        now = ck.read_checkpoint("ddp", out / "ckpt.pt")["iter"] if last or (out / "ckpt.pt").exists() else 0
        assert now >= last, (kind, n, now, last)
        last = now
    keys = ("iter", "loss", "lr", "grad_norm", "tokens", "val_loss", "train_loss")
    ref, got = ([{k: r[k] for k in keys if k in r} for r in read_metrics(d)] for d in (tmp_path / "ref", out))
    assert [r["iter"] for r in got] == [r["iter"] for r in ref]
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-6), (a, b)
    json.loads((out / "config.json").read_text())
    assert not list(out.glob("*.tmp"))


def test_overwrite_removes_the_old_run_once_every_check_passed(tiny_data, tmp_path):
    """Nothing of an overwritten run can be resumed, fallen back to or mixed into TensorBoard: not even when the
    new run ends before its first save. A new run failing a check changes nothing."""
    pytest.importorskip("tensorboard")
    run(tiny_data, tmp_path, "--max_iters=4", "--eval_interval=2", "--param=full", "--keep_best", "--log_to=tensorboard")
    files = snapshot(tmp_path)
    assert {"ckpt.pt", "ckpt.prev.pt", "best/ckpt.pt"} <= set(files) and any(f.startswith("tensorboard/") for f in files)
    with pytest.raises(ValueError, match="eval_tokens=1: is less than one block"):
        run(tiny_data, tmp_path, "--overwrite", "--eval_tokens=1")
    assert snapshot(tmp_path) == files
    with pytest.raises(SystemExit, match="iteration 1: non-finite loss"):
        run(tiny_data, tmp_path, "--max_iters=4", "--overwrite", "--learning_rate=1e30")
    assert sorted(snapshot(tmp_path)) == [".lock", "config.json", "diverged.json", "metrics.jsonl"]
    assert [r["lr"] > 1 for r in read_metrics(tmp_path)] == [True]  # the new run's one step: no old row to plot
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        run(tiny_data, tmp_path, "--init_from=resume")


def test_a_copy_with_new_mtimes_still_resumes_the_latest(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--max_iters=6", "--eval_interval=2", "--stop_iter=4")
    os.utime(tmp_path / "ckpt.pt", (1, 1))  # as cp -r may leave it: the previous checkpoint looks newer
    assert ck.load_train_state(tmp_path)["iter"] == 4


def test_an_old_format_checkpoint_resumes_exactly(tiny_data, tmp_path):
    """ckpt.pt files written before both formats shared one layout hold model.state_dict() and a numbered
    optimizer.state_dict(), and configs with the keys' old names (parallel, compile); they resume in either mode,
    in the mode they were saved in, continuing the uninterrupted run's losses."""
    args = ["--max_iters=6", "--eval_interval=2"]
    run(tiny_data, tmp_path / "ref", *args)
    run(tiny_data, tmp_path / "old", *args, "--stop_iter=4")
    model, _ = ck.load_for_inference(tmp_path / "old")
    ckpt = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in opt.param_groups for p in g["params"]]
    number = {n: i for i, n in enumerate(order)}
    osd = ckpt["optimizer"]
    ckpt["optimizer"] = {"state": {number[n]: v for n, v in osd["state"].items()},
                         "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in osd["param_groups"]]}
    ckpt["model"] = model.state_dict()
    cfg = {k: v for k, v in ckpt["config"].items() if k not in ("data_parallel", "torch_compile")}
    ckpt["config"] = {**cfg, "parallel": "ddp", "compile": False}  # the keys' names then
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    (tmp_path / "old" / "ckpt.prev.pt").unlink()
    shutil.copytree(tmp_path / "old", tmp_path / "old_fsdp")
    torch.save({**ckpt, "config": {**cfg, "parallel": "fsdp", "compile": False}}, tmp_path / "old_fsdp" / "ckpt.pt")
    train.main([f"--out_dir={tmp_path / 'old'}", "--init_from=resume"])
    train.main([f"--out_dir={tmp_path / 'old_fsdp'}", "--init_from=resume"])  # resumes as the FSDP run it was
    assert ck.load_train_state(tmp_path / "old_fsdp")["config"]["data_parallel"] == "fsdp"
    assert (tmp_path / "old_fsdp" / "ckpt_dcp").is_dir()
    a = train_losses(tmp_path / "ref")
    for d, tol in (("old", 1e-6), ("old_fsdp", 1e-5)):
        b = train_losses(tmp_path / d)
        assert [b[i] for i in (5, 6)] == pytest.approx([a[i] for i in (5, 6)], rel=tol), d


def test_keep_best_copies_where_hard_links_fail_and_survives_a_kill_between_renames(tiny_data, tmp_path, monkeypatch):
    run(tiny_data, tmp_path / "a", "--max_iters=2", "--eval_interval=2")
    src, best = tmp_path / "a" / "ckpt.pt", tmp_path / "a" / "best"

    def no_links(*a):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(ck.os, "link", no_links)
    ck.link_best(src, best)
    assert (best / "ckpt.pt").read_bytes() == src.read_bytes() and (best / "ckpt.pt").stat().st_ino != src.stat().st_ino
    os.replace(best, best.with_name("best.old"))  # as a kill between the two renames leaves it
    train.main([f"--out_dir={tmp_path / 'a'}", "--init_from=resume", "--max_iters=3", "--eval_interval=5"])
    assert (best / "ckpt.pt").read_bytes() == src.with_name(ck.PREV_FILE).read_bytes()  # the resumed run put it back
    assert not best.with_name("best.old").exists()


def test_fine_tuning_checks_the_tokenizer_and_that_every_process_read_one_checkpoint(tiny_data, tmp_path, monkeypatch):
    run(tiny_data, tmp_path / "pre", "--max_iters=2", "--eval_interval=2")
    other = tmp_path / "gpt2_data"
    shutil.copytree(tiny_data, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": "gpt2", "vocab_size": 50257}))
    with pytest.raises(ValueError, match=f"data_dir='{other}': holds 'gpt2' tokens, but the checkpoint in .*pre was "
                                         f"trained on 'byte' tokens"):
        train.main(TINY + [f"--data_dir={other}", f"--out_dir={tmp_path / 'ft'}", f"--init_from={tmp_path / 'pre'}"])
    assert not (tmp_path / "ft").exists()
    seen = [(("pre/ckpt.pt", 4), "f"), (("pre/ckpt.pt", 6), "f")]  # a run still saving there handed out two
    monkeypatch.setattr(train.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), seen))
    with pytest.raises(ValueError, match="processes read different checkpoints \\(pre/ckpt.pt at iteration 4, "
                                         "pre/ckpt.pt at iteration 6\\): is a run still saving there"):
        ck.check_same_start({"init_from": "pre"}, {"world": 2}, {"path": "x", "iter": 2}, meta)
    seen[:] = [(None, "a" * 40), (None, "b" * 40)]  # a new run; one node's copy of data_dir differs
    with pytest.raises(ValueError, match=f"different token files in data_dir=d \\(fingerprints {'a' * 12}, {'b' * 12}"):
        ck.check_same_start({"init_from": "scratch", "data_dir": "d"}, {"world": 2}, None, meta)


def test_a_new_run_asks_before_removing_best_and_never_removes_its_own_source(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--max_iters=2", "--eval_interval=2", "--keep_best")
    for f in ("ckpt.pt", "ckpt.prev.pt"):
        (tmp_path / f).unlink(missing_ok=True)  # only best/ is left: still a run's checkpoint
    with pytest.raises(FileExistsError, match=f"best/ckpt.pt exists: start from its weights with --init_from="
                                              f"{tmp_path / 'best'} and another --out_dir, or pass --overwrite"):
        run(tiny_data, tmp_path)
    run(tiny_data, tmp_path.with_name(tmp_path.name + "_ft"), f"--init_from={tmp_path / 'best'}")  # the advice works
    with pytest.raises(ValueError, match="init_from=.*best': is inside out_dir, whose checkpoints a new run there removes"):
        run(tiny_data, tmp_path, f"--init_from={tmp_path / 'best'}", "--overwrite")
    assert (tmp_path / "best" / "ckpt.pt").is_file()


def test_damaged_checkpoints_are_set_aside_only_once_every_check_passed(tiny_data, tmp_path, capsys):
    run(tiny_data, tmp_path, "--max_iters=8", "--eval_interval=2", "--stop_iter=4")
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="eval_tokens=1"):
        train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--eval_tokens=1"])
    train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--preflight"])
    assert ckpt.is_file() and not (tmp_path / "ckpt.pt.damaged").exists()  # a failed check or a preflight moves nothing
    # unreadable for a reason that does not show damage (an OS error): fallen back past, but not moved aside
    err = ck.CheckpointError("cannot be read (OSError: [Errno 5] Input/output error)", damaged=False)
    assert err.damaged is False and ck.CheckpointError("x").damaged is True


def test_an_old_format_checkpoint_from_another_layout_is_refused(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--max_iters=4", "--eval_interval=2", "--stop_iter=2")
    model, _ = ck.load_for_inference(tmp_path)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    osd = opt.state_dict()
    moved = {**osd, "param_groups": [{**osd["param_groups"][0], "params": osd["param_groups"][0]["params"][:-1]},
                                     {**osd["param_groups"][1], "params": osd["param_groups"][0]["params"][-1:] + osd["param_groups"][1]["params"]}]}
    with pytest.raises(ck.CheckpointError, match="holds optimizer groups of .* parameters, the optimizer has"):
        ck.named_optimizer_state(model, opt, moved)


class Cut(BaseException):
    """A kill, as far as the interrupted save can tell: nothing after it runs."""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_save_cut_at_any_step_leaves_the_newest_checkpoint_listed(tmp_path, monkeypatch, parallel):
    """Each file-system step of a save (write, rename, link, unlink, rmdir) cut in turn, for a new iteration and
    for the same iteration saved again: the newest completed checkpoint is always listed first and readable
    (for ddp under the name ckpt.pt), and the next save leaves just the new checkpoint and its fallback."""
    from torch import distributed as dist
    if parallel == "fsdp":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, raw = par.build_model(model_config(configurator.load(TINY, "train.py")[0]), parallel, torch.device("cpu"), 0)
        opt = raw.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
        save = lambda out, it: ck.save_checkpoint(out, parallel, raw, opt, {"iter": it, "best_val_loss": 1.0,
                                                    "config": {}, "model_config": {}, "rng": []}, 0)
        real = {name: getattr(os, name) for name in ("replace", "rename", "link", "unlink", "rmdir")}
        real_save = torch.save
        for again in (False, True):
            for k in range(1, 100):
                out = tmp_path / f"{again}_{k}"
                out.mkdir()
                save(out, 2)
                save(out, 4)
                count = [0]

                def step(fn):
                    def cut(*a, **kw):
                        if fn is real_save and not isinstance(a[1], (str, os.PathLike)):
                            return fn(*a, **kw)  # DCP serializing an object in memory
                        count[0] += 1
                        if count[0] == k:
                            if fn is real_save:  # half a file, as a kill during the write leaves it
                                fn(*a, **kw)
                                os.truncate(a[1], os.path.getsize(a[1]) // 2)
                            raise Cut
                        return fn(*a, **kw)
                    return cut
                for name, fn in real.items():
                    monkeypatch.setattr(os, name, step(fn))
                monkeypatch.setattr(torch, "save", step(real_save))
                try:
                    save(out, 4 if again else 6)
                    finished = True
                except BaseException as e:  # DCP hands a cut inside its writer on wrapped
                    if not (isinstance(e, Cut) or "test_robust.Cut" in str(e)):
                        raise
                    finished = False
                finally:
                    for name, fn in real.items():
                        monkeypatch.setattr(os, name, fn)
                    monkeypatch.setattr(torch, "save", real_save)
                kind, path = ck.find_checkpoint(out)
                if parallel == "ddp":
                    assert path == out / "ckpt.pt", (again, k)
                assert ck.read_checkpoint(kind, path)["iter"] in (4, 6), (again, k, path)
                save(out, 8)  # and the next save cleans up after the cut one
                assert [p.name for _, p in ck.checkpoints(out)][:1] == ["ckpt.pt" if parallel == "ddp" else "iter_0000008"]
                assert len(ck.checkpoints(out)) == 2 and not list(out.rglob("*.tmp"))
                if finished:
                    assert k > 2, "a save with fewer steps than this test cuts cannot be"
                    break
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_init_from_auto_is_one_command_to_repeat_after_every_kill(tiny_data, tmp_path):
    """The same command after each SIGKILL (before the first checkpoint, after a checkpoint_interval one, after an
    eval's) starts the run, then resumes it; it ends with the uninterrupted run's metrics."""
    args = [*TINY, f"--data_dir={tiny_data}", "--max_iters=12", "--eval_interval=6", "--checkpoint_interval=2", "--dropout=0.1"]
    run(tiny_data, tmp_path / "ref", *args[len(TINY) + 1:])
    out = tmp_path / "auto"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for kind, n, ckpt_iter in [("iter", 2, None), ("iter", 6, 4), ("iter", 4, 6), ("none", 0, 12)]:
        p = subprocess.run([sys.executable, "-c", KILLER, kind, str(n), *args, "--init_from=auto", f"--out_dir={out}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == (0 if kind == "none" else -9), (kind, n, p.stdout[-1500:], p.stderr[-1500:])
        assert (ck.load_train_state(out)["iter"] if ckpt_iter else ck.find_checkpoint(out)[0]) == ckpt_iter
    keys = ("iter", "loss", "lr", "grad_norm", "val_loss", "train_loss")
    ref, got = ([{k: r[k] for k in keys if k in r} for r in read_metrics(d)] for d in (tmp_path / "ref", out))
    assert [r["iter"] for r in got] == [r["iter"] for r in ref]
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-6), (a, b)


def test_the_gpu_table_stays_within_its_time_budget(capsys):
    """tools/bench.py gpu runs each row in a fresh process for at most what is left of budget_s: a row cut there, and
    the rows after it, say so in the table, which still prints in full."""
    from tools import bench
    with pytest.raises(SystemExit, match="stopped at the time budget"):
        bench.fresh_process("gpu", "--size=60m", "--steps=1", timeout=0.5)  # python + torch take longer to start
    bench.main(["gpu", "--sizes=60m", "--budget_s=5"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 60m |")]
    assert len(rows) == 6 and all(r.endswith("not run: budget_s=5 spent |") for r in rows), out
    assert "Total" in out.splitlines()[-1]


def test_a_bare_word_is_the_positional_key_even_where_a_file_has_its_name(tmp_path, monkeypatch):
    """`python tools/bench.py gpu > gpu` makes a file named gpu before Python starts: the word still picks the table,
    and a word that is neither a choice nor a file is that key's error, not 'config file not found'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpu").write_text("")
    assert configurator.load(["gpu"], "tools/bench.py", positional="what")[0]["what"] == "gpu"
    (tmp_path / "mine").write_text("steps = 5\n")  # a config file without .py is still read as one
    assert configurator.load(["sizes", "mine"], "tools/bench.py", positional="what")[0]["steps"] == 5
    with pytest.raises(configurator.ConfigError, match="what='sizez': must be one of"):
        configurator.load(["sizez"], "tools/bench.py", positional="what")


def test_a_failed_moe_row_is_reported_and_compares_no_row_with_the_wrong_one(monkeypatch, capsys):
    """bench.py moe goes on past a failed row; without its dense row, the MoE rows have no 'vs dense' ratio
    (not one against each other)."""
    from tools import bench

    def row(*args, **_):
        if "--size=qwen3_dense" in args and "--param=full" in args:
            raise SystemExit("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory")
        return {"step_s": 1.0, "tps": 1000.0 if "--experts='loop'" in args else 2000.0, "peak": 2 ** 30}

    monkeypatch.setattr(bench, "fresh_process", row)
    bench.main(["moe", "--batch=1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| full |", "| crnet |"))]
    assert "failed: torch.OutOfMemoryError: CUDA out of memory |" in rows[0]
    assert [r.split(" | ")[7] for r in rows[1:]] == ["-", "-", "1.000x", "0.500x", "1.000x"], rows
