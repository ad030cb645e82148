#!/usr/bin/env python3
"""Check a built documentation site: links, figures, page order, samples.

    check_docs.py HTML_DIR [--order PAGE,...] [--figure NAME ...]
                           [--optional-figure NAME ...]

Every href and src in every HTML file, and every page named in the
navigation scripts, must resolve to a file of the site, and a #fragment
to an id or name in its target page.  External links (http:, https:,
mailto:) are not followed: the site must not need the network, so no
script, stylesheet or image may be external either.  Each --figure must
be in the site, be well-formed SVG, be shown by some page, and be a real
drawing rather than the placeholder that docs/make-figures.sh leaves for
a program that is not built; an --optional-figure may be a placeholder
(it is reported).  --order gives the pages that the index must link, in
that order, and each of them must show at least one code sample.
Prints what it checked; exits 1 on any failure.
"""
import argparse
import html.parser
import os
import re
import sys
import urllib.parse
import xml.etree.ElementTree as ET

LINK_ATTRS = {("a", "href"), ("link", "href"), ("img", "src"),
              ("script", "src"), ("iframe", "src"), ("object", "data"),
              ("embed", "src"), ("source", "src")}
PLACEHOLDER = "imp-docs-placeholder"


class Page(html.parser.HTMLParser):
    """The links, anchors, images and code fragments of one HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links = []  # (tag, attribute, value, line)
        self.anchors = set()
        self.fragments = 0
        self.in_contents = 0
        self.content_links = []  # hrefs inside div.contents, in order

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("id", "name"):
            if attrs.get(name):
                self.anchors.add(attrs[name])
        for (t, a) in LINK_ATTRS:
            if tag == t and attrs.get(a):
                self.links.append((tag, a, attrs[a], self.getpos()[0]))
        classes = (attrs.get("class") or "").split()
        if tag == "div":
            if self.in_contents:
                self.in_contents += 1
            elif "contents" in classes:
                self.in_contents = 1
            if "fragment" in classes:
                self.fragments += 1
        if tag == "a" and self.in_contents and attrs.get("href"):
            self.content_links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "div" and self.in_contents:
            self.in_contents -= 1


def parse(path):
    page = Page()
    with open(path, encoding="utf-8", errors="replace") as f:
        page.feed(f.read())
    return page


def is_external(url):
    scheme = urllib.parse.urlsplit(url).scheme
    return scheme in ("http", "https", "mailto", "ftp")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("html_dir")
    ap.add_argument("--order", default="")
    ap.add_argument("--figure", action="append", default=[])
    ap.add_argument("--optional-figure", action="append", default=[])
    args = ap.parse_args()
    root = os.path.abspath(args.html_dir)
    errors = []

    pages = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".html"):
                path = os.path.join(dirpath, name)
                pages[path] = parse(path)
    if not pages:
        print(f"check_docs: no HTML pages under {root}")
        return 1

    # Links and anchors.
    nlinks = 0
    shown = set()  # files that some page embeds (img, object)
    for path, page in pages.items():
        rel = os.path.relpath(path, root)
        for tag, attr, url, line in page.links:
            if url.startswith(("javascript:", "data:")):
                continue
            if is_external(url):
                if tag in ("script", "img", "link", "iframe", "object"):
                    errors.append(f"{rel}:{line}: external {tag} {url}")
                continue
            nlinks += 1
            parts = urllib.parse.urlsplit(url)
            target = path if not parts.path else os.path.normpath(
                os.path.join(os.path.dirname(path),
                             urllib.parse.unquote(parts.path)))
            if not os.path.isfile(target):
                errors.append(f"{rel}:{line}: <{tag} {attr}=\"{url}\"> "
                              f"does not resolve")
                continue
            if tag in ("img", "object", "embed"):
                shown.add(os.path.relpath(target, root))
            if parts.fragment and target.endswith(".html"):
                anchors = pages[target].anchors if target in pages else set()
                if parts.fragment not in anchors:
                    errors.append(f"{rel}:{line}: #{parts.fragment} is not "
                                  f"an anchor of "
                                  f"{os.path.relpath(target, root)}")

    # The navigation tree and the menus name pages in scripts.
    nav = 0
    for name in sorted(os.listdir(root)):
        if re.match(r"(navtree\w*|menudata)\.js$", name):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                text = f.read()
            for url in re.findall(r'"([^"\s]+\.html)(?:#[^"]*)?"', text):
                nav += 1
                if not os.path.isfile(os.path.join(root, url)):
                    errors.append(f"{name}: {url} does not resolve")

    # Figures.
    for fig in args.figure + args.optional_figure:
        path = os.path.join(root, fig)
        if not os.path.isfile(path):
            errors.append(f"figure {fig} is not in the site")
            continue
        try:
            ET.parse(path)
        except ET.ParseError as e:
            errors.append(f"figure {fig} is not well-formed SVG: {e}")
            continue
        with open(path, encoding="utf-8") as f:
            placeholder = PLACEHOLDER in f.read()
        if fig not in shown:
            errors.append(f"figure {fig} is shown by no page")
        if placeholder and fig in args.figure:
            errors.append(f"figure {fig} is a placeholder: its program was "
                          f"not built or failed")
        elif placeholder:
            print(f"check_docs: note: figure {fig} is a placeholder "
                  f"(its program is not there yet)")

    # The reading order of the index, and a code sample on each page.
    order = [p for p in args.order.split(",") if p]
    if order:
        index = pages.get(os.path.join(root, "index.html"))
        linked = [urllib.parse.urlsplit(h).path
                  for h in (index.content_links if index else [])]
        pos = -1
        for p in order:
            want = p + ".html"
            later = [i for i, h in enumerate(linked) if h == want and i > pos]
            if not later:
                errors.append(f"index.html does not link {want} after the "
                              f"pages before it in the reading order")
                continue
            pos = later[0]
            page = pages.get(os.path.join(root, want))
            if page is not None and page.fragments == 0:
                errors.append(f"{want} shows no code sample")

    for e in errors:
        print(f"check_docs: {e}")
    print(f"check_docs: {len(pages)} pages, {nlinks} internal links and "
          f"sources, {nav} navigation entries, "
          f"{len(args.figure) + len(args.optional_figure)} figures, "
          f"{len(order)} pages in order: "
          f"{'OK' if not errors else f'{len(errors)} problems'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
