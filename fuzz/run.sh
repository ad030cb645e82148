#!/usr/bin/env bash
# fuzz/run.sh - build the fuzz targets with clang's libFuzzer, AddressSanitizer
# and UBSan, and run each for a fixed time.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     (default: 60 s; checkpoint maze)
#
# The library's sources and the maze reader are compiled straight from the
# tree with coverage instrumentation (objects kept in $IMP_FUZZ_WORK, default
# build-libfuzzer/, and rebuilt when a source is newer).  Each target starts
# from the checked-in seeds fuzz/corpus/<t> and the kept crashes
# fuzz/regressions/<t>; what it discovers goes to a working corpus in
# $IMP_FUZZ_WORK/corpus/<t>, so the checked-in corpus stays small.  Any
# crash-*, leak-*, timeout-* or oom-* input is copied to fuzz/regressions/<t>/,
# where meson's fuzz_<t> test replays it from then on.  The last line of each
# run (#runs, cov:, ft:, exec/s) is printed in a summary.  Exits 1 if a target
# failed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(checkpoint maze)
work=${IMP_FUZZ_WORK:-$root/build-libfuzzer}
cc=${CC:-clang}
[[ $secs =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2; }

sanitize=-fsanitize=address,undefined
cflags=(-std=c11 -D_POSIX_C_SOURCE=200809L -g -O1 -fno-omit-frame-pointer
        $sanitize -fno-sanitize-recover=undefined
        -I"$root/include" -I"$root/src" -I"$root/examples/maze" -I"$root/fuzz")
libs=(-lgsl -lopenblas -lsundials_cvodes -lsundials_nvecserial
      -lsundials_sunlinsoldense -lsundials_sunlinsolspgmr
      -lsundials_sunmatrixdense -lsundials_sunlinsolband
      -lsundials_sunmatrixband -lm)

# Compile one source to an object under $work/obj (named after its path,
# since src/core/layer.c and src/root/layer.c share a name) when stale.
compile() {
    local src=$1 obj
    obj=$work/obj/$(echo "${src#"$root"/}" | tr / _).o
    if [ ! -e "$obj" ] || [ "$src" -nt "$obj" ]; then
        "$cc" "${cflags[@]}" -fsanitize=fuzzer-no-link -c "$src" -o "$obj"
    fi
    echo "$obj"
}

mkdir -p "$work/obj"
lib_objs=()
for src in $(find "$root/src" -name '*.c' | sort) \
           "$root/examples/maze/maze.c" "$root/fuzz/check.c" \
           "$root/fuzz/fixture.c"; do
    lib_objs+=("$(compile "$src")")
done

# Link every target before running any, so that a build error stops early.
for t in "${targets[@]}"; do
    [ -f "$root/fuzz/fuzz_$t.c" ] || { echo "no target fuzz_$t.c" >&2; exit 2; }
    "$cc" "${cflags[@]}" -fsanitize=fuzzer "$root/fuzz/fuzz_$t.c" \
        "${lib_objs[@]}" "${libs[@]}" -o "$work/fuzz_$t"
done

failed=0
summary=()
for t in "${targets[@]}"; do
    corpus=$work/corpus/$t
    artifacts=$work/artifacts/$t
    log=$work/$t.log
    # Artifacts of earlier runs are already kept; start this run's afresh.
    rm -rf "$artifacts"
    mkdir -p "$corpus" "$artifacts" "$root/fuzz/regressions/$t"
    dict=()
    [ -f "$root/fuzz/$t.dict" ] && dict=(-dict="$root/fuzz/$t.dict")

    echo "== fuzz_$t for $secs s (log $log)"
    rc=0
    "$work/fuzz_$t" "${dict[@]}" -max_total_time="$secs" -max_len=8192 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" \
        "$corpus" "$root/fuzz/corpus/$t" "$root/fuzz/regressions/$t" \
        >"$log" 2>&1 || rc=$?

    # Keep every failing input as a regression test.
    kept=0
    for a in "$artifacts"/crash-* "$artifacts"/leak-* "$artifacts"/timeout-* \
             "$artifacts"/oom-*; do
        [ -e "$a" ] || continue
        cp "$a" "$root/fuzz/regressions/$t/"
        kept=$((kept + 1))
    done
    [ $rc -eq 0 ] && [ $kept -eq 0 ] || failed=1

    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    summary+=("fuzz_$t: exit $rc, $kept failing inputs kept; $last")
    if [ $rc -ne 0 ]; then
        grep -E 'ERROR|SUMMARY|fuzz check failed' "$log" | head -n 5 || true
    fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit $failed
