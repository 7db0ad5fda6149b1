# LLaMA-130M (full), the GaLore/C4 LLaMA dimensions that arXiv 2509.18993 trains.
# Parameters: 134.1M with the paper's 32000-token vocabulary; 162.1M with GPT-2 BPE (50257), which we use.
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 2.6 GB per GPU under DDP, before activations.
# Batch: the paper's 512 sequences x 256 tokens = 131,072 tokens/step; 64 seq x 256 tok per GPU
#   -> grad_accum = 131072 / (64 * 256 * n_gpus) = 1 on 8 GPUs, 8 on 1 GPU.
# Schedule: 20,000 steps = 2.6B tokens, 10% warmup, cosine to 10% of peak (GaLore protocol).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/full_llama_130m.py

out_dir = "out/full_llama_130m"
data_dir = "data/c4_gpt2_2.7b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=2.67e+09 --out_dir=data/c4_gpt2_2.7b"
arch = "llama"
n_layer = 12
n_head = 12
n_embd = 768
intermediate_size = 2048
block_size = 256
param = "full"
batch_size = 64
total_batch_tokens = 131072  # 512 * 256
max_iters = 20000
warmup_iters = 2000
learning_rate = 0.001  # GaLore's full-rank baseline
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True
