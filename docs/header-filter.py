#!/usr/bin/env python3
"""Doxygen input filter for imp's public headers.

Each header opens with a plain block comment that states the maths of its
module.  Doxygen would skip it (it is not a doc comment), so this filter
turns it into the file's documentation: its first paragraph becomes the
brief description and the rest is shown verbatim, as written, since its
formulas are laid out in columns.  Everything else passes through as it
is, and the line count is kept, so that warnings point at the right line.

Usage (from Doxygen's FILTER_PATTERNS): header-filter.py HEADER
"""
import re
import sys


def strip_leader(line):
    """' * text' -> 'text', ' *' -> ''."""
    return re.sub(r"^\s*\*( |$)", "", line, count=1)


def convert(text):
    match = re.match(r"/\*(?!\*)(.*?)\*/", text, re.S)
    if match is None:
        return text
    body = match.group(1).split("\n")
    if len(body) < 3 or body[0].strip():
        return text

    # The first paragraph: "imp/x.h - what the module is." lines.
    end = 1
    while end < len(body) and strip_leader(body[end]).strip():
        end += 1
    brief = [strip_leader(line) for line in body[1:end]]
    brief[0] = re.sub(r"^\S+\.h\s+-\s+", "", brief[0])
    brief[0] = brief[0][:1].upper() + brief[0][1:]
    rest = [strip_leader(line) for line in body[end:]]
    while rest and not rest[-1].strip():
        rest.pop()
    # Keep the same number of lines: the opening, the brief lines, a line
    # that opens the verbatim block in place of the blank one, the body,
    # then the padding the stripped trailing lines leave.
    out = ["/** \\file", "\\brief " + brief[0]] + brief[1:]
    if rest:
        out += ["\\verbatim"] + rest[1:] + ["\\endverbatim"]
    lines_before = match.group(0).count("\n")
    while len(out) - 1 < lines_before:
        out.append("")
    doc = "\n".join(out[: lines_before + 1]) + " */"
    return doc + text[match.end():]


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("usage: header-filter.py HEADER\n")
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        sys.stdout.write(convert(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
