#!/usr/bin/env bash
# The documentation test: build the site, check its links and figures,
# and render its index page in headless Chromium.
#
#   tests/check_docs.sh SRC BUILD OUT DOXYFILE DOXYGEN PYTHON
#
# 1. docs/build-site.sh draws the figures and runs Doxygen into OUT/html;
#    any Doxygen warning fails the test.
# 2. tests/check_docs.py checks every internal link, anchor and figure,
#    and the taxonomy's reading order on the index page.
# 3. Chromium (Debian's chromium package) loads the index page: any
#    message on the page's console (an uncaught exception, a script
#    error) fails the test, and so does a DOM without the page's content.
#    A screenshot of the index and of one layer page are left in
#    OUT/screenshots.  Without chromium, this step is skipped and the test
#    reports a skip (77) once the other checks have passed.
set -euo pipefail

if [ $# -ne 6 ]; then
    echo "usage: $0 SRC BUILD OUT DOXYFILE DOXYGEN PYTHON" >&2
    exit 2
fi
src=$1 build=$2 out=$3 doxyfile=$4 doxygen=$5 python=$6

echo "== 1. build the site"
bash "$src/docs/build-site.sh" "$src" "$build" "$out" "$doxyfile" "$doxygen"

echo "== 2. links, figures, reading order"
"$python" "$src/tests/check_docs.py" "$out/html" \
    --order explicit,ift,autograd,root_layers,ode_layers,qp_layers,deq_layers,test_time \
    --figure root-circle.svg --figure deq-convergence.svg \
    --figure ode-spiral.svg --figure qp-segment.svg --figure test-time.svg \
    --optional-figure maze_33.svg \
    --optional-figure maze_accuracy.svg

echo "== 3. render in headless Chromium"
chromium=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chromium" ]; then
    echo "no chromium: the render check is skipped (apt-get install chromium)"
    exit 77
fi
mkdir -p "$out/screenshots"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update
       --disable-sync --user-data-dir="$profile" --enable-logging=stderr
       --v=0 --window-size=1280,1400 --virtual-time-budget=5000)

render() { # render PAGE NAME: DOM to OUT/NAME.dom, console to NAME.log
    timeout 120 "$chromium" "${flags[@]}" --dump-dom "file://$1" \
        > "$out/screenshots/$2.dom" 2> "$out/screenshots/$2.log"
    timeout 120 "$chromium" "${flags[@]}" \
        --screenshot="$out/screenshots/$2.png" "file://$1" \
        > /dev/null 2>> "$out/screenshots/$2.log"
}

failed=0
for page in index root_layers; do
    render "$out/html/$page.html" "$page"
    if grep -E "CONSOLE|Uncaught" "$out/screenshots/$page.log"; then
        echo "FAIL: $page.html writes to the console (above)"
        failed=1
    fi
    if [ ! -s "$out/screenshots/$page.png" ]; then
        echo "FAIL: no screenshot of $page.html"
        failed=1
    fi
done
# The index's DOM after its scripts ran: the page's own text, and the
# navigation tree that navtree.js fills in.
for want in "Explicit and implicit functions" "Root-finding layers" \
            'id="nav-tree-contents"'; do
    if ! grep -q "$want" "$out/screenshots/index.dom"; then
        echo "FAIL: the rendered index has no '$want'"
        failed=1
    fi
done
if [ $failed -eq 0 ]; then
    echo "rendered without console messages; screenshots in" \
         "$out/screenshots"
fi
exit $failed
