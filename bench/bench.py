#!/usr/bin/env python3
"""Benchmark of spp-receiver: one command, one table.

    python bench/bench.py                      # ingest (vs the ceiling) and read side
    python bench/bench.py --only ingest --duration 5 --rounds 1
    python bench/bench.py --only read --read-sizes 100000
    python bench/bench.py --only ingest --pin-cpu 0      # both servers on one core
    python bench/bench.py --only during-export           # ingest while an export loops
    python bench/bench.py --only view                    # each web view page at 1,000,000

Ingest: starts spp_server.py on a fresh database in a temporary directory and
bench/ceiling.py (Bottle + waitress with waitress's stock 4 threads, parsing
the JSON and storing nothing), alternately, each on a free port of 127.0.0.1
with its own default threads, and drives each with wrk and bench/postback.lua
(unique session-ids plus a share of exact duplicates).  Reports requests/s,
p50/p99 latency, non-2xx answers, the peak VmRSS and the CPU of the server
and every process it started (the writer process), summed, and checks that
the database holds exactly one row per distinct session-id that was
acknowledged with a 200.

During export: on a 1,000,000-session database, the one-day export alone,
ingest alone, then ingest while the export loops on its own connection;
only exports that end within the load count.

Read: fills databases with bench/fill.py and times GET /users/<id>/earnings
for a user with 10 sessions and one with 10,000, the one-day payout export
GET /earnings?since=<day>&until=<next day>, and GET /reconciliation over the
30 filled days against a made-up booked report, with sequential keep-alive
requests.

Needs wrk (Debian: apt-get install wrk).  Talks only to 127.0.0.1, is bounded
in time (--max-seconds), and removes its processes and temporary files.
"""

import argparse
import contextlib
import ctypes
import datetime
import http.client
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER = ROOT / "spp_server.py"
CEILING = HERE / "ceiling.py"
LUA = HERE / "postback.lua"
FILL = HERE / "fill.py"
HOST = "127.0.0.1"
TAIL_S = 1  # wrk runs this much longer than the load so that every postback is answered

sys.path.insert(0, str(HERE))
import fill  # noqa: E402
import spp_server  # noqa: E402  (fill puts it on the path)

TARGETS = {
    "throughput_ratio": 0.70,  # project req/s >= 0.70 x ceiling
    "p99_factor": 2.0,  # project p99 <= 2 x ceiling p99
    "rss_mb": 64,
    "earnings_p50_ms": 2.0,  # one user's earnings, at the largest read size
    "growth": 1.5,  # p50 at the largest size <= 1.5 x p50 at the smallest (+0.1 ms)
    "reconciliation_p50_ms": 1000,  # 30 days of /reconciliation, at the largest read size
    "view_ms": 300,  # each web view page over a month of 1,000,000 sessions
}


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent():
    """In the child: get SIGKILL when bench.py dies, however it dies."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def clean_env():
    """Our environment without anything that would change how the server runs."""
    drop = ("CREDENTIALS_DIRECTORY", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
            "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in os.environ.items() if not k.startswith("SPP_") and k not in drop}


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """A server process on 127.0.0.1:<free port>, logging to a file."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=clean_env(), cwd=HERE, preexec_fn=_die_with_parent,
        )
        _children.add(self)

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines=15):
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout=30):
        """SIGTERM (the server drains and closes the database), SIGKILL if stuck;
        the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        _children.discard(self)
        return self.proc.returncode


_children = set()


def stop_all():
    for child in list(_children):
        with contextlib.suppress(Exception):
            child.stop(timeout=10)


def process_tree(pid):
    """pid and all its descendants (the server and the processes it started)."""
    pids, i = [pid], 0
    while i < len(pids):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as children:
                    pids += [int(p) for p in children.read().split()]
        i += 1
    return pids


class RssSampler:
    """Peak of the summed VmRSS (kB) of a process and its descendants,
    sampled every 20 ms in a thread.  (A sum of RSS counts the shared pages of
    libraries once per process: an upper bound on what they use together.)"""

    def __init__(self, pid):
        self._pid = pid
        self.peak_kb = self.read()
        self.processes = len(process_tree(pid))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self):
        total = 0
        for pid in process_tree(self._pid):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/status") as status:
                    for line in status:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
        return total

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, self.read())
            self.processes = max(self.processes, len(process_tree(self._pid)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.read())


# ---------------------------------------------------------------------------
# Ingest
# ---------------------------------------------------------------------------


def cpu_snapshot(pid):
    """CPU seconds so far: (all processes' user time, the server's total and
    user (pid and its descendants), our finished children's total and user,
    our own user)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    utime = stime = 0.0
    for one in process_tree(pid) if pid else ():
        with contextlib.suppress(OSError):
            with open(f"/proc/{one}/stat") as stat:
                text = stat.read()
            u, s = (int(x) / tick for x in text[text.rindex(")") + 2:].split()[11:13])
            utime, stime = utime + u, stime + s
    t = os.times()
    return ((fields[0] + fields[1]) / tick, utime + stime, utime,
            t.children_user + t.children_system, t.children_user, t.user)


