"""`stages.pretrain`'s pieces: the MLM recipe in plain PyTorch and the token-block cache (also the benchmarks')."""
