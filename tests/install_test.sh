#!/usr/bin/env bash
# Install imp into a scratch prefix and build a tiny program against the
# installed imp.pc, as a user would.
set -euo pipefail
src=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

meson setup "$tmp/build" "$src" --prefix="$tmp/prefix" -Dtests=false \
    -Dbuildtype=release >/dev/null
meson install -C "$tmp/build" >/dev/null
pc=$(find "$tmp/prefix" -name imp.pc | head -n 1)
[ -n "$pc" ] || { echo "imp.pc was not installed"; exit 1; }
export PKG_CONFIG_PATH=$(dirname "$pc")
libdir=$(pkg-config --variable=libdir imp)

cc -std=c11 -Wall -Wextra -Werror -o "$tmp/tiny" "$src/tests/install_tiny.c" \
    $(pkg-config --cflags --libs imp) -Wl,-rpath,"$libdir"
out=$("$tmp/tiny")
echo "$out"
[ "$out" = "tiny: xbar = 0.5, singular: singular" ]
