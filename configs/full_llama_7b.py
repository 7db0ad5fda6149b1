# LLaMA-7B (full), the GaLore/C4 LLaMA dimensions that arXiv 2509.18993 trains.
# Parameters: 6738.4M with the paper's 32000-token vocabulary; 6888.0M with GPT-2 BPE (50257), which we use.
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 110.2 GB per GPU under DDP, before activations,
#   so it shards with FSDP2: plan.py says 29.9 GiB per GPU on 8 GPUs without recompute (what recompute="auto"
#   picks on 80 GiB), 17.9 with block checkpointing.
# Batch: the paper's 512 sequences x 256 tokens = 131,072 tokens/step; 8 seq x 256 tok per GPU
#   -> grad_accum = 131072 / (8 * 256 * n_gpus) = 64 on 1 GPU, 8 on 8.
# Schedule: 80,000 steps = 10.5B tokens, 10% warmup, cosine to 10% of peak (GaLore protocol).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/full_llama_7b.py

out_dir = "out/full_llama_7b"
data_dir = "data/c4_gpt2_11b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=1.07e+10 --out_dir=data/c4_gpt2_11b"
arch = "llama"
n_layer = 32
n_head = 32
n_embd = 4096
intermediate_size = 11008
block_size = 256
param = "full"
batch_size = 8
total_batch_tokens = 131072  # 512 * 256
max_iters = 80000
warmup_iters = 8000
learning_rate = 0.001  # GaLore's full-rank baseline
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True
recompute = "auto"  # none where it fits the GPU, else block
data_parallel = "fsdp"              # DDP would need 105.5 GiB per GPU (plan.py)
