#!/usr/bin/env bash
# Draw the documentation's figures with the programs of a build:
#
#   docs/make-figures.sh [BUILD [OUT]]    (defaults: build, BUILD/docs/figures)
#
# Every figure comes from a demo or a documentation example, run with the
# arguments below; nothing is drawn by hand.  A program that is not built
# (a demo not written yet, or a build without it) is skipped with a
# message, and a placeholder that says so takes its figure's place, so
# that the site still builds; the skipped figures are listed at the end
# and in OUT/SKIPPED.  Each program's output goes to OUT/logs/.  The exit
# status is non-zero if a program that exists fails (the maze model
# excepted: without a trained model its figures are skipped).
set -uo pipefail

build=${1:-build}
out=${2:-$build/docs/figures}
mkdir -p "$out/logs"
: > "$out/SKIPPED"
failed=0

# placeholder FIGURE REASON: an SVG that says why the figure is missing.
placeholder() {
    cat > "$out/$1" <<SVG
<svg xmlns="http://www.w3.org/2000/svg" width="640" height="120" viewBox="0 0 640 120" font-family="DejaVu Sans, sans-serif" font-size="14">
<!-- imp-docs-placeholder -->
<rect x="1" y="1" width="638" height="118" fill="#fafafa" stroke="#bbb" stroke-dasharray="6 4"/>
<text x="20" y="50">Figure $1 was not generated:</text>
<text x="20" y="76" fill="#a00">$2</text>
</svg>
SVG
}

# skip REASON FIGURE...: a placeholder for each figure, and the list.
skip() {
    local reason=$1
    shift
    for fig in "$@"; do
        placeholder "$fig" "$reason"
        echo "$fig: $reason" >> "$out/SKIPPED"
    done
    echo "make-figures: skipped $*: $reason" >&2
}

# draw NAME PROGRAM ARGS... -- FIGURE...: run PROGRAM (a path in the build)
# to draw the FIGUREs; @OUT@ in ARGS stands for the output directory.
draw() {
    local name=$1 program=$2
    shift 2
    local args=() figs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        args+=("${1//@OUT@/$out}")
        shift
    done
    shift
    figs=("$@")
    if [ ! -x "$build/$program" ]; then
        skip "$program is not built" "${figs[@]}"
        return 0
    fi
    local start=$SECONDS
    if timeout 600 "$build/$program" "${args[@]}" \
        > "$out/logs/$name.log" 2>&1; then
        local missing=()
        for fig in "${figs[@]}"; do
            [ -s "$out/$fig" ] || missing+=("$fig")
        done
        if [ ${#missing[@]} -eq 0 ]; then
            echo "make-figures: $name: ${figs[*]} ($((SECONDS - start)) s)" >&2
            return 0
        fi
        echo "make-figures: $name ran but did not write ${missing[*]}" >&2
    else
        echo "make-figures: $name failed (exit $?); see" \
             "$out/logs/$name.log:" >&2
        tail -n 5 "$out/logs/$name.log" >&2
    fi
    return 1
}

# The circle with its tangents from the implicit function theorem.
draw root examples/imp-root-demo @OUT@/root-circle.svg \
    -- root-circle.svg || failed=1

# DEQ convergence: the three fixed-point solvers on a trained model.
draw deq examples/imp-deq-demo @OUT@/deq-convergence.svg \
    -- deq-convergence.svg || failed=1

# ODE trajectories: a neural ODE fitted to a spiral (400 training steps
# rather than the demo's default 2000, to keep the docs build short).
draw ode examples/imp-ode-demo --iters 400 @OUT@/ode-spiral.svg \
    -- ode-spiral.svg || failed=1

# A QP layer: the projection onto a segment and its derivative.
draw qp examples/docs/docs-qp-figure @OUT@/qp-segment.svg \
    -- qp-segment.svg || failed=1

# Test-time compute: distance to the fixed point against the budget.
draw test-time examples/docs/docs-test-time @OUT@/test-time.svg \
    -- test-time.svg || failed=1

# Solved mazes, and accuracy against test-time iterations per maze size,
# from the shipped model (trained on 9x9 mazes).
maze_figs=(maze_9.svg maze_13.svg maze_33.svg maze_accuracy.svg)
if [ ! -x "$build/examples/maze/imp-maze" ]; then
    skip "examples/maze/imp-maze is not built" "${maze_figs[@]}"
elif ! draw maze examples/maze/imp-maze eval --sizes 9,13,33 --count 20 \
        --svg @OUT@ -- "${maze_figs[@]}"; then
    skip "imp-maze eval failed (no trained model?); see logs/maze.log" \
        "${maze_figs[@]}"
fi

# The QP demo prints its results (Sudoku accuracy) but draws no figure.
echo "make-figures: note: examples/imp-opt-demo draws no figure;" \
     "the QP page's figure comes from examples/docs/qp_figure.c" >&2

if [ -s "$out/SKIPPED" ]; then
    echo "make-figures: figures not generated:" >&2
    sed 's/^/  /' "$out/SKIPPED" >&2
fi
exit $failed
