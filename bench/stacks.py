"""Summarise py-spy's collapsed stacks (`--format raw`): where a process's CPU goes.

    python -m bench.stacks FILE [--top 25] [--match SUBSTRING]

Prints the functions with the most samples on the stack (inclusive) and at
the top of it (self), as shares of all samples. With --match, only the
stacks that pass through a frame containing SUBSTRING count.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter

# py-spy frames look like "function (path/to/file.py:123)"; the line number would split one function in many.
_LINE = re.compile(r":\d+\)$")


def frames(stack: str) -> list[str]:
    return [_LINE.sub(")", frame) for frame in stack.split(";")]


def summarise(lines, match: str | None = None) -> tuple[int, Counter, Counter]:
    total, inclusive, own = 0, Counter(), Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        chain = frames(stack)[1:]  # the first frame names the process / thread
        if match and not any(match in frame for frame in chain):
            continue
        n = int(count)
        total += n
        for frame in set(chain):
            inclusive[frame] += n
        if chain:
            own[chain[-1]] += n
    return total, inclusive, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match")
    args = parser.parse_args()
    with open(args.file) as f:
        total, inclusive, own = summarise(f, args.match)
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title}")
        for frame, n in counter.most_common(args.top):
            print(f"{100 * n / max(total, 1):5.1f} %  {frame}")


if __name__ == "__main__":
    main()
