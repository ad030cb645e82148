#!/usr/bin/env bash
# The C sources are formatted with the checked-in .clang-format.
set -euo pipefail
cd "$1"
command -v clang-format >/dev/null || { echo "no clang-format"; exit 77; }
if git rev-parse --git-dir >/dev/null 2>&1; then
    files=$(git ls-files --cached --others --exclude-standard '*.c' '*.h')
else
    files=$(find include src tests examples bench -name '*.[ch]')
fi
[ -n "$files" ] || { echo "no C sources found"; exit 1; }
clang-format --dry-run --Werror $files
echo "formatted: $(echo "$files" | wc -w) files"
