#!/usr/bin/env bash
# What only a GPU can show, in one short run (each part stopped after 5 minutes): the CUDA tests, then the figures the
# README still lacks on a GPU: the batched LARS step, the colour operations on the device (data.photometric) and the
# step throughput and memory of the lean head. Results go to $OUT (default benchmarks/results/gpu), one log per part.
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh           # on the GPU machine, from the repository root
#   QUICK=1 DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh   # a smoke run of the script, on a CPU
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
PY=${PYTHON:-python3}  # the GPU machine has its own torch; here: PYTHON=.venv/bin/python
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
part() {  # name, command...: run one part under a time limit, keep going when it fails
  local name=$1; shift
  echo "== $name: $*"
  timeout 300 "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? ($(tail -n 1 "$OUT/$name.log"))"
}
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
if [ "$DEVICE" != cpu ]; then part cuda_tests "$PY" -m pytest -q -x tests/test_cuda.py; fi
part optimizer_step "$PY" benchmarks/optimizer_step.py $QUICK --device "$DEVICE" --output "$OUT/optimizer_step.json"
part photometric "$PY" benchmarks/step_throughput_memory.py $QUICK --device "$DEVICE" --models resnet50 \
  --settings lean --data imagenet,imagenet_device --set train.amp=bf16 train.channels_last=true \
  --output "$OUT/step_throughput_memory_photometric.json"
part lean_head "$PY" benchmarks/step_throughput_memory.py $QUICK --device "$DEVICE" --models resnet50 \
  --settings end_to_end,lean_plain_head,lean --data "" --batch 128 --set train.amp=bf16 train.channels_last=true \
  --output "$OUT/step_throughput_memory_bf16.json"
