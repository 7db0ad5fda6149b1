# Qwen-3-0.6B's shape (crnet): h 1024, 28 layers, 16 query heads of 128 (head_dim independent of h / n_head), 8 key/value
# heads, SwiGLU 3072, QK-norm, RoPE theta 1,000,000, tied embeddings.
# Parameters: 327.1M with Qwen-3's 151936-token vocabulary (596.0M for the full-rank model, as Qwen-3-0.6B);
#   223.0M with GPT-2 BPE (50257), which we use: the Qwen tokenizer is not bundled.
# Rank r = 256 = h/4 in layers 2..28; layer 1 full-rank. A CR-Net layer holds r (7h + 2q + 2kv + 3ff) = 5.77M
#   parameters against h (q + 2kv) + q h + 3 h ff = 15.73M full-rank (q = 16 x 128 = 2048, kv = 8 x 128 = 1024).
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 3.6 GB per GPU under DDP, before activations.
# Batch: 512 sequences x 256 tokens = 131,072 tokens/step, as the LLaMA configs (the paper's protocol); 32 seq x 256
#   tok per GPU -> grad_accum = 131072 / (32 * 256 * n_gpus) = 16 on 1 GPU, 2 on 8.
# Schedule: 60,000 steps = 7.9B tokens, 10% warmup, cosine to 10% of peak.
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/crnet_qwen3_600m.py

out_dir = "out/crnet_qwen3_600m"
data_dir = "data/c4_gpt2_8b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=8.02e+09 --out_dir=data/c4_gpt2_8b"
arch = "qwen3"
n_layer = 28
n_head = 16
n_kv_head = 8
head_dim = 128
n_embd = 1024
intermediate_size = 3072
tie_embeddings = True
block_size = 256
param = "crnet"
rank = 256
batch_size = 32
total_batch_tokens = 131072  # 512 * 256
max_iters = 60000
warmup_iters = 6000
learning_rate = 0.003  # as the LLaMA CR-Net configs: ~3x the full-rank lr (CoLA's rule of thumb); untuned here
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True
recompute = "auto"  # the fastest mode whose memory plan fits the GPU
