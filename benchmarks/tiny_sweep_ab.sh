#!/usr/bin/env bash
# A tiny whole sweep, this checkout against another one, alternated (A B A B ...: this machine's speed drifts):
# the tests' tiny space (1,000 images of the committed MNIST slice, teacher 8/16 trained for 1 epoch, alpha {0, 1}
# x epochs {1, 2} = 2 trials), a cold teacher cache every time. Prints each run's wall seconds, the whole machine's
# busy CPU seconds meanwhile (Linux /proc/stat: Ray's processes and the trial workers included) and the teacher's
# test accuracy, which must be the same on both sides.
#
#   bash benchmarks/tiny_sweep_ab.sh ../old-checkout [REPEATS]      # e.g. git worktree add ../old-checkout HEAD~1
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
other=$(cd "${1:?usage: tiny_sweep_ab.sh OTHER_CHECKOUT [REPEATS]}" && pwd)
repeats=${2:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/space.yaml" <<'YAML'
name: tiny
dataset: {name: mnist, train_size: 1000, label_noise: 0.0, val_size: 100}
teacher: {widths: [8, 16], epochs: 1, lr: 0.003, batch_size: 64}
student: {widths: [4, 8], lr: 0.003, batch_size: 64}
grid: {alpha: [0.0, 1.0], temperature: [3.0], epochs: [1, 2], seed: [0]}
resources: {cpu: 1, gpu: 0}
YAML
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
for i in $(seq "$repeats"); do
    for side in other this; do
        src=$([ "$side" = other ] && echo "$other" || echo "$here")
        run="$work/$side-$i"
        mkdir -p "$run"
        a=$(busy); t0=$(date +%s.%N)
        (cd "$run" && PYTHONPATH="$src" KD_TUNE_DATA_DIR="$here/tests/fixtures/mnist_slice" KD_TUNE_STORAGE="$run/store" \
            python -m kd_tune.cli sweep "$work/space.yaml" --quiet > out.txt 2>&1)
        t1=$(date +%s.%N); b=$(busy)
        printf "%-5s %d: wall %5.1f s, busy CPU %5.1f s, %s\n" "$side" "$i" "$(echo "$t1 - $t0" | bc)" "$(echo "($b - $a) / 100" | bc -l)" \
            "$(grep -o 'teacher test acc [0-9.]*' "$run/out.txt" | head -1)"
    done
done