def run_wrk(port, args, pid=None):
    cmd = [
        "wrk", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{args.duration + TAIL_S}s",
        "--timeout", "10s", "--latency", "-s", str(LUA), f"http://{HOST}:{port}/postback",
        "--", str(args.duration), str(args.duplicates), str(args.connections),
    ]
    before, started = cpu_snapshot(pid), time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + TAIL_S + 60,
                          preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)
    after, elapsed = cpu_snapshot(pid), time.monotonic() - started
    user_all, server, server_user, wrk, wrk_user, own_user = (b - a for a, b in zip(before, after))
    for line in done.stdout.splitlines():
        if line.startswith("SPP_BENCH "):
            result = json.loads(line[len("SPP_BENCH "):])
            result["rps"] = result["requests"] / args.duration
            # Cores busy on average (idle in the tail, so per second of load):
            # the server, wrk, and the user-space time of every other process
            # on the machine (not this script), which should be near zero.
            result["cpu"] = {
                "server": server / args.duration, "wrk": wrk / args.duration,
                "other": max(0.0, user_all - server_user - wrk_user - own_user) / elapsed,
            }
            return result
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def count_rows(db):
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("sessions", "conflicts", "rejected")}


def ingest_round(side, n, args, tmp):
    """One wrk run against a fresh server; its measurements."""
    if side == "ceiling":
        argv = [sys.executable, str(CEILING), "--host", HOST, "--threads", str(args.ceiling_threads)]
        db = None
    else:
        db = tmp / f"ingest-{n}.db"
        argv = [sys.executable, str(SERVER), "--db", str(db), "--host", HOST,
                "--threads", str(args.threads)]
    if args.pin_cpu is not None:
        # A 1-vCPU VPS: the server (and any process it starts) on one core,
        # wrk on the others.  taskset execs, so the pid stays the server's.
        argv = ["taskset", "-c", str(args.pin_cpu), *argv]
    server = Server(f"{side} (round {n})", argv, tmp / f"{side}-{n}.log")
    try:
        server.wait_ready()
        with RssSampler(server.pid) as rss:
            result = run_wrk(server.port, args, server.pid)
        result["rss_kb"] = rss.peak_kb
    finally:
        code = server.stop()
    result["exit_code"] = code
    if db is not None:
        result["rows"] = count_rows(db)
        answered_all = result["resp_total"] == result["sent_unique"] + result["sent_dup"]
        # Every postback was answered (see postback.lua) and every answer was a
        # 200: the distinct session-ids acknowledged are exactly the unique sends.
        result["distinct_acked"] = (
            result["sent_unique"] if answered_all and result["resp_non2xx"] == 0 else None
        )
        result["log_bytes"] = server.log_path.stat().st_size
    return result


