#!/usr/bin/env python3
"""spp-receiver: records Gamezop Session Performance Postbacks (SPP) in SQLite.

Gamezop POSTs one JSON postback per user session to /postback; this module
stores it once per session-id (durably, before answering 200) and tells the
publisher what each user earned.  One Bottle app served by waitress; storage
is one SQLite file in WAL mode.  See README.md.

Sections, in this order (a test holds this list to the section headers):
- Configuration
- Money and time: exact decimals, integer nano-USD, integer microseconds
- Validation of a postback body
- Storage: the file, its schema and its connections
- The writer: group commit, in a thread or in a process of its own
- The store: reads, write ops, earnings and totals
- Output formats
- Reads for the API: sessions, the change feed, stats, metrics, export
- Booked revenue: importing Gamezop's Ad Revenue Reports (import-booked)
- Reconciliation: each report day's estimates against what was booked
- Payout ledger, the frame: every step's lock, chunked writes and journal
- Payout ledger, runs: each session paid once (pay, void-oversized)
- Payout ledger, settlements: the buffer released (settle)
- Payout ledger, adjustments: write-offs, holds, suspects, erasure (their commands)
- Payout ledger, statements: accounts and the ledger's state (statement, ledger)
- Payout ledger, replay: steps a restore lost, put back (ledger-replay)
- Retention: clearing old raw bodies, deleting old refusals (prune)
- HTTP
- Web view: read-only pages of the month, the ledger, users and postbacks
- Waitress's internals: the only code that touches them
- Server and command line: serving, and what every command shares
"""

import os
import sys

# Run as a script (`python spp_server.py`, as the README and spp.service start
# the server), CPython keeps the script's whole syntax tree until the script
# ends (Python/pythonrun.c frees it only after running it): about 4 MB resident
# for this module, in the web process and again in the forked writer.  So the
# server starts again at once as the module, whose tree is freed once compiled:
# the same process id, arguments, descriptors and interpreter options.  -c puts
# the working directory first on sys.path, where a script has its own folder.
# Commands (a first argument that is not an option) are short-lived: run as they are.
RELAUNCH_AS_MODULE = ("import runpy, sys; sys.path[:1] == [''] and sys.path.pop(0); "
                      "sys.path.insert(0, sys.argv.pop(1)); "
                      "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
if __name__ == "__main__" and __spec__ is None and (sys.argv[1:2] or ["-"])[0].startswith("-"):
    try:
        os.execv(sys.executable, [
            sys.executable, *sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)],
            "-c", RELAUNCH_AS_MODULE, os.path.dirname(os.path.abspath(__file__)),
            os.path.splitext(os.path.basename(__file__))[0], *sys.argv[1:]])
    except OSError:
        pass  # no interpreter to run again (sys.executable empty): go on as the script

import argparse
import base64
import bisect
import collections
import contextlib
import csv
import dataclasses
import decimal
import difflib
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import html
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import queue
import re
import secrets
import select
import signal
import socket
import sqlite3
import struct
import textwrap
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

from bottle import Bottle, HTTPError, HTTPResponse, request, response
from waitress.server import create_server

log = logging.getLogger("spp")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

DEFAULTS = {
    "db": "spp.db",
    "host": "127.0.0.1",
    "port": 8080,
    # Request threads.  More than waitress's 4: each one waits on the writer
    # while its postback commits, and the writes waiting together share one
    # commit (docs/performance.md).
    "threads": 16,
    "busy_timeout_ms": 5000,
    "reward_share": None,  # Decimal in (0, 1]: adds rewardable-revenue to earnings
    "postback_tokens": (),  # bytes; empty = postbacks need no auth
    "read_tokens": (),  # bytes; empty = reads need no auth (loopback only)
    "log_level": "info",
    "report_utc_offset": 0,  # minutes east of UTC of the booked reports' days
    # Where writes commit (WRITERS): "auto", as the server runs, is a process
    # of its own where two CPUs or more are allowed, a thread on one.
    "writer": "auto",
    # How long pay or settle waits for another step's ledger lock: far above
    # the longest step measured (settle of a million sessions, 26 s).
    "ledger_lock_wait_s": 600,
}
LOG_LEVELS = ("debug", "info", "warning", "error")

MAX_BODY_BYTES = 64 * 1024
SCHEMA_PATH = Path(__file__).with_name("schema.sql")


class ConfigError(Exception):
    """A setting that makes it unsafe or impossible to start."""


class Invalid(Exception):
    """Input that breaks a rule, naming the field or parameter: answered 400
    (and, for a postback, kept in the `rejected` table)."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field
        self.message = message
        # For a postback's log line: its ids, when the body had usable ones.
        self.session_id = self.user_id = None


def load_tokens(env_var, credential_name, environ):
    """Tokens from `env_var` (comma-separated) or the systemd credential file
    (one per line).  Several tokens let a token be rotated without downtime."""
    value = environ.get(env_var)
    if value is not None:
        source, tokens = f"{env_var} is set but", value.split(",")
    else:
        cred_dir = environ.get("CREDENTIALS_DIRECTORY")
        path = Path(cred_dir, credential_name) if cred_dir else None
        if path is None or not path.exists():
            return ()
        source = f"the token file {path} exists but"
        try:
            tokens = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"cannot read the token file {path}: {reason}") from None
    tokens = tuple(t.strip().encode("utf-8") for t in tokens if t.strip())
    if not tokens:
        # An empty token must not silently turn auth off.
        raise ConfigError(
            f"{source} holds no token: put the token in it, or remove it to run without one"
        )
    return tokens


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config, listen_hosts):
    """Refuse to serve earnings to the network without a read token."""
    exposed = [h for h in listen_hosts if not is_loopback(h)]
    if exposed and not config["read_tokens"]:
        raise ConfigError(
            f"refusing to listen on {', '.join(exposed)} without a read token: "
            "earnings would be readable by anyone who can reach it. "
            "Set SPP_READ_TOKEN (or the read-token credential), or listen on 127.0.0.1."
        )


# ---------------------------------------------------------------------------
# Money and time: exact decimals, integer nano-USD, integer microseconds
# ---------------------------------------------------------------------------

NANOS_PER_USD = 10**9
NANO = decimal.Decimal("1e-9")
MAX_REVENUE = decimal.Decimal(1_000_000)  # a booked report row: below this
# A postback's estimate: at most this.  Real SPP estimates are 0.00001 to
# 0.01 USD a session; 10 USD is a thousand times the largest.  It bounds every
# sum of estimates: the most in one 64-bit nano-USD sum is (2^63 - 1) / 10^10
# = 922,337,203 maximal sessions, and what is summed whole-USD and nano
# remainder apart (SQL_SUMS) is limited by the remainders, 9.2 billion
# sessions of any size.  See docs/ledger.md, "Limits".
MAX_ESTIMATE = decimal.Decimal(10)
# Every booked row together: at most this.  The ledger's sums of booked money
# (pools, settlement headers, margins over every settlement) then stay within
# 64 bits with a margin of 92 for corrections that settle a pool again.
MAX_BOOKED_TOTAL = decimal.Decimal(100_000_000)
# Wide enough that no valid revenue below MAX_REVENUE loses a digit.
MONEY_CONTEXT = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
REWARD_CONTEXT = decimal.Context(prec=60)  # exact for any stored sum times any share


def usd_to_nanos(amount):
    """Exact Decimal USD -> int nano-USD, rounding half-even to 9 places."""
    return int(amount.quantize(NANO, context=MONEY_CONTEXT).scaleb(9, context=MONEY_CONTEXT))


def billionths_text(n):
    """int billionths -> exact decimal string, no exponent: 36000 -> '0.000036'."""
    whole, frac = divmod(n, 10**9)
    return f"{whole}.{frac:09d}".rstrip("0") if frac else str(whole)


def nanos_to_usd(nanos):
    """int nano-USD -> exact decimal string of USD."""
    return billionths_text(nanos) if nanos else "0"  # most ledger fields are 0


def joined_nanos(whole_usd, nano_rest):
    return whole_usd * NANOS_PER_USD + nano_rest


def signed_usd(nanos):
    """nanos_to_usd for a figure that may be negative (a margin)."""
    return f"-{nanos_to_usd(-nanos)}" if nanos < 0 else nanos_to_usd(nanos)


def floor_places(fraction, places):
    """A non-negative Fraction -> a decimal string with exactly `places`
    places, rounded down: Fraction(2, 3), 6 -> '0.666666'."""
    scaled = fraction.numerator * 10**places // fraction.denominator
    whole, rest = divmod(scaled, 10**places)
    return f"{whole}.{rest:0{places}d}"


def now_us():
    return time.time_ns() // 1000


def iso_utc(us):
    """Microseconds since the epoch -> ISO 8601 UTC with Z (None stays None).
    Hot in exports (two per user), so the date is cached per day."""
    if us is None:
        return None
    secs, micros = divmod(us, 1_000_000)
    day, second_of_day = divmod(secs, 86_400)
    hours, rest = divmod(second_of_day, 3600)
    stamp = f"{utc_date_text(day)}T{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{stamp}.{micros:06d}Z" if micros else f"{stamp}Z"


@functools.lru_cache(maxsize=4096)
def utc_date_text(day):
    """Days since 1970-01-01 (negative before it) -> 'YYYY-MM-DD', the year
    always in four digits (strftime's %Y writes year 1 as '1')."""
    return (EPOCH.date() + timedelta(days=day)).isoformat()


# A share or a fraction of days, written plainly.  The pattern is checked
# before Decimal() sees the text: '1e-6400000' is a valid Decimal whose plain
# form, echoed back or turned into a Fraction, has 6.4 million digits.
PLAIN_FRACTION = re.compile(r"[0-9](?:\.[0-9]{1,6})?")


def shown(text, limit=20):
    """A value the user gave, quoted for an error line: a long one is cut."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_fraction(text, example):
    """'0.7' -> Decimal('0.7'): a plain decimal above 0 and at most 1, with at
    most 6 places (ValueError otherwise, its message for the option's name)."""
    value = decimal.Decimal(text) if PLAIN_FRACTION.fullmatch(text) else None
    if value is None or not 0 < value <= 1:
        raise ValueError("must be a decimal above 0 and at most 1, with at most 6 places, "
                         f"such as {example}, not {shown(text)}")
    return value


def parse_reward_share(text):
    """'0.7' -> Decimal('0.7'); a share of revenue in (0, 1]."""
    try:
        return parse_fraction(text, "0.7")
    except ValueError as exc:
        raise ValueError(f"reward share {exc}") from None


def rewardable_nanos(nanos, share):
    """nanos x share, rounded down to the nano-USD: what may be paid out."""
    exact = decimal.Decimal(nanos).fma(share, 0, context=REWARD_CONTEXT)
    return int(exact.to_integral_value(rounding=decimal.ROUND_FLOOR))


ISO_INSTANT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?(Z|[+ -][0-9]{2}:[0-9]{2}))?"
)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The instants ISO 8601's four-digit years can write (and datetime can hold):
# an instant outside them is refused, never echoed in a form nothing reads.
FIRST_INSTANT_US = (datetime(1, 1, 1, tzinfo=timezone.utc) - EPOCH) // timedelta(microseconds=1)
END_INSTANT_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc) - EPOCH
                  ) // timedelta(microseconds=1) + 1
INSTANT_RANGE_TEXT = "from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"


class InstantOutOfRange(ValueError):
    """A well-formed instant whose UTC date falls outside years 1 to 9999."""


def parse_instant(text):
    """A point in time -> microseconds since the epoch (ValueError if unreadable).
    Forms: 2026-11-23T10:00:00Z, 2026-11-23T15:30:00.250+05:30, 2026-11-23
    (midnight UTC), or unix seconds.  A space stands for '+' in an offset,
    because an unencoded '+' in a query string arrives as a space."""
    if re.fullmatch(r"[0-9]{1,10}", text):
        return int(text) * 1_000_000
    match = ISO_INSTANT.fullmatch(text)
    if not match:
        raise ValueError(text)
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = timezone.utc
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    moment = datetime(
        int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
        int((fraction or "0").ljust(6, "0")), tzinfo=tz,
    )
    us = (moment - EPOCH) // timedelta(microseconds=1)
    if not FIRST_INSTANT_US <= us < END_INSTANT_US:  # 0001-01-01T00:00:00+01:00
        raise InstantOutOfRange(text)
    return us


@dataclass(frozen=True)
class Window:
    """The half-open window [since, until) on receive times; None is open."""

    since: int | None = None
    until: int | None = None

    def params(self, property_id=None):
        """Bind values for SQL_WINDOW."""
        return {
            "since": -(2**63) if self.since is None else self.since,
            "until": 2**63 - 1 if self.until is None else self.until,
            "property": property_id,
        }


def parse_window(since_text, until_text, required=False):
    bounds = {}
    for name, text in (("since", since_text), ("until", until_text)):
        if not text:
            if required:
                raise Invalid(name, "is required")
            if text is not None:  # `since=$SINCE` with SINCE unset: not a window of all time
                raise Invalid(name, "is empty: give a time, or leave it out for no bound")
            bounds[name] = None
            continue
        try:
            bounds[name] = parse_instant(text)
        except InstantOutOfRange:
            raise Invalid(name, f"must be {INSTANT_RANGE_TEXT} in UTC") from None
        except ValueError:
            raise Invalid(
                name,
                "must be ISO 8601 with Z or an offset (2026-11-23T10:00:00Z), "
                "a date (2026-11-23) or unix seconds",
            ) from None
    window = Window(**bounds)
    if None not in (window.since, window.until) and window.since >= window.until:
        raise Invalid("until", "must be later than since")
    return window


DAY_US = 86_400 * 1_000_000


# ---------------------------------------------------------------------------
# Validation of a postback body
# ---------------------------------------------------------------------------

MAX_SESSION_ID_CHARS = 128
MAX_USER_ID_CHARS = 256
MAX_PROPERTY_ID_CHARS = 128
MAX_COUNT = 2**31 - 1  # ads viewed, seconds: anything larger is not a real session
DECIMAL_STRING = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
DIGITS = re.compile(r"[0-9]{1,10}")
COUNTRY = re.compile(r"[A-Za-z]{2}")


@dataclass(frozen=True)
class Session:
    session_id: str
    user_id: str
    property_id: str | None
    country: str | None
    ads_viewed: int | None
    duration_s: int | None
    revenue_nano: int

    def columns(self):
        """In the order of STORE_SQL['insert_session'] (and STORE_SQL['stored_session'] after session_id)."""
        return (
            self.session_id,
            self.user_id,
            self.property_id,
            self.country,
            self.ads_viewed,
            self.duration_s,
            self.revenue_nano,
        )


class NotANumber(ValueError):
    """NaN or Infinity, which JSON does not have."""


def _reject_constant(name):
    raise NotANumber(f"{name} is not a number")


class RepeatedKeys(dict):
    """A JSON object that gives a key more than once (json would keep the
    last value): refused where read, since which value was meant is ambiguous.
    `repeated` is the first key given twice."""

    repeated = None


def json_object(pairs):
    """object_pairs_hook: a dict, or RepeatedKeys for an object that repeats a key."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    obj, seen = RepeatedKeys(obj), set()
    obj.repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    return obj


def repeated_key(value):
    """The first object in the parsed JSON `value`, in document order, that
    gives a key twice -> (its path, the key); None if none does.  Nested
    objects count too: their values are as ambiguous.  A loop, not
    recursion: it goes as deep as json nests."""
    if type(value) is dict and not any(isinstance(v, (dict, list)) for v in value.values()):
        return None  # a flat object (every postback): nothing nested to look into
    stack = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, RepeatedKeys):
            return path, item.repeated
        children = item.items() if isinstance(item, dict) else (
            enumerate(item) if isinstance(item, list) else ())
        stack.extend(reversed([((*path, key), child) for key, child in children]))
    return None


def json_path_text(path):
    """('data', 'ad_revenue', 0) -> 'data.ad_revenue[0]'; () -> 'the top object'."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
    return text.removeprefix(".") or "the top object"


def parse_json(text):
    """JSON text -> value: numbers with a fraction or exponent as exact
    Decimals (never a float), objects through json_object.  ValueError with
    a message for people (never an exception's repr, such as decimal's
    [<class 'decimal.InvalidOperation'>] or int's advice about sys)."""
    try:
        return json.loads(text, parse_float=decimal.Decimal, parse_int=json_int,
                          parse_constant=_reject_constant, object_pairs_hook=json_object)
    except (json.JSONDecodeError, NotANumber) as exc:
        raise ValueError(str(exc)) from None
    except decimal.InvalidOperation:  # 1e99999999999999999999: beyond what decimal holds
        raise ValueError("a number's exponent is too large") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def json_int(text):
    """A JSON whole number: an int, or past the digits int() takes (its
    advice is about sys), an exact Decimal, which the field's own check
    then refuses by name ("must be at most 10 USD")."""
    return int(text) if len(text) <= 4000 else decimal.Decimal(text)


def parse_json_object(body):
    """bytes -> dict (see parse_json); a key given twice is refused, naming it."""
    try:
        payload = parse_json(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Invalid(None, "the body is not valid UTF-8") from None
    except ValueError as exc:
        raise Invalid(None, f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise Invalid(None, "the body must be a JSON object")
    repeated = repeated_key(payload)
    if repeated:
        path, key = repeated
        if not path:
            raise Invalid(key, "is given more than once: which value is meant is ambiguous")
        raise Invalid(path[0], f"holds the key {shown(key)} more than once (at "
                      f"{json_path_text(path)}): which value is meant is ambiguous")
    return payload


def check_encodable(field, value):
    """JSON text may escape a lone surrogate, which no UTF-8 text can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(field, "must be valid Unicode text (no lone surrogates)") from None
    return value


def check_text(payload, field, max_chars, allow_empty):
    if field not in payload:
        raise Invalid(field, "is required")
    value = payload[field]
    if not isinstance(value, str):
        raise Invalid(field, "must be a string")
    check_encodable(field, value)
    if not value and not allow_empty:
        raise Invalid(field, "must not be empty")
    return check_length(field, value, max_chars)


def parse_decimal_string(text):
    """'0.000012' or '1.2e-05' -> Decimal; None for anything else, such as
    '0x10', '1_000', '+1', ' 1' (which Decimal() itself would take) or an
    exponent too large for decimal."""
    if not DECIMAL_STRING.fullmatch(text):
        return None
    try:
        return decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None


def check_revenue(payload, field="your-estimated-revenue", at_most=MAX_ESTIMATE):
    """The field's exact amount in USD -> int nano-USD, from 0 to `at_most`
    (a postback's estimate) or, with at_most=None, below MAX_REVENUE (a
    booked report row)."""
    if field not in payload or payload[field] is None:
        raise Invalid(field, "is required")
    value = payload[field]
    if isinstance(value, str):
        value = parse_decimal_string(value)
        if value is None:
            raise Invalid(field, "must be a decimal number such as \"0.000012\"")
    elif isinstance(value, bool) or not isinstance(value, (int, decimal.Decimal)):
        raise Invalid(field, "must be a decimal string or a number")
    else:
        value = decimal.Decimal(value)
    if not value.is_finite():
        raise Invalid(field, "must be finite")
    if value < 0:
        raise Invalid(field, "must not be negative")
    if at_most is not None and value > at_most:
        raise Invalid(field, f"must be at most {at_most} USD: no session earns that much "
                      "(SPP estimates are fractions of a cent)")
    if value >= MAX_REVENUE:
        raise Invalid(field, "must be below 1000000 USD")
    nanos = usd_to_nanos(value)
    if nanos >= MAX_REVENUE * NANOS_PER_USD:  # 999999.9999999999 rounds up to the limit
        raise Invalid(field, "must be below 1000000 USD")
    return nanos


def check_count(payload, field):
    value = payload.get(field)
    if value is None:
        return None
    if isinstance(value, str) and DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise Invalid(field, f"must be a whole number from 0 to {MAX_COUNT}")
    return value


def check_country(payload, field="country"):
    value = payload.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not COUNTRY.fullmatch(value):
        raise Invalid(field, "must be a two-letter ISO 3166-1 alpha-2 code")
    return value.upper()


def check_property_id(payload, field="property-id"):
    value = payload.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Invalid(field, "must be a string or an integer")
    return check_length(field, check_encodable(field, str(value)), MAX_PROPERTY_ID_CHARS)


def check_length(field, value, max_chars):
    if len(value) > max_chars:
        raise Invalid(field, f"must be at most {max_chars} characters")
    return value


def parse_postback(body):
    """Raw body bytes -> Session, or Invalid naming the first bad field (and
    carrying the ids that were valid, for the log)."""
    payload = parse_json_object(body)
    try:
        return Session(
            session_id=check_text(payload, "session-id", MAX_SESSION_ID_CHARS, allow_empty=False),
            user_id=check_text(payload, "user-id", MAX_USER_ID_CHARS, allow_empty=True),
            property_id=check_property_id(payload),
            country=check_country(payload),
            ads_viewed=check_count(payload, "count-of-ads-viewed"),
            duration_s=check_count(payload, "session-duration"),
            revenue_nano=check_revenue(payload),
        )
    except Invalid as invalid:
        invalid.session_id = valid_text_or_none(
            payload, "session-id", MAX_SESSION_ID_CHARS, allow_empty=False)
        invalid.user_id = valid_text_or_none(payload, "user-id", MAX_USER_ID_CHARS, allow_empty=True)
        raise


def valid_text_or_none(payload, field, max_chars, allow_empty):
    try:
        return check_text(payload, field, max_chars, allow_empty)
    except Invalid:
        return None


# ---------------------------------------------------------------------------
# Storage: the file, its schema and its connections
# ---------------------------------------------------------------------------

STORAGE_SQL = {
    "schema_version": "PRAGMA user_version",  # also a cheap read for health
}


def ensure_private_file(path):
    """Create the database file 0600 before SQLite does (SQLite gives its -wal
    and -shm files the database file's mode), so earnings are never
    world-readable whatever the umask."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def connect(path, busy_timeout_ms):
    """Open a connection with every per-connection setting this module relies on."""
    conn = sqlite3.connect(
        path,
        isolation_level=None,  # autocommit; transactions are explicit BEGIN/COMMIT
        check_same_thread=False,  # closed at shutdown from the main thread
        timeout=busy_timeout_ms / 1000,
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA synchronous = FULL")  # a commit survives a power cut
    conn.execute("PRAGMA foreign_keys = ON")
    # What is deleted is overwritten with zeros, not left in free space: an
    # erased user (see erase) or a pruned body leaves no copy in the file.
    conn.execute("PRAGMA secure_delete = ON")
    return conn


def schema_versions(text):
    """schema.sql -> [(version, [statement, ...]), ...] in file order."""
    versions = []
    for line in text.splitlines(keepends=True):
        marker = re.match(r"--\s*version\s+(\d+)\s*$", line)
        if marker:
            versions.append((int(marker.group(1)), [""]))
        elif versions:
            statements = versions[-1][1]
            statements[-1] += line
            if sqlite3.complete_statement(statements[-1]):
                statements.append("")
    return [(v, [s for s in stmts if s.strip()]) for v, stmts in versions]


def latest_schema_version():
    return schema_versions(SCHEMA_PATH.read_text(encoding="utf-8"))[-1][0]


def not_sqlite_or(exc, path):
    """SQLite's "file is not a database" as this module says it; other errors as they are."""
    if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_NOTADB:
        return exc
    return StoreUnavailable(f"{path} is not an spp-receiver database: not an SQLite file "
                            f"(this code's schema is version {latest_schema_version()})")


def database_version(conn, path):
    """The schema version of the spp-receiver database open on `conn`; 0 for
    an empty one (no schema at all: a new file, or one whose creation the
    server did not finish).  Anything else (not SQLite, another program's
    database, a schema newer than this code's) is StoreUnavailable naming the
    file and both versions.  Only reads: every entry point calls it before
    it changes anything."""
    latest = latest_schema_version()
    try:
        version = conn.execute(STORAGE_SQL["schema_version"]).fetchone()[0]
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise not_sqlite_or(exc, path) from None
    if version == 0 and not tables:
        return 0
    if version > latest and "sessions" in tables:
        raise StoreUnavailable(
            f"{path} has schema version {version}, newer than this code's {latest}: "
            "use the spp_server.py that wrote it")
    missing = 0 < version <= latest and schema_objects(version) - file_objects(conn)
    if version == 0 or version > latest or missing:
        raise StoreUnavailable(
            f"{path} is not an spp-receiver database: another program's SQLite database "
            f"(schema version {version}, tables {', '.join(sorted(tables)) or 'none'}"
            + (f", without {', '.join(sorted({name for name, _ in missing}))}" if missing else "")
            + f"; this code's schema is version {latest})")
    return version


def file_objects(conn):
    """{(table, column)} and {(index, None)} of the database open on `conn`."""
    objects = set()
    for name, kind in conn.execute(
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'index')"):
        if kind == "index":
            objects.add((name, None))
        else:
            objects.update((name, column) for (column,) in conn.execute(
                "SELECT name FROM pragma_table_info(?)", (name,)))
    return objects


@functools.lru_cache(maxsize=None)
def schema_objects(version):
    """What schema.sql's sections up to `version` create, as file_objects
    sees it: another program's database with a `sessions` table and a
    user_version in our range is still told from ours."""
    with contextlib.closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        migrate(conn, SCHEMA_PATH.read_text(encoding="utf-8"), target=version)
        return frozenset(file_objects(conn))


def is_busy(exc):
    """SQLITE_BUSY: another connection holds a lock we need."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return code == sqlite3.SQLITE_BUSY if code is not None else "locked" in str(exc)


def enable_wal(conn, timeout_s):
    """Switch the database to WAL mode (persistent) and check that it took.
    Switching needs a moment alone with the file, and SQLite does not apply
    the busy timeout to it: a process opening the database at the same
    moment (an overlapping restart, an export) gets "database is locked" at
    once.  So retry, with backoff, for as long as the busy timeout."""
    deadline = time.monotonic() + timeout_s
    pause = 0.002
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    if mode.lower() != "wal":
        raise sqlite3.OperationalError(f"cannot use WAL mode here (journal_mode stays {mode!r})")


def migrate(conn, schema_text, target=None):
    """Bring the database to `target` (default: the newest version), in one
    transaction that re-reads user_version after taking the write lock, so two
    processes starting together cannot both apply a section."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        for version, statements in schema_versions(schema_text):
            if current < version and (target is None or version <= target):
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)  # the error that matters is the one being raised
        raise


def rollback_quietly(conn):
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


# ---------------------------------------------------------------------------
# The writer: group commit, in a thread or in a process of its own
# ---------------------------------------------------------------------------

WRITER_SQL = {
    "health_probe": "INSERT OR REPLACE INTO health_probe (id, probed_at_us) VALUES (1, ?)",
}

# A write result younger than this stands for the database's health; past it,
# /healthz and the watchdog write a probe row instead.
HEALTH_FRESH_S = 1.0


class StoreUnavailable(Exception):
    """The database cannot take or give data right now; the client should retry."""


def no_database(path):
    """The error for a path that is no file here: missing, in a folder this
    user may not enter, or a directory (isfile() says False for each; only
    one is "missing")."""
    try:
        os.stat(path)
    except PermissionError:
        return StoreUnavailable(f"cannot read {path}: permission denied (run as its owner, or with sudo)")
    except OSError:
        return StoreUnavailable(f"no database at {path}")
    kind = "a directory" if os.path.isdir(path) else "not a regular file"
    return StoreUnavailable(f"cannot open the database {path}: it is {kind}")


WRITE_OPS = {}  # name -> function(*args, conn, received_at_us): what a writer process runs


def write_op(function):
    """Register a module function as a write that may be sent to the writer
    process, as functools.partial(function, *args) with JSON-able args."""
    WRITE_OPS[function.__name__] = function
    return function


def commit_batch(conn, ops):
    """Run each op(conn, received_at_us) in ONE write transaction (one fsync
    for all), then COMMIT.  -> [(True, result) or (False, exception)] in the
    order of `ops`, only once COMMIT returned.  The receive time is taken once
    the write lock is held, so receive times never go backwards in commit
    order.  When an op fails, the transaction is rolled back and each op gets
    a transaction of its own, so that one bad write cannot fail the others."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:  # locked past the busy timeout, or the disk is gone
        return [(False, exc)] * len(ops)
    try:
        received_at_us = now_us()
        results = [op(conn, received_at_us) for op in ops]
    except Exception as exc:
        rollback_quietly(conn)
        if len(ops) > 1:
            return [commit_batch(conn, [op])[0] for op in ops]
        return [(False, exc)]
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        rollback_quietly(conn)
        return [(False, exc)] * len(ops)
    return [(True, result) for result in results]


class Writer:
    """The one writer of the database: each write waits until the transaction
    holding it committed.  Writes that arrive while a transaction commits go
    together into the next one (group commit: one fsync for the lot).  The
    committing loop runs in a thread (WriterThread) or, for the server, in a
    process of its own (WriterProcess), so that it never waits for the web
    process's GIL.  Subclasses give _submit(op, timeout_s)."""

    def __init__(self, wait_timeout_s):
        self._wait_timeout_s = wait_timeout_s
        self._closed = False
        self.write_times = WriteTimes()
        # How the last write ended: (time.monotonic(), None or the error);
        # (None, None) before the first.
        self._last_outcome = (None, None)

    def run(self, op):
        """Run op(conn, received_at_us) in a write transaction; return its
        result once committed.  Raises StoreUnavailable if it was not, and
        what the op raised if that was not a database error (a bug)."""
        if self._closed:
            raise StoreUnavailable("the server is shutting down")
        started_ns = time.perf_counter_ns()
        ok, value = self._submit(op, self._wait_timeout_s)
        if ok:
            self._last_outcome = (time.monotonic(), None)
            self.write_times.add(time.perf_counter_ns() - started_ns)
            return value
        if isinstance(value, Exception) and not isinstance(value, sqlite3.Error):
            raise value
        # A database error, or why the writer did not answer (a str).
        self._last_outcome = (time.monotonic(), str(value))
        if isinstance(value, sqlite3.Error):
            raise StoreUnavailable(f"the database refused the write: {value}")
        raise StoreUnavailable(value)

    def write_problem(self):
        """None when a write commits now.  A write that ended less than
        HEALTH_FRESH_S ago answers for itself, so a busy server is never
        probed; otherwise a probe row is written (one small commit)."""
        ended_at, error = self._last_outcome
        if ended_at is not None and time.monotonic() - ended_at < HEALTH_FRESH_S:
            return None if error is None else f"the last write failed: {error}"
        try:
            self.run(write_health_probe)
        except StoreUnavailable as exc:
            return str(exc)
        return None


@write_op
def write_health_probe(conn, received_at_us):
    conn.execute(WRITER_SQL["health_probe"], (received_at_us,))


class _Pending:
    """One write waiting for its transaction (WriterThread)."""

    __slots__ = ("op", "done", "outcome")

    def __init__(self, op):
        self.op = op
        self.done = threading.Event()
        self.outcome = (False, "the database did not answer in time")  # until it does


class WriterThread(Writer):
    """The committing loop in a thread of this process: the server's on one
    CPU (see writer_for_the_cpus), and the tests' (they set the clock in
    this process)."""

    def __init__(self, path, busy_timeout_ms, wait_timeout_s):
        super().__init__(wait_timeout_s)
        self._conn = connect(path, busy_timeout_ms)
        self._queue = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="spp-writer", daemon=True)
        self._thread.start()

    def _submit(self, op, timeout_s):
        pending = _Pending(op)
        with self._cond:
            if self._closed:
                return False, "the server is shutting down"
            self._queue.append(pending)
            self._cond.notify()
        pending.done.wait(timeout_s)
        return pending.outcome

    def _loop(self):
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                batch, self._queue = self._queue, []
            if not batch:  # closed, and nothing left to write
                break
            for pending, outcome in zip(batch, commit_batch(self._conn, [p.op for p in batch])):
                pending.outcome = outcome
                pending.done.set()
        self._conn.close()

    def close(self):
        """Let the writes already queued commit, then close the connection."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def alive(self):
        return self._thread.is_alive()

    def loss(self):
        """Why alive() is false."""
        return "the writer thread stopped"

    def exit_status(self):
        return None


class InlineWriter(Writer):
    """The commands' writer: commits in the calling thread.  A command has no
    HTTP client waiting, so it waits for its own write however long that
    takes, and what it reports is what happened: a write given up on after a
    deadline could still commit after the command said it failed."""

    def __init__(self, path, busy_timeout_ms):
        super().__init__(None)
        self._conn = connect(path, busy_timeout_ms)

    def _submit(self, op, timeout_s):
        return commit_batch(self._conn, [op])[0]

    def close(self):
        if not self._closed:
            self._closed = True
            self._conn.close()

    def alive(self):
        return not self._closed

    def exit_status(self):
        return None


# Messages between the web process and its writer process: a 4-byte length,
# then JSON.  A request names a write function registered with write_op and
# gives its arguments (bytes as {"bytes": base64}); so nothing a channel
# carries can make the writer run anything else.  A reply is [true, result]
# or [false, error]: the error's class name and message, and for a database
# error its SQLite code, so that a busy database stays distinguishable.
FRAME = struct.Struct("!I")
# A body escaped as JSON (at most 6 bytes per byte) and its parsed fields.
MAX_FRAME_BYTES = 8 * MAX_BODY_BYTES


def encode_request(op):
    """A registered write op (a function or a partial of one) -> a frame's payload."""
    function, args = getattr(op, "func", op), getattr(op, "args", ())
    if WRITE_OPS.get(getattr(function, "__name__", None)) is not function or getattr(
            op, "keywords", None):
        raise TypeError(f"{op!r} is not a write op the writer process knows (see write_op)")
    args = [{"bytes": base64.b64encode(a).decode()} if isinstance(a, bytes) else a for a in args]
    return json.dumps([function.__name__, args]).encode()


def decode_request(data):
    """A frame's payload -> the write op it names.  ValueError if it is not
    exactly a request for a registered op."""
    try:
        name, args = json.loads(data)
        args = [base64.b64decode(a["bytes"], validate=True) if isinstance(a, dict) else a
                for a in args]
        return functools.partial(WRITE_OPS[name], *args)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # RecursionError: too deep
        raise ValueError(f"not a write request: {type(exc).__name__}: {exc}") from None


def encode_reply(ok, value):
    if not ok:
        value = {"error": type(value).__name__, "message": str(value),
                 "database": isinstance(value, sqlite3.Error),
                 "code": getattr(value, "sqlite_errorcode", None)}
    return json.dumps([ok, value]).encode()


def decode_reply(data):
    """-> (True, result) or (False, exception): a database error as the
    sqlite3 class it was (with its SQLite code), any other as RuntimeError."""
    common = COMMON_REPLIES.get(data)
    if common:
        return common
    ok, value = json.loads(data)
    if ok:
        return True, value
    if not value["database"]:
        return False, RuntimeError(f"{value['error']}: {value['message']}")
    kind = getattr(sqlite3, value["error"], None)
    if not (isinstance(kind, type) and issubclass(kind, sqlite3.Error)):
        kind = sqlite3.Error
    error = kind(value["message"])
    error.sqlite_errorcode = value["code"]
    return False, error


# Every postback's reply, decoded without a JSON parse (a microsecond each).
COMMON_REPLIES = {encode_reply(True, outcome): (True, outcome)
                  for outcome in ("recorded", "duplicate", "conflict", None)}


def send_frame(sock, data):
    sock.sendall(FRAME.pack(len(data)) + data)


def receive_exactly(sock, size):
    """`size` bytes, or None if the other end closed first."""
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            return None
        data += more
    return data


def receive_frame(sock):
    """The next frame's payload, or None when the other end has closed.
    ValueError for a length no frame of ours has (what is not a frame)."""
    header = receive_exactly(sock, FRAME.size)
    if header is None:
        return None
    [size] = FRAME.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {size} bytes announced")
    return receive_exactly(sock, size)


def descriptors_to_release(open_fds, keep):
    """What a forked writer process lets go of: all but stdio and `keep`."""
    return sorted(set(open_fds) - set(keep) - {0, 1, 2})


def release_inherited_descriptors(keep):
    """Let go of every descriptor the forked writer process inherited and does
    not use: systemd's listening socket, the web process's ends of the
    channels, its files.  Each is pointed at /dev/null rather than closed, so
    that its number is never reused: a Python object of the web process that
    still names it cannot close one of ours."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError as exc:  # no /proc: not worth failing the start over
        log.warning("the writer process keeps its inherited descriptors: %s", exc)
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in descriptors_to_release(open_fds, {*keep, devnull}):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)


class WriterProcess(Writer):
    """The committing loop in a child process, for the server: the web
    process only hands each write over a socket (a channel) and waits on it
    with its GIL released.  One channel per concurrent writer (the request
    threads and the watchdog), taken from a pool.  A channel whose write
    timed out or failed may hold part of a frame: it is never reused, but
    closed and replaced by a new one, sent to the writer over a control socket.

    The child is forked, not started afresh: it shares the parent's memory
    pages (about 20 MB less than a new interpreter).  Fork before this
    process opens any other connection to the same database (SQLite keeps
    per-process lock state that a child must not inherit); Store does."""

    def __init__(self, path, busy_timeout_ms, wait_timeout_s, channels):
        super().__init__(wait_timeout_s)
        pairs = [socket.socketpair() for _ in range(channels)]
        self._control, control_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the writer process
            code = 1
            try:
                ends = [child for _, child in pairs]
                release_inherited_descriptors({s.fileno() for s in [*ends, control_end]})
                code = run_writer(path, busy_timeout_ms, ends, control_end)
            finally:
                os._exit(code)
        for _, child in pairs:
            child.close()
        control_end.close()
        self.pid = pid
        self._exit_status = None
        self._lock = threading.Lock()  # for _sockets and _control
        self._sockets = {own for own, _ in pairs}  # every open channel: pooled or in use
        self._channels = queue.LifoQueue()  # the warmest channel first
        for own, _ in pairs:
            self._channels.put(own)

    def _submit(self, op, timeout_s):
        request = encode_request(op)
        if not self._sockets:
            return False, "no channel to the writer process is left"
        deadline = time.monotonic() + timeout_s
        try:
            sock = self._channels.get(timeout=timeout_s)
        except queue.Empty:
            return False, "the database did not answer in time"
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            send_frame(sock, request)
            reply = receive_frame(sock)
            if reply is None:
                raise ConnectionError("the writer process has stopped or dropped the channel")
            outcome = decode_reply(reply)
        except socket.timeout:
            self._retire(sock)
            return False, "the database did not answer in time"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._retire(sock)
            return False, f"the writer process cannot be reached: {exc}"
        self._channels.put(sock)
        return outcome

    def _retire(self, sock):
        """Close a channel that may hold part of a frame and put a new one in
        its place; when the writer cannot take one, the pool shrinks (and
        alive() turns false once it is empty, so that the server restarts)."""
        sock.close()
        with self._lock:
            self._sockets.discard(sock)
            if self._closed:
                return
            try:
                own, theirs = socket.socketpair()
            except OSError as exc:
                problem = exc
            else:
                try:
                    socket.send_fds(self._control, [b"+"], [theirs.fileno()])
                except OSError as exc:
                    own.close()
                    problem = exc
                else:
                    self._sockets.add(own)
                    self._channels.put(own)
                    return
                finally:
                    theirs.close()
            log.error("cannot give the writer process a new channel (%s): %d left",
                      problem, len(self._sockets))

    def alive(self):
        return bool(self._sockets) and self._reap(os.WNOHANG)

    def loss(self):
        """Why alive() is false."""
        if self._exit_status is not None:
            return f"the writer process exited (status {self._exit_status})"
        return "no channel to the writer process is left"

    def exit_status(self):
        return self._exit_status

    def _reap(self, flags):
        """Whether the child still runs (collecting its exit status if not)."""
        if self._exit_status is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid == self.pid:
                self._exit_status = os.waitstatus_to_exitcode(status)
        return self._exit_status is None

    def close(self):
        """Wait for the writes in progress (as long as one may take), then end
        the writer process: it commits what it holds, then exits; past the
        same wait again, it is killed.  So close() takes at most twice the
        wait timeout (worst_case_stop_s counts on it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + self._wait_timeout_s
        taken = 0
        while taken < len(self._sockets) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):  # looks again at the count: one may retire
                self._channels.get(timeout=min(0.1, max(0, deadline - time.monotonic())))
                taken += 1
        with self._lock:
            for sock in [*self._sockets, self._control]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a request still waiting on it
                sock.close()
        deadline = time.monotonic() + self._wait_timeout_s
        while self._reap(os.WNOHANG) and time.monotonic() < deadline:
            time.sleep(0.01)  # it commits what it holds, then exits
        if self._exit_status is None:
            log.error("the writer process did not stop; killing it")
            os.kill(self.pid, signal.SIGKILL)
            self._reap(0)


def run_writer(path, busy_timeout_ms, channels, control=None):
    """The writer process: commits what arrives on `channels` (see
    WriterProcess) until every one of them is closed.  SIGTERM and SIGINT are
    for the web process (systemd and a terminal send them to the whole group):
    it drains its requests, then closes the sockets, and this process stops
    after its last commit.  -> exit status."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conn = connect(path, busy_timeout_ms)
        try:
            write_loop(conn, channels, control)
        finally:
            conn.close()
    except Exception:
        log.exception("the writer process failed")
        return 1
    return 0


def receive_channels(control):
    """The channels sent over `control` (a SOCK_SEQPACKET socket), or None once it has closed."""
    message, fds, _, _ = socket.recv_fds(control, 1, 4)
    if not message:
        for fd in fds:
            os.close(fd)
        return None
    return [socket.socket(fileno=fd) for fd in fds]


def write_loop(conn, channels, control=None):
    """Commit, as one transaction, every write waiting on `channels` (one
    per channel at most), answer each, and start again; until all of them and
    `control` (which brings new channels) are closed.  A channel that sends
    what is not a write request is closed; the others go on."""
    poller = select.poll()
    open_sockets = {}

    def watch(sock):
        poller.register(sock, select.POLLIN)
        open_sockets[sock.fileno()] = sock

    def drop(sock):
        poller.unregister(sock)
        del open_sockets[sock.fileno()]
        sock.close()

    for sock in [*channels, *([control] if control else [])]:
        watch(sock)
    while open_sockets:
        batch = []
        for fd, _ in poller.poll():
            sock = open_sockets[fd]
            if sock is control:
                new = receive_channels(control)
                for channel in new or ():
                    watch(channel)
                if new is None:
                    drop(control)
                continue
            try:
                data = receive_frame(sock)
                if data is not None:
                    batch.append((sock, decode_request(data)))
                    continue
            except (OSError, ValueError) as exc:
                log.error("the writer process dropped a channel: %s", exc)
            drop(sock)  # the web process closed it, is gone, or sent what is not a request
        if batch:
            answer(batch, commit_batch(conn, [op for _, op in batch]))


def answer(batch, outcomes):
    """Send each write of `batch` its outcome."""
    for (sock, _), (ok, value) in zip(batch, outcomes):
        if not ok and not isinstance(value, sqlite3.Error):
            log.error("a write failed", exc_info=value)
        try:
            reply = encode_reply(ok, value)
        except (TypeError, ValueError) as exc:  # a result JSON cannot hold: a bug, say so
            log.error("a write's result cannot be sent: %s", exc)
            reply = encode_reply(False, exc)
        try:
            send_frame(sock, reply)
        except OSError:
            pass  # its request timed out, and the web process closed the channel


# ---------------------------------------------------------------------------
# The store: reads, write ops, earnings and totals
# ---------------------------------------------------------------------------

# What every earnings and totals query sums.  Revenue is summed as whole USD
# and nano remainder so that SUM cannot overflow 64 bits however many
# sessions there are; Python joins the two exactly.
SQL_SUMS = """count(*), coalesce(sum(ads_viewed), 0), coalesce(sum(duration_s), 0),
    coalesce(sum(revenue_nano / 1000000000), 0), coalesce(sum(revenue_nano % 1000000000), 0),
    min(received_at_us), max(received_at_us)"""
SQL_WINDOW = """received_at_us >= :since AND received_at_us < :until
    AND (:property IS NULL OR property_id = :property)"""
# The user id docs/deploy.md's check posts: its session is kept (a 200 is a
# promise) but no report or payout counts it.  /users/deploy-check/earnings
# still shows it, which is how the check is read.
DEPLOY_CHECK_USER = "deploy-check"
SQL_REPORTED = f"user_id <> '{DEPLOY_CHECK_USER}'"
# Users the ledger cannot credit: sessions without a sub ('') and the deploy
# check's.  Runs pay them nothing and print no line for them; settlement
# gives their share of a booked figure to the publisher's margin.
UNCREDITED_USERS = ("", DEPLOY_CHECK_USER)
SQL_UNCREDITED = "(" + ", ".join(f"'{user}'" for user in UNCREDITED_USERS) + ")"


STORE_SQL = {
    "insert_session": """
        INSERT OR IGNORE INTO sessions
            (session_id, user_id, property_id, country, ads_viewed, duration_s,
             revenue_nano, received_at_us, raw_body)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
    "stored_session": """
        SELECT user_id, property_id, country, ads_viewed, duration_s, revenue_nano, raw_body
        FROM sessions WHERE session_id = ?""",
    "insert_conflict": """
        INSERT INTO conflicts (session_id, received_at_us, stored_body, new_body)
        VALUES (?, ?, ?, ?)""",
    "insert_rejected": """
        INSERT INTO rejected (received_at_us, field, reason, raw_body) VALUES (?, ?, ?, ?)""",
    "user_earnings": f"""
        SELECT {SQL_SUMS} FROM sessions
        WHERE user_id = :user AND {SQL_WINDOW}""",
    "earnings_by_user": f"""
        SELECT user_id, {SQL_SUMS} FROM sessions INDEXED BY sessions_by_time
        WHERE {SQL_WINDOW} AND {SQL_REPORTED}
        GROUP BY user_id ORDER BY user_id""",
    # A template for totals_sql(); {keys} is a choice of TOTALS_GROUPS, never
    # text from a request.
    "totals": """
        SELECT {keys}{sums} FROM sessions INDEXED BY sessions_by_time
        WHERE {window} {group_by}""",
    # Keyset pagination, newest first: stable while sessions arrive.
    "user_sessions": """
        SELECT session_id, country, ads_viewed, revenue_nano, duration_s, property_id,
               received_at_us, id
        FROM sessions
        WHERE user_id = :user AND (received_at_us, id) < (:before_at, :before_id)
        ORDER BY received_at_us DESC, id DESC LIMIT :limit""",
}

TOTALS_GROUPS = {
    "day": "strftime('%Y-%m-%d', received_at_us / 1000000, 'unixepoch')",
    "property-id": "property_id",
    "country": "country",
}


def totals_sql(groups):
    keys = [TOTALS_GROUPS[group] for group in groups]
    return STORE_SQL["totals"].format(
        keys="".join(f"{key}, " for key in keys),
        sums=SQL_SUMS,
        window=f"{SQL_WINDOW} AND {SQL_REPORTED}",
        group_by=f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else "",
    )


class Reads:
    """Read queries, on the connection self._reader() gives."""

    def read(self, sql, params=()):
        """All rows of one read-only query (StoreUnavailable if the database cannot answer)."""
        try:
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the database cannot be read: {exc}") from exc

    @contextlib.contextmanager
    def snapshot(self):
        """A read transaction: every query on the connection it yields sees
        the same committed state (the ledger computes a step on one)."""
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            yield conn
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the database cannot be read: {exc}") from exc
        finally:
            rollback_quietly(conn)

    def stream(self, sql, params=()):
        """Rows of one read-only query, one at a time: memory does not grow
        with the result.  The first row is fetched at once, so that a database
        that cannot answer raises StoreUnavailable before any output; a later
        failure raises sqlite3.Error from the iteration."""
        try:
            cursor = self._reader().execute(sql, params)
            first = cursor.fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the database cannot be read: {exc}") from exc
        if first is None:
            return iter(())
        return itertools.chain([first], cursor)


def write_wait_s(busy_timeout_ms):
    """How long a write is waited for: a transaction waits for SQLite's lock
    at most the busy timeout; so a write answers within about that, or is a 503."""
    return busy_timeout_ms / 1000 + 1


def writer_for_the_cpus():
    """The server's writer ("auto"): a process of its own where two CPUs or
    more are allowed (it commits beside the web process, see keep_to_cpus);
    on one, a thread of the web process, which spares every write a blocking
    hand-off between two processes taking turns on that CPU
    (docs/performance.md)."""
    if len(os.sched_getaffinity(0)) >= 2:
        return "process"
    log.info("one CPU allowed: writes commit in a thread of the web process")
    return "thread"


# Store(writer=...): which Writer commits.  "auto" (the server's) is decided
# when the store opens: WriterProcess or WriterThread (writer_for_the_cpus);
# "thread" for tests, which set the clock in this process; "command", for the
# commands (import-booked, prune, pay...): InlineWriter, and the database is
# never created (only the server does that).
WRITERS = ("auto", "process", "thread", "command")


class Store(Reads):
    """The database: one writer (see Writer and WRITERS), one read connection per thread."""

    def __init__(self, path, busy_timeout_ms=DEFAULTS["busy_timeout_ms"],
                 writer=DEFAULTS["writer"], channels=1):
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {', '.join(WRITERS)}, not {writer!r}")
        if writer == "auto":
            writer = writer_for_the_cpus()
        command = writer == "command"
        self.path = str(path)
        self._busy_timeout_ms = busy_timeout_ms
        if command and not os.path.isfile(self.path):
            raise no_database(self.path)
        if not command:
            ensure_private_file(self.path)
        try:
            conn = connect(self.path, busy_timeout_ms)
        except sqlite3.DatabaseError as exc:
            raise not_sqlite_or(exc, self.path) from None
        try:
            version = database_version(conn, self.path)
            # An empty file is a new database to the server: the one it may
            # have left itself, stopped between creating the file and the schema.
            if version == 0 and command:
                raise StoreUnavailable(
                    f"{self.path} is not an spp-receiver database: it is empty (this code's "
                    f"schema is version {latest_schema_version()}); only the server creates one")
            enable_wal(conn, busy_timeout_ms / 1000)
            if version < latest_schema_version():  # so that a current one opens without the write lock
                migrate(conn, SCHEMA_PATH.read_text(encoding="utf-8"))
        finally:
            conn.close()
        wait_timeout_s = write_wait_s(busy_timeout_ms)
        if command:
            self.writer = InlineWriter(self.path, busy_timeout_ms)
        elif writer == "process":
            self.writer = WriterProcess(self.path, busy_timeout_ms, wait_timeout_s, channels)
        else:
            self.writer = WriterThread(self.path, busy_timeout_ms, wait_timeout_s)
        self._local = threading.local()
        self._readers = []
        self._readers_lock = threading.Lock()

    def write(self, op):
        return self.writer.run(op)

    def _reader(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self._busy_timeout_ms)
            conn.execute("PRAGMA query_only = ON")
            with self._readers_lock:
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    def health_problem(self):
        """None when the database answers a read and commits a write now (see
        Writer.write_problem), whatever happened to earlier postbacks."""
        try:
            self.read(STORAGE_SQL["schema_version"])
        except StoreUnavailable as exc:
            return str(exc)
        return self.writer.write_problem()

    def check_unchanged(self):
        """A Store reads the live database, never an immutable copy: nothing to check
        (see ReadOnlyStore.check_unchanged)."""

    def close(self):
        self.writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()


class ReadOnlyStore(Reads):
    """A database opened only to read, for the commands that print reports:
    never created, migrated or written, so it works on a backup, a replica or
    a file this user may read but not write.  Raises StoreUnavailable with a
    one-line reason when the file cannot serve as this code's database.

    How it reads: SQLite's read-only WAL access (mode=ro) needs a -shm file
    beside the database and creates it, with a -wal, when none is there: it
    fails in a directory this user cannot write, and elsewhere leaves the
    two files owned by the reader (which the server's user may then be
    unable to open).  So when the file alone holds every committed
    transaction (no -wal with frames, no rollback -journal: a backup, or a
    database no process has open) it is read with immutable=1, which
    creates, locks and changes nothing; check_unchanged() then catches a
    server that started on it and checkpointed into the file meanwhile.
    Otherwise (a live database: the server's -wal and -shm are there) it
    joins the server's WAL with mode=ro, which creates nothing while both exist."""

    def __init__(self, path, oldest=None):
        self.path = str(path)
        self._oldest = oldest  # the oldest schema version accepted; None: this code's
        if not os.path.isfile(self.path):
            raise no_database(self.path)
        if not os.access(self.path, os.R_OK):
            raise StoreUnavailable(
                f"cannot read {self.path}: permission denied (run as its owner, or with sudo)")
        self._identity = self._file_identity() if self._whole_in_file() else None
        try:
            self._conn = self._open(immutable=self._identity is not None)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read {self.path}: {exc}{self._wal_hint()}") from None
        try:
            self._check_version()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreUnavailable(f"cannot read {self.path}: {exc}{self._wal_hint()}") from None
        except BaseException:
            self._conn.close()
            raise

    def _whole_in_file(self):
        wal = self.path + "-wal"
        return not os.path.exists(self.path + "-journal") and (
            not os.path.exists(wal) or os.path.getsize(wal) == 0)

    def _file_identity(self):
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _wal_hint(self):
        if self._identity is not None:
            return ""
        return (f" (its -wal holds transactions not yet in the file, and reading them needs "
                f"a -shm file beside it that this user can write: read it as its owner)")

    def _open(self, immutable):
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(uri + ("&immutable=1" if immutable else ""), uri=True,
                               isolation_level=None, timeout=DEFAULTS["busy_timeout_ms"] / 1000)
        conn.execute(f"PRAGMA busy_timeout = {DEFAULTS['busy_timeout_ms']}")
        return conn

    def _check_version(self):
        found = self.version = database_version(self._conn, self.path)
        latest = latest_schema_version()
        if found == 0:
            raise StoreUnavailable(
                f"{self.path} is not an spp-receiver database: it is empty "
                f"(this code's schema is version {latest})")
        if found < (self._oldest or latest):
            raise StoreUnavailable(
                f"{self.path} has schema version {found}, older than this code's {latest}: "
                "start the server on it once to upgrade it (reports never change a database)"
            )

    def check_unchanged(self):
        """StoreUnavailable if the file read with immutable=1 changed while it
        was read (a server started on it and checkpointed): what was read
        may mix old and new pages."""
        if self._identity is not None and self._file_identity() != self._identity:
            raise StoreUnavailable(
                f"{self.path} changed while it was read (a server started on it?): run it again")

    def _reader(self):
        return self._conn

    def close(self):
        self._conn.close()


# Write ops are op(conn, received_at_us) -> result.  Those the server sends
# to its writer process are functions registered with write_op, bound to
# JSON-able arguments with functools.partial (see encode_request).


def record_session(session, raw_body):
    """The write op for one valid postback: 'recorded', 'duplicate' or 'conflict'."""
    return functools.partial(insert_session, session.columns(), raw_body)


@write_op
def insert_session(columns, raw_body, conn, received_at_us):
    inserted = conn.execute(STORE_SQL["insert_session"], (*columns, received_at_us, raw_body)).rowcount
    if inserted:
        return "recorded"
    session_id = columns[0]
    *stored_columns, stored_body = conn.execute(STORE_SQL["stored_session"], (session_id,)).fetchone()
    if tuple(stored_columns) == tuple(columns[1:]):  # a list when it came as JSON
        return "duplicate"
    conn.execute(STORE_SQL["insert_conflict"], (session_id, received_at_us, stored_body, raw_body))
    return "conflict"


def record_rejected(field, reason, raw_body):
    return functools.partial(insert_rejected, field, reason, raw_body)


@write_op
def insert_rejected(field, reason, raw_body, conn, received_at_us):
    conn.execute(STORE_SQL["insert_rejected"], (received_at_us, field, reason, raw_body))


def insert_rows(sql, rows, conn, _):
    conn.executemany(sql, rows)


SUM_FIELDS = ["sessions", "ads-viewed", "session-duration", "estimated-revenue"]


def earnings_columns(share):
    """The fields of one earnings record, in order (also the CSV header)."""
    return [
        "user-id", *SUM_FIELDS,
        *(["rewardable-revenue"] if share is not None else []),
        "first-received-at", "last-received-at", "since", "until",
    ]


def sums_record(sums):
    """The SQL_SUMS columns -> (SUM_FIELDS as a dict, revenue in nanos, first, last)."""
    count, ads, duration, whole_usd, nano_rest, first, last = sums
    nanos = whole_usd * NANOS_PER_USD + nano_rest
    fields = dict(zip(SUM_FIELDS, (count, ads, duration, nanos_to_usd(nanos))))
    return fields, nanos, first, last


def earnings_record(user_id, sums, texts, share):
    """One user's record; texts: the window's (since, until) from window_texts()."""
    fields, nanos, first, last = sums_record(sums)
    record = {"user-id": user_id, **fields}
    if share is not None:
        record["rewardable-revenue"] = nanos_to_usd(rewardable_nanos(nanos, share))
    record["first-received-at"] = iso_utc(first)
    record["last-received-at"] = iso_utc(last)
    record["since"], record["until"] = texts
    return record


def window_texts(window):
    return iso_utc(window.since), iso_utc(window.until)


def user_earnings(store, user_id, window=Window(), property_id=None, share=None):
    [sums] = store.read(STORE_SQL["user_earnings"], {"user": user_id, **window.params(property_id)})
    return earnings_record(user_id, sums, window_texts(window), share)


def earnings_export(rows, window, share, fmt):
    """(user_id, *SQL_SUMS) rows -> the payout export as chunks of bytes."""
    texts = window_texts(window)
    records = (earnings_record(row[0], row[1:], texts, share) for row in rows)
    return in_chunks(encode_records(records, earnings_columns(share), fmt))


def export_earnings(store, window, property_id, share, fmt):
    """The payout export: one record per user with sessions in the window,
    ordered by user-id, streamed.  Shared by GET /earnings and `export`."""
    rows = store.stream(STORE_SQL["earnings_by_user"], window.params(property_id))
    return earnings_export(rows, window, share, fmt)


def totals(store, window, groups):
    return [
        {**dict(zip(groups, row[: len(groups)])), **sums_record(row[len(groups):])[0]}
        for row in store.read(totals_sql(groups), window.params())
    ]


def user_sessions(store, user_id, limit, before):
    """One page of a user's sessions, newest first, and the cursor of the next page."""
    before_at, before_id = before or (2**63 - 1, 2**63 - 1)
    rows = store.read(
        STORE_SQL["user_sessions"],
        {"user": user_id, "before_at": before_at, "before_id": before_id, "limit": limit + 1},
    )
    sessions = [session_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return sessions, encode_cursor(rows[limit - 1][6], rows[limit - 1][7]) if more else None


# ---------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------

EXPORT_FORMATS = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


NDJSON_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps's output, without its set-up per call


ENCODE_BATCH_RECORDS = 256  # records encoded per piece: a ledger step prints a million


def encode_records(records, columns, fmt):
    """Records -> pieces of bytes, whole lines each: NDJSON, or CSV with a
    header row (RFC 4180: CRLF, and quotes around any field with a comma,
    quote or line break)."""
    records = iter(records)
    if fmt == "ndjson":
        encode = NDJSON_ENCODER.encode
        while batch := list(itertools.islice(records, ENCODE_BATCH_RECORDS)):
            yield "".join([encode(record) + "\n" for record in batch]).encode("utf-8")
        return
    yield from encode_csv((["" if (value := record[c]) is None else value for c in columns]
                           for record in records), columns)


def encode_csv(rows, columns):
    """Rows of values in the order of `columns` -> pieces of CSV bytes, the
    header row first (see encode_records)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    rows = itertools.chain([columns], rows)
    while batch := list(itertools.islice(rows, ENCODE_BATCH_RECORDS)):
        writer.writerows(batch)
        yield buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()


def encode_values(rows, columns, fmt):
    """Like encode_records, from rows of values in the order of `columns`
    (never None): no dict per row for CSV, the ledger's million lines."""
    if fmt == "ndjson":
        return encode_records((dict(zip(columns, row)) for row in rows), columns, fmt)
    return encode_csv(rows, columns)


def in_chunks(lines, size=64 * 1024):
    """Join small pieces into writes of about `size` bytes."""
    chunk = []
    length = 0
    for line in lines:
        chunk.append(line)
        length += len(line)
        if length >= size:
            yield b"".join(chunk)
            chunk, length = [], 0
    if chunk:
        yield b"".join(chunk)


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------
# Reads for the API: sessions, the change feed, stats, metrics, export
# ---------------------------------------------------------------------------

FEED_SQL = {
    # The change feed: every session in commit order.  Rows are only ever
    # added, one write transaction at a time, each taking the next id, so id
    # order is commit order and a reader never sees a later id before an
    # earlier one.  A new id is max(id) + 1: nothing deletes a session (prune
    # clears bodies only), so none is reused, but after a restore from a
    # backup new sessions take ids that consumers have passed: feed cursors
    # carry a fingerprint of their session (see feed_position).
    "session_feed": """
        SELECT session_id, country, ads_viewed, revenue_nano, duration_s, property_id,
               received_at_us, id, user_id
        FROM sessions WHERE id > :after ORDER BY id LIMIT :limit""",
    "feed_cursor_row": """
        SELECT (SELECT session_id FROM sessions WHERE id = :id),
               (SELECT coalesce(max(id), 0) FROM sessions)""",
    # For /metrics: the estimated revenue of the sessions after an id (the
    # total grows by the new ones only), the ledger's last steps and its days.
    # Split like SQL_SUMS: every session ever stored is in the first sum.
    "revenue_after": """
        SELECT max(id), coalesce(sum(revenue_nano / 1000000000), 0),
               coalesce(sum(revenue_nano % 1000000000), 0) FROM sessions WHERE id > ?""",
    # The first sum: the narrow covering index, not the rows with their raw bodies.
    "revenue_all": """
        SELECT max(id), coalesce(sum(revenue_nano / 1000000000), 0),
               coalesce(sum(revenue_nano % 1000000000), 0) FROM sessions""",
    "last_session_id": "SELECT coalesce(max(id), 0) FROM sessions",
    "stats": """
        SELECT (SELECT count(*) FROM sessions), (SELECT max(received_at_us) FROM sessions),
               (SELECT count(*) FROM rejected), (SELECT count(*) FROM conflicts)""",
    # Newest first; the web view pages them by receive time (:before).
    "newest_rejected": """
        SELECT id, received_at_us, field, reason, raw_body
        FROM rejected WHERE received_at_us < :before ORDER BY id DESC LIMIT :limit""",
    "newest_conflicts": """
        SELECT id, session_id, received_at_us, stored_body, new_body
        FROM conflicts WHERE received_at_us < :before ORDER BY id DESC LIMIT :limit""",
}


def session_record(row):
    """A session row (the columns of STORE_SQL['user_sessions']) -> its JSON fields."""
    session_id, country, ads, nanos, duration, property_id, received, *_ = row
    return {
        "session-id": session_id,
        "country": country,
        "count-of-ads-viewed": ads,
        "your-estimated-revenue": nanos_to_usd(nanos),
        "session-duration": duration,
        "property-id": property_id,
        "received-at": iso_utc(received),
    }


FEED_COLUMNS = ["cursor", "user-id", "session-id", "country", "count-of-ads-viewed",
                "your-estimated-revenue", "session-duration", "property-id", "received-at"]


def feed_record(row):
    """A FEED_SQL['session_feed'] row -> its record, cursor first."""
    return {"cursor": feed_cursor(row[7], row[0]), "user-id": row[8], **session_record(row)}


def feed_cursor(row_id, session_id):
    """'<row id>-<fingerprint of the session-id>': the fingerprint tells a
    cursor from another database, or from before a restore (when new
    sessions take the ids of the lost ones), from one of this database."""
    return f"{row_id}-{session_fingerprint(session_id)}"


def session_fingerprint(session_id):
    """8 hex digits: enough to tell sessions apart by accident (a cursor is
    no secret: it only names a position the reader may read anyway), and a
    tenth of the cost of a cryptographic hash on the streamed feed."""
    return format(zlib.crc32(session_id.encode("utf-8")), "08x")


FEED_CURSOR = re.compile(r"([0-9]{1,19})(?:-([0-9a-f]{8}))?")


def decode_feed_cursor(text):
    """A feed cursor -> (row id, fingerprint).  A plain row id (what older
    versions gave out) has no fingerprint: None."""
    match = FEED_CURSOR.fullmatch(text)
    if not match or int(match.group(1)) >= 2**63:
        raise Invalid("after", "is not a cursor this server gave out")
    return int(match.group(1)), match.group(2)


class CursorGone(Exception):
    """A feed cursor that this database cannot continue from: answered 410."""


RESUME_HINT = ("the database was restored from a backup or replaced since this cursor was "
               "given out, and sessions received since may reuse its position. Resume from a "
               "cursor you kept from before the backup, or from after=0 skipping the "
               "session-ids you have already credited")


def feed_position(store, text):
    """(the row id after which the feed reads, the cursor to hand back when
    nothing follows it) for the cursor `text`.  CursorGone when it is beyond
    the newest session, or names a session this database does not hold at
    that position: either way, continuing would skip sessions silently."""
    row_id, fingerprint = decode_feed_cursor(text)
    [(session_id, newest)] = store.read(FEED_SQL["feed_cursor_row"], {"id": row_id})
    if row_id > newest:
        raise CursorGone(f"is beyond the newest session ({newest}): {RESUME_HINT}")
    if fingerprint is not None and (
            session_id is None or session_fingerprint(session_id) != fingerprint):
        raise CursorGone(f"names a session this database does not hold at {row_id}: "
                         f"{RESUME_HINT}")
    return row_id, text if session_id is None else feed_cursor(row_id, session_id)


def session_feed_page(store, cursor, limit):
    """Up to `limit` sessions committed after the cursor, oldest first, and
    the cursor to pass next (the one sent when there is nothing new yet)."""
    after, here = feed_position(store, cursor)
    records = [feed_record(row) for row in store.read(
        FEED_SQL["session_feed"], {"after": after, "limit": limit})]
    return records, records[-1]["cursor"] if records else here


def session_feed_stream(store, cursor):
    """Every session committed after the cursor, as NDJSON chunks, in constant
    memory (one read snapshot: sessions committed meanwhile come next time)."""
    after, _ = feed_position(store, cursor)
    rows = store.stream(FEED_SQL["session_feed"], {"after": after, "limit": -1})
    return in_chunks(encode_records((feed_record(row) for row in rows), FEED_COLUMNS, "ndjson"))


def cursor_numbers(text, how_many, field):
    """'12:34' -> [12, 34]: `how_many` non-negative integers that fit SQLite's
    64 bits, or Invalid naming `field` (a cursor this server did not give out)."""
    parts = text.split(":")
    if len(parts) != how_many or not all(
            re.fullmatch(r"[0-9]{1,19}", part) and int(part) < 2**63 for part in parts):
        raise Invalid(field, "is not a cursor this server gave out")
    return [int(part) for part in parts]


def encode_cursor(received_at_us, row_id):
    return base64.urlsafe_b64encode(f"{received_at_us}:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(text):
    """A cursor from encode_cursor -> (received_at_us, row_id)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raw = ""
    received_at_us, row_id = cursor_numbers(raw, 2, "before")
    return received_at_us, row_id


def age_s(us):
    """Whole seconds since the instant `us` (None stays None)."""
    return None if us is None else (now_us() - us) // 1_000_000


def stats(store, counters):
    sessions, last, rejected, conflicts = store.read(FEED_SQL["stats"])[0]
    return {
        "sessions": sessions,
        "rejected": rejected,
        "conflicts": conflicts,
        "last-received-at": iso_utc(last),
        "last-received-age-seconds": age_s(last),
        "since-start": counters.snapshot(),
    }


METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metric(name, kind, text, samples):
    """One metric family in the Prometheus text format: [(labels, value)]."""
    lines = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value}" for labels, value in samples]
    return lines


class RevenueTotal:
    """The estimated revenue of every stored session, as a counter: summed
    once, then only over the sessions stored since the last scrape.  Summed
    again from the start when the sessions went back (a restored backup)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last_id, self._nanos = 0, 0

    def nanos(self, store):
        with self._lock:
            if store.read(FEED_SQL["last_session_id"])[0][0] < self._last_id:
                self._last_id, self._nanos = 0, 0
            [(last_id, whole, nanos)] = (store.read(FEED_SQL["revenue_after"], (self._last_id,))
                                         if self._last_id else store.read(FEED_SQL["revenue_all"]))
            if last_id is not None:
                self._last_id, self._nanos = last_id, self._nanos + whole * NANOS_PER_USD + nanos
            return self._nanos


def seconds_text(us):
    """Microseconds since the epoch -> exact seconds, as Prometheus timestamps are."""
    return f"{us // 1_000_000}.{us % 1_000_000:06d}"


def prometheus_metrics(store, counters, revenue=None):
    """What /metrics answers: this process's counters and the database's state."""
    now = stats(store, counters)
    ledger = ledger_state(store)

    def instant(key):
        return [] if ledger[key] is None else [("", seconds_text(ledger[key]))]

    buckets, count, sum_ns = store.writer.write_times.snapshot()
    size = sum(os.path.getsize(path) for path in (store.path, store.path + "-wal")
               if os.path.exists(path))
    lines = [
        *metric("spp_postbacks_total", "counter",
                "Postbacks answered since this process started, by outcome.",
                [(f'{{outcome="{outcome}"}}', n) for outcome, n in now["since-start"].items()]),
        *metric("spp_sessions_stored", "gauge", "Sessions in the database.",
                [("", now["sessions"])]),
        *metric("spp_rejected_stored", "gauge", "Refused postbacks kept in the rejected table.",
                [("", now["rejected"])]),
        *metric("spp_conflicts_stored", "gauge",
                "Conflicting duplicates kept in the conflicts table.", [("", now["conflicts"])]),
        *metric("spp_last_postback_age_seconds", "gauge",
                "Seconds since the newest stored session was received (absent before the first).",
                [] if now["last-received-age-seconds"] is None
                else [("", now["last-received-age-seconds"])]),
        *metric("spp_write_duration_seconds", "histogram",
                "Time from handing each committed write to the writer until its COMMIT "
                "returned (waiting for the batch before included), this process.",
                [*((f'_bucket{{le="{billionths_text(bound)}"}}', n)
                   for bound, n in zip(WriteTimes.BOUNDS_NS, buckets)),
                 ('_bucket{le="+Inf"}', count), ("_sum", billionths_text(sum_ns)),
                 ("_count", count)]),
        *metric("spp_database_size_bytes", "gauge", "Size of the database file and its WAL.",
                [("", size)]),
        *metric("spp_estimated_revenue_usd_total", "counter",
                "Estimated revenue (your-estimated-revenue) of every stored session, in USD.",
                [("", nanos_to_usd((revenue or RevenueTotal()).nanos(store)))]),
        *metric("spp_ledger_last_run_timestamp_seconds", "gauge",
                "When the newest payout run was recorded (absent before the first).",
                instant("run_at")),
        *metric("spp_ledger_last_run_until_timestamp_seconds", "gauge",
                "The --until of the newest payout run: it paid the sessions received before.",
                instant("run_until")),
        *metric("spp_ledger_last_settlement_timestamp_seconds", "gauge",
                "When the newest settlement was recorded (absent before the first).",
                instant("settlement_at")),
        *metric("spp_ledger_last_settlement_until_timestamp_seconds", "gauge",
                "The end of the newest report day the newest settlement settled.",
                instant("settlement_until")),
        *metric("spp_ledger_oldest_unsettled_paid_day_timestamp_seconds", "gauge",
                "The start of the oldest report day paid in a run and in no settlement yet "
                "(absent when every paid day is settled).", instant("oldest_unsettled")),
        *metric("spp_ledger_pending_usd", "gauge",
                "Paid now in runs but not yet settled against booked revenue, in USD.",
                [("", ledger["pending"])]),
        *metric("spp_ledger_owed_usd", "gauge",
                "Carried balances not yet taken back from later runs, in USD.",
                [("", ledger["owed"])]),
    ]
    return "\n".join(lines) + "\n"


def newest_rejected(store, limit, before=2**63 - 1):
    return [
        {
            "id": row_id,
            "received-at": iso_utc(received),
            "field": field,
            "reason": reason,
            # The bytes as received, shown as text; bytes that are not UTF-8 as \xNN.
            "raw-body": bytes(raw).decode("utf-8", "backslashreplace"),
        }
        for row_id, received, field, reason, raw in store.read(
            FEED_SQL["newest_rejected"], {"limit": limit, "before": before})
    ]


def newest_conflicts(store, limit, before=2**63 - 1):
    return [
        {
            "id": row_id,
            "session-id": session_id,
            "received-at": iso_utc(received),
            "stored-body": stored,
            "new-body": new,
        }
        for row_id, session_id, received, stored, new in store.read(
            FEED_SQL["newest_conflicts"], {"limit": limit, "before": before}
        )
    ]


class WriteTimes:
    """A histogram of how long committed write transactions took, for
    /metrics: integer nanoseconds, no float anywhere."""

    # Upper bounds in nanoseconds: 0.5 ms .. 5 s.
    BOUNDS_NS = (500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
                 100_000_000, 250_000_000, 500_000_000, 1_000_000_000, 2_500_000_000,
                 5_000_000_000)

    def __init__(self):
        self._lock = threading.Lock()
        self._buckets = [0] * len(self.BOUNDS_NS)
        self._count = self._sum_ns = 0

    def add(self, ns):
        bucket = bisect.bisect_left(self.BOUNDS_NS, ns)  # the first bound >= ns
        with self._lock:
            self._count += 1
            self._sum_ns += ns
            if bucket < len(self._buckets):
                self._buckets[bucket] += 1

    def snapshot(self):
        """(cumulative counts per bound, count, sum in ns)."""
        with self._lock:
            return list(itertools.accumulate(self._buckets)), self._count, self._sum_ns


class PostbackCounters:
    """What this process has seen since it started, for /stats."""

    # rejected: a 400, kept in the `rejected` table; too-large: a 413, not kept;
    # unavailable: a 503 (the database could not take it); error: a 500 (a bug).
    OUTCOMES = ("recorded", "duplicate", "rejected", "too-large", "unauthorized",
                "unavailable", "error")

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.OUTCOMES, 0)

    def add(self, outcome):
        with self._lock:
            self._counts[outcome] += 1

    def snapshot(self):
        with self._lock:
            return dict(self._counts)


def build_export_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py export",
        description="Write the payout export (what GET /earnings answers) to stdout, "
        "reading the database directly; safe while the server runs. Exit status 1, "
        "with one line on stderr, when the database cannot be read to the end.",
    )
    add_shared_options(parser, environ, DB_HELP_REPORT)
    parser.add_argument("--since", required=True,
                        help=f"start of the window on receive times, included: {TIME_FORMS_HELP}")
    parser.add_argument("--until", required=True, help="end of the window, excluded; same forms")
    parser.add_argument("--property-id", help="only sessions of this property")
    parser.add_argument("--format", choices=list(EXPORT_FORMATS), default="ndjson",
                        help="ndjson (one JSON object per line) or csv (with a header row) "
                        "[default %(default)s]")
    return parser


def run_export(argv, environ, out):
    parser = build_export_parser(environ)
    args = parse_arguments(parser, argv)
    try:
        window = parse_window(args.since, args.until, required=True)
    except Invalid as invalid:
        parser.error(f"--{invalid.field}: {invalid.message}")
    return print_report(
        parser.prog, args.db, out,
        lambda store: export_earnings(store, window, args.property_id, args.reward_share,
                                      args.format),
    )


# ---------------------------------------------------------------------------
# Booked revenue: importing Gamezop's Ad Revenue Reports (import-booked)
# ---------------------------------------------------------------------------

BOOKED_SQL = {
    # What an import covers: a whole day, or a day's rows of one property.
    "properties_between": f"""
        SELECT coalesce(property_id, ''), count(*) FROM sessions INDEXED BY sessions_by_time
        WHERE received_at_us >= ? AND received_at_us < ? AND {SQL_REPORTED} GROUP BY 1""",
    "booked_of_day": """
        SELECT property_id, country, revenue_nano, imported_at_us, source_file
        FROM booked_revenue WHERE day = ?""",
    "booked_of_day_and_property": """
        SELECT property_id, country, revenue_nano, imported_at_us, source_file
        FROM booked_revenue WHERE day = ? AND property_id = ?""",
    # An import in steps (see import_booked): staged, switched, superseded cleared.
    "last_import": "SELECT coalesce(max(import_id), 0) FROM booked_current",
    "import_leftovers": """
        SELECT EXISTS (SELECT 1 FROM booked_rows WHERE import_id > ?)
            OR EXISTS (SELECT 1 FROM booked_superseded)""",
    "unfinished_import": """
        DELETE FROM booked_rows WHERE import_id = :id AND (day, property_id, country) IN (
            SELECT day, property_id, country FROM booked_rows WHERE import_id = :id LIMIT :n)""",
    "stage_booked": """
        INSERT INTO booked_rows
            (import_id, day, property_id, country, revenue_nano, imported_at_us, source_file)
        VALUES (?, ?, ?, ?, ?, ?, ?)""",
    "supersede_day": """
        INSERT OR IGNORE INTO booked_superseded
        SELECT import_id, day, property_id FROM booked_current WHERE day = ?""",
    "switch_day": "UPDATE booked_current SET import_id = ? WHERE day = ?",
    "supersede_scope": """
        INSERT OR IGNORE INTO booked_superseded
        SELECT import_id, day, property_id FROM booked_current WHERE day = ? AND property_id = ?""",
    "switch_scope": """
        INSERT INTO booked_current (day, property_id, import_id) VALUES (?, ?, ?)
        ON CONFLICT (day, property_id) DO UPDATE SET import_id = excluded.import_id""",
    "superseded_scopes": "SELECT import_id, day, property_id FROM booked_superseded LIMIT ?",
    "delete_superseded_rows": """
        DELETE FROM booked_rows WHERE import_id = ? AND day = ? AND property_id = ?""",
    "delete_superseded_scope": """
        DELETE FROM booked_superseded WHERE import_id = ? AND day = ? AND property_id = ?""",
    "booked_total": """
        SELECT coalesce(sum(revenue_nano / 1000000000), 0), coalesce(sum(revenue_nano % 1000000000), 0)
        FROM booked_revenue""",
}

REPORT_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class BookedFileError(Exception):
    """A report file that cannot be imported, with one line saying why."""


@dataclass(frozen=True, slots=True)  # a report holds millions: no __dict__ each
class BookedRow:
    day: str  # YYYY-MM-DD, a report day
    property_id: str  # '' when the report has no property-id
    country: str  # upper case; '' when the report has no country
    revenue_nano: int

    def key(self):
        return (self.day, self.property_id, self.country)


def report_day_number(text):
    """'2026-11-23' -> days since 1970-01-01 (ValueError unless a real date)."""
    if not isinstance(text, str) or not REPORT_DAY.fullmatch(text):
        raise ValueError(text)
    moment = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    return (moment - EPOCH).days


@functools.lru_cache(maxsize=4096)  # hot in a payout run: a part per user and day
def report_day_text(number):
    return (EPOCH + timedelta(days=number)).strftime("%Y-%m-%d")


# reconcile's window is [since, until) with since from 1970-01-01 and until at
# most 9999-12-31: a booked day must be in it to be seen at all.
LAST_REPORT_DAY = report_day_number("9999-12-31")


def column_key(name):
    """Header names and JSON keys alike: 'Property ID', 'property_id' -> 'property-id'."""
    return re.sub(r"[-_\s]+", "-", name.strip().lower())


def booked_columns(metric):
    """The keys a booked row is read from, by meaning."""
    return {"date": "date", "revenue": column_key(metric), "property-id": "property-id",
            "country": "country"}


def keyed_fields(where, names, values):
    """Names (a CSV header, a JSON row's keys) -> {column_key: value}; two names
    meaning the same column make the file ambiguous."""
    fields, seen = {}, {}
    for name, value in zip(names, values):
        key = column_key(name)
        if key in seen:
            raise BookedFileError(
                f"{where}: columns {shown(seen[key])} and {shown(name)} both mean {shown(key)}: "
                "which one is meant?")
        seen[key] = name
        fields[key] = value
    return fields


def csv_booked_records(text, columns):
    """(where, fields) for each row of a CSV report with a header row."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header, header_line, last_line = None, None, 0
    try:
        for values in reader:
            line, last_line = last_line + 1, reader.line_num  # a record may span lines
            if not any(value.strip() for value in values):
                continue
            if header is None:
                header, header_line = [value.strip() for value in values], line
                keys = keyed_fields(f"line {line}", header, header)
                for meaning in ("date", "revenue"):
                    if columns[meaning] not in keys:
                        raise BookedFileError(
                            f"line {line}: the header has no {columns[meaning]!r} column "
                            f"(it has: {', '.join(repr(h) for h in header)})")
                continue
            if len(values) != len(header):
                raise BookedFileError(
                    f"line {line}: {len(values)} fields, but the header "
                    f"(line {header_line}) has {len(header)}")
            yield f"line {line}", keyed_fields(
                f"line {line}", header, (value.strip() or None for value in values))
    except csv.Error as exc:
        raise BookedFileError(f"line {reader.line_num}: not readable as CSV: {exc}") from None
    if header is None:
        raise BookedFileError("holds no header row")


def json_booked_records(text):
    """(where, fields) for each row of an Ad Revenue Reports answer or a bare array."""
    try:
        report = parse_json(text)
    except ValueError as exc:
        raise BookedFileError(f"is not valid JSON: {exc}") from None
    repeated = repeated_key(report)
    if repeated:
        path, key = repeated
        raise BookedFileError(f"{json_path_text(path)}: the key {shown(key)} is given more than "
                              "once: which value is meant is ambiguous")
    if isinstance(report, list):
        path, rows = "", report
    else:
        data = report.get("data") if isinstance(report, dict) else None
        rows = data.get("ad_revenue") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            keys = f" (it has keys: {', '.join(map(str, report))})" if isinstance(report, dict) else ""
            raise BookedFileError(
                "is JSON but not a report: expected an object whose data.ad_revenue "
                f"is a list of rows, or a bare list of rows{keys}")
        path = "data.ad_revenue"
    for index, row in enumerate(rows):
        where = f"{path}[{index}]"
        if not isinstance(row, dict):
            raise BookedFileError(f"{where}: is not an object")
        yield where, keyed_fields(where, row, row.values())


def booked_row(where, fields, columns):
    """One report row -> BookedRow, or BookedFileError naming the row and field."""

    def refuse(field, message):
        raise BookedFileError(f"{where}, {field}: {message}")

    day = fields.get("date")
    if day is None:
        refuse("date", "is required")
    try:
        day_number = report_day_number(day)
    except ValueError:
        refuse("date", "must be a date written YYYY-MM-DD, such as 2026-11-23")
    if not 0 <= day_number < LAST_REPORT_DAY:
        refuse("date", f"must be from 1970-01-01 to {report_day_text(LAST_REPORT_DAY - 1)}: "
               "the days reconcile can query")
    metric = columns["revenue"]
    try:
        nanos = check_revenue(fields, metric, at_most=None)
        country = check_country(fields)
        property_id = check_property_id(fields)
    except Invalid as invalid:
        refuse(invalid.field, invalid.message)
    # The same day, property and country recur on every row: one string each.
    return BookedRow(sys.intern(day), sys.intern(property_id or ""), sys.intern(country or ""),
                     nanos)


def parse_booked_report(data, metric="revenue"):
    """The bytes of a report file -> [BookedRow, ...], or BookedFileError.
    JSON when it starts with '{' or '[', otherwise CSV with a header row."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BookedFileError(f"is not UTF-8 text (byte {exc.start} cannot be read)") from None
    text = text.removeprefix("\ufeff")  # spreadsheets start their CSV with a BOM
    if not text.strip():
        raise BookedFileError("is empty")
    columns = booked_columns(metric)
    if text.lstrip()[0] in "[{":
        records = json_booked_records(text)
    else:
        records = csv_booked_records(text, columns)
    rows, first_seen = [], {}
    for where, fields in records:
        row = booked_row(where, fields, columns)
        if row.key() in first_seen:
            raise BookedFileError(
                f"{where}: the same date, property-id and country as {first_seen[row.key()]} "
                f"({', '.join(part or '-' for part in row.key())}): which figure is meant is ambiguous")
        first_seen[row.key()] = where
        rows.append(row)
    if not rows:
        raise BookedFileError("holds no rows")
    return rows


# An import is staged in transactions of this many rows, and its superseded
# rows are deleted in transactions of this many (day, property) scopes: a
# postback waits behind one of them at most (docs/performance.md).
BOOKED_CHUNK_ROWS = 10_000
BOOKED_CHUNK_SCOPES = 50


@contextlib.contextmanager
def import_lock(store):
    """One import at a time, across processes: an flock on a file beside the
    database's real path, as the ledger's (see ledger_lock_path), which the
    kernel releases if its holder dies.  Not on the database file itself:
    closing any descriptor of it would drop this process's SQLite locks
    (POSIX locks belong to the process)."""
    fd = os.open(ledger_lock_path(store, "-import-lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{IMPORT_PROG}: waiting for another import-booked of {store.path} to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def compare_with_stored(conn, rows, source_file, imported_at_us):
    """What the import changes, read on one snapshot: (counts of new, replaced,
    unchanged and removed rows, the rows to stage).  A report without property
    ids covers its days whole.  One with property ids covers, on each of its
    days, the properties it names (a report fetched for one property leaves
    the others alone) and the rows without a property, which may be a whole
    day imported without property ids: kept, they would count its properties
    twice.  An unchanged row keeps when and from which file it came."""
    figures = {row.key(): row.revenue_nano for row in rows}
    days = sorted({row.day for row in rows})
    properties = sorted({row.property_id for row in rows} | {""})
    stored = {}
    for day in days:
        found = (conn.execute(BOOKED_SQL["booked_of_day"], (day,)) if properties == [""] else
                 (row for prop in properties
                  for row in conn.execute(BOOKED_SQL["booked_of_day_and_property"], (day, prop))))
        for prop, country, nanos, at_us, source in found:
            stored[(day, prop, country)] = (nanos, at_us, source)
    check_booked_total(conn, sum(figures.values()) - sum(row[0] for row in stored.values()))
    counts = {"new": 0, "replaced": 0, "unchanged": 0, "removed": len(stored.keys() - figures)}
    staged = []
    for key, nanos in sorted(figures.items()):
        before = stored.get(key)
        if before is not None and before[0] == nanos:
            counts["unchanged"] += 1
            staged.append((*key, *before))
        else:
            counts["new" if before is None else "replaced"] += 1
            staged.append((*key, nanos, imported_at_us, source_file))
    return counts, staged, days, properties


def booked_total(conn):
    """Every booked row's revenue added up, in nano-USD."""
    [(whole, nanos)] = conn.execute(BOOKED_SQL["booked_total"]).fetchall()
    return whole * NANOS_PER_USD + nanos


def check_booked_bound(conn):
    """Invalid unless the booked revenue stored is at most MAX_BOOKED_TOTAL
    (a database imported into before the bound): settle refuses by name."""
    total = booked_total(conn)
    if total > MAX_BOOKED_TOTAL * NANOS_PER_USD:
        raise Invalid("booked-revenue", (
            f"the booked revenue stored adds up to {nanos_to_usd(total)} USD, above the "
            f"{MAX_BOOKED_TOTAL} USD this receiver keeps (far above any publisher's SPP revenue, "
            "and what keeps every ledger sum within 64 bits): a wrong file or column was "
            "imported; import the right report for those days (import-booked replaces them), "
            "then settle again"))


def check_booked_total(conn, change):
    """BookedFileError when an import that changes the booked rows' total by
    `change` nano-USD takes it above MAX_BOOKED_TOTAL: what keeps the
    ledger's sums of booked money within 64 bits.  An import that lowers it
    is taken, so that a wrong import can always be corrected."""
    total = booked_total(conn) + change
    if change > 0 and total > MAX_BOOKED_TOTAL * NANOS_PER_USD:
        raise BookedFileError(
            f"would bring the booked revenue stored to {nanos_to_usd(total)} USD, above the "
            f"{MAX_BOOKED_TOTAL} USD this receiver keeps (far above any publisher's SPP revenue, "
            "and what keeps every ledger sum within 64 bits): is this the right file and column?")


def clear_earlier_imports(store, unfinished_id):
    """Delete, in short transactions, the staged rows of an import that died
    before its switch and the rows that committed imports superseded."""
    while store.write(lambda conn, _: conn.execute(BOOKED_SQL["unfinished_import"], {
            "id": unfinished_id, "n": BOOKED_CHUNK_ROWS}).rowcount):
        pass
    while store.write(clear_superseded_scopes):
        pass


def clear_superseded_scopes(conn, _):
    scopes = conn.execute(BOOKED_SQL["superseded_scopes"], (BOOKED_CHUNK_SCOPES,)).fetchall()
    for scope in scopes:
        conn.execute(BOOKED_SQL["delete_superseded_rows"], scope)
        conn.execute(BOOKED_SQL["delete_superseded_scope"], scope)
    return len(scopes)


def switch_to_import(import_id, days, properties, conn, _):
    """The write op that makes a staged import the booked revenue of what it
    covers, in one short transaction: a row per day and property covered."""
    if properties == [""]:  # whole days: every property stored for them too
        for day in days:
            conn.execute(BOOKED_SQL["supersede_day"], (day,))
            conn.execute(BOOKED_SQL["switch_day"], (import_id, day))
            conn.execute(BOOKED_SQL["switch_scope"], (day, "", import_id))
        return
    for day in days:
        for prop in properties:
            conn.execute(BOOKED_SQL["supersede_scope"], (day, prop))
            conn.execute(BOOKED_SQL["switch_scope"], (day, prop, import_id))


def import_booked(store, rows, source_file):
    """Store a report's rows as the booked revenue of what it covers (see
    compare_with_stored) -> the counts of new, replaced, unchanged and removed
    rows; an import of what is stored already writes nothing.  In steps, so
    that postbacks never wait long for the write lock: the rows are staged
    under a new import id in short transactions, unseen (readers see rows
    through booked_current only), then one short transaction switches each
    covered day and property to them, then the superseded rows are deleted.
    Killed at any point, the previous figures stand (or the new ones, once
    switched) and the next import clears what was left."""
    with import_lock(store):
        with store.snapshot() as conn:
            import_id = conn.execute(BOOKED_SQL["last_import"]).fetchone()[0] + 1
            left_over = conn.execute(BOOKED_SQL["import_leftovers"], (import_id - 1,)).fetchone()[0]
        if left_over:
            clear_earlier_imports(store, import_id)
        with store.snapshot() as conn:
            counts, staged, days, properties = compare_with_stored(
                conn, rows, source_file, now_us())
        if not (counts["new"] or counts["replaced"] or counts["removed"]):
            return counts
        staged = iter(staged)
        while chunk := list(itertools.islice(staged, BOOKED_CHUNK_ROWS)):
            store.write(functools.partial(
                insert_rows, BOOKED_SQL["stage_booked"], [(import_id, *row) for row in chunk]))
        store.write(functools.partial(switch_to_import, import_id, days, properties))
    with contextlib.suppress(StoreUnavailable):  # the next import clears them
        while store.write(clear_superseded_scopes):
            pass
    return counts


def booked_without_sessions(store, rows):
    """The booked (day, property) figures above 0 that no session of that
    report day matches although the day has sessions (a property-id written
    '01234' for '1234', say): the ledger would settle them to the margin.
    -> warning texts."""
    days = recorded_report_days(store, 0)
    figures = collections.Counter()
    for row in rows:
        figures[row.day, row.property_id] += row.revenue_nano
    found = {}
    warnings = []
    for (day, prop), nanos in sorted(figures.items()):
        if not nanos:
            continue
        if day not in found:
            number = report_day_number(day)
            found[day] = dict(store.read(BOOKED_SQL["properties_between"], (
                days.start_us(number), days.start_us(number + 1))))
        if not found[day] or (prop in found[day]) or not prop:
            continue  # a day without sessions is reconcile's no-postbacks
        have = ", ".join(p or "(none)" for p in sorted(found[day]))
        warnings.append(f"{day} property {prop}: booked {nanos_to_usd(nanos)}, but no session "
                        f"received that report day has this property-id (theirs: {have}); "
                        "settled, it all goes to the margin")
    return warnings


def import_summary(name, rows, counts):
    """The line `import-booked` prints: what the file covered and what changed."""
    days = len({row.day for row in rows})
    properties = len({row.property_id for row in rows} - {""})
    scope = ("every property" if not properties
             else f"{properties} propert{'y' if properties == 1 else 'ies'}")
    line = (f"{name}: {plural(len(rows), 'row')} for {plural(days, 'day')} ({scope}): "
            f"{counts['new']} new, {counts['replaced']} replaced, "
            f"{counts['unchanged']} unchanged, {counts['removed']} removed")
    if not (counts["new"] or counts["replaced"] or counts["removed"]):
        line += "; nothing changed: these figures were already stored"
    return line + "\n"


def metric_column(text):
    """--metric: a column other than those the rows are keyed by."""
    taken = {key for meaning, key in booked_columns("revenue").items() if meaning != "revenue"}
    if not column_key(text) or column_key(text) in taken:
        raise argparse.ArgumentTypeError(
            f"must name the revenue column, not {shown(text)} (the rows' keys are "
            f"{', '.join(sorted(taken))})")
    return text


def build_import_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py import-booked",
        description="Store a Gamezop revenue report (the Ad Revenue Reports API's JSON, "
        "or CSV with date and revenue columns) as booked revenue, one row per day, "
        "property and country. It replaces everything stored for the days it covers, "
        "whatever breakdown or metric that was imported with: with property ids, for the "
        "properties it names (and the rows without one); without, for every property. "
        "It prints how many rows were new, replaced, unchanged and removed. All or nothing; "
        "safe while the server runs.",
    )
    parser.add_argument("file", help="the report file")
    add_db_option(parser, environ, "SQLite database file")
    parser.add_argument(
        "--metric", default="revenue", type=metric_column,
        help="the column or key holding your share of the revenue, in USD "
        "(matched ignoring case, '-', '_' and spaces) [default %(default)s]",
    )
    return parser


# Far above a year of a daily report by property and country (~50 bytes a row).
MAX_REPORT_BYTES = 256 * 2**20


IMPORT_PROG = "spp_server.py import-booked"


def run_import_booked(argv, environ, out):
    args = parse_arguments(build_import_parser(environ), argv)
    name = IMPORT_PROG
    try:
        with open(args.file, "rb") as report:
            data = report.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        return failed(name, f"cannot read {args.file}: {exc.strerror or exc}")
    if len(data) > MAX_REPORT_BYTES:  # /dev/zero, or a wrong file: not read to the end
        return failed(name, f"{args.file}: is larger than {MAX_REPORT_BYTES // 2**20} MiB, more "
                      "than any report; import it in parts (by date); nothing imported")
    try:
        rows = parse_booked_report(data, args.metric)
    except BookedFileError as exc:
        return failed(name, f"{args.file}: {exc}; nothing imported")

    def step(store):
        try:
            # Committed when it returns, failed (nothing changed) when it raises:
            # a command's write has no deadline (InlineWriter).
            counts = import_booked(store, rows, os.path.basename(args.file))
        except BookedFileError as exc:
            raise CommandFailed(f"{args.file}: {exc}; nothing imported") from None
        except StoreUnavailable as exc:
            raise CommandFailed(f"{exc}; nothing imported (running it again is safe)") from None
        # Imported all the same if these cannot be read: settle names such rows again.
        with contextlib.suppress(StoreUnavailable):
            for warning in booked_without_sessions(store, rows):
                say(f"{name}: {args.file}: warning: {warning}")
        return f"{args.file} is imported (committed)", [import_summary(args.file, rows, counts)]

    return run_on_database(name, args.db, out, step)


# ---------------------------------------------------------------------------
# Reconciliation: each report day's estimates against what was booked
# ---------------------------------------------------------------------------

RECONCILIATION_SQL = {
    # Summed over countries; split like SQL_SUMS so that the sum cannot overflow.
    "booked_by_day": """
        SELECT day, property_id,
               sum(revenue_nano / 1000000000), sum(revenue_nano % 1000000000)
        FROM booked_revenue
        WHERE day >= :since_day AND day < :until_day
          AND (:property IS NULL OR property_id = :property)
        GROUP BY day, property_id ORDER BY day, property_id""",
    # Report day numbers (days since 1970-01-01 in the report's time zone),
    # computed on the integer receive time so that the window is an index range.
    "estimates_by_day": f"""
        SELECT {{day}}, count(*),
               sum(revenue_nano / 1000000000), sum(revenue_nano % 1000000000)
        FROM sessions INDEXED BY sessions_by_time
        WHERE {SQL_WINDOW} AND {SQL_REPORTED}
        GROUP BY 1 ORDER BY 1""",
    "estimates_by_day_and_property": f"""
        SELECT {{day}}, property_id, count(*),
               sum(revenue_nano / 1000000000), sum(revenue_nano % 1000000000)
        FROM sessions INDEXED BY sessions_by_time
        WHERE {SQL_WINDOW} AND {SQL_REPORTED}
        GROUP BY 1, 2 ORDER BY 1, 2""",
}

RATIO_PLACES = 6
MIN_DAYS_FOR_A_SUGGESTION = 7
MAX_UTC_OFFSET_MINUTES = 14 * 60
UTC_OFFSET = re.compile(r"([+ -])([0-9]{2}):([0-9]{2})")
RECONCILIATION_FORMATS = ("json", "csv")


def parse_utc_offset(text):
    """'+05:30' -> 330 minutes; ' 05:30' too (a '+' unencoded in a query
    string arrives as a space).  ValueError unless ±HH:MM within ±14:00."""
    match = UTC_OFFSET.fullmatch(text)
    if not match or int(match.group(3)) >= 60:
        raise ValueError(text)
    minutes = int(match.group(2)) * 60 + int(match.group(3))
    if minutes > MAX_UTC_OFFSET_MINUTES:
        raise ValueError(text)
    return -minutes if match.group(1) == "-" else minutes


def utc_offset_text(minutes):
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


MINUTE_US = 60 * 1_000_000


@dataclass(frozen=True)
class ReportDays:
    """How receive times are cut into the report days of Gamezop's reports:
    ((first day number, or None from the start; offset in minutes), ...),
    each change from a report day on (recorded by the run that started it).
    The day before a change ends where the new offset's first day starts,
    so it is shorter or longer than 24 hours; every other day is whole."""

    changes: tuple

    @classmethod
    def fixed(cls, offset_minutes):
        return cls(((None, offset_minutes),))

    @property
    def offset(self):
        """The offset of the newest days."""
        return self.changes[-1][1]

    def _change_start_us(self, i):
        first, offset = self.changes[i]
        return first * DAY_US - offset * MINUTE_US

    def start_us(self, day):
        """The receive time at which report day number `day` starts."""
        i = max(i for i, (first, _) in enumerate(self.changes) if first is None or first <= day)
        start = day * DAY_US - self.changes[i][1] * MINUTE_US
        return start if i + 1 == len(self.changes) else min(start, self._change_start_us(i + 1))

    def day_of(self, at_us):
        """The report day number of receive time `at_us` (what sql() gives)."""
        i = max(i for i in range(len(self.changes)) if i == 0 or at_us >= self._change_start_us(i))
        day = (at_us + self.changes[i][1] * MINUTE_US) // DAY_US
        return day if i + 1 == len(self.changes) else min(day, self.changes[i + 1][0] - 1)

    def sql(self):
        """SQL for the report day number of a session's received_at_us."""
        cases = []
        for i, (_, offset) in enumerate(self.changes):
            day = f"(received_at_us + {offset * MINUTE_US}) / {DAY_US}"
            if i + 1 < len(self.changes):  # the day before the next change ends where it starts
                day = f"min({day}, {self.changes[i + 1][0] - 1})"
            cases.append(day if i == 0 else
                         f"WHEN received_at_us >= {self._change_start_us(i)} THEN {day}")
        if len(cases) == 1:
            return cases[0]
        return f"CASE {' '.join(reversed(cases[1:]))} ELSE {cases[0]} END"

    def text(self, since_day=None, until_day=None):
        """The offsets of the days [since, until) as text: '+05:30', or
        '+00:00 to 2026-11-21, +05:30 from 2026-11-22' across a change."""
        shown_ = [(first, offset) for first, offset in self.changes
                  if (first is None or until_day is None or first < until_day)]
        while since_day is not None and len(shown_) > 1 and shown_[1][0] <= since_day:
            shown_.pop(0)
        parts = []
        for i, (first, offset) in enumerate(shown_):
            words = [utc_offset_text(offset)]
            if first is not None and i > 0:
                words.append(f"from {report_day_text(first)}")
            if i + 1 < len(shown_):
                words.append(f"to {report_day_text(shown_[i + 1][0] - 1)}")
            parts.append(" ".join(words))
        return ", ".join(parts)

    def changed_to(self, offset_minutes, last_until_us):
        """These days with `offset_minutes` from the first report day that
        cuts no time before `last_until_us` (paid by the runs so far, maybe
        settled) into another day than it was: -> ReportDays, or Invalid."""
        if len(self.changes) > 1 and last_until_us < self._change_start_us(-1):
            raise Invalid("report-utc-offset", f"the change to {utc_offset_text(self.offset)} "
                          f"starts at {iso_utc(self._change_start_us(-1))}, after the last "
                          "run's until: change it again from a run after that")
        old, new = self.offset * MINUTE_US, offset_minutes * MINUTE_US
        first = max((last_until_us + old) // DAY_US + 1, -((-last_until_us - new) // DAY_US))
        return ReportDays((*self.changes, (first, offset_minutes)))


def recorded_report_days(reads, default_offset):
    """The report days the ledger's runs recorded (every report reads
    them, so that it cuts the days as settlement does); before the first
    run, `default_offset` (SPP_REPORT_UTC_OFFSET) from the start."""
    return report_days_of(reads.read(RUNS_SQL["report_offsets"]), default_offset)


def report_days_of(rows, default_offset):
    if not rows:
        return ReportDays.fixed(default_offset)
    return ReportDays(tuple((None if first is None else report_day_number(first), offset)
                            for first, offset in rows))


def parse_quantile(text):
    """'0.9' -> Decimal('0.9'): the fraction of days the suggested share must
    have been safe on, in (0, 1]."""
    return parse_fraction(text, "0.9")


@dataclass(frozen=True)
class ReconciliationQuery:
    since_day: int  # report day numbers: the window [since, until)
    until_day: int
    property_id: str | None
    days: ReportDays | None  # None: the offsets the ledger recorded (see recorded_report_days)
    quantile: decimal.Decimal
    share: decimal.Decimal | None
    default_offset: int = 0  # before any run recorded one


def reconciliation_query(since, until, property_id, offset, quantile, share, default_offset=0):
    """Texts as given (None = absent) -> ReconciliationQuery, or Invalid
    naming the parameter.  `offset`: an offset to try instead of the
    recorded ones (text, or minutes), or None."""
    days = {}
    for name, text in (("since", since), ("until", until)):
        if not text:
            raise Invalid(name, "is required")
        try:
            days[name] = report_day_number(text)
        except ValueError:
            raise Invalid(name, "must be a report day written YYYY-MM-DD, such as 2026-11-01") from None
        if days[name] < 0:
            raise Invalid(name, "must be 1970-01-01 or later")
    if days["until"] <= days["since"]:
        raise Invalid("until", "must be later than since (the window is [since, until))")
    if isinstance(offset, str):
        try:
            offset = parse_utc_offset(offset)
        except ValueError:
            raise Invalid("report-utc-offset", "must be +HH:MM or -HH:MM within ±14:00, such as "
                          f"+05:30, not {shown(offset)}") from None
    if quantile is None:
        quantile = decimal.Decimal(1)
    else:
        try:
            quantile = parse_quantile(quantile)
        except ValueError as exc:
            raise Invalid("quantile", str(exc)) from None
    return ReconciliationQuery(days["since"], days["until"], property_id or None,
                               None if offset is None else ReportDays.fixed(offset), quantile,
                               share, default_offset)


def ratio_text(booked, estimated):
    if booked is None or not estimated:
        return None
    return floor_places(Fraction(booked, estimated), RATIO_PLACES)


def allowed_hundredths(estimated, booked):
    """The largest share in hundredths, at most 100, whose paid-out (the
    estimate times the share, rounded down to the nano-USD, as day_record
    pays it) is at most `booked`.  An estimate of 0 allows any share."""
    if not estimated:
        return 100
    # floor(estimated * h / 100) <= booked  <=>  estimated * h < 100 * (booked + 1)
    return min(100, (100 * (booked + 1) - 1) // estimated)


def tightest_pair(pairs):
    """A day's (estimated, booked) pairs, one per record -> the pair that
    allows the smallest share: a day is safe only when every record on it is."""
    return min(pairs, key=lambda pair: allowed_hundredths(*pair))


def suggested_share(pairs, quantile):
    """The largest share in hundredths, at most 1, that paid out no more than
    was booked on at least `quantile` of the days; None without days.
    pairs: one (estimated, booked) per day, its tightest record's."""
    if not pairs:
        return None
    allowed = sorted((allowed_hundredths(*pair) for pair in pairs), reverse=True)
    needed = math.ceil(Fraction(quantile) * len(allowed))  # days it must be safe on
    return floor_places(Fraction(allowed[needed - 1], 100), 2)


def median_fraction(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def reconciliation_columns(share):
    return ["day", "property-id", "sessions", "estimated-revenue", "booked-revenue", "ratio",
            *(["paid-out", "margin"] if share is not None else []), "flag"]


def estimates_of_days(store, window, split, days):
    """Each report day's (day, property or None, sessions, whole USD, nano
    rest), by property when `split`: what the sessions estimated, in the
    report days `days`."""
    if split:
        return store.read(RECONCILIATION_SQL["estimates_by_day_and_property"].format(day=days.sql()), window)
    return [(day, None, *sums) for day, *sums
            in store.read(RECONCILIATION_SQL["estimates_by_day"].format(day=days.sql()), window)]


def reconciliation_sides(store, q, estimates_of=estimates_of_days):
    """{(day, property or None): [sessions, estimated nanos, booked nanos]},
    None where a side has nothing.  A day whose booked rows name properties
    has a record per property, its booked rows without one held against the
    sessions without one (an absent and an empty property-id alike); a day
    booked without property ids has one record for all properties; a day not
    booked is split by property when another day of the window is, or when a
    property is asked for."""
    booked = store.read(RECONCILIATION_SQL["booked_by_day"], {
        "since_day": report_day_text(q.since_day), "until_day": report_day_text(q.until_day),
        "property": q.property_id})
    split_days = {day for day, prop, *_ in booked if prop}
    whole_days = {day for day, *_ in booked} - split_days
    split = q.property_id is not None or bool(split_days)

    def key(day, prop):
        return day, (prop or None) if split and day not in whole_days else None

    days = q.days  # offset_us: for the web view's rollup, cut at one offset
    window = {"since": days.start_us(q.since_day), "until": days.start_us(q.until_day),
              "property": q.property_id, "offset_us": days.offset * MINUTE_US}
    estimates = estimates_of(store, window, split, days)
    sides = {}
    for day, prop, sessions, whole, rest in estimates:
        side = sides.setdefault(key(report_day_text(day), prop), [0, 0, None])
        side[0] += sessions
        side[1] += joined_nanos(whole, rest)
    for day, prop, whole, rest in booked:
        sides.setdefault(key(day, prop), [None, None, None])[2] = joined_nanos(whole, rest)
    return sides


def by_day_then_property(item):
    (day, prop), _ = item
    return day, prop is not None, prop or ""


def day_flag(sessions, estimated, booked):
    """What a record is missing: postbacks for what was booked, or a booked
    figure for what was estimated (a property or day never imported)."""
    if booked and sessions is None:
        return "no-postbacks"
    if estimated is not None and booked is None:
        return "no-booked-revenue"
    return None


def day_record(day, prop, sessions, estimated, booked, share):
    """One report row; `paid` (what the share paid out, nanos or None) rides along."""
    paid = None if share is None or estimated is None else rewardable_nanos(estimated, share)
    record = {"day": day, "property-id": prop, "sessions": sessions,
              "estimated-revenue": None if estimated is None else nanos_to_usd(estimated),
              "booked-revenue": None if booked is None else nanos_to_usd(booked),
              "ratio": ratio_text(booked, estimated)}
    if share is not None:
        record["paid-out"] = None if paid is None else nanos_to_usd(paid)
        record["margin"] = None if paid is None or booked is None else signed_usd(booked - paid)
    record["flag"] = day_flag(sessions, estimated, booked)
    return record, paid


def total_nanos(values):
    """The sum of the figures present; None when none is (nothing to add up is
    not a figure of 0)."""
    present = [value for value in values if value is not None]
    return sum(present) if present else None


def usd_or_none(nanos, text=nanos_to_usd):
    return None if nanos is None else text(nanos)


def reconciliation_warnings(flags, unbooked, paid, booked):
    """Plain sentences for what the figures alone would leave unsaid."""
    warnings = []
    if paid is not None and paid > (booked or 0):
        warnings.append(
            f"paid-out {nanos_to_usd(paid)} exceeds booked-revenue {nanos_to_usd(booked or 0)} "
            f"over the window by {nanos_to_usd(paid - (booked or 0))}: the reward share paid out "
            "more than was booked")
    if flags["no-booked-revenue"]:
        warnings.append(
            f"{plural(flags['no-booked-revenue'], 'record')} flagged no-booked-revenue "
            f"(estimated {nanos_to_usd(unbooked)}): no booked figure, so left out of ratio, "
            "margin and the suggested share until the booked revenue of those days and "
            "properties is imported")
    if flags["no-postbacks"]:
        warnings.append(
            f"{plural(flags['no-postbacks'], 'record')} flagged no-postbacks: booked revenue "
            "but not one postback; look at /rejected and the proxy's log for those days")
    return warnings


def reconciliation_summary(q, records, rows):
    """Totals over every record; ratios, margin and the suggestion over the
    records that have both sides.  rows: (sessions, estimated, booked, paid)."""
    both = [(record["day"], est, booked, paid)
            for record, (_, est, booked, paid) in zip(records, rows)
            if est is not None and booked is not None]
    pairs_by_day = {}
    for day, est, booked, _ in both:
        pairs_by_day.setdefault(day, []).append((est, booked))
    ratios = [Fraction(booked, est) for _, est, booked, _ in both if est]
    paired_estimated = sum(est for _, est, _, _ in both)
    paired_booked = total_nanos(booked for _, _, booked, _ in both)
    booked_total = total_nanos(booked for _, _, booked, _ in rows)
    paid_total = total_nanos(paid for *_, paid in rows)
    flags = {flag: sum(record["flag"] == flag for record in records)
             for flag in ("no-booked-revenue", "no-postbacks")}
    unbooked = sum(est for record, (_, est, _, _) in zip(records, rows)
                   if record["flag"] == "no-booked-revenue")
    little = len(pairs_by_day) < MIN_DAYS_FOR_A_SUGGESTION
    return {
        "days": len({record["day"] for record in records}),
        "days-with-both": len(pairs_by_day),
        **flags,
        "sessions": sum(sessions or 0 for sessions, *_ in rows),
        "estimated-revenue": usd_or_none(total_nanos(est for _, est, _, _ in rows)),
        "booked-revenue": usd_or_none(booked_total),
        **({"paid-out": usd_or_none(paid_total),
            "margin": usd_or_none(total_nanos(booked - paid for *_, booked, paid in both),
                                  signed_usd),
            "paid-out-exceeds-booked": paid_total is not None and paid_total > (booked_total or 0)}
           if q.share is not None else {}),
        "ratio": ratio_text(paired_booked, paired_estimated),
        "lowest-ratio": floor_places(min(ratios), RATIO_PLACES) if ratios else None,
        "median-ratio": floor_places(median_fraction(ratios), RATIO_PLACES) if ratios else None,
        "quantile": format(q.quantile, "f"),
        "suggested-reward-share": suggested_share(
            [tightest_pair(pairs) for pairs in pairs_by_day.values()], q.quantile),
        "little-data": little,
        "note": (f"only {len(pairs_by_day)} day(s) have both estimates and booked revenue: "
                 f"the suggestion rests on little data (fewer than {MIN_DAYS_FOR_A_SUGGESTION})"
                 if little else None),
        "warnings": reconciliation_warnings(
            flags, unbooked, paid_total if q.share is not None else None, booked_total),
    }


def reconciliation(store, q, estimates_of=estimates_of_days):
    """The report: one record per report day (and property, see
    reconciliation_sides) and a summary.  Shared by GET /reconciliation,
    `spp_server.py reconcile` and the web view (which sums the estimates
    from its rollup: estimates_of)."""
    q = dataclasses.replace(q, days=q.days or recorded_report_days(store, q.default_offset))
    return reconciliation_report(q, reconciliation_sides(store, q, estimates_of))


def reconciliation_report(q, sides):
    records, rows = [], []
    for (day, prop), (sessions, estimated, booked) in sorted(sides.items(), key=by_day_then_property):
        record, paid = day_record(day, prop, sessions, estimated, booked, q.share)
        records.append(record)
        rows.append((sessions, estimated, booked, paid))
    return {
        "since": report_day_text(q.since_day), "until": report_day_text(q.until_day),
        "property-id": q.property_id, "report-utc-offset": q.days.text(q.since_day, q.until_day),
        "reward-share": None if q.share is None else format(q.share, "f"),
        "days": records, "summary": reconciliation_summary(q, records, rows),
    }


def reconciliation_output(store, q, fmt):
    """The report as bytes: JSON (one object and a newline) or CSV (the day rows)."""
    report = reconciliation(store, q)
    if fmt == "csv":
        return b"".join(encode_records(report["days"], reconciliation_columns(q.share), "csv"))
    return (json.dumps(report, ensure_ascii=False) + "\n").encode("utf-8")


def build_reconcile_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py reconcile",
        description="Write the reconciliation (what GET /reconciliation answers) to stdout: "
        "per report day, SPP's estimates against the imported booked revenue.",
        epilog="A record with estimates but no booked figure is flagged no-booked-revenue, "
        "one with booked revenue but no postbacks no-postbacks; the summary counts both, and "
        "its warnings say when paid-out exceeds booked-revenue over the window. Totals with "
        "nothing to add up are null. median-ratio is the median of the records' exact ratios "
        "(booked / estimated as fractions, not the rounded ratio column), rounded down to 6 "
        "places. suggested-reward-share counts days: a day is safe at a share when, on every "
        "record of that day with both figures, the share paid out (rounded down to the "
        "nano-USD) no more than was booked.",
    )
    add_shared_options(parser, environ, DB_HELP_REPORT, "adds each record's paid-out (the "
                       "estimate times the share, rounded down) and margin (booked minus paid-out)")
    add_report_offset_option(parser, environ, "reconcile")
    parser.add_argument("--since", required=True, help="first report day, included (YYYY-MM-DD)")
    parser.add_argument("--until", required=True, help="report day that ends the window, excluded")
    parser.add_argument("--property-id", help="only this property")
    parser.add_argument("--quantile", help="fraction of the days with both figures the suggested "
                        "share must have been safe on (a day is safe when every record on it is): "
                        "a decimal above 0 and at most 1, with at most 6 places "
                        "[default 1: every day]")
    parser.add_argument("--format", choices=list(RECONCILIATION_FORMATS), default="json")
    return parser


def run_reconcile(argv, environ, out):
    parser = build_reconcile_parser(environ)
    args = parse_arguments(parser, argv)
    try:
        q = reconciliation_query(args.since, args.until, args.property_id,
                                 args.report_utc_offset, args.quantile, args.reward_share,
                                 args.configured_offset)
    except Invalid as invalid:
        parser.error(f"--{invalid.field}: {invalid.message}")
    return print_report(parser.prog, args.db, out,
                        lambda store: [reconciliation_output(store, q, args.format)])


# ---------------------------------------------------------------------------
# Payout ledger, the frame: every step's lock, chunked writes and journal
# ---------------------------------------------------------------------------

FRAME_SQL = {
    "run_exists": "SELECT 1 FROM payout_runs WHERE id = ?",
    "settlement_exists": "SELECT 1 FROM settlements WHERE id = ?",
    "owed_balances": """
        SELECT user_id, owed_nano FROM ledger_balances WHERE owed_nano > 0 ORDER BY user_id""",
    # Staged rows of a step whose header never committed (see write_in_chunks).
    "unfinished_parts": """
        DELETE FROM payout_parts WHERE (run_id, day, property_id, user_id) IN (
            SELECT run_id, day, property_id, user_id FROM payout_parts
            WHERE run_id > (SELECT coalesce(max(id), 0) FROM payout_runs) LIMIT ?)""",
    "unfinished_lines": """
        DELETE FROM payout_lines WHERE (run_id, user_id) IN (
            SELECT run_id, user_id FROM payout_lines
            WHERE run_id > (SELECT coalesce(max(id), 0) FROM payout_runs) LIMIT ?)""",
    "unfinished_settlement_lines": """
        DELETE FROM settlement_lines WHERE (settlement_id, day, property_id, user_id) IN (
            SELECT settlement_id, day, property_id, user_id FROM settlement_lines
            WHERE settlement_id > (SELECT coalesce(max(id), 0) FROM settlements) LIMIT ?)""",
}

LEDGER_RETRIES = 3  # a step computed on a snapshot is redone if the ledger moved meanwhile
LEDGER_CHUNK_ROWS = 10_000  # detail rows per staging transaction


class LedgerMoved(Exception):
    """Another pay, settle or import committed between the snapshot a step was
    computed on and its write: the write is rolled back and the step redone."""


def day_bounds_us(day_text, days):
    """A report day -> [start, end) in receive-time microseconds."""
    number = report_day_number(day_text)
    return days.start_us(number), days.start_us(number + 1)


def owed_balances(conn):
    """[(user, owed)] of every balance carried and not yet taken back, by user-id."""
    return conn.execute(FRAME_SQL["owed_balances"]).fetchall()


def ledger_lock_path(store, suffix="-ledger-lock"):
    """The lock of the database itself, whatever path names it: beside its
    real path (a symlink or a relative path names the same lock).  A second
    hard link would be a second lock, and SQLite keeps a WAL database's -wal
    and -shm per name (sqlite.org/howtocorrupt.html, 2.5): refused."""
    real = os.path.realpath(store.path)
    links = os.stat(real).st_nlink
    if links > 1:
        raise StoreUnavailable(
            f"{store.path} has {links} hard links: a step locks the database by its one real "
            "path, and SQLite cannot share a database between two names: remove the other "
            f"name (find / -xdev -samefile {real} lists them); nothing changed")
    return real + suffix


@contextlib.contextmanager
def ledger_lock(store, wait_s=DEFAULTS["ledger_lock_wait_s"], waiting=None):
    """One pay or settle at a time, across processes: an flock on the file
    <real path>-ledger-lock, which the kernel releases if its holder dies, so
    that only the staged rows of a dead step are ever cleared.  A step that
    finds it held calls waiting(lock path) once, then gives up after wait_s
    seconds (StoreUnavailable: nothing changed)."""
    path = ledger_lock_path(store)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not try_flock(fd):
            if waiting is not None:
                waiting(path)
            deadline = time.monotonic() + wait_s
            pause = 0.01
            while not try_flock(fd):
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"another pay or settle held {path} for {wait_s} s (--lock-wait); "
                        "nothing changed: run it again once that step is done")
                time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
                pause = min(pause * 2, 0.5)  # the kernel has no timed flock: poll, gently
        yield
    finally:
        os.close(fd)


def try_flock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def write_in_chunks(store, sql, rows):
    """Stage detail rows in transactions of LEDGER_CHUNK_ROWS rows: postbacks
    wait behind one chunk at most.  They stay invisible until the step's
    header row commits (readers only see details of a committed header)."""
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, LEDGER_CHUNK_ROWS)):
        store.write(functools.partial(insert_rows, sql, chunk))


def clear_unfinished(store):
    """Delete the staged rows of a step that died before its header committed."""
    for name in ("unfinished_parts", "unfinished_lines", "unfinished_settlement_lines"):
        while store.write(lambda conn, _, sql=FRAME_SQL[name]: conn.execute(
                sql, (LEDGER_CHUNK_ROWS,)).rowcount):
            pass


# What a spreadsheet may run as a formula at the start of a cell (OWASP's
# list), and the quote that marks a cell escaped here.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_text(text):
    """A user or property id for the ledger's CSV: one quote in front of one
    that starts like a formula (or with a quote), so that a spreadsheet shows
    it as text and an app gets the id back by removing one leading quote."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def json_output(report):
    return (json.dumps(report, ensure_ascii=False) + "\n").encode("utf-8")


# --- The ledger journal: every step, kept beside the database, outlives a restore ---
#
# The database alone cannot know what happened after a backup of it was
# taken: restored, it would pay again the sessions a lost run paid and give
# a new run the lost run's id.  So every step is also copied, whole, into a
# second SQLite file beside the database (never restored: backups copy the
# database only), before its lines are released; each step first checks the
# database against it, and `ledger-replay` puts lost steps back
# (docs/ledger.md, "After a restore").

JOURNAL_SUFFIX = "-ledger-journal"
# The rows of a step, per kind: (table, the column naming the step, columns).
# Runs' headers first: a header's columns are also what a step is told by,
# except a run's id range, which a replay may move (see replayed_range).
STEP_ROWS = {
    "run": (
        ("payout_runs", "id", (
            "id", "after_session_id", "last_session_id", "until_us", "created_at_us",
            "pay_now_share", "final_share", "report_utc_offset", "users", "sessions",
            "estimated_nano", "paid_now_nano", "deducted_nano", "withheld_nano",
            "moved_sessions", "moved_to_day", "started_from")),  # insert_run's order
        ("payout_parts", "run_id", (
            "run_id", "day", "property_id", "user_id", "sessions", "estimated_nano",
            "paid_now_nano")),
        ("payout_lines", "run_id", (
            "run_id", "user_id", "sessions", "estimated_nano", "paid_now_nano")),
        ("payout_deductions", "run_id", ("run_id", "user_id", "deducted_nano")),
        ("payout_withheld", "run_id", ("run_id", "user_id", "withheld_nano")),
        # The offset a first run recorded, or a change a run started.
        ("report_offsets", "run_id", ("run_id", "first_day", "report_utc_offset")),
    ),
    "settlement": (
        ("settlements", "id", (
            "id", "created_at_us", "report_utc_offset", "write_off", "pools", "booked_nano",
            "top_up_nano", "carried_nano", "written_off_nano", "deducted_nano")),
        ("settlement_days", "settlement_id", (
            "day", "property_id", "settlement_id", "by_property", "booked_nano", "sessions",
            "estimated_nano", "paid_now_nano", "final_nano", "top_up_nano", "carried_nano",
            "written_off_nano")),
        ("settlement_lines", "settlement_id", (
            "settlement_id", "day", "property_id", "user_id", "sessions", "estimated_nano",
            "booked_part_nano", "final_nano", "paid_now_nano", "top_up_nano", "carried_nano",
            "written_off_nano", "correction", "deducted_nano", "written_back_nano", "held")),
    ),
    # A release credits what was withheld: a release a restore lost must not
    # be asked for, and credited, again.
    "hold": (
        ("ledger_holds", "id", ("id", "user_id", "action", "at_us", "reason", "amount_nano")),
    ),
    # Balances written off for their age: one a restore lost would be taken
    # back again from the users' later pay.
    "balance-write-off": (
        ("balance_write_offs", "id", (
            "id", "created_at_us", "older_than_us", "users", "written_off_nano")),
        ("balance_write_off_lines", "write_off_id", (
            "write_off_id", "user_id", "day", "property_id", "written_off_nano")),
    ),
}
RANGE_COLUMNS = ("after_session_id", "last_session_id")
# Not what tells a step from another's: a run's range (replay may cut it) and
# what an erasure renames (the database's and the journal's one after the other).
NOT_IDENTITY = (*RANGE_COLUMNS, "user_id", "reason")
# steps: the order steps were recorded in.  run_sessions: per run, an 8-byte
# digest of each session it paid (row id and session-id, in id order), and
# of the session its range starts after: what replay finds a restored copy's
# end by.
JOURNAL_SCHEMA = "\n".join([
    "CREATE TABLE IF NOT EXISTS steps (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
    "id INTEGER NOT NULL, UNIQUE (kind, id));",
    "CREATE TABLE IF NOT EXISTS run_sessions (run_id INTEGER PRIMARY KEY, anchor BLOB, "
    "digests BLOB NOT NULL);",
    *(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(columns)});\n"
      f"CREATE INDEX IF NOT EXISTS {table}_by_step ON {table} ({key});"
      for rows in STEP_ROWS.values() for table, key, columns in rows)])
DIGEST_BYTES = 8


class LedgerBehind(StoreUnavailable):
    """The database lacks steps its ledger journal holds (restored from a
    backup), or the two disagree: no step may run on it."""


def journal_path(db_path):
    """Beside the database itself, whatever path or link named it."""
    return os.path.realpath(db_path) + JOURNAL_SUFFIX


def session_digest(row_id, session_id):
    return hashlib.blake2b(f"{row_id}\0{session_id}".encode("utf-8", "surrogatepass"),
                           digest_size=DIGEST_BYTES).digest()


def sync_directory(path):
    """Make a new file's name durable: fsync the directory that holds it."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_journal_file(path, db_path):
    """Create the journal 0600 (it holds earnings) and, when root runs the
    command, owned like the database, so that the service's user can check
    it too (SQLite does the same with the -wal it creates as root)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        if os.geteuid() == 0:
            owner = os.stat(db_path)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_directory(path)


def step_identities(execute, schema=""):
    """{(kind, id): the header's columns but the run's range} of every step."""
    steps = {}
    for kind, ((table, _, columns), *_) in STEP_ROWS.items():
        told_by = [c for c in columns if c not in NOT_IDENTITY]
        for row in execute(f"SELECT {', '.join(told_by)} FROM {schema}{table}"):
            steps[(kind, row[0])] = tuple(row)
    return steps


def step_names(steps):
    return ", ".join(f"{kind} {step_id}" for kind, step_id in steps)


def compare_with_journal(journaled, recorded, db_path):
    """-> (steps the database lacks, steps the journal lacks), each later
    than every step both hold; LedgerBehind if the two disagree."""
    for key in journaled.keys() & recorded.keys():
        if journaled[key] != recorded[key]:
            raise LedgerBehind(
                f"{db_path} and its ledger journal {journal_path(db_path)} disagree about "
                f"{step_names([key])}: one of them is another database's; move the wrong one "
                "aside (docs/ledger.md, \"After a restore\"); nothing changed")
    lost = sorted(journaled.keys() - recorded.keys())
    unjournaled = sorted(recorded.keys() - journaled.keys())
    for missing, holder in ((lost, recorded), (unjournaled, journaled)):
        for kind, step_id in missing:
            if any(k == kind and i > step_id for k, i in holder):
                raise LedgerBehind(
                    f"{db_path} and its ledger journal {journal_path(db_path)} disagree: "
                    f"{step_names([(kind, step_id)])} is in one only, before later steps "
                    "of both; nothing changed")
    if lost and unjournaled:
        raise LedgerBehind(
            f"{db_path} holds {step_names(unjournaled)} but not {step_names(lost)} of its "
            f"ledger journal {journal_path(db_path)}: a step was recorded on a restored copy "
            "without the journal; nothing changed")
    return lost, unjournaled


def behind_journal(db_path, lost):
    return LedgerBehind(
        f"{db_path} is behind its ledger journal: {step_names(lost)} "
        f"{'was' if len(lost) == 1 else 'were'} recorded after this copy of the database was "
        "made (restored from a backup?), and a step now could pay again what they paid and "
        f"reuse their ids; `spp_server.py ledger-replay --db {db_path}` puts them back; "
        "nothing changed")


def journal_step(conn, kind, step_id):
    """On the journal's connection (the database attached as `db`): copy the
    step's rows, and a run's session digests, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, key, columns in STEP_ROWS[kind]:
            names = ", ".join(columns)
            conn.execute(f"INSERT INTO main.{table} ({names}) SELECT {names} "
                         f"FROM db.{table} WHERE {key} = ?", (step_id,))
        if kind == "run":
            [(after, last)] = conn.execute(
                "SELECT after_session_id, last_session_id FROM db.payout_runs WHERE id = ?",
                (step_id,)).fetchall()
            anchor = conn.execute("SELECT id, session_id FROM db.sessions WHERE id = ?",
                                  (after,)).fetchone()
            conn.execute("INSERT INTO run_sessions VALUES (?, ?, ?)", (
                step_id, session_digest(*anchor) if anchor else None,
                b"".join(itertools.starmap(session_digest, conn.execute(
                    "SELECT id, session_id FROM db.sessions WHERE id > ? AND id <= ? "
                    "ORDER BY id", (after, last))))))
        conn.execute("INSERT INTO steps (kind, id) VALUES (?, ?)", (kind, step_id))
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise


class LedgerJournal:
    """The journal of `store`'s database, open for writing (created if
    missing), with the database attached as `db` to copy steps from."""

    def __init__(self, store):
        self.db_path = store.path
        self.path = journal_path(store.path)
        create_journal_file(self.path, store.path)
        self.conn = sqlite3.connect(self.path, isolation_level=None,
                                    timeout=DEFAULTS["busy_timeout_ms"] / 1000)
        try:
            # EXTRA: FULL, and the directory is synced after the rollback
            # journal is deleted, which is when a commit happens.
            self.conn.execute("PRAGMA synchronous = EXTRA")
            self.conn.executescript(JOURNAL_SCHEMA)
            self.conn.execute("ATTACH DATABASE ? AS db", (store.path,))
        except BaseException:
            self.conn.close()
            raise

    def close(self):
        self.conn.close()

    def compare(self):
        """(lost, unjournaled): see compare_with_journal."""
        self.conn.execute("BEGIN")
        try:
            return compare_with_journal(step_identities(self.conn.execute, "main."),
                                        step_identities(self.conn.execute, "db."), self.db_path)
        finally:
            self.conn.execute("ROLLBACK")

    def record(self, kind, step_id):
        """Copy a committed step of the database, whole, in one durable
        transaction: from then on its lines may be released.  A step the
        journal holds already (caught up, or asked for again) is left as it is."""
        if self.conn.execute("SELECT 1 FROM steps WHERE kind = ? AND id = ?",
                             (kind, step_id)).fetchone() is None:
            journal_step(self.conn, kind, step_id)

    def catch_up(self, unjournaled):
        """Journal the steps the database holds and the journal lacks (a step
        killed between its commit and its journal entry, whose lines were
        never released; or every step, the first time), in the order made."""
        made = {(kind, step_id): created for kind, step_id, created in self.conn.execute(
            "SELECT 'run', id, created_at_us FROM db.payout_runs UNION ALL "
            "SELECT 'settlement', id, created_at_us FROM db.settlements UNION ALL "
            "SELECT 'hold', id, at_us FROM db.ledger_holds UNION ALL "
            "SELECT 'balance-write-off', id, created_at_us FROM db.balance_write_offs")}
        for kind, step_id in sorted(unjournaled, key=lambda key: (made[key], key)):
            self.record(kind, step_id)

    def rename_user(self, user_id, pseudonym):
        """An erasure's renaming (see erase_user), in every journaled table
        that names users, then the file compacted: no copy of the id left."""
        self.conn.execute("PRAGMA secure_delete = ON")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for table in sorted({table for rows in STEP_ROWS.values()
                                 for table, _, columns in rows if "user_id" in columns}):
                self.conn.execute(f"UPDATE main.{table} SET user_id = ? WHERE user_id = ?",
                                  (pseudonym, user_id))
            self.conn.execute(ADJUSTMENTS_SQL["erase_hold_reasons"].replace("ledger_holds", "main.ledger_holds"),
                              (user_id, pseudonym, pseudonym))
            self.conn.execute("COMMIT")
        except BaseException:
            rollback_quietly(self.conn)
            raise
        self.conn.execute("VACUUM main")

    def lost_rows(self, table, key, columns, step_id):
        return self.conn.execute(
            f"SELECT {', '.join(columns)} FROM main.{table} WHERE {key} = ? ORDER BY rowid",
            (step_id,))

    def lost_steps(self, lost):
        """The lost steps in the order they were recorded."""
        order = dict(((kind, step_id), seq) for seq, kind, step_id in
                     self.conn.execute("SELECT seq, kind, id FROM steps"))
        return sorted(lost, key=order.__getitem__)


@contextlib.contextmanager
def ledger_step(store, **lock):
    """A pay or settle (or one printed again): under the ledger lock, the
    database checked against its journal, which is brought up to date with
    it; -> the journal, to record the step in before its lines are released.
    LedgerBehind when the database lacks steps of the journal."""
    with ledger_lock(store, **lock):
        journal = LedgerJournal(store)
        try:
            lost, unjournaled = journal.compare()
            if lost:
                raise behind_journal(store.path, lost)
            journal.catch_up(unjournaled)
            yield journal
        finally:
            journal.close()


def check_journal_read_only(store):
    """For the reports and the ledger's endpoints: LedgerBehind when the
    database lacks steps of a journal beside it; -> the steps the journal
    lacks (a step killed before its journal entry: its lines were never
    released).  The journal is read first, then the database: a step is
    committed to the database before its journal entry, so a step made
    meanwhile never looks lost."""
    path = journal_path(store.path)
    if not os.path.exists(path):
        return set()
    try:
        conn = sqlite3.connect("file:" + urllib.parse.quote(path) + "?mode=ro", uri=True,
                               isolation_level=None, timeout=DEFAULTS["busy_timeout_ms"] / 1000)
        try:
            journaled = step_identities(conn.execute)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot read the ledger journal {path}: {exc}") from None
    lost, unjournaled = compare_with_journal(journaled, step_identities(store.read), store.path)
    if lost:
        raise behind_journal(store.path, lost)
    return set(unjournaled)


# --- The ledger's commands: options and the driver they share ---

LEDGER_EXIT_HELP = ("Exit status 0 when done; 1, with one line on stderr, when the database "
                    "cannot be read or written (nothing is half-written: run it again); 2 when "
                    "an option is refused (nothing changed); 3 when the step is recorded but "
                    "its lines could not be written (the line says how to print them again); "
                    "4 (settle) when it settled what it could but a line names pools it could "
                    "not (partly settled); "
                    "141 when the reader closed the pipe before any step was recorded.")


LEDGER_OPTIONS = ("until", "pay-now-share", "final-share", "report-utc-offset", "settlement",
                  "write-off", "reason", "older-than", "from")


def add_lines_format_option(parser):
    """--format of the ledger steps' lines: CSV by default, for a spreadsheet or awk."""
    parser.add_argument("--format", choices=list(EXPORT_FORMATS), default="csv",
                        help="csv (with a header row) or ndjson [default %(default)s]")


def add_lock_wait_option(parser, environ):
    """How long pay or settle waits for another step (see ledger_lock)."""
    wait = DEFAULTS["ledger_lock_wait_s"]
    parser.add_argument("--lock-wait", type=lock_wait_seconds, metavar="SECONDS",
                        default=env_default(environ, "SPP_LEDGER_LOCK_WAIT", lock_wait_seconds,
                                            wait),
                        help="while another pay or settle runs on the database, say so on "
                        "stderr and wait this long for it, then give up with status 1 "
                        f"[SPP_LEDGER_LOCK_WAIT, default {wait}]")


def lock_wait_seconds(text):
    return whole_number(text, 0, 86_400, "a whole number of seconds from 0 to 86400")


def ledger_lock_options(prog, args):
    """ledger_lock's options for a command: its --lock-wait, and one line on
    stderr when it has to wait."""
    def waiting(path):
        say(f"{prog}: waiting for another pay or settle to release {path} "
            f"(at most {args.lock_wait} s, --lock-wait)")
    return {"wait_s": args.lock_wait, "waiting": waiting}


LEDGER_SCHEMA_VERSION = 5  # the first with the ledger's tables


def look_before_writing(prog, db, out, look):
    """Run look(store) on `db` opened read-only, any schema from the
    ledger's first on: it refuses an option (Invalid) before the file is
    touched (not even upgraded), or gives (what is recorded, chunks) of a
    recorded step to print again, which needs no write access (a read-only
    file system), or None: the step must run.  -> an exit status, or None."""
    try:
        store = ReadOnlyStore(db, oldest=1)
    except StoreUnavailable:
        return None  # opening it for writing says why, or works (a -wal to join)
    try:
        found = look(store) if store.version >= LEDGER_SCHEMA_VERSION else None
        if found is None or store.version < latest_schema_version():
            return None  # the step prints it, after the upgrade its reads expect
        return write_output(prog, db, out, store, *found)
    except Invalid as invalid:
        return ledger_refusal(prog, invalid)
    except (StoreUnavailable, sqlite3.Error):
        return None  # the step reads it again, and says what fails
    finally:
        store.close()


def ledger_refusal(prog, invalid):
    where = f"--{invalid.field}" if invalid.field in LEDGER_OPTIONS else invalid.field
    say(f"{prog}: {where}: {invalid.message}; nothing changed")
    return 2


# ---------------------------------------------------------------------------
# Payout ledger, runs: each session paid once (pay, void-oversized)
# ---------------------------------------------------------------------------

RUNS_SQL = {
    "run_at": """
        SELECT id, pay_now_share, final_share, report_utc_offset FROM payout_runs
        WHERE until_us = ?""",
    # Only runs whose header committed: a staged run has no row here yet.
    "report_offsets": """
        SELECT first_day, report_utc_offset FROM report_offsets ORDER BY run_id""",
    # Read once per offset change: it scans the paid sessions.
    "latest_paid_session": "SELECT max(received_at_us) FROM sessions WHERE id <= ?",
    "offset_change_of_run": """
        SELECT first_day, report_utc_offset FROM report_offsets
        WHERE run_id = ? AND first_day IS NOT NULL""",
    "insert_report_offset": """
        INSERT INTO report_offsets (run_id, first_day, report_utc_offset) VALUES (?, ?, ?)""",
    "last_run": """
        SELECT id, last_session_id, until_us, report_utc_offset FROM payout_runs
        ORDER BY id DESC LIMIT 1""",
    "run_moved": "SELECT moved_sessions, moved_to_day FROM payout_runs WHERE id = ?",
    # Where the ledger took over: the first run's start (see plan_run).
    "first_run": "SELECT id, after_session_id, started_from FROM payout_runs ORDER BY id LIMIT 1",
    "oldest_session_upto": """
        SELECT received_at_us FROM sessions INDEXED BY sessions_by_time WHERE id <= ?
        ORDER BY received_at_us LIMIT 1""",
    # The largest id received before a run's until: the run pays every id up
    # to it that an earlier run did not, whatever their receive times.
    "last_session_before": """
        SELECT max(id) FROM sessions INDEXED BY sessions_by_time WHERE received_at_us < ?""",
    # A run's parts: per report day, property and user, by row id range, as
    # the rows of insert_part in its primary key's order (so that staging
    # appends).  Paid now: the estimate times the share (in millionths),
    # rounded down, split so that the product stays within 64 bits.  A
    # part's estimate above 9.2 billion USD makes sum() fail, never round.
    # A session received on a report day already settled (a clock step
    # backwards) is paid in the pool of :last_day instead (see plan_run).
    "run_parts": """
        SELECT :run, date(day * 86400, 'unixepoch'), property_id, user_id, sessions, estimated,
               CASE WHEN user_id IN {uncredited} THEN 0 ELSE
               estimated / 1000000 * :millionths + estimated % 1000000 * :millionths / 1000000 END
        FROM (SELECT CASE WHEN {day} IN (SELECT value FROM json_each(:settled))
                          THEN :last_day ELSE {day} END AS day,
                     coalesce(property_id, '') AS property_id, user_id,
                     count(*) AS sessions, sum(revenue_nano) AS estimated
              FROM sessions WHERE id > :after AND id <= :last AND {reported}
              GROUP BY 1, 2, 3 ORDER BY 1, 2, 3)""",
    # Sessions a run would pay with an estimate above MAX_ESTIMATE (stored
    # before the receiver refused them): how many, the largest, the first.
    "oversized_sessions": """
        SELECT count(*), max(revenue_nano), min(id) FROM sessions
        WHERE id > :after AND id <= :last AND revenue_nano > :at_most""",
    "session_and_user": "SELECT session_id, user_id FROM sessions WHERE id = ?",
    # void-oversized: the estimates no run has paid, kept in rejected, then 0.
    "reject_oversized": """
        INSERT INTO rejected (received_at_us, field, reason, raw_body)
        SELECT :now, 'your-estimated-revenue',
               'must be at most ' || :limit || ' USD: stored before the receiver refused it, as '
                   || (revenue_nano / 1000000000) || ' USD and '
                   || (revenue_nano % 1000000000) || ' nano-USD for session-id ' || session_id
                   || ' of user-id ' || user_id || '; its estimate set to 0 by void-oversized',
               CAST(raw_body AS BLOB)
        FROM sessions WHERE id > :after AND revenue_nano > :at_most ORDER BY id""",
    "void_oversized": """
        UPDATE sessions SET revenue_nano = 0 WHERE id > :after AND revenue_nano > :at_most""",
    "last_paid_session": "SELECT coalesce(max(last_session_id), 0) FROM payout_runs",
    "settled_day_numbers": """
        SELECT DISTINCT CAST(julianday(day) - 2440587.5 AS INTEGER) FROM settlement_days""",
    "sessions_on_days": """
        SELECT count(*) FROM sessions WHERE id > :after AND id <= :last AND {reported}
          AND {day} IN (SELECT value FROM json_each(:settled))""",
    "take_owed": "UPDATE ledger_balances SET owed_nano = owed_nano - ? WHERE user_id = ?",
    "insert_run": """
        INSERT INTO payout_runs
            (id, after_session_id, last_session_id, until_us, created_at_us, pay_now_share,
             final_share, report_utc_offset, users, sessions, estimated_nano, paid_now_nano,
             deducted_nano, withheld_nano, moved_sessions, moved_to_day, started_from)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
    "insert_withheld": """
        INSERT INTO payout_withheld (run_id, user_id, withheld_nano) VALUES (?, ?, ?)""",
    "insert_part": """
        INSERT INTO payout_parts
            (run_id, day, property_id, user_id, sessions, estimated_nano, paid_now_nano)
        VALUES (?, ?, ?, ?, ?, ?, ?)""",
    "insert_deduction": """
        INSERT INTO payout_deductions (run_id, user_id, deducted_nano) VALUES (?, ?, ?)""",
    "insert_line": """
        INSERT INTO payout_lines (run_id, user_id, sessions, estimated_nano, paid_now_nano)
        VALUES (?, ?, ?, ?, ?)""",
    "run_lines": f"""
        SELECT l.user_id, l.sessions, l.estimated_nano, l.paid_now_nano,
               coalesce(d.deducted_nano, 0), coalesce(w.withheld_nano, 0)
        FROM payout_lines l
        LEFT JOIN payout_deductions d ON d.run_id = l.run_id AND d.user_id = l.user_id
        LEFT JOIN payout_withheld w ON w.run_id = l.run_id AND w.user_id = l.user_id
        WHERE l.run_id = ? AND l.user_id NOT IN {SQL_UNCREDITED} ORDER BY l.user_id""",
    # What a run covered and paid nobody: the users UNCREDITED_USERS names.
    "run_uncredited": f"""
        SELECT coalesce(sum(sessions), 0), coalesce(sum(estimated_nano), 0) FROM payout_lines
        WHERE run_id = ? AND user_id IN {SQL_UNCREDITED}""",
}

# A share of the ledger: a plain decimal in [0, 1], at most 6 places, read by
# regex before Decimal so that no exponent or NaN form gets in.
LEDGER_SHARE = re.compile(r"0(?:\.[0-9]{1,6})?|1(?:\.0{1,6})?")

RUN_COLUMNS = ["run-id", "user-id", "sessions", "estimated-revenue", "paid-now", "deducted",
               "withheld"]


def parse_ledger_share(text, field):
    """'0.60' -> Decimal('0.6'), or Invalid naming the field."""
    if not isinstance(text, str) or not LEDGER_SHARE.fullmatch(text):
        raise Invalid(field, "must be a plain decimal from 0 to 1 with at most 6 places, "
                      f"such as 0.6, not {shown(text)}")
    return decimal.Decimal(text)


def share_text(share):
    """The canonical text stored with a run: Decimal('0.60') -> '0.6'."""
    return format(share.normalize(), "f") if share else "0"


@dataclass(frozen=True)
class RunPlan:
    previous_run_id: int | None
    after_id: int
    last_id: int
    until_us: int
    pay_now: decimal.Decimal
    final: decimal.Decimal
    days: ReportDays
    change: tuple | None  # (first day number or None, offset): recorded with this run
    parts: list  # rows of insert_part: (run, day, property, user, sessions, estimated, paid now)
    moved: int = 0  # sessions on days already settled, paid on moved_to instead
    moved_to: str | None = None
    started_from: str | None = None  # the first run's --from, as recorded


# A first run without --from refuses to pay a session received longer than
# this before its --until: such a history was most likely paid another way
# (window exports, the feed) before the ledger; --from says where it takes over.
FIRST_RUN_WINDOW_US = 7 * DAY_US
LEDGER_CURSOR = re.compile(r"[0-9]{1,19}-[0-9a-f]{8}")


@dataclass(frozen=True)
class LedgerStart:
    """Where the ledger takes over (pay --from): after the sessions received
    before an instant, or after a feed cursor's session."""

    text: str  # as recorded: an ISO 8601 UTC instant, or the cursor
    instant_us: int | None = None
    cursor: str | None = None


def parse_ledger_start(text):
    """--from: a feed cursor ('<row id>-<8 hex digits>') or an instant."""
    if LEDGER_CURSOR.fullmatch(text):
        return LedgerStart(text, cursor=text)
    try:
        instant = parse_instant(text)
    except ValueError:
        raise Invalid("from", f"must be a feed cursor or {TIME_FORMS_HELP}, "
                      f"not {shown(text)}") from None
    return LedgerStart(iso_utc(instant), instant_us=instant)


def start_after_id(conn, start, until_us):
    """The row id after which the first run pays, for its --from."""
    if start.cursor is None:
        if start.instant_us > until_us:
            raise Invalid("from", "is after --until: the first run would pay nothing it covers")
        [(newest,)] = conn.execute(RUNS_SQL["last_session_before"], (start.instant_us,)).fetchall()
        return newest or 0
    row_id, fingerprint = decode_feed_cursor(start.cursor)
    [(session_id, _)] = conn.execute(FEED_SQL["feed_cursor_row"], {"id": row_id}).fetchall()
    if session_id is None or session_fingerprint(session_id) != fingerprint:
        raise Invalid("from", f"names a session this database does not hold at {row_id} (a "
                      "cursor of another database, or from before a restore)")
    return row_id


def check_first_run_window(conn, last_id, until_us):
    """A first run told nothing (no --from) may pay only sessions received
    within FIRST_RUN_WINDOW_US before its --until."""
    row = conn.execute(RUNS_SQL["oldest_session_upto"], (last_id,)).fetchone()
    if row is not None and row[0] < until_us - FIRST_RUN_WINDOW_US:
        raise Invalid("from", f"this first run would pay every session since {iso_utc(row[0])}, "
                      f"more than {FIRST_RUN_WINDOW_US // DAY_US} days before --until: name "
                      "where the ledger takes over with --from (an instant or a feed cursor; "
                      "--from 1970-01-01 to pay them all), see docs/ledger.md")


def recorded_run(conn, until_us, pay_now, final, offset_minutes=None):
    """The id of the run recorded for `until_us`, or None; Invalid if it was
    recorded with other shares or another report offset (when one is asked
    for): history is never rewritten."""
    row = conn.execute(RUNS_SQL["run_at"], (until_us,)).fetchone()
    if row is None:
        return None
    run_id, pay_now_text, final_text, offset = row
    asked = [("pay-now-share", share_text(pay_now), share_text(decimal.Decimal(pay_now_text))),
             ("final-share", share_text(final), share_text(decimal.Decimal(final_text)))]
    if offset_minutes is not None:
        asked.append(("report-utc-offset", utc_offset_text(offset_minutes),
                      utc_offset_text(offset)))
    for field, wanted, stored in asked:
        if wanted != stored:
            raise Invalid(field, f"run {run_id} for this --until was recorded with {field} "
                          f"{stored}, not {wanted}: a recorded run never changes")
    return run_id


def check_shares(until_us, pay_now, final):
    """The refusals of a run that need no database."""
    if until_us >= now_us():
        raise Invalid("until", "must be in the past: a run pays finished time only")
    if pay_now > final:
        raise Invalid("pay-now-share", "must not be above the final share: the excess "
                      "would be taken back from every user at settlement")


def check_run(conn, until_us, pay_now, final, offset_minutes, start=None):
    """The id of the run recorded for `until_us`, or None for a new run; or
    Invalid: every refusal `pay` can make, on the ledger's tables alone.
    `start` (pay --from) is the first run's; given again later, it must be
    the recorded one."""
    check_shares(until_us, pay_now, final)
    first = None if start is None else conn.execute(RUNS_SQL["first_run"]).fetchone()
    if first is not None and first[2] != start.text:
        raise Invalid("from", f"the ledger took over {f'from {first[2]}' if first[2] else 'from the first session'} "
                      f"with run {first[0]}: --from names the first run's start, leave it out")
    run_id = recorded_run(conn, until_us, pay_now, final, offset_minutes)
    if run_id is not None:
        return run_id
    last = conn.execute(RUNS_SQL["last_run"]).fetchone()
    if last and until_us < last[2]:
        raise Invalid("until", f"is before {iso_utc(last[2])}, the until of run {last[0]}: "
                      "runs only go forward")
    return None


def run_report_days(conn, last, offset_minutes):
    """(the report days of a new run, the change it records or None).  The
    first run records its offset; a run asked for another offset than the
    newest recorded changes it from a day no earlier run paid (ReportDays.changed_to)."""
    days = report_days_of(conn.execute(RUNS_SQL["report_offsets"]).fetchall(), offset_minutes or 0)
    if last is None:
        return days, days.changes[-1]
    if offset_minutes is None or offset_minutes == days.offset:
        return days, None
    # After a clock step a run may have paid a session received after its until.
    [(latest_paid,)] = conn.execute(RUNS_SQL["latest_paid_session"], (last[1],)).fetchall()
    days = days.changed_to(offset_minutes, max(last[2], (latest_paid or 0) + 1))
    return days, days.changes[-1]


def plan_run(conn, until_us, pay_now, final, offset_minutes, start=None, window_us=None):
    """On a read snapshot, after check_run found no run recorded for
    `until_us`: the RunPlan of a new one.  `start`: see check_run.  With
    `window_us`, a first run without a start refuses sessions received longer
    than that before `until_us`."""
    last = conn.execute(RUNS_SQL["last_run"]).fetchone()
    previous_id, after_id = (last[0], last[1]) if last else (None, 0)
    days, change = run_report_days(conn, last, offset_minutes)
    if last is None and start is not None:
        after_id = start_after_id(conn, start, until_us)
    [(newest,)] = conn.execute(RUNS_SQL["last_session_before"], (until_us,)).fetchall()
    last_id = max(after_id, newest or 0)
    if last is None and start is None and window_us is not None:
        check_first_run_window(conn, last_id, until_us)
    check_no_oversized(conn, after_id, last_id)
    # A settled day's users are never charged for a session that reached it
    # later (a clock step backwards): it is paid on the run's last report day.
    settled = json.dumps([day for (day,) in conn.execute(RUNS_SQL["settled_day_numbers"])])
    last_day = days.day_of(until_us - 1)
    where = {"after": after_id, "last": last_id, "settled": settled}
    cut = {"day": days.sql(), "uncredited": SQL_UNCREDITED, "reported": SQL_REPORTED}
    # Counted only when a day is settled: a first run scans its sessions once.
    [(moved,)] = (conn.execute(RUNS_SQL["sessions_on_days"].format(**cut), where).fetchall()
                  if settled != "[]" else [(0,)])
    # Rows as SQLite gives them, staged as they are: no Python work per part.
    parts = conn.execute(RUNS_SQL["run_parts"].format(**cut), {
        **where, "run": (previous_id or 0) + 1, "last_day": last_day,
        "millionths": int(pay_now.scaleb(6))}).fetchall()  # exact: at most 6 places
    return RunPlan(previous_id, after_id, last_id, until_us, pay_now, final, days, change, parts,
                   moved, report_day_text(last_day) if moved else None,
                   start.text if last is None and start is not None else None)


MAX_ESTIMATE_NANOS = int(MAX_ESTIMATE) * NANOS_PER_USD


def check_no_oversized(conn, after_id, last_id):
    """Invalid naming the field when the run would pay a session above
    MAX_ESTIMATE: stored before postbacks were refused above it, it is no
    real estimate, and sums of such sessions can pass 64 bits."""
    [(count, largest, first)] = conn.execute(RUNS_SQL["oversized_sessions"], {
        "after": after_id, "last": last_id, "at_most": MAX_ESTIMATE_NANOS}).fetchall()
    if count:
        [(session_id, user_id)] = conn.execute(RUNS_SQL["session_and_user"], (first,)).fetchall()
        raise Invalid("your-estimated-revenue", (
            f"{plural(count, 'session')} to pay {'is' if count == 1 else 'are'} above "
            f"{MAX_ESTIMATE} USD, up to {nanos_to_usd(largest)} USD (the first: session-id "
            f"{shown(session_id, 40)} of user-id {shown(user_id, 40)}), stored before the "
            f"receiver refused estimates above {MAX_ESTIMATE} USD: no SPP session earns that "
            "much, and sums of such sessions can pass what 64-bit integers hold. Set them "
            "aside with `spp_server.py void-oversized` (each kept in rejected, its estimate "
            "set to 0), then pay again"))


def void_oversized(conn, _):
    """The write op of void-oversized: every session no run has paid with an
    estimate above MAX_ESTIMATE kept in `rejected`, then its estimate set to
    0 -> how many."""
    where = {"after": conn.execute(RUNS_SQL["last_paid_session"]).fetchone()[0],
             "at_most": MAX_ESTIMATE_NANOS, "limit": str(MAX_ESTIMATE), "now": now_us()}
    conn.execute(RUNS_SQL["reject_oversized"], where)
    return conn.execute(RUNS_SQL["void_oversized"], where).rowcount


@dataclass(slots=True)
class RunLine:
    """A user's line of a run: their parts summed (a mutable accumulator)."""

    sessions: int
    estimated: int
    paid: int  # paid now


def run_lines_of(parts):
    """{user: RunLine} summed over the user's parts."""
    lines = {}
    for _, _, _, user, sessions, estimated, paid in parts:
        line = lines.get(user)
        if line is None:
            lines[user] = RunLine(sessions, estimated, paid)
        else:
            line.sessions += sessions
            line.estimated += estimated
            line.paid += paid
    return lines


def record_run(plan, run_id, lines, conn, created_at_us):
    """The write op that makes a staged run real: the balances taken back and
    the run's header row, in one transaction; LedgerMoved if a run came first."""
    last = conn.execute(RUNS_SQL["last_run"]).fetchone()
    if (last[0] if last else None) != plan.previous_run_id:
        raise LedgerMoved()
    # A held user's pay-now is withheld whole (see hold_user); read here, in
    # the run's own transaction, so that a hold committed before it applies.
    held = {user for (user,) in conn.execute(ADJUSTMENTS_SQL["held_users"])}
    withheld = [(user, lines[user].paid) for user in sorted(held)
                if user in lines and lines[user].paid]
    # A carried balance is taken back from what the user is paid now, never below zero.
    taken = [(user, min(owed, lines[user].paid)) for user, owed in owed_balances(conn)
             if user in lines and lines[user].paid and user not in held]
    # The run's totals are its printed lines': the uncredited users' are not.
    paid = [line for user, line in lines.items() if user not in UNCREDITED_USERS]
    totals = [sum(line.sessions for line in paid), sum(line.estimated for line in paid),
              sum(line.paid for line in paid)]
    conn.execute(RUNS_SQL["insert_run"], (
        run_id, plan.after_id, plan.last_id, plan.until_us, created_at_us, share_text(plan.pay_now),
        share_text(plan.final), plan.days.offset, len(paid), *totals,
        sum(nanos for _, nanos in taken), sum(nanos for _, nanos in withheld), plan.moved,
        plan.moved_to, plan.started_from))
    if plan.change is not None:
        first, offset = plan.change
        conn.execute(RUNS_SQL["insert_report_offset"],
                     (run_id, None if first is None else report_day_text(first), offset))
    conn.executemany(RUNS_SQL["take_owed"], ((nanos, user) for user, nanos in taken))
    conn.executemany(RUNS_SQL["insert_deduction"], ((run_id, user, nanos) for user, nanos in taken))
    conn.executemany(RUNS_SQL["insert_withheld"], ((run_id, user, nanos) for user, nanos in withheld))
    return run_id


def pay_run(store, until_us, pay_now, final, offset_minutes, start=None, window_us=None,
            **lock):
    """Pay every session after the last run up to `until_us` (or find the run
    already recorded for it): -> run id.  Computed on a read snapshot; its
    parts and lines are staged in short transactions, then one transaction
    records the run (see write_in_chunks), then the ledger journal.  `start`
    and `window_us`: see plan_run; `lock`: ledger_lock's options."""
    with ledger_step(store, **lock) as journal:
        for _ in range(LEDGER_RETRIES):
            with store.snapshot() as conn:
                recorded_id = check_run(conn, until_us, pay_now, final, offset_minutes, start)
                if recorded_id is not None:
                    return recorded_id
                plan = plan_run(conn, until_us, pay_now, final, offset_minutes, start, window_us)
            clear_unfinished(store)
            run_id = (plan.previous_run_id or 0) + 1
            lines = run_lines_of(plan.parts)
            write_in_chunks(store, RUNS_SQL["insert_part"], plan.parts)
            write_in_chunks(store, RUNS_SQL["insert_line"],
                            ((run_id, user, line.sessions, line.estimated, line.paid)
                             for user, line in sorted(lines.items())))
            try:
                store.write(functools.partial(record_run, plan, run_id, lines))
            except LedgerMoved:
                continue
            journal.record("run", run_id)
            return run_id
    raise StoreUnavailable("other ledger steps kept committing meanwhile; run it again")


def run_output(store, run_id, fmt):
    """A run's lines, one per user ordered by user-id, as CSV or NDJSON: what
    the publisher's app credits (paid-now is after deducted)."""
    escape = spreadsheet_text if fmt == "csv" else str
    rows = ((run_id, escape(user), sessions, nanos_to_usd(estimated),
             nanos_to_usd(paid - deducted - withheld), nanos_to_usd(deducted), nanos_to_usd(withheld))
            for user, sessions, estimated, paid, deducted, withheld in store.stream(
                RUNS_SQL["run_lines"], (run_id,)))
    return in_chunks(encode_values(rows, RUN_COLUMNS, fmt))


def build_pay_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py pay",
        description="Pay a run: every session received since the end of the last run up to "
        "--until, each in exactly one run. Writes the run's lines (one per user, ordered by "
        "user-id; paid-now is what to credit) to stdout. Asked again with the same --until "
        "and shares, it writes the recorded run again, byte for byte, and pays nothing. "
        "Safe while the server runs. " + LEDGER_EXIT_HELP,
    )
    add_db_option(parser, environ, "SQLite database file; never created")
    parser.add_argument("--until", required=True,
                        help=f"end of the run, excluded, in the past: {TIME_FORMS_HELP}")
    parser.add_argument("--pay-now-share", required=True,
                        help="share of the estimated revenue paid now, from 0 to 1, at most "
                        "6 places, e.g. 0.6; at most --final-share")
    parser.add_argument("--final-share", required=True,
                        help="share of the booked revenue users get in the end, e.g. 0.9: "
                        "settle pays the rest of it (recorded with the run)")
    parser.add_argument("--from", dest="start", metavar="FROM",
                        help="the first run only: where the ledger takes over from window "
                        "exports or the feed, a feed cursor or an instant (sessions received "
                        "before it are never paid by the ledger); without it a first run "
                        f"refuses sessions received more than {FIRST_RUN_WINDOW_US // DAY_US} "
                        "days before --until")
    add_report_offset_option(parser, environ, "pay")
    add_lines_format_option(parser)
    add_lock_wait_option(parser, environ)
    return parser


def run_pay(argv, environ, out):
    parser = build_pay_parser(environ)
    args = parse_arguments(parser, argv)
    try:
        until = parse_instant(args.until)
    except ValueError:
        return ledger_refusal(parser.prog, Invalid(
            "until", f"must be {TIME_FORMS_HELP}, not {shown(args.until)}"))

    try:  # refused before the database is opened, as an older schema would be upgraded
        shares = (parse_ledger_share(args.pay_now_share, "pay-now-share"),
                  parse_ledger_share(args.final_share, "final-share"))
        check_shares(until, *shares)
        start = None if args.start is None else parse_ledger_start(args.start)
    except Invalid as invalid:
        return ledger_refusal(parser.prog, invalid)

    def committed(run_id):
        return f"run {run_id} is committed (the same --until prints it again)"

    def look(store):
        # A restored copy's run may be another one, and a run not journaled
        # yet has not released its lines: both are left to the step.
        unreleased = check_journal_read_only(store)
        with store.snapshot() as conn:
            run_id = check_run(conn, until, *shares, args.report_utc_offset, start)
        if run_id is None or ("run", run_id) in unreleased:
            return None
        return committed(run_id), run_output(store, run_id, args.format)

    def step(store):
        run_id = pay_run(store, until, *shares, args.report_utc_offset, start,
                         FIRST_RUN_WINDOW_US, **ledger_lock_options(parser.prog, args))
        for first, offset in store.read(RUNS_SQL["offset_change_of_run"], (run_id,)):
            begins = iso_utc(ReportDays.fixed(offset).start_us(report_day_number(first)))
            say(f"{parser.prog}: run {run_id} recorded the report offset "
                f"{utc_offset_text(offset)} from report day {first} on (it starts at {begins}; "
                "the day before ends there)")
        [(moved, moved_to)] = store.read(RUNS_SQL["run_moved"], (run_id,))
        if moved:
            say(f"{parser.prog}: run {run_id}: {moved} session(s) received on report days "
                f"already settled (a clock step backwards?) are paid in the pool of "
                f"{moved_to}, not charged to the settled days' users")
        return committed(run_id), run_output(store, run_id, args.format)

    return run_on_database(parser.prog, args.db, out, step, look=look)


def build_void_oversized_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py void-oversized",
        description=f"Set aside the estimates above {MAX_ESTIMATE} USD that no run has paid: "
        "stored before the receiver refused them, they are no real SPP estimates, and pay "
        "refuses to pay them. Each is kept in rejected (its body, and its session-id, user-id "
        "and amount in the reason) and its session's estimate set to 0; the session still "
        "counts. Restart the server afterwards: the web view and /metrics keep running totals. "
        "Exit 0, or 1 when the database cannot be written.",
    )
    add_db_option(parser, environ, "SQLite database file; never created")
    return parser


def run_void_oversized(argv, environ, out):
    parser = build_void_oversized_parser(environ)
    args = parse_arguments(parser, argv)

    def step(store):
        voided = store.write(void_oversized)
        return "the change is committed", [
            f"{plural(voided, 'session')} above {MAX_ESTIMATE} USD set to 0, kept in rejected\n"
            .encode()]

    return run_on_database(parser.prog, args.db, out, step)


# ---------------------------------------------------------------------------
# Payout ledger, settlements: the buffer released (settle)
# ---------------------------------------------------------------------------

SETTLEMENTS_SQL = {
    "add_owed": """
        INSERT INTO ledger_balances (user_id, owed_nano) VALUES (?, ?)
        ON CONFLICT (user_id) DO UPDATE SET owed_nano = owed_nano + excluded.owed_nano""",
    "run_final_shares": "SELECT id, final_share FROM payout_runs",
    "booked_pools": """
        SELECT day, property_id, sum(revenue_nano / 1000000000), sum(revenue_nano % 1000000000)
        FROM booked_revenue GROUP BY day, property_id ORDER BY day, property_id""",
    "booked_pool": """
        SELECT coalesce(sum(revenue_nano / 1000000000), 0), coalesce(sum(revenue_nano % 1000000000), 0)
        FROM booked_revenue WHERE day = ? AND property_id = ?""",
    # Every recorded run's parts of the days (a JSON list): a search of the
    # primary key per run and day (CROSS JOIN keeps the runs outer, where
    # SQLite would rather scan every part), none of an unfinished run's.
    "parts_of_days": """
        SELECT p.run_id, p.day, p.property_id, p.user_id, p.sessions, p.estimated_nano,
               p.paid_now_nano
        FROM payout_runs r CROSS JOIN payout_parts p ON p.run_id = r.id
        WHERE p.day IN (SELECT value FROM json_each(?))""",
    # Summed per run, day and property: no SQL sum spans two runs' parts
    # (Python adds the runs up, as when each run was a query of its own).
    "run_day_property_parts": """
        SELECT p.day, p.property_id, sum(p.sessions), sum(p.estimated_nano),
               sum(p.paid_now_nano)
        FROM payout_runs r CROSS JOIN payout_parts p ON p.run_id = r.id
        WHERE p.day IN (SELECT value FROM json_each(?))
        GROUP BY r.id, p.day, p.property_id""",
    # Per [day, start, end] of a JSON list: its day, end, and the first and
    # last session received in [start, end).
    "sessions_of_days": """
        SELECT json_extract(d.value, '$[0]'), json_extract(d.value, '$[2]'),
               (SELECT min(id) FROM sessions INDEXED BY sessions_by_time
                WHERE received_at_us >= json_extract(d.value, '$[1]')
                  AND received_at_us < json_extract(d.value, '$[2]')),
               (SELECT max(id) FROM sessions INDEXED BY sessions_by_time
                WHERE received_at_us >= json_extract(d.value, '$[1]')
                  AND received_at_us < json_extract(d.value, '$[2]'))
        FROM json_each(?) d""",
    "last_settlement": "SELECT max(id) FROM settlements",
    "settled_pool_keys": "SELECT DISTINCT day, property_id FROM settlement_days",
    # Every settlement of the days (a JSON list): see last_settled.
    "settled_pools_of_days": """
        SELECT day, property_id, settlement_id, by_property, booked_nano, sessions, estimated_nano
        FROM settlement_days WHERE day IN (SELECT value FROM json_each(?))""",
    # What each user's earlier lines of the pools (a JSON list of [day,
    # property]) moved: top-ups less balances carried (lines of a committed
    # settlement only: a settlement_days row is its header's).
    "earlier_pool_lines": """
        SELECT d.day, d.property_id, l.user_id, l.top_up_nano - l.carried_nano,
               l.written_off_nano - l.written_back_nano, l.held
        FROM json_each(?) p
        JOIN settlement_days d ON d.day = json_extract(p.value, '$[0]')
                              AND d.property_id = json_extract(p.value, '$[1]')
        JOIN settlement_lines l ON l.settlement_id = d.settlement_id AND l.day = d.day
                               AND l.property_id = d.property_id""",
    # Balances of the pools written off for their age: the user keeps them, as
    # if written off when settled (see pool_lines).
    "pools_balance_write_offs": """
        SELECT b.day, b.property_id, b.user_id, sum(b.written_off_nano)
        FROM json_each(?) p
        JOIN balance_write_off_lines b ON b.day = json_extract(p.value, '$[0]')
                                      AND b.property_id = json_extract(p.value, '$[1]')
        GROUP BY b.day, b.property_id, b.user_id""",
    "insert_settlement": """
        INSERT INTO settlements (id, created_at_us, report_utc_offset, write_off, pools,
                                 booked_nano, top_up_nano, carried_nano, written_off_nano,
                                 deducted_nano)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
    "insert_settlement_day": """
        INSERT INTO settlement_days
            (day, property_id, settlement_id, by_property, booked_nano, sessions, estimated_nano,
             paid_now_nano, final_nano, top_up_nano, carried_nano, written_off_nano)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
    "insert_settlement_line": """
        INSERT INTO settlement_lines
            (settlement_id, day, property_id, user_id, sessions, estimated_nano,
             booked_part_nano, final_nano, paid_now_nano, top_up_nano, carried_nano,
             written_off_nano, correction, deducted_nano, written_back_nano, held)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
    "settlement_lines_of": """
        SELECT settlement_id, day, property_id, user_id, sessions, estimated_nano,
               booked_part_nano, final_nano, paid_now_nano, top_up_nano, carried_nano,
               written_off_nano, correction, deducted_nano, written_back_nano, held
        FROM settlement_lines WHERE settlement_id = ? ORDER BY day, property_id, user_id""",
}

SETTLEMENT_COLUMNS = ["settlement-id", "day", "property-id", "user-id", "sessions",
                      "estimated-revenue", "booked-part", "final", "paid-now", "top-up",
                      "carried", "written-off", "kind", "deducted"]


@functools.lru_cache(maxsize=64)
def share_millionths(text):
    """A recorded share -> an integer of millionths: '0.9' -> 900000."""
    return int(decimal.Decimal(text).scaleb(6))


def largest_remainder(total, weights):
    """Share the integer `total` in proportion to `weights` (in order of the
    users' ids): each gets the floor of its exact quota, and what is left (one
    nano each) goes to the largest remainders, ties to the first user-id.
    The parts sum to `total` exactly."""
    whole = sum(weights)
    if not whole:
        return [0] * len(weights)
    parts, remainders = [], []
    for w in weights:
        part, remainder = divmod(total * w, whole)
        parts.append(part)
        remainders.append(remainder)
    # nlargest is sorted(reverse=True)[:n], stable: equal remainders keep user-id order.
    for i in heapq.nlargest(total - sum(parts), range(len(weights)), key=remainders.__getitem__):
        parts[i] += 1
    return parts


@dataclass(slots=True)
class PoolUser:
    """A Pool.users entry: one user's parts of the pool summed (an accumulator)."""

    sessions: int
    estimated: int
    paid: int  # paid now
    # The final share (millionths) times sessions and times estimates.
    share_by_sessions: int
    share_by_estimates: int
    # None before the first settlement of the pool; then top-ups less balances carried.
    adjustment: int | None = None
    standing: int = 0  # the standing write-off: written off, less written back
    held: bool = False


# A row of insert_settlement_line, in its columns' order.
SettlementLine = collections.namedtuple("SettlementLine", (
    "settlement_id", "day", "property_id", "user_id", "sessions", "estimated", "booked_part",
    "final", "paid", "top_up", "carried", "written_off", "correction", "deducted",
    "written_back", "held"))

# A row of insert_settlement_day, in its columns' order.
SettlementDay = collections.namedtuple("SettlementDay", (
    "day", "property_id", "settlement_id", "by_property", "booked", "sessions", "estimated",
    "paid", "final", "top_up", "carried", "written_off"))


@dataclass
class Pool:
    """One report day and property (or whole day) to settle."""

    day: str
    property_id: str
    by_property: int
    booked: int
    users: dict  # user -> PoolUser

    def totals(self):
        users = self.users.values()
        return (sum(u.sessions for u in users), sum(u.estimated for u in users),
                sum(u.paid for u in users))


def pool_lines(pool, write_off, settlement_id):
    """Per user, in user-id order, a SettlementLine (deducted is set later by
    take_owed_from_top_ups).  The final amount is the
    booked part times the final shares of the runs that paid the user's
    sessions (weighted by their estimates), rounded down once.  A held user
    weighs nothing: the booked figure is shared among the others.  An
    uncredited user (UNCREDITED_USERS) weighs as any other, and their booked
    part is the margin's: final 0 (line_kind tells such lines apart)."""
    users = sorted(pool.users)
    counted = [pool.users[u] for u in users if not pool.users[u].held]
    by_sessions = not any(u.estimated for u in counted)  # no estimate to weigh by
    weights = [0 if entry.held else entry.sessions if by_sessions else entry.estimated
               for entry in map(pool.users.__getitem__, users)]
    booked_parts = largest_remainder(pool.booked, weights)
    lines = []
    key = (settlement_id, pool.day, pool.property_id)
    for user, weight, booked_part in zip(users, weights, booked_parts):
        entry = pool.users[user]
        sessions, estimated, paid, adjustment, standing = (
            entry.sessions, entry.estimated, entry.paid, entry.adjustment, entry.standing)
        correction = int(adjustment is not None)
        line = functools.partial(SettlementLine, *key, user, sessions, estimated, paid=paid,
                                 correction=correction, deducted=0)
        if user in UNCREDITED_USERS:  # its booked part is the margin's; paid nothing
            lines.append(line(booked_part=booked_part, final=0, top_up=0, carried=0,
                              written_off=0, written_back=0, held=0))
            continue
        if entry.held:  # the publisher decides with release (see hold_user)
            lines.append(line(booked_part=0, final=0, top_up=0, carried=0, written_off=0,
                              written_back=0, held=1))
            continue
        # Exact in integers: a share has at most 6 places.
        shared = entry.share_by_sessions if by_sessions else entry.share_by_estimates
        final = booked_part * shared // (weight * 10**6) if weight else 0
        # Against what the user holds for the pool so far (written-off amounts included).
        delta = final - paid - (adjustment or 0)
        top_up, excess = max(delta, 0), max(-delta, 0)
        # What the user holds above the final amount was forgiven up to the
        # standing write-off: only the rest is short; a write-off no longer
        # needed is written back (a correction never charges it again).
        short, written_back = max(excess - standing, 0), max(standing - excess, 0)
        lines.append(line(booked_part=booked_part, final=final, top_up=top_up,
                          carried=0 if write_off else short,
                          written_off=short if write_off else 0, written_back=written_back,
                          held=0))
    return lines


def take_owed_from_top_ups(computed, owed):
    """Take each user's balance (owed before, plus what this settlement
    carries) back from their top-ups, in day and property order, never below
    zero: the lines' `deducted`.  -> [(pool, lines)] with it set."""
    remaining = collections.Counter(owed)
    for _, lines in computed:
        for line in lines:
            if line.carried:
                remaining[line.user_id] += line.carried
    if not +remaining:
        return computed  # no one owes: nothing to take (most settlements)
    taken = []
    for pool, lines in computed:
        new_lines = []
        for line in lines:
            user = line.user_id
            deducted = min(remaining[user], line.top_up)
            if deducted:
                remaining[user] -= deducted
                line = line._replace(deducted=deducted)
            new_lines.append(line)
        taken.append((pool, new_lines))
    return taken


def add_part(users, share, user, sessions, estimated, paid, held):
    """One part of a pool added to its users (see Pool.users).  The final
    shares of the runs are summed weighted by sessions and by estimates, so
    that pool_lines applies them in proportion to either."""
    entry = users.get(user)
    if entry is None:
        users[user] = PoolUser(sessions, estimated, paid, share * sessions, share * estimated,
                               held=user in held)
    else:
        entry.sessions += sessions
        entry.estimated += estimated
        entry.paid += paid
        entry.share_by_sessions += share * sessions
        entry.share_by_estimates += share * estimated


def add_earlier_settlements(conn, pools):
    """To the users of each pool settled before: what their earlier lines of
    the pool moved (top-ups less balances carried), their standing
    write-off, and whether they were held then (a user settled as held stays
    out of the pool's sharing); balances of the pool written off for their
    age count as written off at settlement.  Two queries over every pool."""
    by_key = {(pool.day, pool.property_id): pool.users for pool in pools}
    keys = json.dumps(sorted(by_key))
    for day, prop, user, adjustment, written_off, held in conn.execute(
            SETTLEMENTS_SQL["earlier_pool_lines"], (keys,)):
        if (entry := by_key[day, prop].get(user)) is not None:
            entry.adjustment = (entry.adjustment or 0) + adjustment
            entry.standing += written_off
            entry.held = entry.held or bool(held)
    for day, prop, user, written_off in conn.execute(SETTLEMENTS_SQL["pools_balance_write_offs"], (keys,)):
        if (entry := by_key[day, prop].get(user)) is not None:
            entry.adjustment = (entry.adjustment or 0) + written_off
            entry.standing += written_off


def paid_days(conn, days, last, booked_days):
    """The days of `booked_days` whose sessions were all paid by the
    ledger's runs: none received after the last run, none before the
    ledger took over (paid another way: never settled here).  One query."""
    bounds = [[day, *day_bounds_us(day, days)] for day in sorted(booked_days)]
    taken_over_after = conn.execute(RUNS_SQL["first_run"]).fetchone()[1]
    return {day for day, end, oldest, newest in conn.execute(
                SETTLEMENTS_SQL["sessions_of_days"], (json.dumps(bounds),))
            # None after the last run (a clock step), none before the ledger took over.
            if end <= last[2] and (newest is None or newest <= last[1])
            and (oldest is None or oldest > taken_over_after)}


def pending_without_booked(conn, booked, paid):
    """What stays pending because no booked row can ever settle it: on each
    paid day (of the set `paid`) booked by property, the parts of a property
    (or of sessions without one) that has no booked row.  -> [record], by
    day and property.  One query over every run and day."""
    booked_props = collections.defaultdict(set)
    for day, prop, *_ in booked:
        booked_props[day].add(prop)
    # A whole-day pool takes every property.
    days = {day for day, props in booked_props.items() if props != {""} and day in paid}
    sums = collections.defaultdict(lambda: [0, 0, 0])
    for day, prop, *amounts in conn.execute(SETTLEMENTS_SQL["run_day_property_parts"],
                                            (json.dumps(sorted(days)),)):
        if prop not in booked_props[day]:
            sums[day, prop] = [a + b for a, b in zip(sums[day, prop], amounts)]
    return [{"day": day, "property-id": prop, "sessions": n,
             "estimated-revenue": nanos_to_usd(estimated), "paid-now": nanos_to_usd(paid_now),
             "why": "no booked row for this property on a day booked by property"
             if prop else "sessions without a property-id, on a day whose booked rows "
             "all have one"} for (day, prop), (n, estimated, paid_now) in sorted(sums.items())]


def users_by_pool(conn, keys, by_property_days):
    """{(day, property): {user: PoolUser}} of the pools `keys`, from every
    run's parts of their days: a day booked by property pools each
    property's parts apart (a property without a pool stays pending), a
    whole day pools all of them under property ''.  One query over every
    run and day."""
    final_millionths = {run: share_millionths(share)
                        for run, share in conn.execute(SETTLEMENTS_SQL["run_final_shares"])}
    held = {user for (user,) in conn.execute(ADJUSTMENTS_SQL["held_users"])}
    pools = {key: {} for key in keys}
    for run, day, prop, user, sessions, estimated, paid in conn.execute(
            SETTLEMENTS_SQL["parts_of_days"], (json.dumps(sorted({day for day, _ in keys})),)):
        if (users := pools.get((day, prop if day in by_property_days else ""))) is not None:
            add_part(users, final_millionths[run], user, sessions, estimated, paid, held)
    return pools


def last_settled(conn, days):
    """How `days` were last settled: ({day: by_property}, {(day, property):
    (booked, sessions, estimated)}), each of its newest settlement.  One query."""
    newest_of_day, newest_of_pool = {}, {}
    for day, prop, settlement_id, by_property, *state in conn.execute(
            SETTLEMENTS_SQL["settled_pools_of_days"], (json.dumps(sorted(days)),)):
        if newest_of_day.get(day, (0,))[0] < settlement_id:
            newest_of_day[day] = (settlement_id, by_property)
        if newest_of_pool.get((day, prop), (0,))[0] < settlement_id:
            newest_of_pool[day, prop] = (settlement_id, tuple(state))
    return ({day: by_property for day, (_, by_property) in newest_of_day.items()},
            {key: state for key, (_, state) in newest_of_pool.items()})


def dropped_pools(conn, booked, blocked_days):
    """[Unsettled] of each pool settled before whose booked row a revision
    dropped (its users were paid on it); a blocked day is named once already."""
    booked_keys = {(day, prop) for day, prop, *_ in booked}
    return [Unsettled(day, prop, "was settled against booked revenue that is no longer "
                      "stored: re-import its report with that row (with 0 if it truly earned "
                      "nothing)")
            for day, prop in conn.execute(SETTLEMENTS_SQL["settled_pool_keys"])
            if (day, prop) not in booked_keys and day not in blocked_days]


def pending_warning(pending):
    """A pending_without_booked record as settle's warning."""
    where = f" property {pending['property-id']}" if pending["property-id"] else ""
    return (f"{pending['day']}{where}: {pending['sessions']} sessions estimated at "
            f"{pending['estimated-revenue']} (paid now {pending['paid-now']}) stay pending: "
            f"{pending['why']}")


@dataclass
class Settleable:
    """What settle_pools finds on a snapshot."""

    fingerprint: tuple  # (last run id, last settlement id): record_settlement checks it
    offset: int  # the newest report offset, recorded with the settlement
    pools: list  # [Pool] to settle: new, or changed since their last settlement
    problems: list = dataclasses.field(default_factory=list)  # [Unsettled]: left alone, and why
    warnings: list = dataclasses.field(default_factory=list)  # [str]


def settle_pools(conn):
    """On a read snapshot: the Settleable of every report day (and property)
    with booked revenue whose sessions were all paid in runs and that is new
    or changed since its last settlement; the pools that cannot be settled,
    each with why; what stays pending for want of a booked row, and booked
    rows that match no session, as warnings.  A bounded number of queries,
    each over every pool (not one per run per pool)."""
    last = conn.execute(RUNS_SQL["last_run"]).fetchone()
    last_settlement = conn.execute(SETTLEMENTS_SQL["last_settlement"]).fetchone()[0]
    if last is None:
        return Settleable((None, last_settlement), 0, [])
    run_id, _, _, offset = last
    days = report_days_of(conn.execute(RUNS_SQL["report_offsets"]).fetchall(), offset)
    booked = conn.execute(SETTLEMENTS_SQL["booked_pools"]).fetchall()
    paid = paid_days(conn, days, last, {day for day, *_ in booked})
    days_by_property = {day for day, prop, *_ in booked if prop != ""}
    users = users_by_pool(conn, {(day, prop) for day, prop, *_ in booked if day in paid},
                          days_by_property)
    settled_by_property, settled_pools = last_settled(conn, paid)
    found = Settleable((run_id, last_settlement), offset, [])
    blocked_days = set()
    for day, prop, whole, rest in booked:
        if day in blocked_days or day not in paid:
            continue
        by_property = int(day in days_by_property)
        pool = Pool(day, prop, by_property, joined_nanos(whole, rest), users[day, prop])
        if not pool.users and pool.booked:
            found.warnings.append(str(Unsettled(
                day, prop, f"booked {nanos_to_usd(pool.booked)} that matches no session paid: "
                "all of it is the margin's (is the property-id written as in the postbacks?)")))
        # Per day, not per pool: an import with the other breakdown replaces
        # the day's rows, so its pools are new keys that would pay it twice.
        if settled_by_property.get(day, by_property) != by_property:
            how = "by property" if settled_by_property[day] else "as a whole day"
            found.problems.append(Unsettled(day, "", f"was settled {how} but its booked rows "
                                            "now are not: re-import its report as it was"))
            blocked_days.add(day)
            continue
        if settled_pools.get((day, prop)) == (pool.booked, *pool.totals()[:2]):
            continue  # settled, and nothing changed since
        found.pools.append(pool)
    add_earlier_settlements(conn, [pool for pool in found.pools
                                   if (pool.day, pool.property_id) in settled_pools])
    found.problems += dropped_pools(conn, booked, blocked_days)
    found.warnings += map(pending_warning, pending_without_booked(conn, booked, paid))
    return found


@dataclass(frozen=True)
class Unsettled:
    """A pool (or day) that settle left alone, and why."""

    day: str
    property_id: str
    why: str

    def __str__(self):
        return f"{self.day}{f' property {self.property_id}' if self.property_id else ''} {self.why}"


def settlement_line_rows(computed):
    """The lines of every pool, to be staged in user-id order (then day and
    property): both the primary key and settlement_lines_by_user then grow
    at a few places, so a staged chunk writes few pages (in pool order, each
    chunk would rewrite index pages all over the table; see docs/performance.md)."""
    rows = list(itertools.chain.from_iterable(lines for _, lines in computed))
    rows.sort(key=operator.attrgetter("user_id"))  # stable: a user's pools stay in day, property order
    return rows


def settled_pool_rows(settlement_id, computed):
    """The settlement_days rows of the computed pools: each pool's state and
    its final, top-up, carried and (net of written back) written-off amounts
    summed over its lines."""
    return [SettlementDay(pool.day, pool.property_id, settlement_id, pool.by_property,
                          pool.booked, *pool.totals(), sum(line.final for line in lines),
                          sum(line.top_up for line in lines),
                          sum(line.carried for line in lines),
                          sum(line.written_off - line.written_back for line in lines))
            for pool, lines in computed]


def balance_changes(computed):
    """[(user, carried - deducted)] over every pool, in user-id order, where
    not zero: one statement per user keeps the last transaction short."""
    change = collections.Counter()
    for _, lines in computed:
        for line in lines:
            if line.carried or line.deducted:
                change[line.user_id] += line.carried - line.deducted
    return sorted((user, nanos) for user, nanos in change.items() if nanos)


def record_settlement(fingerprint, offset, settlement_id, pools, pool_rows, changes, deducted,
                      write_off, conn, created_at_us):
    """The write op that makes a staged settlement real: its header, its
    pools and the balances carried and taken back, in one transaction;
    LedgerMoved if a run, a settlement or a booked figure of its pools changed
    since it was computed."""
    last = conn.execute(RUNS_SQL["last_run"]).fetchone()
    now_print = (last and last[0], conn.execute(SETTLEMENTS_SQL["last_settlement"]).fetchone()[0])
    if now_print != fingerprint or any(
            joined_nanos(*conn.execute(SETTLEMENTS_SQL["booked_pool"], (p.day, p.property_id)).fetchone())
            != p.booked for p in pools):
        raise LedgerMoved()
    conn.execute(SETTLEMENTS_SQL["insert_settlement"], (
        settlement_id, created_at_us, offset, int(write_off), len(pools),
        sum(pool.booked for pool in pools), sum(row.top_up for row in pool_rows),
        sum(row.carried for row in pool_rows), sum(row.written_off for row in pool_rows),
        deducted))
    conn.executemany(SETTLEMENTS_SQL["insert_settlement_day"], pool_rows)
    conn.executemany(SETTLEMENTS_SQL["add_owed"], ((u, n) for u, n in changes if n > 0))
    conn.executemany(RUNS_SQL["take_owed"], ((-n, u) for u, n in changes if n < 0))
    return settlement_id


def settle(store, write_off=False, problems=None, warnings=None, **lock):
    """Settle what can be settled: -> the new settlement's id, or None when
    there was nothing to settle.  Staged like a run (see pay_run).  The
    pools it could not settle, and its warnings, are added to the two
    lists (see settle_pools).  `lock`: ledger_lock's options."""
    with ledger_step(store, **lock) as journal:
        for _ in range(LEDGER_RETRIES):
            with store.snapshot() as conn:
                check_booked_bound(conn)
                found = settle_pools(conn)
                owed = dict(owed_balances(conn))
            for given, new in ((problems, found.problems), (warnings, found.warnings)):
                if given is not None:
                    given[:] = new
            if not found.pools:
                return None
            clear_unfinished(store)
            settlement_id = (found.fingerprint[1] or 0) + 1
            computed = take_owed_from_top_ups(
                [(pool, pool_lines(pool, write_off, settlement_id)) for pool in found.pools],
                owed)
            write_in_chunks(store, SETTLEMENTS_SQL["insert_settlement_line"], settlement_line_rows(computed))
            try:
                store.write(functools.partial(
                    record_settlement, found.fingerprint, found.offset, settlement_id, found.pools,
                    settled_pool_rows(settlement_id, computed), balance_changes(computed),
                    sum(line.deducted for _, lines in computed for line in lines), write_off))
            except LedgerMoved:
                continue
            journal.record("settlement", settlement_id)
            return settlement_id
    raise StoreUnavailable("other ledger steps kept committing meanwhile; run it again")


def line_kind(user, correction, held):
    """A settlement line's kind, each from its own column: `unattributed` for
    a user UNCREDITED_USERS names (their booked part is the margin's), `held`
    for a user held when settled (sharing nothing), else `correction` for a
    pool settled before (settlement_lines.correction is only that), or
    `settlement`."""
    if user in UNCREDITED_USERS:
        return "unattributed"
    return "held" if held else "correction" if correction else "settlement"


def settlement_values(row):
    """A settlement_lines row -> its values in the order of SETTLEMENT_COLUMNS."""
    (settlement_id, day, prop, user, sessions, estimated, booked_part, final, paid, top_up,
     carried, written_off, correction, deducted, written_back, held) = row
    return (settlement_id, day, prop, user, sessions, nanos_to_usd(estimated),
            nanos_to_usd(booked_part), nanos_to_usd(final), nanos_to_usd(paid),
            nanos_to_usd(top_up - deducted), nanos_to_usd(carried),
            signed_usd(written_off - written_back), line_kind(user, correction, held),
            nanos_to_usd(deducted))


def settlement_record(row):
    return dict(zip(SETTLEMENT_COLUMNS, settlement_values(row)))


def settlement_output(store, settlement_id, fmt):
    """A settlement's lines (per day, property and user) as CSV or NDJSON: the
    top-ups to credit, the balances carried."""
    rows = map(settlement_values, store.stream(SETTLEMENTS_SQL["settlement_lines_of"], (settlement_id,)))
    if fmt == "csv":
        rows = ((sid, day, spreadsheet_text(prop), spreadsheet_text(user), *rest)
                for sid, day, prop, user, *rest in rows)
    return in_chunks(encode_values(rows, SETTLEMENT_COLUMNS, fmt))


def build_settle_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py settle",
        description="Settle every report day (and property, where the booked rows have one) "
        "with booked revenue whose sessions were all paid in runs and that is not settled "
        "yet, or whose booked figure changed since (a correcting line). Writes the "
        "settlement's lines (per day, property and user; top-up is what to credit) to stdout. "
        "Safe while the server runs. " + LEDGER_EXIT_HELP,
    )
    add_db_option(parser, environ, "SQLite database file; never created")
    parser.add_argument("--settlement", type=positive_int, metavar="ID",
                        help="settle nothing; write the lines of settlement ID again (after "
                        "a crash between its commit and its output, say)")
    parser.add_argument("--write-off", action="store_true",
                        help="write off what a user was paid above their final amount, "
                        "instead of carrying it as a balance taken back from later runs")
    add_lines_format_option(parser)
    add_lock_wait_option(parser, environ)
    return parser


def run_settle(argv, environ, out):
    parser = build_settle_parser(environ)
    args = parse_arguments(parser, argv)
    if args.write_off and args.settlement is not None:
        return ledger_refusal(parser.prog, Invalid(
            "write-off", "settle --settlement ID prints a recorded settlement again and "
            "settles nothing, so it cannot write anything off"))

    def recorded(store):
        if not store.read(FRAME_SQL["settlement_exists"], (args.settlement,)):
            raise Invalid("settlement", f"there is no settlement {args.settlement}")
        return None, settlement_output(store, args.settlement, args.format)

    def look(store):  # read-only: the journal checked first, as the step does
        if ("settlement", args.settlement) in check_journal_read_only(store):
            return None  # not journaled yet: the step journals it, then prints it
        return recorded(store)

    unsettled, warnings = [], []

    def step(store):
        if args.settlement is not None:
            # A restored copy's settlement may be another one: checked first.
            with ledger_step(store, **ledger_lock_options(parser.prog, args)):
                return recorded(store)
        settlement_id = settle(store, args.write_off, unsettled, warnings,
                               **ledger_lock_options(parser.prog, args))
        for line in [f"warning: {w}" for w in warnings] + [f"not settled: {u}" for u in unsettled]:
            say(f"{parser.prog}: {line}")
        if settlement_id is None:
            if not unsettled:
                [(newest,)] = store.read(SETTLEMENTS_SQL["last_settlement"])
                again = (f" (settlement {newest} is the newest: settle --settlement {newest} "
                         "prints it again)") if newest else ""
                say(f"{parser.prog}: nothing to settle{again}")
            return None, settlement_output(store, settlement_id, args.format)
        return (f"settlement {settlement_id} is committed (settle --settlement "
                f"{settlement_id} prints it again)",
                settlement_output(store, settlement_id, args.format))

    status = run_on_database(parser.prog, args.db, out, step,
                             look=look if args.settlement is not None else None)
    return EXIT_PARTLY_SETTLED if status == 0 and unsettled else status


# ---------------------------------------------------------------------------
# Payout ledger, adjustments: write-offs, holds, suspects, erasure (their commands)
# ---------------------------------------------------------------------------

ADJUSTMENTS_SQL = {
    # Users held now: whose newest hold event is a hold.
    "held_users": """
        SELECT user_id FROM ledger_holds h
        WHERE id = (SELECT max(id) FROM ledger_holds n WHERE n.user_id = h.user_id)
          AND action = 'hold' ORDER BY user_id""",
    "carried_lines_of_owing": """
        SELECT l.user_id, s.created_at_us, l.day, l.property_id, l.carried_nano
        FROM settlement_lines l JOIN settlements s ON s.id = l.settlement_id
        WHERE l.carried_nano > 0
          AND l.user_id IN (SELECT user_id FROM ledger_balances WHERE owed_nano > 0)
        ORDER BY l.user_id, l.settlement_id, l.day, l.property_id""",
    "next_balance_write_off": "SELECT coalesce(max(id), 0) + 1 FROM balance_write_offs",
    "insert_balance_write_off": """
        INSERT INTO balance_write_offs (id, created_at_us, older_than_us, users, written_off_nano)
        VALUES (?, ?, ?, ?, ?)""",
    "insert_balance_write_off_line": """
        INSERT INTO balance_write_off_lines (write_off_id, user_id, day, property_id,
                                             written_off_nano)
        VALUES (?, ?, ?, ?, ?)""",
    "balance_write_off_lines_of": """
        SELECT user_id, day, property_id, written_off_nano FROM balance_write_off_lines
        WHERE write_off_id = ? ORDER BY user_id, day, property_id""",
    "user_hold_state": """
        SELECT id, user_id, action, at_us, reason, amount_nano FROM ledger_holds
        WHERE user_id = ? ORDER BY id DESC LIMIT 1""",
    "user_withheld": """
        SELECT (SELECT coalesce(sum(withheld_nano), 0) FROM payout_withheld WHERE user_id = :user)
               - (SELECT coalesce(sum(amount_nano), 0) FROM ledger_holds WHERE user_id = :user)""",
    "insert_hold": """
        INSERT INTO ledger_holds (user_id, action, at_us, reason, amount_nano)
        VALUES (?, ?, ?, ?, ?) RETURNING id, user_id, action, at_us, reason, amount_nano""",
    # Per user a hold can apply to (not UNCREDITED_USERS) in a window: sessions,
    # days with a session, revenue, duration summed over the sessions that
    # have one, and their number.
    "suspect_figures": f"""
        SELECT user_id, count(*), count(DISTINCT received_at_us / 86400000000),
               sum(revenue_nano / 1000000000), sum(revenue_nano % 1000000000),
               coalesce(sum(duration_s), 0), count(duration_s)
        FROM sessions INDEXED BY sessions_by_time
        WHERE received_at_us >= ? AND received_at_us < ? AND user_id NOT IN {SQL_UNCREDITED}
        GROUP BY user_id ORDER BY user_id""",
    "user_unpaid_sessions": """
        SELECT count(*) FROM sessions INDEXED BY sessions_by_user
        WHERE user_id = ? AND id > (SELECT coalesce(max(last_session_id), 0) FROM payout_runs)""",
    "erase_sessions": "UPDATE sessions SET user_id = ?, raw_body = '' WHERE user_id = ?",
    # Conflicts over the erased user's sessions (found by the pseudonym just set).
    "erase_session_conflicts": """
        DELETE FROM conflicts WHERE session_id IN (
            SELECT session_id FROM sessions INDEXED BY sessions_by_user WHERE user_id = ?)""",
    "erase_hold_reasons": "UPDATE ledger_holds SET reason = replace(reason, ?, ?) WHERE user_id = ?",
    "insert_erasure": "INSERT INTO erasures (erased_at_us, sessions, forced) VALUES (?, ?, ?)",
}


# --- Balances that end: what is owed past a chosen age written off ---

BALANCE_WRITE_OFF_COLUMNS = ["write-off-id", "user-id", "day", "property-id", "written-off"]


def aged_balance_lines(carried_lines, owed_by_user, cutoff_us):
    """[(user, day, property, nanos)] of the balances carried before
    `cutoff_us` and still owed.  A user's balance is taken back oldest first,
    so what is still owed is the newest carried lines: walk them oldest first,
    skipping what was taken back."""
    aged = []
    for user, lines in itertools.groupby(carried_lines, key=operator.itemgetter(0)):
        lines = list(lines)
        taken_back = sum(line[4] for line in lines) - owed_by_user.get(user, 0)
        for _, created_at_us, day, prop, carried in lines:
            left = max(carried - max(taken_back, 0), 0)
            taken_back -= carried
            if left and created_at_us < cutoff_us:
                aged.append((user, day, prop, left))
    return aged


def write_off_aged(older_than_us, conn, created_at_us):
    """The write op of write-off-balances: every balance carried more than
    `older_than_us` ago and still owed, written off in one transaction and
    recorded per user and pool.  -> the write-off's id, or None for nothing."""
    owed = dict(owed_balances(conn))
    aged = aged_balance_lines(conn.execute(ADJUSTMENTS_SQL["carried_lines_of_owing"]), owed,
                              created_at_us - older_than_us)
    if not aged:
        return None
    [(write_off_id,)] = conn.execute(ADJUSTMENTS_SQL["next_balance_write_off"]).fetchall()
    per_user = collections.Counter()
    for user, _, _, nanos in aged:
        per_user[user] += nanos
    conn.execute(ADJUSTMENTS_SQL["insert_balance_write_off"], (write_off_id, created_at_us, older_than_us,
                                                   len(per_user), sum(per_user.values())))
    conn.executemany(ADJUSTMENTS_SQL["insert_balance_write_off_line"],
                     ((write_off_id, *line) for line in aged))
    conn.executemany(RUNS_SQL["take_owed"], ((nanos, user) for user, nanos in sorted(per_user.items())))
    return write_off_id


def write_off_balances(store, older_than_us):
    with ledger_step(store) as journal:
        write_off_id = store.write(functools.partial(write_off_aged, older_than_us))
        if write_off_id is not None:
            journal.record("balance-write-off", write_off_id)
        return write_off_id


def balance_write_off_output(store, write_off_id, fmt):
    escape = spreadsheet_text if fmt == "csv" else str
    rows = ((write_off_id, escape(user), day, escape(prop), nanos_to_usd(nanos))
            for user, day, prop, nanos in store.stream(ADJUSTMENTS_SQL["balance_write_off_lines_of"],
                                                       (write_off_id or 0,)))
    return in_chunks(encode_values(rows, BALANCE_WRITE_OFF_COLUMNS, fmt))


def build_write_off_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py write-off-balances",
        description="Write off every carried balance older than --older-than that is still "
        "owed (taken back oldest first): the users keep it, and it is recorded per user and "
        "day, shown in their statements and in the ledger's written-off total. Writes the "
        "lines written off to stdout; nothing older: only the header, and 'nothing to write "
        "off' on stderr. Run again, it writes off only what aged since. " + LEDGER_EXIT_HELP,
    )
    add_db_option(parser, environ, "SQLite database file; never created")
    parser.add_argument("--older-than", required=True,
                        help="age of a balance (since the settlement that carried it), "
                        "such as 90d")
    add_lines_format_option(parser)
    return parser


def run_write_off_balances(argv, environ, out):
    parser = build_write_off_parser(environ)
    args = parse_arguments(parser, argv)

    def step(store):
        older_than_us = parse_duration(args.older_than, "older-than") * 1_000_000
        write_off_id = write_off_balances(store, older_than_us)
        if write_off_id is None:
            say(f"{parser.prog}: nothing to write off")
            return None, balance_write_off_output(store, None, args.format)
        return (f"write-off {write_off_id} is committed (statements and the ledger show it)",
                balance_write_off_output(store, write_off_id, args.format))

    return run_on_database(parser.prog, args.db, out, step)


# --- Holds: a suspect user's pay-now withheld until released or written off ---


def change_hold(user_id, action, reason, conn, at_us):
    """The write op of hold and release: -> the ledger_holds row recorded, or
    the same row again when the user's newest event already is this action
    (asked again after a crash: nothing is done twice).  A release credits
    what was withheld; a write-off of it leaves it to the publisher."""
    if not reason.strip():
        raise Invalid("reason", "must say why: it is recorded with the hold")
    if user_id in UNCREDITED_USERS:  # never paid: no pay-now to withhold, no share to take
        raise Invalid("user-id", f"{shown(user_id)} is {UNCREDITED_NOTES[user_id]}: "
                      "there is nothing to hold")
    newest = conn.execute(ADJUSTMENTS_SQL["user_hold_state"], (user_id,)).fetchone()
    if newest is not None and newest[2] == action:
        return newest
    if action != "hold" and (newest is None or newest[2] != "hold"):
        raise Invalid("user-id", "is not held: only a held user is released")
    [(withheld,)] = conn.execute(ADJUSTMENTS_SQL["user_withheld"], {"user": user_id}).fetchall()
    amount = 0 if action == "hold" else withheld
    return conn.execute(ADJUSTMENTS_SQL["insert_hold"], (user_id, action, at_us, reason, amount)).fetchone()


def hold_user(store, user_id, action, reason):
    """Hold, release or write off (action) under the ledger lock: a run or a
    settlement sees the user held or not, never half."""
    with ledger_step(store) as journal:
        row = store.write(functools.partial(change_hold, user_id, action, reason))
        journal.record("hold", row[0])  # asked again: already journaled, nothing twice
        return row


HOLD_COLUMNS = ["hold-id", "user-id", "action", "at", "reason", "amount"]


UNCREDITED_NOTES = {
    "": "sessions without a sub: never paid; their share of booked revenue is the margin's",
    DEPLOY_CHECK_USER: "the deploy check's test user (docs/deploy.md): never paid nor reported",
}


def hold_record(row):
    hold_id, user, action, at, reason, amount = row
    return {"hold-id": hold_id, "user-id": user, "action": action, "at": iso_utc(at),
            "reason": reason, "amount": nanos_to_usd(amount)}


def hold_output(row, fmt):
    values = hold_record(row)
    if fmt == "csv":  # the reason is the publisher's text, the id a user's: both escaped
        values["user-id"], values["reason"] = map(spreadsheet_text,
                                                  (values["user-id"], values["reason"]))
    return in_chunks(encode_values([tuple(values.values())], HOLD_COLUMNS, fmt))


def build_hold_parser(environ, action):
    what = {"hold": "Hold a suspect user: from the next run on, their pay-now is withheld "
                    "(recorded in the run, shown in their statement), and at settlement their "
                    "estimates take no share of the booked revenue.",
            "release": "Release a held user: what was withheld is to be credited to them "
                       "(the amount column); with --write-off it is kept by the publisher "
                       "instead. Later runs pay the user again."}[action]
    parser = HelpfulParser(
        prog=f"spp_server.py {action}",
        description=what + " Recorded with its time and reason, and written to stdout (one "
        "line, CSV or NDJSON). Asked again, it prints the same record and changes nothing. "
        + LEDGER_EXIT_HELP,
    )
    parser.add_argument("user_id", metavar="USER-ID")
    add_db_option(parser, environ, "SQLite database file; never created")
    parser.add_argument("--reason", required=True, help="why: recorded with the event")
    if action == "release":
        parser.add_argument("--write-off", action="store_true",
                            help="write off what was withheld (the user is not paid it)")
    add_lines_format_option(parser)
    return parser


def run_hold(argv, environ, out, action="hold"):
    parser = build_hold_parser(environ, action)
    args = parse_arguments(parser, argv)
    if getattr(args, "write_off", False):
        action = "write-off"

    def step(store):
        row = hold_user(store, args.user_id, action, args.reason)
        return f"the {action} is committed (asked again, it prints it again)", hold_output(
            row, args.format)

    return run_on_database(parser.prog, args.db, out, step)


# --- Users worth a look: figures far outside the publisher's own distribution ---

# A figure is far outside when it is further from the median of all users
# than SUSPECT_SPREADS times the spread (the median absolute deviation, scaled
# to a standard deviation for normal data, and at least a tenth of the
# median, so that a crowd of identical users does not flag every other one).
SUSPECT_SPREADS = 5
SUSPECT_MIN_USERS = 5  # fewer: no distribution to compare with
SUSPECT_FIGURES = (("sessions-per-day", 2), ("revenue-per-session", 9), ("mean-duration-s", 1))


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def spread(values, centre):
    mad = median([abs(v - centre) for v in values]) * Fraction(14826, 10000)
    return max(mad, abs(centre) / 10, Fraction(1, 10**9))


def user_figures(row):
    """A suspect_figures row -> {figure: Fraction} (None where unknown)."""
    user, sessions, days, whole, nanos, duration, timed = row
    return {"sessions-per-day": Fraction(sessions, days),
            "revenue-per-session": Fraction(whole * NANOS_PER_USD + nanos, sessions * 10**9),
            "mean-duration-s": Fraction(duration, timed) if timed else None}


def suspects(store, since_us, until_us):
    """Every user whose sessions per day, revenue per session or mean session
    duration in [since, until) is far outside the distribution of all users,
    with the figures, the medians and how many spreads away: a reason to hold
    someone (or not)."""
    with store.snapshot() as conn:
        rows = conn.execute(ADJUSTMENTS_SQL["suspect_figures"], (since_us, until_us)).fetchall()
        held = {user for (user,) in conn.execute(ADJUSTMENTS_SQL["held_users"])}
    figures = {row[0]: (row, user_figures(row)) for row in rows}
    typical, found = {}, []
    for name, places in SUSPECT_FIGURES:
        values = [f[name] for _, f in figures.values() if f[name] is not None]
        if len(values) >= SUSPECT_MIN_USERS:
            centre = median(values)
            typical[name] = (centre, spread(values, centre))
    for user, (row, figure) in figures.items():
        outside = []
        for name, places in SUSPECT_FIGURES:
            if name in typical and figure[name] is not None:
                centre, width = typical[name]
                away = abs(figure[name] - centre) / width
                if away > SUSPECT_SPREADS:
                    outside.append({"figure": name, "spreads": floor_places(away, 1),
                                    "direction": "above" if figure[name] > centre else "below"})
        if outside:
            found.append((max(Fraction(o["spreads"]) for o in outside), user, row, figure, outside))
    found.sort(key=lambda f: (-f[0], f[1]))
    return {"since": iso_utc(since_us), "until": iso_utc(until_us), "users": len(figures),
            "typical": {name: {"median": floor_places(abs(c), places), "spread": floor_places(w, places)}
                        for name, places in SUSPECT_FIGURES if name in typical
                        for c, w in [typical[name]]},
            "suspects": [{"user-id": user, "held": user in held, "sessions": row[1],
                          "days": row[2],
                          **{name: None if figure[name] is None else floor_places(figure[name], places)
                             for name, places in SUSPECT_FIGURES},
                          "outside": outside}
                         for _, user, row, figure, outside in found]}


def build_suspects_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py suspects",
        description="Write the users worth a look to stdout as JSON: those whose sessions "
        "per day, revenue per session or mean session duration in the window is more than "
        f"{SUSPECT_SPREADS} spreads from the median of all users (at least "
        f"{SUSPECT_MIN_USERS} users), with the figures; a reason to hold one (spp_server.py "
        "hold). Reads only.",
    )
    add_db_option(parser, environ, DB_HELP_REPORT)
    parser.add_argument("--since", help=f"start of the window [default: 30 days before "
                        f"--until]: {TIME_FORMS_HELP}")
    parser.add_argument("--until", help="end of the window, excluded [default: now]; same forms")
    return parser


def run_suspects(argv, environ, out):
    parser = build_suspects_parser(environ)
    args = parse_arguments(parser, argv)
    try:
        until = now_us() if args.until is None else parse_instant(args.until)
        since = until - 30 * DAY_US if args.since is None else parse_instant(args.since)
    except ValueError:  # a usage error, as export's and reconcile's
        parser.error(f"--since/--until: must be {TIME_FORMS_HELP}")
    return print_report(parser.prog, args.db, out,
                        lambda store: [json_output(suspects(store, since, until))])


# --- Erasure: what identifies a user removed on request (GDPR Art. 17) ---

# Every ledger table with a user id: renamed to the pseudonym, so that every
# sum (a run's, a settlement's, a pool's) stays exactly what it was.
ERASE_RENAMES = ("payout_parts", "payout_lines", "payout_deductions", "payout_withheld",
                 "settlement_lines", "ledger_balances", "ledger_holds", "balance_write_off_lines")


def erasure_blockers(conn, user_id):
    """What the user is still to be paid or to give back, as words; [] when
    nothing: erasing them would leave an amount no one can credit."""
    sums = dict(zip(LEDGER_TOTALS, conn.execute(STATEMENTS_SQL["user_ledger_sums"], {"user": user_id}).fetchone()))
    [(unpaid,)] = conn.execute(ADJUSTMENTS_SQL["user_unpaid_sessions"], (user_id,)).fetchall()
    blockers = [f"{nanos_to_usd(sums[key])} {key}" for key in ("pending", "owed", "withheld")
                if sums.get(key)]
    if unpaid:
        blockers.append(f"{unpaid} session(s) not paid in a run yet")
    return blockers


def names_user(body, user_id):
    """Whether a stored postback body (text or bytes) carries `user_id`: as
    its user-id field (escaped or not), anywhere as a JSON string, or, in a
    body that is not JSON (cut short, say), anywhere at all.  Another user's
    id that merely contains this one ("a" in "bob") is no match in JSON."""
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    quoted = {json.dumps(user_id, ensure_ascii=ascii).encode("utf-8", "surrogatepass")
              for ascii in (False, True)}
    if any(form in raw for form in quoted):
        return True
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return user_id.encode("utf-8", "surrogatepass") in raw
    return isinstance(parsed, dict) and parsed.get("user-id") == user_id


def erase_user(user_id, force, pseudonym, conn, erased_at_us):
    """The write op of `erase`: every row of the user renamed to a random
    pseudonym (it cannot be reversed: nothing derives it from the id), raw
    bodies cleared, rejected and conflicting postbacks naming them deleted,
    and the erasure recorded without the id.  -> counts, or Invalid while
    the user has amounts pending or owed (unless forced)."""
    if not user_id:
        raise Invalid("user-id", "must not be empty: '' stands for every session without a sub")
    if user_id == DEPLOY_CHECK_USER:  # under a pseudonym its sessions would be paid and reported
        raise Invalid("user-id", f"{user_id} is the deploy check's test user, no person: "
                      "nothing to erase")
    blockers = erasure_blockers(conn, user_id)
    if blockers and not force:
        raise Invalid("user-id", f"the user still has {', '.join(blockers)}: settle or release "
                      "it first, or erase anyway with --even-if-owed")
    counts = {"sessions": conn.execute(ADJUSTMENTS_SQL["erase_sessions"], (pseudonym, user_id)).rowcount}
    of_sessions = conn.execute(ADJUSTMENTS_SQL["erase_session_conflicts"], (pseudonym,)).rowcount
    for table in ERASE_RENAMES:
        conn.execute(f"UPDATE {table} SET user_id = ? WHERE user_id = ?", (pseudonym, user_id))
    for table, id_column, bodies in (("rejected", "id", "raw_body"),
                                     ("conflicts", "id", "stored_body, new_body")):
        doomed = [(row[0],) for row in conn.execute(f"SELECT {id_column}, {bodies} FROM {table}")
                  if any(names_user(body, user_id) for body in row[1:])]
        conn.executemany(f"DELETE FROM {table} WHERE {id_column} = ?", doomed)
        counts[table] = len(doomed) + (of_sessions if table == "conflicts" else 0)
    conn.execute(ADJUSTMENTS_SQL["erase_hold_reasons"], (user_id, pseudonym, pseudonym))
    if any(counts.values()):  # a second erase of the same id (after a crash) records nothing
        conn.execute(ADJUSTMENTS_SQL["insert_erasure"], (erased_at_us, counts["sessions"], int(bool(blockers))))
    return counts


def compact_after_erasure(path):
    """Leave no copy of erased bytes in the file: VACUUM rewrites it without
    free pages or free space inside pages, and a TRUNCATE checkpoint empties
    the WAL, whose older frames still hold pages as they were.  StoreUnavailable
    if a reader kept the WAL from being emptied."""
    conn = connect(path, DEFAULTS["busy_timeout_ms"])
    try:
        conn.execute("VACUUM")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    if busy:
        raise StoreUnavailable("the WAL could not be emptied (a reader kept it busy): run the "
                               "same erase again")


def erase(store, user_id, force=False):
    """Erase a user (see erase_user), in the database and then in its ledger
    journal under the same pseudonym, then compact both files: -> counts.
    As a ledger step: no run or settlement is computed meanwhile, and a
    restored copy is refused until it is replayed."""
    pseudonym = "erased:" + secrets.token_hex(16)  # random: nothing derives it from the id
    with ledger_step(store) as journal:
        counts = store.write(functools.partial(erase_user, user_id, force, pseudonym))
        journal.rename_user(user_id, pseudonym)
    compact_after_erasure(store.path)
    return counts


def build_erase_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py erase",
        description="Erase a user on request: their id is replaced by a random pseudonym "
        "in every session and ledger row (every sum stays exact), their raw bodies are "
        "cleared, rejected and conflicting postbacks naming them are deleted, and the file "
        "is compacted (VACUUM, then the WAL emptied) so that no copy of the id is left in "
        "it. Refused while the user is owed or owes anything. The erasure is recorded, "
        "never whose. Backups made before still hold the id (docs/ledger.md). "
        + LEDGER_EXIT_HELP,
    )
    parser.add_argument("user_id", metavar="USER-ID")
    add_db_option(parser, environ, "SQLite database file; never created")
    parser.add_argument("--even-if-owed", action="store_true",
                        help="erase although the user has amounts pending, owed or withheld "
                        "(they stay in the ledger under the pseudonym; recorded as forced)")
    return parser


def run_erase(argv, environ, out):
    parser = build_erase_parser(environ)
    args = parse_arguments(parser, argv)

    def step(store):
        counts = erase(store, args.user_id, args.even_if_owed)
        summary = (f"erased: {counts['sessions']} session(s), {counts['rejected']} rejected "
                   f"and {counts['conflicts']} conflicting postback(s); the file is compacted\n")
        return "the erasure is committed", [summary.encode()]

    return run_on_database(parser.prog, args.db, out, step)


# ---------------------------------------------------------------------------
# Payout ledger, statements: accounts and the ledger's state (statement, ledger)
# ---------------------------------------------------------------------------

STATEMENTS_SQL = {
    "ledger_steps": """
        SELECT 'run', id, until_us FROM payout_runs
        UNION ALL SELECT 'settlement', id, NULL FROM settlements ORDER BY 1, 2""",
    "user_run_lines": """
        SELECT l.run_id, r.until_us, l.sessions, l.estimated_nano, l.paid_now_nano,
               coalesce(d.deducted_nano, 0), coalesce(w.withheld_nano, 0)
        FROM payout_lines l JOIN payout_runs r ON r.id = l.run_id
        LEFT JOIN payout_deductions d ON d.run_id = l.run_id AND d.user_id = l.user_id
        LEFT JOIN payout_withheld w ON w.run_id = l.run_id AND w.user_id = l.user_id
        WHERE l.user_id = ? ORDER BY l.run_id""",
    "user_settlement_lines": """
        SELECT settlement_id, day, property_id, sessions, estimated_nano, booked_part_nano,
               final_nano, paid_now_nano, top_up_nano, carried_nano, written_off_nano, correction,
               deducted_nano, written_back_nano, held
        FROM settlement_lines
        WHERE user_id = ? AND settlement_id <= (SELECT coalesce(max(id), 0) FROM settlements)
        ORDER BY settlement_id, day, property_id""",
    "runs": f"""
        SELECT id, until_us, created_at_us, pay_now_share, final_share, report_utc_offset, users,
               sessions, estimated_nano, paid_now_nano, deducted_nano, withheld_nano,
               moved_sessions, moved_to_day,
               (SELECT coalesce(sum(sessions), 0) FROM payout_lines l
                WHERE l.run_id = r.id AND l.user_id IN {SQL_UNCREDITED}),
               (SELECT coalesce(sum(estimated_nano), 0) FROM payout_lines l
                WHERE l.run_id = r.id AND l.user_id IN {SQL_UNCREDITED})
        FROM payout_runs r ORDER BY id""",
    "settlements": """
        SELECT id, created_at_us, report_utc_offset, write_off, pools, booked_nano, top_up_nano,
               carried_nano, written_off_nano, deducted_nano
        FROM settlements ORDER BY id""",
    # Each settled pool as of its newest settlement; released: the top-ups
    # less the balances carried, over all its settlements.
    "settled_pools": f"""
        SELECT day, property_id, settlement_id, by_property, booked_nano, paid_now_nano,
               released + coalesce((SELECT sum(written_off_nano) FROM balance_write_off_lines w
                                    WHERE w.day = p.day AND w.property_id = p.property_id), 0),
               (SELECT coalesce(sum(booked_part_nano), 0) FROM settlement_lines l
                WHERE l.settlement_id = p.settlement_id AND l.day = p.day
                  AND l.property_id = p.property_id AND l.user_id IN {SQL_UNCREDITED})
        FROM (SELECT *, sum(top_up_nano - carried_nano) OVER pool AS released,
                     row_number() OVER (pool ORDER BY settlement_id DESC) AS newest
              FROM settlement_days WINDOW pool AS (PARTITION BY day, property_id)) p
        WHERE newest = 1 ORDER BY day, property_id""",
    # Pools whose newest settlement found booked revenue and no session: all margin.
    "settled_without_sessions": """
        SELECT day, property_id, booked_nano FROM settlement_days d
        WHERE sessions = 0 AND booked_nano > 0
          AND settlement_id = (SELECT max(settlement_id) FROM settlement_days n
                               WHERE n.day = d.day AND n.property_id = d.property_id)
        ORDER BY day, property_id""",
    # Totals in the order of LEDGER_TOTALS.  Pending: paid now (before
    # deductions) less what the newest settlement of each pool found paid now.
    "ledger_sums": """
        SELECT (SELECT coalesce(sum(paid_now_nano - deducted_nano - withheld_nano), 0)
                FROM payout_runs),
               (SELECT coalesce(sum(deducted_nano), 0) FROM payout_runs)
               + (SELECT coalesce(sum(deducted_nano), 0) FROM settlements),
               (SELECT coalesce(sum(top_up_nano - deducted_nano), 0) FROM settlements),
               (SELECT coalesce(sum(carried_nano), 0) FROM settlements),
               (SELECT coalesce(sum(written_off_nano), 0) FROM settlements)
               + (SELECT coalesce(sum(written_off_nano), 0) FROM balance_write_offs),
               (SELECT coalesce(sum(owed_nano), 0) FROM ledger_balances),
               (SELECT coalesce(sum(paid_now_nano), 0) FROM payout_runs)
               - (SELECT coalesce(sum(paid_now_nano), 0) FROM settlement_days d
                  WHERE settlement_id = (SELECT max(settlement_id) FROM settlement_days n
                                         WHERE n.day = d.day AND n.property_id = d.property_id)),
               (SELECT coalesce(sum(withheld_nano), 0) FROM payout_runs)
               - (SELECT coalesce(sum(amount_nano), 0) FROM ledger_holds),
               (SELECT coalesce(sum(amount_nano), 0) FROM ledger_holds WHERE action = 'release'),
               (SELECT coalesce(sum(amount_nano), 0) FROM ledger_holds WHERE action = 'write-off')""",
    "user_ledger_sums": """
        WITH runs AS (SELECT coalesce(max(id), 0) AS last FROM payout_runs),
             settled AS (SELECT coalesce(max(id), 0) AS last FROM settlements),
             deductions AS (SELECT coalesce(sum(deducted_nano), 0) AS nano
                            FROM payout_deductions WHERE user_id = :user),
             paid AS (SELECT coalesce(sum(paid_now_nano), 0) AS nano FROM payout_lines
                      WHERE user_id = :user AND run_id <= (SELECT last FROM runs)),
             withheld AS (SELECT coalesce(sum(withheld_nano), 0) AS nano FROM payout_withheld
                          WHERE user_id = :user),
             holds AS (SELECT * FROM ledger_holds WHERE user_id = :user),
             lines AS (SELECT * FROM settlement_lines
                       WHERE user_id = :user AND settlement_id <= (SELECT last FROM settled))
        SELECT (SELECT nano FROM paid) - (SELECT nano FROM deductions) - (SELECT nano FROM withheld),
               (SELECT nano FROM deductions) + (SELECT coalesce(sum(deducted_nano), 0) FROM lines),
               (SELECT coalesce(sum(top_up_nano - deducted_nano), 0) FROM lines),
               (SELECT coalesce(sum(carried_nano), 0) FROM lines),
               (SELECT coalesce(sum(written_off_nano - written_back_nano), 0) FROM lines)
               + (SELECT coalesce(sum(written_off_nano), 0) FROM balance_write_off_lines
                  WHERE user_id = :user
                    AND write_off_id <= (SELECT coalesce(max(id), 0) FROM balance_write_offs)),
               (SELECT coalesce(sum(owed_nano), 0) FROM ledger_balances WHERE user_id = :user),
               (SELECT nano FROM paid) - (SELECT coalesce(sum(paid_now_nano), 0) FROM lines l
                  WHERE settlement_id = (SELECT max(settlement_id) FROM lines n
                                         WHERE n.day = l.day AND n.property_id = l.property_id)),
               (SELECT nano FROM withheld) - (SELECT coalesce(sum(amount_nano), 0) FROM holds),
               (SELECT coalesce(sum(amount_nano), 0) FROM holds WHERE action = 'release'),
               (SELECT coalesce(sum(amount_nano), 0) FROM holds WHERE action = 'write-off')""",
    "user_holds": """
        SELECT id, user_id, action, at_us, reason, amount_nano FROM ledger_holds
        WHERE user_id = ? ORDER BY id""",
    "user_balance_write_offs": """
        SELECT w.id, w.created_at_us, l.day, l.property_id, l.written_off_nano
        FROM balance_write_off_lines l JOIN balance_write_offs w ON w.id = l.write_off_id
        WHERE l.user_id = ? ORDER BY w.id, l.day, l.property_id""",
    "last_run_times": "SELECT created_at_us, until_us FROM payout_runs ORDER BY id DESC LIMIT 1",
    "last_settlement_times": """
        SELECT s.created_at_us, s.report_utc_offset,
               (SELECT max(day) FROM settlement_days WHERE settlement_id = s.id)
        FROM settlements s ORDER BY s.id DESC LIMIT 1""",
    "run_offsets": "SELECT id, report_utc_offset FROM payout_runs ORDER BY id",
    "next_paid_day": "SELECT min(day) FROM payout_parts WHERE run_id = ? AND day > ?",
    "settled_days": "SELECT DISTINCT day FROM settlement_days",
}


def statement(store, user_id):
    """Every run line and settlement line of one user, what is pending and owed."""
    with store.snapshot() as conn:
        runs = [{"run-id": run, "until": iso_utc(until), "sessions": sessions,
                 "estimated-revenue": nanos_to_usd(estimated),
                 "paid-now": nanos_to_usd(paid - deducted - withheld),
                 "deducted": nanos_to_usd(deducted), "withheld": nanos_to_usd(withheld)}
                for run, until, sessions, estimated, paid, deducted, withheld
                in conn.execute(STATEMENTS_SQL["user_run_lines"], (user_id,))]
        lines = [settlement_record((row[0], row[1], row[2], user_id, *row[3:]))
                 for row in conn.execute(STATEMENTS_SQL["user_settlement_lines"], (user_id,))]
        holds = [hold_record(row) for row in conn.execute(STATEMENTS_SQL["user_holds"], (user_id,))]
        write_offs = [{"write-off-id": wid, "created-at": iso_utc(created), "day": day,
                       "property-id": prop, "written-off": nanos_to_usd(nanos)}
                      for wid, created, day, prop, nanos
                      in conn.execute(STATEMENTS_SQL["user_balance_write_offs"], (user_id,))]
        sums = conn.execute(STATEMENTS_SQL["user_ledger_sums"], {"user": user_id}).fetchone()
    record = {"user-id": user_id, "runs": runs, "settlements": lines, "holds": holds,
              "balance-write-offs": write_offs, "totals": ledger_totals(sums)}
    if user_id in UNCREDITED_USERS:
        record["unattributed"] = UNCREDITED_NOTES[user_id]
    return record


LEDGER_TOTALS = ("paid-now", "deducted", "topped-up", "carried", "written-off", "owed", "pending",
                 "withheld", "released", "withheld-written-off")


def ledger_totals(sums):
    """SQL's user_ledger_sums / ledger_sums row -> exact decimal strings."""
    return dict(zip(LEDGER_TOTALS, map(nanos_to_usd, sums)))


STEP_COLUMNS = ["step", "id", "until"]


def ledger_steps(store):
    """One CSV line per recorded step, runs then settlements, oldest first:
    what the routines check their delivered files against (docs/ledger.md)."""
    rows = ((step, step_id, "" if until is None else iso_utc(until))
            for step, step_id, until in store.stream(STATEMENTS_SQL["ledger_steps"], ()))
    return in_chunks(encode_values(rows, STEP_COLUMNS, "csv"))


def ledger_summary(store):
    """Per run and per settlement: paid now, held back, released; per settled
    pool: booked, paid in total, the publisher's margin; and the totals."""
    with store.snapshot() as conn:
        runs = [{"run-id": run, "until": iso_utc(until), "created-at": iso_utc(created),
                 "pay-now-share": pay_now, "final-share": final,
                 "report-utc-offset": utc_offset_text(offset), "users": users,
                 "sessions": sessions, "estimated-revenue": nanos_to_usd(estimated),
                 "paid-now": nanos_to_usd(paid - deducted - withheld),
                 "deducted": nanos_to_usd(deducted),
                 "held-back": signed_usd(
                     rewardable_nanos(estimated, decimal.Decimal(final)) - paid),
                 "withheld": nanos_to_usd(withheld), "moved-sessions": moved,
                 "moved-to-day": moved_to, "unattributed-sessions": uncredited,
                 "unattributed-estimated-revenue": nanos_to_usd(uncredited_estimated)}
                for run, until, created, pay_now, final, offset, users, sessions, estimated,
                paid, deducted, withheld, moved, moved_to, uncredited, uncredited_estimated
                in conn.execute(STATEMENTS_SQL["runs"])]
        settlements = [{"settlement-id": sid, "created-at": iso_utc(created),
                        "report-utc-offset": utc_offset_text(offset), "write-off": bool(off),
                        "pools": pools, "booked-revenue": nanos_to_usd(booked),
                        "released": nanos_to_usd(top_up), "carried": nanos_to_usd(carried),
                        "written-off": signed_usd(written_off), "deducted": nanos_to_usd(deducted)}
                       for sid, created, offset, off, pools, booked, top_up, carried,
                       written_off, deducted in conn.execute(STATEMENTS_SQL["settlements"])]
        days = [{"day": day, "property-id": prop, "by-property": bool(by_property),
                 "settlement-id": sid, "booked-revenue": nanos_to_usd(booked),
                 "paid-now": nanos_to_usd(paid), "paid-in-total": nanos_to_usd(paid + released),
                 "margin": signed_usd(booked - paid - released),
                 "unattributed-booked": nanos_to_usd(uncredited)}
                for day, prop, sid, by_property, booked, paid, released, uncredited
                in conn.execute(STATEMENTS_SQL["settled_pools"])]
        sums = conn.execute(STATEMENTS_SQL["ledger_sums"]).fetchone()
        pending = unmatched_pending(conn)
        booked_alone = [{"day": day, "property-id": prop, "booked-revenue": nanos_to_usd(booked)}
                        for day, prop, booked in conn.execute(STATEMENTS_SQL["settled_without_sessions"])]
    return {"runs": runs, "settlements": settlements, "days": days,
            "margin": honest_margin(days, sums[LEDGER_TOTALS.index("owed")]),
            "totals": ledger_totals(sums), "pending-without-booked": pending,
            "booked-without-sessions": booked_alone}


def unmatched_pending(conn):
    """pending_without_booked over the ledger as it stands (for the summary)."""
    last = conn.execute(RUNS_SQL["last_run"]).fetchone()
    if last is None:
        return []
    days = report_days_of(conn.execute(RUNS_SQL["report_offsets"]).fetchall(), last[3])
    booked = conn.execute(SETTLEMENTS_SQL["booked_pools"]).fetchall()
    return pending_without_booked(conn, booked, paid_days(conn, days, last,
                                                          {day for day, *_ in booked}))


def honest_margin(days, owed):
    """The margin over every settled pool, counting carried balances as
    recovered (as each day's margin does) and without what is still owed:
    a balance is money paid out until it is taken back."""
    booked = sum(usd_to_nanos(decimal.Decimal(d["booked-revenue"])) for d in days)
    paid = sum(usd_to_nanos(decimal.Decimal(d["paid-in-total"])) for d in days)
    return {"booked-revenue": nanos_to_usd(booked), "paid-in-total": nanos_to_usd(paid),
            "margin": signed_usd(booked - paid), "owed": nanos_to_usd(owed),
            "margin-without-owed": signed_usd(booked - paid - owed)}


def oldest_unsettled_paid_day(conn):
    """The start (receive time) of the oldest report day with a part in a
    run and no settlement, or None: each run's days are walked in its key
    order, one index search per day, never its parts one by one."""
    settled = {day for (day,) in conn.execute(STATEMENTS_SQL["settled_days"])}
    days = report_days_of(conn.execute(RUNS_SQL["report_offsets"]).fetchall(), 0)
    oldest = None
    for run_id, _ in conn.execute(STATEMENTS_SQL["run_offsets"]).fetchall():
        day = ""
        while (day := conn.execute(STATEMENTS_SQL["next_paid_day"], (run_id, day)).fetchone()[0]) is not None:
            if day not in settled:
                start = day_bounds_us(day, days)[0]
                oldest = start if oldest is None else min(oldest, start)
                break
    return oldest


def ledger_state(store):
    """What /metrics tells of the ledger: times in receive-time microseconds
    (None before the first run or settlement), totals as decimal strings."""
    with store.snapshot() as conn:
        run = conn.execute(STATEMENTS_SQL["last_run_times"]).fetchone()
        settlement = conn.execute(STATEMENTS_SQL["last_settlement_times"]).fetchone()
        sums = ledger_totals(conn.execute(STATEMENTS_SQL["ledger_sums"]).fetchone())
        oldest = oldest_unsettled_paid_day(conn)
        days = report_days_of(conn.execute(RUNS_SQL["report_offsets"]).fetchall(), 0)
    settled_until = None
    if settlement is not None and settlement[2] is not None:
        settled_until = day_bounds_us(settlement[2], days)[1]
    return {"run_at": run and run[0], "run_until": run and run[1],
            "settlement_at": settlement and settlement[0], "settlement_until": settled_until,
            "oldest_unsettled": oldest, "pending": sums["pending"], "owed": sums["owed"]}


def build_statement_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py statement",
        description="Write one user's ledger statement (what GET /users/<id>/statement "
        "answers) to stdout as JSON.",
    )
    parser.add_argument("user_id", metavar="USER-ID")
    add_db_option(parser, environ, DB_HELP_REPORT)
    return parser


def refuse_dashed_argument(parser, argv):
    """A user id such as '-x' reads as an unknown option to argparse, which
    then says the id is missing: say instead how to write it."""
    for arg in itertools.takewhile(lambda a: a != "--", argv):
        if arg.startswith("-") and arg.split("=")[0] not in parser._option_string_actions:
            parser.error(f"{shown(arg)} is not an option; a user id that starts with '-' is "
                         f"written after '--': {parser.prog} [options] -- {arg}")


def run_statement(argv, environ, out):
    parser = build_statement_parser(environ)
    refuse_dashed_argument(parser, argv)
    args = parse_arguments(parser, argv)
    return print_report(parser.prog, args.db, out,
                        lambda store: [json_output(statement(store, args.user_id))],
                        check_journal_read_only)


def build_ledger_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py ledger",
        description="Write the ledger summary (what GET /ledger answers) to stdout as JSON: "
        "per run, per settlement and per settled day, and the totals.",
    )
    add_db_option(parser, environ, DB_HELP_REPORT)
    parser.add_argument("--steps", action="store_true",
                        help="write instead one CSV line per recorded step (step,id,until: "
                        "run,1,2026-11-30T00:00:00Z or settlement,1,), runs then settlements, "
                        "oldest first: what a routine checks its delivered files against")
    return parser


def run_ledger(argv, environ, out):
    parser = build_ledger_parser(environ)
    args = parse_arguments(parser, argv)
    if args.steps:
        return print_report(parser.prog, args.db, out, ledger_steps, check_journal_read_only)
    return print_report(parser.prog, args.db, out,
                        lambda store: [json_output(ledger_summary(store))], check_journal_read_only)


# ---------------------------------------------------------------------------
# Payout ledger, replay: steps a restore lost, put back (ledger-replay)
# ---------------------------------------------------------------------------

@dataclass
class ReplayPosition:
    """Where the restored copy's sessions stop being the ones the journal's
    runs paid: `last` is the end of the last run put back; once `broken`,
    every id after it is a session received after the restore."""

    last: int | None
    broken: bool = False


def matched_prefix_end(store, after, last, digests):
    """The last id in (after, last] up to which the database holds the
    sessions the run paid (digests), or `after`."""
    end = after
    rows = store.stream("SELECT id, session_id FROM sessions WHERE id > ? AND id <= ? "
                        "ORDER BY id", (after, last))
    for i, (row_id, session_id) in enumerate(rows):
        if digests[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] != session_digest(row_id, session_id):
            break
        end = row_id
    return end


def replayed_range(store, journal, header, position):
    """The id range a lost run is put back with.  Ids are not reused only as
    long as nothing was lost: the restored copy holds the sessions up to the
    backup's newest, and sessions received since took the ids after it.  So
    a run keeps the part of its range whose sessions the copy still holds
    (found by their digests); the rest, and every later lost run's range,
    shrinks to that end, where the next run starts: the lost sessions stay
    paid (their parts are put back), the new ones are paid by the next run."""
    run_id, after, last, created = header[0], header[1], header[2], header[4]
    [(anchor, digests)] = journal.conn.execute(
        "SELECT anchor, digests FROM run_sessions WHERE run_id = ?", (run_id,)).fetchall()
    if position.last is None:  # the copy predates every run: the first starts at its --from
        held = store.read("SELECT id, session_id FROM sessions WHERE id = ?", (after,))
        if anchor is None or (held and session_digest(*held[0]) == anchor):
            position.last = after
        else:  # the copy predates the cut-over session: its end by receive time
            [(newest,)] = store.read(RUNS_SQL["last_session_before"], (created,))
            position.last, position.broken = min(newest or 0, after), True
    if position.broken or after != position.last:
        position.broken = True
        return position.last, position.last
    end = matched_prefix_end(store, after, last, digests)
    position.broken = end < last
    position.last = end
    return after, end


def put_back_run(store, journal, header, position):
    _, parts, lines, deducted, withheld, offsets = STEP_ROWS["run"]
    run_id = header[0]
    after, last = replayed_range(store, journal, header, position)
    write_in_chunks(store, RUNS_SQL["insert_part"], journal.lost_rows(*parts, run_id))
    write_in_chunks(store, RUNS_SQL["insert_line"], journal.lost_rows(*lines, run_id))
    deductions = journal.lost_rows(*deducted, run_id).fetchall()
    withheld_rows = journal.lost_rows(*withheld, run_id).fetchall()
    offset_rows = journal.lost_rows(*offsets, run_id).fetchall()

    def op(conn, _):
        conn.execute(RUNS_SQL["insert_run"], (run_id, after, last, *header[3:]))
        conn.executemany(RUNS_SQL["take_owed"], ((nanos, user) for _, user, nanos in deductions))
        conn.executemany(RUNS_SQL["insert_deduction"], deductions)
        conn.executemany(RUNS_SQL["insert_withheld"], withheld_rows)
        conn.executemany(RUNS_SQL["insert_report_offset"], offset_rows)

    store.write(op)


def put_back_settlement(store, journal, header):
    (_, days, lines) = STEP_ROWS["settlement"]
    settlement_id = header[0]
    write_in_chunks(store, SETTLEMENTS_SQL["insert_settlement_line"],
                    journal.lost_rows(*lines, settlement_id))
    pools = journal.lost_rows(*days, settlement_id).fetchall()
    # The balances as record_settlement changed them: carried less taken back.
    changes = journal.conn.execute(
        "SELECT user_id, sum(carried_nano - deducted_nano) AS change FROM main.settlement_lines "
        "WHERE settlement_id = ? GROUP BY user_id HAVING change != 0 ORDER BY user_id",
        (settlement_id,)).fetchall()

    def op(conn, _):
        conn.execute(SETTLEMENTS_SQL["insert_settlement"], header)
        conn.executemany(SETTLEMENTS_SQL["insert_settlement_day"], pools)
        conn.executemany(SETTLEMENTS_SQL["add_owed"], ((u, n) for u, n in changes if n > 0))
        conn.executemany(RUNS_SQL["take_owed"], ((-n, u) for u, n in changes if n < 0))

    store.write(op)


def put_back_balance_write_off(store, journal, header):
    lines = journal.lost_rows(*STEP_ROWS["balance-write-off"][1], header[0]).fetchall()
    per_user = collections.Counter()
    for _, user, _, _, nanos in lines:
        per_user[user] += nanos

    def op(conn, _):  # as write_off_aged wrote it
        conn.execute(ADJUSTMENTS_SQL["insert_balance_write_off"], header)
        conn.executemany(ADJUSTMENTS_SQL["insert_balance_write_off_line"], lines)
        conn.executemany(RUNS_SQL["take_owed"], ((n, user) for user, n in sorted(per_user.items())))

    store.write(op)


def replay_ledger(store):
    """Put back the steps of the journal that the database lacks, in the
    order they were made, each as its own staged step: -> their names."""
    with ledger_lock(store):
        journal = LedgerJournal(store)
        try:
            lost, unjournaled = journal.compare()
            journal.catch_up(unjournaled)
            if not lost:
                return []
            clear_unfinished(store)
            last = store.read(RUNS_SQL["last_run"])
            position = ReplayPosition(last[0][1] if last else None)
            for kind, step_id in journal.lost_steps(lost):
                table, key, columns = STEP_ROWS[kind][0]
                [header] = journal.lost_rows(table, key, columns, step_id).fetchall()
                if kind == "run":
                    put_back_run(store, journal, header, position)
                elif kind == "settlement":
                    put_back_settlement(store, journal, header)
                elif kind == "balance-write-off":
                    put_back_balance_write_off(store, journal, header)
                else:
                    store.write(lambda conn, _, row=header: conn.execute(
                        "INSERT INTO ledger_holds (id, user_id, action, at_us, reason, amount_nano) "
                        "VALUES (?, ?, ?, ?, ?, ?)", row))
            return journal.lost_steps(lost)
        finally:
            journal.close()


def build_replay_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py ledger-replay",
        description="After the database was restored from a backup: put back the ledger's "
        "steps recorded after the backup (runs, settlements, holds and releases, balance "
        "write-offs), from the ledger journal beside the database "
        "(<database>-ledger-journal), so that no session is paid twice and no id names two "
        "steps. Every ledger step refuses until then. Writes what it put back to "
        "stdout. Safe while the server runs. Exit status 0 when done (or nothing was "
        "missing); 1, with one line on stderr, when the database or the journal cannot be "
        "read or written, or the two disagree; 3 when what it put back is committed but "
        "its output could not be written.",
    )
    add_db_option(parser, environ, "SQLite database file; never created")
    return parser


def run_ledger_replay(argv, environ, out):
    parser = build_replay_parser(environ)
    args = parse_arguments(parser, argv)

    def step(store):
        put_back = replay_ledger(store)
        if not put_back:
            return None, [b"nothing to put back: the database holds every step of its "
                          b"ledger journal\n"]
        return (f"{step_names(put_back)} put back (committed)",
                [f"put back {step_names(put_back)} from the ledger journal\n".encode()])

    return run_on_database(parser.prog, args.db, out, step)


# ---------------------------------------------------------------------------
# Retention: clearing old raw bodies, deleting old refusals (prune)
# ---------------------------------------------------------------------------

RETENTION_SQL = {
    # Ids grow with receive times, so each table is cut
    # at the first id received on or after the date, then cleared in id ranges;
    # each range checks the receive time too, because after the clock steps
    # back ids and receive times disagree.
    "first_session_id_from": """
        SELECT id FROM sessions INDEXED BY sessions_by_time
        WHERE received_at_us >= ? ORDER BY received_at_us, id LIMIT 1""",
    "session_ids": "SELECT coalesce(min(id), 0), coalesce(max(id), -1) FROM sessions",
    "prunable_bodies": """
        SELECT count(*), coalesce(sum(length(CAST(raw_body AS BLOB))), 0) FROM sessions
        WHERE id >= ? AND id < ? AND received_at_us < ? AND raw_body != ''""",
    "clear_bodies": """
        UPDATE sessions SET raw_body = ''
        WHERE id >= ? AND id < ? AND received_at_us < ? AND raw_body != ''""",
    "first_rejected_id_from": "SELECT min(id) FROM rejected WHERE received_at_us >= ?",
    "rejected_ids": "SELECT coalesce(min(id), 0), coalesce(max(id), -1) FROM rejected",
    "prunable_rejected": """
        SELECT count(*), coalesce(sum(length(raw_body)), 0) FROM rejected
        WHERE id >= ? AND id < ? AND received_at_us < ?""",
    "delete_rejected": "DELETE FROM rejected WHERE id >= ? AND id < ? AND received_at_us < ?",
    "first_conflicts_id_from": "SELECT min(id) FROM conflicts WHERE received_at_us >= ?",
    "conflicts_ids": "SELECT coalesce(min(id), 0), coalesce(max(id), -1) FROM conflicts",
    "prunable_conflicts": """
        SELECT count(*), coalesce(sum(length(CAST(stored_body AS BLOB))
                                      + length(CAST(new_body AS BLOB))), 0)
        FROM conflicts WHERE id >= ? AND id < ? AND received_at_us < ?""",
    "delete_conflicts": "DELETE FROM conflicts WHERE id >= ? AND id < ? AND received_at_us < ?",
}

PRUNE_BATCH_ROWS = 1000  # rows per transaction: a postback waits behind one batch at most
# What `prune` can clear -> the SQL names of: the table's first and last ids,
# its first id received on or after a time, the rows and bytes received
# before a time in an id range, and clearing or deleting those.
PRUNABLE = {
    "raw bodies": ("session_ids", "first_session_id_from", "prunable_bodies", "clear_bodies"),
    "rejected": ("rejected_ids", "first_rejected_id_from", "prunable_rejected", "delete_rejected"),
    "conflicts": ("conflicts_ids", "first_conflicts_id_from", "prunable_conflicts",
                  "delete_conflicts"),
}


def prune_range(store, what, before_us):
    """The ids [first, end) of `what` received before `before_us`: ids grow
    with receive times, so the range ends at the first id received later."""
    ids_sql, from_sql, *_ = PRUNABLE[what]
    [(first, last)] = store.read(RETENTION_SQL[ids_sql])
    later = store.read(RETENTION_SQL[from_sql], (before_us,))
    end = later[0][0] if later and later[0][0] is not None else last + 1
    return first, max(first, end)


def count_prunable(store, what, before_us):
    """(rows, bytes) that prune would clear or delete, changing nothing."""
    first, end = prune_range(store, what, before_us)
    [(rows, size)] = store.read(RETENTION_SQL[PRUNABLE[what][2]], (first, end, before_us))
    return rows, size


def prune(store, what, before_us):
    """Clear or delete what was received before `before_us`, one short
    transaction per PRUNE_BATCH_ROWS ids, through the server's write path (so
    it is safe while the server runs).  Returns (rows, bytes)."""
    first, end = prune_range(store, what, before_us)
    total_rows = total_bytes = 0
    for lo in range(first, end, PRUNE_BATCH_ROWS):
        hi = min(lo + PRUNE_BATCH_ROWS, end)
        rows, size = store.write(functools.partial(prune_batch, what, lo, hi, before_us))
        total_rows, total_bytes = total_rows + rows, total_bytes + size
    return total_rows, total_bytes


@write_op
def prune_batch(what, lo, hi, before_us, conn, received_at_us):
    """One transaction of prune: ids [lo, hi) received before `before_us`."""
    count_sql, change_sql = (RETENTION_SQL[name] for name in PRUNABLE[what][2:])
    [(rows, size)] = conn.execute(count_sql, (lo, hi, before_us)).fetchall()
    conn.execute(change_sql, (lo, hi, before_us))
    return rows, size


def build_prune_parser(environ):
    parser = HelpfulParser(
        prog="spp_server.py prune",
        description="Keep the database bounded: clear old raw bodies (the parsed fields, "
        "sums and deduplication stay, so earnings and duplicates are unaffected) and delete "
        "old refused and conflicting postbacks. Safe while the server runs: short "
        "transactions of at most 1,000 rows each.",
    )
    add_db_option(parser, environ, "SQLite database file; never created")
    parser.add_argument(
        "--raw-bodies-before",
        help=f"clear the raw body of each session received before this time: {TIME_FORMS_HELP}")
    parser.add_argument(
        "--rejected-before",
        help="delete the rejected and conflicts rows received before this time; same forms")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be cleared and deleted; change nothing")
    return parser


PRUNE_OPTIONS = (("raw_bodies_before", ["raw bodies"]), ("rejected_before", ["rejected", "conflicts"]))


def prune_line(what, before, rows, size, would=""):
    done = "cleared" if what == "raw bodies" else "deleted"
    return f"{what} received before {iso_utc(before)}: {rows} {would}{done}, {size} bytes\n"


def run_prune(argv, environ, out):
    parser = build_prune_parser(environ)
    args = parse_arguments(parser, argv)
    plan = []
    for option, whats in PRUNE_OPTIONS:
        text = getattr(args, option)
        if text:
            try:
                plan += [(what, parse_instant(text)) for what in whats]
            except ValueError:
                parser.error(f"--{option.replace('_', '-')}: {TIME_FORMS_HELP}, not {shown(text)}")
    if not plan:
        parser.error("give --raw-bodies-before, --rejected-before or both")
    if args.dry_run:
        return print_report(parser.prog, args.db, out, lambda store: (
            prune_line(what, before, *count_prunable(store, what, before), "would be ")
            for what, before in plan))

    def step(store):
        lines, freed = [], 0
        try:
            for what, before in plan:
                rows, size = prune(store, what, before)
                lines.append(prune_line(what, before, rows, size))
                freed += rows
        except StoreUnavailable as exc:
            raise CommandFailed(f"{exc} (batches already done stay done; run it again)") from None
        if freed:  # the hint only when this run freed something to give back
            # Under systemd the socket would start the server again: stop both.
            lines.append("Freed pages are reused by new rows; the file keeps its size. To shrink "
                         "it, stop the server (under systemd: systemctl stop spp.socket "
                         f"spp.service) and run: sqlite3 {args.db} VACUUM\n")
        return "the pruning is committed", lines

    return run_on_database(parser.prog, args.db, out, step)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

HTTP_SQL = {
    "last_received": "SELECT max(received_at_us) FROM sessions",
}

JSON_TYPE = "application/json"
ERROR_STATUSES = (400, 401, 404, 405, 410, 413, 500, 503)


class ApiError(HTTPError):
    """An error answered as {"error": message, "field": name or null}."""

    def __init__(self, status, message, field=None, headers=None):
        super().__init__(status, message, headers=headers)
        self.field = field


def render_error(error):
    """The one error shape, for our errors and Bottle's own (404, 405, 500)."""
    response.content_type = JSON_TYPE
    return json.dumps({"error": error.body, "field": getattr(error, "field", None)})


def log_unexpected_errors(callback):
    """Bottle plugin: an exception from a route is logged with its traceback
    and answered 500 JSON; the process keeps serving."""

    def wrapper(*args, **kwargs):
        try:
            check_path_is_utf8(kwargs)
            return callback(*args, **kwargs)
        except HTTPResponse:
            raise
        except Invalid as invalid:
            raise ApiError(400, invalid.message, invalid.field) from None
        except StoreUnavailable as exc:
            log.error("%s %s: %s", request.method, request.path, exc)
            raise ApiError(503, f"storage unavailable: {exc}") from None
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            raise ApiError(500, "internal server error") from None

    return wrapper


# The API's name for each route argument, for error messages.
PATH_FIELDS = {"user_id": "user-id"}


def check_path_is_utf8(url_args):
    """Bottle drops the bytes of a percent-encoded path that are not UTF-8
    (so /users/a%FFb/earnings would read user 'ab'): refuse such a path
    instead.  Bad bytes inside a route argument are a 400 naming it; anywhere
    else the path is not one of ours, a 404."""
    raw = request.environ["bottle.raw_path"].encode("latin-1")  # PEP 3333: bytes as latin-1
    try:
        raw.decode("utf-8")
        return
    except UnicodeDecodeError:
        pass
    marked = {"PATH_INFO": raw.decode("utf-8", "replace"), "REQUEST_METHOD": request.method}
    try:
        route, args = request.app.router.match(marked)
    except HTTPError:
        route, args = None, {}
    bad = [name for name, value in args.items() if "\ufffd" in value]
    if route is not request.route or not bad:
        raise ApiError(404, "not found")
    raise Invalid(PATH_FIELDS.get(bad[0], bad[0]), "must be UTF-8 text, percent-encoded")


def bearer_token(environ):
    """The token of an `Authorization: Bearer <token>` header, as bytes, or None.
    The scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("latin-1")  # WSGI headers are latin-1 decoded bytes


def token_accepted(given, accepted):
    """Constant-time comparison against every accepted token."""
    if given is None:
        return False
    match = False
    for token in accepted:
        match |= hmac.compare_digest(given, token)
    return match


def require_token(accepted, what):
    if accepted and not token_accepted(bearer_token(request.environ), accepted):
        raise ApiError(
            401,
            f"{what} needs a valid Authorization: Bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="spp"'},
        )


def read_body(environ, limit=MAX_BODY_BYTES):
    """The request body, reading no more than `limit` + 1 bytes (413 past the limit)."""
    try:
        announced = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        announced = -1
    if announced > limit:
        raise ApiError(413, f"the body must be at most {limit} bytes")
    body = environ["wsgi.input"].read(announced if announced >= 0 else limit + 1)
    if len(body) > limit:
        raise ApiError(413, f"the body must be at most {limit} bytes")
    return body


# Accepted postbacks are logged only at debug level: the database already holds
# each one, the reverse proxy logs each request, journald would rate-limit a
# burst anyway, and a line per postback cost about a tenth of the ingest rate.
POSTBACK_LOG_LEVELS = {
    "recorded": logging.DEBUG, "duplicate": logging.DEBUG, "unauthorized": logging.INFO,
    "rejected": logging.WARNING, "too-large": logging.WARNING,
    # log_unexpected_errors logs why too; this line names the session lost.
    "unavailable": logging.ERROR, "error": logging.ERROR,
}
POSTBACK_ERROR_OUTCOMES = {401: "unauthorized", 413: "too-large"}


def quoted(text):
    """A value for a log line: JSON-quoted, so that a line break in it cannot
    forge a line; '-' when there is none."""
    return "-" if text is None else json.dumps(text, ensure_ascii=False)


def account_postback(outcome, status, session_id=None, user_id=None, field=None, reason=None):
    """Count the outcome for /stats and log the postback's line: for a refusal,
    the field and reason too."""
    request.app.counters.add(outcome)
    level = POSTBACK_LOG_LEVELS[outcome]
    if log.isEnabledFor(level):
        why = f" field={quoted(field)} reason={quoted(reason)}" if reason else ""
        log.log(level, "postback %s status=%d%s session-id=%s user-id=%s",
                outcome, status, why, quoted(session_id), quoted(user_id))


def handle_postback():
    """Answer one postback, counting every outcome: a 503 or a 500 (answered
    by log_unexpected_errors) is a session Gamezop may never send again."""
    known = {}  # its session-id and user-id, once read: for the log line of a failure
    try:
        return receive_postback(known)
    except HTTPResponse:
        raise  # answered and counted
    except StoreUnavailable as exc:
        account_postback("unavailable", 503, reason=str(exc), **known)
        raise
    except Exception as exc:
        account_postback("error", 500, reason=f"internal server error: {exc!r}", **known)
        raise


def receive_postback(known):
    app = request.app
    try:
        require_token(app.config["spp.postback_tokens"], "a postback")
        body = read_body(request.environ)
    except ApiError as error:
        account_postback(POSTBACK_ERROR_OUTCOMES[error.status_code], error.status_code,
                         reason=error.body)
        raise
    try:
        session = parse_postback(body)
    except Invalid as invalid:
        known.update(session_id=invalid.session_id, user_id=invalid.user_id)
        app.store.write(record_rejected(invalid.field, invalid.message, body))
        account_postback("rejected", 400, invalid.session_id, invalid.user_id,
                         invalid.field, invalid.message)
        raise ApiError(400, invalid.message, invalid.field) from None
    known.update(session_id=session.session_id, user_id=session.user_id)
    outcome = app.store.write(record_session(session, body.decode("utf-8")))
    if outcome == "conflict":
        log.warning(
            "postback session-id=%s repeats a stored session with different fields; "
            "kept the first copy, logged both in conflicts",
            quoted(session.session_id),
        )
        outcome = "duplicate"
    elif outcome == "duplicate":  # for the web view: one append, no write
        app.recent_duplicates.append(
            (now_us(), session.session_id, session.user_id, body.decode("utf-8")))
    account_postback(outcome, 200, session.session_id, session.user_id)
    return {"status": outcome}


def read_endpoint(handler):
    """A GET that needs the read token when one is configured."""

    def guarded(*args, **kwargs):
        require_token(request.app.config["spp.read_tokens"], "reading")
        query()  # refuses parameters the route does not take, even where it reads none
        return handler(*args, **kwargs)

    return guarded


def query():
    """The query parameters, decoded as UTF-8.  Each route declares the ones
    it takes (ROUTES); any other, one given twice, or one that is not UTF-8 is
    a 400 naming it: a misspelt `sinse=` must not read as "no window"."""
    accepted = request.route.config["query_params"]
    params = {}
    for raw_key, raw_value in request.query.allitems():  # latin-1 strings of the raw bytes
        key = raw_key.encode("latin-1").decode("utf-8", "replace")
        try:
            raw_key.encode("latin-1").decode("utf-8")
            value = raw_value.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(key, "must be UTF-8 text, percent-encoded") from None
        if key not in accepted:
            raise Invalid(key, "is not a parameter of this endpoint, which takes "
                          + (", ".join(accepted) if accepted else "none"))
        if key in params:
            raise Invalid(key, "is given more than once")
        params[key] = value
    return params


def parse_limit(params, default=50, maximum=1000):
    text = params.get("limit")
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,7}", text) or not 1 <= int(text) <= maximum:
        raise Invalid("limit", f"must be a whole number from 1 to {maximum}")
    return int(text)


def parse_property_id(params):
    value = params.get("property-id")
    return None if value is None else check_length("property-id", value, MAX_PROPERTY_ID_CHARS)


def parse_format(params, allowed, default):
    fmt = params.get("format", default)  # `format=` with no value is a mistake, not the default
    if fmt not in allowed:
        raise Invalid("format", f"must be one of {', '.join(allowed)}, not {shown(fmt)}")
    return fmt


def parse_groups(params):
    groups = [g for g in (params.get("group-by") or "").split(",") if g]
    unknown = [g for g in groups if g not in TOTALS_GROUPS]
    if unknown or len(set(groups)) != len(groups):
        raise Invalid("group-by", f"must be distinct ones of {', '.join(TOTALS_GROUPS)}")
    return groups


def stream_response(chunks, fmt):
    response.content_type = EXPORT_FORMATS[fmt]
    return chunks


@read_endpoint
def handle_user_earnings(user_id):
    params = query()
    window = parse_window(params.get("since"), params.get("until"))
    return user_earnings(
        request.app.store, user_id, window, parse_property_id(params),
        request.app.config["spp.reward_share"],
    )


@read_endpoint
def handle_earnings_export():
    params = query()
    window = parse_window(params.get("since"), params.get("until"), required=True)
    fmt = parse_format(params, EXPORT_FORMATS, "ndjson")
    chunks = export_earnings(
        request.app.store, window, parse_property_id(params), request.app.config["spp.reward_share"],
        fmt,
    )
    return stream_response(chunks, fmt)


@read_endpoint
def handle_totals():
    params = query()
    window = parse_window(params.get("since"), params.get("until"))
    groups = parse_groups(params)
    fmt = parse_format(params, ("json", "csv"), "json")
    records = totals(request.app.store, window, groups)
    if fmt == "csv":
        columns = [*groups, *SUM_FIELDS]
        return stream_response(encode_records(records, columns, fmt), fmt)
    return {
        "since": iso_utc(window.since),
        "until": iso_utc(window.until),
        "group-by": groups,
        "totals": records,
    }


# --- Reconciliation with booked revenue ---


@read_endpoint
def handle_reconciliation():
    params = query()
    config = request.app.config
    q = reconciliation_query(
        params.get("since"), params.get("until"), parse_property_id(params),
        params.get("report-utc-offset"), params.get("quantile"), config["spp.reward_share"],
        config["spp.report_utc_offset"],
    )
    fmt = parse_format(params, RECONCILIATION_FORMATS, "json")
    body = reconciliation_output(request.app.store, q, fmt)
    response.content_type = JSON_TYPE if fmt == "json" else EXPORT_FORMATS[fmt]
    return body


# --- Payout ledger: statements, the summary, a run's or a settlement's lines ---


def json_body(report):
    response.content_type = JSON_TYPE
    return json_output(report)


@read_endpoint
def handle_statement(user_id):
    query()
    check_journal_read_only(request.app.store)  # a restored copy: 503 until ledger-replay
    return json_body(statement(request.app.store, user_id))


@read_endpoint
def handle_ledger():
    query()
    check_journal_read_only(request.app.store)
    return json_body(ledger_summary(request.app.store))


def ledger_lines(what, exists_sql, output, step_id):
    params = query()
    fmt = parse_format(params, EXPORT_FORMATS, "ndjson")
    # A step not in the journal yet has not released its lines: not yet here.
    unreleased = check_journal_read_only(request.app.store)
    # Bottle's int filter takes any length; SQLite's integers stop at 2**63.
    if not 0 < step_id < 2**63 or (what, step_id) in unreleased or not request.app.store.read(
            FRAME_SQL[exists_sql], (step_id,)):
        raise ApiError(404, f"no {what} {step_id}", f"{what}-id")
    return stream_response(output(request.app.store, step_id, fmt), fmt)


@read_endpoint
def handle_ledger_run(run_id):
    return ledger_lines("run", "run_exists", run_output, run_id)


@read_endpoint
def handle_ledger_settlement(settlement_id):
    return ledger_lines("settlement", "settlement_exists", settlement_output, settlement_id)


@read_endpoint
def handle_user_sessions(user_id):
    params = query()
    limit = parse_limit(params)
    before = decode_cursor(params["before"]) if params.get("before") else None
    sessions, cursor = user_sessions(request.app.store, user_id, limit, before)
    return {"user-id": user_id, "sessions": sessions, "next": cursor}


@read_endpoint
def handle_session_feed():
    params = query()
    cursor = params.get("after") or "0"
    fmt = parse_format(params, ("json", "ndjson"), "json")
    try:
        if fmt == "ndjson":
            return stream_response(session_feed_stream(request.app.store, cursor), fmt)
        sessions, cursor = session_feed_page(request.app.store, cursor, parse_limit(params, 100))
    except CursorGone as gone:
        raise ApiError(410, str(gone), "after") from None
    return {"sessions": sessions, "next": cursor}


@read_endpoint
def handle_metrics():
    response.content_type = METRICS_TYPE
    return prometheus_metrics(request.app.store, request.app.counters, request.app.revenue)


@read_endpoint
def handle_stats():
    return stats(request.app.store, request.app.counters)


@read_endpoint
def handle_rejected():
    return {"rejected": newest_rejected(request.app.store, parse_limit(query()))}


@read_endpoint
def handle_conflicts():
    return {"conflicts": newest_conflicts(request.app.store, parse_limit(query()))}


DURATION = re.compile(r"([0-9]{1,7})([smhd])")
SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text, field):
    """'90s', '30m', '2h', '1d' -> seconds (Invalid naming `field` otherwise)."""
    match = DURATION.fullmatch(text)
    if not match or int(match.group(1)) == 0:
        raise Invalid(field, "must be a whole number of s, m, h or d above 0, such as 30m")
    return int(match.group(1)) * SECONDS_PER_UNIT[match.group(2)]


def last_received_age_s(store):
    """Whole seconds since the newest stored session was received; None before the first."""
    [(last,)] = store.read(HTTP_SQL["last_received"])
    return age_s(last)


def handle_healthz():
    """Plain: whether the database works.  With postbacks-within=30m, also
    whether a session was recorded that recently (for an uptime monitor: a
    silent server is healthy to systemd, but worth an alert)."""
    params = query()
    within = params.get("postbacks-within")
    window_s = None if within is None else parse_duration(within, "postbacks-within")
    problem = request.app.store.health_problem()
    if problem:
        raise ApiError(503, problem)
    if window_s is None:
        return {"status": "ok"}
    age = last_received_age_s(request.app.store)
    if age is None or age > window_s:
        response.status = 503
        return {"status": "silent", "last-received-age-seconds": age}
    return {"status": "ok", "last-received-age-seconds": age}


# Every route, and the query parameters it takes: query() refuses any other.
# The postback routes read none and check none (None): Gamezop calls the URL
# the publisher registered, whatever query string it carries, and no parameter
# can change what a postback records; refusing one would lose every postback.
WINDOW_PARAMS = ("since", "until", "property-id")
ROUTES = [
    # The trailing-slash form too: a redirect would count as a failed delivery.
    ("/postback", "POST", handle_postback, None),
    ("/postback/", "POST", handle_postback, None),
    # A user id may hold '/' (sent as %2F, decoded before routing) or be empty.
    # [\s\S], not '.': a user id may hold a line break.
    (r"/users/<user_id:re:[\s\S]*>/earnings", "GET", handle_user_earnings, WINDOW_PARAMS),
    (r"/users/<user_id:re:[\s\S]*>/sessions", "GET", handle_user_sessions, ("limit", "before")),
    ("/earnings", "GET", handle_earnings_export, (*WINDOW_PARAMS, "format")),
    ("/totals", "GET", handle_totals, ("since", "until", "group-by", "format")),
    ("/reconciliation", "GET", handle_reconciliation,
     (*WINDOW_PARAMS, "format", "report-utc-offset", "quantile")),
    (r"/users/<user_id:re:[\s\S]*>/statement", "GET", handle_statement, ()),
    ("/ledger", "GET", handle_ledger, ()),
    ("/ledger/runs/<run_id:int>", "GET", handle_ledger_run, ("format",)),
    ("/ledger/settlements/<settlement_id:int>", "GET", handle_ledger_settlement, ("format",)),
    ("/sessions", "GET", handle_session_feed, ("after", "limit", "format")),
    ("/stats", "GET", handle_stats, ()),
    ("/metrics", "GET", handle_metrics, ()),
    ("/rejected", "GET", handle_rejected, ("limit",)),
    ("/conflicts", "GET", handle_conflicts, ("limit",)),
    ("/healthz", "GET", handle_healthz, ("postbacks-within",)),
]


def create_app(config):
    """The WSGI app for `config` (keys as in DEFAULTS); opens the database.
    Call app.store.close() when done with it."""
    settings = {**DEFAULTS, **config}
    app = Bottle()
    app.config.update("spp", **settings)
    app.store = Store(
        settings["db"], settings["busy_timeout_ms"], writer=settings["writer"],
        # Every request thread and the watchdog may write at once.
        channels=settings["threads"] + 1,
    )
    app.counters = PostbackCounters()
    # For the web view: exact duplicates answered lately (never written),
    # and the month's sums kept in memory.
    app.recent_duplicates = collections.deque(maxlen=RECENT_DUPLICATES)
    app.rollup = Rollup(settings["report_utc_offset"])
    app.ranking = Ranking()
    app.revenue = RevenueTotal()
    app.install(log_unexpected_errors)
    for status in ERROR_STATUSES:
        app.error(status)(render_error)
    for path, method, handler, params in (*ROUTES, *VIEW_ROUTES):
        app.route(path, method, handler, query_params=params)
    return app


# ---------------------------------------------------------------------------
# Web view: read-only pages of the month, the ledger, users and postbacks
# ---------------------------------------------------------------------------

# Pages built on the functions the API answers with (reconciliation, totals,
# stats, ledger_summary, statement, user_earnings, user_sessions,
# newest_rejected, newest_conflicts), so a figure on a page is the API's
# figure; each page names the call that gives it.  HTML built here with
# every value escaped, charts drawn as inline SVG, one static style sheet
# (view.css): no script at all, nothing from another origin.

VIEW_SQL = {
    # Where the view's rollup stands: the newest id, and the session at the
    # id it has read up to (a restored backup puts another one there).
    "rollup_mark": """
        SELECT (SELECT max(id) FROM sessions), (SELECT session_id FROM sessions WHERE id = ?)""",
    "session_id_at": "SELECT session_id FROM sessions WHERE id = ?",
    # The sessions added since the rollup's last read, from its horizon on:
    # by the primary key (the time index would read every session since the
    # horizon at each catch-up; a test holds the plan).
    "rollup_rows": """
        SELECT (received_at_us + :offset_us) / 86400000000, property_id, country, count(*),
               coalesce(sum(ads_viewed), 0), coalesce(sum(duration_s), 0),
               sum(revenue_nano / 1000000000), sum(revenue_nano % 1000000000)
        FROM sessions
        WHERE id > :after AND id <= :last AND received_at_us >= :horizon_us
        GROUP BY 1, 2, 3""",
    # The ranking only (total() is a float: it orders, it never shows): the
    # figures on the page come from user_earnings, as the API's do.
    "users_by_revenue": """
        SELECT user_id FROM (
            SELECT user_id, total(revenue_nano) AS revenue
            FROM sessions INDEXED BY sessions_by_user
            WHERE received_at_us >= :since AND received_at_us < :until GROUP BY user_id)
        ORDER BY revenue DESC, user_id""",
    "first_user_from": """
        SELECT user_id FROM sessions INDEXED BY sessions_by_user
        WHERE user_id >= ? ORDER BY user_id LIMIT 1""",
    "next_user_after": """
        SELECT user_id FROM sessions INDEXED BY sessions_by_user
        WHERE user_id > ? ORDER BY user_id LIMIT 1""",
    "newest_sessions": """
        SELECT received_at_us, session_id, user_id, raw_body FROM sessions INDEXED BY sessions_by_time
        WHERE received_at_us < :before ORDER BY received_at_us DESC LIMIT :limit""",
}

VIEW_CSS_PATH = Path(__file__).with_name("view.css")
VIEW_ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
             b'<rect width="16" height="16" rx="3" fill="#0072B2"/>'
             b'<path d="M3 12V8h2v4zm4 0V4h2v8zm4 0V6h2v6z" fill="#fff"/></svg>')
VIEW_HEADERS = {
    # No script may run, nothing may load from another origin, no page may
    # frame these: the values on them come from whoever can post.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Earnings: never kept by a shared cache, nor in the browser's.
    "Cache-Control": "no-store",
}
VIEW_PAGE_SIZE = 50
VIEW_SILENCE_WINDOW = "30m"  # the window the deploy docs give the silence alarm
RECENT_DUPLICATES = 200  # exact duplicates kept in memory for the postbacks page
# Controls and the bidi marks that could reorder or hide text: shown as
# escapes (in a distinct style), so that an id reads the same as it is.
INLINE_HIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
BLOCK_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
# Okabe and Ito's colour-blind-safe palette, as CSS classes s0.. in view.css.
SERIES_CLASSES = ("s0", "s1", "s2")


def shown_escape(match):
    return f'<span class="ctl">{match.group().encode("unicode_escape").decode("ascii")}</span>'


def esc(value, hidden=INLINE_HIDDEN):
    """Any value as HTML text: escaped, its invisible characters shown."""
    if value is None:
        return '<span class="none">none</span>'
    return hidden.sub(shown_escape, html.escape(str(value), quote=True))


def esc_block(text):
    """A raw body for <pre>: line breaks kept, other invisibles shown."""
    return esc(text, BLOCK_HIDDEN)


def path_part(text):
    """A user id as one path segment of a link (and of the API call shown)."""
    return urllib.parse.quote(text, safe="")


def view_link(path, params=None):
    query_text = urllib.parse.urlencode(params or {})
    return html.escape(f"{path}?{query_text}" if query_text else path, quote=True)


def user_cell(user_id):
    """A user id linked to its page; <bdi> keeps right-to-left text inside."""
    return (f'<a class="id" href="{view_link("/view/users/" + path_part(user_id))}">'
            f"<bdi>{esc(user_id) if user_id else '(no sub)'}</bdi></a>")


def html_table(columns, rows, caption=None, raw_columns=()):
    """A table in a scrolling box: rows are sequences of values, escaped
    unless their column is in raw_columns (already HTML)."""
    head = "".join(f'<th scope="col">{esc(c)}</th>' for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{value if column in raw_columns else esc(value)}</td>"
                         for column, value in zip(columns, row)) + "</tr>"
        for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(columns)}">none</td></tr>'
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="table" tabindex="0" role="region" aria-label="{esc(caption or "table")}">'
            f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def records_table(records, caption=None, first=None):
    """A list of API records (dicts) as a table, its columns the records'
    keys: a field the API adds shows up here too."""
    columns = list(records[0]) if records else ([first] if first else [""])
    return html_table(columns, [[r.get(c) for c in columns] for r in records], caption)


def fields_list(record):
    """One API record (a dict) as a definition list."""
    def shown_value(value):  # a list (the warnings): its items in one line
        return esc("; ".join(map(str, value)) or "none") if isinstance(value, list) else esc(value)

    items = "".join(f"<dt>{esc(key)}</dt><dd>{shown_value(value)}</dd>"
                    for key, value in record.items())
    return f'<dl class="fields">{items}</dl>'


def chart_number(text):
    """A figure's exact decimal text -> a Fraction, for drawing only."""
    return None if text is None else Fraction(decimal.Decimal(text))


def svg_chart(title, y_label, x_label, labels, series, line=None):
    """A bar chart as inline SVG.  series: [(name, [(value, text) or None per
    label])]; line: (name, value, text) drawn across.  Every bar and the line
    carry a <title> with the exact figure (shown on hover); the axes are
    labelled; colours come from view.css (palette, dark mode)."""
    width, height, left, right, top, bottom = 640, 260, 72, 12, 16, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, points in series for p in points if p for v in [p[0]]]
    if line:
        values.append(line[1])
    top_value = max(values, default=0) or 1
    def y_of(value):
        # A pixel position only: the exact figure is each bar's text (<title>).
        return top + plot_h - float(value / top_value) * plot_h
    slot = plot_w / max(len(labels), 1)
    bar_w = max(slot * 0.8 / max(len(series), 1), 1)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{esc(title)}</title>",
             f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>']
    counts = all(isinstance(v, int) for v in values)
    for fraction, anchor in ((0, "0"), (Fraction(1, 2), None), (1, None)):
        value = top_value * fraction
        if counts and value != int(value):
            continue  # no half a session
        text = anchor or floor_places(Fraction(value), 6).rstrip("0").rstrip(".")
        parts.append(f'<text class="tick" x="{left - 4}" y="{y_of(value) + 4:.1f}" '
                     f'text-anchor="end">{esc(text)}</text>')
    step = max(1, math.ceil(len(labels) / 10))
    for i, label in enumerate(labels):
        if i % step == 0:
            x = left + slot * (i + 0.5)
            parts.append(f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 14}" '
                         f'text-anchor="middle">{esc(label[-2:] if len(label) == 10 else label)}</text>')
    for k, (name, points) in enumerate(series):
        for i, point in enumerate(points):
            if point is None:
                continue
            value, text = point
            x = left + slot * i + slot * 0.1 + bar_w * k
            y = y_of(value)
            parts.append(f'<rect class="{SERIES_CLASSES[k]}" x="{x:.1f}" y="{y:.1f}" '
                         f'width="{bar_w:.1f}" height="{top + plot_h - y:.1f}">'
                         f"<title>{esc(labels[i])} · {esc(name)}: {esc(text)}</title></rect>")
    if line:
        name, value, text = line
        y = y_of(value)
        parts.append(f'<line class="share" x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}">'
                     f"<title>{esc(name)}: {esc(text)}</title></line>")
    parts.append(f'<text class="label" x="{left + plot_w / 2:.0f}" y="{height - 6}" '
                 f'text-anchor="middle">{esc(x_label)}</text>')
    parts.append(f'<text class="label" transform="rotate(-90)" x="{-(top + plot_h / 2):.0f}" '
                 f'y="14" text-anchor="middle">{esc(y_label)}</text>')
    parts.append("</svg>")
    legend = "".join(f'<li><span class="key {SERIES_CLASSES[k]}"></span>{esc(name)}</li>'
                     for k, (name, _) in enumerate(series))
    if line:
        legend += f'<li><span class="key share"></span>{esc(line[0])}: {esc(line[2])}</li>'
    return f'<figure>{"".join(parts)}<figcaption><ul class="legend">{legend}</ul></figcaption></figure>'


VIEW_NAV = (("/view/", "Month"), ("/view/ledger", "Ledger"), ("/view/users", "Users"),
            ("/view/postbacks", "Postbacks"))


def view_page(title, api_calls, body, here):
    """A whole page: its API calls named, so a figure can be checked with curl."""
    current = ' aria-current="page"'
    nav = "".join(f'<a href="{path}"{current if path == here else ""}>{name}</a>'
                  for path, name in VIEW_NAV)
    calls = "".join(f"<li><code>{esc(call)}</code></li>" for call in api_calls)
    response.content_type = "text/html; charset=utf-8"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · spp-receiver</title>"
        '<link rel="stylesheet" href="/view/view.css"><link rel="icon" href="/view/icon.svg">'
        '</head><body><a class="skip" href="#main">Skip to the content</a>'
        f'<header><span class="brand">spp-receiver</span><nav aria-label="Pages">{nav}</nav></header>'
        f'<main id="main"><h1>{esc(title)}</h1>{body}'
        f'<section class="api"><h2>The same figures from the API</h2>'
        f"<p>Each figure on this page is what these read calls answer "
        f"(with the read token as <code>Authorization: Bearer</code>):</p><ul>{calls}</ul></section>"
        "</main><footer>Read-only: paying and settling are commands "
        "(<code>spp_server.py pay</code>, <code>settle</code>).</footer></body></html>"
    )


class Rollup:
    """Sessions of the last HORIZON_DAYS report days summed per day, property
    and country, kept in memory for the month page and caught up by row id:
    sessions are only added, in id order (see FEED_SQL['session_feed']), so
    each catch-up reads only the rows added since the last one.  The first
    reads them all once.  A month that starts before the horizon is read
    with SQL, as the API reads it."""

    # The current month and the two before, on any day of the month: what a
    # publisher checks week by week.  The sums then take about 470 bytes per
    # cell and 92 days x properties x countries cells (18,000 for 2 x 100).
    HORIZON_DAYS = 92
    # More distinct (day, property, country) than that (property ids come
    # from whoever can post): drop the sums for good and read with SQL.
    MAX_CELLS = 50_000

    def __init__(self, offset_minutes):
        self.offset_minutes = offset_minutes
        self._lock = threading.Lock()
        self.too_many = False
        self._reset()

    def _reset(self):
        self.cells, self.last_id, self.last_session_id = {}, 0, None

    def horizon_day(self):
        """The first report day the sums hold."""
        return (now_us() + self.offset_minutes * 60 * 1_000_000) // DAY_US - self.HORIZON_DAYS

    def holds(self, first_day):
        """Whether the sums hold every report day from `first_day` on."""
        return not self.too_many and first_day >= self.horizon_day()

    # How many SQLite VM steps a cancellable catch-up runs between two looks
    # at whether it is cancelled (a look is a Python call: ~1 per 20 rows).
    CANCEL_CHECK_STEPS = 1000

    def refresh(self, store, cancelled=None):
        """Catch up with the database; False when too many cells to keep.
        A read that fails (or is cancelled: `cancelled()` true) raises
        StoreUnavailable and changes none of the sums."""
        if self.too_many:
            return False
        with self._lock, store.snapshot() as conn:
            if cancelled is not None:
                conn.set_progress_handler(cancelled, self.CANCEL_CHECK_STEPS)
            try:
                return self._catch_up(conn)
            finally:
                conn.set_progress_handler(None, 0)

    def _catch_up(self, conn):
        [(newest, at_last)] = conn.execute(VIEW_SQL["rollup_mark"], (self.last_id,)).fetchall()
        if at_last != self.last_session_id or (newest or 0) < self.last_id:
            self._reset()  # a restored backup: ids mean other sessions now
        if newest is None or newest == self.last_id:
            return True
        offset_us, horizon = self.offset_minutes * 60 * 1_000_000, self.horizon_day()
        params = {"after": self.last_id, "last": newest, "offset_us": offset_us,
                  "horizon_us": horizon * DAY_US - offset_us}
        # Every row read before any is added: a read cut short adds nothing.
        cursor, added = conn.execute(VIEW_SQL["rollup_rows"], params), []
        while batch := cursor.fetchmany(1000):
            added += batch
            if len(added) > self.MAX_CELLS:  # never more than that in memory
                self.too_many = True
                self._reset()
                return False
        for key in [key for key in self.cells if key[0] < horizon]:  # days gone past it
            del self.cells[key]
        for day, prop, country, sessions, ads, duration, whole, rest in added:
            cell = self.cells.setdefault((day, prop, country), [0, 0, 0, 0])
            for i, value in enumerate((sessions, ads, duration, joined_nanos(whole, rest))):
                cell[i] += value
        self.last_id = newest
        self.last_session_id = conn.execute(VIEW_SQL["session_id_at"], (newest,)).fetchone()[0]
        if len(self.cells) > self.MAX_CELLS:
            self.too_many = True
            self._reset()
        return not self.too_many

    def sums(self, since_day, until_day, key, property_id=None):
        """{key(day, property, country): [sessions, ads, duration, nanos]} over the days."""
        out = {}
        for (day, prop, country), cell in list(self.cells.items()):
            if since_day <= day < until_day and (property_id is None or prop == property_id):
                target = out.setdefault(key(day, prop, country), [0, 0, 0, 0])
                for i, value in enumerate(cell):
                    target[i] += value
        return out

    def estimates_of(self, store, window, split, days=None):
        """estimates_of_days, from the rollup (same rows, same order), cut at
        its one offset (window["offset_us"])."""
        offset_us = self.offset_minutes * 60 * 1_000_000
        since_day, until_day = ((window[b] + offset_us) // DAY_US for b in ("since", "until"))
        sums = self.sums(since_day, until_day, lambda d, p, c: (d, p if split else None),
                         window["property"])
        return [(day, prop, n, nanos // NANOS_PER_USD, nanos % NANOS_PER_USD)
                for (day, prop), (n, _, _, nanos) in sorted(sums.items(), key=null_first)]

    def totals(self, since_day, until_day, group):
        """totals() by one group (property-id or country) over the days."""
        index = {"property-id": 1, "country": 2}[group]
        sums = self.sums(since_day, until_day, lambda *key: key[index])
        return [{group: value, **sums_record(
                    (n, ads, duration, nanos // NANOS_PER_USD, nanos % NANOS_PER_USD, None, None))[0]}
                for value, (n, ads, duration, nanos) in sorted(sums.items(), key=null_first)]


class Ranking:
    """The users of a window by estimated revenue, kept for RANKING_TTL_S:
    ranking a month of 1,000,000 sessions reads them all (about half a
    second), so a page of the list reads only its own users' figures, fresh.
    The order (and who is in it) is at most that old; one window is kept."""

    RANKING_TTL_S = 60

    def __init__(self):
        self._lock = threading.Lock()
        self._window, self._built, self._ids = None, None, []

    def users(self, store, window):
        with self._lock:
            now = time.monotonic()
            if self._window != window or now - self._built > self.RANKING_TTL_S:
                self._window, self._ids = None, []  # the old list can go first
                self._ids = [row[0] for row in store.read(VIEW_SQL["users_by_revenue"],
                                                          window.params())]
                self._window, self._built = window, now
            return self._ids


def null_first(item):
    """SQLite's ascending order: NULL before any text."""
    key = item[0] if isinstance(item[0], tuple) else (item[0],)
    return tuple((part is not None, part if part is not None else "") for part in key)


def view_rollup(app, first_day):
    """The app's rollup when it can answer for the report days from
    `first_day` on (None: read with SQL instead)."""
    rollup = app.rollup
    return rollup if rollup.holds(first_day) and rollup.refresh(app.store) else None


# How often the server catches the view's sums up in the background, so that
# a page reads only what arrived since (a few seconds of postbacks) and not,
# on its first load after a start, every session once (1.3 s per million).
ROLLUP_REFRESH_S = 10


def start_rollup_refresh(app, stopping, interval=ROLLUP_REFRESH_S):
    """Catch the view's sums up now, then every `interval` seconds, on a
    thread at the lowest CPU priority: SQLite releases the GIL while it reads,
    so the thread takes only the CPU time postbacks leave idle.  Ends with
    `stopping`, a catch-up in progress cut short (serve joins the thread, so
    the interpreter never exits under a read), or for good once the sums have
    too many cells to keep."""

    def refresh():
        lower_this_threads_priority()
        while not stopping.is_set():
            before = app.rollup.last_id
            try:
                kept = app.rollup.refresh(app.store, cancelled=stopping.is_set)
            except (StoreUnavailable, sqlite3.Error) as exc:
                if not stopping.is_set():
                    log.warning("view: the month's sums were not caught up (a page will): %s", exc)
            else:
                if not kept:
                    return
                if app.rollup.last_id != before:
                    log.debug("view: the month's sums are caught up to session row %d",
                              app.rollup.last_id)
            if stopping.wait(interval):
                return

    thread = threading.Thread(target=refresh, name="spp-view-sums")
    thread.start()
    return thread


def lower_this_threads_priority():
    """Nice 19 for the calling thread alone (on Linux a thread has its own
    scheduling priority); where that is refused, it keeps the process's."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as exc:
        log.info("view: the thread catching up its sums keeps the normal priority: %s", exc)


def current_month(offset_minutes):
    day = utc_date_text((now_us() + offset_minutes * 60 * 1_000_000) // DAY_US)
    return day[:7]


def parse_month(text, offset_minutes):
    """'2026-11' -> (first report day number, first of the next month)."""
    if text is None:
        text = current_month(offset_minutes)
    match = re.fullmatch(r"([0-9]{4})-(0[1-9]|1[0-2])", text)
    if not match:
        raise Invalid("month", "must be a month as YYYY-MM, such as 2026-11")
    year, month = int(match.group(1)), int(match.group(2))
    if not 1970 <= year <= 9998:
        raise Invalid("month", "must be a month from 1970-01 to 9998-12")
    first = report_day_number(f"{year:04d}-{month:02d}-01")
    following = f"{year + month // 12:04d}-{month % 12 + 1:02d}-01"
    return text, first, report_day_number(following)


def month_window(first, following, offset_minutes):
    """The month's report days as a Window on receive times, and its API texts."""
    offset = utc_offset_text(offset_minutes)
    since, until = (f"{report_day_text(day)}T00:00:00{offset}" for day in (first, following))
    return Window(parse_instant(since), parse_instant(until)), since, until


def month_of_request(params):
    """The ?month= of a page -> (month text, first and following report day
    numbers, the Window on receive times, its since and until texts)."""
    offset = request.app.config["spp.report_utc_offset"]
    month, first, following = parse_month(params.get("month"), offset)
    return (month, first, following, *month_window(first, following, offset))


def month_form(path, month, extra=()):
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in extra)
    return (f'<form method="get" action="{path}" class="pick"><label>Month '
            f'<input type="month" name="month" value="{esc(month)}" pattern="[0-9]{{4}}-[0-9]{{2}}">'
            f"</label>{hidden}<button>Show</button></form>")


def day_points(days, key):
    """The reconciliation's records summed per day (a day split by property
    has one record per property): {day: [sessions, estimated, booked, paired
    estimated, paired booked]} in nanos."""
    out = {}
    for record in days:
        row = out.setdefault(record["day"], [0, 0, None, 0, 0])
        row[0] += record["sessions"] or 0
        est = usd_to_nanos(decimal.Decimal(record["estimated-revenue"] or "0"))
        row[1] += est
        if record["booked-revenue"] is not None:
            booked = usd_to_nanos(decimal.Decimal(record["booked-revenue"]))
            row[2] = (row[2] or 0) + booked
            if record["estimated-revenue"] is not None:
                row[3] += est
                row[4] += booked
    return out


def silence_state(store):
    """The silence alarm's answer (GET /healthz?postbacks-within=30m)."""
    age = last_received_age_s(store)
    window_s = parse_duration(VIEW_SILENCE_WINDOW, "postbacks-within")
    return ("ok" if age is not None and age <= window_s else "silent"), age


@functools.cache
def view_css():
    return VIEW_CSS_PATH.read_bytes()


def view_endpoint(handler):
    """A page of the view: the read token (HTTP Basic with the token as the
    password, which a browser asks for and keeps, or Bearer), the security
    headers on every answer, errors included."""

    def guarded(*args, **kwargs):
        for name, value in VIEW_HEADERS.items():
            response.set_header(name, value)
        try:
            if not token_accepted(view_token(request.environ), request.app.config["spp.read_tokens"]) \
                    and request.app.config["spp.read_tokens"]:
                raise ApiError(401, "the view needs the read token as the password (any user name)",
                               headers={"WWW-Authenticate": 'Basic realm="spp view", charset="UTF-8"'})
            return handler(*args, **kwargs)
        except Invalid as invalid:
            error = ApiError(400, invalid.message, invalid.field)
        except HTTPError as error_:
            error = error_
        for name, value in VIEW_HEADERS.items():  # an error replaces the response's headers
            error.set_header(name, value)
        raise error

    return guarded


def view_token(environ):
    """The token of a Basic (the password) or Bearer Authorization header."""
    scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "basic":
        return bearer_token(environ)
    try:
        decoded = base64.b64decode(value.strip(" ").encode("latin-1"), validate=True)
    except ValueError:
        return None
    _, colon, password = decoded.partition(b":")
    return password if colon and password else None


@view_endpoint
def handle_view_css():
    response.content_type = "text/css; charset=utf-8"
    return view_css()


@view_endpoint
def handle_view_icon():
    response.content_type = "image/svg+xml"
    return VIEW_ICON


def postbacks_link(term, outcome, count):
    """A count of postbacks as a <dt>/<dd> pair, linking to them."""
    href = view_link("/view/postbacks", {"outcome": outcome})
    return f'<dt>{esc(term)}</dt><dd><a href="{href}">{count:,}</a></dd>'


@view_endpoint
def handle_view_month():
    params = query()
    app, config = request.app, request.app.config
    offset = config["spp.report_utc_offset"]
    month, first, following, window, since, until = month_of_request(params)
    rollup = view_rollup(app, first)
    q = reconciliation_query(report_day_text(first), report_day_text(following), None, offset,
                             None, config["spp.reward_share"])
    report = reconciliation(app.store, q, rollup.estimates_of if rollup else estimates_of_days)
    by = {group: rollup.totals(first, following, group) if rollup else
          totals(app.store, window, [group]) for group in ("property-id", "country")}
    now = stats(app.store, app.counters)
    state, age = silence_state(app.store)
    days = [report_day_text(d) for d in range(first, following)]
    per_day = day_points(report["days"], "day")
    summary = report["summary"]
    usd = lambda nanos: (Fraction(nanos, NANOS_PER_USD), nanos_to_usd(nanos))
    sessions_chart = svg_chart(
        f"Sessions per report day, {month}", "sessions", "report day",
        days, [("sessions", [(per_day[d][0], f"{per_day[d][0]:,}") if d in per_day else None
                             for d in days])])
    revenue_chart = svg_chart(
        f"Estimated and booked revenue per report day, {month} (USD)", "USD", "report day", days,
        [("estimated", [usd(per_day[d][1]) if d in per_day else None for d in days]),
         ("booked", [usd(per_day[d][2]) if d in per_day and per_day[d][2] is not None else None
                     for d in days])])
    ratios = {d: ratio_text(row[4], row[3]) for d, row in per_day.items() if row[3]}
    share = summary.get("suggested-reward-share")
    ratio_chart = svg_chart(
        f"Booked ÷ estimated per report day, {month}", "ratio", "report day", days,
        [("booked ÷ estimated", [(chart_number(ratios[d]), ratios[d]) if ratios.get(d) else None
                                 for d in days])],
        line=("suggested reward share", chart_number(share), share) if share else None)
    prev_month = report_day_text(first - 1)[:7]
    next_month = report_day_text(following)[:7]
    body = (
        month_form("/view/", month)
        + f'<p class="steps"><a href="{view_link("/view/", {"month": prev_month})}">← {prev_month}</a> '
        f'<a href="{view_link("/view/", {"month": next_month})}">{next_month} →</a></p>'
        + '<section><h2>Are postbacks arriving?</h2><dl class="fields">'
        f'<dt>silence alarm ({VIEW_SILENCE_WINDOW})</dt><dd class="live state-{state}">{state}</dd>'
        f'<dt>last postback received</dt><dd class="live">{esc(now["last-received-at"])}'
        f'{"" if age is None else f" ({age:,} s ago)"}</dd>'
        f'<dt>sessions stored</dt><dd>{now["sessions"]:,}</dd>'
        + postbacks_link("rejected postbacks kept", "rejected", now["rejected"])
        + postbacks_link("conflicting duplicates kept", "conflict", now["conflicts"])
        + postbacks_link("exact duplicates since the server started", "duplicate",
                         now["since-start"]["duplicate"])
        + "</dl></section>"
        + f"<section><h2>Sessions and revenue per report day</h2>"
        f"<p>Report days at UTC{esc(utc_offset_text(offset))}, as the booked reports count them.</p>"
        f"{sessions_chart}{revenue_chart}{ratio_chart}"
        f'<details><summary>The days as a table</summary>{records_table(report["days"], "Days", "day")}</details>'
        "</section>"
        + f'<section><h2>The month in sum</h2>{fields_list(summary)}</section>'
        + f'<section><h2>By property</h2>{records_table(by["property-id"], "Totals by property", "property-id")}</section>'
        + f'<section><h2>By country</h2>{records_table(by["country"], "Totals by country", "country")}</section>'
    )
    enc = urllib.parse.quote
    calls = [f"GET /reconciliation?since={report_day_text(first)}&until={report_day_text(following)}"
             f"&report-utc-offset={enc(utc_offset_text(offset))}",
             f"GET /totals?since={enc(since)}&until={enc(until)}&group-by=property-id",
             f"GET /totals?since={enc(since)}&until={enc(until)}&group-by=country",
             f"GET /healthz?postbacks-within={VIEW_SILENCE_WINDOW}", "GET /stats"]
    return view_page(f"The month {month}", calls, body, "/view/")


@view_endpoint
def handle_view_ledger():
    query()
    try:  # a restored copy's ledger is not shown until ledger-replay (see GET /ledger)
        check_journal_read_only(request.app.store)
    except StoreUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    summary = ledger_summary(request.app.store)
    runs, settlements = summary["runs"], summary["settlements"]
    usd = lambda text: (chart_number(text), text)
    runs_chart = svg_chart(
        "Paid now per run (USD)", "USD", "run",
        [f"run {r['run-id']}" for r in runs], [("paid now", [usd(r["paid-now"]) for r in runs])])
    settle_chart = svg_chart(
        "Top-ups per settlement (USD)", "USD", "settlement",
        [f"settlement {s['settlement-id']}" for s in settlements],
        [("topped up", [usd(s.get("released", "0")) for s in settlements])])
    body = (
        f'<section><h2>Totals</h2>{fields_list(summary["totals"])}</section>'
        f"<section><h2>Runs</h2>{runs_chart}{records_table(runs, 'Runs', 'run-id')}</section>"
        f"<section><h2>Settlements</h2>{settle_chart}"
        f"{records_table(settlements, 'Settlements', 'settlement-id')}</section>"
        f'<section><h2>Settled days: booked against paid</h2>'
        f'{records_table(summary["days"], "Settled days", "day")}</section>'
    )
    return view_page("The ledger", ["GET /ledger"], body, "/view/ledger")


def parse_page(params):
    text = params.get("page") or "1"
    if not re.fullmatch(r"[0-9]{1,7}", text) or int(text) < 1:
        raise Invalid("page", "must be a whole number from 1")
    return int(text)


def search_users(store, prefix, limit):
    """Up to `limit` user ids that start with `prefix`, in order: one index
    seek each on sessions_by_user."""
    found = []
    while len(found) < limit:
        rows = (store.read(VIEW_SQL["next_user_after"], (found[-1],)) if found
                else store.read(VIEW_SQL["first_user_from"], (prefix,)))
        if not rows or not rows[0][0].startswith(prefix):
            break
        found.append(rows[0][0])
    return found


@view_endpoint
def handle_view_users():
    params = query()
    app, config = request.app, request.app.config
    month, first, following, window, since, until = month_of_request(params)
    page = parse_page(params)
    search = params.get("search")
    share = config["spp.reward_share"]
    if search is not None:
        ids, users = search_users(app.store, search, VIEW_PAGE_SIZE), None
    else:
        ranked = app.ranking.users(app.store, window)
        ids, users = ranked[(page - 1) * VIEW_PAGE_SIZE:page * VIEW_PAGE_SIZE], len(ranked)
    records = []
    for user_id in ids:
        earned = user_earnings(app.store, user_id, window, None, share)
        ledger = statement(app.store, user_id)["totals"]
        records.append([user_cell(user_id), earned["sessions"], earned["estimated-revenue"],
                        *( [earned["rewardable-revenue"]] if share is not None else []),
                        ledger["paid-now"], ledger["pending"], ledger["owed"]])
    columns = ["user-id", "sessions", "estimated-revenue",
               *(["rewardable-revenue"] if share is not None else []),
               "paid-now (all time)", "pending", "owed"]
    pages = ""
    if users is not None:
        last = max(1, -(-users // VIEW_PAGE_SIZE))
        nav = [f"page {page:,} of {last:,} ({users:,} users with sessions in {month})"]
        if page > 1:
            nav.insert(0, f'<a href="{view_link("/view/users", {"month": month, "page": page - 1})}">← previous</a>')
        if page < last:
            nav.append(f'<a href="{view_link("/view/users", {"month": month, "page": page + 1})}">next →</a>')
        pages = f'<p class="steps">{" ".join(nav)}</p>'
    search_form = ('<form method="get" action="/view/users" class="pick" role="search">'
                   f'<label>User id starts with <input type="search" name="search" '
                   f'value="{esc(search or "")}" maxlength="{MAX_USER_ID_CHARS}"></label>'
                   "<button>Search</button></form>")
    heading = (f"<h2>User ids starting with <q><bdi>{esc(search)}</bdi></q></h2>" if search is not None
               else f"<h2>Top users of {esc(month)} by estimated revenue</h2>")
    body = (search_form + month_form("/view/users", month) + heading + pages
            + html_table(columns, records, f"Users, {month}", raw_columns=("user-id",)) + pages)
    enc = urllib.parse.quote
    calls = [f"GET /earnings?since={enc(since)}&until={enc(until)} (the same users, by user-id)",
             f"GET /users/<user-id>/earnings?since={enc(since)}&until={enc(until)}",
             "GET /users/<user-id>/statement (paid-now, pending, owed: its totals)"]
    return view_page("Users", calls, body, "/view/users")


@view_endpoint
def handle_view_user(user_id):
    params = query()
    app, config = request.app, request.app.config
    offset = config["spp.report_utc_offset"]
    month, first, following, window, since, until = month_of_request(params)
    before = decode_cursor(params["before"]) if params.get("before") else None
    share = config["spp.reward_share"]
    earned = user_earnings(app.store, user_id, window, None, share)
    days = [report_day_text(d) for d in range(first, following)]
    offset_text = utc_offset_text(offset)
    per_day = [user_earnings(app.store, user_id, Window(
        parse_instant(f"{day}T00:00:00{offset_text}"),
        parse_instant(f"{report_day_text(first + i + 1)}T00:00:00{offset_text}")))
        for i, day in enumerate(days)]
    chart = svg_chart(f"Sessions per report day, {month}", "sessions", "report day", days,
                      [("sessions", [(r["sessions"], f"{r['sessions']:,}") if r["sessions"] else None
                                     for r in per_day])])
    sessions, cursor = user_sessions(app.store, user_id, 20, before)
    account = statement(app.store, user_id)
    me = "/view/users/" + path_part(user_id)
    more = (f'<p class="steps"><a href="{view_link(me, {"month": month, "before": cursor})}">'
            "older sessions →</a></p>" if cursor else "")
    body = (
        f'<p class="who">User id: <bdi class="id">{esc(user_id) if user_id else "(no sub: empty user id)"}</bdi></p>'
        + month_form(me, month)
        + f"<section><h2>{esc(month)}</h2>{fields_list(earned)}{chart}"
        f'<details><summary>The days as a table</summary>'
        f'{records_table([r for r in per_day if r["sessions"]], "Days of this user", "since")}'
        "</details></section>"
        + f'<section><h2>Statement: where the reward is</h2>{fields_list(account["totals"])}'
        f'{records_table(account["runs"], "Runs that paid this user", "run-id")}'
        f'{records_table(account["settlements"], "Settlement lines of this user", "settlement-id")}</section>'
        + f"<section><h2>Latest sessions</h2>{records_table(sessions, 'Sessions, newest first', 'session-id')}{more}</section>"
    )
    enc, who = urllib.parse.quote, path_part(user_id)
    calls = [f"GET /users/{who}/earnings?since={enc(since)}&until={enc(until)} (and per day)",
             f"GET /users/{who}/statement", f"GET /users/{who}/sessions?limit=20"]
    return view_page("A user", calls, body, "/view/users")


POSTBACK_OUTCOMES = ("recorded", "duplicate", "rejected", "conflict")


def recent_postbacks(app, outcome, limit, before=2**63 - 1):
    """The newest postbacks of each outcome, merged newest first: recorded
    from the sessions table, rejected and conflicting from theirs, exact
    duplicates from memory (they change nothing, so they are not written)."""
    items = []
    if outcome in (None, "recorded"):
        items += [(received, "recorded", session_id, user_id, None, body)
                  for received, session_id, user_id, body
                  in app.store.read(VIEW_SQL["newest_sessions"], {"limit": limit, "before": before})]
    if outcome in (None, "duplicate"):
        items += [(received, "duplicate", session_id, user_id, None, body)
                  for received, session_id, user_id, body in list(app.recent_duplicates)
                  if received < before][-limit:]
    if outcome in (None, "rejected"):
        items += [(parse_instant(r["received-at"]), "rejected", None, None,
                   f"{r['field']}: {r['reason']}" if r["field"] else r["reason"], r["raw-body"])
                  for r in newest_rejected(app.store, limit, before)]
    if outcome in (None, "conflict"):
        items += [(parse_instant(c["received-at"]), "conflict", c["session-id"],
                   body_user_id(c["new-body"]), f"stored first: {c['stored-body']}", c["new-body"])
                  for c in newest_conflicts(app.store, limit, before)]
    items.sort(key=lambda item: item[0], reverse=True)
    return items[:limit]


def body_user_id(body):
    """The user-id of a body that passed validation (a conflict's)."""
    try:
        user_id = json.loads(body).get("user-id")
    except (ValueError, AttributeError):
        return None
    return user_id if isinstance(user_id, str) else None


@view_endpoint
def handle_view_postbacks():
    params = query()
    outcome = params.get("outcome") or None
    if outcome is not None and outcome not in POSTBACK_OUTCOMES:
        raise Invalid("outcome", f"must be one of {', '.join(POSTBACK_OUTCOMES)}")
    limit = parse_limit(params, VIEW_PAGE_SIZE, 200)
    try:
        before = parse_instant(params["before"]) if params.get("before") else 2**63 - 1
    except ValueError:
        raise Invalid("before", "must be a time as the page's own link gives it, "
                      "such as 2026-11-23T10:00:00.250000Z") from None
    items = recent_postbacks(request.app, outcome, limit, before)
    current = ' aria-current="true"'
    filters = " ".join(
        f'<a href="{view_link("/view/postbacks", {"outcome": o} if o else None)}"'
        f'{current if o == outcome else ""}>{o or "all"}</a>'
        for o in (None, *POSTBACK_OUTCOMES))
    rows = [[f'<time class="live">{esc(iso_utc(received))}</time>',
             f'<span class="outcome-{kind}">{kind}</span>',
             esc(session_id), user_cell(user_id) if user_id is not None else esc(None),
             esc(reason), f"<pre>{esc_block(body) if body else '(cleared by prune)'}</pre>"]
            for received, kind, session_id, user_id, reason, body in items]
    older = ""
    if len(items) == limit:  # the times are to the microsecond: a cursor
        more = {**({"outcome": outcome} if outcome else {}), "before": iso_utc(items[-1][0])}
        older = f'<p class="steps"><a href="{view_link("/view/postbacks", more)}">older →</a></p>'
    body = (f'<p class="steps">Outcome: {filters}</p>'
            "<p>Recorded sessions, rejected postbacks and conflicting duplicates come from the "
            "database; exact duplicates (they change nothing, so nothing is written for them) "
            f"are the last {RECENT_DUPLICATES} this server process answered.</p>"
            + html_table(["received-at", "outcome", "session-id", "user-id", "reason", "raw body"],
                         rows, "Latest postbacks, newest first",
                         raw_columns=("received-at", "outcome", "session-id", "user-id", "reason",
                                      "raw body"))
            + older)
    calls = ["GET /rejected", "GET /conflicts", "GET /sessions (the change feed)",
             "GET /stats (duplicates since the start)"]
    return view_page("Recent postbacks", calls, body, "/view/postbacks")


VIEW_ROUTES = [
    ("/view", "GET", handle_view_month, ("month",)),
    ("/view/", "GET", handle_view_month, ("month",)),
    ("/view/view.css", "GET", handle_view_css, None),
    ("/view/icon.svg", "GET", handle_view_icon, None),
    ("/view/ledger", "GET", handle_view_ledger, ()),
    ("/view/users", "GET", handle_view_users, ("month", "page", "search")),
    (r"/view/users/<user_id:re:[\s\S]*>", "GET", handle_view_user, ("month", "before")),
    ("/view/postbacks", "GET", handle_view_postbacks, ("outcome", "limit", "before")),
]


# ---------------------------------------------------------------------------
# Waitress's internals: the only code that touches them
# ---------------------------------------------------------------------------

# waitress has no graceful stop: its serve() runs until the process ends, and
# closing the server drops every connection, answers unsent.  So serve() below
# runs waitress's loop itself and, on SIGTERM, drains: that takes the server's socket map, the
# wasyncore loop, HTTPChannel's fields and the task dispatcher's shutdown,
# none of them waitress's public API.  Written and tested against the waitress
# that requirements.txt pins (a test checks that the two agree): upgrading
# waitress means reading this section against its source first.
WAITRESS_PINNED = "3.0.2"

from waitress import wasyncore  # noqa: E402  (imported here: see above)
from waitress.channel import HTTPChannel  # noqa: E402
from waitress.server import BaseWSGIServer, MultiSocketServer  # noqa: E402

DRAIN_TIMEOUT_S = 20  # in-flight requests get this long after SIGTERM
THREADS_STOP_S = 5  # then the request threads get this long to end
LOOP_TIMEOUT_S = 0.5  # how often the main loop looks for a stop request
FRESH_CONNECTION_GRACE_S = 2


def socket_map_of(server):
    """The dispatchers (listeners, connections) that create_server's `server` polls."""
    return server.map if isinstance(server, MultiSocketServer) else server._map


def run_until(socket_map, stopping, writer):
    while not stopping.is_set():
        wasyncore.loop(timeout=LOOP_TIMEOUT_S, map=socket_map, use_poll=True, count=1)
        if not writer.alive():
            return False
    return True


def is_idle(channel, now):
    """A connection that may be closed at shutdown: nothing being received,
    served or sent.  One accepted just before the stop that has not sent its
    request yet gets a moment to do so; closing it would fail a postback that
    was on its way."""
    if channel.requests or channel.total_outbufs_len or channel.request is not None:
        return False
    never_spoke = channel.last_activity == channel.creation_time
    return not never_spoke or now - channel.creation_time > FRESH_CONNECTION_GRACE_S


def drain(server):
    """Stop accepting, let requests in flight finish and their answers go
    out, then stop the worker threads."""
    socket_map = socket_map_of(server)
    for listener in [d for d in socket_map.values() if isinstance(d, BaseWSGIServer)]:
        # Only the listening socket: its trigger still wakes the loop for answers.
        wasyncore.dispatcher.close(listener)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        channels = [d for d in socket_map.values() if isinstance(d, HTTPChannel)]
        for channel in channels:
            if is_idle(channel, time.time()):
                channel.handle_close()
        if not any(isinstance(d, HTTPChannel) for d in socket_map.values()):
            break
        wasyncore.loop(timeout=0.05, map=socket_map, use_poll=True, count=1)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=THREADS_STOP_S)


# ---------------------------------------------------------------------------
# Server and command line: serving, and what every command shares
# ---------------------------------------------------------------------------

def waitress_settings(config, sockets):
    """Every waitress limit set on purpose (see docs/api.md, "Limits")."""
    where = {"sockets": sockets} if sockets else {"host": config["host"], "port": config["port"]}
    return {
        **where,
        "threads": config["threads"],
        "connection_limit": 100,
        # An idle or stalled connection is closed after this long; it holds no
        # worker thread meanwhile (waitress hands only complete requests to threads).
        "channel_timeout": 30,
        "cleanup_interval": 5,
        "max_request_header_size": 16 * 1024,
        # Backstop only: the app answers 413 JSON itself above MAX_BODY_BYTES.
        "max_request_body_size": 2 * MAX_BODY_BYTES,
        "asyncore_use_poll": True,  # no FD_SETSIZE limit
        "expose_tracebacks": False,
        "ident": "spp-receiver",
    }


def inherited_sockets(environ):
    """Listening sockets passed by systemd socket activation (sd_listen_fds(3))."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    text = environ.get("LISTEN_FDS", "0")
    if not re.fullmatch(r"[0-9]{1,4}", text):
        raise ConfigError(f"LISTEN_FDS={shown(text)} is not a number of passed sockets")
    sockets = []
    for fd in range(3, 3 + int(text)):
        try:
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            raise ConfigError(f"LISTEN_FDS={text}: descriptor {fd} is not an open socket "
                              f"({exc.strerror})") from None
    return sockets


def listening_host(sock):
    if sock.family == socket.AF_UNIX:
        return "localhost"  # reachable only through the file system
    return sock.getsockname()[0]


def sd_notify(message, environ=os.environ):
    """Tell systemd about our state (sd_notify(3)); a no-op outside systemd."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("could not notify systemd (%s): %s", message, exc)


def start_watchdog(store, environ, stopping):
    """With WatchdogSec= set, ping systemd every WatchdogSec/2 while the
    database takes writes (Store.health_problem: a probe commit when no
    postback came in the last second), so a wedged process is restarted but a
    quiet one never is, and one that recovers from a fault pings again
    without waiting for a postback."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec or environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    interval = int(usec) / 1_000_000 / 2

    def ping():
        while not stopping.wait(interval):
            problem = store.health_problem()
            if problem is None:
                sd_notify("WATCHDOG=1", environ)
            else:
                log.warning("watchdog: not pinging systemd: %s", problem)

    thread = threading.Thread(target=ping, name="spp-watchdog", daemon=True)
    thread.start()
    return thread


def release_freed_memory():
    """Give the C heap's free pages back to the system before the writer
    process forks.  Where no bytecode cache can be read or written (spp.service
    sets PYTHONDONTWRITEBYTECODE, /opt/spp is read-only), starting compiles
    this module, and glibc keeps the ~10 MB the compiler freed, in this process
    and again in the forked writer: 70 MB summed under the benchmark's load
    against 52 MB (docs/performance.md).  One call to glibc's malloc_trim;
    ctypes calls it with no writable+executable memory (spp.service's
    MemoryDenyWriteExecute=).  Elsewhere (another libc) nothing is done."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, ImportError):
        pass


class WriterLost(Exception):
    """The writer process exited while the server ran."""


def keep_to_cpus(writer):
    """With two CPUs or more: this process (its threads: call before starting
    any) on the first, the writer process on the others.  The request threads
    hand the GIL to one another many times per request, which costs several
    times more between cores than on one; the writer needs no GIL of ours.
    Measured: about 1.5x the postbacks/s of leaving both to the scheduler
    (docs/performance.md)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not isinstance(writer, WriterProcess):
        return
    try:
        os.sched_setaffinity(writer.pid, cpus[1:])
        os.sched_setaffinity(0, cpus[:1])
    except OSError as exc:  # a system call filter, or a cpuset that forbids it
        log.info("not keeping the web process to one CPU: %s", exc)
        return
    log.info("web process on CPU %d, writer process on CPU %s", cpus[0],
             ",".join(map(str, cpus[1:])))


def worst_case_stop_s(busy_timeout_ms=DEFAULTS["busy_timeout_ms"]):
    """The longest the server takes from SIGTERM to exit (TimeoutStopSec in
    spp.service must be longer): noticing the signal, the drain, the request
    threads' end, then WriterProcess.close (the writes in progress, the
    writer's own exit, each up to the write wait), and a second for SIGKILL."""
    return (LOOP_TIMEOUT_S + DRAIN_TIMEOUT_S + THREADS_STOP_S
            + 2 * write_wait_s(busy_timeout_ms) + 1)


def serve(app, config, sockets=()):
    """Serve `app` until SIGTERM or SIGINT, then shut down gracefully."""

    keep_to_cpus(app.store.writer)
    try:
        server = create_server(app, **waitress_settings(config, sockets))
    except ValueError as exc:  # "Invalid host/port specified.": a name that does not resolve
        raise OSError(f"{exc} ({config['host']!r} does not resolve to an address here)") from None
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.print_listen("listening on http://{}:{}")
    start_watchdog(app.store, os.environ, stopping)
    catching_up = start_rollup_refresh(app, stopping)
    try:
        sd_notify("READY=1")
        writer_alive = run_until(socket_map_of(server), stopping, app.store.writer)
        sd_notify("STOPPING=1")
        log.info("stopping: finishing requests in flight")
        drain(server)
    finally:
        stopping.set()  # when the writer process died, too
        catching_up.join()
    if not writer_alive:
        raise WriterLost(app.store.writer.loss())


def whole_number(text, low, high, words):
    """A whole number in [low, high], or ArgumentTypeError saying `words`
    (argparse would otherwise name this module's function: 'invalid port_number value')."""
    if not re.fullmatch(r"[0-9]{1,9}", text.strip()) or not low <= int(text) <= high:
        raise argparse.ArgumentTypeError(f"must be {words}, not {shown(text)}")
    return int(text)


def positive_int(text):
    return whole_number(text, 1, 10**9 - 1, "a whole number of at least 1")


def port_number(text):
    return whole_number(text, 0, 65535, "a whole number from 0 to 65535")


def reward_share(text):
    try:
        return parse_reward_share(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def database_path(text):
    """A database file's path: an empty one (SPP_DB= left blank) names no file."""
    if not text:
        raise argparse.ArgumentTypeError("must be the path of the database file, not empty")
    return text


# Labels of letters, digits and inner hyphens; the last not all digits.
HOST_NAME = re.compile(r"(?=.{1,253}\.?$)(?:(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)*"
                       r"(?!-)(?=[A-Za-z0-9-]*[A-Za-z-])[A-Za-z0-9-]{1,63}(?<!-)\.?")


def listen_host(text):
    """An IP address or a host name (its last label not all digits, as in
    999.1.1.1), checked before anything opens: waitress would refuse it only
    when serving starts.  Whether a name resolves is seen there (serve)."""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        if not HOST_NAME.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"must be an IP address or a host name, not {shown(text)}") from None
    return text


def log_level(text):
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


DB_HELP_SERVER = "SQLite database file, created on first start"
DB_HELP_REPORT = "SQLite database file to read; opened read-only, never created or changed"
TIME_FORMS_HELP = ("2026-11-23T10:00:00Z, 2026-11-23T15:30:00+05:30, a date 2026-11-23 "
                   "(midnight UTC) or unix seconds")


REWARD_SHARE_ADDS = "adds rewardable-revenue (rounded down to the nano-USD) to earnings"


class HelpfulParser(argparse.ArgumentParser):
    """argparse's parser, but a --help that cannot be written (a full disk, a
    closed pipe) is said so, and not 0: argparse ignores the failed write."""

    def print_help(self, file=None):
        out = file or sys.stdout
        if out is None:  # started with stdout closed (>&-)
            self.exit(stdout_closed(self.prog, "nowhere to write the help"))
        try:
            out = CompleteOutput(out)
            out.write(self.format_help())
            out.flush()
        except OSError as exc:
            self.exit(output_failed(self.prog, out, exc))


class BadVariable:
    """The default of an option taken from an SPP_* variable that does not
    hold a valid value: an error naming the variable, but only if the option
    is not given on the command line (a flag wins over the environment)."""

    def __init__(self, variable, text, reason):
        self.variable, self.text, self.reason = variable, text, reason

    def __str__(self):  # as %(default)s in --help
        return self.text


def env_default(environ, variable, convert, fallback):
    """An option's default: `variable` read with `convert` (the option's type), else `fallback`.
    Converted here, not by argparse, whose error would name the flag the user never gave."""
    text = environ.get(variable)
    if text is None:
        return fallback
    try:
        return convert(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        return BadVariable(variable, text, str(exc))


# Options whose value may start with '-', which argparse takes for an option
# unless written with '=': --report-utc-offset=-03:00.
NEGATIVE_VALUE_OPTIONS = ("--report-utc-offset",)


def parse_arguments(parser, argv):
    """parser.parse_args(argv), with an error naming the SPP_* variable when
    an option's default came from one that is not valid, and a hint at the
    '=' form for a negative value that argparse would read as an option."""
    for flag, value in zip(argv, argv[1:]):
        if flag in NEGATIVE_VALUE_OPTIONS and re.match(r"-[0-9]", value):
            parser.error(f"{flag}: write a value that starts with '-' with '=', as "
                         f"{flag}={value} (alone, {value} reads as an option)")
    args = parser.parse_args(argv)
    for value in vars(args).values():
        if isinstance(value, BadVariable):
            parser.error(f"the environment variable {value.variable}={shown(value.text)}: "
                         f"{value.reason}")
    return args


def add_db_option(parser, environ, db_help):
    """--db, which every command and the server take."""
    parser.add_argument(
        "--db", type=database_path,
        default=env_default(environ, "SPP_DB", database_path, DEFAULTS["db"]),
        help=f"{db_help} [SPP_DB, default %(default)s]",
    )


def add_shared_options(parser, environ, db_help, share_adds=REWARD_SHARE_ADDS):
    """Options both the server and the report commands take."""
    add_db_option(parser, environ, db_help)
    parser.add_argument(
        "--reward-share", type=reward_share,
        default=env_default(environ, "SPP_REWARD_SHARE", reward_share, None),
        help="share of the estimated revenue you pay out as rewards: a decimal above 0 and "
        f"at most 1, with at most 6 places, e.g. 0.7; {share_adds} "
        "[SPP_REWARD_SHARE, default: not shown]",
    )


def build_parser(environ):
    paragraphs = [
        "Receive Gamezop Session Performance Postbacks into SQLite and report what each "
        "user earned: with options only, run the server.",
    ]
    notes = [
        "Secrets are never options (the command line shows in ps): the postback "
        "token comes from SPP_POSTBACK_TOKEN or $CREDENTIALS_DIRECTORY/postback-token, "
        "the read token from SPP_READ_TOKEN or $CREDENTIALS_DIRECTORY/read-token; "
        "several tokens (comma-separated, or one per line in the file) are all accepted, "
        "for rotation. Without a postback token, postbacks need no auth. "
        "Under systemd, a socket passed with LISTEN_FDS is used instead of --host/--port.",
        "A value that starts with '-' is written with '=': --report-utc-offset=-03:00.",
    ]
    parser = HelpfulParser(
        prog="spp_server.py",
        usage="%(prog)s [COMMAND] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the list of commands
        description="\n\n".join([*map(textwrap.fill, paragraphs), commands_help()]),
        epilog="\n\n".join(map(textwrap.fill, notes)),
    )
    add_shared_options(parser, environ, DB_HELP_SERVER)
    parser.add_argument(
        "--host", type=listen_host,
        default=env_default(environ, "SPP_HOST", listen_host, DEFAULTS["host"]),
        help="address to listen on; other than loopback needs a read token "
        "[SPP_HOST, default %(default)s]",
    )
    parser.add_argument(
        "--port", type=port_number,
        default=env_default(environ, "SPP_PORT", port_number, DEFAULTS["port"]),
        help="TCP port [SPP_PORT, default %(default)s]",
    )
    parser.add_argument(
        "--threads", type=positive_int,
        default=env_default(environ, "SPP_THREADS", positive_int, DEFAULTS["threads"]),
        help="worker threads [SPP_THREADS, default %(default)s]",
    )
    parser.add_argument(
        "--log-level", type=log_level,
        default=env_default(environ, "SPP_LOG_LEVEL", log_level, DEFAULTS["log_level"]),
        help=f"one of {', '.join(LOG_LEVELS)}; debug adds a line per accepted postback "
        "[SPP_LOG_LEVEL, default %(default)s]",
    )
    add_report_offset_option(parser, environ, "server")
    return parser


def build_config(args, environ):
    return {
        "db": args.db,
        "host": args.host,
        "port": args.port,
        "threads": args.threads,
        "reward_share": args.reward_share,
        "report_utc_offset": args.report_utc_offset,
        "postback_tokens": load_tokens("SPP_POSTBACK_TOKEN", "postback-token", environ),
        "read_tokens": load_tokens("SPP_READ_TOKEN", "read-token", environ),
    }


# Exit statuses of the commands (README, "Commands"): 0 done; 1 failed (for
# a report: the output is incomplete); 2 a usage error; and these two.
EXIT_OUTPUT_CLOSED = 141  # the reader closed the pipe before the end: 128 + SIGPIPE, as cat gives
EXIT_COMMITTED_OUTPUT_LOST = 3  # the change is committed, but what says so was not written
EXIT_PARTLY_SETTLED = 4  # settle settled what it could; a line names each pool it could not


def discard_output(out):
    """Point `out`'s descriptor at /dev/null after a failed write: what is
    still buffered then goes nowhere when the interpreter flushes it at exit,
    instead of failing again with a traceback and status 120."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: nothing flushes it at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def say(line):
    """One line on stderr for the person running a command.  A stderr that
    cannot take it (a full disk, closed) is let be: the exit status still
    says what happened, and print(file=None) would write to stdout."""
    if sys.stderr is None:  # started with 2>&-
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        discard_output(sys.stderr)  # or the flush at exit fails again, with status 120


def output_failed(prog, out, exc, committed=None):
    """A write to the command's output failed (a full disk, a closed pipe):
    one line on stderr (none for a reader that quit, unless a change was
    committed) -> the exit status.  `committed` says what was committed."""
    discard_output(out)
    reason = exc.strerror or str(exc) or type(exc).__name__
    if committed:
        say(f"{prog}: {committed}, but writing its output failed: {reason}")
        return EXIT_COMMITTED_OUTPUT_LOST
    if isinstance(exc, BrokenPipeError):  # `... | head`: the reader has all it wanted
        return EXIT_OUTPUT_CLOSED
    say(f"{prog}: writing the output failed, it is incomplete: {reason}")
    return 1


def stdout_closed(prog, what):
    return failed(prog, f"stdout is closed: {what}")


class CompleteOutput:
    """A command's stdout, every write complete or an OSError.  CPython's
    buffered stdout answers a write that the disk took only part of (a nearly
    full file system: write(2) returns a short count) with that count, and
    nothing raises: the output would end early with exit status 0."""

    def __init__(self, stream):
        self.stream = stream
        self.binary = getattr(stream, "buffer", stream)
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.flush()  # what the text layer holds goes first

    def write(self, data):
        if isinstance(data, str):
            data = data.encode(self.encoding)
        view = memoryview(data)
        while view:
            written = self.binary.write(view)
            if not written:  # nothing taken and nothing raised: never loop on it
                raise OSError(errno.EIO, "the output took no more bytes")
            view = view[written:]  # the next write raises why the rest was refused

    def flush(self):
        self.binary.flush()

    def fileno(self):
        return self.stream.fileno()


class CommandFailed(Exception):
    """What a command's step says when it could not be done and changed
    nothing (a refused report file, say): one line, exit status 1."""


def run_on_database(prog, db, out, step, read_only=False, look=None):
    """The driver of every command that opens the database: opens `db`
    (read-only, or for writing: never created), runs step(store) -> (what it
    committed or None, the output's chunks), writes the chunks to `out`, and
    turns every failure into one line on stderr and the exit status of README
    "Commands" (LEDGER_EXIT_HELP): 1 nothing done, or an output incomplete; 2
    an option refused (Invalid: nothing changed); 3 committed but its output
    lost; 141 a reader that closed the pipe, when nothing was committed.
    look: see look_before_writing."""
    if look is not None and (status := look_before_writing(prog, db, out, look)) is not None:
        return status
    try:
        store = (ReadOnlyStore(db) if read_only
                 else Store(db, DEFAULTS["busy_timeout_ms"], writer="command"))
    except StoreUnavailable as exc:  # its reason names the file
        return failed(prog, exc)
    except (OSError, sqlite3.Error) as exc:
        return failed(prog, f"cannot open the database {db}: {exc}")
    try:
        committed, chunks = step(store)
        return write_output(prog, db, out, store, committed, chunks)
    except Invalid as invalid:
        return ledger_refusal(prog, invalid)
    except OverflowError:  # a sum past 64 bits that the bounds did not foresee
        return failed(prog, "a sum is beyond what SQLite's 64-bit integers hold; nothing is "
                      "recorded: please report it (docs/ledger.md, \"Limits\")")
    except (CommandFailed, StoreUnavailable, sqlite3.Error) as exc:
        return failed(prog, exc)
    finally:
        store.close()


def failed(prog, reason):
    """A command that did nothing, or whose output is incomplete: its one
    line on stderr -> exit status 1."""
    say(f"{prog}: {reason}")
    return 1


def write_output(prog, db, out, store, committed, chunks):
    """Write a step's chunks (made as they are written: a failed read cuts
    the output short) -> the exit status; `committed`: see run_on_database."""
    try:
        for chunk in chunks:
            out.write(chunk)
        store.check_unchanged()
        out.flush()
    except (StoreUnavailable, sqlite3.Error) as exc:
        if committed:  # reading it back failed: the output is cut short, the step is not
            say(f"{prog}: {committed}, but reading it back failed: {exc}")
            return EXIT_COMMITTED_OUTPUT_LOST
        return failed(prog, f"reading {db} failed, the output is incomplete: {exc}")
    except OSError as exc:
        return output_failed(prog, out, exc, committed)
    return 0


def made_while_written(chunks_of, store):
    """chunks_of(store), made only once the output is written: what fails
    to be read then cuts the output short (write_output), whenever it fails."""
    yield from chunks_of(store)


def print_report(prog, db, out, chunks_of, check=None):
    """A command that only reads: chunks_of(store) written from `db` opened
    read-only, after check(store) if given (it refuses before any output)."""
    def step(store):
        if check is not None:
            check(store)
        return None, made_while_written(chunks_of, store)
    return run_on_database(prog, db, out, step, read_only=True)


def utc_offset_option(text):
    try:
        return parse_utc_offset(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be +HH:MM or -HH:MM within ±14:00, such as +05:30, not {shown(text)}") from None


REPORT_OFFSET_HELP = {
    "server": "UTC offset of the days of Gamezop's revenue reports, e.g. +05:30, until a payout "
              "run records one: /reconciliation then cuts the days as the ledger does "
              "[SPP_REPORT_UTC_OFFSET, default +00:00]",
    "reconcile": "try this UTC offset for the report days, e.g. +05:30, instead of those the "
                 "payout runs recorded (or SPP_REPORT_UTC_OFFSET before the first run)",
    "pay": "UTC offset of the report days, e.g. +05:30: the first run records it; another "
           "value changes it from the first report day after the last run's until, recorded "
           "with this run [SPP_REPORT_UTC_OFFSET, default: the recorded one, or +00:00]",
}


def add_report_offset_option(parser, environ, role):
    """--report-utc-offset: the server's setting, reconcile's offset to try,
    pay's offset to record (see REPORT_OFFSET_HELP)."""
    from_environment = env_default(environ, "SPP_REPORT_UTC_OFFSET", utc_offset_option,
                                   0 if role != "pay" else None)
    parser.add_argument("--report-utc-offset", type=utc_offset_option,
                        default=None if role == "reconcile" else from_environment,
                        help=REPORT_OFFSET_HELP[role])
    if role == "reconcile":
        parser.set_defaults(configured_offset=from_environment)


def setup_logging(level="info"):
    # No timestamps: journald adds its own.
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # Under a burst every queued request would log a line of its own.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


# The commands: name -> (run(argv, environ, out), one line for --help); out is
# stdout, every write of it complete or an error (CompleteOutput).
COMMANDS = {
    "export": (run_export, "the payout export (what GET /earnings answers), to stdout"),
    "import-booked": (run_import_booked, "store a Gamezop revenue report as booked revenue"),
    "reconcile": (run_reconcile, "the estimates against the booked revenue per report day, to stdout"),
    "prune": (run_prune, "clear old raw bodies, delete old refusals: keep the database bounded"),
    "pay": (run_pay, "pay a run: every session since the last run, each paid exactly once"),
    "settle": (run_settle, "settle paid days against booked revenue: top-ups and carried balances"),
    "statement": (run_statement, "one user's ledger statement (GET /users/<id>/statement), to stdout"),
    "ledger": (run_ledger, "the ledger summary (GET /ledger), to stdout"),
    "ledger-replay": (run_ledger_replay,
                      "after a restore: put back the ledger steps the backup lacks"),
    "write-off-balances": (run_write_off_balances,
                           "write off carried balances older than a chosen age"),
    "suspects": (run_suspects, "users worth a look: figures far outside the others', to stdout"),
    "hold": (run_hold, "hold a suspect user: their pay-now withheld, their estimates share nothing"),
    "release": (functools.partial(run_hold, action="release"),
                "release a held user: what was withheld credited (or --write-off)"),
    "erase": (run_erase, "erase a user on request: no trace of their id left in the database file"),
    "void-oversized": (run_void_oversized,
                       f"set aside unpaid estimates above {MAX_ESTIMATE} USD, stored before they were refused"),
}


def commands_help():
    width = max(map(len, COMMANDS)) + 2
    return "\n".join(["commands (`spp_server.py COMMAND --help` for each one's options):",
                      *(f"  {name:<{width}}{text}" for name, (_, text) in COMMANDS.items())])


def main(argv=None, environ=None):
    """The command line -> exit status.  Whatever is still buffered for
    stdout (argparse's --help, the server's first line) is flushed here, where
    a failure is one line and a status, not a traceback at exit."""
    try:
        status = run_command_line(
            sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ)
    except SystemExit as exited:  # argparse: --help, or a usage error
        status = exited
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError as exc:
            status = output_failed("spp_server.py", sys.stdout, exc)
    if isinstance(status, SystemExit):
        raise status
    return status


def run_command_line(argv, environ):
    if argv[:1] and argv[0] in COMMANDS:
        if sys.stdout is None:  # started with stdout closed (>&-): Python leaves it None
            return stdout_closed(f"spp_server.py {argv[0]}",
                                 "nowhere to write the output; nothing done")
        return COMMANDS[argv[0]][0](argv[1:], environ, CompleteOutput(sys.stdout))
    parser = build_parser(environ)
    if argv[:1] and not argv[0].startswith("-"):  # the server takes no argument
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        parser.error(f"{shown(argv[0])} is not a command"
                     + (f": did you mean {close[0]!r}?" if close else "")
                     + f" (the commands are {', '.join(COMMANDS)})")
    args = parse_arguments(parser, argv)
    setup_logging(args.log_level)
    try:
        config = build_config(args, environ)
        sockets = inherited_sockets(environ)
        check_exposure(config, [listening_host(s) for s in sockets] or [config["host"]])
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    if not config["postback_tokens"]:
        log.warning(
            "no postback token configured: anyone who can reach /postback can record sessions"
        )
    release_freed_memory()
    try:
        app = create_app(config)
    except StoreUnavailable as exc:  # not our database, or a newer schema
        log.error("cannot start: %s", exc)
        return 1
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot open the database %s: %s", config["db"], exc)
        return 1
    try:
        # Ready means a write commits: the writer process is up and the disk takes it.
        problem = app.store.health_problem()
        if problem:
            log.error("cannot write to the database %s: %s", config["db"], problem)
            return 1
        serve(app, config, sockets)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config["host"], config["port"], exc)
        return 1
    except WriterLost as exc:
        log.error("%s; stopping so that systemd restarts the service", exc)
        return 1
    finally:
        app.store.close()
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
