#!/usr/bin/env python3
"""Benchmark of `import-booked` of a large report while postbacks come in.

    python bench/import_load.py                       # 1,984,000 rows, this checkout
    python bench/import_load.py --rev main~1          # the same with an older revision
    python bench/import_load.py --days 4 --load-seconds 30   # a quick look

Writes a booked report of DAYS days x PROPERTIES properties x COUNTRIES
countries (by default 31 x 256 x 250 = 1,984,000 rows, about 66 MB: the size
of a month's report that once held the write lock for 70 s), starts
spp_server.py on a fresh database, drives it with wrk and bench/postback.lua
(as bench.py does) for --load-seconds, and runs `import-booked` of the report
while the load runs.  The import runs with every write transaction timed,
from the moment it holds the write lock (BEGIN IMMEDIATE returned) to COMMIT
returning: the longest of them is the longest a postback could wait behind
the import.  Prints one JSON object: the import's duration and output, its
transactions and the longest and total time it held the write lock, and
wrk's answers (non-2xx must be 0: a 503 is a postback refused) and p99.

With --rev, spp_server.py and schema.sql of that git revision are taken with
`git show` and both the server and the import run from them: the before and
after of a change, measured the same way.  Needs wrk.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402

QUIET_S = 3

# import-booked with each write transaction timed (commit_batch takes the
# receive time with now_us() right after BEGIN IMMEDIATE returned); the times
# go as one JSON list at exit to the descriptor named by the first argument.
TIMED_IMPORT = """
import json, os, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[2]))
import spp_server
held, locked = [], []
real_now, real_commit = spp_server.now_us, spp_server.commit_batch
def now_us():
    locked.append(time.monotonic())
    return real_now()
def commit_batch(conn, ops):
    locked.clear()
    result = real_commit(conn, ops)
    if locked:
        held.append(time.monotonic() - locked[0])
    return result
spp_server.now_us, spp_server.commit_batch = now_us, commit_batch
status = spp_server.main(["import-booked", *sys.argv[3:]])
os.write(int(sys.argv[1]), json.dumps(held).encode())
sys.exit(status)
"""


def write_report(path, days, properties, countries):
    """A CSV report: every day x property x country, each with a revenue."""
    codes = [f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(countries)]
    rows = 0
    with open(path, "w") as out:
        out.write("date,property-id,country,revenue\n")
        for day in range(days):
            date = f"2026-{10 + day // 31:02}-{day % 31 + 1:02}"
            for prop in range(properties):
                out.writelines(f"{date},p{prop},{code},0.{(day * prop + i) % 997:06}\n"
                               for i, code in enumerate(codes))
                rows += countries
    return rows


def checkout(rev, into):
    for name in ("spp_server.py", "schema.sql"):
        text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=bench.ROOT, check=True,
                              capture_output=True).stdout
        (into / name).write_bytes(text)
    return into / "spp_server.py"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--days", type=int, default=31)
    p.add_argument("--properties", type=int, default=256)
    p.add_argument("--countries", type=int, default=250)
    p.add_argument("--load-seconds", type=int, default=150,
                   help="wrk's load; must outlast the quiet window and the import")
    p.add_argument("--rev", help="run the server and the import of this git revision")
    args = p.parse_args(argv)
    wrk_args = bench.parse_args(["--duration", str(args.load_seconds)])
    with tempfile.TemporaryDirectory(prefix="spp-import-bench-") as tmp:
        tmp = Path(tmp)
        server_py = checkout(args.rev, tmp) if args.rev else bench.SERVER
        report, db = tmp / "booked.csv", tmp / "spp.db"
        result = {"revision": args.rev or "this checkout",
                  "rows": write_report(report, args.days, args.properties, args.countries),
                  "report_mb": round(report.stat().st_size / 1e6, 1)}
        server = bench.Server("import bench", [sys.executable, str(server_py), "--db", str(db),
                                               "--host", bench.HOST], tmp / "server.log")
        try:
            server.wait_ready()
            wrk = {}
            load = threading.Thread(target=lambda: wrk.update(bench.run_wrk(server.port, wrk_args)))
            load.start()
            time.sleep(QUIET_S)
            read_end, write_end = os.pipe()
            started = time.monotonic()
            done = subprocess.Popen([sys.executable, "-c", TIMED_IMPORT, str(write_end),
                                     str(server_py), str(report), "--db", str(db)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    pass_fds=(write_end,))
            os.close(write_end)
            said = done.communicate(timeout=900)[0]
            ended = time.monotonic()
            with os.fdopen(read_end) as times:
                held = json.loads(times.read() or "[]")
            result["import_seconds"] = round(ended - started, 1)
            result["import_exit"] = done.returncode
            result["import_said"] = said.strip().rsplit(": ", 1)[-1]
            result["import_transactions"] = len(held)
            result["longest_lock_ms"] = round(max(held, default=0) * 1000, 1)
            result["locked_seconds"] = round(sum(held), 1)
            result["load_left_seconds"] = round(args.load_seconds - (ended - started) - QUIET_S, 1)
            load.join()
            result["wrk_requests"] = wrk.get("requests")
            result["wrk_non2xx"] = wrk.get("resp_non2xx")
            result["wrk_p99_ms"] = wrk["latency_us"]["p99"] / 1000 if wrk else None
        finally:
            server.stop()
            bench.stop_all()
    print(json.dumps(result, indent=1))
    if result["load_left_seconds"] < 0:
        print("warning: the load ended before the import did; raise --load-seconds",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
