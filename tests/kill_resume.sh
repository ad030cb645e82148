#!/usr/bin/env bash
# A training run killed with SIGKILL at random moments, 20 times, must
# always resume from an intact checkpoint: after every kill the checkpoint
# (if one was written yet) loads and evaluates, and the next run resumes
# from a step no earlier than the last one resumed from.
set -euo pipefail
maze=$1
kills=${2:-20}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ckpt=$tmp/train.ckpt
last=0
intact=0
RANDOM=7 # the kill times are reproducible

for i in $(seq 1 "$kills"); do
    "$maze" train --out "$ckpt" --steps 1000000 --ckpt-every 3 \
        --log-every 1000000 >"$tmp/log" 2>&1 &
    pid=$!
    # Between 0.2 and 2.0 s: mid-step, mid-save or idle, by chance.
    sleep "$(printf '0.%d' $((RANDOM % 9 + 1)))"
    sleep "$((RANDOM % 2))"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true

    step=$(sed -n 's/^resuming .* at step \([0-9]*\)$/\1/p' "$tmp/log")
    step=${step:-0}
    if [ "$step" -lt "$last" ]; then
        echo "kill $i: resumed at step $step, earlier than $last"
        exit 1
    fi
    last=$step
    if [ -f "$ckpt" ]; then
        if ! "$maze" eval --model "$ckpt" --sizes 9 --count 1 \
            --count-random 0 >"$tmp/eval" 2>&1; then
            echo "kill $i: the checkpoint does not load:"
            cat "$tmp/eval"
            exit 1
        fi
        intact=$((intact + 1))
    fi
done

# The final run must resume too.
"$maze" train --out "$ckpt" --steps 1 --log-every 1000000 >"$tmp/log" 2>&1 ||
    true
leftovers=$(find "$tmp" -name 'train.ckpt.tmp.*' | wc -l)
echo "$kills kills; checkpoint present and intact after $intact of them;" \
    "last resumed step $last;" \
    "$leftovers temporary files left by kills mid-save"
[ "$intact" -gt 0 ]