def profile_round(args, tmp):
    """An extra project run with py-spy attached (numbers not used in the table)."""
    db = tmp / "profile.db"
    argv = [sys.executable, str(SERVER), "--db", str(db), "--host", HOST, "--threads", str(args.threads)]
    server = Server("project (profiled)", argv, tmp / "profile.log")
    try:
        server.wait_ready()
        spy = subprocess.Popen(
            [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(server.pid), "-d", str(args.duration), "-r", "200",
             "-s", "--format", "raw", "-o", str(args.py_spy), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
        )
        time.sleep(0.5)
        result = run_wrk(server.port, args, server.pid)
        _, err = spy.communicate(timeout=args.duration + 60)
        if spy.returncode:
            print(f"py-spy failed: {err.decode(errors='replace')}", file=sys.stderr)
        return result
    finally:
        server.stop()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_ingest(results):
    out = {}
    for side in ("ceiling", "project"):
        rs = [r for s, r in results if s == side]
        out[side] = {
            "rps": median([r["rps"] for r in rs]),
            "rps_all": [r["rps"] for r in rs],
            "p50_ms": median([r["latency_us"]["p50"] / 1000 for r in rs]),
            "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in rs]),
            "p99_all": [r["latency_us"]["p99"] / 1000 for r in rs],
            "non2xx": sum(r["resp_non2xx"] + r["errors"]["timeout"] for r in rs),
            "socket_errors": sum(r["errors"][k] for r in rs for k in ("connect", "read", "write")),
            "rss_mb": max(r["rss_kb"] for r in rs) / 1024,
            "requests": sum(r["requests"] for r in rs),
            "duplicates_sent": sum(r["sent_dup"] for r in rs),
            "cpu_server": median([r["cpu"]["server"] for r in rs]),
            "cpu_wrk": median([r["cpu"]["wrk"] for r in rs]),
            "cpu_other_max": max(r["cpu"]["other"] for r in rs),
        }
    rounds = [r for s, r in results if s == "project"]
    out["project"]["rows"] = sum(r["rows"]["sessions"] for r in rounds)
    acked = [r["distinct_acked"] for r in rounds]
    out["project"]["distinct_acked"] = None if None in acked else sum(acked)
    out["project"]["recorded_answers"] = sum(r["resp_recorded"] for r in rounds)
    out["project"]["conflicts"] = sum(r["rows"]["conflicts"] + r["rows"]["rejected"] for r in rounds)
    out["project"]["exit_codes"] = [r["exit_code"] for r in rounds]
    out["project"]["log_bytes"] = sum(r["log_bytes"] for r in rounds)
    return out


# ---------------------------------------------------------------------------
# Read side
# ---------------------------------------------------------------------------


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def time_gets(port, path, count, warmup):
    """Sequential GETs on one keep-alive connection: (status, body of the
    last, ascending durations in ms).  Stops early on a non-200."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    times = []
    try:
        for i in range(warmup + count):
            started = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            elapsed = (time.perf_counter() - started) * 1000
            if resp.status != 200:
                return resp.status, body, sorted(times)
            if i >= warmup:
                times.append(elapsed)
    finally:
        conn.close()
    return 200, body, sorted(times)


def book_report(db, first_day, tmp):
    """Import a made-up booked report for every filled day and property, with
    spp_server.py import-booked as a publisher would."""
    report = tmp / "booked.csv"
    lines = ["date,property-id,country,revenue"]
    for n in range(fill.SPAN_DAYS):
        day = (first_day + datetime.timedelta(days=n)).isoformat()
        lines += [f"{day},{prop},{country},1.234567" for prop in sorted(set(fill.PROPERTIES))
                  for country in sorted(set(fill.COUNTRIES))]
    report.write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, str(SERVER), "import-booked", str(report), "--db", str(db)],
                   check=True, capture_output=True, timeout=120)


def read_size(size, args, tmp):
    db = tmp / f"read-{size}.db"
    done = subprocess.run(
        [sys.executable, str(FILL), "--db", str(db), "--sessions", str(size)],
        capture_output=True, text=True, timeout=900, preexec_fn=_die_with_parent,
    )
    if done.returncode:
        raise RuntimeError(f"fill.py failed:\n{done.stderr}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    first_day = datetime.datetime.fromtimestamp(info["first_us"] / 1e6, datetime.timezone.utc).date()
    book_report(db, first_day, tmp)
    argv = [sys.executable, str(SERVER), "--db", str(db), "--host", HOST, "--threads", str(args.threads)]
    server = Server(f"project (read, {size} rows)", argv, tmp / f"read-{size}.log")
    out = {"fill_seconds": info["seconds"], "db_mb": info["bytes"] / 2**20}
    try:
        server.wait_ready()
        for key, user, expected in (
            ("light", info["light_user"], info["light_sessions"]),
            ("heavy", info["heavy_user"], info["heavy_sessions"]),
        ):
            status, body, times = time_gets(server.port, f"/users/{user}/earnings",
                                            args.read_requests, warmup=20)
            sessions = json.loads(body).get("sessions") if status == 200 else None
            if status == 200 and sessions != expected:
                raise RuntimeError(f"{user} has {sessions} sessions, expected {expected}")
            out[key] = {"status": status, "p50": percentile(times, 50), "p99": percentile(times, 99)}
        day = datetime.datetime.fromtimestamp(info["first_us"] / 1e6, datetime.timezone.utc).date()
        day += datetime.timedelta(days=fill.SPAN_DAYS // 2)
        query = args.export_query.format(since=day.isoformat(),
                                         until=(day + datetime.timedelta(days=1)).isoformat())
        status, body, times = time_gets(server.port, f"/earnings?{query}",
                                        args.export_requests, warmup=2)
        out["export"] = {
            "status": status, "query": query, "p50": percentile(times, 50),
            "p99": percentile(times, 99),
            "lines": body.count(b"\n") if status == 200 else None,
            "error": None if status == 200 else body[:200].decode("utf-8", "replace"),
        }
        # The whole filled period, one record per day and property.
        query = (f"since={first_day.isoformat()}&until="
                 f"{(first_day + datetime.timedelta(days=fill.SPAN_DAYS)).isoformat()}")
        status, body, times = time_gets(server.port, f"/reconciliation?{query}",
                                        args.export_requests, warmup=2)
        records = json.loads(body)["days"] if status == 200 else []
        expected = fill.SPAN_DAYS * len(set(fill.PROPERTIES))
        if status == 200 and (len(records) != expected or any(r["sessions"] is None for r in records)):
            raise RuntimeError(f"reconciliation gave {len(records)} records, expected {expected}")
        out["reconciliation"] = {"status": status, "query": query, "p50": percentile(times, 50),
                                 "p99": percentile(times, 99), "records": len(records)}
    finally:
        server.stop()
    out["pruned"] = prune_and_vacuum(db)
    with contextlib.suppress(OSError):
        for suffix in ("", "-wal", "-shm"):
            os.unlink(f"{db}{suffix}")
    return out


def fill_database(db, size, end_day=None):
    argv = [sys.executable, str(FILL), "--db", str(db), "--sessions", str(size)]
    done = subprocess.run([*argv, *(["--end-day", end_day] if end_day else [])],
                          capture_output=True, text=True, timeout=900, preexec_fn=_die_with_parent)
    if done.returncode:
        raise RuntimeError(f"fill.py failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_while_posting(server, args, paths):
    """wrk's load while `paths` are loaded in turn, in a loop, on a thread:
    (wrk's result, times of the loads within the load, failed statuses)."""
    stop, during, failed = threading.Event(), [], []
    load_start = time.monotonic()

    def loop():
        # Only loads that start and end while wrk is loading count: wrk
        # keeps its connections parked (idle) for TAIL_S after the load.
        for path in itertools.cycle(paths):
            if stop.is_set():
                return
            status, _, times = time_gets(server.port, path, 1, warmup=0)
            if status != 200:
                failed.append(status)
            elif time.monotonic() <= load_start + args.duration:
                during.extend(times)

    looping = threading.Thread(target=loop, daemon=True)
    looping.start()
    result = run_wrk(server.port, args, server.pid)
    stop.set()
    looping.join(120)
    return result, during, failed


def ingest_during_export(args, tmp, size=1_000_000):
    """On a database of `size` sessions: the one-day export alone, ingest
    alone, then both at once (the export looping on its own connection)."""
    db = tmp / f"export-{size}.db"
    info = fill_database(db, size)
    day = datetime.datetime.fromtimestamp(info["first_us"] / 1e6, datetime.timezone.utc).date()
    day += datetime.timedelta(days=fill.SPAN_DAYS // 2)
    view_month = day.strftime("%Y-%m")
    path = "/earnings?" + args.export_query.format(
        since=day.isoformat(), until=(day + datetime.timedelta(days=1)).isoformat())
    argv = [sys.executable, str(SERVER), "--db", str(db), "--host", HOST, "--threads", str(args.threads)]
    if args.pin_cpu is not None:
        argv = ["taskset", "-c", str(args.pin_cpu), *argv]
    server = Server("project (ingest during export)", argv, tmp / "during-export.log")
    try:
        server.wait_ready()
        _, _, alone = time_gets(server.port, path, args.export_requests, warmup=2)
        quiet = run_wrk(server.port, args, server.pid)
        busy, during, failed = load_while_posting(server, args, [path])
        # The same with the web view's pages loaded in a loop instead, in turn.
        pages = [p for _, p in view_paths(view_month, info)]
        for page in pages:  # the first load of the month builds its rollup
            time_gets(server.port, page, 1, warmup=0)
        viewed, loaded, failed_pages = load_while_posting(server, args, pages)
        failed += failed_pages
    finally:
        server.stop()
    return {"export_alone_p50": percentile(alone, 50), "export_during_p50": percentile(sorted(during), 50),
            "exports_during": len(during), "exports_failed": len(failed),
            "ingest_alone": quiet["rps"], "ingest_during": busy["rps"],
            "ingest_during_view": viewed["rps"], "pages_during": len(loaded),
            "page_during_p50": percentile(sorted(loaded), 50),
            "non2xx": quiet["resp_non2xx"] + busy["resp_non2xx"] + viewed["resp_non2xx"]}


def view_paths(month, info):
    """The web view's pages, over the month that holds the filled sessions."""
    heavy = urllib.parse.quote(info["heavy_user"], safe="")
    return [("month", f"/view/?month={month}"), ("ledger", "/view/ledger"),
            ("users, top 50", f"/view/users?month={month}"),
            ("users, page 1,000", f"/view/users?month={month}&page=1000"),
            ("users, search", "/view/users?search=user-0999"),
            ("a user (10,000 sessions)", f"/view/users/{heavy}?month={month}"),
            ("postbacks", "/view/postbacks")]


def view_pages(args, tmp, size=1_000_000):
    """Each page of the web view over `size` sessions that all fall in one
    month (the one before the current).  The server catches the month's sums
    up in the background from its start (reading every session once): the
    month page loaded at once after a start waits for that; each page's
    first load is timed once the server says it has caught up, then repeated."""
    today = datetime.datetime.now(datetime.timezone.utc).date()
    end = today.replace(day=1)
    month = (end - datetime.timedelta(days=1)).strftime("%Y-%m")
    db = tmp / f"view-{size}.db"
    info = fill_database(db, size, end.isoformat())
    book_report(db, datetime.date.fromisoformat(end.isoformat()) - datetime.timedelta(
        days=fill.SPAN_DAYS), tmp)
    argv = [sys.executable, str(SERVER), "--db", str(db), "--host", HOST, "--threads", str(args.threads),
            "--log-level", "debug"]
    pages = view_paths(month, info)
    out = {"month": month, "sessions": size, "pages": {}}
    server = Server(f"project (view at once after a start, {size} rows)", argv, tmp / "view-start.log")
    try:
        server.wait_ready()
        _, _, at_start = time_gets(server.port, pages[0][1], 1, warmup=0)
        out["month_at_start"] = at_start[0]
    finally:
        server.stop()
    server = Server(f"project (view, {size} rows)", argv, tmp / "view.log")
    try:
        server.wait_ready()
        started = time.monotonic()
        while "the month's sums are caught up" not in Path(server.log_path).read_text(errors="replace"):
            if time.monotonic() - started > 120:
                raise RuntimeError(f"the view's sums not caught up after 120 s:\n{server.log_tail()}")
            time.sleep(0.05)
        out["catch_up_s"] = time.monotonic() - started
        for label, path in pages:
            status, body, first = time_gets(server.port, path, 1, warmup=0)
            if status != 200:
                raise RuntimeError(f"{path}: HTTP {status}: {body[:200]!r}")
            _, _, times = time_gets(server.port, path, args.view_requests, warmup=0)
            out["pages"][label] = {"path": path, "first": first[0], "p50": percentile(times, 50),
                                   "p99": percentile(times, 99), "bytes": len(body)}
    finally:
        server.stop()
    return out


def view_rows(v):
    rows = [(f"**web view pages** ({fmt(v['sessions'])} sessions in {v['month']}; "
             "A = first load once the server has caught up, B = p50 / p99 of the next loads, ms)",
             "", "", "", "", "")]
    for label, p in v["pages"].items():
        rows.append((f"{label} `{p['path']}`", fmt(p["first"], 1),
                     f"{p['p50']:.1f} / {p['p99']:.1f}", "", f"≤ {TARGETS['view_ms']} ms",
                     verdict(p["p99"] <= TARGETS["view_ms"])
                     + ("" if p["first"] <= TARGETS["view_ms"] else " (first load: FAIL)")))
    rows.append(("the month at once after a start (waits for the catch-up; A = ms, "
                 "B = the catch-up's seconds, seen in the log)", fmt(v["month_at_start"], 1),
                 f"{v['catch_up_s']:.2f} s", "", "", ""))
    return rows


def during_export_rows(d):
    ingest = d["ingest_during"] / d["ingest_alone"]
    export = d["export_during_p50"] / d["export_alone_p50"] if d["export_during_p50"] else None
    return [
        ("**ingest while a one-day export loops** (1,000,000 sessions; A = alone, B = during)",
         "", "", "", "", ""),
        ("ingest requests/s", fmt(d["ingest_alone"], 0), fmt(d["ingest_during"], 0), fmt(ingest, 2),
         "≥ 0.60", verdict(ingest >= 0.60)),
        ("one-day export p50 ms", fmt(d["export_alone_p50"], 1), fmt(d["export_during_p50"], 1),
         fmt(export, 2), "≤ 1.5", verdict(export is not None and export <= 1.5)),
        ("ingest requests/s while the view's pages load in a loop", fmt(d["ingest_alone"], 0),
         fmt(d["ingest_during_view"], 0), fmt(d["ingest_during_view"] / d["ingest_alone"], 2),
         "≥ the export's", verdict(d["ingest_during_view"] >= d["ingest_during"])),
        ("pages loaded within the load / their p50 ms", "",
         f"{d['pages_during']} / {fmt(d['page_during_p50'], 1)}", "", "", ""),
        ("exports within the load / failed exports and pages / non-2xx postbacks", "",
         f"{d['exports_during']} / {d['exports_failed']} / {d['non2xx']}", "", "failures = 0",
         verdict(d["non2xx"] == 0 and d["exports_failed"] == 0 and d["exports_during"] > 0)),
    ]


def prune_and_vacuum(db):
    """Clear every raw body with `spp_server.py prune`, then VACUUM: the
    seconds each took and the file's size after, in MiB (2**20 bytes)."""
    started = time.monotonic()
    subprocess.run([sys.executable, str(SERVER), "prune", "--db", str(db),
                    "--raw-bodies-before", "2100-01-01"], check=True, capture_output=True,
                   timeout=900, preexec_fn=_die_with_parent)
    pruned = time.monotonic()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("VACUUM")
    return {"prune_seconds": pruned - started, "vacuum_seconds": time.monotonic() - pruned,
            "db_mb": os.path.getsize(db) / 2**20}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def machine():
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        wrk_version = (wrk.stdout + wrk.stderr).split()[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        wrk_version = "?"
    from importlib.metadata import version

    return (
        f"machine: nproc {len(os.sched_getaffinity(0))}, {model}, Linux {platform.release()}; "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"bottle {version('bottle')}, waitress {version('waitress')}, wrk {wrk_version}"
    )


def fmt(value, digits=1, unit=""):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def verdict(ok):
    return "–" if ok is None else ("PASS" if ok else "FAIL")


def ingest_rows(s, args):
    c, p = s["ceiling"], s["project"]
    rps_ratio = p["rps"] / c["rps"] if c["rps"] else None
    p99_ratio = p["p99_ms"] / c["p99_ms"] if c["p99_ms"] else None
    per_round = lambda xs, d=0: " / ".join(fmt(float(x), d) for x in xs)  # noqa: E731
    acked, rows = p["distinct_acked"], p["rows"]
    return [
        ("**ingest** (A = ceiling, B = project)", "", "", "", "", ""),
        ("requests/s (median of rounds)", fmt(c["rps"], 0), fmt(p["rps"], 0), fmt(rps_ratio, 2),
         f"≥ {TARGETS['throughput_ratio']:.2f}",
         verdict(rps_ratio is not None and rps_ratio >= TARGETS["throughput_ratio"])),
        ("requests/s per round", per_round(c["rps_all"]), per_round(p["rps_all"]), "", "", ""),
        ("latency p50 ms", fmt(c["p50_ms"], 2), fmt(p["p50_ms"], 2),
         fmt(p["p50_ms"] / c["p50_ms"] if c["p50_ms"] else None, 2), "", ""),
        ("latency p99 ms", fmt(c["p99_ms"], 2), fmt(p["p99_ms"], 2), fmt(p99_ratio, 2),
         f"≤ {TARGETS['p99_factor']:.1f}",
         verdict(p99_ratio is not None and p99_ratio <= TARGETS["p99_factor"])),
        ("latency p99 ms per round", per_round(c["p99_all"], 2), per_round(p["p99_all"], 2), "", "", ""),
        ("non-2xx (+ timeouts), all rounds", fmt(c["non2xx"]), fmt(p["non2xx"]), "", "= 0",
         verdict(p["non2xx"] == 0 and p["socket_errors"] == 0)),
        ("server peak VmRSS MB, all its processes summed", fmt(c["rss_mb"], 1), fmt(p["rss_mb"], 1), "",
         f"≤ {TARGETS['rss_mb']}", verdict(p["rss_mb"] <= TARGETS["rss_mb"])),
        ("rows == distinct session-ids acked", "", f"{fmt(rows)} == {fmt(acked)}", "",
         "equal", verdict(acked is not None and rows == acked == p["recorded_answers"]
                          and p["conflicts"] == 0 and set(p["exit_codes"]) == {0})),
        ("CPU cores busy: server / wrk (median)", f"{c['cpu_server']:.2f} / {c['cpu_wrk']:.2f}",
         f"{p['cpu_server']:.2f} / {p['cpu_wrk']:.2f}", "", "", ""),
        ("CPU cores busy: other processes' user time (max)", f"{c['cpu_other_max']:.2f}", f"{p['cpu_other_max']:.2f}",
         "", "≈ 0 for valid numbers", "–" if max(c['cpu_other_max'], p['cpu_other_max']) < 0.05 else "NOISY"),
        ("postbacks answered (of them exact dups)", f"{fmt(c['requests'])} ({fmt(c['duplicates_sent'])})",
         f"{fmt(p['requests'])} ({fmt(p['duplicates_sent'])})", "", "", ""),
    ]


def read_rows(reads):
    sizes = sorted(reads)
    small, large = sizes[0], sizes[-1]
    rows = [(f"**read** (A = {fmt(small)} rows, B = {fmt(large)} rows; "
             "sequential keep-alive GETs)", "", "", "", "", "")]

    def cell(r):
        if r["status"] != 200:
            return f"HTTP {r['status']}"
        return f"{r['p50']:.2f} / {r['p99']:.2f}"

    for key, label in (("light", "earnings, user with 10 sessions"),
                       ("heavy", "earnings, user with 10,000 sessions"),
                       ("export", "export of one day (NDJSON)"),
                       ("reconciliation", f"reconciliation of {fill.SPAN_DAYS} days (JSON)")):
        a, b = reads[small][key], reads[large][key]
        ok_both = a["status"] == 200 and b["status"] == 200
        growth = b["p50"] / a["p50"] if ok_both else None
        target, result = "", "–"
        if key == "light":
            target = f"p50 ≤ {TARGETS['earnings_p50_ms']:.0f} ms at {fmt(large)}"
            result = verdict(b["status"] == 200 and b["p50"] <= TARGETS["earnings_p50_ms"])
        if key == "reconciliation":
            target = f"p50 ≤ {TARGETS['reconciliation_p50_ms']:.0f} ms at {fmt(large)}"
            result = verdict(b["status"] == 200 and b["p50"] <= TARGETS["reconciliation_p50_ms"])
        if key in ("light", "heavy") and small != large:
            target += ("; " if target else "") + f"p50 ratio ≤ {TARGETS['growth']}"
            grows_ok = ok_both and b["p50"] <= TARGETS["growth"] * a["p50"] + 0.1
            result = verdict(grows_ok and result != "FAIL")
        rows.append((f"{label}: p50 / p99 ms", cell(a), cell(b), fmt(growth, 2), target, result))
    heavy = reads[large]["heavy"]
    light = reads[large]["light"]
    if heavy["status"] == light["status"] == 200:
        rows.append((f"10,000-session / 10-session user p50, at {fmt(large)}", "", "",
                     fmt(heavy["p50"] / light["p50"], 1), "grows with the user", "–"))
    exp = reads[large]["export"]
    if exp["status"] == 200:
        rows.append(("export lines (users that day)", fmt(reads[small]["export"]["lines"]),
                     fmt(exp["lines"]), "", "", ""))
    else:
        rows.append((f"export `GET /earnings?{exp['query']}`", "", "", "", "", f"HTTP {exp['status']}"))
    rows.append(("fill time s / database MiB", *(f"{reads[n]['fill_seconds']:.1f} / {reads[n]['db_mb']:.0f}"
                                              for n in (small, large)), "", "", ""))
    rows.append(("raw bodies pruned + VACUUM: s + s / database MiB", *(
        "{prune_seconds:.1f} + {vacuum_seconds:.1f} / {db_mb:.0f}".format(**reads[n]["pruned"])
        for n in (small, large)), "", "", ""))
    return rows


def render(rows):
    header = ("measure", "A", "B", "B / A", "target", "result")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds of load per wrk run")
    p.add_argument("--connections", type=int, default=16, help="wrk connections")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads")
    p.add_argument("--threads", type=int, default=spp_server.DEFAULTS["threads"],
                   help="the project's request threads (default: its own default)")
    p.add_argument("--ceiling-threads", type=int, default=4,
                   help="the ceiling's waitress threads (default: waitress's own, as a user "
                   "would write it)")
    p.add_argument("--duplicates", type=float, default=0.05, help="share of exact duplicate postbacks")
    p.add_argument("--rounds", type=int, default=3, help="ceiling, project pairs")
    p.add_argument("--pin-cpu", type=int, metavar="N",
                   help="run the servers (ceiling and project alike) pinned to core N "
                   "with taskset, as on a 1-vCPU VPS; wrk stays unpinned")
    p.add_argument("--only", choices=("ingest", "read", "during-export", "view"),
                   help="run one part only (during-export: ingest while a one-day export loops, "
                   "then while the web view's pages do; view: each page's time)")
    p.add_argument("--view-requests", type=int, default=10, help="timed loads of each view page")
    p.add_argument("--read-sizes", default="100000,1000000", help="rows in the read databases")
    p.add_argument("--read-requests", type=int, default=300, help="timed earnings requests per user")
    p.add_argument("--export-requests", type=int, default=20, help="timed export requests")
    p.add_argument("--export-query", default="since={since}&until={until}",
                   help="query of the export; {since} and {until} are ISO dates")
    p.add_argument("--py-spy", metavar="FILE", type=Path,
                   help="also run one profiled project round, writing py-spy raw stacks to FILE")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write all measurements as JSON")
    p.add_argument("--max-seconds", type=int, default=1200, help="give up after this long")
    args = p.parse_args(argv)
    if args.duration < 1 or args.rounds < 1 or args.connections < args.wrk_threads:
        p.error("need --duration >= 1, --rounds >= 1 and --connections >= --wrk-threads")
    if not 0 <= args.duplicates < 1:
        p.error("--duplicates is a share from 0 to 1")
    args.read_sizes = sorted({int(n) for n in args.read_sizes.split(",")})
    return args


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _overtime(_signum, _frame):
    raise TimeoutError("the benchmark ran past --max-seconds")


def main(argv=None):
    args = parse_args(argv)
    if args.only not in ("read", "view") and shutil.which("wrk") is None:  # ingest, during-export
        sys.exit("bench.py needs wrk: apt-get install wrk")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _overtime)
    signal.alarm(args.max_seconds)
    command = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    results = {"command": command, "machine": machine(),
               "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    rows = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="spp-bench-") as tmpdir:
            tmp = Path(tmpdir)
            if args.only in (None, "ingest"):
                ingest = []
                for n in range(1, args.rounds + 1):
                    for side in ("ceiling", "project"):
                        print(f"… ingest round {n}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                        ingest.append((side, ingest_round(side, n, args, tmp)))
                results["ingest_rounds"] = ingest
                results["ingest"] = summarize_ingest(ingest)
                rows += ingest_rows(results["ingest"], args)
                if args.py_spy:
                    print("… profiled project run (py-spy)", file=sys.stderr, flush=True)
                    results["profiled_round"] = profile_round(args, tmp)
            if args.only == "during-export":
                print("… ingest while a one-day export loops (1,000,000 rows)", file=sys.stderr, flush=True)
                results["during_export"] = ingest_during_export(args, tmp)
                rows += during_export_rows(results["during_export"])
            elif args.only == "view":
                print("… the web view's pages (1,000,000 rows)", file=sys.stderr, flush=True)
                results["view"] = view_pages(args, tmp)
                rows += view_rows(results["view"])
            elif args.only != "ingest":
                reads = {}
                for size in args.read_sizes:
                    print(f"… read side: fill {size:,} rows and time reads", file=sys.stderr, flush=True)
                    reads[size] = read_size(size, args, tmp)
                results["read"] = reads
                rows += read_rows(reads)
    finally:
        signal.alarm(0)
        stop_all()
    elapsed = time.monotonic() - started
    print(f"# spp-receiver benchmark\n\n{results['machine']}  ")
    print(f"load average at start: {results['loadavg']}  ")
    print(f"command: `{command}` ({elapsed:.0f} s)  ")
    if args.only in (None, "ingest"):
        print(f"ingest: {args.rounds} round(s) of ceiling then project, each {args.duration} s of "
              f"wrk -t{args.wrk_threads} -c{args.connections}, {args.duplicates:.0%} exact duplicates, "
              f"threads: ceiling {args.ceiling_threads}, project {args.threads}; "
              "fresh database per round  ")
    if args.only in (None, "read"):
        print(f"read: {args.read_requests} timed GETs per user (after 20 warm-up), "
              f"{args.export_requests} timed exports (after 2), p50 / p99 in ms")
    print()
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, TimeoutError) as exc:
        sys.exit(f"bench.py: stopped ({exc or 'interrupted'}); servers stopped, temporary files removed")
