#!/usr/bin/env bash
# The GPU measurements issue 11 still lacks, as ONE command for a lent device machine (PyTorch alone, synthetic
# MNIST-shaped data, nothing to carry), each part under its own time limit so that one slow part cannot eat the
# session's device minutes (~5 min in all on an H100; the limits add up to 9.5 min):
#
#   bash benchmarks/gpu_session.sh
#
#   1. study: the study's pack of 12 students against one unpacked student, whole epochs with evaluation, on
#      55,000 images: how long the study's 1,000 pack epochs take (the goal: <= 15 min of training).
#   2. packs: K = 1, 16, 64 in every layout and arithmetic, with fused Adam and with the step captured as a CUDA
#      graph: whether either is worth building into kd_tune.distill.pack_train.train_pack for CUDA.
#   3. eval: the evaluation's chunk size on the GPU (kd_tune.distill.train.EVAL_BATCH = 2,048 today).
#   4. adam: kd-tune's Adam against torch.optim.Adam on the GPU (foreach kernels): identical weights and state.
#   5. methods: each distillation method's epoch (kd's divergences and logit standardization, DKD, DIST) against a KD
#      epoch, cached logits, one student and a pack of 64 (issue 37's goal: each <= 1.05x KD).
#
# Each part's output goes to stdout and to $OUT/gpu_<part>.txt ($OUT: the device tool's folder, else here).
# DEVICE=cpu with tiny sizes is a dry run of this script on any machine (no CUDA graphs there):
#   DEVICE=cpu STUDY_ARGS="--images 2000 --repeats 1" PACK_ARGS="--sizes 2 --images 256 --repeats 1" \
#     EVAL_ARGS="--images 512 --repeats 1" METHOD_ARGS="--images 512 --pack-images 256 --pack 2 --rounds 1 --pack-rounds 1 \
#     --loss-rounds 1 --loss-reps 2" bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-.}
device=${DEVICE:-cuda}
graphs=$([ "$device" = cuda ] && echo --graphs)

part() {  # part NAME SECONDS COMMAND...: run it under the limit, keep its output, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/gpu_$name.txt"
    echo "== $name: exit status ${PIPESTATUS[0]} (124: it hit the limit)"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"; } | tee "$out/gpu_device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
part study 240 python benchmarks/pack_bench.py --device "$device" --study --repeats 3 ${STUDY_ARGS:-}
# shellcheck disable=SC2086
part packs 210 python benchmarks/pack_bench.py --device "$device" --nchw $graphs --fused --bf16 --sizes 1,16,64 --repeats 2 ${PACK_ARGS:-}
# shellcheck disable=SC2086
part adam 30 python benchmarks/adam_check.py --device "$device"
# shellcheck disable=SC2086
part eval 90 python benchmarks/eval_bench.py --device "$device" --chunks 512,2048,8192,32768 ${EVAL_ARGS:-}
# shellcheck disable=SC2086
part methods 150 python benchmarks/method_bench.py --device "$device" --pack 64 --rounds 5 --pack-rounds 3 ${METHOD_ARGS:-}
