#!/usr/bin/env python3
"""Fill a fresh spp-receiver database with N sessions for the read benchmark.

    python bench/fill.py --db /tmp/big.db --sessions 1000000

The schema comes from spp_server itself (connect() + migrate() on schema.sql),
so it is exactly what the server creates.  Rows go in with direct SQL, in one
transaction, with executemany over a generator: 1,000,000 rows take seconds.

Sessions are spread over USERS users, with two known users for timing:
LIGHT_USER has exactly 10 sessions and HEAVY_USER exactly 10,000.
received_at_us rises with the row id (as commits do) over SPAN_DAYS days
ending at the start of the current UTC day.  Prints one JSON line describing
what it made.
"""

import argparse
import contextlib
import json
import random
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spp_server  # noqa: E402

USERS = 100_000
LIGHT_USER, LIGHT_SESSIONS = "user-099999", 10
HEAVY_USER, HEAVY_SESSIONS = "user-099998", 10_000
SPAN_DAYS = 30
DAY_US = 86_400 * 1_000_000
COUNTRIES = ("IN", "IN", "IN", "ID", "BR", "US", "PH", "BD", "NG", "VN", "EG", "PK")
PROPERTIES = ("1234", "1234", "5678", "9012")


def span(end_us=None):
    """(first, last) microsecond of the filled period: SPAN_DAYS whole UTC days."""
    if end_us is None:
        end_us = time.time_ns() // 1000 // DAY_US * DAY_US
    return end_us - SPAN_DAYS * DAY_US, end_us


def rows(n, start_us, end_us, seed):
    """The n rows, in the column order of spp_server.STORE_SQL['insert_session']."""
    rng = random.Random(seed)
    special = dict.fromkeys(rng.sample(range(n), HEAVY_SESSIONS + LIGHT_SESSIONS), HEAVY_USER)
    for position in list(special)[HEAVY_SESSIONS:]:
        special[position] = LIGHT_USER
    step = (end_us - start_us) / n
    randrange, choice = rng.randrange, rng.choice
    for i in range(n):
        user_id = special.get(i) or f"user-{randrange(USERS - 2):06d}"
        session_id = f"{randrange(1 << 32):08x}-{i >> 16:04x}-4{randrange(4096):03x}-a{i & 0xfff:03x}-{i:012x}"
        country, property_id = choice(COUNTRIES), choice(PROPERTIES)
        ads = randrange(9)
        micro_usd = ads * randrange(1, 31)
        duration = randrange(15, 1801)
        raw_body = (
            f'{{"user-id": "{user_id}", "session-id": "{session_id}", "country": "{country}", '
            f'"count-of-ads-viewed": {ads}, "your-estimated-revenue": "0.{micro_usd:06d}", '
            f'"session-duration": {duration}, "property-id": "{property_id}"}}'
        )
        yield (
            session_id, user_id, property_id, country, ads, duration,
            micro_usd * 1000, start_us + int(i * step), raw_body,
        )


def fill(path, sessions, seed=1, end_us=None):
    """Create `path` (must not exist) with `sessions` rows; return a description."""
    if sessions < HEAVY_SESSIONS + LIGHT_SESSIONS:
        raise ValueError(f"need at least {HEAVY_SESSIONS + LIGHT_SESSIONS} sessions")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; fill makes a fresh database")
    started = time.monotonic()
    start_us, end_us = span(end_us)
    spp_server.ensure_private_file(str(path))
    with contextlib.closing(spp_server.connect(str(path), 5000)) as conn:
        spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(encoding="utf-8"))
        # A scratch fixture: no journal while filling, WAL again afterwards.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1048576")  # 1 GiB, so the index is built in memory
        conn.execute("BEGIN")
        conn.executemany(spp_server.STORE_SQL["insert_session"], rows(sessions, start_us, end_us, seed))
        conn.execute("COMMIT")
        count = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
        conn.execute("PRAGMA journal_mode = WAL")
    if count != sessions:
        raise RuntimeError(f"inserted {count} rows, expected {sessions}")
    return {
        "db": str(path),
        "sessions": count,
        "users": USERS,
        "light_user": LIGHT_USER,
        "light_sessions": LIGHT_SESSIONS,
        "heavy_user": HEAVY_USER,
        "heavy_sessions": HEAVY_SESSIONS,
        "first_us": start_us,
        "end_us": end_us,
        "bytes": path.stat().st_size,
        "seconds": round(time.monotonic() - started, 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="database file to create (must not exist)")
    parser.add_argument("--sessions", type=int, default=1_000_000, help="rows (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--end-day", metavar="YYYY-MM-DD",
                        help="the day after the filled days (default: today, UTC)")
    args = parser.parse_args(argv)
    end_us = None if args.end_day is None else spp_server.parse_instant(args.end_day)
    print(json.dumps(fill(args.db, args.sessions, args.seed, end_us)))


if __name__ == "__main__":
    main()
