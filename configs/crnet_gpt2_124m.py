# GPT-2 small (124M full-rank; tied embeddings, learned positions) as crnet: 75.8M parameters at vocab 50304.
# CR-Net: rank 192 = h/4 in layers 2..12, layer 1 full-rank.
# Batch: 12 seq x 1024 tok x 8 GPUs x 5 accum = 491,520 tokens/step (nanoGPT's).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/crnet_gpt2_124m.py

out_dir = "out/crnet_gpt2_124m"
data_dir = "data/fineweb_edu_gpt2"
data_recipe = "python prepare_data.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=10e9 --out_dir=data/fineweb_edu_gpt2"
arch = "gpt2"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = True
vocab_size = 50304  # 50257 padded to a multiple of 64 for faster matmuls
param = "crnet"
rank = 192
batch_size = 12
total_batch_tokens = 491520  # 12 * 1024 * 8 * 5
max_iters = 20000  # ~9.8B tokens
warmup_iters = 700
learning_rate = 1.8e-3
weight_decay = 0.1
eval_interval = 1000
eval_tokens = 5_242_880
torch_compile = True
