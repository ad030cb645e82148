#!/usr/bin/env bash
# Every demo under valgrind memcheck, with small embedded settings: zero
# memory errors and zero definite or indirect leaks.  Only valgrind's own
# verdict counts here (exit 99); the demos' results are tested elsewhere.
set -uo pipefail
build=$1
command -v valgrind >/dev/null || { echo "no valgrind"; exit 77; }
ex=$build/examples
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1

"$ex/maze/imp-maze" generate --size 13 --count 2 --seed 5 >"$tmp/mazes.txt"
runs=(
    "$ex/imp-first"
    "$ex/imp-root-demo $tmp/root.svg"
    "$ex/imp-deq-demo $tmp/deq.svg"
    "$ex/imp-ode-demo --iters 5 $tmp/ode.svg"
    "$ex/imp-opt-demo --train 40 --epochs 1"
    "$ex/imp-stack-demo --epochs 2"
    "$ex/maze/imp-maze solve $tmp/mazes.txt"
)
failed=0
for run in "${runs[@]}"; do
    name=$(basename "${run%% *}")
    valgrind -q --error-exitcode=99 --leak-check=full \
        --errors-for-leak-kinds=definite,indirect \
        --show-leak-kinds=definite,indirect $run >/dev/null 2>"$tmp/vg"
    rc=$?
    if [ "$rc" -eq 99 ]; then
        echo "$name: valgrind found errors or leaks:"
        grep '^==' "$tmp/vg" | head -40
        failed=$((failed + 1))
    else
        echo "$name: clean (exit $rc)"
    fi
done
[ "$failed" -eq 0 ]
