#!/usr/bin/env bash
# imp's quick start: installs what is missing, builds, then runs the main
# demo ("demo") or the whole test suite ("test"), on Debian 12 as root.
#
#   scripts/quickstart.sh demo   build and run the main demo
#   scripts/quickstart.sh test   build and run every suite, plain and under
#                                AddressSanitizer + UBSan
set -euo pipefail

mode=${1:-demo}
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

packages=(gcc pkg-config meson ninja-build cmake libgsl-dev libsundials-dev
          libopenblas-dev check clang-format doxygen chromium valgrind)

install_missing() {
    local missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
            grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "quickstart: installing ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
        --no-install-recommends "${missing[@]}" >&2
}

build() {  # build DIR [meson options...]
    local dir=$1
    shift
    if [ ! -f "$dir/build.ninja" ]; then
        meson setup "$dir" -Dwerror=true "$@" >&2
    fi
    meson compile -C "$dir" >&2
}

# Run one build's suites; print its counts on stdout as "ok fail".
run_suites() {  # run_suites DIR LABEL
    local dir=$1 label=$2 rc=0
    echo "quickstart: test suites ($label)" >&2
    meson test -C "$dir" --print-errorlogs --num-processes 2 \
        --no-suite valgrind >&2 || rc=$?
    python3 - "$dir/meson-logs/testlog.json" "$label" <<'PY'
import json, sys
ok = fail = 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["result"] in ("OK", "EXPECTEDFAIL", "SKIP"):
        ok += 1
    else:
        fail += 1
        print(f"quickstart: {sys.argv[2]}: {r['name']} {r['result']}",
              file=sys.stderr)
print(ok, fail)
PY
    return 0
}

install_missing

case "$mode" in
demo)
    build build
    exec build/examples/imp-tour
    ;;
test)
    build build
    read -r ok1 fail1 < <(run_suites build plain)
    build build-asan -Db_sanitize=address,undefined -Db_lundef=false
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    read -r ok2 fail2 < <(run_suites build-asan sanitizers)
    passed=$((ok1 + ok2))
    failed=$((fail1 + fail2))
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    ;;
*)
    echo "usage: $0 demo|test" >&2
    exit 2
    ;;
esac
