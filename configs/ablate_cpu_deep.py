# tools/ablate.py's deeper CPU default: 8 layers, so that 7 of them are CR-Net layers and depth effects can show.
#   python tools/ablate.py configs/ablate_cpu_deep.py                      # 4 variants x 3 lrs, one seed: ~90 min, 2 cores
#   python tools/ablate.py configs/ablate_cpu_deep.py --seeds=1337,1338    # and a second seed: ~3 h (--stop_iter=N splits it)
# Dims: llama h 256, h_ff 688 (~8/3 h), 4 heads, 8 layers, CR-Net rank 64 = h/4 in layers 2..8.
# Data: byte-level Shakespeare (vocab 257), because GPT-2 BPE's 50257-wide head costs 3/4 of every CPU step at
#   this width (measured: 737 tok/s vs 3,175 tok/s byte-level for the full model); note that on bytes layer 1's
#   q/k/v see at most 85 distinct input rows (84 byte values and end-of-text), so the low-rank-first-layer ablation loses little there.
# Batch: 16 seq x 128 tok x 2 accum = 4,096 tokens/step; 400 steps = 1.64M tokens (~0.36 epoch; windows start at random, so some overlap).
# Measured on a 2-core CPU (20 steps alone): full 3,175 tok/s, crnet 3,863 tok/s, i.e. ~8.5 and ~7 min per run
#   with the 4 evaluations; four variants ~28 min per learning rate.
ablate_dir = "out/ablate_cpu_deep"
lrs = "1e-3,3e-3,1e-2"             # each variant at each lr; the table reports each at its best
n_layer = 8
n_head = 4
n_embd = 256
intermediate_size = 688
block_size = 128
rank = 64                          # n_embd / 4
batch_size = 16
total_batch_tokens = 4096          # 16 * 128 * 2
max_iters = 400
warmup_iters = 40
weight_decay = 0.0
eval_interval = 100
eval_tokens = 65536                # 512 windows of 128
log_interval = 10
