#!/usr/bin/env python3
"""Before/after of each ingest optimisation, in one run: the ceiling and
spp_server.py as of several git revisions, alternating round by round.

    python bench/steps.py                          # the steps in STEPS below
    python bench/steps.py --rounds 8 "before=HEAD~3" "after=HEAD"

Each revision's spp_server.py and schema.sql are taken with `git show` into a
temporary directory; every round starts each server on a fresh database and
drives it like bench.py does (wrk, bench/postback.lua).  Prints one Markdown
table: median requests/s per step, the ratio to the ceiling's median, each
round's ratio, and in how many rounds the step beat the one before it (rounds
are paired because the ceiling itself moves from minute to minute on a
shared machine).  A second ceiling row runs bench/ceiling.py with a smaller
GIL switch interval, to show how much of a step that sets one comes from the
interpreter rather than from spp_server.  Needs wrk and a git checkout.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402

# The steps of the November ingest work, oldest first (see docs/performance.md, History).
STEPS = [
    ("writer thread, group commit", "e507c5e"),
    ("write connection behind a lock", "13fb904"),
    ("no log line per accepted postback (shipped)", "0ae70a9"),
    ("tried: one autocommit statement per write", "fee3a8d"),
    ("tried: + 0.5 ms GIL switch interval", "7995e34"),
]


def checkout(rev, into):
    into.mkdir()
    for name in ("spp_server.py", "schema.sql"):
        text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=bench.ROOT, check=True,
                              capture_output=True).stdout
        (into / name).write_bytes(text)
    return into / "spp_server.py"


def one_round(name, argv, args, log):
    server = bench.Server(name, argv, log)
    try:
        server.wait_ready()
        result = bench.run_wrk(server.port, args, server.pid)
    finally:
        server.stop()
    bad = result["resp_non2xx"] + result["errors"]["timeout"]
    print(f"… {name}: {result['rps']:,.0f} req/s, p99 {result['latency_us']['p99'] / 1000:.1f} ms,"
          f" non-2xx {bad}", file=sys.stderr, flush=True)
    return result["rps"], bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("steps", nargs="*", metavar="NAME=REV", help="default: the STEPS list")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=int, default=3, help="seconds of load per wrk run")
    p.add_argument("--threads", type=int, default=bench.spp_server.DEFAULTS["threads"],
                   help="request threads of each spp_server.py step")
    p.add_argument("--ceiling-threads", type=int, default=4,
                   help="threads of the ceiling (waitress's stock 4, as bench.py)")
    p.add_argument("--pin-cpu", type=int, metavar="N",
                   help="run every server on CPU N only (taskset), as on a 1-vCPU VPS; wrk stays unpinned")
    p.add_argument("--tuned-ceiling", type=float, metavar="S", default=0.0005,
                   help="also run the ceiling with sys.setswitchinterval(S); 0: don't")
    args = p.parse_args(argv)
    steps = [tuple(s.split("=", 1)) for s in args.steps] or STEPS
    args.connections, args.wrk_threads, args.duplicates = 16, 2, 0.05  # as bench.py
    started = time.monotonic()
    tuned = f"ceiling, switch interval {args.tuned_ceiling * 1000:g} ms"
    ceilings = [("ceiling", [])] + ([(tuned, ["--switch-interval", str(args.tuned_ceiling)])]
                                    if args.tuned_ceiling else [])
    rps = {name: [] for name in [*(n for n, _ in ceilings), *(n for n, _ in steps)]}
    failures = 0
    with tempfile.TemporaryDirectory(prefix="spp-steps-") as tmpdir:
        tmp = Path(tmpdir)
        servers = {name: checkout(rev, tmp / f"step{i}") for i, (name, rev) in enumerate(steps)}
        try:
            for n in range(args.rounds):
                print(f"… round {n + 1}/{args.rounds}", file=sys.stderr, flush=True)
                plan = [(name, [sys.executable, str(bench.CEILING), *extra,
                                "--threads", str(args.ceiling_threads)]) for name, extra in ceilings]
                plan += [(name, [sys.executable, str(path), "--db", str(tmp / f"{n}-{i}.db"),
                                 "--threads", str(args.threads)])
                         for i, (name, path) in enumerate(servers.items())]
                for name, command in plan:
                    command += ["--host", bench.HOST]
                    if args.pin_cpu is not None:  # taskset execs: the pid stays the server's
                        command[:0] = ["taskset", "-c", str(args.pin_cpu)]
                    got, bad = one_round(name, command, args, tmp / "server.log")
                    rps[name].append(got)
                    failures += bad
        finally:
            bench.stop_all()
    ceiling = rps["ceiling"]
    print(f"`{' '.join(['python bench/steps.py', *(argv or sys.argv[1:])])}`: {args.rounds} rounds, "
          f"each {args.duration} s of wrk -t2 -c16 per server, threads {args.threads} "
          f"(ceiling {args.ceiling_threads}), "
          f"{'pinned to CPU %d, ' % args.pin_cpu if args.pin_cpu is not None else ''}"
          f"{time.monotonic() - started:.0f} s; non-2xx answers: {failures}\n")
    print("| step | revision | req/s (median) | ratio to ceiling | per round | beats the step before |")
    print("|---|---|---|---|---|---|")
    print(f"| ceiling (bench/ceiling.py) | | {statistics.median(ceiling):,.0f} | 1.00 | | |")
    if args.tuned_ceiling:
        ratios = [x / c for x, c in zip(rps[tuned], ceiling)]
        print(f"| {tuned} | | {statistics.median(rps[tuned]):,.0f} "
              f"| {statistics.median(rps[tuned]) / statistics.median(ceiling):.2f} "
              f"| {' / '.join(f'{r:.2f}' for r in ratios)} | |")
    previous = None
    for name, rev in steps:
        ratios = [x / c for x, c in zip(rps[name], ceiling)]
        wins = "" if previous is None else f"{sum(a > b for a, b in zip(ratios, previous))} of {len(ratios)}"
        print(f"| {name} | {rev} | {statistics.median(rps[name]):,.0f} "
              f"| {statistics.median(rps[name]) / statistics.median(ceiling):.2f} "
              f"| {' / '.join(f'{r:.2f}' for r in ratios)} | {wins} |")
        previous = ratios


if __name__ == "__main__":
    main()
