"""Tools beside the core: each reads a run, a model or the core's own code, and none is needed to train.

    python tools/bench.py --help     memory and speed tables (recomputation, sizes, one-GPU speed, bytes, init)
    python tools/ablate.py --help    parameterizations trained side by side (train.py runs), one table
    python tools/analyze.py --help   the paper's observation on a checkpoint or a pretrained model
    python tools/hf.py --help        Hugging Face / GGUF checkpoints in, a full-rank run out
    python tools/plot.py --help      loss and lr curves of runs
"""
