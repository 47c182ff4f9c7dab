#!/usr/bin/env python3
"""Benchmark of the payout ledger at 1,000,000 sessions, with ingest going on.

    python bench/ledger.py                  # 1,000,000 sessions over 30 days
    python bench/ledger.py --sessions 100000 --load-seconds 40

Fills a fresh database with bench/fill.py (SPAN_DAYS days of sessions over
100,000 users and 3 properties, ending at the start of the current UTC day),
imports a booked report for every filled day and property, starts
spp_server.py on it and drives it with wrk and bench/postback.lua (as
bench.py does) for --load-seconds.  While the load runs it measures, from
the sessions table (a read-only connection counting rows):

  - the ingest rate in a quiet window of QUIET_S seconds;
  - `spp_server.py pay --until <end of the filled days>` (one run over the
    whole month): its duration and the ingest rate during it;
  - `spp_server.py settle` (every filled day and property): the same;

then prints one JSON object: the durations, the rates, the run's and the
settlement's line counts, and wrk's non-2xx answers (which must be 0).

Measured on the development machine (2 cores shared with other work, so the
numbers are noisy): pay over the month 10-11 s, settle 21-26 s (16-19 s and
40-48 s before the ledger's speed-up, in the same session), ingest went on
throughout with no failed postback; see docs/ledger.md, "Measured".
"""

import argparse
import contextlib
import datetime
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
import fill  # noqa: E402

QUIET_S = 5


def sessions_now(db):
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT max(id) FROM sessions").fetchone()[0]


def timed_command(db, argv, out_path):
    """Run spp_server.py `argv` on `db` while ingest goes on: (seconds, rows/s
    ingested meanwhile, output lines)."""
    before_rows, started = sessions_now(db), time.monotonic()
    with open(out_path, "wb") as out:
        done = subprocess.run([sys.executable, str(bench.SERVER), *argv, "--db", str(db)],
                              stdout=out, stderr=subprocess.PIPE, timeout=900)
    seconds = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode()}")
    rate = (sessions_now(db) - before_rows) / seconds
    return seconds, rate, Path(out_path).read_bytes().count(b"\n") - 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1_000_000)
    p.add_argument("--load-seconds", type=int, default=120,
                   help="wrk's load; must outlast the quiet window, pay and settle")
    args = p.parse_args(argv)
    wrk_args = bench.parse_args(["--duration", str(args.load_seconds)])
    with tempfile.TemporaryDirectory(prefix="spp-ledger-bench-") as tmp:
        tmp = Path(tmp)
        db = tmp / "ledger.db"
        info = fill.fill(db, args.sessions)
        first_day = datetime.datetime.fromtimestamp(info["first_us"] / 1e6, datetime.timezone.utc).date()
        bench.book_report(db, first_day, tmp)
        until = datetime.datetime.fromtimestamp(info["end_us"] / 1e6, datetime.timezone.utc)
        server = bench.Server("project (ledger)", [sys.executable, str(bench.SERVER), "--db", str(db),
                                                   "--host", bench.HOST], tmp / "server.log")
        result = {"sessions": args.sessions, "fill_seconds": info["seconds"]}
        try:
            server.wait_ready()
            wrk = {}
            load = threading.Thread(target=lambda: wrk.update(bench.run_wrk(server.port, wrk_args)))
            load.start()
            time.sleep(2)  # wrk's connections are up
            start_rows, started = sessions_now(db), time.monotonic()
            time.sleep(QUIET_S)
            result["ingest_quiet_rows_per_s"] = (sessions_now(db) - start_rows) / (
                time.monotonic() - started)
            for name, command in (
                    ("pay", ["pay", "--until", until.strftime("%Y-%m-%dT%H:%M:%SZ"),
                             "--pay-now-share", "0.6", "--final-share", "0.9"]),
                    ("settle", ["settle"])):
                seconds, rate, lines = timed_command(db, command, tmp / f"{name}.csv")
                result[f"{name}_seconds"] = seconds
                result[f"ingest_during_{name}_rows_per_s"] = rate
                result[f"{name}_lines"] = lines
            result["load_left_seconds"] = args.load_seconds + 2 - (time.monotonic() - started)
            load.join()
            result["wrk_requests_per_s"] = wrk.get("rps")
            result["wrk_non2xx"] = wrk.get("resp_non2xx")
        finally:
            server.stop()
            bench.stop_all()
    print(json.dumps(result, indent=1))
    if result["load_left_seconds"] < 0:
        print("warning: the load ended before settle did; raise --load-seconds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
