#!/usr/bin/env python3
"""Summarize a py-spy profile in raw (collapsed stack) format as text.

    py-spy record --pid PID -d 10 -r 200 --format raw -o /tmp/profile.txt [--threads] [--gil]
    python bench/profile_summary.py /tmp/profile.txt [--top 25]

Prints the share of samples per thread role (waitress worker, waitress I/O
loop), per category of work inside spp_server (JSON, validation,
logging, Bottle, waiting for the write lock, the INSERT and its commit...), and the top
functions by self and by inclusive share.
"""

import argparse
import collections
import re
import sys

# Categories, tried in order; each is (name, where, pattern): "any" matches
# a frame anywhere in the stack, "leaf" only the innermost frame.  A frame is
# "function (file.py:line)"; the lock line of Writer.run gets " #LOCK".
CATEGORIES = [
    ("write: waiting for the write lock", "any", r"^Writer\.run .*#LOCK"),
    ("write: INSERT + commit (WAL write, fsync)", "any", r"^(record_session\.<locals>\.)?op \(spp_server"),
    ("write: other (lock, errors)", "any", r"^Writer\.run "),
    ("worker: logging", "any", r"\(logging/"),
    ("worker: JSON parse + validation", "any", r"^(parse_postback|parse_json_object|check_\w+|usd_to_nanos) "),
    ("worker: json.dumps (response)", "any", r"\(json/"),
    ("worker: counters / stats", "any", r"^PostbackCounters\."),
    ("worker: other spp_server code", "leaf", r"\(spp_server\.py"),
    ("worker: bottle", "leaf", r"\(bottle\.py"),
    ("socket send() (worker flushing its answer, or I/O loop)", "leaf", r"^dispatcher\.send "),
    ("worker: waitress task (environ, headers, write)", "any", r"^handler_thread |^ThreadedTaskDispatcher\.handler_thread "),
    ("I/O loop: poll() wait", "leaf", r"^poll2 .*#POLL"),
    ("I/O loop: recv() + HTTP parsing", "any", r"^(dispatcher\.recv|HTTPChannel\.received|HTTPRequestParser\.|file_wrapper\.recv)"),
    ("I/O loop: other (readable/writable scans, trigger)", "any", r"^run_until |^loop \(waitress"),
]
ROLES = [
    ("waitress worker threads", "handler_thread "),
    ("main thread: waitress I/O loop", "run_until "),
]


def parse(path):
    stacks = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            if frames and frames[0].startswith("process "):
                frames = frames[1:]
            stacks[tuple(frames)] += int(count)
    return stacks


def strip_line(frame):
    """'f (file.py:12)' -> 'f (file.py)'."""
    return re.sub(r":\d+\)$", ")", frame)


def mark(frame, sources):
    src = sources.get(frame, "")
    if frame.startswith("Writer.run ") and "self._lock.acquire(" in src:
        return frame + " #LOCK"
    if frame.startswith("poll2 ") and "poll(" in src:
        return frame + " #POLL"
    return frame


def category(frames, sources):
    marked = [mark(f, sources) for f in frames]
    for name, where, pattern in CATEGORIES:
        candidates = marked if where == "any" else marked[-1:]
        if any(re.search(pattern, f) for f in candidates):
            return name
    return "other"


def source_lines(stacks):
    """frame -> its source line, for frames of files we can read."""
    cache, out = {}, {}
    for frames in stacks:
        for frame in frames:
            m = re.search(r"\((.+\.py):(\d+)\)$", frame)
            if not m or frame in out:
                continue
            name, lineno = m.group(1), int(m.group(2))
            if name not in cache:
                try:
                    import pathlib
                    roots = [pathlib.Path(), pathlib.Path(__file__).resolve().parent.parent, *map(pathlib.Path, sys.path)]
                    candidates = [r / name for r in roots if (r / name).is_file()]
                    cache[name] = candidates[0].read_text().splitlines() if candidates else []
                except OSError:
                    cache[name] = []
            lines = cache[name]
            out[frame] = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    stacks = parse(args.profile)
    total = sum(stacks.values())
    if not total:
        sys.exit("no samples")
    sources = source_lines(stacks)
    pct = lambda n: f"{100 * n / total:5.1f}%"  # noqa: E731

    print(f"{total} samples\n\nby thread role:")
    roles = collections.Counter()
    for frames, n in stacks.items():
        text = ";".join(frames)
        roles[next((r for r, marker in ROLES if marker in text), "other")] += n
    for role, n in roles.most_common():
        print(f"  {pct(n)}  {role}")

    print("\nby category:")
    cats = collections.Counter()
    for frames, n in stacks.items():
        cats[category(frames, sources)] += n
    for name, n in cats.most_common():
        print(f"  {pct(n)}  {name}")

    selfs, incl, lines = collections.Counter(), collections.Counter(), collections.Counter()
    for frames, n in stacks.items():
        if not frames:
            continue
        selfs[strip_line(frames[-1])] += n
        lines[frames[-1]] += n
        for f in {strip_line(f) for f in frames}:
            incl[f] += n
    print(f"\ntop {args.top} functions by self share:")
    for f, n in selfs.most_common(args.top):
        print(f"  {pct(n)}  {f}")
    print(f"\ntop {args.top} leaf lines:")
    for f, n in lines.most_common(args.top):
        src = sources.get(f, "").strip()
        print(f"  {pct(n)}  {f}  {src[:70]}")
    print(f"\ntop {args.top} functions by inclusive share:")
    for f, n in incl.most_common(args.top):
        print(f"  {pct(n)}  {f}")


if __name__ == "__main__":
    main()
