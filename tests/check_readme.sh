#!/usr/bin/env bash
# The README's first program is examples/first.c, verbatim, and it runs.
set -euo pipefail
src=$1 exe=$2
diff <(sed -n '/^```c$/,/^```$/p' "$src/README.md" | sed '1d;$d') \
     "$src/examples/first.c"
"$exe" | tee /dev/stderr | grep -q "cbrt(8) = 2, cbrt(27) = 3"
