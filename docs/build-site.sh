#!/usr/bin/env bash
# Build the documentation site: the figures, then Doxygen.
#
#   docs/build-site.sh SRC BUILD OUT DOXYFILE DOXYGEN
#
# SRC is the source tree, BUILD the meson build directory whose programs
# draw the figures, OUT the directory that receives figures/ and html/,
# DOXYFILE the configured docs/Doxyfile.  Doxygen runs with every warning
# an error (WARN_AS_ERROR = FAIL_ON_WARNINGS): any warning fails the build,
# after all of them have been printed.
set -euo pipefail

if [ $# -ne 5 ]; then
    echo "usage: $0 SRC BUILD OUT DOXYFILE DOXYGEN" >&2
    exit 2
fi
src=$1 build=$2 out=$3 doxyfile=$4 doxygen=$5
mkdir -p "$out"

bash "$src/docs/make-figures.sh" "$build" "$out/figures"

# The maze page is written with the maze demo; until it is in the tree a
# stand-in with the same page name keeps the links to it whole.
if [ -f "$src/docs/maze.md" ]; then
    maze="$src/docs/maze.md"
else
    mkdir -p "$out/pending"
    maze="$out/pending/maze.md"
    cat > "$maze" <<'MD'
# Solving mazes with a DEQ {#md_docs_maze}

This page is not written yet: it will be docs/maze.md, which comes with
the maze demo (examples/maze/).  Until then, see
[Learning iterative algorithms](@ref test_time) for what the demo
measures, and the figures there.
MD
fi

export IMP_DOCS_OUT="$out" IMP_DOCS_FIGURES="$out/figures" IMP_DOCS_MAZE="$maze"
rm -rf "$out/html"
if ! "$doxygen" "$doxyfile" > "$out/doxygen.log" 2>&1; then
    cat "$out/doxygen.log" >&2
    echo "build-site: Doxygen failed (every warning is an error)" >&2
    exit 1
fi
if [ -s "$out/doxygen.log" ]; then # QUIET: anything printed is a warning
    cat "$out/doxygen.log" >&2
    echo "build-site: Doxygen printed warnings" >&2
    exit 1
fi
touch "$out/html"
echo "build-site: $out/html/index.html" >&2
