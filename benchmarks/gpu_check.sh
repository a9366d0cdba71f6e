#!/usr/bin/env bash
# The GPU checks in one device call (about 6 minutes on an H100 or H200): the MLM throughput benchmark as the
# README reports it (batch 512 with the vocabulary padded to a multiple of 64, then batch 256 unpadded; ours,
# ours_bf16 and stock) and the bf16_weights learning check. Carry data/clean/domain_train,
# models/general/tokenizer.json and models/general/tokenizer_config.json: the model's weights stay behind, the
# GPU runs train BERT-base from random weights. Logs go to $OUT (else /tmp/gpu_check); each log's last line is JSON.
set -uo pipefail  # a failing check does not skip the others: the exit status says whether any failed
status=0
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
  | tee -a "$out/gpu.txt"
python3 benchmarks/mlm_throughput.py --batch 512 --pad-vocab 64 --recipes ours_bf16 2>&1 \
  | tee "$out/throughput_b512.log" || status=1
python3 benchmarks/mlm_throughput.py --batch 256 --recipes ours_bf16 2>&1 \
  | tee "$out/throughput_b256.log" || status=1
python3 benchmarks/bf16_weights_learning.py 2>&1 | tee "$out/learning.log" || status=1
exit $status
