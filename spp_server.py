#!/usr/bin/env python3
"""spp-receiver: records Gamezop Session Performance Postbacks (SPP) in SQLite.

Gamezop POSTs one JSON postback per user session to /postback; this module
stores it once per session-id (durably, before answering 200) and tells the
publisher what each user earned.  One Bottle app served by waitress; storage
is one SQLite file in WAL mode.  See README.md.

Sections: configuration, money and time, storage, validation, HTTP, server/CLI.
"""

import argparse
import concurrent.futures
import decimal
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bottle import Bottle, HTTPError, HTTPResponse, request, response

log = logging.getLogger("spp")

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

DEFAULTS = {
    "db": "spp.db",
    "host": "127.0.0.1",
    "port": 8080,
    "threads": 4,
    "busy_timeout_ms": 5000,
    "postback_tokens": (),  # bytes; empty = postbacks need no auth
    "read_tokens": (),  # bytes; empty = reads need no auth (loopback only)
}

MAX_BODY_BYTES = 64 * 1024
SCHEMA_PATH = Path(__file__).with_name("schema.sql")


class ConfigError(Exception):
    """A setting that makes it unsafe or impossible to start."""


def load_tokens(env_var, credential_name, environ):
    """Tokens from `env_var` (comma-separated) or the systemd credential file
    (one per line).  Several tokens let a token be rotated without downtime."""
    value = environ.get(env_var)
    if value is not None:
        source, tokens = env_var, value.split(",")
    else:
        cred_dir = environ.get("CREDENTIALS_DIRECTORY")
        path = Path(cred_dir, credential_name) if cred_dir else None
        if path is None or not path.exists():
            return ()
        source, tokens = str(path), path.read_text(encoding="utf-8").splitlines()
    tokens = tuple(t.strip().encode("utf-8") for t in tokens if t.strip())
    if not tokens:
        # An empty token must not silently turn auth off.
        raise ConfigError(f"{source} is set but holds no token")
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
MAX_REVENUE = decimal.Decimal(1_000_000)
# Wide enough that no valid revenue below MAX_REVENUE loses a digit.
MONEY_CONTEXT = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)


def usd_to_nanos(amount):
    """Exact Decimal USD -> int nano-USD, rounding half-even to 9 places."""
    return int(amount.quantize(NANO, context=MONEY_CONTEXT).scaleb(9, context=MONEY_CONTEXT))


def nanos_to_usd(nanos):
    """int nano-USD -> exact decimal string, no exponent: 36000 -> '0.000036'."""
    whole, frac = divmod(nanos, NANOS_PER_USD)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def now_us():
    return time.time_ns() // 1000


