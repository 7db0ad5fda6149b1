# A seconds-long CPU smoke test of the whole loop (data, train, eval, checkpoint): not for quality.
# 2 layers x 64 wide CR-Net LLaMA, byte-level Shakespeare; 5 s on 2 cores (val loss 2.44).
# Batch: 8 seq x 64 tok x 1 process x 2 accum = 1024 tokens/step.
out_dir = "out/cpu_debug"
data_dir = "data/shakespeare_byte"
n_layer = 2
n_head = 2
n_embd = 64
intermediate_size = 172
rank = 16
block_size = 64
batch_size = 8
total_batch_tokens = 1024  # 8 * 64 * 2
max_iters = 100
warmup_iters = 10
eval_interval = 50
eval_tokens = 16384
log_interval = 10