def iso_utc(us):
    """Microseconds since the epoch -> ISO 8601 UTC with Z (None stays None)."""
    if us is None:
        return None
    secs, micros = divmod(us, 1_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{stamp}.{micros:06d}Z" if micros else f"{stamp}Z"


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------

SQL = {
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
    # Revenue is summed as whole USD and nano remainder so that SUM cannot
    # overflow 64 bits however many sessions a user has; Python joins them.
    "user_earnings": """
        SELECT count(*), coalesce(sum(ads_viewed), 0), coalesce(sum(duration_s), 0),
               coalesce(sum(revenue_nano / 1000000000), 0),
               coalesce(sum(revenue_nano % 1000000000), 0)
        FROM sessions WHERE user_id = ?""",
    "health": "PRAGMA user_version",
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


def migrate(conn, schema_text, target=None):
    """Bring the database to `target` (default: the newest version), in one
    transaction that re-reads user_version after taking the write lock, so two
    processes starting together cannot both apply a section."""
    conn.execute("PRAGMA journal_mode = WAL")  # persistent; not allowed inside a transaction
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
        conn.execute("ROLLBACK")
        raise


class StoreUnavailable(Exception):
    """The database cannot take or give data right now; the client should retry."""


class Writer:
    """The one thread that writes.  Requests hand it work and wait; it runs
    everything waiting in one transaction with one fsync (group commit), so
    there is no lock contention between writers and every caller learns its
    result only after COMMIT returned."""

    MAX_BATCH = 256
    _STOP = object()

    def __init__(self, conn, wait_timeout_s):
        self._conn = conn
        self._wait_timeout_s = wait_timeout_s
        self._queue = queue.SimpleQueue()
        self._closed = False
        self.last_error = None  # str while the last transaction failed
        self._thread = threading.Thread(target=self._run, name="spp-writer", daemon=True)
        self._thread.start()

    def run(self, op):
        """Run op(conn, received_at_us) in a write transaction; return its result
        once committed.  Raises StoreUnavailable if it could not be committed."""
        if self._closed:
            raise StoreUnavailable("the server is shutting down")
        future = concurrent.futures.Future()
        self._queue.put((op, future))
        try:
            return future.result(timeout=self._wait_timeout_s)
        except concurrent.futures.TimeoutError:
            raise StoreUnavailable("the database did not answer in time") from None
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the database refused the write: {exc}") from exc

    def close(self):
        """Commit what is queued, then close the connection."""
        if not self._closed:
            self._closed = True
            self._queue.put(self._STOP)
            self._thread.join()

    def _run(self):
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is self._STOP for item in batch)
            work = [item for item in batch if item is not self._STOP]
            if work:
                self._commit(work)
        self._conn.close()

    def _commit(self, work):
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            # One receive time per transaction, taken once the write lock is
            # held, so receive times never go backwards in commit order.
            received_at_us = now_us()
            results = [op(conn, received_at_us) for op, _ in work]
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self.last_error = str(exc)
            for _, future in work:
                future.set_exception(exc)
            return
        self.last_error = None
        for (_, future), result in zip(work, results):
            future.set_result(result)


class Store:
    """The database: one writer thread, one read connection per thread."""

    def __init__(self, path, busy_timeout_ms=DEFAULTS["busy_timeout_ms"]):
        self.path = str(path)
        self._busy_timeout_ms = busy_timeout_ms
        ensure_private_file(self.path)
        conn = connect(self.path, busy_timeout_ms)
        try:
            migrate(conn, SCHEMA_PATH.read_text(encoding="utf-8"))
        except BaseException:
            conn.close()
            raise
        # A caller may wait for its own batch and the one before it.
        self.writer = Writer(conn, wait_timeout_s=2 * busy_timeout_ms / 1000 + 1)
        self._local = threading.local()
        self._readers = []
        self._readers_lock = threading.Lock()

    def write(self, op):
        return self.writer.run(op)

    def read(self, sql, params=()):
        """All rows of one read-only query (StoreUnavailable if the database cannot answer)."""
        try:
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the database cannot be read: {exc}") from exc

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
        """None when the database answers reads and the last write went through."""
        try:
            self.read(SQL["health"])
        except StoreUnavailable as exc:
            return str(exc)
        if self.writer.last_error:
            return f"the last write failed: {self.writer.last_error}"
        return None

    def close(self):
        self.writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()


def record_session(session, raw_body):
    """The write op for one valid postback: 'recorded', 'duplicate' or 'conflict'."""

    def op(conn, received_at_us):
        inserted = conn.execute(
            SQL["insert_session"], (*session.columns(), received_at_us, raw_body)
        ).rowcount
        if inserted:
            return "recorded"
        *stored_columns, stored_body = conn.execute(
            SQL["stored_session"], (session.session_id,)
        ).fetchone()
        if tuple(stored_columns) == session.columns()[1:]:
            return "duplicate"
        conn.execute(
            SQL["insert_conflict"], (session.session_id, received_at_us, stored_body, raw_body)
        )
        return "conflict"

    return op


def record_rejected(field, reason, raw_body):
    def op(conn, received_at_us):
        conn.execute(SQL["insert_rejected"], (received_at_us, field, reason, raw_body))

    return op


def user_earnings(store, user_id):
    count, ads, duration, whole_usd, nano_rest = store.read(SQL["user_earnings"], (user_id,))[0]
    return {
        "user-id": user_id,
        "sessions": count,
        "ads-viewed": ads,
        "session-duration": duration,
        "estimated-revenue": nanos_to_usd(whole_usd * NANOS_PER_USD + nano_rest),
    }


# ---------------------------------------------------------------------------
# Validation of a postback body
# ---------------------------------------------------------------------------

MAX_SESSION_ID_CHARS = 128
MAX_USER_ID_CHARS = 256
MAX_COUNT = 2**31 - 1  # ads viewed, seconds: anything larger is not a real session
DECIMAL_STRING = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
DIGITS = re.compile(r"[0-9]{1,10}")
COUNTRY = re.compile(r"[A-Za-z]{2}")


class Invalid(Exception):
    """A postback that cannot be recorded: answered 400, kept in `rejected`."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field
        self.message = message


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
        """In the order of SQL['insert_session'] (and SQL['stored_session'] after session_id)."""
        return (
            self.session_id,
            self.user_id,
            self.property_id,
            self.country,
            self.ads_viewed,
            self.duration_s,
            self.revenue_nano,
        )


def _reject_constant(name):
    raise ValueError(f"{name} is not a number")


def parse_json_object(body):
    """bytes -> dict, with every JSON number with a fraction or exponent kept as
    an exact Decimal (never a float)."""
    try:
        payload = json.loads(
            body.decode("utf-8"), parse_float=decimal.Decimal, parse_constant=_reject_constant
        )
    except UnicodeDecodeError:
        raise Invalid(None, "the body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise Invalid(None, f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise Invalid(None, "the body must be a JSON object")
    return payload


def check_text(payload, field, max_chars, allow_empty):
    if field not in payload:
        raise Invalid(field, "is required")
    value = payload[field]
    if not isinstance(value, str):
        raise Invalid(field, "must be a string")
    if not value and not allow_empty:
        raise Invalid(field, "must not be empty")
    if len(value) > max_chars:
        raise Invalid(field, f"must be at most {max_chars} characters")
    return value


def check_revenue(payload, field="your-estimated-revenue"):
    if field not in payload or payload[field] is None:
        raise Invalid(field, "is required")
    value = payload[field]
    if isinstance(value, str):
        if not DECIMAL_STRING.fullmatch(value):
            raise Invalid(field, "must be a decimal number such as \"0.000012\"")
        value = decimal.Decimal(value)
    elif isinstance(value, bool) or not isinstance(value, (int, decimal.Decimal)):
        raise Invalid(field, "must be a decimal string or a number")
    else:
        value = decimal.Decimal(value)
    if not value.is_finite():
        raise Invalid(field, "must be finite")
    if value < 0:
        raise Invalid(field, "must not be negative")
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
    return str(value)


def parse_postback(body):
    """Raw body bytes -> Session, or Invalid naming the first bad field."""
    payload = parse_json_object(body)
    return Session(
        session_id=check_text(payload, "session-id", MAX_SESSION_ID_CHARS, allow_empty=False),
        user_id=check_text(payload, "user-id", MAX_USER_ID_CHARS, allow_empty=True),
        property_id=check_property_id(payload),
        country=check_country(payload),
        ads_viewed=check_count(payload, "count-of-ads-viewed"),
        duration_s=check_count(payload, "session-duration"),
        revenue_nano=check_revenue(payload),
    )


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

JSON_TYPE = "application/json"
ERROR_STATUSES = (400, 401, 404, 405, 413, 500, 503)


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
            return callback(*args, **kwargs)
        except HTTPResponse:
            raise
        except StoreUnavailable as exc:
            log.error("%s %s: %s", request.method, request.path, exc)
            raise ApiError(503, f"storage unavailable: {exc}") from None
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            raise ApiError(500, "internal server error") from None

    return wrapper


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


def log_postback(outcome, status, session_id="-", user_id="-"):
    # json.dumps quotes ids so that a newline in one cannot forge a log line.
    log.info(
        "postback %s status=%d session-id=%s user-id=%s",
        outcome,
        status,
        json.dumps(session_id, ensure_ascii=False),
        json.dumps(user_id, ensure_ascii=False),
    )


def handle_postback():
    app = request.app
    try:
        require_token(app.config["spp.postback_tokens"], "a postback")
        body = read_body(request.environ)
    except ApiError as error:
        log_postback("unauthorized" if error.status_code == 401 else "rejected", error.status_code)
        raise
    try:
        session = parse_postback(body)
    except Invalid as invalid:
        app.store.write(record_rejected(invalid.field, invalid.message, body))
        log_postback("rejected", 400)
        raise ApiError(400, invalid.message, invalid.field) from None
    outcome = app.store.write(record_session(session, body.decode("utf-8")))
    if outcome == "conflict":
        log.warning(
            "postback session-id=%s repeats a stored session with different fields; "
            "kept the first copy, logged both in conflicts",
            json.dumps(session.session_id, ensure_ascii=False),
        )
        outcome = "duplicate"
    log_postback(outcome, 200, session.session_id, session.user_id)
    return {"status": outcome}


def handle_user_earnings(user_id):
    require_token(request.app.config["spp.read_tokens"], "reading earnings")
    return user_earnings(request.app.store, user_id)


def handle_healthz():
    problem = request.app.store.health_problem()
    if problem:
        raise ApiError(503, problem)
    return {"status": "ok"}


def create_app(config):
    """The WSGI app for `config` (keys as in DEFAULTS); opens the database.
    Call app.store.close() when done with it."""
    settings = {**DEFAULTS, **config}
    app = Bottle()
    app.config.update("spp", **settings)
    app.store = Store(settings["db"], settings["busy_timeout_ms"])
    app.install(log_unexpected_errors)
    for status in ERROR_STATUSES:
        app.error(status)(render_error)
    # The trailing-slash form too: a redirect would count as a failed delivery.
    app.route("/postback", "POST", handle_postback)
    app.route("/postback/", "POST", handle_postback)
    app.route("/users/<user_id:re:.*>/earnings", "GET", handle_user_earnings)
    app.route("/healthz", "GET", handle_healthz)
    return app


# ---------------------------------------------------------------------------
# Server and command line
# ---------------------------------------------------------------------------

DRAIN_TIMEOUT_S = 20  # in-flight requests get this long after SIGTERM (TimeoutStopSec is 30)
LOOP_TIMEOUT_S = 0.5  # how often the main loop looks for a stop request


def waitress_settings(config, sockets):
    """Every waitress limit set on purpose (see README, "Limits")."""
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
    count = int(environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=fd) for fd in range(3, 3 + count)]


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


def start_watchdog(store, environ):
    """With WatchdogSec= set, ping systemd while the database answers, so a
    wedged process is restarted."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec or environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    interval = int(usec) / 1_000_000 / 2

    def ping():
        while True:
            time.sleep(interval)
            problem = store.health_problem()
            if problem is None:
                sd_notify("WATCHDOG=1", environ)
            else:
                log.warning("watchdog: not pinging systemd: %s", problem)

    threading.Thread(target=ping, name="spp-watchdog", daemon=True).start()


def run_until(socket_map, stopping):
    from waitress import wasyncore

    while not stopping.is_set():
        wasyncore.loop(timeout=LOOP_TIMEOUT_S, map=socket_map, use_poll=True, count=1)


def drain(socket_map, dispatcher):
    """Stop accepting, let requests in flight finish and their answers go
    out, then stop the worker threads."""
    from waitress import wasyncore
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer

    for listener in [d for d in socket_map.values() if isinstance(d, BaseWSGIServer)]:
        # Only the listening socket: its trigger still wakes the loop for answers.
        wasyncore.dispatcher.close(listener)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        channels = [d for d in socket_map.values() if isinstance(d, HTTPChannel)]
        busy = [c for c in channels if c.requests or c.total_outbufs_len or c.request]
        for channel in channels:
            if channel not in busy:
                channel.handle_close()  # idle keep-alive connection
        if not busy:
            break
        wasyncore.loop(timeout=0.05, map=socket_map, use_poll=True, count=1)
    dispatcher.shutdown(cancel_pending=True, timeout=5)


def serve(app, config, sockets=()):
    """Serve `app` until SIGTERM or SIGINT, then shut down gracefully."""
    from waitress.server import MultiSocketServer, create_server

    server = create_server(app, **waitress_settings(config, sockets))
    socket_map = server.map if isinstance(server, MultiSocketServer) else server._map
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.print_listen("listening on http://{}:{}")
    start_watchdog(app.store, os.environ)
    sd_notify("READY=1")
    run_until(socket_map, stopping)
    sd_notify("STOPPING=1")
    log.info("stopping: finishing requests in flight")
    drain(socket_map, server.task_dispatcher)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def port_number(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be from 0 to 65535")
    return value


def build_parser(environ):
    env = environ.get
    parser = argparse.ArgumentParser(
        prog="spp_server.py",
        description="Receive Gamezop Session Performance Postbacks into SQLite and "
        "report what each user earned.",
        epilog="Secrets are never options (the command line shows in ps): the postback "
        "token comes from SPP_POSTBACK_TOKEN or $CREDENTIALS_DIRECTORY/postback-token, "
        "the read token from SPP_READ_TOKEN or $CREDENTIALS_DIRECTORY/read-token; "
        "several tokens (comma-separated, or one per line in the file) are all accepted, "
        "for rotation. Without a postback token, postbacks need no auth. "
        "Under systemd, a socket passed with LISTEN_FDS is used instead of --host/--port.",
    )
    parser.add_argument(
        "--db", default=env("SPP_DB", DEFAULTS["db"]),
        help="SQLite database file, created on first start [SPP_DB, default %(default)s]",
    )
    parser.add_argument(
        "--host", default=env("SPP_HOST", DEFAULTS["host"]),
        help="address to listen on; other than loopback needs a read token "
        "[SPP_HOST, default %(default)s]",
    )
    parser.add_argument(
        "--port", type=port_number, default=env("SPP_PORT", DEFAULTS["port"]),
        help="TCP port [SPP_PORT, default %(default)s]",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=env("SPP_THREADS", DEFAULTS["threads"]),
        help="worker threads [SPP_THREADS, default %(default)s]",
    )
    return parser


def build_config(args, environ):
    return {
        "db": args.db,
        "host": args.host,
        "port": args.port,
        "threads": args.threads,
        "postback_tokens": load_tokens("SPP_POSTBACK_TOKEN", "postback-token", environ),
        "read_tokens": load_tokens("SPP_READ_TOKEN", "read-token", environ),
    }


def setup_logging():
    # No timestamps: journald adds its own.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # Under a burst every queued request would log a line of its own.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    setup_logging()
    try:
        config = build_config(args, environ)
        sockets = inherited_sockets(environ)
        check_exposure(config, [s.getsockname()[0] for s in sockets] or [config["host"]])
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    if not config["postback_tokens"]:
        log.warning(
            "no postback token configured: anyone who can reach /postback can record sessions"
        )
    try:
        app = create_app(config)
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot open the database %s: %s", config["db"], exc)
        return 1
    try:
        serve(app, config, sockets)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config["host"], config["port"], exc)
        return 1
    finally:
        app.store.close()
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
