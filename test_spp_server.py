"""Tests for spp_server.py: the HTTP contract through WebTest, and end-to-end
tests against a real `python spp_server.py` process.

Helpers shared by several sections come first; then one section per part of
the contract (recording, validation, money, auth, reads, the export command,
reconciliation, errors and health, storage, configuration, a real server,
systemd), each with its own helpers at its top.  Real servers are spoken to
through one helper, http_request() (RealServer.request decodes its JSON)."""

import atexit
import base64
import collections
import contextlib
import csv
import datetime
import fcntl
import functools
import http.client
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pickle
import re
import shutil
import shlex
import signal
import socket
import sqlite3
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp

import spp_server
from spp_server import Reads

HERE = Path(__file__).resolve().parent
SERVER = HERE / "spp_server.py"
SAMPLE = {
    "user-id": "sub1",
    "session-id": "b48a8368-a369-49a4-b427-2d5891ef3763",
    "country": "IN",
    "count-of-ads-viewed": 1,
    "your-estimated-revenue": "0.000012",
    "session-duration": 163,
    "property-id": "1234",
}
DECIMAL_STRING = re.compile(r"^[0-9]+(\.[0-9]+)?$")

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # database=None keeps no examples, but Hypothesis still caches Unicode tables
    # under ./.hypothesis: keep them out of the working tree.
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "spp-receiver-hypothesis")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "spp.db")


@pytest.fixture
def make_client(db):
    """make_client(**config) -> TestApp on a fresh app (database `db` by default)."""
    apps = []

    def make(**config):
        app = spp_server.create_app({"db": db, "writer": "thread", **config})
        apps.append(app)
        return TestApp(app)

    yield make
    for app in apps:
        app.store.close()


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def clock(monkeypatch):
    """The receive time the server stamps on writes, set by the test."""

    class Clock:
        us = spp_server.parse_instant("2026-11-23T10:00:00Z")

        def set(self, text):
            self.us = spp_server.parse_instant(text)

    fake = Clock()
    monkeypatch.setattr(spp_server, "now_us", lambda: fake.us)
    return fake


@pytest.fixture
def fake_serve(monkeypatch):
    """Replace the waitress loop: main() runs up to serving and records how."""
    calls = ServeCalls()
    monkeypatch.setattr(spp_server, "serve", lambda app, config, sockets: calls.append(config))
    monkeypatch.setattr(spp_server, "setup_logging", calls.log_levels.append)
    return calls


@pytest.fixture
def real_server(tmp_path):
    servers = []

    def start(db=None, **kwargs):
        server = RealServer(db or str(tmp_path / "spp.db"), **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def command_lines(client, db, tmp_path):
    """Each command's argv on a database with a session and a refusal."""
    post(client, SAMPLE)
    post(client, b"x", status=400)
    report = tmp_path / "r.csv"
    report.write_text("date,revenue\n2026-11-01,1\n")
    window = ["--since", "2000-01-01", "--until", "2100-01-01"]
    return {
        "export": ["export", "--db", db, *window],
        "reconcile": ["reconcile", "--db", db, *window],
        "import-booked": ["import-booked", str(report), "--db", db],
        "prune": ["prune", "--db", db, "--rejected-before", "2100-01-01"],
        "prune --dry-run": ["prune", "--db", db, "--rejected-before", "2100-01-01", "--dry-run"],
        "--help": ["--help"],
        "export --help": ["export", "--help"],
        # A run of no session is recorded too: its header row is its output.
        "pay": ["pay", "--db", db, "--until", "2000-01-01", "--pay-now-share", "0.5",
                "--final-share", "0.9"],
        "statement": ["statement", "sub1", "--db", db],
        "ledger": ["ledger", "--db", db],
        "settle": ["settle", "--db", db],
    }


@pytest.fixture
def nearly_full_output(tmp_path):
    """A file on a real 256 KiB tmpfs filled but for its last 16 bytes: the
    next write(2) of more than that returns a short count, as on a nearly
    full disk (/dev/full fails the first write whole).  Needs root, as CI."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        output = mount / "out"
        output.write_bytes(b"-" * (256 * 1024 - 16))
        yield output
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture(scope="session")
def nobody_spp():
    """-> spp(*args): the argv that runs spp_server.py as nobody.  The checkout
    and its venv may sit in a directory only root may enter (a clone in a
    mkdtemp folder, Python under /root), so the module, its schema and the
    two packages it imports are copied to a directory anyone can read, and
    run by the first interpreter nobody can start."""
    import bottle
    import waitress
    runtime = Path(tempfile.mkdtemp(prefix="spp-nobody-"))
    runtime.chmod(0o755)
    for source in [SERVER, HERE / "schema.sql", Path(bottle.__file__)]:
        shutil.copy(source, runtime / source.name)
    shutil.copytree(Path(waitress.__file__).parent, runtime / "waitress")
    for path in runtime.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    env = ["env", "-i", f"PYTHONPATH={runtime}", "PYTHONDONTWRITEBYTECODE=1"]
    for python in [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"]:
        probe = subprocess.run(as_nobody(*env, python, "-c", "import bottle, waitress"),
                               capture_output=True, cwd="/", timeout=30)
        if probe.returncode == 0:
            break
    else:
        pytest.skip("no Python interpreter that the user nobody may run")
    yield lambda *args: as_nobody(*env, python, str(runtime / "spp_server.py"), *args)
    shutil.rmtree(runtime)


@pytest.fixture
def shared_dir():
    """A directory another user can reach (tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="spp-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def store(db):
    store = spp_server.Store(db, writer="thread")
    yield store
    store.close()


@pytest.fixture
def view_client(make_client):
    return make_client(read_tokens=(READ.encode(),), reward_share=D("0.7"))


@pytest.fixture(scope="module")
def view_site(tmp_path_factory):
    """One real server with a month of data, a ledger and hostile postbacks,
    one browser: shared by the browser tests, each of which opens its pages."""
    sync_playwright = browser_or_skip()
    folder = tmp_path_factory.mktemp("view")
    db = str(folder / "spp.db")
    # The month of October 2020 and its ledger, written with a fixed clock and
    # fixed session ids, so that the screenshots come out the same each run.
    real_now, spp_server.now_us = spp_server.now_us, lambda: at(61)
    store = spp_server.Store(db, writer="thread")
    try:
        store.write(lambda conn, _: conn.executemany(spp_server.STORE_SQL["insert_session"], [
            (f"oct-{n:03d}", f"user-{n % 37:02d}", ["1234", "5678"][n % 2], "IN", 1, 10,
             (n % 11 + 1) * 1_000_000, at(n % 20, n % 24), "{}") for n in range(600)]))
        book_rows(store, [(day_text(d), "", 165_000_000 + d * 2_000_000) for d in range(18)])
        pay(store, at(10))
        pay(store, at(25))
        spp_server.settle(store)
    finally:
        store.close()
        spp_server.now_us = real_now
    other = OtherOrigin()
    server = RealServer(db, env={"SPP_READ_TOKEN": READ})
    hostile = BROWSER_HOSTILE_IDS
    for n, user_id in enumerate(hostile):
        assert server.post(postback(user_id=user_id, session_id=f"hostile-{n}"))[0] == 200
    long_id = "<b>" + "\u0645" * 5000 + "</b>"  # 10 KB: refused, its body kept in rejected
    assert server.post(postback(user_id=long_id, session_id="long"))[0] == 400
    first = postback(user_id=hostile[0], session_id="twice")
    server.post(first)
    server.post(first)  # a duplicate
    server.post({**first, "country": "BR"})  # a conflict
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        *CHROMIUM_FLAGS, f"--host-resolver-rules=MAP other.test:80 127.0.0.1:{other.port}"])
    site = types_namespace(server=server, other=other, browser=browser, hostile=hostile,
                           long_id=long_id, origin=f"http://127.0.0.1:{server.port}")
    yield site
    browser.close()
    playwright.stop()
    other.server.shutdown()
    server.stop()


@pytest.fixture
def process_client(db):
    """A TestApp whose writes go to a writer process, as the server's do."""
    app = spp_server.create_app({"db": db, "writer": "process", "threads": 4})
    yield TestApp(app)
    app.store.close()


@pytest.fixture
def test_ops(monkeypatch):
    """The write ops of these tests, registered, so that a writer process
    forked afterwards may run them."""
    for op in (slow_write, violate_a_constraint, insert_then_raise_a_bug,
               return_what_json_cannot_hold, fail_at_commit):
        monkeypatch.setitem(spp_server.WRITE_OPS, op.__name__, op)


@pytest.fixture
def process_store(db, test_ops):
    """make(**kwargs) -> a Store with a writer process, closed after the test."""
    stores = []

    def make(**kwargs):
        stores.append(spp_server.Store(db, writer="process", **kwargs))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def counting_clock(monkeypatch):
    """now_us counts 1, 2, 3, ...: each transaction takes one receive time
    (also in a writer process forked afterwards)."""
    ticks = itertools.count(1)
    monkeypatch.setattr(spp_server, "now_us", lambda: next(ticks))


@pytest.fixture(scope="module")
def doc_sandboxes(tmp_path_factory):
    """page -> (DocSandbox, blocks already run): one server per page, module-wide."""
    sandboxes = {}

    def sandbox(page):
        if page not in sandboxes:
            directory = tmp_path_factory.mktemp(re.sub(r"\W", "-", page))
            sandboxes[page] = [DocSandbox(directory, DOC_PAGES[page]), set()]
        return sandboxes[page]

    yield sandbox
    for box, _ in sandboxes.values():
        box.close()


def postback(**fields):
    """SAMPLE with fields replaced (None removes the key) and a fresh session-id."""
    body = {**SAMPLE, "session-id": f"s-{next(_ids)}"}
    for key, value in fields.items():
        key = key.replace("_", "-")
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_ids = iter(range(10**9))


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def post(client, payload, status=200, headers=None):
    """POST a dict as JSON, or bytes/str as they are."""
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    body = body.encode("utf-8") if isinstance(body, str) else body
    return client.post("/postback", body, headers=headers or {}, status=status)


def earnings(client, user_id, status=200, headers=None, **params):
    url = f"/users/{quote(user_id, safe='')}/earnings"
    return client.get(url, params=params, headers=headers or {}, status=status)


def rows(db, sql, params=()):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


def count(db, table):
    return rows(db, f"SELECT count(*) FROM {table}")[0][0]


def assert_error(res, status, field=None):
    assert res.status_int == status
    assert res.content_type == "application/json"
    assert set(res.json) == {"error", "field"}
    assert res.json["error"]
    assert res.json["field"] == field


SCHEMA_VERSIONS = [v for v, _ in spp_server.schema_versions(spp_server.SCHEMA_PATH.read_text())]


def post_at(client, clock, when, **fields):
    clock.set(when)
    body = postback(**fields)
    post(client, body)
    return body


def export(client, status=200, **params):
    return client.get("/earnings", params=params, status=status)


DAY = {"since": "2026-11-23", "until": "2026-11-24"}


AWKWARD_IDS = ['comma,id', 'quote"id', "new\nline", "cr\r\nlf", " spaced ", "=1+1", "ユーザー"]


def query_plan(db, name, params):
    sql = spp_server.totals_sql(name) if isinstance(name, list) else queries_holding(name)[name]
    return " / ".join(row[-1] for row in rows(db, "EXPLAIN QUERY PLAN " + sql, params))


class ServeCalls(list):
    """The configs main() served with; log_levels: what it set up logging with."""

    def __init__(self):
        super().__init__()
        self.log_levels = []


def http_request(port, method, path, body=None, headers=None, timeout=10):
    """One request on a fresh connection -> (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        return res.status, res.headers, res.read()
    finally:
        conn.close()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The server's two writers (writer="auto"): a process where two CPUs or more
# are allowed, a thread of the web process on one.  The durability tests run with each.
ONE_CPU = {min(os.sched_getaffinity(0))}
EACH_WRITER = pytest.mark.parametrize("cpus", [None, ONE_CPU],
                                      ids=["writer process", "writer thread on one CPU"])


class RealServer:
    """`python spp_server.py` on a free port of 127.0.0.1, waited for until it answers."""

    def __init__(self, db, env=None, args=(), port=None, cpus=None):
        self.db = db
        self.port = port or free_port()  # a port: restart where clients expect it
        self.log = open(Path(db).with_suffix(".log"), "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), "--db", db, "--port", str(self.port), *args],
            env={**os.environ, **(env or {})},
            stderr=self.log,
            # The CPUs it may use, as taskset or a unit's CPUAffinity= set them.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.wait_until_ready()

    def wait_until_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited during start"
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)  # polling for the port to open, not covering a race
        raise AssertionError("the server did not start")

    def request(self, method, path, body=None, headers=None, timeout=10):
        """One request on a fresh connection -> (status, decoded JSON body)."""
        status, _, raw = http_request(self.port, method, path, body, headers, timeout)
        return status, json.loads(raw or b"null")

    def post(self, payload):
        return self.request("POST", "/postback", json.dumps(payload).encode())

    def stop(self, signum=signal.SIGTERM, timeout=15):
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.log.close()
        return code

    def log_text(self):
        return Path(self.db).with_suffix(".log").read_text()


@contextlib.contextmanager
def server_with_notify_socket(tmp_path, db, env=None):
    """A real server told to notify a datagram socket this test holds, as
    systemd's NOTIFY_SOCKET: yields (process, port, notify socket)."""
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(15)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SERVER), "--db", db, "--port", str(port)],
        env={**os.environ, "NOTIFY_SOCKET": notify_path, **(env or {})},
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process, port, notify
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()


def chattr(flag, *paths):
    try:
        return subprocess.run(["chattr", flag, *paths], capture_output=True, text=True)
    except FileNotFoundError as exc:  # no e2fsprogs
        return subprocess.CompletedProcess(["chattr"], 127, "", str(exc))


HOSTILE_SETTINGS = dict(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def send_raw(client, body):
    return client.post("/postback", body, expect_errors=True)


def queries_holding(name):
    """The module's query dict (one per section, NAME_SQL) that holds `name`."""
    [queries] = [value for key, value in vars(spp_server).items()
                 if key.endswith("_SQL") and isinstance(value, dict) and name in value]
    return queries


# ---------------------------------------------------------------------------
# Configuration: tokens for postbacks and reads
# ---------------------------------------------------------------------------

OLD_POSTBACK_TOKEN = "pb-old-Zq81xTr"


NEW_POSTBACK_TOKEN = "pb-new-Wk27yMd"


READ_TOKEN = "rd-Hh55vPc"


def test_postback_without_the_token_is_401_and_stores_nothing(make_client, db):
    client = make_client(postback_tokens=(b"s3cret",))
    for headers in [{}, bearer("wrong"), bearer("s3cre"), bearer("s3cret!"),
                    {"Authorization": "Bearer "}, {"Authorization": "Basic czNjcmV0Og=="},
                    {"Authorization": "s3cret"}]:
        res = post(client, postback(), status=401, headers=headers)
        assert_error(res, 401)
        assert res.headers["WWW-Authenticate"].startswith("Bearer")
    client.post("/postback?token=s3cret", json.dumps(postback()), status=401)
    assert count(db, "sessions") == count(db, "rejected") == 0


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(make_client, scheme):
    client = make_client(postback_tokens=(b"s3cret",))
    post(client, postback(), headers={"Authorization": f"{scheme} s3cret"})


def test_every_configured_token_is_accepted_during_rotation(make_client, db):
    client = make_client(postback_tokens=(b"old", b"new"))
    post(client, postback(), headers=bearer("old"))
    post(client, postback(), headers=bearer("new"))
    post(client, postback(), headers=bearer("newer"), status=401)
    assert count(db, "sessions") == 2


def test_unauthenticated_bad_body_is_not_kept(make_client, db):
    client = make_client(postback_tokens=(b"s3cret",))
    post(client, b"junk", status=401)
    assert count(db, "rejected") == 0
    post(client, b"junk", status=400, headers=bearer("s3cret"))
    assert count(db, "rejected") == 1


def test_reads_need_the_read_token_when_one_is_set(make_client):
    client = make_client(read_tokens=(b"reader",), postback_tokens=(b"poster",))
    post(client, SAMPLE, headers=bearer("poster"))
    assert_error(earnings(client, "sub1", status=401), 401)
    assert_error(earnings(client, "sub1", status=401, headers=bearer("poster")), 401)
    assert earnings(client, "sub1", headers=bearer("reader")).json["sessions"] == 1


def test_token_comparison_uses_hmac_compare_digest(monkeypatch):
    calls = []
    monkeypatch.setattr(spp_server.hmac, "compare_digest", lambda a, b: calls.append(b) or False)
    assert not spp_server.token_accepted(b"x", (b"one", b"two"))
    assert calls == [b"one", b"two"]  # every token compared, no early exit


def test_real_server_refuses_bad_tokens_alike_and_never_logs_a_token(real_server, db):
    server = real_server(db, env={
        "SPP_POSTBACK_TOKEN": f"{OLD_POSTBACK_TOKEN},{NEW_POSTBACK_TOKEN}",
        "SPP_READ_TOKEN": READ_TOKEN,
        "SPP_LOG_LEVEL": "debug",  # the most the log ever says
    })

    def send(headers=None, path="/postback", payload=None):
        body = json.dumps(payload or postback(user_id="auth")).encode()
        return http_request(server.port, "POST", path, body, headers)

    # Rotation: both configured tokens work; the scheme is case-insensitive.
    for headers in [bearer(OLD_POSTBACK_TOKEN), bearer(NEW_POSTBACK_TOKEN),
                    {"Authorization": f"bearer {OLD_POSTBACK_TOKEN}"},
                    {"Authorization": f"BEARER {NEW_POSTBACK_TOKEN}"}]:
        status, _, body = send(headers)
        assert (status, json.loads(body)) == (200, {"status": "recorded"}), headers
    basic = base64.b64encode(f"{OLD_POSTBACK_TOKEN}:".encode()).decode()
    refused = [
        send(),
        send(bearer("wrong")),
        send(bearer(OLD_POSTBACK_TOKEN[:-1])),  # a prefix
        send(bearer(OLD_POSTBACK_TOKEN + "x")),  # one character more
        send(bearer(NEW_POSTBACK_TOKEN + NEW_POSTBACK_TOKEN)),  # another length
        send(bearer("p")),
        send({"Authorization": "Bearer "}),
        send({"Authorization": "Bearer"}),
        send({"Authorization": f"Basic {basic}"}),
        send({"Authorization": f"Basic {OLD_POSTBACK_TOKEN}"}),
        send({"Authorization": OLD_POSTBACK_TOKEN}),
        send({"Authorization": f"Token {OLD_POSTBACK_TOKEN}"}),
        send(bearer(f"{OLD_POSTBACK_TOKEN},{NEW_POSTBACK_TOKEN}")),  # the whole setting
        send(bearer(READ_TOKEN)),  # the read token does not post
        send(path=f"/postback?token={OLD_POSTBACK_TOKEN}"),
        send(path=f"/postback?access_token={NEW_POSTBACK_TOKEN}"),
        send({"X-Api-Key": OLD_POSTBACK_TOKEN}),
    ]
    first_status, first_headers, first_body = refused[0]
    assert first_status == 401
    assert set(json.loads(first_body)) == {"error", "field"}
    for status, headers, body in refused:  # refused the same way, whatever was wrong
        assert (status, body) == (first_status, first_body)
        assert headers["WWW-Authenticate"] == first_headers["WWW-Authenticate"]
    # A bad body and an oversized one, with a good token: refused, token still unlogged.
    assert send(bearer(NEW_POSTBACK_TOKEN), payload={"session-id": ""})[0] == 400
    big = postback(padding="x" * spp_server.MAX_BODY_BYTES)
    assert send(bearer(NEW_POSTBACK_TOKEN), payload=big)[0] == 413
    # Reads: only the read token, in the header.
    for headers, path in [({}, "/stats"), (bearer(OLD_POSTBACK_TOKEN), "/stats"),
                          ({}, f"/stats?token={READ_TOKEN}"), (bearer(READ_TOKEN + "x"), "/stats"),
                          (bearer(READ_TOKEN[:-1]), "/users/auth/earnings")]:
        assert http_request(server.port, "GET", path, headers=headers)[0] == 401
    status, _, body = http_request(server.port, "GET", "/users/auth/earnings",
                                   headers={"Authorization": f"bearer {READ_TOKEN}"})
    assert (status, json.loads(body)["sessions"]) == (200, 4)
    assert server.stop() == 0
    assert count(db, "sessions") == 4
    assert count(db, "rejected") == 1  # only the authenticated bad body
    log_text = server.log_text()
    assert log_text.count("postback unauthorized") == len(refused)  # the log was captured
    assert log_text.count("postback recorded") == 4
    for secret in [OLD_POSTBACK_TOKEN, NEW_POSTBACK_TOKEN, READ_TOKEN, basic,
                   "Zq81x", "Wk27y", "Hh55v"]:  # not even part of one
        assert secret not in log_text, secret


# ---------------------------------------------------------------------------
# Money and time: exact sums, exact strings
# ---------------------------------------------------------------------------

TOTAL_KEYS = ["user-id", "sessions", "ads-viewed", "session-duration", "estimated-revenue"]


NANO_DECIMAL = Decimal("1e-9")


REVENUES = st.decimals(min_value=0, max_value=spp_server.MAX_ESTIMATE, places=9,
                       allow_nan=False, allow_infinity=False)


def revenue_literal(amount, form):
    """An accepted way of writing `amount` in a postback."""
    plain = format(amount, "f")
    return {
        "string": json.dumps(plain),
        "string-exponent": json.dumps(format(amount, "e")),
        "string-trailing-zeros": json.dumps(plain + ("000" if "." in plain else ".000")),
        "number": plain,
        "number-exponent": format(amount, "e"),
        "integer": str(int(amount)) if amount == amount.to_integral_value() else plain,
    }[form]


REVENUE_FORMS = ["string", "string-exponent", "string-trailing-zeros", "number",
                 "number-exponent", "integer"]


def test_many_tenths_add_up_exactly(client):
    for _ in range(30):
        post(client, postback(user_id="tenths", your_estimated_revenue="0.1"))
    assert earnings(client, "tenths").json["estimated-revenue"] == "3"


def test_earnings_sum_is_exact_for_awkward_amounts(client):
    amounts = ["0.000012", "0.000000001", "3.456789012", "0.3", "9.999999999", "7"]
    for amount in amounts:
        post(client, postback(user_id="mix", your_estimated_revenue=amount))
    revenue = earnings(client, "mix").json["estimated-revenue"]
    assert DECIMAL_STRING.match(revenue)
    assert Decimal(revenue) == sum(Decimal(a) for a in amounts)


def test_earnings_totals_every_counter_and_treats_null_as_zero(client):
    post(client, postback(user_id="u", count_of_ads_viewed=2, session_duration=60))
    post(client, postback(user_id="u", count_of_ads_viewed=None, session_duration=None))
    post(client, postback(user_id="u", count_of_ads_viewed=3, session_duration=40))
    post(client, postback(user_id="someone-else"))
    res = earnings(client, "u").json
    assert {k: res[k] for k in TOTAL_KEYS} == {
        "user-id": "u",
        "sessions": 3,
        "ads-viewed": 5,
        "session-duration": 100,
        "estimated-revenue": "0.000036",
    }


def test_user_without_sessions_gets_zeros(client):
    assert earnings(client, "nobody").json == {
        "user-id": "nobody",
        "sessions": 0,
        "ads-viewed": 0,
        "session-duration": 0,
        "estimated-revenue": "0",
        "first-received-at": None,
        "last-received-at": None,
        "since": None,
        "until": None,
    }


def test_sums_beyond_64_bit_nano_usd_stay_exact(client, db):
    # 10,000 sessions at the largest revenue: 10^19 nano-USD, past SQLite's int64.
    big = 999_999_999_999_999
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO sessions (session_id, user_id, revenue_nano, received_at_us, raw_body) "
            "VALUES (?, 'whale', ?, 1, '{}')", ((f"w{i}", big) for i in range(10_000)))
    assert earnings(client, "whale").json["estimated-revenue"] == spp_server.nanos_to_usd(
        big * 10_000) == "9999999999.99999"
    line = client.get("/earnings", params={"since": "0", "until": "2"}).body
    assert json.loads(line)["estimated-revenue"] == "9999999999.99999"


@pytest.mark.parametrize(
    "nanos, text",
    [(0, "0"), (1, "0.000000001"), (12_000, "0.000012"), (10**9, "1"), (1_500_000_000, "1.5"),
     (10**24 + 7, "1000000000000000.000000007")],
)
def test_nanos_are_written_as_exact_decimal_strings(nanos, text):
    assert spp_server.nanos_to_usd(nanos) == text


def test_earnings_are_the_exact_sum_of_the_accepted_revenues(client, db):
    @settings(max_examples=100, **HOSTILE_SETTINGS)
    @given(entries=st.lists(st.tuples(REVENUES, st.sampled_from(REVENUE_FORMS)), min_size=1,
                            max_size=8),
           resend=st.integers(0, 7), noise=st.sampled_from(['"-1"', '"1e6"', '"abc"', "true"]))
    def check(entries, resend, noise):
        user = f"sum-{next(_ids)}"
        bodies = []
        for amount, form in entries:
            text = json.dumps(postback(user_id=user, your_estimated_revenue="__REV__"))
            bodies.append(text.replace('"__REV__"', revenue_literal(amount, form)).encode())
        for body in bodies:
            assert send_raw(client, body).json == {"status": "recorded"}
        # A re-send and a refused postback change nothing.
        assert send_raw(client, bodies[resend % len(bodies)]).json == {"status": "duplicate"}
        bad = json.dumps(postback(user_id=user, your_estimated_revenue="__REV__"))
        assert send_raw(client, bad.replace('"__REV__"', noise).encode()).status_int == 400
        res = earnings(client, user).json
        assert res["sessions"] == len(entries)
        assert DECIMAL_STRING.match(res["estimated-revenue"])
        exact = sum((amount for amount, _ in entries), Decimal(0))
        assert exact == exact.quantize(NANO_DECIMAL, rounding=ROUND_HALF_EVEN)  # nothing rounded
        assert Decimal(res["estimated-revenue"]) == exact

    check()


# ---------------------------------------------------------------------------
# Validation of a postback body: field validation, hostile bodies
# ---------------------------------------------------------------------------

class CountingStream:
    """An endless request body that counts what was read from it."""

    def __init__(self):
        self.read_bytes = 0

    def read(self, size=-1):
        assert size >= 0, "an unbounded read of the body"
        self.read_bytes += size
        return b" " * size


def check_answer(res, db, sessions_before, field=None):
    """The contract for any postback: never 500, always JSON, nothing stored for an error."""
    assert res.status_int in (200, 400, 413), (res.status, res.text)
    assert res.content_type == "application/json"
    answer = json.loads(res.body)
    sessions_after = count(db, "sessions")
    if res.status_int == 200:
        assert answer in ({"status": "recorded"}, {"status": "duplicate"})
        assert sessions_after == sessions_before + (answer["status"] == "recorded")
    else:
        assert set(answer) == {"error", "field"} and answer["error"]
        assert sessions_after == sessions_before
        if field is not None:
            assert answer["field"] in (field, None), answer
    return answer


# Text including lone surrogates (sent as \udXXX escapes, or as CESU bytes).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)


JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats()  # nan/inf -> NaN literals
               | st.decimals(allow_nan=False, allow_infinity=False) | ANY_TEXT)


JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


def to_json(value, ensure_ascii=True):
    """Any generated value -> JSON text; Decimals become JSON numbers written exactly."""
    text = json.dumps(value, ensure_ascii=ensure_ascii,
                      default=lambda d: f"__DECIMAL_{d}__")
    return re.sub(r'"__DECIMAL_(.*?)__"', r"\1", text)


def as_body(text):
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8


NUMBER_TEXT = st.builds(
    lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
    st.sampled_from(["", "-", "+"]),
    st.sampled_from(["0", "1", "00", "12", "999999", "1000000", "1_000", "0x10", "", "١"]),
    st.sampled_from(["", ".5", ".000000001", ".0000000005", ".", ".1234567891234"]),
    st.one_of(st.just(""), st.builds(lambda e, sign, digits: f"{e}{sign}{digits}",
                                     st.sampled_from(["e", "E"]),
                                     st.sampled_from(["", "+", "-"]),
                                     st.integers(0, 10**30).map(str))),
)


LITERALS = st.one_of(
    JSON_VALUES.map(to_json),
    NUMBER_TEXT,  # a JSON number or not JSON at all
    NUMBER_TEXT.map(lambda n: f'"{n}"'),  # the same as a string
    st.sampled_from(["1e400", "-1e400", "-0", "-0.0", "NaN", "Infinity", "-Infinity", '"NaN"',
                     '"Infinity"', '"\\ud800"', '"\\udfff"', '"a\\udc00b"', '"\\udc00\\ud800"',
                     '"\\u0000"', '"\\ud83c\\udfae"', "1e99999999999999999999",
                     '"1e-99999999999999999999"', "[" * 50 + "]" * 50, "{}", '""']),
)


POSTBACK_FIELDS = sorted(SAMPLE)


def nested(depth):
    return "[" * depth + "]" * depth


def test_body_of_exactly_the_limit_is_accepted(client, db):
    body = json.dumps(postback(padding=""))
    body = json.dumps(postback(padding="x" * (spp_server.MAX_BODY_BYTES - len(body))))
    assert len(body.encode()) == spp_server.MAX_BODY_BYTES
    post(client, body, status=200)
    assert count(db, "sessions") == 1


def test_body_over_the_limit_gets_413_json_and_stores_nothing(client, db):
    body = json.dumps(postback(padding="x" * spp_server.MAX_BODY_BYTES))
    assert_error(post(client, body, status=413), 413)
    assert count(db, "sessions") == count(db, "rejected") == 0


def test_body_without_length_is_read_no_further_than_the_limit():
    stream = CountingStream()
    with pytest.raises(spp_server.ApiError) as raised:
        spp_server.read_body({"wsgi.input": stream})
    assert raised.value.status_code == 413
    assert stream.read_bytes == spp_server.MAX_BODY_BYTES + 1


def test_announced_length_over_the_limit_is_refused_without_reading():
    stream = CountingStream()
    environ = {"wsgi.input": stream, "CONTENT_LENGTH": str(10**9)}
    with pytest.raises(spp_server.ApiError):
        spp_server.read_body(environ)
    assert stream.read_bytes == 0


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe{}", b"not json", b"{\"user-id\": ", b"", b"[1, 2]", b'"text"', b"12", b"null"],
)
def test_body_that_is_not_a_json_object_is_400_and_kept_raw(client, db, body):
    assert_error(post(client, body, status=400), 400)
    assert count(db, "sessions") == 0
    assert rows(db, "SELECT raw_body FROM rejected") == [(body,)]


@pytest.mark.parametrize(
    "field, value",
    [
        ("session-id", None),
        ("session-id", ""),
        ("session-id", "x" * 129),
        ("session-id", 123),
        ("session-id", ["a"]),
        ("user-id", None),
        ("user-id", "u" * 257),
        ("user-id", 42),
        ("user-id", {"id": 1}),
        ("your-estimated-revenue", None),
        ("your-estimated-revenue", "-0.01"),
        ("your-estimated-revenue", -1),
        ("your-estimated-revenue", "1000000"),
        ("your-estimated-revenue", "999999.9999999996"),
        ("your-estimated-revenue", "10.000000001"),  # one nano-USD above the largest
        ("your-estimated-revenue", "10.0000000001"),  # above, although it rounds to 10
        ("your-estimated-revenue", 11),
        ("your-estimated-revenue", "999999"),
        ("your-estimated-revenue", 1e400),
        ("your-estimated-revenue", "NaN"),
        ("your-estimated-revenue", "Infinity"),
        ("your-estimated-revenue", "abc"),
        ("your-estimated-revenue", "0x10"),
        ("your-estimated-revenue", "1_000"),
        ("your-estimated-revenue", "+1"),
        ("your-estimated-revenue", " 1"),
        ("your-estimated-revenue", ""),
        ("your-estimated-revenue", True),
        ("your-estimated-revenue", ["0.1"]),
        ("count-of-ads-viewed", -1),
        ("count-of-ads-viewed", "1.5"),
        ("count-of-ads-viewed", 1.5),
        ("count-of-ads-viewed", True),
        ("count-of-ads-viewed", "-3"),
        ("count-of-ads-viewed", "١"),  # a digit, but not an ASCII one
        ("count-of-ads-viewed", 2**31),
        ("count-of-ads-viewed", ""),
        ("session-duration", ""),
        ("session-duration", 2**31),
        ("session-duration", -1),
        ("session-duration", "abc"),
        ("session-duration", False),
        ("session-duration", [1]),
        ("country", "IND"),
        ("country", "I"),
        ("country", ""),
        ("country", "1N"),
        ("country", "ÏN"),
        ("country", 91),
        ("property-id", True),
        ("property-id", 1.5),
        ("property-id", ["1234"]),
        ("property-id", "p" * 129),
    ],
)
def test_each_bad_field_is_a_400_naming_it_and_nothing_is_stored(client, db, field, value):
    body = {**SAMPLE}
    if value is None:
        del body[field]
    else:
        body[field] = value
    raw = json.dumps(body) if value != 1e400 else json.dumps(body).replace("Infinity", "1e400")
    res = post(client, raw, status=400)
    assert_error(res, 400, field)
    assert field in res.json["error"] or res.json["error"].startswith(("is ", "must "))
    assert count(db, "sessions") == 0
    assert rows(db, "SELECT field, raw_body FROM rejected") == [(field, raw.encode())]


@pytest.mark.parametrize("char", ["x", "é", "🎮"])  # a limit counts characters, not bytes
@pytest.mark.parametrize("field, limit", [("session-id", 128), ("user-id", 256), ("property-id", 128)])
def test_an_id_of_exactly_its_maximum_length_is_accepted_and_one_more_refused(
        client, db, field, limit, char):
    longest = postback(**{field: char * limit})
    post(client, longest)
    assert count(db, "sessions") == 1
    res = post(client, postback(**{field: char * (limit + 1)}), status=400)
    assert_error(res, 400, field)
    assert str(limit) in res.json["error"]
    assert count(db, "sessions") == 1


@pytest.mark.parametrize("field", ["count-of-ads-viewed", "session-duration"])
def test_a_count_of_exactly_its_maximum_is_accepted(client, db, field):
    post(client, postback(**{field: 2**31 - 1}))
    assert count(db, "sessions") == 1


@pytest.mark.parametrize("field", ["session-id", "user-id", "property-id"])
def test_lone_surrogate_escape_in_an_id_is_a_400(client, db, field):
    raw = json.dumps(SAMPLE).replace(f'"{field}": "', f'"{field}": "\\ud800')
    assert_error(post(client, raw, status=400), 400, field)
    assert count(db, "sessions") == 0 and count(db, "rejected") == 1


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_number_literals_are_400(client, db, literal):
    raw = json.dumps(SAMPLE).replace('"0.000012"', literal)
    assert_error(post(client, raw, status=400), 400)
    assert count(db, "sessions") == 0


@pytest.mark.parametrize(
    "fields, column, stored",
    [
        ({"count_of_ads_viewed": "7"}, "ads_viewed", 7),
        ({"count_of_ads_viewed": 0}, "ads_viewed", 0),
        ({"count_of_ads_viewed": None}, "ads_viewed", None),
        ({"session_duration": "0163"}, "duration_s", 163),
        ({"session_duration": 2**31 - 1}, "duration_s", 2**31 - 1),
        ({"country": "in"}, "country", "IN"),
        ({"country": "Us"}, "country", "US"),
        ({"country": None}, "country", None),
        ({"property_id": 1234}, "property_id", "1234"),
        ({"property_id": "abc"}, "property_id", "abc"),
        ({"property_id": None}, "property_id", None),
        ({"user_id": ""}, "user_id", ""),
        ({"user_id": "ユーザー/1 %20"}, "user_id", "ユーザー/1 %20"),
        ({"your_estimated_revenue": "0"}, "revenue_nano", 0),
        ({"your_estimated_revenue": "-0"}, "revenue_nano", 0),
        ({"your_estimated_revenue": "1.2e-05"}, "revenue_nano", 12_000),
        ({"your_estimated_revenue": "10"}, "revenue_nano", 10_000_000_000),  # the largest
        ({"your_estimated_revenue": "1e1"}, "revenue_nano", 10_000_000_000),
        ({"your_estimated_revenue": "9.9999999995"}, "revenue_nano", 10_000_000_000),  # half-even
        ({"your_estimated_revenue": "9.999999999"}, "revenue_nano", 9_999_999_999),
        ({"your_estimated_revenue": "0.0000000005"}, "revenue_nano", 0),  # half-even: down
        ({"your_estimated_revenue": "0.0000000015"}, "revenue_nano", 2),  # half-even: up
        ({"your_estimated_revenue": "0.0000000025"}, "revenue_nano", 2),
        ({"your_estimated_revenue": "0.00000000251"}, "revenue_nano", 3),
    ],
)
def test_accepted_field_forms_are_stored_normalised(client, db, fields, column, stored):
    body = postback(**fields)
    post(client, body)
    assert rows(db, f"SELECT {column} FROM sessions") == [(stored,)]


def test_json_number_revenue_is_parsed_exactly_not_as_a_float(client, db):
    # 0.1 as a float is 0.1000000000000000055...; as a decimal it is exact.
    raw = json.dumps(postback(your_estimated_revenue="X")).replace('"X"', "0.123456789")
    post(client, raw)
    assert rows(db, "SELECT revenue_nano FROM sessions") == [(123_456_789,)]


def test_unknown_keys_are_accepted_and_kept_in_the_raw_body(client, db):
    body = postback(campaign="spring", nested={"a": [1, 2]})
    post(client, body)
    [(raw,)] = rows(db, "SELECT raw_body FROM sessions")
    assert json.loads(raw)["nested"] == {"a": [1, 2]}


def test_rejected_postback_keeps_reason_time_and_exact_bytes(client, db):
    raw = b'{"user-id": "u", "session-id": "s", "your-estimated-revenue": "lots"}'
    before = time.time_ns() // 1000
    res = post(client, raw, status=400)
    [(received, field, reason, body)] = rows(
        db, "SELECT received_at_us, field, reason, raw_body FROM rejected"
    )
    assert (field, body) == ("your-estimated-revenue", raw)
    assert reason == res.json["error"]
    assert received >= before


def test_any_bytes_or_json_value_as_a_body_is_answered_json_never_500(client, db):
    @settings(max_examples=150, **HOSTILE_SETTINGS)
    @given(body=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v, a: as_body(to_json(v, a)), JSON_VALUES, st.booleans())))
    def check(body):
        before = count(db, "sessions")
        check_answer(send_raw(client, body), db, before)

    check()


def test_any_field_replaced_by_any_json_is_answered_json_never_500(client, db):
    @settings(max_examples=250, **HOSTILE_SETTINGS)
    @given(field=st.sampled_from(POSTBACK_FIELDS), literal=LITERALS, ascii_only=st.booleans())
    def check(field, literal, ascii_only):
        text = json.dumps(postback(**{field: "__LITERAL__"}), ensure_ascii=ascii_only)
        body = as_body(text.replace('"__LITERAL__"', literal))
        before = count(db, "sessions")
        answer = check_answer(send_raw(client, body), db, before, field)
        if answer.get("status") == "recorded":  # stored exactly as sent
            [(raw,)] = rows(db, "SELECT raw_body FROM sessions ORDER BY id DESC LIMIT 1")
            assert raw.encode("utf-8", "surrogatepass") == body

    check()


def test_escaped_surrogate_pair_in_an_id_is_one_character(client, db):
    text = json.dumps(postback(user_id="__ID__")).replace("__ID__", "\\ud83c\\udfae")
    assert send_raw(client, text.encode()).json == {"status": "recorded"}
    assert earnings(client, "\U0001F3AE").json["sessions"] == 1


@pytest.mark.parametrize(
    "literal, allowed",
    [
        ("-0", {0}), ("-0.0", {0}), ("0e0", {0}), ("1E-9", {1}), ('"1e-9"', {1}),
        ("0.0000000005", {0}), ('"-0e5"', {0}), ("7", {7 * 10**9}), ("12", {400}),
        ("1e400", {400}), ("1e99999999999999999999", {400}), ('"1e99999999999999999999"', {400}),
        # Too small to be written down by Python's Decimal; it rounds to 0 nano-USD.
        ('"1e-99999999999999999999"', {0, 400}), ("1e-99999999999999999999", {0, 400}),
        ("NaN", {400}), ('"NaN"', {400}), ('"0x10"', {400}), ('"1_000"', {400}),
        ('"+1"', {400}), ("+1", {400}), ('"1."', {400}), ('".5"', {400}), ("0x10", {400}),
    ],
)
def test_awkward_revenue_numbers(client, db, literal, allowed):
    text = json.dumps(postback(your_estimated_revenue="__REV__")).replace('"__REV__"', literal)
    res = send_raw(client, text.encode())
    check_answer(res, db, 0, "your-estimated-revenue")
    outcome = 400 if res.status_int == 400 else rows(db, "SELECT revenue_nano FROM sessions")[0][0]
    assert outcome in allowed, res.text


@pytest.mark.parametrize("literal", ["1e99999999999999999999", "-1e-99999999999999999999",
                                     "1" + "0" * 5000])
def test_awkward_number_in_an_unknown_key_is_not_a_500(client, db, literal):
    text = json.dumps(postback(extra="__X__")).replace('"__X__"', literal)
    check_answer(send_raw(client, text.encode()), db, 0)


@pytest.mark.parametrize(
    "make_body",
    [
        lambda: nested(30_000),  # as deep as fits in the body limit
        lambda: json.dumps(postback()).replace("{", '{"deep": ' + nested(20_000) + ", ", 1),
        lambda: json.dumps(postback()).replace("{", '{"deep": ' + nested(500) + ", ", 1),
        lambda: '{"a": ' * 9_000 + "1" + "}" * 9_000,
        lambda: json.dumps(postback(wide={str(i): i for i in range(3_000)})),
        lambda: json.dumps(postback(long="ユ" * 20_000), ensure_ascii=False),  # 60 KB of UTF-8
        lambda: json.dumps(postback(session_id="s" * 60_000)),
        lambda: json.dumps(postback(user_id="u" * 60_000)),
        lambda: json.dumps(postback(list=[{}] * 15_000)),
        lambda: json.dumps(postback()) + " " * 50_000,
        lambda: json.dumps(postback()) + " x",
        lambda: '{"session-id": "a", "session-id": "b", "user-id": "u", '
                '"your-estimated-revenue": "1", "your-estimated-revenue": "x"}',
    ],
)
def test_deep_wide_and_huge_bodies_are_answered_json_never_500(client, db, make_body):
    body = make_body().encode()
    assert len(body) <= spp_server.MAX_BODY_BYTES
    check_answer(send_raw(client, body), db, 0)
    assert client.get("/healthz").json == {"status": "ok"}


# What an error message must never show: Python's internals instead of the field.
PYTHON_INTERNALS = ("<class", "Traceback", "sys.", "set_int_max_str_digits", "Error(", "Error:")


def assert_no_internals(message):
    assert not any(word in message for word in PYTHON_INTERNALS), message


def json_object_text(pairs):
    """A JSON object written from (key, value) pairs, which may repeat a key."""
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"


def test_a_postback_that_gives_a_key_twice_is_a_400_naming_it_and_kept(client, db):
    """JSON lets a key repeat, and json keeps the last value: `user-id` twice
    recorded the second.  Which one Gamezop meant is ambiguous: refused, even
    with the same value twice."""
    @settings(max_examples=40, **HOSTILE_SETTINGS)
    @given(key=st.sampled_from(POSTBACK_FIELDS + ["extra", "User-Id", ""]),
           second=st.one_of(st.none(), st.integers(0, 9), st.text(max_size=5)),
           at_end=st.booleans())
    def check(key, second, at_end):
        pairs = list(postback().items())
        first = dict(pairs).get(key, "first")
        repeat = (key, first if second is None else second)
        pairs = [*pairs, repeat] if at_end else [repeat, *pairs]
        if key not in SAMPLE:
            pairs.append((key, first))
        body = json_object_text(pairs).encode("utf-8")
        before = count(db, "sessions")
        res = send_raw(client, body)
        assert_error(res, 400, key)
        assert "more than once" in res.json["error"]
        assert count(db, "sessions") == before
        assert rows(db, "SELECT field, raw_body FROM rejected ORDER BY id DESC LIMIT 1") == [
            (key, body)]

    check()


def test_a_postback_that_gives_a_key_twice_anywhere_is_a_400_naming_its_field(client, db):
    """Nested, with the same or another value: the field that holds it is named."""
    @settings(max_examples=40, **HOSTILE_SETTINGS)
    @given(field=st.sampled_from(POSTBACK_FIELDS + ["extra"]),
           depth=st.integers(1, 4), in_list=st.booleans(), same=st.booleans())
    def check(field, depth, in_list, same):
        inner = '{"k": 1, "k": ' + ("1" if same else '"2"') + "}"
        for _ in range(depth - 1):
            inner = f'{{"n": {inner}}}'
        value = f"[{inner}]" if in_list else inner
        text = json.dumps(postback(**{field: "__VALUE__"})).replace('"__VALUE__"', value)
        before = count(db, "sessions")
        res = send_raw(client, text.encode())
        assert_error(res, 400, field)
        assert "'k' more than once" in res.json["error"]
        assert count(db, "sessions") == before

    check()


LITERALS_WITH_HUGE_NUMBERS = st.one_of(
    LITERALS,
    st.integers(4301, 6000).map(lambda n: "1" * n),  # past int()'s digit limit
    st.integers(4301, 6000).map(lambda n: '"' + "9" * n + '"'),
    st.sampled_from(["1e99999999999999999999", "-1E+99999999999999999999", "0." + "0" * 5000 + "1",
                     "[" * 100_000, "{\"a\":" * 20_000, '{"a": 1, "a": 2}']),
)


@pytest.mark.parametrize("field", POSTBACK_FIELDS)
def test_a_whole_number_of_any_length_is_refused_by_its_field_name(client, db, field):
    """int() refuses more than 4300 digits; the refusal must still name the field."""
    @settings(max_examples=10, **HOSTILE_SETTINGS)
    @given(digits=st.integers(4001, 20_000))
    def check(digits):
        text = json.dumps(postback(**{field: "__LITERAL__"}))
        res = send_raw(client, as_body(text.replace('"__LITERAL__"', "9" * digits)))
        assert_error(res, 400, field)
        assert_no_internals(res.json["error"])

    check()


@pytest.mark.parametrize("digits", [1, 3999, 4000, 4001, 4300, 4301, 20_000])
@pytest.mark.parametrize("sign", ["", "-"])
def test_a_json_whole_number_is_an_int_up_to_4000_characters_then_an_exact_decimal(digits, sign):
    """Up to 4,000 characters int() reads it (its own limit is 4,300 digits);
    past that an exact Decimal, never int()'s error about sys."""
    text = sign + "9" * digits
    value = spp_server.parse_json(text)
    assert type(value) is (int if len(text) <= 4000 else Decimal)
    assert value == Decimal(text)


@pytest.mark.parametrize("digits, error", [
    (4000, "must be at most 128 characters"),  # read as an int: too long as text
    (4001, "must be a string or an integer"),  # read as a Decimal
])
def test_a_4000_digit_property_id_is_refused_by_its_length(client, db, digits, error):
    text = json.dumps(postback(property_id="__LITERAL__"))
    res = send_raw(client, as_body(text.replace('"__LITERAL__"', "9" * digits)))
    assert_error(res, 400, "property-id")
    assert res.json["error"] == error


def test_no_postback_error_shows_python_internals(client, db):
    @settings(max_examples=150, **HOSTILE_SETTINGS)
    @given(field=st.sampled_from(POSTBACK_FIELDS), literal=LITERALS_WITH_HUGE_NUMBERS)
    def check(field, literal):
        text = json.dumps(postback(**{field: "__LITERAL__"}))
        res = send_raw(client, as_body(text.replace('"__LITERAL__"', literal)))
        if res.status_int != 200:
            assert_no_internals(res.json["error"])
            assert_no_internals(json.dumps(res.json["field"]))

    check()


# ---------------------------------------------------------------------------
# Storage: files, schema, opening, the write connection, failing writes
# ---------------------------------------------------------------------------

OPEN_STORE = "import sys, spp_server; spp_server.Store(sys.argv[1], writer='thread').close()"

# Three processes opening each database named in argv at once: forked from
# one that imported spp_server (each a process of its own, with its own
# connections), held at a gate until all three exist, then let go together.
# Exits 1, with the tracebacks, if any of them failed.
OPEN_STORE_TOGETHER = """
import os, sys, traceback
import spp_server
failed = 0
for db in sys.argv[1:]:
    gate, release = os.pipe()
    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(release)
                os.read(gate, 1)  # until the parent closes the gate: all three start together
                spp_server.Store(db, writer="thread").close()
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        children.append(pid)
    os.close(gate)
    os.close(release)
    for pid in children:
        failed |= os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
sys.exit(failed)
"""


def writer_pragma(app, sql):
    """Run a PRAGMA on the writer's own connection (max_page_count is per connection)."""
    return app.store.write(lambda conn, now: conn.execute(sql).fetchone()[0])


@contextlib.contextmanager
def write_connection_held(store):
    """Keep the write connection busy inside a write of its own."""
    entered, gate = threading.Event(), threading.Event()

    def hold(conn, now):
        entered.set()
        assert gate.wait(10)

    def write():
        with contextlib.suppress(spp_server.StoreUnavailable):  # it may outlast its own wait
            store.write(hold)

    holder = threading.Thread(target=write)
    holder.start()
    assert entered.wait(5)
    try:
        yield
    finally:
        gate.set()
        holder.join(10)


def test_locked_database_gets_503_then_recovers(make_client, db):
    client = make_client(busy_timeout_ms=100)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        started = time.monotonic()
        assert_error(post(client, SAMPLE, status=503), 503)
        assert time.monotonic() - started < 5
        assert_error(client.get("/healthz", status=503), 503)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert count(db, "sessions") == 0
    assert post(client, SAMPLE).json == {"status": "recorded"}
    assert client.get("/healthz").json == {"status": "ok"}


def test_database_files_are_private_whatever_the_umask(client, db):
    old = os.umask(0)
    try:
        post(client, SAMPLE)
    finally:
        os.umask(old)
    for path in [db, db + "-wal"]:
        assert os.stat(path).st_mode & 0o077 == 0, path


def test_writes_are_committed_with_synchronous_full(client):
    # FULL: a committed postback survives a power cut, not just a killed process.
    pragma = client.app.store.write(lambda conn, now: conn.execute("PRAGMA synchronous").fetchone())
    assert pragma == (2,)


def test_database_is_in_wal_mode_with_latest_schema(client, db):
    latest = spp_server.schema_versions(spp_server.SCHEMA_PATH.read_text())[-1][0]
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "PRAGMA user_version") == [(latest,)]


def test_reopening_keeps_rows_and_does_not_reapply_the_schema(make_client, db):
    post(make_client(), SAMPLE)
    client = make_client()
    assert earnings(client, "sub1").json["sessions"] == 1


@pytest.mark.parametrize("old_version", SCHEMA_VERSIONS[:-1])
def test_older_database_is_upgraded_in_place_keeping_rows(db, old_version):
    conn = spp_server.connect(db, 1000)
    spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(), target=old_version)
    conn.execute(
        "INSERT INTO sessions (session_id, user_id, revenue_nano, received_at_us, raw_body) "
        "VALUES ('old-session', 'sub1', 5000, 1, '{}')"
    )
    conn.close()
    assert rows(db, "PRAGMA user_version") == [(old_version,)]
    app = spp_server.create_app({"db": db, "writer": "thread"})
    try:
        client = TestApp(app)
        assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSIONS[-1],)]
        post(client, SAMPLE)
        assert earnings(client, "sub1").json["estimated-revenue"] == "0.000017"
    finally:
        app.store.close()


@pytest.mark.parametrize("old_version", [0, 1])  # a new file; one from the first release
def test_processes_opening_one_database_together_all_succeed(tmp_path, old_version):
    """An overlapping restart, or an export while the server starts: three
    processes open each of four databases at the same moment."""
    dbs = [str(tmp_path / f"race-{attempt}.db") for attempt in range(4)]
    for db in dbs:
        if old_version:
            conn = sqlite3.connect(db, isolation_level=None)  # rollback journal, as SQLite's default
            spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(), target=old_version)
            conn.close()
    together = subprocess.run([sys.executable, "-c", OPEN_STORE_TOGETHER, *dbs], cwd=HERE,
                              stderr=subprocess.PIPE, text=True, timeout=30)
    assert together.returncode == 0, together.stderr
    for db in dbs:
        assert rows(db, "PRAGMA journal_mode") == [("wal",)]
        assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSIONS[-1],)]


def test_opening_waits_for_a_writer_in_the_way_of_wal_mode(db):
    """Switching to WAL needs the file alone for a moment, and SQLite applies
    no busy timeout to it: a write transaction in the way (another process
    creating the schema in rollback-journal mode) must be waited for."""
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE t (x)")
    release = threading.Timer(0.3, other.execute, ["COMMIT"])
    release.start()
    try:
        spp_server.Store(db, writer="thread").close()
    finally:
        release.join()
        other.close()
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]


def test_a_database_that_cannot_be_in_wal_mode_is_refused(tmp_path):
    conn = spp_server.connect(":memory:", 100)  # :memory: keeps journal_mode 'memory'
    with pytest.raises(sqlite3.OperationalError, match="WAL"):
        spp_server.enable_wal(conn, 1)


def test_a_failing_migration_reports_its_own_error_and_changes_nothing(db):
    conn = spp_server.connect(db, 1000)
    broken = "-- version 1\nCREATE TABLE a (x);\n-- version 2\nCREATE TABLE a (x);\n"
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        spp_server.migrate(conn, broken)
    assert not conn.in_transaction
    assert conn.execute("PRAGMA user_version").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    conn.close()


def test_schema_sections_are_numbered_in_increasing_order():
    assert SCHEMA_VERSIONS == sorted(set(SCHEMA_VERSIONS)) and SCHEMA_VERSIONS[0] == 1


def test_full_database_gets_503_then_recovers_without_restart(make_client, db, monkeypatch):
    monkeypatch.setattr(spp_server, "HEALTH_FRESH_S", 3600)  # health tells of the last write
    client = make_client()
    app = client.app
    post(client, postback(user_id="full"))
    pages = writer_pragma(app, "PRAGMA page_count")
    assert writer_pragma(app, f"PRAGMA max_page_count = {pages}") == pages
    big = postback(user_id="full", padding="x" * 20_000)  # needs pages the file may not grow
    started = time.monotonic()
    res = post(client, big, status=503)
    assert time.monotonic() - started < 5
    assert_error(res, 503)
    assert "full" in res.json["error"]
    health = client.get("/healthz", status=503)
    assert_error(health, 503)
    assert "full" in health.json["error"]
    # A bad body that cannot be kept is not a 500 either.
    res = post(client, b"x" * 30_000, status="*")
    assert res.status_int in (400, 503) and res.content_type == "application/json"
    assert earnings(client, "full").json["sessions"] == 1  # reads still answer
    assert count(db, "sessions") == 1

    writer_pragma(app, "PRAGMA max_page_count = 1073741823")  # room again, same process
    assert post(client, big).json == {"status": "recorded"}
    assert client.get("/healthz").json == {"status": "ok"}
    assert earnings(client, "full").json["sessions"] == 2
    assert rows(db, "SELECT raw_body FROM sessions WHERE session_id = ?",
                (big["session-id"],)) == [(json.dumps(big),)]


def test_database_made_unwritable_gets_503_never_200_then_recovers(make_client, db):
    """Read-only database.  The tests run as root, which chmod does not stop, so
    the database file and its WAL are made immutable (chattr +i), which stops
    root too: every write to them fails (EPERM, SQLite's "disk I/O error").
    The -shm file is left alone: it is mmap'd, and writes to an immutable
    mapping kill the process with SIGBUS, as they would any SQLite program."""
    client = make_client(busy_timeout_ms=200)
    post(client, postback(user_id="ro"))
    files = [db, db + "-wal"]
    assert all(os.path.exists(f) for f in files)
    try:
        made = chattr("+i", *files)
        if made.returncode != 0:
            pytest.skip(f"cannot make files immutable here (chattr +i): {made.stderr.strip()}")
        for _ in range(3):
            started = time.monotonic()
            res = post(client, postback(user_id="ro"), status="*")
            assert time.monotonic() - started < 3  # never a hang past the busy timeout
            assert_error(res, 503)
        assert_error(client.get("/healthz", status=503), 503)
        assert earnings(client, "ro").json["sessions"] == 1
    finally:
        chattr("-i", *files)
    assert count(db, "sessions") == 1
    assert post(client, postback(user_id="ro")).json == {"status": "recorded"}
    assert client.get("/healthz").json == {"status": "ok"}
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


def test_a_write_waits_for_the_one_in_progress_then_commits(make_client, db):
    store = make_client().app.store
    body = json.dumps(postback(user_id="waiter"))
    op = spp_server.record_session(spp_server.parse_postback(body.encode()), body)
    result = []
    with write_connection_held(store):
        waiter = threading.Thread(target=lambda: result.append(store.write(op)))
        waiter.start()
        waiter.join(0.2)  # bounded look: nothing else may write meanwhile
        assert waiter.is_alive() and count(db, "sessions") == 0
    waiter.join(10)
    assert result == ["recorded"] and count(db, "sessions") == 1


def test_closing_waits_for_the_write_in_progress_then_refuses_writes(make_client, db):
    store = make_client().app.store
    with write_connection_held(store):
        closer = threading.Thread(target=store.close)
        closer.start()
        closer.join(0.2)  # bounded look: the connection is still in use
        assert closer.is_alive()
    closer.join(10)
    assert not closer.is_alive()
    with pytest.raises(spp_server.StoreUnavailable, match="shutting down"):
        store.write(lambda conn, now: "never runs")


def test_a_write_that_cannot_get_the_connection_in_time_is_unavailable(make_client, db):
    store = make_client(busy_timeout_ms=100).app.store
    with write_connection_held(store):
        started = time.monotonic()
        with pytest.raises(spp_server.StoreUnavailable, match="did not answer in time"):
            store.write(lambda conn, now: "never runs")
        assert time.monotonic() - started < 5
    assert count(db, "sessions") == 0


def test_a_failed_write_is_rolled_back_and_the_next_one_commits(make_client, db, monkeypatch):
    monkeypatch.setattr(spp_server, "HEALTH_FRESH_S", 3600)  # health tells of the last write
    client = make_client()
    store = client.app.store

    def insert_then_violate_a_constraint(conn, now):
        body = json.dumps(postback(user_id="half"))
        spp_server.record_session(spp_server.parse_postback(body.encode()), body)(conn, now)
        conn.execute("INSERT INTO sessions (session_id) VALUES ('no user, no revenue')")

    with pytest.raises(spp_server.StoreUnavailable, match="refused the write"):
        store.write(insert_then_violate_a_constraint)
    assert count(db, "sessions") == 0  # not even the first half
    assert client.get("/healthz", status=503).json["error"].startswith("the last write failed")
    assert post(client, postback()).json == {"status": "recorded"}
    assert client.get("/healthz").json == {"status": "ok"}


def test_an_error_from_a_write_op_that_is_not_sqlites_propagates_and_rolls_back(client, db):
    store = client.app.store

    class Mistake(Exception):
        pass

    def insert_then_fail(conn, now):
        body = json.dumps(postback(user_id="half"))
        spp_server.record_session(spp_server.parse_postback(body.encode()), body)(conn, now)
        raise Mistake("a bug in the op, not a database error")

    with pytest.raises(Mistake):
        store.write(insert_then_fail)
    assert count(db, "sessions") == 0
    assert post(client, postback()).json == {"status": "recorded"}  # the connection still works
    assert count(db, "sessions") == 1


# --- Only spp-receiver databases: every entry point checks the file first ---


LATEST = SCHEMA_VERSIONS[-1]


def make_not_ours(path, kind):
    """A file that is not an spp-receiver database this code may use -> the
    words the refusal must hold (besides the file's name and this code's version)."""
    if kind == "empty":
        path.write_bytes(b"")
        return ["empty"]
    if kind == "text":
        path.write_bytes(b"date,revenue\n2026-11-01,1\n" * 100)
        return ["not an SQLite file"]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        if kind == "newer":
            spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text())
            conn.execute("PRAGMA user_version = 99")
            return ["newer", "99"]
        if kind.startswith("foreign-sessions-"):
            # Another program's `sessions` table (a common name) at a version this code has.
            version = int(kind.rsplit("-", 1)[1])
            conn.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, token TEXT, expires INT)")
            conn.execute("INSERT INTO sessions (token) VALUES ('abc')")
            conn.execute(f"PRAGMA user_version = {version}")
            return ["another program's", "sessions", f"version {version}"]
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('mine')")
        if kind == "foreign-versioned":
            conn.execute("PRAGMA user_version = 3")
            return ["another program's", "notes", "version 3"]
        return ["another program's", "notes", "version 0"]


NOT_OURS = ["empty", "text", "foreign", "foreign-versioned", "newer",
            *(f"foreign-sessions-{v}" for v in SCHEMA_VERSIONS)]


def run_entry_point(entry, db, tmp_path):
    """One command on `db`, in-process -> exit status."""
    report = tmp_path / "r.csv"
    report.write_text("date,revenue\n2026-11-01,1\n")
    window = ["--since", "2026-11-01", "--until", "2026-11-02"]
    return {
        "import-booked": lambda: spp_server.run_import_booked([str(report), "--db", db], {},
                                                              io.StringIO()),
        "prune": lambda: spp_server.run_prune(["--db", db, "--rejected-before", "2100-01-01"], {},
                                              io.StringIO()),
        "prune --dry-run": lambda: spp_server.run_prune(
            ["--db", db, "--rejected-before", "2100-01-01", "--dry-run"], {}, io.StringIO()),
        "export": lambda: spp_server.run_export(["--db", db, *window], {}, io.BytesIO()),
        "reconcile": lambda: spp_server.run_reconcile(["--db", db, *window], {}, io.BytesIO()),
        "pay": lambda: spp_server.run_pay(["--db", db, "--until", "2000-01-01", "--pay-now-share",
                                           "0.5", "--final-share", "0.9"], {}, io.BytesIO()),
        "settle": lambda: spp_server.run_settle(["--db", db], {}, io.BytesIO()),
        "statement": lambda: spp_server.run_statement(["u", "--db", db], {}, io.BytesIO()),
        "ledger": lambda: spp_server.run_ledger(["--db", db], {}, io.BytesIO()),
        "write-off-balances": lambda: spp_server.run_write_off_balances(
            ["--db", db, "--older-than", "90d"], {}, io.BytesIO()),
        "suspects": lambda: spp_server.run_suspects(["--db", db], {}, io.BytesIO()),
        "hold": lambda: spp_server.run_hold(["u", "--reason", "r", "--db", db], {}, io.BytesIO()),
        "release": lambda: spp_server.run_hold(["u", "--reason", "r", "--db", db], {}, io.BytesIO())
        or spp_server.run_hold(["u", "--reason", "r", "--db", db], {}, io.BytesIO(), "release"),
        "erase": lambda: spp_server.run_erase(["u", "--db", db], {}, io.BytesIO()),
        "ledger-replay": lambda: spp_server.run_ledger_replay(["--db", db], {}, io.BytesIO()),
        "void-oversized": lambda: spp_server.run_void_oversized(["--db", db], {}, io.BytesIO()),
    }[entry]()


@pytest.mark.parametrize("kind", NOT_OURS)
@pytest.mark.parametrize("entry", [*spp_server.COMMANDS, "prune --dry-run"])
def test_every_command_refuses_a_file_that_is_not_its_database_and_changes_nothing(
        tmp_path, capsys, kind, entry):
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "x.db"
    words = make_not_ours(db, kind)
    before = file_state(folder)
    assert run_entry_point(entry, str(db), tmp_path) == 1
    one_line_error(capsys, str(db), f"this code's{' schema is version' if kind != 'newer' else ''} "
                   f"{LATEST}", *words)
    assert file_state(folder) == before  # no table, no WAL switch, no -wal or -shm


def command_argv(command, db, tmp_path):
    """`command`'s argv from EVERY_COMMAND, on `db`, its report file real."""
    report = tmp_path / "r.csv"
    report.write_text("date,revenue\n2026-11-01,1\n")
    [argv] = [a for a in EVERY_COMMAND if a[:1] == [command]]
    return [str(report) if a == "r.csv" else a for a in argv[1:]] + ["--db", str(db)]


def run_command(command, argv, out):
    """COMMANDS[command] in-process -> (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = spp_server.COMMANDS[command][0](argv, {}, out)
    return status, err.getvalue()


@pytest.mark.parametrize("failure", ["missing", "no folder", "directory", "text"])
@pytest.mark.parametrize("command", list(spp_server.COMMANDS))
def test_every_command_says_an_unusable_database_in_the_same_line_and_status(
        tmp_path, command, failure):
    """One driver opens the database for every command: the same failure is
    the same line, naming the command and the file, and status 1 (a
    directory was "no database at" to a report, SQLite's "unable to open
    database file" to a step; import-booked added "; nothing imported")."""
    db = tmp_path / ("none/x.db" if failure == "no folder" else "x.db")
    if failure == "directory":
        db.mkdir()
    elif failure == "text":
        make_not_ours(db, "text")
    said = {"missing": f"no database at {db}", "no folder": f"no database at {db}",
            "directory": f"cannot open the database {db}: it is a directory",
            "text": f"{db} is not an spp-receiver database: not an SQLite file (this code's "
                    f"schema is version {LATEST})"}[failure]
    status, err = run_command(command, command_argv(command, db, tmp_path), io.BytesIO())
    assert (status, err) == (1, f"spp_server.py {command}: {said}\n")
    assert not (tmp_path / "none").exists() and not Path(f"{db}-wal").exists()


@pytest.mark.parametrize("kind", NOT_OURS[1:])
def test_the_server_refuses_a_file_that_is_not_its_database(fake_serve, tmp_path, caplog, kind):
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "x.db"
    words = make_not_ours(db, kind)
    before = db.read_bytes()
    assert spp_server.main(["--db", str(db)], environ={}) == 1
    assert fake_serve == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(db) in errors[0] and str(LATEST) in errors[0]
    assert all(word in errors[0] for word in words), errors
    assert db.read_bytes() == before


def test_the_server_makes_an_empty_file_its_database(fake_serve, tmp_path):
    """What it may have left itself: the file is created (0600) before SQLite
    writes the schema, so a stop in between leaves it empty."""
    db = tmp_path / "x.db"
    db.write_bytes(b"")
    assert spp_server.main(["--db", str(db)], environ={}) == 0
    assert rows(str(db), "PRAGMA user_version") == [(LATEST,)]
    assert rows(str(db), "PRAGMA journal_mode") == [("wal",)]


def test_commands_use_an_older_database_the_server_upgrades(db, tmp_path, capsys):
    """The check lets an older spp-receiver schema through to the server's
    upgrade; the read-only reports refuse it, naming both versions."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(), target=1)
    assert run_entry_point("export", db, tmp_path) == 1
    one_line_error(capsys, "schema version 1", f"older than this code's {LATEST}")
    assert run_entry_point("import-booked", db, tmp_path) == 0
    assert rows(db, "PRAGMA user_version") == [(LATEST,)]


def design_upgrade_lists():
    """docs/design.md's two lists: the commands that upgrade an older
    database, and those that refuse one."""
    text = " ".join((HERE / "docs" / "design.md").read_text().split())
    upgrade, refuse = re.search(r"keeps its rows\. (.*?) upgrade it the same way; (.*?), which "
                                r"only read, refuse an older one", text).groups()
    return re.findall(r"`([a-z-]+)`", upgrade), re.findall(r"`([a-z-]+)`", refuse)


@pytest.mark.parametrize("command", list(spp_server.COMMANDS))
def test_every_command_upgrades_an_older_database_or_refuses_it_as_design_md_says(
        db, tmp_path, capsys, command):
    upgrading, refusing = design_upgrade_lists()
    assert command in upgrading + refusing, "design.md does not say what it does"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(), target=1)
    status = run_entry_point(command, db, tmp_path)
    if command in refusing:
        assert status == 1
        one_line_error(capsys, "schema version 1", f"older than this code's {LATEST}")
        assert rows(db, "PRAGMA user_version") == [(1,)]
    else:
        assert status == 0 and rows(db, "PRAGMA user_version") == [(LATEST,)]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_a_database_of_ours_missing_a_table_or_column_of_its_version_is_refused(
        db, tmp_path, capsys, version):
    """The version alone does not make a database ours: what that version's
    sections create must be there (a table dropped, a column renamed by hand)."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(), target=version)
        conn.execute("ALTER TABLE sessions RENAME COLUMN revenue_nano TO revenue")
    before = Path(db).read_bytes()
    assert run_entry_point("import-booked", db, tmp_path) == 1
    one_line_error(capsys, db, "another program's", f"version {version}", "sessions")
    assert Path(db).read_bytes() == before


# ---------------------------------------------------------------------------
# The writer: group commit, the writer thread and the writer process
# ---------------------------------------------------------------------------

# --- Group commit: the writer thread and the writer process ---


def queued_writes(store, ops):
    """Queue `ops` while the writer is held, so that they form one batch once
    it is released: -> the outcome of each ("raised: ..." for an exception)."""
    outcomes = [None] * len(ops)

    def write(i, op):
        try:
            outcomes[i] = store.write(op)
        except spp_server.StoreUnavailable as exc:
            outcomes[i] = f"raised: {exc}"

    threads = [threading.Thread(target=write, args=(i, op)) for i, op in enumerate(ops)]
    with write_connection_held(store):
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(store.writer._queue) < len(ops):  # bounded wait for all of them to queue
            assert time.monotonic() < deadline, "the writes did not queue"
            time.sleep(0.005)
    for thread in threads:
        thread.join(10)
    return outcomes


def session_op(**fields):
    body = json.dumps(postback(**fields))
    return spp_server.record_session(spp_server.parse_postback(body.encode()), body)


def test_writes_waiting_together_commit_as_one_transaction(make_client, db):
    store = make_client().app.store
    outcomes = queued_writes(store, [session_op(user_id=f"batch-{i}") for i in range(5)])
    assert outcomes == ["recorded"] * 5
    # One transaction: one receive time for all five (the clock is real here).
    assert rows(db, "SELECT count(*), count(DISTINCT received_at_us) FROM sessions") == [(5, 1)]


def test_a_failing_write_in_a_batch_fails_alone(make_client, db):
    store = make_client().app.store

    def violate_a_constraint(conn, now):
        conn.execute("INSERT INTO sessions (session_id) VALUES ('no user, no revenue')")

    outcomes = queued_writes(store, [session_op(user_id="a"), violate_a_constraint,
                                     session_op(user_id="b")])
    assert outcomes[0] == outcomes[2] == "recorded"
    assert outcomes[1].startswith("raised: the database refused the write")
    assert sorted(rows(db, "SELECT user_id FROM sessions")) == [("a",), ("b",)]


def test_a_duplicate_in_the_same_batch_is_a_duplicate_and_a_changed_one_a_conflict(make_client, db):
    store = make_client().app.store
    first = postback(user_id="same")
    body = json.dumps(first)
    changed = json.dumps({**first, "country": "BR"})
    ops = [spp_server.record_session(spp_server.parse_postback(b.encode()), b)
           for b in (body, body, changed)]
    assert queued_writes(store, ops) == ["recorded", "duplicate", "conflict"]
    assert count(db, "sessions") == 1 and count(db, "conflicts") == 1


def test_with_a_writer_process_every_200_is_committed_before_the_answer(process_client, db):
    def post_and_check(n):
        for i in range(10):
            payload = postback(user_id=f"proc-{n}")
            assert post(process_client, payload).json == {"status": "recorded"}
            # A connection of its own sees the row: committed, not just queued.
            assert rows(db, "SELECT count(*) FROM sessions WHERE session_id = ?",
                        (payload["session-id"],)) == [(1,)]
            assert post(process_client, payload).json == {"status": "duplicate"}

    threads = [threading.Thread(target=post_and_check, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert count(db, "sessions") == 40
    assert count(db, "conflicts") == 0  # an exact duplicate is no conflict, sent as JSON too
    assert process_client.get("/healthz").json == {"status": "ok"}


def test_with_a_writer_process_a_refusal_and_a_conflict_are_kept(process_client, db):
    bad = json.dumps(postback(your_estimated_revenue="-1")).encode()
    assert_error(process_client.post("/postback", bad, status=400), 400, "your-estimated-revenue")
    payload = postback()
    post(process_client, payload)
    assert post(process_client, {**payload, "country": "BR"}).json == {"status": "duplicate"}
    assert (count(db, "rejected"), count(db, "conflicts")) == (1, 1)


def test_closing_the_store_ends_its_writer_process(db):
    store = spp_server.Store(db, writer="process", channels=2)
    pid = store.writer.pid
    assert store.writer.alive()
    store.close()
    assert not store.writer.alive() and store.writer.exit_status() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not left behind
    with pytest.raises(spp_server.StoreUnavailable, match="shutting down"):
        store.write(spp_server.write_health_probe)


@pytest.mark.parametrize("cpus, kind", [({0}, "WriterThread"), ({0, 1}, "WriterProcess"),
                                        ({1, 2, 3}, "WriterProcess")])
def test_the_servers_writer_is_a_thread_on_one_cpu_a_process_on_more(
        db, monkeypatch, caplog, cpus, kind):
    """writer="auto", the default: decided by the CPUs this process may use
    when the store opens, and said in the log when it is the thread."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    caplog.set_level(logging.INFO, logger="spp")
    store = spp_server.Store(db)
    try:
        assert type(store.writer).__name__ == kind
        assert store.write(spp_server.write_health_probe) is None
    finally:
        store.close()
    said = "one CPU allowed: writes commit in a thread of the web process" in caplog.text
    assert said == (kind == "WriterThread")


@pytest.mark.parametrize("writer", ["processes", "", None, True])
def test_a_writer_that_is_none_of_the_four_is_refused(db, writer):
    with pytest.raises(ValueError, match="writer must be one of auto, process, thread, command"):
        spp_server.Store(db, writer=writer)
    assert not os.path.exists(db)


@EACH_WRITER
def test_the_real_server_commits_in_a_thread_on_one_cpu_and_in_a_process_on_more(
        real_server, db, cpus):
    server = real_server(db, cpus=cpus)
    assert server.post(postback())[0] == 200
    pid = server.process.pid
    one = len(cpus or os.sched_getaffinity(0)) == 1
    assert len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()) == (0 if one else 1)
    assert ("writes commit in a thread of the web process" in server.log_text()) == one
    assert server.stop() == 0
    assert count(db, "sessions") == 1


def test_a_dead_writer_process_makes_writes_unavailable_not_hang(db):
    store = spp_server.Store(db, writer="process", channels=2)
    try:
        os.kill(store.writer.pid, signal.SIGKILL)
        with pytest.raises(spp_server.StoreUnavailable, match="writer process"):
            store.write(spp_server.write_health_probe)
        assert store.health_problem()
        deadline = time.monotonic() + 10
        while store.writer.alive():  # bounded wait for the kernel to report the exit
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert store.writer.exit_status() == -signal.SIGKILL
    finally:
        store.close()


def process_runs(pid):
    """Whether pid exists and is not a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def writer_pid_of(server):
    [child] = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return int(child)


def test_real_server_stops_with_status_1_when_its_writer_process_dies(real_server, db):
    server = real_server(db)
    assert server.post(postback())[0] == 200
    os.kill(writer_pid_of(server), signal.SIGKILL)
    assert server.process.wait(15) == 1  # so that systemd restarts it (Restart=on-failure)
    assert "the writer process exited" in server.log_text()
    assert count(db, "sessions") == 1


def test_real_server_writer_process_ignores_sigterm_and_ends_after_the_drain(real_server, db):
    server = real_server(db)
    writer = writer_pid_of(server)
    os.kill(writer, signal.SIGTERM)  # systemd signals the whole control group
    assert server.post(postback())[0] == 200  # still writing
    assert server.stop(signal.SIGTERM) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(writer, 0)
    assert count(db, "sessions") == 1


def slow_write(seconds, conn, received_at_us):
    """A write op (module level, so that it reaches a writer process) that
    takes `seconds`: the behaviour under test is a write slower than its wait."""
    time.sleep(seconds)
    return "slow"


def test_a_late_answer_is_not_taken_for_the_next_writes(db, monkeypatch):
    """One channel: the first write times out, and its answer arrives while
    the second waits; the second gets its own answer, on a new channel."""
    monkeypatch.setitem(spp_server.WRITE_OPS, "slow_write", slow_write)
    store = spp_server.Store(db, busy_timeout_ms=100, writer="process", channels=1)
    try:
        [first] = store.writer._sockets
        with pytest.raises(spp_server.StoreUnavailable, match="did not answer in time"):
            store.write(functools.partial(slow_write, 1.5))  # the wait is 1.1 s
        assert first.fileno() == -1  # retired, not reused
        op = session_op(user_id="after-the-late-one")
        assert store.write(op) == "recorded"
        assert store.write(op) == "duplicate"
    finally:
        store.close()


def test_the_server_does_not_start_when_no_write_commits(fake_serve, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(spp_server.Store, "health_problem", lambda self: "the disk is full")
    with caplog.at_level(logging.ERROR, logger="spp"):
        assert spp_server.main(["--db", str(tmp_path / "spp.db")], environ={}) == 1
    assert fake_serve == []  # never served, so never told systemd it was ready
    assert "cannot write to the database" in caplog.text and "the disk is full" in caplog.text


def test_the_writer_process_ends_when_the_server_is_killed(real_server, db):
    server = real_server(db)
    writer = writer_pid_of(server)
    assert server.post(postback())[0] == 200
    server.stop(signal.SIGKILL)  # no drain: the writer must notice on its own
    deadline = time.monotonic() + 10
    while process_runs(writer):
        assert time.monotonic() < deadline, "the writer process outlived the server"
        time.sleep(0.01)  # bounded wait for it to see EOF and exit
    assert count(db, "sessions") == 1


# --- The writer process: its messages, its channels, its failures ---


def violate_a_constraint(conn, received_at_us):
    conn.execute("INSERT INTO sessions (session_id) VALUES ('no user, no revenue')")


def insert_then_raise_a_bug(user_id, conn, received_at_us):
    conn.execute("INSERT INTO sessions (session_id, user_id, revenue_nano, received_at_us, "
                 "raw_body) VALUES (?, ?, 0, ?, '{}')", (user_id, user_id, received_at_us))
    raise ValueError("a bug in the op, not a database error")


def return_what_json_cannot_hold(conn, received_at_us):
    return {"a set"}


def fail_at_commit(conn, received_at_us):
    """Leaves a deferred foreign key unmet: each statement succeeds and COMMIT
    fails (SQLite then keeps the transaction open)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS child (parent_id INTEGER "
                 "REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    conn.execute("INSERT INTO child VALUES (1)")


def closed_by_the_writer(sock):
    """Whether the other end closed (a reset when it left our bytes unread)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def request_frame(payload):
    return spp_server.FRAME.pack(len(payload)) + payload


class CreatesAFile:
    """Unpickling this creates a file: what a pickle can make its reader do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_an_unregistered_op_is_refused_before_anything_is_sent():
    for op in (lambda conn, now: None, functools.partial(os.system, "true"),
               functools.partial(spp_server.insert_rejected, "f", "r", b"x", conn=None)):
        with pytest.raises(TypeError, match="not a write op"):
            spp_server.encode_request(op)


@given(st.lists(st.one_of(st.none(), st.integers(), st.text(), st.binary(),
                          st.lists(st.one_of(st.integers(), st.text(), st.none()))), max_size=4))
def test_a_request_carries_its_arguments_exactly(args):
    op = spp_server.decode_request(
        spp_server.encode_request(functools.partial(spp_server.insert_session, *args)))
    assert op.func is spp_server.insert_session and list(op.args) == args


class ErrorOfAnotherModule(sqlite3.OperationalError):
    pass


@pytest.mark.parametrize("error, name, code", [
    (sqlite3.OperationalError("database is locked"), "OperationalError", sqlite3.SQLITE_BUSY),
    (sqlite3.OperationalError("busy, said otherwise"), "OperationalError", sqlite3.SQLITE_BUSY),
    (sqlite3.IntegrityError("NOT NULL constraint failed: sessions.user_id"), "IntegrityError",
     sqlite3.SQLITE_CONSTRAINT_NOTNULL),
    (sqlite3.OperationalError("disk I/O error"), "OperationalError", sqlite3.SQLITE_IOERR),
    (ErrorOfAnotherModule("database is full"), "Error", sqlite3.SQLITE_FULL),
])
def test_a_database_error_reaches_the_web_process_as_itself(error, name, code):
    error.sqlite_errorcode = code
    ok, value = spp_server.decode_reply(spp_server.encode_reply(False, error))
    assert not ok and type(value).__name__ == name and isinstance(value, sqlite3.Error)
    assert str(value) == str(error) and value.sqlite_errorcode == code
    assert spp_server.is_busy(value) == (code == sqlite3.SQLITE_BUSY)


def test_another_error_reaches_the_web_process_as_a_bug_naming_it():
    ok, value = spp_server.decode_reply(spp_server.encode_reply(False, KeyError("x")))
    assert not ok and type(value) is RuntimeError and str(value) == "KeyError: 'x'"
    for result in ([3, 4], "recorded", "duplicate", "conflict", None, "other"):
        assert spp_server.decode_reply(spp_server.encode_reply(True, result)) == (True, result)


def write_loop_in_thread(db, channels):
    spp_server.Store(db, writer="thread").close()  # the schema
    conn = spp_server.connect(db, 1000)
    thread = threading.Thread(target=spp_server.write_loop, args=(conn, channels))
    thread.start()
    return thread, conn


@pytest.mark.parametrize("garbage", [
    b"POST /postback HTTP/1.1\r\nHost: x\r\n\r\n",  # a length of 1.3 GB, never waited for
    request_frame(b"{not json"),
    request_frame(b"\xff\xfe"),
    request_frame(b'["system", ["touch /tmp/x"]]'),  # no such op
    request_frame(b'["insert_rejected", [{"bytes": "not base64!"}, 1, 2]]'),
    request_frame(b'{"op": "insert_session"}'),
    request_frame(b"[]"),
    request_frame(b"null"),
    request_frame(b"[" * 200_000),  # nested deeper than json's recursion allows
    request_frame(b'["insert_rejected", ' + b'{"a": ' * 60_000 + b"]"),
    spp_server.FRAME.pack(100) + b"cut short",
])
def test_a_channel_that_sends_no_request_is_dropped_and_the_others_commit(db, garbage):
    (bad, bad_end), (good, good_end) = socket.socketpair(), socket.socketpair()
    thread, conn = write_loop_in_thread(db, [bad_end, good_end])
    try:
        good.settimeout(5)
        good.sendall(request_frame(spp_server.encode_request(session_op(user_id="good"))))
        bad.sendall(garbage)  # while the good one is read or committed
        if garbage.endswith(b"cut short"):
            bad.shutdown(socket.SHUT_WR)  # the frame ends here
        assert spp_server.decode_reply(spp_server.receive_frame(good)) == (True, "recorded")
        assert closed_by_the_writer(bad)
        good.sendall(request_frame(spp_server.encode_request(session_op(user_id="next"))))
        assert spp_server.decode_reply(spp_server.receive_frame(good)) == (True, "recorded")
    finally:
        good.close()
        bad.close()
        thread.join(5)
        conn.close()
    assert not thread.is_alive()  # it ended because its channels closed, not on the garbage
    assert rows(db, "SELECT user_id FROM sessions ORDER BY id") == [("good",), ("next",)]


@given(st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.text(max_size=5), inner, max_size=4)).map(
        lambda value: json.dumps(value).encode()),
    st.integers(1, 300_000).map(lambda depth: b"[" * depth + b"]" * (depth % 3))))
@settings(max_examples=200, deadline=None, database=None)
def test_decoding_any_frame_gives_a_write_op_or_a_value_error(data):
    """What write_loop catches to drop one channel: any other exception would
    end the writer process, and every postback with it."""
    try:
        op = spp_server.decode_request(data)
    except ValueError:
        return
    assert op.func in spp_server.WRITE_OPS.values()


def test_a_pickle_sent_to_the_writer_process_is_never_unpickled(process_store, db, tmp_path):
    target = tmp_path / "created-by-unpickling"
    payload = pickle.dumps(CreatesAFile(str(target)))
    pickle.loads(pickle.dumps(CreatesAFile(str(tmp_path / "proof"))))
    assert (tmp_path / "proof").exists()  # the payload is what it claims to be
    store = process_store(channels=2)
    channel = store.writer._channels.get()
    channel.sendall(request_frame(payload))
    assert closed_by_the_writer(channel)  # this channel only
    assert not target.exists()
    assert store.write(session_op(user_id="next")) == "recorded"  # on the other channel
    assert store.writer.alive()
    store.writer._channels.put(channel)  # the dropped channel back in the pool:
    with pytest.raises(spp_server.StoreUnavailable, match="writer process"):
        store.write(session_op(user_id="on-the-dropped-channel"))  # 503 once, and replaced
    assert channel.fileno() == -1 and len(store.writer._sockets) == 2
    assert store.write(session_op(user_id="after")) == "recorded"
    assert store.write(session_op(user_id="again")) == "recorded"
    assert not target.exists()


def test_a_send_cut_short_by_its_timeout_retires_the_channel(process_store, db, monkeypatch):
    """A partial frame left in a channel would make the next request's bytes
    the end of this one: the channel must never be used again."""
    store = process_store(channels=1)
    [first] = store.writer._sockets
    send_frame = spp_server.send_frame

    def send_half_then_time_out(sock, data):
        whole = spp_server.FRAME.pack(len(data)) + data
        sock.sendall(whole[: len(whole) // 2])
        monkeypatch.setattr(spp_server, "send_frame", send_frame)  # once
        raise socket.timeout("timed out")

    monkeypatch.setattr(spp_server, "send_frame", send_half_then_time_out)
    with pytest.raises(spp_server.StoreUnavailable, match="did not answer in time"):
        store.write(session_op(user_id="cut"))
    assert first.fileno() == -1  # closed, not back in the pool
    [replacement] = store.writer._sockets
    assert replacement is not first
    for n in range(3):
        assert store.write(session_op(user_id=f"after-{n}")) == "recorded"
    assert store.writer.alive()
    assert rows(db, "SELECT user_id FROM sessions ORDER BY id") == [
        ("after-0",), ("after-1",), ("after-2",)]


def test_when_no_channel_can_be_replaced_the_writer_counts_as_lost(process_store, monkeypatch,
                                                                    caplog):
    store = process_store(channels=2)

    def refuse(*args):
        raise OSError(24, "Too many open files")

    def time_out(sock, data):
        raise socket.timeout("timed out")

    monkeypatch.setattr(spp_server.socket, "send_fds", refuse)
    monkeypatch.setattr(spp_server, "send_frame", time_out)
    with caplog.at_level(logging.ERROR, logger="spp"):
        for left in (1, 0):
            with pytest.raises(spp_server.StoreUnavailable, match="did not answer in time"):
                store.write(spp_server.write_health_probe)
            assert f"{left} left" in caplog.text
            assert store.writer.alive() == bool(left)
    assert store.writer.loss() == "no channel to the writer process is left"
    with pytest.raises(spp_server.StoreUnavailable, match="no channel"):
        store.write(spp_server.write_health_probe)
    stopping = threading.Event()
    assert spp_server.run_until({}, stopping, store.writer) is False  # the server stops


def test_a_failing_write_through_the_writer_process_fails_alone(process_store, db):
    store = process_store(channels=2)
    with pytest.raises(spp_server.StoreUnavailable, match="refused the write: NOT NULL"):
        store.write(violate_a_constraint)
    assert store.write(session_op(user_id="next")) == "recorded"
    assert rows(db, "SELECT user_id FROM sessions") == [("next",)]


def test_a_locked_database_is_a_busy_error_through_the_writer_process(process_store, db):
    store = process_store(busy_timeout_ms=100)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        ok, error = store.writer._submit(spp_server.write_health_probe, 5)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not ok and isinstance(error, sqlite3.OperationalError) and spp_server.is_busy(error)
    assert store.write(spp_server.write_health_probe) is None


def test_an_error_that_is_not_the_databases_in_the_writer_process_is_a_bug_not_a_crash(
        process_store, db):
    store = process_store(channels=2)
    with pytest.raises(RuntimeError, match="ValueError: a bug in the op"):
        store.write(functools.partial(insert_then_raise_a_bug, "half"))
    with pytest.raises(RuntimeError, match="TypeError"):
        store.write(return_what_json_cannot_hold)
    assert count(db, "sessions") == 0  # rolled back
    assert store.write(session_op(user_id="next")) == "recorded"
    assert store.writer.alive()


def outcome_of(store, op):
    try:
        return store.write(op)
    except spp_server.StoreUnavailable as exc:
        return f"raised: {exc}"


@contextlib.contextmanager
def sent_while_locked(db, calls, monkeypatch):
    """Run each of `calls` in a thread of its own while another connection
    holds the write lock; yields, once each has handed its write to the
    writer process, the list their results fill once the lock is let go."""
    sent = threading.Semaphore(0)
    send_frame = spp_server.send_frame

    def send_and_count(sock, data):
        send_frame(sock, data)
        sent.release()

    monkeypatch.setattr(spp_server, "send_frame", send_and_count)
    results = []
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    threads = [threading.Thread(target=lambda call=call: results.append(call())) for call in calls]
    try:
        for thread in threads:
            thread.start()
        for _ in calls:
            assert sent.acquire(timeout=5)
        yield results
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        for thread in threads:
            thread.join(10)


def test_the_writer_process_commits_writes_waiting_together_as_one_transaction(
        process_store, db, counting_clock, monkeypatch):
    store = process_store(channels=6)
    calls = [functools.partial(outcome_of, store, session_op(user_id=f"w{i}")) for i in range(6)]
    with sent_while_locked(db, calls, monkeypatch) as outcomes:
        pass
    assert outcomes == ["recorded"] * 6
    # The first write may have been taken alone before the others arrived;
    # all the others waited together and share one transaction.
    assert rows(db, "SELECT count(DISTINCT received_at_us) FROM sessions") in ([(1,)], [(2,)])


def test_the_writer_process_dying_while_a_postback_waits_is_a_503(process_client, db,
                                                                   monkeypatch):
    store = process_client.app.store
    post_it = functools.partial(process_client.post, "/postback", json.dumps(postback()),
                                status="*")
    with sent_while_locked(db, [post_it], monkeypatch) as answers:
        os.kill(store.writer.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not answers:  # bounded wait for the answer while the lock is still held
            assert time.monotonic() < deadline
            time.sleep(0.01)
    [res] = answers
    assert_error(res, 503)
    assert "writer process" in res.json["error"]
    assert count(db, "sessions") == 0


def test_a_commit_that_fails_fails_every_write_of_its_batch_and_the_next_one_commits(
        make_client, db):
    client = make_client()
    store = client.app.store
    outcomes = queued_writes(store, [session_op(user_id="a"), fail_at_commit,
                                     session_op(user_id="b")])
    assert all(o.startswith("raised: the database refused the write: FOREIGN KEY") for o in outcomes)
    assert count(db, "sessions") == 0  # nothing half-stored
    assert post(client, postback(user_id="next")).json == {"status": "recorded"}
    assert rows(db, "SELECT user_id FROM sessions") == [("next",)]


def test_a_commit_that_fails_in_the_writer_process_leaves_no_transaction_open(process_store, db):
    store = process_store(channels=2)
    with pytest.raises(spp_server.StoreUnavailable, match="FOREIGN KEY"):
        store.write(fail_at_commit)
    assert store.write(session_op(user_id="next")) == "recorded"
    assert count(db, "sessions") == 1


def test_closing_kills_and_reaps_a_writer_process_that_does_not_stop(db):
    spp_server.Store(db, writer="thread").close()
    writer = spp_server.WriterProcess(db, 100, 0.3, 1)
    os.kill(writer.pid, signal.SIGSTOP)  # it can no longer see its channels close
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 2 * 0.3 + 1
    assert writer.exit_status() == -signal.SIGKILL  # collected: no zombie left
    assert not process_runs(writer.pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(writer.pid, os.WNOHANG)


@pytest.mark.parametrize("open_fds, keep, released", [
    ([0, 1, 2, 3, 4, 5], {4}, [3, 5]),
    ([0, 1, 2], set(), []),
    ([2, 9, 7, 8], {7, 8}, [9]),
])
def test_the_writer_process_lets_go_of_all_but_stdio_and_its_channels(open_fds, keep, released):
    assert spp_server.descriptors_to_release(open_fds, keep) == released


class FakeDescriptors:
    """os.listdir("/proc/self/fd") and os.dup2 as the forked writer sees them,
    without touching this process's descriptors."""

    def __init__(self, monkeypatch, listing, refused=()):
        self.pointed = []  # the descriptors pointed at /dev/null
        self.devnull = set()  # what they were pointed at

        def listdir(path):
            assert path == "/proc/self/fd"
            if isinstance(listing, Exception):
                raise listing
            return [str(fd) for fd in listing]

        def dup2(fd, to):
            self.devnull.add(fd)
            if to in refused:
                raise OSError(9, "Bad file descriptor")
            self.pointed.append(to)

        monkeypatch.setattr(spp_server.os, "listdir", listdir)
        monkeypatch.setattr(spp_server.os, "dup2", dup2)


def test_a_writer_process_that_cannot_list_its_descriptors_says_so_and_goes_on(
        monkeypatch, caplog):
    fake = FakeDescriptors(monkeypatch, FileNotFoundError(2, "No such file or directory"))
    with caplog.at_level(logging.WARNING, logger="spp"):
        spp_server.release_inherited_descriptors({5})
    assert fake.pointed == []
    assert caplog.messages == ["the writer process keeps its inherited descriptors: "
                               "[Errno 2] No such file or directory"]


def test_a_descriptor_the_writer_process_cannot_release_does_not_stop_the_others(monkeypatch):
    fake = FakeDescriptors(monkeypatch, [0, 1, 2, 3, 4, 5, 6, 7], refused={4})
    spp_server.release_inherited_descriptors({6})
    assert fake.pointed == [3, 5, 7]  # not 4 (refused), 6 (kept), nor stdio
    [devnull] = fake.devnull
    with pytest.raises(OSError):
        os.fstat(devnull)  # closed once done


def socket_inodes(pid):
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return {link for link in links if link.startswith("socket:")}


def test_the_writer_process_does_not_hold_systemds_listening_socket(db, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    inode = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
    with activated_server_until_sigterm(db, listener) as process:
        assert json.loads(http_request(listener.getsockname()[1], "POST", "/postback",
                                       json.dumps(SAMPLE), timeout=15)[2]) == {"status": "recorded"}
        [writer] = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert inode in socket_inodes(process.pid)
        writer_sockets = socket_inodes(writer)
        assert inode not in writer_sockets
        # Its channels (one per request thread and the watchdog) and the control socket only.
        assert len(writer_sockets) == spp_server.DEFAULTS["threads"] + 2


class FakeAffinity:
    def __init__(self, monkeypatch, cpus, error=None):
        self.set_calls = []
        monkeypatch.setattr(spp_server.os, "sched_getaffinity", lambda pid: set(cpus))

        def setaffinity(pid, cpus):
            if error:
                raise error
            self.set_calls.append((pid, set(cpus)))

        monkeypatch.setattr(spp_server.os, "sched_setaffinity", setaffinity)


def fake_writer_process(pid=4242):
    writer = object.__new__(spp_server.WriterProcess)
    writer.pid = pid
    return writer


def test_on_several_cpus_the_web_process_keeps_to_one_and_the_writer_to_the_others(monkeypatch):
    affinity = FakeAffinity(monkeypatch, {3, 1, 2})
    spp_server.keep_to_cpus(fake_writer_process())
    assert affinity.set_calls == [(4242, {2, 3}), (0, {1})]


def test_on_one_cpu_or_with_a_writer_thread_nothing_is_pinned(monkeypatch):
    affinity = FakeAffinity(monkeypatch, {0})
    spp_server.keep_to_cpus(fake_writer_process())
    affinity = FakeAffinity(monkeypatch, {0, 1})
    spp_server.keep_to_cpus(object())
    assert affinity.set_calls == []


def test_when_pinning_is_refused_the_server_goes_on(monkeypatch, caplog):
    FakeAffinity(monkeypatch, {0, 1}, error=PermissionError(1, "Operation not permitted"))
    with caplog.at_level(logging.INFO, logger="spp"):
        spp_server.keep_to_cpus(fake_writer_process())
    assert "not keeping the web process to one CPU" in caplog.text


# ---------------------------------------------------------------------------
# The store: recording and deduplication
# ---------------------------------------------------------------------------

def test_sample_postback_is_recorded_with_every_field(client, db):
    res = post(client, SAMPLE)
    assert res.json == {"status": "recorded"}
    assert res.content_type == "application/json"
    stored = rows(
        db,
        "SELECT session_id, user_id, property_id, country, ads_viewed, duration_s, "
        "revenue_nano, raw_body FROM sessions",
    )
    assert stored == [
        (SAMPLE["session-id"], "sub1", "1234", "IN", 1, 163, 12_000, json.dumps(SAMPLE))
    ]


def test_received_at_is_the_time_of_receipt_in_utc_microseconds(client, db):
    before = time.time_ns() // 1000
    post(client, SAMPLE)
    after = time.time_ns() // 1000
    [(received,)] = rows(db, "SELECT received_at_us FROM sessions")
    assert before <= received <= after


def test_duplicate_is_answered_200_and_counted_once(client, db):
    assert post(client, SAMPLE).json == {"status": "recorded"}
    assert post(client, SAMPLE).json == {"status": "duplicate"}
    assert count(db, "sessions") == 1
    assert count(db, "conflicts") == 0
    assert earnings(client, "sub1").json["estimated-revenue"] == "0.000012"


def test_conflicting_duplicate_keeps_first_copy_and_records_both_bodies(client, db, caplog):
    caplog.set_level(logging.INFO, logger="spp")
    first = postback(your_estimated_revenue="0.5")
    second = {**first, "your-estimated-revenue": "0.7"}
    post(client, first)
    assert post(client, second).json == {"status": "duplicate"}
    assert earnings(client, "sub1").json["estimated-revenue"] == "0.5"
    assert rows(db, "SELECT session_id, stored_body, new_body FROM conflicts") == [
        (first["session-id"], json.dumps(first), json.dumps(second))
    ]
    assert any(
        r.levelno == logging.WARNING and first["session-id"] in r.getMessage()
        for r in caplog.records
    )


def test_duplicate_with_only_extra_keys_added_is_not_a_conflict(client, db):
    first = postback()
    post(client, first)
    post(client, {**first, "new-field": 1})
    assert count(db, "conflicts") == 0


def test_concurrent_duplicates_from_many_threads_store_one_row(make_client, db):
    client = make_client()
    body = json.dumps(postback()).encode()
    barrier = threading.Barrier(8)
    outcomes = []

    def send():
        own = TestApp(client.app)  # one TestApp per thread, one shared app
        barrier.wait()
        for _ in range(5):
            outcomes.append(post(own, body).json["status"])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate"] * 39 + ["recorded"]
    assert count(db, "sessions") == 1


def test_trailing_slash_works_the_same(client, db):
    res = client.post("/postback/", json.dumps(SAMPLE), status=200)
    assert res.json == {"status": "recorded"}
    assert count(db, "sessions") == 1


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_body_is_parsed_whatever_the_content_type(client, db, content_type):
    client.post(
        "/postback", json.dumps(SAMPLE), headers={"Content-Type": content_type}, status=200
    )
    assert count(db, "sessions") == 1


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_other_methods_get_405_json(client, method):
    res = getattr(client, method)("/postback", status=405)
    assert_error(res, 405)
    assert "POST" in res.headers["Allow"]


def test_unknown_path_gets_404_json(client):
    assert_error(client.get("/nowhere", status=404), 404)


def test_every_answer_is_committed_after_duplicates_and_conflicts(client, db):
    """The duplicate check reads and may write on the write connection; a
    transaction left open there would hold back the commit of later postbacks."""
    first = postback(user_id="seen")
    assert post(client, first).json == {"status": "recorded"}
    assert post(client, first).json == {"status": "duplicate"}
    assert count(db, "sessions") == 1
    assert post(client, {**first, "user-id": "changed"}).json == {"status": "duplicate"}
    assert count(db, "conflicts") == 1
    assert post(client, postback(user_id="next")).json == {"status": "recorded"}
    assert count(db, "sessions") == 2  # read by another connection, at once


# ---------------------------------------------------------------------------
# Output formats: CSV quoted for spreadsheets, NDJSON streamed
# ---------------------------------------------------------------------------

def test_export_csv_quotes_awkward_user_ids(make_client, clock):
    client = make_client(reward_share=Decimal("0.7"))
    for user in AWKWARD_IDS:
        post_at(client, clock, "2026-11-23T10:00:00Z", user_id=user)
    res = export(client, format="csv", **DAY)
    assert res.content_type == "text/csv"
    assert res.body.endswith(b"\r\n")
    table = list(csv.reader(io.StringIO(res.body.decode(), newline="")))
    assert table[0][:6] == ["user-id", "sessions", "ads-viewed", "session-duration",
                            "estimated-revenue", "rewardable-revenue"]
    assert [row[0] for row in table[1:]] == sorted(AWKWARD_IDS, key=lambda u: u.encode())
    assert all(row[1] == "1" and row[5] == "0.0000084" for row in table[1:])


def test_totals_as_csv(client, clock):
    post_at(client, clock, "2026-11-23T10:00:00Z", country="IN")
    res = client.get("/totals", params={"group-by": "day,country", "format": "csv"}, status=200)
    assert res.content_type == "text/csv"
    assert res.body.decode().splitlines() == [
        "day,country,sessions,ads-viewed,session-duration,estimated-revenue",
        "2026-11-23,IN,1,1,163,0.000012"]


def test_the_ndjson_feed_streams_without_building_a_list():
    pulled = []

    class Rows:
        def read(self, sql, params):
            return [(None, 0)]  # the cursor's row and the newest id: an empty database

        def stream(self, sql, params):
            for i in range(100_000):
                pulled.append(i)
                yield (f"s-{i}", None, None, 0, None, None, 1, i + 1, "u")

    first = next(spp_server.session_feed_stream(Rows(), "0"))
    assert first.startswith(b'{"cursor": "1-')
    assert b'"user-id": "u", "session-id": "s-0"' in first
    assert len(pulled) < 2_000  # one chunk's worth, not every session


def test_the_ledger_csv_escapes_ids_a_spreadsheet_would_run_as_formulas(client, db):
    store = client.app.store
    users = ['=HYPERLINK("http://x","y")', "+1", "-2", "@SUM(1)", "\tt", "'quoted", "plain"]
    add_sessions(store, [(user, "=p", 1000, at(0)) for user in users])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "=p", 7000)])
    spp_server.settle(store)
    escaped = {user: (user if user == "plain" else "'" + user) for user in users}
    for text in (run_text(store, 1), client.get("/ledger/runs/1?format=csv").body):
        lines = list(csv.DictReader(io.StringIO(text.decode())))
        assert sorted(line["user-id"] for line in lines) == sorted(escaped.values())
    for text in (b"".join(spp_server.settlement_output(store, 1, "csv")),
                 client.get("/ledger/settlements/1?format=csv").body):
        lines = list(csv.DictReader(io.StringIO(text.decode())))
        assert sorted(line["user-id"] for line in lines) == sorted(escaped.values())
        assert {line["property-id"] for line in lines} == {"'=p"}
    # A hold's id and reason, a balance write-off's ids: escaped the same way.
    code, out, _ = ledger_command(spp_server.run_hold, db, users[0], "--reason", "@SUM(1)")
    [line] = csv.DictReader(io.StringIO(out.decode()))
    assert (code, line["user-id"], line["reason"]) == (0, "'" + users[0], "'@SUM(1)")
    code, out, _ = ledger_command(spp_server.run_hold, db, users[0], "--reason", "@SUM(1)",
                                  "--format", "ndjson")
    assert (code, json.loads(out)["user-id"], json.loads(out)["reason"]) == (0, users[0], "@SUM(1)")
    add_sessions(store, [("+1", "=p", 10**9, at(2))])
    pay(store, at(3, 0), pay_now="0.8")
    book_rows(store, [(day_text(2), "=p", 1000)])
    spp_server.settle(store)  # '+1' owes what was paid above its final amount
    write_off_id = spp_server.write_off_balances(store, -1)
    [line] = csv.DictReader(io.StringIO(b"".join(
        spp_server.balance_write_off_output(store, write_off_id, "csv")).decode()))
    assert (line["user-id"], line["property-id"]) == ("'+1", "'=p")
    # NDJSON, for an app, has the ids exactly; one leading quote removed gives them back.
    ndjson = run_text(store, 1, "ndjson").splitlines()
    assert sorted(json.loads(line)["user-id"] for line in ndjson) == sorted(users) == sorted(
        v[1:] if v.startswith("'") else v for v in escaped.values())


# ---------------------------------------------------------------------------
# Reads for the API: user ids in paths, windows, payout export, totals, sessions, export
# ---------------------------------------------------------------------------

# Every string a postback accepts as a user id: any text but lone surrogates.
USER_IDS = st.text(st.characters(blacklist_categories=["Cs"]), max_size=spp_server.MAX_USER_ID_CHARS)


# Percent-encoded bytes that are not UTF-8: a stray byte, a cut-off sequence,
# an encoded surrogate, an overlong '/'.
NOT_UTF8 = ["%FF", "a%FFb", "%C3", "%ED%A0%80", "%C0%AF"]


# Each read endpoint (with {} for a user id) and the parameters it reads.
READ_PARAMS = {
    "/users/{}/earnings": ["since", "until", "property-id"],
    "/users/{}/sessions": ["limit", "before"],
    "/earnings": ["since", "until", "property-id", "format"],
    "/totals": ["since", "until", "group-by", "format"],
    "/reconciliation": ["since", "until", "property-id", "format", "report-utc-offset",
                        "quantile"],
    "/rejected": ["limit"],
    "/conflicts": ["limit"],
    "/stats": [],
    "/healthz": ["postbacks-within"],
    "/sessions": ["after", "limit", "format"],
    "/metrics": [],
    "/users/{}/statement": [],
    "/ledger": [],
    "/ledger/runs/{}": ["format"],
    "/ledger/settlements/{}": ["format"],
    # The web view's pages (its style sheet and icon read no parameter: None).
    "/view": ["month"],
    "/view/": ["month"],
    "/view/ledger": [],
    "/view/users": ["month", "page", "search"],
    "/view/users/{}": ["month", "before"],
    "/view/postbacks": ["outcome", "limit", "before"],
}


VALID_PARAMS = {"since": "2026-11-01", "until": "2026-11-02", "format": "csv", "limit": "5",
                "group-by": "day", "property-id": "1234", "before": "MTox",
                "report-utc-offset": "+05:30", "quantile": "0.9", "postbacks-within": "30m", "after": "1",
                "month": "2026-11", "page": "2", "search": "u", "outcome": "rejected"}


def sessions_page(client, user, status=200, **params):
    return client.get(f"/users/{quote(user, safe='')}/sessions", params=params, status=status)


def b64(text):
    return base64.urlsafe_b64encode(text.encode()).decode()


READ_URLS = ["/users/sub1/earnings", "/users/sub1/sessions", "/earnings?since=1&until=2",
             "/totals", "/stats", "/rejected", "/conflicts", "/sessions", "/sessions?format=ndjson",
             "/metrics",
             "/reconciliation?since=2026-11-01&until=2026-11-02",
             "/users/sub1/statement", "/ledger"]


@pytest.mark.parametrize(
    "user_id", ["a/b", "50%", "with space", "ユーザー", "emoji-🎮", "a+b", "?x=1&y", "trailing/",
                "line\nbreak", "\r\n", "tab\there", "nul\x00", "/earnings", "a/sessions"]
)
def test_awkward_user_ids_round_trip_when_percent_encoded(client, user_id):
    post(client, postback(user_id=user_id))
    assert earnings(client, user_id).json["user-id"] == user_id
    assert earnings(client, user_id).json["sessions"] == 1
    page = client.get(f"/users/{quote(user_id, safe='')}/sessions", status=200).json
    assert (page["user-id"], len(page["sessions"])) == (user_id, 1)


def test_every_storable_user_id_can_be_read_back(client):
    stored = {}

    @settings(max_examples=150, deadline=None, database=None)
    @given(USER_IDS)
    def check(user_id):
        post(client, postback(user_id=user_id))
        stored[user_id] = stored.get(user_id, 0) + 1
        assert earnings(client, user_id).json["sessions"] == stored[user_id]
        page = client.get(f"/users/{quote(user_id, safe='')}/sessions", status=200).json
        assert page["user-id"] == user_id and page["sessions"]

    check()


@pytest.mark.parametrize("bad", NOT_UTF8)
@pytest.mark.parametrize("route", ["earnings", "sessions"])
def test_a_user_id_that_is_not_utf8_is_a_400_never_another_users_data(client, route, bad):
    post(client, postback(user_id="ab"))
    post(client, postback(user_id=""))
    assert_error(client.get(f"/users/{bad}/{route}", status=400), 400, "user-id")


@pytest.mark.parametrize("url", ["/us%FFers/ab/earnings", "/users/ab/earn%FFings", "/stats%FF"])
def test_bytes_that_are_not_utf8_outside_a_user_id_are_a_404(client, url):
    assert_error(client.get(url, status=404), 404)


@pytest.fixture(scope="module")
def refusing_client(tmp_path_factory):
    """One app for tests of reads that it refuses: a refusal depends on the
    request alone, and these tests are many (an app each took most of their time)."""
    app = spp_server.create_app({"db": str(tmp_path_factory.mktemp("refusals") / "spp.db"),
                                 "writer": "thread"})
    yield TestApp(app)
    app.store.close()


@pytest.mark.parametrize("bad", NOT_UTF8)
@pytest.mark.parametrize("path, param", [
    (path, param) for path, params in READ_PARAMS.items() for param in params])
def test_a_parameter_that_is_not_utf8_is_a_400_naming_it(refusing_client, path, param, bad):
    others = "&".join(f"{p}={VALID_PARAMS[p]}" for p in READ_PARAMS[path] if p != param)
    url = f"{path.format('1')}?{param}={bad}&{others}"
    assert_error(refusing_client.get(url, status=400), 400, param)


def route_url(rule):
    """A path that a route rule matches, its user id `sub1`, a number 1."""
    return re.sub(r"<[^>]*>", "sub1", re.sub(r"<[^>:]*:int>", "1", rule))


def route_declarations(app):
    """{(method, rule with {} for the user id): the query parameters it declares}."""
    return {(route.method, re.sub(r"<[^>]*>", "{}", route.rule)):
            route.config.get("query_params", ("undeclared",)) for route in app.routes}


def test_every_route_declares_the_parameters_the_tests_know(client):
    assert route_declarations(client.app) == {
        **{("GET", path): tuple(params) for path, params in READ_PARAMS.items()},
        ("POST", "/postback"): None, ("POST", "/postback/"): None,
        ("GET", "/view/view.css"): None, ("GET", "/view/icon.svg"): None}


def request_route(client, route, query, status):
    url = f"{route_url(route.rule)}?{query}"
    if route.method == "POST":
        return client.post(url, json.dumps(postback()).encode(), status=status)
    client.head(url, status=status)  # a HEAD is checked as its GET is
    return client.get(url, status=status)


def read_routes(app):
    """The routes that check their parameters: all but the postback's."""
    return [route for route in app.routes if route.config["query_params"] is not None]


def test_every_route_refuses_an_unknown_or_repeated_parameter(client, db):
    """Over the app's own routes: a new route is checked without being listed."""
    checked = 0
    for route in read_routes(client.app):
        for name in ["sinse", "group_by", "Limit", "limit ", ""]:
            res = request_route(client, route, f"{quote(name)}=2026-12-02", 400)
            assert_error(res, 400, name)
            assert "not a parameter" in res.json["error"]
        for name in route.config["query_params"]:
            value = quote(VALID_PARAMS[name], safe="")
            res = request_route(client, route, f"{name}={value}&{name}={value}", 400)
            assert_error(res, 400, name)
            assert res.json["error"] == "is given more than once"
            checked += 1
    assert checked == sum(map(len, READ_PARAMS.values()))


@pytest.mark.parametrize("path", ["/postback?src=gamezop", "/postback/?a=1&a=2", "/postback?sinse=x"])
def test_a_postback_url_with_a_query_string_still_records(client, db, path):
    """The registered Postback URL may carry any query string: never a lost session."""
    res = client.post(path, json.dumps(postback(session_id="q1")).encode(), status=200)
    assert res.json == {"status": "recorded"}
    assert rows(db, "SELECT session_id FROM sessions") == [("q1",)]
    assert rows(db, "SELECT count(*) FROM rejected") == [(0,)]


def test_a_misspelt_window_never_reads_as_all_time(client, clock):
    post_at(client, clock, "2026-11-01T10:00:00Z", user_id="u")
    post_at(client, clock, "2026-12-02T10:00:00Z", user_id="u")
    assert earnings(client, "u", since="2026-12-02").json["sessions"] == 1
    assert_error(earnings(client, "u", status=400, sinse="2026-12-02"), 400, "sinse")
    assert_error(client.get("/totals?group_by=day", status=400), 400, "group_by")
    assert_error(export(client, status=400, since="2026-12-02", until="2026-12-03",
                        property_id="1234"), 400, "property_id")


@pytest.mark.parametrize("name", ["since", "until"])
def test_an_empty_window_bound_never_reads_as_all_time(client, clock, name):
    """`since=$SINCE` with the variable unset: all-time earnings, a payout of everything."""
    post_at(client, clock, "2026-11-01T10:00:00Z", user_id="u")
    checked = 0
    for route in read_routes(client.app):
        if name in route.config["query_params"]:
            other = {"since": "&until=2026-12-01", "until": "&since=2026-11-01"}[name]
            res = request_route(client, route, f"{name}={other}", 400)
            assert_error(res, 400, name)
            assert "empty" in res.json["error"] or res.json["error"] == "is required"
            checked += 1
    assert checked == 4  # /users/<id>/earnings, /earnings, /totals, /reconciliation


PARAMETER_NAMES = st.one_of(
    st.sampled_from(sorted({name for names in READ_PARAMS.values() for name in names})),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=12))


def test_any_parameter_names_are_taken_only_when_declared_and_given_once(client):
    routes = read_routes(client.app)

    @settings(max_examples=150, deadline=None, database=None)
    @given(st.sampled_from(range(len(routes))), st.lists(PARAMETER_NAMES, max_size=5))
    def check(which, names):
        route = routes[which]
        declared = route.config["query_params"]
        query = "&".join(f"{quote(name, safe='')}={quote(VALID_PARAMS.get(name, '1'), safe='')}"
                         for name in names)
        res = request_route(client, route, query, "*")
        if route.rule == "/healthz" and res.status_int == 503:  # the silence alarm, not a fault
            assert res.json["status"] == "silent" and "postbacks-within" in names
            return
        assert res.status_int < 500
        offending = {name for n, name in enumerate(names)
                     if name not in declared or name in names[:n]}
        if offending:
            assert_error(res, 400, res.json["field"])
            assert res.json["field"] in offending
        elif res.status_int >= 400:  # a value refused, or one required missing
            assert "not a parameter" not in res.json["error"]
            assert "more than once" not in res.json["error"]

    check()


def test_any_bytes_in_the_path_or_any_parameter_of_a_read_are_never_a_5xx(client):
    post(client, SAMPLE)
    fragments = st.one_of(
        st.binary(max_size=40),
        st.sampled_from([v.encode() for v in VALID_PARAMS.values()]),
        st.integers().map(lambda n: str(n).encode()),
        st.integers(min_value=0).map(lambda n: base64.urlsafe_b64encode(f"{n}:{n}".encode())),
    )

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(sorted(READ_PARAMS)), fragments,
           st.dictionaries(st.sampled_from(sorted(VALID_PARAMS)), fragments, max_size=4))
    def check(path, user_id, params):
        query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items())
        url = f"{path.format(quote(user_id, safe=''))}?{query}"
        res = client.get(url, status="*")
        assert res.status_int < 500, (url, res.body)
        if res.status_int >= 400:
            assert_error(res, res.status_int, res.json["field"])

    check()


def test_unattributed_sessions_are_kept_under_the_empty_user_id(client):
    post(client, postback(user_id=""))
    res = client.get("/users//earnings", status=200)
    assert (res.json["user-id"], res.json["sessions"]) == ("", 1)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-23T10:00:00Z",
        "2026-11-23T10:00:00.000Z",
        "2026-11-23T15:30:00+05:30",
        "2026-11-23T15:30:00 05:30",  # '+' left unencoded in a query string
        "2026-11-23T05:00:00-05:00",
        "1795428000",
    ],
)
def test_every_accepted_form_names_the_same_instant(text):
    assert spp_server.parse_instant(text) == 1795428000 * 10**6


def test_fractions_and_dates_are_read_exactly():
    assert spp_server.parse_instant("2026-11-23T15:30:00.250+05:30") == 1795428000_250000
    assert spp_server.parse_instant("2026-11-23") == 1795392000 * 10**6
    assert spp_server.parse_instant("1970-01-01T00:00:00.000001Z") == 1


@pytest.mark.parametrize(
    "bad",
    ["yesterday", "2026-13-01", "2026-02-30", "2026-11-23T10:00:00", "2026-11-23T10:00Z",
     "2026-11-23T25:00:00Z", "2026-11-23T10:00:00.1234567Z", "1e9", "-5", "1795428000.5",
     "2026-11-23T10:00:00+25:00", "٢٠٢٦-11-23"],
)
@pytest.mark.parametrize("param", ["since", "until"])
def test_unreadable_window_bound_is_a_400_naming_it(client, bad, param):
    assert_error(earnings(client, "u", status=400, **{param: bad}), 400, param)


@pytest.mark.parametrize("since, until", [("2026-11-23", "2026-11-23"),
                                          ("2026-11-24", "2026-11-23T23:59:59Z")])
def test_empty_or_backwards_window_is_a_400(client, since, until):
    assert_error(earnings(client, "u", status=400, since=since, until=until), 400, "until")


def test_window_is_half_open_on_the_receive_time(client, clock):
    post_at(client, clock, "2026-11-23T09:59:59.999999Z", user_id="u")
    post_at(client, clock, "2026-11-23T10:00:00Z", user_id="u")
    post_at(client, clock, "2026-11-23T10:59:59Z", user_id="u")
    post_at(client, clock, "2026-11-23T11:00:00Z", user_id="u")
    res = earnings(client, "u", since="2026-11-23T10:00:00Z", until="2026-11-23T11:00:00Z").json
    assert res["sessions"] == 2
    assert (res["first-received-at"], res["last-received-at"]) == (
        "2026-11-23T10:00:00Z", "2026-11-23T10:59:59Z")
    assert (res["since"], res["until"]) == ("2026-11-23T10:00:00Z", "2026-11-23T11:00:00Z")
    only_since = earnings(client, "u", since="2026-11-23T10:00:00+00:00").json
    assert (only_since["sessions"], only_since["until"]) == (3, None)


def test_consecutive_windows_count_every_session_exactly_once(client, clock):
    times = ["2026-11-22T23:59:59Z", "2026-11-23T00:00:00Z", "2026-11-23T06:00:00.5Z",
             "2026-11-23T12:00:00Z", "2026-11-23T12:00:00.000001Z", "2026-11-23T23:59:59Z"]
    for i, when in enumerate(times):
        post_at(client, clock, when, user_id="u", your_estimated_revenue=f"0.{i + 1}")
    cuts = ["2026-11-22", "2026-11-23", "2026-11-23T12:00:00Z", "2026-11-24"]
    windows = [earnings(client, "u", since=a, until=b).json for a, b in zip(cuts, cuts[1:])]
    everything = earnings(client, "u").json
    assert sum(w["sessions"] for w in windows) == everything["sessions"] == len(times)
    assert sum(Decimal(w["estimated-revenue"]) for w in windows) == Decimal(
        everything["estimated-revenue"]) == Decimal("2.1")


@pytest.mark.parametrize("path", ["/users/sub1/earnings", "/earnings", "/reconciliation"])
def test_a_property_id_filter_longer_than_any_stored_is_a_400(client, path):
    window = "since=2026-11-01&until=2026-11-02"
    res = client.get(f"{path}?{window}&property-id={'p' * 129}", status=400)
    assert_error(res, 400, "property-id")
    client.get(f"{path}?{window}&property-id={'p' * 128}", status=200)


def test_property_filter_restricts_to_one_property(client):
    post(client, postback(user_id="u", property_id="A", your_estimated_revenue="1"))
    post(client, postback(user_id="u", property_id=7, your_estimated_revenue="2"))
    assert earnings(client, "u", **{"property-id": "7"}).json["estimated-revenue"] == "2"
    assert earnings(client, "u", **{"property-id": "B"}).json["sessions"] == 0


@pytest.mark.parametrize(
    "share, revenues, rewardable",
    [
        ("0.7", ["0.000012"], "0.0000084"),
        ("0.7", ["0.000000001", "0.000000001", "0.000000001"], "0.000000002"),  # 2.1 -> 2
        ("0.5", ["0.000000003"], "0.000000001"),  # 1.5 -> 1, never up
        ("1", ["0.3", "0.1"], "0.4"),
        ("0.333333", ["1"], "0.333333"),  # at most 6 places
    ],
)
def test_reward_share_is_applied_and_rounded_down(make_client, share, revenues, rewardable):
    client = make_client(reward_share=spp_server.parse_reward_share(share))
    for amount in revenues:
        post(client, postback(user_id="u", your_estimated_revenue=amount))
    assert earnings(client, "u").json["rewardable-revenue"] == rewardable


def test_without_a_reward_share_there_is_no_rewardable_revenue(client):
    post(client, SAMPLE)
    assert "rewardable-revenue" not in earnings(client, "sub1").json


@pytest.mark.parametrize("bad", ["0", "-0.1", "1.01", "abc", "NaN", "Infinity", ""])
def test_bad_reward_share_is_refused(fake_serve, db, bad):
    with pytest.raises(SystemExit) as exited:
        spp_server.main(["--db", db], environ={"SPP_REWARD_SHARE": bad})
    assert exited.value.code == 2


def test_reward_share_comes_from_flag_or_environment(fake_serve, db):
    spp_server.main(["--db", db], environ={"SPP_REWARD_SHARE": "0.7"})
    spp_server.main(["--db", db, "--reward-share", "0.5"], environ={"SPP_REWARD_SHARE": "0.7"})
    assert [c["reward_share"] for c in fake_serve] == [Decimal("0.7"), Decimal("0.5")]


def test_export_needs_since_and_until(client):
    assert_error(export(client, status=400, since="2026-11-23"), 400, "until")
    assert_error(export(client, status=400, until="2026-11-23"), 400, "since")


def test_export_is_one_ndjson_line_per_user_ordered_and_adding_up(client, clock):
    post_at(client, clock, "2026-11-22T23:00:00Z", user_id="b")  # outside the window
    for user, amount in [("b", "0.1"), ("a", "0.2"), ("", "0.3"), ("b", "0.4"), ("c", "1")]:
        post_at(client, clock, "2026-11-23T10:00:00Z", user_id=user, your_estimated_revenue=amount)
    res = export(client, **DAY)
    assert res.content_type == "application/x-ndjson"
    lines = res.body.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["user-id"] for r in records] == ["", "a", "b", "c"]
    assert [r["sessions"] for r in records] == [1, 1, 2, 1]
    assert records[2]["estimated-revenue"] == "0.5"
    assert sum(Decimal(r["estimated-revenue"]) for r in records) == Decimal("2.0")
    assert records[0] == earnings(client, "", **DAY).json  # the same fields as per-user


def test_export_of_an_empty_window_is_empty(client):
    assert export(client, **DAY).body == b""
    assert export(client, format="csv", **DAY).body.decode().splitlines() == [
        "user-id,sessions,ads-viewed,session-duration,estimated-revenue,"
        "first-received-at,last-received-at,since,until"]


def test_export_property_filter(client, clock):
    post_at(client, clock, "2026-11-23T10:00:00Z", user_id="a", property_id="1")
    post_at(client, clock, "2026-11-23T10:00:00Z", user_id="b", property_id="2")
    lines = export(client, **{**DAY, "property-id": "2"}).body.decode().splitlines()
    assert [json.loads(line)["user-id"] for line in lines] == ["b"]


def test_export_streams_without_building_a_list_of_users():
    pulled = []

    def rows():
        for i in range(100_000):
            pulled.append(i)
            yield (f"user-{i:06d}", 1, 0, 0, 0, 12_000, 1, 1)

    chunks = spp_server.earnings_export(rows(), spp_server.Window(1, 2), None, "ndjson")
    first = next(chunks)
    assert first.startswith(b'{"user-id": "user-000000"')
    assert len(pulled) < 2_000  # one chunk's worth, not the whole window


def test_totals_group_by_day_property_and_country(client, clock):
    post_at(client, clock, "2026-11-22T23:59:59Z", property_id="1", country="IN",
            your_estimated_revenue="0.1", count_of_ads_viewed=1, session_duration=10)
    post_at(client, clock, "2026-11-23T00:00:00Z", property_id="1", country="IN",
            your_estimated_revenue="0.2", count_of_ads_viewed=2, session_duration=20)
    post_at(client, clock, "2026-11-23T12:00:00Z", property_id="2", country="US",
            your_estimated_revenue="0.3", count_of_ads_viewed=None, session_duration=30)
    post_at(client, clock, "2026-11-23T13:00:00Z", property_id="1", country=None,
            your_estimated_revenue="0.4", count_of_ads_viewed=4, session_duration=None)
    res = client.get("/totals", params={"group-by": "day,property-id"}, status=200).json
    assert res["group-by"] == ["day", "property-id"]
    assert [(t["day"], t["property-id"], t["sessions"], t["estimated-revenue"])
            for t in res["totals"]] == [
        ("2026-11-22", "1", 1, "0.1"), ("2026-11-23", "1", 2, "0.6"), ("2026-11-23", "2", 1, "0.3")]
    by_country = client.get("/totals", params={"group-by": "country", **DAY}).json["totals"]
    assert [(t["country"], t["ads-viewed"], t["session-duration"]) for t in by_country] == [
        (None, 4, 0), ("IN", 2, 20), ("US", 0, 30)]
    overall = client.get("/totals", params=DAY).json
    assert overall["totals"] == [{"sessions": 3, "ads-viewed": 6, "session-duration": 50,
                                  "estimated-revenue": "0.9"}]
    assert (overall["since"], overall["until"]) == ("2026-11-23T00:00:00Z", "2026-11-24T00:00:00Z")


@pytest.mark.parametrize("params, field", [({"group-by": "user"}, "group-by"),
                                           ({"group-by": "day,day"}, "group-by"),
                                           ({"format": "xml"}, "format"),
                                           ({"since": "x"}, "since")])
def test_totals_bad_parameters_are_400(client, params, field):
    assert_error(client.get("/totals", params=params, status=400), 400, field)


def test_conflicts_are_counted_and_listed_newest_first(client):
    first = postback(your_estimated_revenue="1")
    post(client, first)
    post(client, {**first, "your-estimated-revenue": "2"})
    post(client, {**first, "country": "US"})
    post(client, first)  # an exact copy is no conflict
    conflicts = client.get("/conflicts", params={"limit": 5}).json["conflicts"]
    assert [json.loads(c["new-body"]).get("country") for c in conflicts] == ["US", "IN"]
    assert all(c["session-id"] == first["session-id"] for c in conflicts)
    assert json.loads(conflicts[0]["stored-body"]) == first
    assert client.get("/stats").json["conflicts"] == 2
    assert len(client.get("/conflicts", params={"limit": 1}).json["conflicts"]) == 1


def test_sessions_of_a_user_newest_first_with_every_field(client, clock):
    old = post_at(client, clock, "2026-11-23T09:00:00Z", user_id="u/1", country="in",
                  your_estimated_revenue="0.5", count_of_ads_viewed=None)
    new = post_at(client, clock, "2026-11-23T10:00:00.5Z", user_id="u/1", property_id=42)
    post_at(client, clock, "2026-11-23T11:00:00Z", user_id="other")
    res = sessions_page(client, "u/1").json
    assert res["user-id"] == "u/1" and res["next"] is None
    assert res["sessions"] == [
        {"session-id": new["session-id"], "country": "IN", "count-of-ads-viewed": 1,
         "your-estimated-revenue": "0.000012", "session-duration": 163, "property-id": "42",
         "received-at": "2026-11-23T10:00:00.500000Z"},
        {"session-id": old["session-id"], "country": "IN", "count-of-ads-viewed": None,
         "your-estimated-revenue": "0.5", "session-duration": 163, "property-id": "1234",
         "received-at": "2026-11-23T09:00:00Z"},
    ]


def test_sessions_limit_defaults_to_50_and_is_bounded(client):
    for _ in range(51):
        post(client, postback(user_id="many"))
    assert len(sessions_page(client, "many").json["sessions"]) == 50
    for bad in ["0", "1001", "-1", "ten", "1.5"]:
        assert_error(sessions_page(client, "many", status=400, limit=bad), 400, "limit")
    assert len(sessions_page(client, "many", limit="1000").json["sessions"]) == 51


def feed_page(client, status=200, **params):
    return client.get("/sessions", params=params, status=status)


def feed_row_id(cursor):
    """The row id a feed cursor starts with (the part before its fingerprint)."""
    return int(cursor.partition("-")[0])


def test_the_feed_gives_every_session_of_every_user_oldest_first_with_a_cursor(client, clock):
    sent = [post_at(client, clock, f"2026-11-23T10:00:0{n}Z", user_id=f"user-{n % 3}",
                    count_of_ads_viewed=n) for n in range(7)]
    post(client, sent[0])  # a duplicate adds nothing
    first = feed_page(client, limit=3).json
    assert [(s["user-id"], s["session-id"]) for s in first["sessions"]] == [
        (b["user-id"], b["session-id"]) for b in sent[:3]]
    assert first["sessions"][0] == {
        "cursor": first["sessions"][0]["cursor"], "user-id": "user-0",
        "session-id": sent[0]["session-id"], "country": "IN", "count-of-ads-viewed": 0,
        "your-estimated-revenue": "0.000012", "session-duration": 163, "property-id": "1234",
        "received-at": "2026-11-23T10:00:00Z"}
    assert first["next"] == first["sessions"][-1]["cursor"]
    rest = feed_page(client, after=first["next"]).json
    assert [s["session-id"] for s in rest["sessions"]] == [b["session-id"] for b in sent[3:]]
    caught_up = feed_page(client, after=rest["next"]).json
    assert caught_up == {"sessions": [], "next": rest["next"]}  # poll again with the same cursor
    later = post_at(client, clock, "2026-11-23T11:00:00Z")
    assert [s["session-id"] for s in feed_page(client, after=rest["next"]).json["sessions"]] == [
        later["session-id"]]


def test_the_feed_as_ndjson_streams_all_that_follows_the_cursor(client, clock):
    for n in range(5):
        post_at(client, clock, f"2026-11-23T10:00:0{n}Z", user_id=f"u{n}")
    pages = feed_page(client, limit=2).json
    res = feed_page(client, after=pages["sessions"][0]["cursor"], format="ndjson")
    assert res.content_type == "application/x-ndjson"
    lines = [json.loads(line) for line in res.text.splitlines()]
    assert lines == feed_page(client, after=pages["sessions"][0]["cursor"], limit=1000).json["sessions"]
    assert len(lines) == 4


@pytest.mark.parametrize("params, field", [
    ({"after": "x"}, "after"), ({"after": "-1"}, "after"), ({"after": str(2**63)}, "after"),
    ({"after": "1.0"}, "after"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
    ({"format": "csv"}, "format")])
def test_bad_feed_parameters_are_a_400_naming_them(client, params, field):
    assert_error(feed_page(client, status=400, **params), 400, field)


def test_the_feed_skips_and_repeats_nothing_while_writers_run(make_client):
    """A consumer polling while postbacks commit from several threads sees
    each session exactly once, in the order the cursors give."""
    client = make_client()
    sent, seen, done = set(), [], threading.Event()

    def write(worker):
        for n in range(60):
            body = postback(user_id=f"w{worker}")
            post(client, body)
            sent.add(body["session-id"])

    def read():
        cursor = "0"
        while True:
            finished = done.is_set()  # read once more after the writers stop
            page = feed_page(client, after=cursor, limit=7).json
            seen.extend((feed_row_id(s["cursor"]), s["session-id"]) for s in page["sessions"])
            cursor = page["next"]
            if not page["sessions"]:
                if finished:
                    return
                done.wait(0.005)  # a consumer's poll interval: nothing new yet

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(15)
    done.set()
    reader.join(15)
    assert not reader.is_alive()
    assert [cursor for cursor, _ in seen] == sorted({cursor for cursor, _ in seen})  # no repeat
    assert {session_id for _, session_id in seen} == sent and len(seen) == 240  # no skip


def test_the_feed_reads_in_primary_key_order(client, db):
    plan = query_plan(db, "session_feed", {"after": 0, "limit": 10})
    assert plan == "SEARCH sessions USING INTEGER PRIMARY KEY (rowid>?)"  # no sort, no scan
    plan = query_plan(db, "feed_cursor_row", {"id": 1})  # checking a cursor: two lookups
    assert plan.count("SEARCH sessions") == 2 and "SCAN sessions" not in plan


def back_up(db, copy):
    """What the README's `sqlite3 db ".backup copy"` does: SQLite's online backup."""
    with contextlib.closing(sqlite3.connect(db)) as src, \
            contextlib.closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)


def restore(db, copy):
    """The README's Restore, with the server stopped: the copy replaces the database."""
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(db + suffix)
    shutil.copyfile(copy, db)


def consume(client, cursor="0"):
    """Read the feed from `cursor` to its end -> (session-ids, the last cursor)."""
    seen = []
    while True:
        page = feed_page(client, after=cursor, limit=2).json
        seen += [s["session-id"] for s in page["sessions"]]
        if not page["sessions"]:
            return seen, cursor
        cursor = page["next"]


def assert_cursor_gone(res):
    assert_error(res, 410, "after")
    assert "restored from a backup or replaced" in res.json["error"]
    assert "after=0" in res.json["error"]


@pytest.mark.parametrize("kept, lost, new", [(3, 3, 3), (1, 4, 2), (0, 2, 5), (5, 1, 1)])
def test_a_cursor_from_before_a_restore_is_refused_never_skips_new_sessions(
        make_client, db, tmp_path, kept, lost, new):
    client = make_client()
    for n in range(kept):
        post(client, postback(user_id=f"kept-{n}"))
    early_seen, early = consume(client)  # a consumer that stopped before the backup
    backup = str(tmp_path / "backup.db")
    back_up(db, backup)
    for n in range(lost):
        post(client, postback(user_id=f"lost-{n}"))
    seen, late = consume(client, early)  # a consumer that read what the restore loses
    assert len(early_seen + seen) == kept + lost
    client.app.store.close()
    restore(db, backup)
    client = make_client()
    # Before new sessions arrive, the cursor is beyond the newest one.
    assert_cursor_gone(feed_page(client, status=410, after=late))
    fresh = [postback(user_id=f"new-{n}") for n in range(new)]
    for body in fresh:
        post(client, body)
    # The new sessions took the lost ones' ids: the cursor names another session now, or,
    # when fewer arrived than were lost, is still beyond the newest.
    assert_cursor_gone(feed_page(client, status=410, after=late))
    assert_cursor_gone(feed_page(client, status=410, after=late, format="ndjson"))
    # A consumer from before the backup continues: nothing skipped.
    assert consume(client, early)[0] == [body["session-id"] for body in fresh]
    # What Restore tells consumers: start again, skipping the session-ids already credited.
    everything, _ = consume(client)
    credited = set(early_seen + seen)
    assert [sid for sid in everything if sid not in credited] == [b["session-id"] for b in fresh]


def test_a_cursor_from_another_database_is_refused(make_client, tmp_path):
    one = make_client(db=str(tmp_path / "one.db"))
    other = make_client(db=str(tmp_path / "other.db"))
    for client in (one, other):
        for _ in range(3):
            post(client, postback())
    for n in range(3):
        cursor = feed_page(one).json["sessions"][n]["cursor"]
        assert_cursor_gone(feed_page(other, status=410, after=cursor))
        assert feed_page(one, after=cursor).status_int == 200


@pytest.mark.parametrize("stored", [0, 1, 4])
def test_a_cursor_beyond_the_newest_session_is_refused(client, stored):
    for _ in range(stored):
        post(client, postback())
    for beyond in [stored + 1, stored + 2, 2**63 - 1]:
        res = feed_page(client, status=410, after=str(beyond))
        assert_cursor_gone(res)
        assert f"beyond the newest session ({stored})" in res.json["error"]
    assert feed_page(client, after=str(stored)).json["sessions"] == []


def test_plain_row_id_cursors_of_earlier_versions_still_work(client):
    sent = [postback()["session-id"] for _ in range(4)]
    for n, session_id in enumerate(sent):
        post(client, {**SAMPLE, "session-id": session_id})
    assert [s["session-id"] for s in feed_page(client, after="2").json["sessions"]] == sent[2:]
    caught_up = feed_page(client, after="4").json
    # Nothing new: the cursor handed back is the new kind, for the same session.
    assert caught_up["sessions"] == [] and caught_up["next"] != "4"
    assert caught_up["next"] == feed_page(client, after="3").json["sessions"][0]["cursor"]
    assert feed_page(client, after="0").json["sessions"][0]["session-id"] == sent[0]


def test_a_forged_cursor_is_refused(client):
    for _ in range(3):
        post(client, postback())
    real = feed_page(client).json["sessions"][1]["cursor"]
    row_id, fingerprint = real.split("-")
    flipped = format(int(fingerprint, 16) ^ 1, "08x")
    for forged in [f"{row_id}-{flipped}", f"1-{fingerprint}", f"3-{fingerprint}",
                   f"0-{fingerprint}", f"4-{fingerprint}"]:
        assert_cursor_gone(feed_page(client, status=410, after=forged))
    upper = [f"{row_id}-{fingerprint.upper()}"] if fingerprint != fingerprint.upper() else []
    for malformed in [*upper, f"{row_id}-{fingerprint[:-1]}",
                      f"{row_id}-{fingerprint}0", f"{row_id}-", f"-{fingerprint}",
                      f"{row_id}:{fingerprint}", f" {real}", f"+{row_id}",
                      f"{2**63}-{fingerprint}"]:
        assert_error(feed_page(client, status=400, after=malformed), 400, "after")


def test_a_session_deleted_by_hand_cannot_pass_its_id_to_another_unnoticed(client, db):
    """Nothing in the server deletes sessions; an operator may.  A new session
    then takes the deleted newest one's id: a consumer past it is told."""
    for _ in range(3):
        post(client, postback())
    _, cursor = consume(client)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM sessions WHERE id = 3")
    body = postback()
    post(client, body)
    assert rows(db, "SELECT id FROM sessions WHERE session_id = ?", (body["session-id"],)) == [(3,)]
    assert_cursor_gone(feed_page(client, status=410, after=cursor))


def test_no_code_deletes_or_replaces_a_session():
    """Ids come from max(id) + 1: deleting the newest session would let its
    id be reused.  Nothing the server or its commands run removes one."""
    code = SERVER.read_text() + spp_server.SCHEMA_PATH.read_text()
    removing = re.compile(r"(DELETE\s+FROM|REPLACE\s+INTO|DROP\s+TABLE(\s+IF\s+EXISTS)?)"
                          r"\s+sessions\b|ALTER\s+TABLE\s+sessions\b", re.IGNORECASE)
    assert not removing.search(code)
    assert re.search(r"DELETE\s+FROM\s+rejected", code)  # the pattern does find a delete


def test_any_cursor_is_answered_200_400_or_410_never_a_5xx(client):
    for _ in range(5):
        post(client, postback())
    given_out = [s["cursor"] for s in feed_page(client).json["sessions"]]
    real = dict(cursor.split("-") for cursor in given_out)
    digits = st.integers(min_value=0, max_value=2**64).map(str)
    hex8 = st.text("0123456789abcdef", min_size=8, max_size=8)
    cursors = st.one_of(
        st.sampled_from(given_out), digits, st.text(max_size=30),
        st.tuples(digits, st.one_of(hex8, st.sampled_from(sorted(real.values())))).map("-".join),
        st.tuples(st.sampled_from(sorted(real)), hex8).map("-".join))

    @settings(max_examples=300, deadline=None, database=None)
    @given(cursors, st.sampled_from(["json", "ndjson"]))
    def check(cursor, fmt):
        res = client.get("/sessions", params={"after": cursor, "format": fmt}, status="*")
        row_id, _, fingerprint = cursor.partition("-")
        if cursor in [*given_out, ""] or (
                cursor.isdigit() and cursor.isascii() and int(cursor) <= 5):
            assert res.status_int == 200
        elif re.fullmatch(r"[0-9]{1,19}(-[0-9a-f]{8})?", cursor) and int(row_id) < 2**63:
            assert_error(res, 410, "after")
            assert real.get(row_id) != fingerprint
        else:
            assert_error(res, 400, "after")

    check()


def test_keyset_pagination_is_stable_while_sessions_arrive(client, clock):
    # All at one receive time: the order must still be total (ties broken by row id).
    sent = [post_at(client, clock, "2026-11-23T10:00:00Z", user_id="p")["session-id"]
            for _ in range(7)]
    page = sessions_page(client, "p", limit=3).json
    seen = [s["session-id"] for s in page["sessions"]]
    for _ in range(3):  # newer sessions arrive between pages
        post_at(client, clock, "2026-11-23T10:00:00Z", user_id="p")
    while page["next"]:
        page = sessions_page(client, "p", limit=3, before=page["next"]).json
        seen += [s["session-id"] for s in page["sessions"]]
    assert seen == sent[::-1]


@pytest.mark.parametrize("cursor", [b64(f"{2**63}:1"), b64(f"1:{2**63}"), b64(f"{10**30}:1"),
                                    b64("-1:1"), b64(" 1:1"), b64("1:1:1"), b64("1:")])
def test_a_cursor_beyond_what_the_server_gives_out_is_a_400(client, cursor):
    assert_error(sessions_page(client, "p", status=400, before=cursor), 400, "before")


def test_the_largest_cursor_is_an_empty_page(client):
    page = sessions_page(client, "p", before=b64(f"{2**63 - 1}:{2**63 - 1}")).json
    assert page["sessions"] == [] and page["next"] is None


@pytest.mark.parametrize("cursor", ["garbage!", "bm90LWEtY3Vyc29y", "MTox", "%%%"])
def test_a_cursor_not_given_out_is_a_400(client, cursor):
    res = sessions_page(client, "p", status=400 if cursor != "MTox" else 200, before=cursor)
    if cursor != "MTox":  # "1:1" is well-formed: an empty page, not an error
        assert_error(res, 400, "before")


def test_stats_show_what_is_stored_and_what_this_process_saw(make_client, clock):
    client = make_client(postback_tokens=(b"t",))
    empty = client.get("/stats").json
    assert empty == {"sessions": 0, "rejected": 0, "conflicts": 0, "last-received-at": None,
                     "last-received-age-seconds": None,
                     "since-start": {"recorded": 0, "duplicate": 0, "rejected": 0,
                                     "too-large": 0, "unauthorized": 0, "unavailable": 0,
                                     "error": 0}}
    clock.set("2026-11-23T10:00:00Z")
    post(client, SAMPLE, status=401)
    post(client, SAMPLE, headers=bearer("t"))
    post(client, SAMPLE, headers=bearer("t"))
    post(client, b"[]", status=400, headers=bearer("t"))
    post(client, b"x" * (spp_server.MAX_BODY_BYTES + 1), status=413, headers=bearer("t"))
    clock.set("2026-11-23T10:01:30Z")
    res = client.get("/stats").json
    # since-start.rejected counts what the rejected table holds; a 413 is not kept.
    assert res == {"sessions": 1, "rejected": 1, "conflicts": 0,
                   "last-received-at": "2026-11-23T10:00:00Z", "last-received-age-seconds": 90,
                   "since-start": {"recorded": 1, "duplicate": 1, "rejected": 1,
                                   "too-large": 1, "unauthorized": 1, "unavailable": 0,
                                   "error": 0}}


def scrape(client):
    """GET /metrics parsed as Prometheus does: {sample name + labels: value}."""
    res = client.get("/metrics", status=200)
    assert res.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(res.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families.values() for s in family.samples}
    return families, samples


def test_metrics_in_the_prometheus_format_tell_what_stats_tells(make_client, clock, db):
    client = make_client(postback_tokens=(b"t",))
    families, samples = scrape(client)
    assert ("spp_last_postback_age_seconds", ()) not in samples  # nothing received yet
    clock.set("2026-11-23T10:00:00Z")
    post(client, SAMPLE, headers=bearer("t"))
    post(client, SAMPLE, headers=bearer("t"))
    post(client, postback(), headers=bearer("t"))
    post(client, b"[]", status=400, headers=bearer("t"))
    post(client, b"x" * (spp_server.MAX_BODY_BYTES + 1), status=413, headers=bearer("t"))
    post(client, SAMPLE, status=401)
    clock.set("2026-11-23T10:01:30Z")
    families, samples = scrape(client)
    assert {name: f.type for name, f in families.items()} == {
        "spp_postbacks": "counter", "spp_sessions_stored": "gauge", "spp_rejected_stored": "gauge",
        "spp_conflicts_stored": "gauge", "spp_last_postback_age_seconds": "gauge",
        "spp_write_duration_seconds": "histogram", "spp_database_size_bytes": "gauge",
        "spp_estimated_revenue_usd": "counter", "spp_ledger_pending_usd": "gauge",
        "spp_ledger_owed_usd": "gauge", **{f"spp_ledger_{name}_timestamp_seconds": "gauge" for name in (
            "last_run", "last_run_until", "last_settlement", "last_settlement_until",
            "oldest_unsettled_paid_day")}}
    assert {dict(k[1])["outcome"]: v for k, v in samples.items()
            if k[0] == "spp_postbacks_total"} == {
        "recorded": 2, "duplicate": 1, "rejected": 1, "too-large": 1, "unauthorized": 1,
        "unavailable": 0, "error": 0}
    stats = client.get("/stats").json
    assert samples[("spp_sessions_stored", ())] == stats["sessions"] == 2
    assert samples[("spp_rejected_stored", ())] == stats["rejected"] == 1
    assert samples[("spp_conflicts_stored", ())] == stats["conflicts"] == 0
    assert samples[("spp_last_postback_age_seconds", ())] == 90
    assert samples[("spp_database_size_bytes", ())] == sum(
        os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))


def metric_lines(client):
    """{sample: value text} of /metrics, exactly as written (money is exact)."""
    text = client.get("/metrics", status=200).text
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def test_estimated_revenue_is_a_counter_of_every_stored_session_exact(client, clock):
    assert metric_lines(client)["spp_estimated_revenue_usd_total"] == "0"
    post(client, postback(**{"your-estimated-revenue": "0.000012"}))
    assert metric_lines(client)["spp_estimated_revenue_usd_total"] == "0.000012"
    twice = postback(**{"your-estimated-revenue": "0.1"})
    post(client, twice)
    post(client, twice)  # a duplicate adds nothing
    post(client, postback(**{"your-estimated-revenue": "0.000000001"}))
    assert metric_lines(client)["spp_estimated_revenue_usd_total"] == "0.100012001"
    with sqlite3.connect(client.app.store.path) as conn:  # as a restored backup: fewer sessions
        conn.execute("DELETE FROM sessions WHERE id > 1")
    assert metric_lines(client)["spp_estimated_revenue_usd_total"] == "0.000012"


def test_the_revenue_counter_reads_the_covering_index_then_only_new_sessions(client, db):
    assert query_plan(db, "revenue_all", ()) == "SCAN sessions USING COVERING INDEX sessions_by_time"
    assert query_plan(db, "revenue_after", (5,)) == (
        "SEARCH sessions USING INTEGER PRIMARY KEY (rowid>?)")


def test_the_ledger_in_metrics_last_run_and_settlement_pending_owed_oldest_unsettled_day(
        client, clock):
    store = client.app.store
    lines = metric_lines(client)
    assert (lines["spp_ledger_pending_usd"], lines["spp_ledger_owed_usd"]) == ("0", "0")
    assert not [name for name in lines if "timestamp" in name]  # no run, no settlement yet
    add_sessions(store, [("a", None, 10**9, at(0)), ("b", None, 10**9, at(1)),
                         ("a", None, 10**9, at(2))])
    clock.set("2020-10-05T02:00:00Z")
    pay(store, at(2, 0), pay_now="0.5", final="0.9")  # pays days 0 and 1
    lines = metric_lines(client)
    assert lines["spp_ledger_last_run_timestamp_seconds"] == "1601863200.000000"
    assert lines["spp_ledger_last_run_until_timestamp_seconds"] == "1601683200.000000"  # Oct 3
    assert lines["spp_ledger_oldest_unsettled_paid_day_timestamp_seconds"] == "1601510400.000000"
    assert lines["spp_ledger_pending_usd"] == client.get("/ledger").json["totals"]["pending"] == "1"
    clock.set("2020-11-05T03:00:00Z")
    book_rows(store, [(day_text(0), "", 10**8)])  # day 0 booked low: a balance carried
    spp_server.settle(store)
    lines = metric_lines(client)
    assert lines["spp_ledger_last_settlement_timestamp_seconds"] == "1604545200.000000"
    assert lines["spp_ledger_last_settlement_until_timestamp_seconds"] == "1601596800.000000"
    assert lines["spp_ledger_oldest_unsettled_paid_day_timestamp_seconds"] == "1601596800.000000"
    totals = client.get("/ledger").json["totals"]
    assert (lines["spp_ledger_pending_usd"], lines["spp_ledger_owed_usd"]) == (
        totals["pending"], totals["owed"]) == ("0.5", "0.41")
    book_rows(store, [(day_text(1), "", 10**9)])
    spp_server.settle(store)
    assert "spp_ledger_oldest_unsettled_paid_day_timestamp_seconds" not in metric_lines(client)


ALERT_RULES = HERE / "docs" / "prometheus-alerts.yml"
PROMTOOL = shutil.which("promtool")


def test_the_alert_rules_name_only_metrics_the_server_gives(client):
    post(client, postback())
    store = client.app.store  # a run, a settlement, a paid day still unsettled
    add_sessions(store, [("a", None, 10**9, at(0)), ("b", None, 10**9, at(1))])
    pay(store, at(2, 0))
    book_rows(store, [(day_text(0), "", 10**9)])
    spp_server.settle(store)
    families, samples = scrape(client)
    names = {name for name, _ in samples}
    used = set(re.findall(r"\bspp_[a-z_]+", ALERT_RULES.read_text()))
    assert used and used <= names
    outcomes = set(re.findall(r'outcome(?:=|=~)"([a-z|-]+)"', ALERT_RULES.read_text()))
    assert {o for alt in outcomes for o in alt.split("|")} <= set(
        spp_server.PostbackCounters.OUTCOMES)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
@pytest.mark.parametrize("command", [["check", "rules", ALERT_RULES.name],
                                     ["test", "rules", "prometheus-alerts.test.yml"]])
def test_the_alert_rules_pass_promtool_absent_stale_fresh_and_down(command):
    """The unit tests in docs/prometheus-alerts.test.yml: the silence alert
    fires when the age is stale, and when it is absent (no session yet, the
    server down), never when it is fresh."""
    done = subprocess.run([PROMTOOL, *command], cwd=ALERT_RULES.parent, capture_output=True,
                          text=True, timeout=15)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_write_time_histogram_counts_every_committed_write(client):
    for _ in range(3):
        post(client, postback())
    post(client, b"{}", status=400)  # its refusal is a write too
    _, samples = scrape(client)
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in samples.items()
                     if name == "spp_write_duration_seconds_bucket")
    assert buckets[-1] == (float("inf"), 4) == (float("inf"), samples[
        ("spp_write_duration_seconds_count", ())])
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert 0 < samples[("spp_write_duration_seconds_sum", ())] < 60


@given(st.integers(min_value=-62_135_596_800 * 10**6, max_value=253_402_300_799 * 10**6 + 999_999))
def test_iso_utc_is_the_utc_instant_to_the_microsecond(us):
    """Any instant from year 1 to 9999 (before 1970 too): what datetime says it
    is, in ISO 8601 with a four-digit year, and read back as the same instant."""
    instant = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=us)
    text = spp_server.iso_utc(us)
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?Z", text)
    assert datetime.datetime.fromisoformat(text[:-1]) == instant
    assert spp_server.parse_instant(text) == us


def test_write_times_fall_in_the_first_bucket_that_holds_them():
    times = spp_server.WriteTimes()
    for ns in [1, 500_000, 500_001, 5_000_000_001]:
        times.add(ns)
    cumulative, count, total = times.snapshot()
    assert cumulative[:3] == [2, 3, 3] and cumulative[-1] == 3 and count == 4
    assert total == 5_001_000_003
    assert spp_server.billionths_text(total) == "5.001000003"


def test_rejected_view_lists_newest_first_with_raw_body(client, clock):
    clock.set("2026-11-23T10:00:00Z")
    post(client, b'{"session-id": ""}', status=400)
    clock.set("2026-11-23T10:05:00Z")
    post(client, b"\xff not utf-8", status=400)
    items = client.get("/rejected").json["rejected"]
    assert [(i["received-at"], i["field"], i["raw-body"]) for i in items] == [
        ("2026-11-23T10:05:00Z", None, "\\xff not utf-8"),
        ("2026-11-23T10:00:00Z", "session-id", '{"session-id": ""}')]
    assert "UTF-8" in items[0]["reason"]
    assert len(client.get("/rejected", params={"limit": 1}).json["rejected"]) == 1
    assert_error(client.get("/rejected", params={"limit": 0}, status=400), 400, "limit")


@pytest.mark.parametrize("url", READ_URLS)
def test_every_read_endpoint_needs_the_read_token(make_client, url):
    client = make_client(read_tokens=(b"reader",), postback_tokens=(b"poster",))
    for headers in [{}, bearer("poster"), bearer("reade")]:
        res = client.get(url, headers=headers, status=401)
        assert_error(res, 401)
        assert res.headers["WWW-Authenticate"].startswith("Bearer")
    client.get(url, headers=bearer("reader"), status=200)
    client.get(url, headers={"Authorization": "bearer reader"}, status=200)


def test_per_user_queries_search_the_user_index(client, db):
    window = spp_server.Window(1, 2).params("p")
    plan = query_plan(db, "user_earnings", {"user": "u", **window})
    assert "SEARCH sessions USING COVERING INDEX sessions_by_user (user_id=?" in plan
    plan = query_plan(db, "user_sessions",
                      {"user": "u", "before_at": 1, "before_id": 1, "limit": 5})
    assert plan.startswith("SEARCH sessions USING INDEX sessions_by_user (user_id=?")
    assert "TEMP B-TREE" not in plan  # the index order is the page order


@pytest.mark.parametrize("name", ["earnings_by_user", ("day", "country")])
def test_window_queries_search_the_receive_time_index(client, db, name):
    name = list(name) if isinstance(name, tuple) else name
    plan = query_plan(db, name, spp_server.Window(1, 2).params())
    assert plan.startswith("SEARCH sessions USING COVERING INDEX sessions_by_time "
                           "(received_at_us>? AND received_at_us<?)")
    assert "SCAN" not in plan


def test_no_read_parameter_error_shows_python_internals(client):
    @settings(max_examples=200, **HOSTILE_SETTINGS)
    @given(path=st.sampled_from(sorted(READ_PARAMS)), data=st.data())
    def check(path, data):
        names = READ_PARAMS[path]
        if not names:
            return
        name = data.draw(st.sampled_from(names))
        value = data.draw(st.one_of(
            NUMBER_TEXT, st.text(max_size=30), st.integers(4301, 5000).map(lambda n: "9" * n),
            st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1e-6400000",
                             "9" * 25, "-1", "0001-01-01", "9999-12-31", "+99:99"])))
        params = {**{n: VALID_PARAMS[n] for n in names}, name: value}
        res = client.get(path.format("u"), params=params, expect_errors=True)
        assert res.status_int < 500, res.text
        if res.status_int >= 400:
            assert_no_internals(res.json["error"])

    check()


@pytest.mark.parametrize("since, echoed", [
    ("0001-01-01", "0001-01-01T00:00:00Z"), ("0999-12-31T23:59:59.5Z", "0999-12-31T23:59:59.500000Z"),
    ("1969-12-31T23:00:00-01:00", "1970-01-01T00:00:00Z"), ("0", "1970-01-01T00:00:00Z"),
    ("1960-06-30T12:00:00+05:30", "1960-06-30T06:30:00Z")])
def test_a_window_before_1970_or_before_year_1000_is_echoed_in_iso_8601(client, since, echoed):
    res = client.get("/totals", params={"since": since, "until": "9999-12-31T23:59:59.999999Z"})
    assert res.json["since"] == echoed
    assert res.json["until"] == "9999-12-31T23:59:59.999999Z"
    assert datetime.datetime.fromisoformat(echoed.replace("Z", "+00:00"))  # readable as written


@pytest.mark.parametrize("param, value", [
    ("since", "0001-01-01T00:00:00+00:01"), ("until", "9999-12-31T23:59:59-00:01"),
    ("since", "0001-01-01T00:30:00+01:00")])
def test_an_instant_outside_years_1_to_9999_is_a_400_naming_it(client, param, value):
    params = {"since": "1970-01-01", "until": "2000-01-01", param: value}
    res = client.get("/totals", params=params, status=400)
    assert_error(res, 400, param)
    assert "0001-01-01T00:00:00Z" in res.json["error"]


def run_export_command(db, out=None):
    """`spp_server.py export` over all time: (exit status, output bytes)."""
    out = io.BytesIO() if out is None else out
    code = spp_server.run_export(["--db", db, "--since", "2000-01-01", "--until", "2100-01-01"],
                                 {}, out)
    return code, out.getvalue() if isinstance(out, io.BytesIO) else None


def file_state(directory):
    """Every file in `directory` with its bytes and mode: what a read must not change."""
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in Path(directory).iterdir()}


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_export_subcommand_matches_the_endpoint_byte_for_byte(make_client, clock, db):
    client = make_client(reward_share=Decimal("0.7"))
    for user in AWKWARD_IDS + ["plain"]:
        post_at(client, clock, "2026-11-23T10:00:00Z", user_id=user, property_id="9")
    for fmt in ["ndjson", "csv"]:
        http = export(client, format=fmt, **{**DAY, "property-id": "9"}).body
        out = io.BytesIO()
        code = spp_server.run_export(
            ["--db", db, "--since", DAY["since"], "--until", DAY["until"], "--format", fmt,
             "--property-id", "9"],
            {"SPP_REWARD_SHARE": "0.7"}, out)
        assert code == 0
        assert out.getvalue() == http and http.count(b"plain") == 1


def test_export_subcommand_runs_from_the_command_line(client, db):
    post(client, SAMPLE)
    out = subprocess.run(
        [sys.executable, str(SERVER), "export", "--since", "2000-01-01", "--until", "2100-01-01",
         "--db", db], capture_output=True, check=True)
    assert json.loads(out.stdout)["user-id"] == "sub1"
    bad = subprocess.run([sys.executable, str(SERVER), "export", "--since", "soon", "--until",
                          "2100-01-01", "--db", db], capture_output=True, text=True)
    assert bad.returncode == 2 and "--since" in bad.stderr
    missing = subprocess.run([sys.executable, str(SERVER), "export", "--since", "2000-01-01",
                              "--until", "2100-01-01", "--db", db + ".nope"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and not os.path.exists(db + ".nope")


def test_export_reads_a_database_it_may_not_write_and_changes_nothing(make_client, tmp_path):
    """A backup, a replica, or the service's file: read-only to this user.  As
    root (the tests' user) only an immutable file and directory stop writes."""
    folder = tmp_path / "backup"
    folder.mkdir()
    db = str(folder / "spp.db")
    client = make_client(db=db)
    post(client, SAMPLE)
    client.app.store.close()  # the last close checkpoints and removes -wal and -shm
    before = file_state(folder)
    made = chattr("+i", db, str(folder))
    if made.returncode != 0:
        pytest.skip(f"cannot make files immutable here (chattr +i): {made.stderr.strip()}")
    try:
        code, output = run_export_command(db)
    finally:
        chattr("-i", db, str(folder))
    assert code == 0
    assert json.loads(output)["user-id"] == "sub1"
    assert file_state(folder) == before


def test_export_leaves_a_live_database_as_the_server_has_it(client, db):
    post(client, SAMPLE)
    version = rows(db, "PRAGMA user_version")
    code, output = run_export_command(db)
    assert code == 0 and json.loads(output)["sessions"] == 1
    assert rows(db, "PRAGMA user_version") == version


def test_export_of_a_missing_database_creates_nothing(tmp_path, capsys):
    db = str(tmp_path / "nope.db")
    assert run_export_command(db) == (1, b"")
    one_line_error(capsys, "no database at", db)
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_database_this_user_may_not_read_is_one_line(client, db, capsys,
                                                                 monkeypatch):
    post(client, SAMPLE)
    readable = os.access
    monkeypatch.setattr(spp_server.os, "access",  # the tests run as root, whom chmod does not stop
                        lambda path, mode: False if path == db else readable(path, mode))
    assert run_export_command(db) == (1, b"")
    one_line_error(capsys, "cannot read", db, "permission denied")


@pytest.mark.parametrize("content, words", [
    (b"", ["not an spp-receiver database"]),
    (b"not a database at all" * 100, ["not an spp-receiver database", "not an SQLite file"]),
])
def test_export_of_a_file_that_is_not_our_database_is_one_line(tmp_path, capsys, content, words):
    db = tmp_path / "other.db"
    db.write_bytes(content)
    assert run_export_command(str(db)) == (1, b"")
    one_line_error(capsys, *words)
    assert db.read_bytes() == content


@pytest.mark.parametrize("offset, word", [(-1, "older"), (1, "newer")])
def test_export_refuses_another_schema_version_and_never_migrates(db, capsys, offset, word):
    version = SCHEMA_VERSIONS[-1] + offset
    conn = sqlite3.connect(db, isolation_level=None)
    spp_server.enable_wal(conn, 1)
    spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(), target=min(version, SCHEMA_VERSIONS[-1]))
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    before = Path(db).read_bytes()
    assert run_export_command(db) == (1, b"")
    one_line_error(capsys, word, str(version))
    # SQLite may add its empty -wal and -shm beside a WAL database to read it
    # safely; the database itself is untouched.
    assert Path(db).read_bytes() == before


def test_a_read_error_in_the_middle_of_an_export_is_one_line_and_status_1(
        client, db, capsys, monkeypatch):
    for user in ["a", "b"]:
        post(client, postback(user_id=user))

    def first_row_then_fail(self, sql, params=()):
        rows_ = Reads.stream(self, sql, params)
        yield next(rows_)
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(spp_server.ReadOnlyStore, "stream", first_row_then_fail)
    code, output = run_export_command(db)
    assert code == 1  # whatever was written before the error is no payout file
    one_line_error(capsys, "incomplete", "malformed")


def test_an_export_piped_into_a_reader_that_quits_ends_quietly(client, db, capsys):
    post(client, SAMPLE)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb") as out:
        assert run_export_command(db, out) == (spp_server.EXIT_OUTPUT_CLOSED, None)
    assert capsys.readouterr().err == ""


def test_export_help_tells_what_it_reads_and_accepts(capsys):
    with pytest.raises(SystemExit):
        spp_server.main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "read-only, never created" in text and "created on first start" not in text
    for form in ["ndjson", "csv", "2026-11-23T10:00:00Z", "+05:30", "unix seconds"]:
        assert form in text


# --- Every command's output is checked: a full disk, a reader that quit ---


class FullDisk:
    """An output that takes `room` bytes (or characters), then fails as a
    full disk does; with fail_flush, its flush fails too."""

    def __init__(self, room, fail_flush=False):
        self.room, self.fail_flush, self.parts = room, fail_flush, []

    def write(self, data):
        if sum(map(len, self.parts)) + len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.parts.append(data)
        return len(data)

    def flush(self):
        if self.fail_flush:
            raise OSError(28, "No space left on device")


def store_sessions(db, how_many):
    """`how_many` sessions of distinct users, written straight into the table."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.executemany(
            "INSERT INTO sessions (session_id, user_id, revenue_nano, received_at_us, raw_body) "
            "VALUES (?, ?, 1000, ?, '{}')",
            [(f"s{n}", f"user-{n:06d}-" + "x" * 200, 1_700_000_000_000_000 + n)
             for n in range(how_many)])


@pytest.mark.parametrize("room, fail_flush", [(0, False), (70_000, False), (10**9, True)])
def test_an_export_that_cannot_be_written_is_one_line_and_status_1(client, db, capsys, room,
                                                                   fail_flush):
    store_sessions(db, 400)  # about 100 KB: two writes
    out = FullDisk(room, fail_flush)
    assert run_export_command(db, out)[0] == 1
    one_line_error(capsys, "writing the output failed", "incomplete", "No space left on device")


@pytest.mark.parametrize("fail_flush", [False, True])
def test_a_reconciliation_that_cannot_be_written_is_one_line_and_status_1(client, db, capsys,
                                                                          fail_flush):
    out = FullDisk(0 if not fail_flush else 10**9, fail_flush)
    assert spp_server.run_reconcile(["--db", db, "--since", "2026-11-01", "--until", "2026-11-08"],
                                    {}, out) == 1
    one_line_error(capsys, "incomplete", "No space left on device")


@pytest.mark.parametrize("fail_flush", [False, True])
def test_an_import_whose_summary_cannot_be_written_says_it_is_committed(
        client, db, tmp_path, capsys, fail_flush):
    (tmp_path / "r.csv").write_text("date,revenue\n2026-11-01,1\n")
    out = FullDisk(0 if not fail_flush else 10**9, fail_flush)
    code = spp_server.run_import_booked([str(tmp_path / "r.csv"), "--db", db], {}, out)
    assert code == spp_server.EXIT_COMMITTED_OUTPUT_LOST != 1
    one_line_error(capsys, "r.csv is imported (committed)", "No space left on device")
    assert rows(db, "SELECT revenue_nano FROM booked_revenue") == [(10**9,)]


def test_a_prune_whose_report_cannot_be_written_finishes_and_says_it_is_committed(
        client, clock, db, capsys):
    post_at(client, clock, "2026-11-01T00:00:00Z")
    post(client, b"x", status=400)
    args = ["--raw-bodies-before", "2027-01-01", "--rejected-before", "2027-01-01"]
    code = spp_server.run_prune(["--db", db, *args], {}, FullDisk(0))
    assert code == spp_server.EXIT_COMMITTED_OUTPUT_LOST
    one_line_error(capsys, "the pruning is committed", "No space left on device")
    # Both asked for, although the first line of the report already failed.
    assert rows(db, "SELECT raw_body FROM sessions") == [("",)] and count(db, "rejected") == 0
    code = spp_server.run_prune(["--db", db, *args, "--dry-run"], {}, FullDisk(10))
    assert code == 1  # a dry run changed nothing: its report is merely incomplete
    one_line_error(capsys, "incomplete", "No space left on device")


COMMITTED = spp_server.EXIT_COMMITTED_OUTPUT_LOST
CLOSED = spp_server.EXIT_OUTPUT_CLOSED


@pytest.mark.parametrize("command, status_full, status_closed", [
    ("export", 1, CLOSED), ("reconcile", 1, CLOSED), ("import-booked", COMMITTED, COMMITTED),
    ("prune", COMMITTED, COMMITTED), ("prune --dry-run", 1, CLOSED), ("--help", 1, CLOSED),
    ("export --help", 1, CLOSED), ("pay", COMMITTED, COMMITTED), ("statement", 1, CLOSED),
    ("ledger", 1, CLOSED)])
@pytest.mark.parametrize("output", ["/dev/full", "closed pipe"])
def test_every_command_on_a_full_disk_or_a_closed_pipe_is_one_line_at_most_and_not_0(
        command_lines, command, status_full, status_closed, output):
    """As `... > /dev/full` and `... | head` give it a real process: also the
    interpreter's own flush of stdout at exit must not fail with a traceback."""
    if output == "/dev/full":
        target, expected = open("/dev/full", "wb"), status_full
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)
        target, expected = open(write_end, "wb"), status_closed
    # Without PYTHONUNBUFFERED, as a shell runs it: stdout buffered, so the
    # write that fails may be a flush, and the line must still name the command.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with target:
        result = subprocess.run([sys.executable, str(SERVER), *command_lines[command]], env=env,
                                stdout=target, stderr=subprocess.PIPE, text=True, timeout=30)
    assert result.returncode == expected, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    if expected == CLOSED:
        assert result.stderr == ""  # the reader quit: nothing went wrong here
    else:
        assert result.stderr.count("\n") == 1, result.stderr
        name = command.split()[0]
        assert result.stderr.startswith("spp_server.py: " if name.startswith("-")
                                        else f"spp_server.py {name}: "), result.stderr
        assert ("No space left on device" if output == "/dev/full" else "Broken pipe") in result.stderr
        assert ("committed" in result.stderr) == (expected == COMMITTED)


@pytest.mark.parametrize("command", list(spp_server.COMMANDS))
def test_every_command_whose_output_cannot_be_written_says_so_in_one_line_of_one_shape(
        client, tmp_path, db, command):
    """Every command in COMMANDS, on a full disk: its last line names the
    command and the error, and the status says whether a change is
    committed behind the lost output (3) or not (1)."""
    post(client, SAMPLE)
    argv = command_argv(command, db, tmp_path)
    if command == "release":  # a user held first, so that there is one to release
        assert run_command("hold", argv, io.BytesIO())[0] == 0
    status, err = run_command(command, argv, FullDisk(0, fail_flush=True))  # even no output
    *notes, line = err.splitlines()
    prog = f"spp_server.py {command}: "
    assert all(note.startswith(prog) for note in notes) and len(notes) <= 1, err
    if status == COMMITTED:
        assert re.fullmatch(re.escape(prog) + r".*\bcommitted\b.*, but writing its output "
                            "failed: No space left on device", line), line
    else:
        assert (status, line) == (1, prog + "writing the output failed, it is incomplete: "
                                  "No space left on device")


def every_parser():
    """Each parser of the module (the server's and each command's), built."""
    parsers = []
    for name, builder in vars(spp_server).items():
        if not re.fullmatch(r"build_\w*parser", name):
            continue
        if len(inspect.signature(builder).parameters) == 1:
            parsers.append(builder({}))
        else:  # one builder for several commands (hold, release): each it builds
            for command in spp_server.COMMANDS:
                with contextlib.suppress(KeyError):
                    parsers.append(builder({}, command))
    return parsers


def test_every_command_has_a_parser_named_after_it():
    progs = sorted(parser.prog for parser in every_parser())
    assert progs == sorted(["spp_server.py", *(f"spp_server.py {c}" for c in spp_server.COMMANDS)])


@pytest.mark.parametrize("parser", every_parser(), ids=lambda parser: parser.prog)
def test_help_that_cannot_be_written_names_its_command_even_when_only_the_flush_fails(
        parser, capsys):
    """A help shorter than the buffer is written without error; only the
    flush meets the full disk, and must not leave it to the interpreter's
    exit, whose error could not say which command's output was lost."""
    with open("/dev/full", "w") as full:  # buffered, as a shell's > /dev/full
        with pytest.raises(SystemExit) as exited:
            parser.print_help(full)
    assert exited.value.code == 1
    assert capsys.readouterr().err == (f"{parser.prog}: writing the output failed, it is "
                                       "incomplete: No space left on device\n")


@pytest.mark.parametrize("command, status", [
    ("export", 1), ("reconcile", 1), ("import-booked", COMMITTED), ("prune", COMMITTED),
    ("prune --dry-run", 1), ("--help", 1), ("pay", COMMITTED), ("ledger", 1)])
@pytest.mark.parametrize("stderr", ["/dev/full", "closed"])
def test_the_exit_status_tells_the_truth_when_stderr_cannot_either(command_lines, db, command,
                                                                  status, stderr):
    """Both outputs on a full disk (2>&1 >/dev/full into the same file
    system): the line saying the change is committed cannot be written, so
    the status is all that says it; a failed print was a traceback and 1.
    With stderr closed, print(file=None) would write the line to stdout."""
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, str(SERVER), *command_lines[command]], stdout=full,
            stderr=full if stderr == "/dev/full" else subprocess.DEVNULL,
            preexec_fn=(lambda: os.close(2)) if stderr == "closed" else None, timeout=30)
    assert result.returncode == status
    if command == "import-booked":
        assert count(db, "booked_revenue") == 1


def test_a_command_started_with_stdout_closed_does_nothing_and_says_so(command_lines, db):
    result = subprocess.run([sys.executable, str(SERVER), *command_lines["import-booked"]],
                            preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True,
                            timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "stdout is closed" in result.stderr
    assert count(db, "booked_revenue") == 0


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["prune", "--help"]])
def test_help_with_stdout_closed_says_so_without_a_traceback(argv):
    """The server's own --help runs no command, so it met the closed stdout
    inside argparse: an AttributeError traceback."""
    result = subprocess.run([sys.executable, str(SERVER), *argv], preexec_fn=lambda: os.close(1),
                            stderr=subprocess.PIPE, text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "stdout is closed" in result.stderr


EVERY_OUTPUT_COMMAND = ["export", "reconcile", "import-booked", "prune", "prune --dry-run",
                        "--help", "export --help", "pay", "settle", "statement", "ledger"]


@pytest.mark.parametrize("command", EVERY_OUTPUT_COMMAND)
def test_every_command_whose_output_the_disk_takes_only_part_of_fails_loudly(
        command_lines, nearly_full_output, command):
    """A short write is an error, not a short file with status 0: CPython's
    buffered stdout returned the short count and nothing raised."""
    with open(nearly_full_output, "ab") as target:
        result = subprocess.run([sys.executable, str(SERVER), *command_lines[command]],
                                stdout=target, stderr=subprocess.PIPE, text=True, timeout=30)
    assert result.returncode in (1, COMMITTED), result.stderr
    said = result.stderr.splitlines()  # settle also says there is nothing to settle
    assert len(said) == 1 + (command == "settle") and "No space left on device" in said[-1]
    assert "Traceback" not in result.stderr
    assert nearly_full_output.stat().st_size == 256 * 1024  # it did take the 16 bytes


@pytest.mark.parametrize("argv_of", [
    lambda lines: lines["settle"],  # nothing to settle
    lambda lines: [*lines["pay"][:-1], "2"],  # a refused share
    lambda lines: [*lines["pay"][:3], "--until", "soon", *lines["pay"][5:]],  # a refused --until
    lambda lines: ["export", "--db", "/nonexistent/spp.db", *lines["export"][3:]],
    lambda lines: ["import-booked", "/nonexistent.csv", *lines["import-booked"][2:]],
], ids=["settle-nothing", "pay-share", "pay-until", "export-no-db", "import-no-file"])
def test_with_stderr_closed_a_command_writes_nothing_meant_for_stderr_to_stdout(
        command_lines, argv_of):
    """`settle > lines.csv 2>&-` wrote 'nothing to settle' into the CSV:
    every command says things on stderr one way, which a closed stderr drops."""
    argv = argv_of(command_lines)
    said = subprocess.run([sys.executable, str(SERVER), *argv], capture_output=True, timeout=30)
    assert said.stderr  # there is something for stderr in each case
    closed = subprocess.run([sys.executable, str(SERVER), *argv], stdout=subprocess.PIPE,
                            preexec_fn=lambda: os.close(2), timeout=30)
    assert closed.stdout == said.stdout and closed.returncode == said.returncode


# --- Read-only access: a backup read by a user who may not write it ---


NOBODY = 65534


def as_nobody(*argv):
    """argv run as the user nobody (the tests run as root, whom file
    permissions do not stop); as another user, as that user."""
    if os.getuid() != 0:
        return list(argv)
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run a command as nobody")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def make_backup(make_client, folder, live=False):
    """A database in `folder`, readable by all; closed (so checkpointed, no
    -wal) unless `live`.  -> its path."""
    folder.mkdir()
    db = folder / "spp.db"
    client = make_client(db=str(db))
    post(client, SAMPLE)
    if not live:
        client.app.store.close()
    db.chmod(0o644)
    return db


def writable_by_the_reader(folder, writable):
    if os.getuid() == 0:
        if writable:
            os.chown(folder, NOBODY, NOBODY)
        folder.chmod(0o755)  # owned by root: nobody may not write in it
    else:
        folder.chmod(0o755 if writable else 0o555)


@pytest.mark.parametrize("command", ["export", "reconcile"])
@pytest.mark.parametrize("writable", [False, True])
def test_a_non_root_user_reads_a_backup_and_leaves_no_file_behind(
        make_client, shared_dir, nobody_spp, command, writable):
    folder = shared_dir / "backup"
    db = make_backup(make_client, folder)
    writable_by_the_reader(folder, writable)
    before = file_state(folder)
    result = subprocess.run(
        nobody_spp(command, "--db", str(db), "--since", "2000-01-01", "--until", "2100-01-01"),
        capture_output=True, text=True, cwd=shared_dir,
        timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "sub1" in result.stdout or command == "reconcile"
    assert file_state(folder) == before  # no -wal or -shm, nothing owned by the reader
    assert {p.stat().st_uid for p in folder.iterdir()} == {os.getuid()}


def test_a_copy_whose_wal_cannot_be_read_without_a_shm_says_why(make_client, shared_dir,
                                                                nobody_spp):
    """A copy taken while the server ran: its -wal holds transactions, which
    SQLite reads only through a -shm that this user cannot create here."""
    live = make_backup(make_client, shared_dir / "live", live=True)
    folder = shared_dir / "copy"
    folder.mkdir()
    for suffix in ["", "-wal"]:
        shutil.copy(f"{live}{suffix}", folder / f"spp.db{suffix}")
        (folder / f"spp.db{suffix}").chmod(0o644)
    assert (folder / "spp.db-wal").stat().st_size > 0
    writable_by_the_reader(folder, writable=False)
    before = file_state(folder)
    result = subprocess.run(
        nobody_spp("export", "--db", str(folder / "spp.db"),
                   "--since", "2000-01-01", "--until", "2100-01-01"),
        capture_output=True, text=True, cwd=shared_dir, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "-wal" in result.stderr and "-shm" in result.stderr
    assert file_state(folder) == before


@pytest.mark.parametrize("command", [
    ["export", "--since", "2000-01-01", "--until", "2100-01-01"],
    ["reconcile", "--since", "2000-01-01", "--until", "2100-01-01"],
    ["prune", "--raw-bodies-before", "2000-01-01", "--dry-run"],
    ["prune", "--rejected-before", "2000-01-01"],
    ["import-booked", "booked.csv"],
])
def test_a_database_in_a_folder_the_user_may_not_enter_is_not_called_missing(
        make_client, shared_dir, nobody_spp, command):
    """/var/backups/spp is root's, mode 0700: its backups are there, just not
    for this user, and the message must say so rather than "no database"."""
    (shared_dir / "booked.csv").write_text("date,revenue\n2026-11-01,1\n")
    (shared_dir / "booked.csv").chmod(0o644)
    db = make_backup(make_client, shared_dir / "backups")
    (shared_dir / "backups").chmod(0o700)
    result = subprocess.run(nobody_spp(*command, "--db", str(db)),
                            capture_output=True, text=True, cwd=shared_dir, timeout=30)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"cannot read {db}: permission denied" in result.stderr
    assert "no database" not in result.stderr


def test_a_backup_that_changes_while_it_is_read_is_no_report(make_client, tmp_path, monkeypatch,
                                                             capsys):
    """Read with immutable=1 (no -wal), the file must not change under the
    reader: a server started on it and checkpointing is caught."""
    db = make_backup(make_client, tmp_path / "backup")
    store_sessions(str(db), 3)  # the last connection's close checkpoints and removes the -wal
    assert not os.path.exists(f"{db}-wal")

    def first_row_then_a_server_writes(self, sql, params=()):
        rows_ = Reads.stream(self, sql, params)
        yield next(rows_)
        store = spp_server.Store(str(db), writer="thread")
        store.write(spp_server.write_health_probe)
        store.close()  # the last connection checkpoints into the file
        yield from rows_

    monkeypatch.setattr(spp_server.ReadOnlyStore, "stream", first_row_then_a_server_writes)
    assert run_export_command(str(db))[0] == 1
    one_line_error(capsys, "changed while it was read", "run it again")


# ---------------------------------------------------------------------------
# Booked revenue: reports imported, in steps, never half seen
# ---------------------------------------------------------------------------

def parse_booked(text, metric="revenue"):
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return spp_server.parse_booked_report(data, metric)


def book(client, text, source="report.csv"):
    """Import a report (CSV or JSON text) into the client's database."""
    return spp_server.import_booked(client.app.store, parse_booked(text), source)


def recon(client, status=200, **params):
    params = {k.replace("_", "-"): v for k, v in params.items()}
    return client.get("/reconciliation", params=params, status=status)


def booked_csv(*rows, header="date,property-id,country,revenue"):
    return "\n".join([header, *(",".join(row) for row in rows)]) + "\n"


def days_of(res):
    return [{k: v for k, v in d.items() if v is not None} for d in res.json["days"]]


NOV = {"since": "2026-11-01", "until": "2026-11-08"}


def import_file(tmp_path, db, text, name="report.csv", metric=None):
    """Run `import-booked` in-process: (exit code, stdout, stderr)."""
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    out = io.StringIO()
    argv = [str(path), "--db", db, *(["--metric", metric] if metric else [])]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = spp_server.run_import_booked(argv, {}, out)
    return code, out.getvalue(), err.getvalue()


def post_day(client, clock, when, *revenues, **fields):
    for amount in revenues:
        post_at(client, clock, when, your_estimated_revenue=amount, **fields)


# Seven days, each estimated at 1 USD: the share each day would have allowed.
BOOKED_WEEK = ["0.95", "0.9", "0.879", "0.99", "1.2", "0.93", "0.96"]


def book_week(client, clock, booked=BOOKED_WEEK):
    for i, amount in enumerate(booked):
        post_day(client, clock, f"2026-11-0{i + 1}T10:00:00Z", "1")
    book(client, "date,revenue\n" + "".join(
        f"2026-11-0{i + 1},{amount}\n" for i, amount in enumerate(booked)))


def itertools_chain(pairs):
    return [item for pair in pairs for item in pair]


def test_csv_header_names_match_whatever_the_spelling_and_a_bom_is_skipped():
    text = ("\ufeffDate,Property ID,COUNTRY,Total_Revenue,Revenue,Impressions\r\n"
            "2026-11-01,1234,in,9.5,0.6,1000\r\n"
            "2026-11-02,,,1,0.000000001,5\r\n")
    assert parse_booked(text) == [
        spp_server.BookedRow("2026-11-01", "1234", "IN", 600_000_000),
        spp_server.BookedRow("2026-11-02", "", "", 1)]
    by_total = parse_booked(text, metric="total revenue")
    assert [r.revenue_nano for r in by_total] == [9_500_000_000, 1_000_000_000]


def test_json_reports_are_read_as_exact_decimals_in_both_shapes():
    rows = ('[{"date": "2026-11-01", "property-id": 1234, "country": "in", "revenue": 0.1,'
            ' "impressions": 7, "ecpm": 14.285714285714286},'
            ' {"Date": "2026-11-02", "property_id": "5678", "revenue": "0.000000001"},'
            ' {"date": "2026-11-03", "revenue": 3},'
            ' {"date": "2026-11-04", "revenue": 1.5e-7}]')
    expected = [spp_server.BookedRow("2026-11-01", "1234", "IN", 100_000_000),
                spp_server.BookedRow("2026-11-02", "5678", "", 1),
                spp_server.BookedRow("2026-11-03", "", "", 3_000_000_000),
                spp_server.BookedRow("2026-11-04", "", "", 150)]
    assert parse_booked(rows) == expected
    assert parse_booked('{"status": "ok", "data": {"ad_revenue": %s}}' % rows) == expected


@pytest.mark.parametrize("text, message", [
    (booked_csv(("2026-11-01", "1", "IN", "1"), ("2026-02-30", "1", "IN", "1")), "line 3, date"),
    (booked_csv(("2026-11-01", "1", "IN", "1"), ("01/11/2026", "1", "IN", "1")), "line 3, date"),
    (booked_csv(("2026-11-01", "1", "IN", "-0.01")), "line 2, revenue: must not be negative"),
    (booked_csv(("2026-11-01", "1", "IN", "$5")), "line 2, revenue: must be a decimal"),
    (booked_csv(("2026-11-01", "1", "IN", "1000000")), "line 2, revenue: must be below"),
    (booked_csv(("2026-11-01", "1", "IN", "")), "line 2, revenue: is required"),
    (booked_csv(("", "1", "IN", "1")), "line 2, date: is required"),
    (booked_csv(("2026-11-01", "1", "IND", "1")), "line 2, country"),
    (booked_csv(("2026-11-01", "p" * 129, "IN", "1")), "line 2, property-id"),
    (booked_csv(("2026-11-01", "1", "IN", "1", "extra")), "line 2: 5 fields, but the header"),
    # Line numbers are physical lines: a quoted field may span two, blank lines count.
    ('date,property-id,revenue\n2026-11-01,"two\nlines",1\n\n2026-11-02,1,x\n', "line 5, revenue"),
    (booked_csv(("2026-11-01", "1", "IN", "1"), ("2026-11-02", "1", "IN", "1"),
                ("2026-11-01", "1", "in", "2")),
     "line 4: the same date, property-id and country as line 2"),
    ('[{"date": "2026-11-01", "revenue": "1"}, {"date": "2026-11-01", "revenue": "2"}]',
     "[1]: the same date, property-id and country as [0]"),
    ('{"data": {"ad_revenue": [{"date": "2026-11-01", "revenue": true}]}}',
     "data.ad_revenue[0], revenue"),
    ('[{"date": "2026-11-01", "revenue": "1"}, ["2026-11-02", "1"]]', "[1]: is not an object"),
    ('[{"date": 20261101, "revenue": "1"}]', "[0], date"),
    ('[{"date": "2026-11-01", "revenue": "1", "property-id": 1.5}]', "[0], property-id"),
    ('[{"date": "2026-11-01", "revenue": "1", "country": 12}]', "[0], country"),
    ('[{"date": "2026-11-01", "revenue": NaN}]', "is not valid JSON"),
    ('[{"date": "2026-11-01", "revenue": "1"}', "is not valid JSON"),
    ('{"error": "unauthorized"}', "is JSON but not a report"),
    ('{"data": {"ad_revenue": {"date": "2026-11-01"}}}', "is JSON but not a report"),
    ("42", "the header has no 'date' column"),
    ('[]', "holds no rows"),
    ('{"data": {"ad_revenue": []}}', "holds no rows"),
    ("date,revenue\n", "holds no rows"),
    (",,\n,,\n", "holds no header row"),
    ("", "is empty"),
    ("\ufeff \n", "is empty"),
    (b"date,revenue\n2026-11-01,\xff1\n", "is not UTF-8"),
    ("Date,Amount\n2026-11-01,1\n", "the header has no 'revenue' column (it has: 'Date', 'Amount')"),
    ("date;revenue\n2026-11-01;1\n", "the header has no 'date' column"),
    ("Revenue,date,revenue\n1,2026-11-01,1\n", "columns 'Revenue' and 'revenue' both mean"),
    ('[{"date": "2026-11-01", "revenue": "1", "Revenue": "2"}]', "columns 'revenue' and 'Revenue'"),
    ("date,revenue\n2026-11-01," + "1" * 200_000 + "\n", "line 2: not readable as CSV"),
])
def test_a_bad_report_is_refused_naming_the_line_or_row_and_field(text, message):
    with pytest.raises(spp_server.BookedFileError) as refused:
        parse_booked(text)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_reimport_replaces_changed_rows_and_counts_new_replaced_unchanged(
        client, db, tmp_path, clock):
    clock.set("2026-11-10T08:00:00Z")
    first = booked_csv(("2026-11-01", "1", "IN", "0.5"), ("2026-11-01", "1", "US", "0.25"),
                       ("2026-11-02", "1", "IN", "1"))
    code, out, _ = import_file(tmp_path, db, first, name="october.csv")
    assert code == 0 and out.endswith(
        ": 3 rows for 2 days (1 property): 3 new, 0 replaced, 0 unchanged, 0 removed\n")
    clock.set("2026-11-11T08:00:00.5Z")
    revised = booked_csv(("2026-11-01", "1", "IN", "0.5"), ("2026-11-01", "1", "US", "0.3"),
                         ("2026-11-03", "1", "IN", "2"))
    code, out, _ = import_file(tmp_path, db, revised, name="revised.json.csv")
    # It covers 2026-11-01 and 2026-11-03 only: 2026-11-02 stays as it was.
    assert code == 0 and out.endswith(
        ": 3 rows for 2 days (1 property): 1 new, 1 replaced, 1 unchanged, 0 removed\n")
    assert rows(db, "SELECT day, property_id, country, revenue_nano, imported_at_us, source_file "
                    "FROM booked_revenue ORDER BY 1, 2, 3") == [
        ("2026-11-01", "1", "IN", 500_000_000, clock.us - 86_400_500_000, "october.csv"),
        ("2026-11-01", "1", "US", 300_000_000, clock.us, "revised.json.csv"),
        ("2026-11-02", "1", "IN", 1_000_000_000, clock.us - 86_400_500_000, "october.csv"),
        ("2026-11-03", "1", "IN", 2_000_000_000, clock.us, "revised.json.csv")]


def test_a_report_without_breakdowns_is_stored_once_however_often_imported(client, db, tmp_path):
    for _ in range(2):
        assert import_file(tmp_path, db, "date,revenue\n2026-11-01,1\n")[0] == 0
    assert rows(db, "SELECT property_id, country FROM booked_revenue") == [("", "")]


def test_one_bad_row_imports_nothing(client, db, tmp_path):
    assert import_file(tmp_path, db, booked_csv(("2026-11-01", "1", "IN", "1")))[0] == 0
    bad = booked_csv(("2026-11-01", "1", "IN", "2"), ("2026-11-02", "1", "IN", "2"),
                     ("2026-11-03", "1", "IN", "two"))
    code, out, err = import_file(tmp_path, db, bad)
    assert (code, out) == (1, "")
    assert err.endswith("report.csv: line 4, revenue: must be a decimal number such as "
                        '"0.000012"; nothing imported\n') and err.count("\n") == 1
    assert rows(db, "SELECT day, revenue_nano FROM booked_revenue") == [("2026-11-01", 10**9)]


def test_a_failed_write_imports_nothing(client, db):
    rows_in = parse_booked(booked_csv(("2026-11-01", "1", "IN", "1"), ("2026-11-02", "1", "IN", "1")))
    broken = [*rows_in, spp_server.BookedRow("2026-11-03", "1", "IN", -1)]  # the CHECK refuses it
    with pytest.raises(spp_server.StoreUnavailable):
        spp_server.import_booked(client.app.store, broken, "x.csv")
    assert count(db, "booked_revenue") == 0


def test_metric_option_picks_the_column(client, db, tmp_path):
    text = "date,revenue,Total-Revenue\n2026-11-01,1,2\n"
    assert import_file(tmp_path, db, text, metric="total_revenue")[0] == 0
    assert rows(db, "SELECT revenue_nano FROM booked_revenue") == [(2 * 10**9,)]
    code, _, err = import_file(tmp_path, db, text, metric="net")
    assert code == 1 and "no 'net' column" in err


def test_import_command_errors_are_one_line_without_a_traceback(client, db, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(SERVER), "import-booked", *args],
                              capture_output=True, text=True)

    (tmp_path / "bad.json").write_text('{"message": "Forbidden"}')
    (tmp_path / "good.csv").write_text("date,revenue\n2026-11-01,1\n")
    for result, words in [(run(str(tmp_path / "missing.csv"), "--db", db), "cannot read"),
                          (run(str(tmp_path / "bad.json"), "--db", db), "keys: message"),
                          (run(str(tmp_path / "good.csv"), "--db", db + ".nope"), "no database")]:
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and words in result.stderr
        assert "Traceback" not in result.stderr
    assert not os.path.exists(db + ".nope")
    ok = run(str(tmp_path / "good.csv"), "--db", db)
    assert ok.returncode == 0 and "1 new" in ok.stdout


@pytest.mark.parametrize("metric", ["", " ", "date", "Property_ID", "COUNTRY"])
def test_a_metric_that_names_no_revenue_column_is_a_usage_error(client, db, tmp_path, capsys,
                                                                 metric):
    """--metric date read the dates as revenue ('line 2, date: must be a decimal')."""
    (tmp_path / "r.csv").write_text("date,revenue\n2026-11-01,1\n")
    with pytest.raises(SystemExit) as exited:
        spp_server.run_import_booked([str(tmp_path / "r.csv"), "--db", db, "--metric", metric],
                                     {}, io.StringIO())
    assert exited.value.code == 2
    assert "argument --metric: must name the revenue column" in capsys.readouterr().err
    assert count(db, "booked_revenue") == 0


@pytest.mark.parametrize("endless", [False, True])
def test_a_report_file_past_the_size_limit_is_refused_without_reading_it_all(
        client, db, tmp_path, capsys, monkeypatch, endless):
    """/dev/zero (or a wrong file) was read into memory until it ran out."""
    monkeypatch.setattr(spp_server, "MAX_REPORT_BYTES", 100)
    path = "/dev/zero" if endless else tmp_path / "big.csv"
    if not endless:  # a good report, but longer than the limit
        path.write_text("date,revenue\n" + "".join(f"2026-11-{d:02d},1\n" for d in range(1, 29)))
    assert spp_server.run_import_booked([str(path), "--db", db], {}, io.StringIO()) == 1
    one_line_error(capsys, str(path), "larger than", "nothing imported")
    assert count(db, "booked_revenue") == 0


def test_an_import_replaces_every_breakdown_and_metric_stored_for_its_days(
        make_client, db, tmp_path, clock):
    client = make_client(reward_share=Decimal("0.8"))
    post_day(client, clock, "2026-11-01T10:00:00Z", "1", property_id=None)
    by_country = booked_csv(("2026-11-01", "", "IN", "0.5"), ("2026-11-01", "", "US", "0.3"),
                            ("2026-11-02", "", "IN", "0.1"))
    assert import_file(tmp_path, db, by_country)[0] == 0
    # The same day again without the country breakdown: 0.8, not 1.6.
    code, out, _ = import_file(tmp_path, db, "date,revenue\n2026-11-01,0.8\n", name="plain.csv")
    assert code == 0 and out.endswith(
        "plain.csv: 1 row for 1 day (every property): 1 new, 0 replaced, 0 unchanged, 2 removed\n")
    [day] = [d for d in recon(client, **NOV).json["days"] if d["day"] == "2026-11-01"]
    assert (day["booked-revenue"], day["margin"]) == ("0.8", "0")
    assert rows(db, "SELECT day, country, revenue_nano FROM booked_revenue ORDER BY 1") == [
        ("2026-11-01", "", 800_000_000), ("2026-11-02", "IN", 100_000_000)]  # not covered: kept
    # Another metric of the same day replaces it too; so does a breakdown by property.
    code, out, _ = import_file(tmp_path, db, "date,country,total_revenue\n2026-11-01,IN,2\n",
                               metric="total revenue")
    assert code == 0 and "1 new, 0 replaced, 0 unchanged, 1 removed" in out
    assert recon(client, **NOV).json["summary"]["booked-revenue"] == "2.1"
    code, out, _ = import_file(tmp_path, db, booked_csv(("2026-11-01", "1234", "IN", "0.9")))
    assert code == 0 and out.endswith("(1 property): 1 new, 0 replaced, 0 unchanged, 1 removed\n")
    assert rows(db, "SELECT day, property_id, revenue_nano FROM booked_revenue ORDER BY 1") == [
        ("2026-11-01", "1234", 900_000_000), ("2026-11-02", "", 100_000_000)]
    # And the whole day, without property ids, replaces every property's rows.
    code, out, _ = import_file(tmp_path, db, "date,revenue\n2026-11-01,0.7\n")
    assert code == 0 and "1 new, 0 replaced, 0 unchanged, 1 removed" in out
    assert recon(client, **NOV).json["summary"]["booked-revenue"] == "0.8"


def test_a_revision_that_drops_a_row_removes_it(client, db, tmp_path):
    first = booked_csv(("2026-11-01", "A", "IN", "0.5"), ("2026-11-01", "A", "US", "0.25"),
                       ("2026-11-02", "A", "IN", "1"), ("2026-11-02", "B", "IN", "2"))
    assert import_file(tmp_path, db, first)[0] == 0
    revised = booked_csv(("2026-11-01", "A", "IN", "0.5"), ("2026-11-02", "A", "IN", "1.5"),
                         ("2026-11-01", "B", "IN", "3"))
    code, out, _ = import_file(tmp_path, db, revised)
    assert code == 0 and out.endswith(
        ": 3 rows for 2 days (2 properties): 1 new, 1 replaced, 1 unchanged, 2 removed\n")
    assert rows(db, "SELECT day, property_id, country, revenue_nano FROM booked_revenue "
                    "ORDER BY 1, 2, 3") == [
        ("2026-11-01", "A", "IN", 500_000_000), ("2026-11-01", "B", "IN", 3_000_000_000),
        ("2026-11-02", "A", "IN", 1_500_000_000)]


def test_a_report_for_one_property_leaves_the_other_properties_alone(client, db, tmp_path):
    both = booked_csv(("2026-11-01", "A", "IN", "1"), ("2026-11-01", "B", "IN", "2"))
    assert import_file(tmp_path, db, both)[0] == 0
    code, out, _ = import_file(tmp_path, db, booked_csv(("2026-11-01", "B", "", "2.5")))
    assert code == 0 and out.endswith("1 new, 0 replaced, 0 unchanged, 1 removed\n")
    assert rows(db, "SELECT property_id, country, revenue_nano FROM booked_revenue ORDER BY 1") == [
        ("A", "IN", 10**9), ("B", "", 2_500_000_000)]


def test_importing_the_same_file_again_changes_nothing_and_says_so(client, db, tmp_path, clock):
    text = booked_csv(("2026-11-01", "A", "IN", "0.5"), ("2026-11-02", "", "", "1"))
    clock.set("2026-11-10T08:00:00Z")
    assert import_file(tmp_path, db, text, name="a.csv")[0] == 0
    before = rows(db, "SELECT * FROM booked_revenue ORDER BY 1, 2, 3")
    clock.set("2026-11-11T08:00:00Z")
    code, out, err = import_file(tmp_path, db, text, name="b.csv")
    assert (code, err) == (0, "")
    assert out.endswith(": 2 rows for 2 days (1 property): 0 new, 0 replaced, 2 unchanged, "
                        "0 removed; nothing changed: these figures were already stored\n")
    assert rows(db, "SELECT * FROM booked_revenue ORDER BY 1, 2, 3") == before  # time, file kept


BOOKED_DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]


@st.composite
def booked_reports(draw):
    """The rows of a report: by property or not, any days, any country breakdown."""
    by_property = draw(st.booleans())
    rows = []
    for day in draw(st.lists(st.sampled_from(BOOKED_DAYS), min_size=1, unique=True)):
        properties = draw(st.lists(st.sampled_from(["A", "B", ""]), min_size=1, unique=True))
        for prop in properties if by_property else [""]:
            for country in draw(st.lists(st.sampled_from(["", "IN", "US"]), min_size=1, unique=True)):
                rows.append(spp_server.BookedRow(day, prop, country,
                                                 draw(st.integers(0, 10**15))))
    return rows


def last_import_covering(imports, day, prop):
    """The rows of the newest report covering (day, property): one without
    property ids covers its days whole; one with them covers the properties
    it names, and the rows without a property."""
    for report in reversed(imports):
        named = {row.property_id for row in report}
        if day in {row.day for row in report} and (named == {""} or prop in named | {""}):
            return report
    return []


@settings(max_examples=60, **HOSTILE_SETTINGS)
@given(imports=st.lists(booked_reports(), min_size=1, max_size=6))
def test_after_any_imports_each_day_holds_what_the_last_import_covering_it_says(imports):
    directory = tempfile.TemporaryDirectory()
    store = spp_server.Store(Path(directory.name, "spp.db"), writer="thread")
    conn = sqlite3.connect(store.path, isolation_level=None)

    def run(report, source):
        return spp_server.import_booked(store, report, source)

    def stored():
        return dict(((day, prop), nanos) for day, prop, nanos in conn.execute(
            "SELECT day, property_id, sum(revenue_nano) FROM booked_revenue GROUP BY 1, 2"))

    for i, report in enumerate(imports):
        rows_before = conn.execute("SELECT count(*) FROM booked_revenue").fetchone()[0]
        counts = run(report, f"{i}.csv")
        assert counts["new"] + counts["replaced"] + counts["unchanged"] == len(report)
        assert conn.execute("SELECT count(*) FROM booked_revenue").fetchone()[0] == (
            rows_before + counts["new"] - counts["removed"])
        done = imports[:i + 1]
        expected = {}
        for day in BOOKED_DAYS:
            for prop in ["A", "B", ""]:
                figures = [row.revenue_nano for row in last_import_covering(done, day, prop)
                           if (row.day, row.property_id) == (day, prop)]
                if figures:
                    expected[(day, prop)] = sum(figures)
        assert stored() == expected
        if all(row.property_id == "" for row in report):  # the day's total is the report's
            for day in {row.day for row in report}:
                assert sum(n for (d, _), n in stored().items() if d == day) == sum(
                    row.revenue_nano for row in report if row.day == day)
        # The same report again changes nothing.
        assert run(report, "again.csv") == {
            "new": 0, "replaced": 0, "unchanged": len(report), "removed": 0}
        assert stored() == expected
        # Nothing is left behind: no staged or superseded row, in any step.
        assert conn.execute("SELECT count(*) FROM booked_rows").fetchone() == conn.execute(
            "SELECT count(*) FROM booked_revenue").fetchone()
    conn.close()
    store.close()
    directory.cleanup()


@pytest.mark.parametrize("text, where, key", [
    ('[{"date": "2026-11-01", "revenue": "1", "date": "2026-11-02"}]', "[0]", "date"),
    ('[{"date": "2026-11-01", "revenue": "1"}, {"date": "2026-11-02", "revenue": "1", '
     '"revenue": "2"}]', "[1]", "revenue"),
    ('{"data": {"ad_revenue": [{"date": "2026-11-01", "revenue": "1", "country": "IN", '
     '"country": "US"}]}}', "data.ad_revenue[0]", "country"),
    ('{"data": {"ad_revenue": [], "ad_revenue": [{"date": "2026-11-01", "revenue": "1"}]}}',
     "data", "ad_revenue"),
    ('{"data": {"ad_revenue": []}, "data": {"ad_revenue": []}}', "the top object", "data"),
    # Nested in a row or beside the rows: a value no row reads is as ambiguous.
    ('[{"date": "2026-11-01", "revenue": "1", "meta": {"a": 1, "a": 1}}]', "[0].meta", "a"),
    ('{"data": {"ad_revenue": [{"date": "2026-11-01", "revenue": "1", "x": [{"b": 1, "b": 2}]}]}}',
     "data.ad_revenue[0].x[0]", "b"),
    ('{"status": {"code": 200, "code": 201}, "data": {"ad_revenue": []}}', "status", "code"),
])
def test_a_booked_report_that_gives_a_key_twice_is_refused_naming_row_and_key(
        client, db, tmp_path, text, where, key):
    code, out, err = import_file(tmp_path, db, text, name="report.json")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and f"{where}: the key {key!r} is given more than once" in err
    assert "nothing imported" in err and count(db, "booked_revenue") == 0


def test_no_booked_file_error_shows_python_internals():
    number = st.one_of(NUMBER_TEXT, st.integers(4301, 5000).map(lambda n: "1" * n),
                       st.sampled_from(["1e99999999999999999999", "NaN", "Infinity", "-0"]))

    @settings(max_examples=200, **HOSTILE_SETTINGS)
    @given(value=number, json_form=st.booleans(), quoted=st.booleans(),
           extra=st.sampled_from(["", "\x00", "\r", "\n\"", "\ufeff", "[" * 100_000]))
    def check(value, json_form, quoted, extra):
        if json_form:
            literal = json.dumps(value) if quoted else value
            text = '[{"date": "2026-11-01", "revenue": ' + literal + "}]" + extra
        else:
            text = "date,revenue\n2026-11-01," + value + extra + "\n"
        try:
            spp_server.parse_booked_report(text.encode("utf-8", "surrogatepass"))
        except spp_server.BookedFileError as exc:
            assert_no_internals(str(exc))

    check()


@pytest.mark.parametrize("day, accepted", [
    ("1969-12-31", False), ("0001-01-01", False), ("1970-01-01", True), ("9999-12-30", True),
    ("9999-12-31", False)])
def test_booked_days_are_the_days_reconcile_can_query(client, db, tmp_path, day, accepted):
    code, _, err = import_file(tmp_path, db, f"date,revenue\n{day},1\n")
    if not accepted:
        assert code == 1 and "line 2, date: must be from 1970-01-01 to 9999-12-30" in err
        return
    assert code == 0
    until = spp_server.report_day_text(spp_server.report_day_number(day) + 1)
    assert [d["booked-revenue"] for d in recon(client, since=day, until=until).json["days"]] == ["1"]


def test_an_import_locked_out_past_the_busy_timeout_imports_nothing_and_says_so(
        client, db, tmp_path, monkeypatch):
    monkeypatch.setitem(spp_server.DEFAULTS, "busy_timeout_ms", 50)
    report = "date,revenue\n2026-11-01,1\n"
    with write_lock_held_by_another_connection(db):
        code, out, err = import_file(tmp_path, db, report)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "locked" in err and "nothing imported (running it again is safe)" in err
    assert count(db, "booked_revenue") == 0  # nor later: the lock is released now
    code, out, _ = import_file(tmp_path, db, report)
    assert code == 0 and out.endswith("report.csv: 1 row for 1 day (every property): 1 new, 0 replaced, 0 unchanged, 0 removed\n")


def test_an_import_waits_for_its_own_write_however_long_it_takes(client, db, tmp_path, monkeypatch):
    """A command has no HTTP client waiting: it must not give up on its write
    after the server's wait (busy timeout + 1 s), say "nothing imported", and
    have the write commit after all."""
    monkeypatch.setitem(spp_server.DEFAULTS, "busy_timeout_ms", 0)  # a server would wait 1 s
    entered, gate = threading.Event(), threading.Event()
    real_switch = spp_server.switch_to_import

    def held_up(*args):
        entered.set()
        assert gate.wait(10)
        return real_switch(*args)

    monkeypatch.setattr(spp_server, "switch_to_import", held_up)
    outcome = []
    command = threading.Thread(
        target=lambda: outcome.append(import_file(tmp_path, db, "date,revenue\n2026-11-01,1\n")))
    command.start()
    assert entered.wait(5)
    command.join(1.3)
    still_waiting = command.is_alive()
    gate.set()
    command.join(10)
    assert still_waiting, "the command gave up on a write that was still going to commit"
    [(code, out, err)] = outcome
    assert (code, err) == (0, "") and "1 new" in out
    assert count(db, "booked_revenue") == 1


# --- An import in steps: short transactions, never half seen, killed at any point ---


def a_report(days, properties, countries, cents):
    return booked_csv(*((f"2026-11-{day:02}", prop, country, f"0.{cents:02}")
                        for day in days for prop in properties for country in countries))


def test_an_import_holds_the_write_lock_for_short_transactions_and_is_never_seen_half(
        client, db, tmp_path, monkeypatch):
    """A 2M-row report in one transaction held the lock for 70 s and postbacks
    got 503: each transaction now writes a bounded number of rows (staged
    under a new import id, then one switch per day and property), and a
    reader between any two of them sees the old figures or the new, whole."""
    import_file(tmp_path, db, a_report([1, 2, 3], ["A", "B"], ["IN", "US", "BR"], 10))
    old = rows(db, "SELECT * FROM booked_revenue ORDER BY 1, 2, 3")
    monkeypatch.setattr(spp_server, "BOOKED_CHUNK_ROWS", 7)
    monkeypatch.setattr(spp_server, "BOOKED_CHUNK_SCOPES", 2)
    changes, seen = [], []
    real_run = spp_server.InlineWriter.run

    def watched(writer, op):
        def counted(conn, now):
            before = conn.total_changes
            result = op(conn, now)
            changes.append(conn.total_changes - before)
            return result
        result = real_run(writer, counted)
        seen.append(rows(db, "SELECT * FROM booked_revenue ORDER BY 1, 2, 3"))
        return result

    monkeypatch.setattr(spp_server.InlineWriter, "run", watched)
    report = a_report([2, 3, 4], ["A", "C"], ["IN", "US", "DE"], 20)  # 18 rows, 6 scopes
    code, out, _ = import_file(tmp_path, db, report)
    assert code == 0 and out.endswith("18 rows for 3 days (2 properties): 14 new, 4 replaced, "
                                      "0 unchanged, 2 removed\n")
    new = rows(db, "SELECT * FROM booked_revenue ORDER BY 1, 2, 3")
    assert len(changes) > 4 and max(changes) <= 2 * 9  # a chunk, or a switch: 9 (day, property)
    assert {tuple(state) for state in seen} <= {tuple(old), tuple(new)}
    assert seen.index(new) > 1  # staged first, unseen
    assert count(db, "booked_rows") == len(new)  # the superseded rows are gone


@pytest.mark.parametrize("name, when", [
    ("switch_to_import", "before"),  # staged, committed
    ("switch_to_import", "after"),  # switched, not committed
    ("clear_superseded_scopes", "before"),  # committed, superseded rows still there
    ("import_summary", "before"),  # all done but the line
])
def test_an_import_killed_at_any_point_leaves_old_or_new_and_a_rerun_is_right(
        client, db, tmp_path, name, when):
    first = tmp_path / "first.csv"
    first.write_text(a_report([1, 2], ["A", "B"], ["IN", "US"], 10))
    second = tmp_path / "second.csv"
    second.write_text(a_report([2, 3], ["A"], ["IN", "DE"], 20))
    argv = ["import-booked", "--db", db]
    assert spp_server.main([*argv, str(first)]) == 0
    before = rows(db, "SELECT * FROM booked_revenue ORDER BY 1, 2, 3")
    killed = subprocess.run([sys.executable, "-c", KILL_AT, name, when, *argv, str(second)],
                            cwd=HERE, capture_output=True, timeout=15)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    switched = name in ("clear_superseded_scopes", "import_summary")
    seen = rows(db, "SELECT day, property_id, country, revenue_nano FROM booked_revenue "
                    "ORDER BY 1, 2, 3")
    assert (seen == [row[:4] for row in before]) != switched
    if name != "import_summary":  # staged or superseded rows were left
        assert count(db, "booked_rows") > len(seen)
    again = subprocess.run([sys.executable, str(SERVER), *argv, str(second)], capture_output=True,
                           text=True, timeout=15)
    assert again.returncode == 0, again.stderr
    assert ("nothing changed" in again.stdout) == switched
    after = rows(db, "SELECT day, property_id, country, revenue_nano FROM booked_revenue "
                     "ORDER BY 1, 2, 3")
    assert after == sorted(
        [r for r in (row[:4] for row in before) if r[0] == "2026-11-01" or r[1] == "B"]
        + [(f"2026-11-0{d}", "A", c, 200_000_000) for d in (2, 3) for c in ("DE", "IN")])
    assert count(db, "booked_rows") == len(after)


def test_two_imports_through_a_symlink_take_turns(client, db, tmp_path):
    """One import at a time, whatever the path: a second one through a
    symlink waits, says so, and then imports."""
    link = tmp_path / "link.db"
    link.symlink_to(db)
    report = tmp_path / "r.csv"
    report.write_text(a_report([1], ["A"], ["IN"], 10))
    with open(db + "-import-lock", "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = subprocess.Popen([sys.executable, str(SERVER), "import-booked", str(report),
                                   "--db", str(link)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        waiting = second.stderr.readline()
        assert "waiting for another import-booked" in waiting
        assert count(db, "booked_revenue") == 0
    out, err = second.communicate(timeout=15)
    assert second.returncode == 0 and "1 new" in out and err == ""
    assert count(db, "booked_revenue") == 1


# ---------------------------------------------------------------------------
# Reconciliation: booked revenue held against the estimates
# ---------------------------------------------------------------------------

def test_many_small_estimates_and_the_ratio_are_exact(make_client, clock):
    client = make_client(reward_share=Decimal("0.7"))
    post_day(client, clock, "2026-11-01T10:00:00Z", *["0.1"] * 100)
    post_day(client, clock, "2026-11-02T10:00:00Z", "0.000000001", "0.000000002")
    book(client, "date,revenue\n2026-11-01,7.3\n2026-11-02,0.000000002\n")
    res = recon(client, since="2026-11-01", until="2026-11-03").json
    assert res["days"] == [
        {"day": "2026-11-01", "property-id": None, "sessions": 100, "estimated-revenue": "10",
         "booked-revenue": "7.3", "ratio": "0.730000", "paid-out": "7", "margin": "0.3",
         "flag": None},
        {"day": "2026-11-02", "property-id": None, "sessions": 2, "estimated-revenue": "0.000000003",
         "booked-revenue": "0.000000002", "ratio": "0.666666", "paid-out": "0.000000002",
         "margin": "0", "flag": None}]
    summary = res["summary"]
    assert (summary["sessions"], summary["estimated-revenue"], summary["booked-revenue"],
            summary["paid-out"], summary["margin"]) == (102, "10.000000003", "7.300000002",
                                                        "7.000000002", "0.3")
    assert summary["ratio"] == "0.729999"  # 7.300000002 / 10.000000003 = 0.72999999981…, down
    assert (summary["lowest-ratio"], summary["median-ratio"]) == ("0.666666", "0.698333")
    assert (res["since"], res["until"], res["reward-share"]) == ("2026-11-01", "2026-11-03", "0.7")


def test_a_loss_shows_as_a_negative_margin(make_client, clock):
    client = make_client(reward_share=Decimal("0.7"))
    post_day(client, clock, "2026-11-01T10:00:00Z", "1")
    book(client, "date,revenue\n2026-11-01,0.5\n")
    [day] = recon(client, **NOV).json["days"]
    assert (day["paid-out"], day["margin"]) == ("0.7", "-0.2")
    assert recon(client, **NOV).json["summary"]["margin"] == "-0.2"


def test_days_on_one_side_only_have_nulls_and_missing_postbacks_are_flagged(make_client, clock):
    client = make_client(reward_share=Decimal("0.5"))
    post_day(client, clock, "2026-11-01T10:00:00Z", "0.2")  # not booked (yet)
    book(client, "date,revenue\n2026-11-02,0.4\n2026-11-03,0\n")  # no postbacks that day
    res = recon(client, **NOV).json
    assert res["days"] == [
        {"day": "2026-11-01", "property-id": None, "sessions": 1, "estimated-revenue": "0.2",
         "booked-revenue": None, "ratio": None, "paid-out": "0.1", "margin": None,
         "flag": "no-booked-revenue"},
        {"day": "2026-11-02", "property-id": None, "sessions": None, "estimated-revenue": None,
         "booked-revenue": "0.4", "ratio": None, "paid-out": None, "margin": None,
         "flag": "no-postbacks"},
        # Nothing booked and nothing estimated: nothing missing.
        {"day": "2026-11-03", "property-id": None, "sessions": None, "estimated-revenue": None,
         "booked-revenue": "0", "ratio": None, "paid-out": None, "margin": None, "flag": None}]
    summary = res["summary"]
    assert (summary["days"], summary["days-with-both"], summary["booked-revenue"],
            summary["paid-out"], summary["margin"], summary["ratio"]) == (
        3, 0, "0.4", "0.1", None, None)  # no day has both: no margin, not a margin of 0
    assert (summary["no-booked-revenue"], summary["no-postbacks"]) == (1, 1)
    assert summary["paid-out-exceeds-booked"] is False
    assert summary["suggested-reward-share"] is None and summary["lowest-ratio"] is None


def test_a_day_estimated_at_zero_has_no_ratio(client, clock):
    post_day(client, clock, "2026-11-01T10:00:00Z", "0")
    book(client, "date,revenue\n2026-11-01,0.4\n")
    res = recon(client, **NOV).json
    assert (res["days"][0]["ratio"], res["days"][0]["flag"]) == (None, None)
    assert (res["summary"]["ratio"], res["summary"]["median-ratio"]) == (None, None)
    assert res["summary"]["suggested-reward-share"] == "1.00"


def test_without_a_reward_share_there_is_no_paid_out_or_margin(client, clock):
    post_day(client, clock, "2026-11-01T10:00:00Z", "1")
    book(client, "date,revenue\n2026-11-01,1\n")
    res = recon(client, **NOV).json
    assert "paid-out" not in res["days"][0] and "margin" not in res["summary"]
    assert res["reward-share"] is None


@pytest.mark.parametrize("offset, received, day", [
    (None, "2026-11-01T20:00:00Z", "2026-11-01"),
    ("+05:30", "2026-11-01T20:00:00Z", "2026-11-02"),
    ("+05:30", "2026-11-01T18:29:59.999999Z", "2026-11-01"),
    ("+05:30", "2026-11-01T18:30:00Z", "2026-11-02"),
    ("-05:00", "2026-11-02T04:59:59.999999Z", "2026-11-01"),
    ("-05:00", "2026-11-02T05:00:00Z", "2026-11-02"),
    ("+14:00", "2026-11-01T10:00:00Z", "2026-11-02"),
    ("-14:00", "2026-11-01T13:59:59Z", "2026-10-31"),
])
def test_sessions_are_grouped_into_the_report_days_of_the_offset(client, clock, offset, received, day):
    post_day(client, clock, received, "0.5")
    params = {"since": "2026-10-31", "until": "2026-11-03"}
    res = recon(client, **params, **({"report-utc-offset": offset} if offset else {})).json
    assert [(d["day"], d["sessions"]) for d in res["days"]] == [(day, 1)]
    assert res["report-utc-offset"] == (offset or "+00:00")
    # The window is in report days too: the day after is empty.
    following = spp_server.report_day_text(spp_server.report_day_number(day) + 1)
    later = recon(client, since=following, until="2026-11-05",
                  **({"report-utc-offset": offset} if offset else {})).json
    assert later["days"] == []


@pytest.mark.parametrize("received", ["1970-01-01T00:00:00Z", "1970-01-01T23:59:59.999999Z"])
@pytest.mark.parametrize("until", ["1970-01-02", "1970-01-08", "2026-12-01"])
def test_a_session_on_the_first_day_of_the_epoch_counts_once_on_that_day(
        client, clock, received, until):
    """Day number 0 and receive time 0 are values like any other, not 'none'."""
    post_day(client, clock, received, "0.5")
    book(client, "date,revenue\n1970-01-01,0.4\n")
    res = recon(client, since="1970-01-01", until=until).json
    assert [(d["day"], d["sessions"], d["estimated-revenue"], d["booked-revenue"])
            for d in res["days"]] == [("1970-01-01", 1, "0.5", "0.4")]
    assert res["summary"]["days"] == 1
    assert recon(client, since="1970-01-02", until="1970-01-03").json["days"] == []


@pytest.mark.parametrize("raw", ["report-utc-offset=+05:30", "report-utc-offset=%2B05:30",
                                 "report-utc-offset=%2005:30"])
def test_a_plus_in_the_offset_may_arrive_as_a_space(client, clock, raw):
    post_day(client, clock, "2026-11-01T20:00:00Z", "0.5")
    res = client.get(f"/reconciliation?since=2026-11-01&until=2026-11-03&{raw}").json
    assert ([d["day"] for d in res["days"]], res["report-utc-offset"]) == (["2026-11-02"], "+05:30")


def test_the_server_setting_is_the_default_offset_and_the_query_wins(make_client, clock):
    client = make_client(report_utc_offset=330)
    post_day(client, clock, "2026-11-01T20:00:00Z", "0.5")
    assert recon(client, **NOV).json["days"][0]["day"] == "2026-11-02"
    assert recon(client, report_utc_offset="+00:00", **NOV).json["days"][0]["day"] == "2026-11-01"


def test_booked_rows_with_a_property_give_a_record_per_day_and_property(client, clock):
    post_day(client, clock, "2026-11-01T10:00:00Z", "1", property_id="A")
    post_day(client, clock, "2026-11-01T11:00:00Z", "2", property_id="B")
    post_day(client, clock, "2026-11-01T12:00:00Z", "4", property_id=None)
    book(client, booked_csv(("2026-11-01", "B", "IN", "1"), ("2026-11-01", "B", "US", "0.5"),
                            ("2026-11-01", "", "IN", "3"), ("2026-11-01", "C", "", "0.25")))
    assert [(d["property-id"], d["sessions"], d["estimated-revenue"], d["booked-revenue"], d["flag"])
            for d in recon(client, **NOV).json["days"]] == [
        (None, 1, "4", "3", None), ("A", 1, "1", None, "no-booked-revenue"),
        ("B", 1, "2", "1.5", None),
        ("C", None, None, "0.25", "no-postbacks")]
    only_b = recon(client, property_id="B", **NOV).json
    assert [(d["property-id"], d["estimated-revenue"], d["booked-revenue"])
            for d in only_b["days"]] == [("B", "2", "1.5")]
    assert only_b["property-id"] == "B"


def test_booked_rows_without_a_property_hold_the_day_of_every_property(client, clock):
    post_day(client, clock, "2026-11-01T10:00:00Z", "1", property_id="A")
    post_day(client, clock, "2026-11-01T11:00:00Z", "2", property_id="B")
    book(client, booked_csv(("2026-11-01", "", "IN", "2"), ("2026-11-01", "", "US", "0.4")))
    assert [(d["property-id"], d["sessions"], d["estimated-revenue"], d["booked-revenue"])
            for d in recon(client, **NOV).json["days"]] == [(None, 2, "3", "2.4")]
    # A property asked for is compared with booked rows of that property only.
    assert [(d["property-id"], d["estimated-revenue"], d["booked-revenue"])
            for d in recon(client, property_id="A", **NOV).json["days"]] == [("A", "1", None)]


@pytest.mark.parametrize("quantile, share", [(None, "0.87"), ("1", "0.87"), ("0.8", "0.90"),
                                             ("0.5", "0.95"), ("0.15", "0.99"), ("0.14", "1.00")])
def test_suggested_share_is_safe_on_the_asked_share_of_days(client, clock, quantile, share):
    book_week(client, clock)
    params = {**NOV, **({"quantile": quantile} if quantile else {})}
    summary = recon(client, **params).json["summary"]
    assert summary["suggested-reward-share"] == share
    assert summary["quantile"] == (quantile or "1")
    # Checked against the definition: safe on enough days, and a hundredth more is not.
    suggested = Decimal(share)
    needed = len(BOOKED_WEEK) * Decimal(quantile or 1)
    assert sum(suggested <= Decimal(b) for b in BOOKED_WEEK) >= needed
    if suggested < 1:
        assert sum(suggested + Decimal("0.01") <= Decimal(b) for b in BOOKED_WEEK) < needed


def test_lowest_and_median_ratio_and_enough_data(client, clock):
    book_week(client, clock)
    summary = recon(client, **NOV).json["summary"]
    assert (summary["lowest-ratio"], summary["median-ratio"]) == ("0.879000", "0.950000")
    assert (summary["days-with-both"], summary["little-data"], summary["note"]) == (7, False, None)
    assert summary["ratio"] == "0.972714"  # 6.809 / 7


def test_fewer_than_seven_days_rest_on_little_data(client, clock):
    book_week(client, clock, BOOKED_WEEK[:6])  # 1.2 is the 5th: median of six
    summary = recon(client, **NOV).json["summary"]
    assert (summary["days-with-both"], summary["little-data"]) == (6, True)
    assert "little data" in summary["note"]
    assert summary["median-ratio"] == "0.940000"  # (0.93 + 0.95) / 2


def test_suggested_share_cases_by_hand():
    share = spp_server.suggested_share
    assert share([], Decimal(1)) is None
    assert share([(100, 50)], Decimal(1)) == "0.50"
    assert share([(100, 0), (100, 90)], Decimal(1)) == "0.00"
    assert share([(100, 0), (100, 90)], Decimal("0.5")) == "0.90"
    assert share([(0, 5), (300, 100)], Decimal(1)) == "0.33"  # 0 estimated allows any share
    assert share([(0, 5)], Decimal(1)) == "1.00"
    assert share([(3 * 10**9, 2 * 10**9)], Decimal(1)) == "0.66"  # rounded down, never up
    assert share([(300, 200)], Decimal(1)) == "0.66"
    # Paid-out is rounded down to the nano-USD: 3 nanos x 0.99 pays out 2.97, so 2.
    assert share([(3, 2)], Decimal(1)) == "0.99"


def test_estimates_never_booked_are_flagged_counted_and_an_overpayment_is_said_plainly(
        make_client, clock):
    client = make_client(reward_share=Decimal("0.7"))
    post_day(client, clock, "2026-11-01T10:00:00Z", "1", property_id="A")
    post_day(client, clock, "2026-11-01T11:00:00Z", "0.5", "0.5", property_id="B")  # never booked
    post_day(client, clock, "2026-11-02T11:00:00Z", "0.25", property_id="A")  # not booked yet
    book(client, booked_csv(("2026-11-01", "A", "IN", "0.9")))
    res = recon(client, **NOV).json
    assert [(d["day"], d["property-id"], d["paid-out"], d["margin"], d["flag"])
            for d in res["days"]] == [
        ("2026-11-01", "A", "0.7", "0.2", None),
        ("2026-11-01", "B", "0.7", None, "no-booked-revenue"),
        ("2026-11-02", "A", "0.175", None, "no-booked-revenue")]
    summary = res["summary"]
    assert (summary["no-booked-revenue"], summary["no-postbacks"]) == (2, 0)
    assert (summary["paid-out"], summary["booked-revenue"], summary["margin"]) == (
        "1.575", "0.9", "0.2")  # the margin of the records with both figures
    assert summary["paid-out-exceeds-booked"] is True
    assert summary["warnings"][0].startswith(
        "paid-out 1.575 exceeds booked-revenue 0.9 over the window by 0.675")
    assert summary["warnings"][1].startswith(
        "2 records flagged no-booked-revenue (estimated 1.25): no booked figure")
    # They are not held against the suggestion: 2026-11-01 A alone allowed 0.9.
    assert (summary["days-with-both"], summary["suggested-reward-share"]) == (1, "0.90")
    book(client, booked_csv(("2026-11-01", "A", "IN", "0.9"), ("2026-11-01", "B", "IN", "2"),
                            ("2026-11-02", "A", "IN", "1")))
    summary = recon(client, **NOV).json["summary"]
    assert (summary["no-booked-revenue"], summary["paid-out-exceeds-booked"],
            summary["warnings"]) == (0, False, [])


def test_with_nothing_booked_the_money_figures_are_null_not_zero(make_client, clock):
    client = make_client(reward_share=Decimal("0.5"))
    post_day(client, clock, "2026-11-01T10:00:00Z", "0.2", property_id=None)
    res = recon(client, **NOV)
    summary = res.json["summary"]
    assert (summary["estimated-revenue"], summary["paid-out"], summary["booked-revenue"],
            summary["margin"], summary["ratio"]) == ("0.2", "0.1", None, None, None)
    assert (summary["paid-out-exceeds-booked"], summary["no-booked-revenue"]) == (True, 1)
    csv_rows = recon(client, format="csv", **NOV).body.decode().split("\r\n")
    assert csv_rows[1] == "2026-11-01,,1,0.2,,,0.1,,no-booked-revenue"
    empty = recon(client, since="2026-12-01", until="2026-12-08").json["summary"]
    assert (empty["estimated-revenue"], empty["paid-out"], empty["booked-revenue"],
            empty["margin"], empty["sessions"]) == (None, None, None, None, 0)
    assert (empty["paid-out-exceeds-booked"], empty["warnings"]) == (False, [])


def test_a_day_is_safe_only_when_every_property_on_it_is(client, clock):
    # Five days of two properties, each estimated at 1: what each record allowed.
    allowed = {"A": ["0.6", "0.9", "0.9", "0.9", "0.9"], "B": ["0.9", "0.7", "0.9", "0.9", "0.9"]}
    booked = []
    for prop, shares in allowed.items():
        for i, share in enumerate(shares):
            post_day(client, clock, f"2026-11-0{i + 1}T10:00:00Z", "1", property_id=prop)
            booked.append((f"2026-11-0{i + 1}", prop, "IN", share))
    book(client, booked_csv(*booked))
    # Days allow 0.6, 0.7, 0.9, 0.9, 0.9.  Counting the ten records instead, 80%
    # (eight) would have allowed 0.90.
    for quantile, share in [("1", "0.60"), ("0.8", "0.70"), ("0.6", "0.90"), ("0.2", "0.90")]:
        summary = recon(client, quantile=quantile, **NOV).json["summary"]
        assert (summary["suggested-reward-share"], summary["days-with-both"]) == (share, 5)


def test_median_ratio_is_the_median_of_the_exact_ratios(client, clock):
    post_day(client, clock, "2026-11-01T10:00:00Z", "3")
    post_day(client, clock, "2026-11-02T10:00:00Z", "3")
    book(client, "date,revenue\n2026-11-01,1\n2026-11-02,2\n")
    summary = recon(client, **NOV).json["summary"]
    # (1/3 + 2/3) / 2 = 1/2; the median of the rounded ratios would be 0.4999995.
    assert (summary["lowest-ratio"], summary["median-ratio"]) == ("0.333333", "0.500000")


RECON_DAYS = [spp_server.report_day_text(20_400 + i) for i in range(6)]
NANO_AMOUNTS = st.one_of(st.integers(0, 300), st.integers(0, 10**13))


@st.composite
def recon_sides(draw):
    """{(day, property or None): [sessions, estimated, booked]}, either side possibly missing."""
    sides = {}
    for key in draw(st.lists(st.tuples(st.sampled_from(RECON_DAYS),
                                       st.sampled_from([None, "A", "B"])), unique=True)):
        estimated, booked = draw(st.sampled_from([(1, 1), (1, 0), (0, 1)]))
        sides[key] = [draw(st.integers(1, 5)) if estimated else None,
                      draw(NANO_AMOUNTS) if estimated else None,
                      draw(NANO_AMOUNTS) if booked else None]
    return sides


def paid_out(estimated, share):
    """What a share pays out of an estimate: rounded down to the nano-USD."""
    return math.floor(Fraction(estimated) * Fraction(share))


@settings(max_examples=200, **HOSTILE_SETTINGS)
@given(sides=recon_sides(),
       quantile=st.integers(1, 10**6).map(lambda n: Decimal(n).scaleb(-6)),
       share=st.sampled_from([None, Decimal("0.7"), Decimal("0.000001"), Decimal(1)]))
def test_the_suggestion_is_safe_on_the_quantile_of_days_and_a_hundredth_more_is_not(
        sides, quantile, share):
    q = spp_server.ReconciliationQuery(20_400, 20_406, None, spp_server.ReportDays.fixed(0),
                                       quantile, share)
    report = spp_server.reconciliation_report(q, sides)
    summary = report["summary"]
    days = {}
    for (day, _), (_, estimated, booked) in sides.items():
        if estimated is not None and booked is not None:
            days.setdefault(day, []).append((estimated, booked))

    def safe_days(share):
        return sum(all(paid_out(e, share) <= b for e, b in pairs) for pairs in days.values())

    suggested = summary["suggested-reward-share"]
    assert summary["days-with-both"] == len(days)
    if not days:
        assert suggested is None
    else:
        suggested = Decimal(suggested)
        assert safe_days(suggested) >= quantile * len(days)
        if suggested < 1:
            assert safe_days(suggested + Decimal("0.01")) < quantile * len(days)
    # Flags, their counts, and totals that are null when nothing adds up to them.
    flags = [record["flag"] for record in report["days"]]
    assert flags == [
        "no-postbacks" if sessions is None and booked else
        "no-booked-revenue" if sessions is not None and booked is None else None
        for _, (sessions, _, booked) in sorted(
            sides.items(), key=lambda item: (item[0][0], item[0][1] is not None, item[0][1] or ""))]
    assert (summary["no-booked-revenue"], summary["no-postbacks"]) == (
        flags.count("no-booked-revenue"), flags.count("no-postbacks"))
    booked = [b for _, _, b in sides.values() if b is not None]
    if booked:
        assert Decimal(summary["booked-revenue"]) == Decimal(sum(booked)).scaleb(-9)
    else:
        assert summary["booked-revenue"] is None
    if share is not None:
        paid = [paid_out(e, share) for _, e, _ in sides.values() if e is not None]
        assert summary["paid-out-exceeds-booked"] == (sum(paid) > sum(booked))
        assert (summary["paid-out"] is None) == (not paid)
        assert any(w.startswith("paid-out ") for w in summary["warnings"]) == (
            sum(paid) > sum(booked))


@pytest.mark.parametrize("quantile", [
    "1e-6400000", "1E-6", "5e-1", "0.1234567", "1.0000001", "0x1", "+0.5", " 0.5", "0.5 ", ".5",
    "1.", "٠.٥", "0", "0.000000", "1.5", "2", "NaN", "-0.5", "", "0" * 10_000,
])
def test_a_quantile_that_is_not_a_plain_fraction_of_6_places_is_a_400(client, quantile):
    res = recon(client, status=400, quantile=quantile, **NOV)
    assert_error(res, 400, "quantile")
    assert "at most 6 places" in res.json["error"] and len(res.json["error"]) < 200


@pytest.mark.parametrize("quantile", ["0.000001", "1", "1.000000", "0.5", "0.25"])
def test_a_quantile_of_up_to_6_places_is_taken_and_echoed(client, quantile):
    assert recon(client, quantile=quantile, **NOV).json["summary"]["quantile"] == quantile


@pytest.mark.parametrize("argv, option", [
    (["reconcile", "--since", "2026-11-01", "--until", "2026-11-08", "--quantile", "1e-6400000"],
     "--quantile"),
    (["reconcile", "--since", "2026-11-01", "--until", "2026-11-08", "--reward-share", "1e-640000"],
     "--reward-share"),
    (["export", "--since", "2026-11-01", "--until", "2026-11-08", "--reward-share", "0.1234567"],
     "--reward-share"),
    (["--reward-share", "1e-6400000"], "--reward-share"),
])
def test_decimal_options_take_only_plain_fractions_and_name_the_option(
        fake_serve, db, capsys, argv, option):
    with pytest.raises(SystemExit) as exited:
        spp_server.main([*argv, "--db", db], environ={})
    err = capsys.readouterr().err
    assert exited.value.code == 2 and option in err and "at most 6 places" in err
    assert fake_serve == []


@settings(max_examples=300, **HOSTILE_SETTINGS)
@given(text=st.one_of(st.text(max_size=12), st.from_regex(r"[0-9](\.[0-9]{1,8})?", fullmatch=True),
                      st.decimals(0, 1, places=6).map(lambda d: format(d, "f"))))
def test_a_fraction_is_taken_only_in_its_plain_form_and_exactly(text):
    try:
        value = spp_server.parse_fraction(text, "0.5")
    except ValueError as exc:
        assert "at most 6 places" in str(exc)
        plain = re.fullmatch(r"[0-9](\.[0-9]{1,6})?", text)
        assert not plain or not 0 < Decimal(text) <= 1
    else:
        assert text.isascii() and value == Decimal(text) and 0 < value <= 1
        assert value.as_tuple().exponent >= -6 and format(value, "f") == text


def test_an_empty_property_id_is_held_against_booked_rows_without_one(client, clock):
    post_day(client, clock, "2026-11-01T10:00:00Z", "1", property_id="")
    post_day(client, clock, "2026-11-01T11:00:00Z", "2", property_id=None)
    post_day(client, clock, "2026-11-01T12:00:00Z", "4", property_id="A")
    book(client, booked_csv(("2026-11-01", "", "IN", "2.5"), ("2026-11-01", "A", "", "3")))
    assert [(d["property-id"], d["sessions"], d["estimated-revenue"], d["booked-revenue"], d["flag"])
            for d in recon(client, **NOV).json["days"]] == [
        (None, 2, "3", "2.5", None), ("A", 1, "4", "3", None)]


def test_a_day_booked_without_property_ids_holds_every_property_of_that_day(client, clock):
    for day in ("2026-11-01", "2026-11-02"):
        post_day(client, clock, f"{day}T10:00:00Z", "1", property_id="A")
        post_day(client, clock, f"{day}T11:00:00Z", "2", property_id="B")
    book(client, booked_csv(("2026-11-01", "", "", "2.7"), ("2026-11-02", "A", "", "0.9")))
    assert [(d["day"], d["property-id"], d["estimated-revenue"], d["booked-revenue"], d["flag"])
            for d in recon(client, **NOV).json["days"]] == [
        ("2026-11-01", None, "3", "2.7", None),
        ("2026-11-02", "A", "1", "0.9", None), ("2026-11-02", "B", "2", None, "no-booked-revenue")]


@pytest.mark.parametrize("params, field", [
    ({"until": "2026-11-08"}, "since"),
    ({"since": "2026-11-01"}, "until"),
    ({"since": "2026-11-31", "until": "2026-12-08"}, "since"),
    ({"since": "2026-11-01T00:00:00Z", "until": "2026-11-08"}, "since"),
    ({"since": "1969-12-31", "until": "2026-11-08"}, "since"),
    ({"since": "2026-11-08", "until": "2026-11-08"}, "until"),
    ({"since": "2026-11-08", "until": "2026-11-01"}, "until"),
    ({**NOV, "report-utc-offset": "+14:01"}, "report-utc-offset"),
    ({**NOV, "report-utc-offset": "+5:30"}, "report-utc-offset"),
    ({**NOV, "report-utc-offset": "05:30"}, "report-utc-offset"),
    ({**NOV, "report-utc-offset": "+05:60"}, "report-utc-offset"),
    ({**NOV, "report-utc-offset": "IST"}, "report-utc-offset"),
    ({**NOV, "quantile": "0"}, "quantile"),
    ({**NOV, "quantile": "1.01"}, "quantile"),
    ({**NOV, "quantile": "most"}, "quantile"),
    ({**NOV, "quantile": "NaN"}, "quantile"),
    ({**NOV, "format": "ndjson"}, "format"),
])
def test_bad_reconciliation_parameters_are_a_400_naming_them(client, params, field):
    assert_error(recon(client, status=400, **params), 400, field)


@pytest.mark.parametrize("missing", ["since", "until"])
def test_since_and_until_are_required(client, missing):
    res = recon(client, status=400, **{k: v for k, v in NOV.items() if k != missing})
    assert_error(res, 400, missing)
    assert res.json["error"] == "is required"


def test_subcommands_report_an_unusable_database_in_one_line(client, db, tmp_path, monkeypatch, capsys):
    (tmp_path / "r.csv").write_text("date,revenue\n2026-11-01,1\n")
    assert spp_server.run_import_booked([str(tmp_path / "r.csv"), "--db", str(tmp_path)], {},
                                        sys.stdout) == 1
    assert "cannot open the database" in capsys.readouterr().err
    closed = []
    for cls in (spp_server.Store, spp_server.ReadOnlyStore):
        monkeypatch.setattr(cls, "close", lambda self, close=cls.close: closed.append(self) or close(self))

    def unavailable(*args, **kwargs):
        raise spp_server.StoreUnavailable("the database is locked")

    monkeypatch.setattr(spp_server.Store, "write", unavailable)
    assert spp_server.run_import_booked([str(tmp_path / "r.csv"), "--db", db], {}, sys.stdout) == 1
    err = capsys.readouterr().err
    assert err == ("spp_server.py import-booked: the database is locked; nothing imported "
                   "(running it again is safe)\n")
    monkeypatch.setattr(spp_server, "reconciliation", unavailable)  # once the store is open
    assert spp_server.run_reconcile(["--db", db, "--since", NOV["since"], "--until", NOV["until"]],
                                    {}, sys.stdout.buffer) == 1
    err = capsys.readouterr().err
    assert err.startswith("spp_server.py reconcile: reading ") and err.count("\n") == 1
    assert len(closed) == 2  # each subcommand closed its store


def test_utc_offsets_are_read_and_written_exactly():
    assert [spp_server.parse_utc_offset(t) for t in ["+05:30", " 05:30", "-03:45", "+14:00",
                                                     "-14:00", "-00:00"]] == [
        330, 330, -225, 840, -840, 0]
    assert [spp_server.utc_offset_text(m) for m in [330, -225, 0, -840]] == [
        "+05:30", "-03:45", "+00:00", "-14:00"]


def test_reconciliation_as_csv(make_client, clock):
    client = make_client(reward_share=Decimal("0.7"))
    post_day(client, clock, "2026-11-01T10:00:00Z", "1", property_id="A")
    book(client, booked_csv(("2026-11-01", "A", "IN", "0.9"), ("2026-11-02", "A", "IN", "0.1")))
    res = recon(client, format="csv", **NOV)
    assert res.content_type == "text/csv"
    assert res.body.decode().split("\r\n") == [
        "day,property-id,sessions,estimated-revenue,booked-revenue,ratio,paid-out,margin,flag",
        "2026-11-01,A,1,1,0.9,0.900000,0.7,0.2,",
        "2026-11-02,A,,,0.1,,,,no-postbacks", ""]
    plain = make_client()
    assert recon(plain, format="csv", **NOV).body.decode().splitlines()[0] == (
        "day,property-id,sessions,estimated-revenue,booked-revenue,ratio,flag")
    assert recon(plain, **NOV).content_type == "application/json"


def test_reconcile_subcommand_matches_the_endpoint_byte_for_byte(make_client, clock, db):
    client = make_client(reward_share=Decimal("0.7"), report_utc_offset=330)
    book_week(client, clock)
    post_day(client, clock, "2026-11-01T20:00:00Z", "0.3", property_id="ユーザー")
    for fmt, extra in [("json", {}), ("csv", {}), ("json", {"quantile": "0.5", "property-id": "1234"})]:
        http = recon(client, format=fmt, **NOV, **extra).body
        out = io.BytesIO()
        argv = ["--db", db, "--since", NOV["since"], "--until", NOV["until"], "--format", fmt,
                *itertools_chain(("--" + k, v) for k, v in extra.items())]
        code = spp_server.run_reconcile(argv, {"SPP_REWARD_SHARE": "0.7",
                                               "SPP_REPORT_UTC_OFFSET": "+05:30"}, out)
        assert code == 0
        assert out.getvalue() == http and http.count(b"2026-11-07") == 1


def test_reconcile_subcommand_errors(client, db, capsys):
    with pytest.raises(SystemExit) as exited:
        spp_server.run_reconcile(["--db", db, "--since", "soon", "--until", "2026-11-08"], {},
                                 sys.stdout.buffer)
    assert exited.value.code == 2 and "--since: must be a report day" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        spp_server.run_reconcile(["--db", db, "--since", "2026-11-01", "--until", "2026-11-08",
                                  "--quantile", "2"], {}, sys.stdout.buffer)
    assert exited.value.code == 2 and "--quantile: must be a decimal" in capsys.readouterr().err
    code = spp_server.run_reconcile(["--db", db + ".nope", "--since", "2026-11-01",
                                     "--until", "2026-11-08"], {}, sys.stdout.buffer)
    assert code == 1 and "no database" in capsys.readouterr().err
    assert not os.path.exists(db + ".nope")


def test_reconcile_help_says_what_the_reward_share_adds_to_a_reconciliation(capsys):
    with pytest.raises(SystemExit):
        spp_server.main(["reconcile", "--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    share_help = text.split("--reward-share REWARD_SHARE", 2)[2]
    assert "paid-out" in share_help and "margin" in share_help
    assert "rewardable-revenue" not in share_help


def test_reconcile_runs_from_the_command_line(client, db, tmp_path):
    (tmp_path / "r.csv").write_text("date,revenue\n2026-11-01,1\n")
    subprocess.run([sys.executable, str(SERVER), "import-booked", str(tmp_path / "r.csv"),
                    "--db", db], check=True, capture_output=True)
    out = subprocess.run([sys.executable, str(SERVER), "reconcile", "--since", "2026-11-01",
                          "--until", "2026-11-02", "--db", db], capture_output=True, check=True)
    assert json.loads(out.stdout)["days"][0]["booked-revenue"] == "1"


def test_report_offset_comes_from_flag_or_environment(fake_serve, db, capsys):
    spp_server.main(["--db", db], environ={"SPP_REPORT_UTC_OFFSET": "+05:30"})
    spp_server.main(["--db", db, "--report-utc-offset=-03:00"],  # = : it starts with -
                    environ={"SPP_REPORT_UTC_OFFSET": "+05:30"})
    spp_server.main(["--db", db], environ={})
    assert [c["report_utc_offset"] for c in fake_serve] == [330, -180, 0]
    with pytest.raises(SystemExit) as exited:
        spp_server.main(["--db", db], environ={"SPP_REPORT_UTC_OFFSET": "+5"})
    assert exited.value.code == 2 and "SPP_REPORT_UTC_OFFSET" in capsys.readouterr().err


@pytest.mark.parametrize("days", [spp_server.ReportDays.fixed(0),
                                  spp_server.ReportDays.fixed(0).changed_to(330, 10**15)])
@pytest.mark.parametrize("name", ["estimates_by_day", "estimates_by_day_and_property"])
def test_per_day_estimates_search_the_receive_time_index(client, db, name, days):
    sql = "EXPLAIN QUERY PLAN " + queries_holding(name)[name].format(day=days.sql())
    plan = " / ".join(row[-1] for row in rows(db, sql, spp_server.Window(1, 2).params()))
    assert plan.startswith("SEARCH sessions USING COVERING INDEX sessions_by_time "
                           "(received_at_us>? AND received_at_us<?)")
    assert "SCAN" not in plan


def test_booked_days_search_the_primary_key(client, db):
    plan = query_plan(db, "booked_by_day",
                      {"since_day": "2026-11-01", "until_day": "2026-11-08", "property": None})
    # The current import of each day and property, then its rows: both by primary key.
    assert plan.startswith("SEARCH c USING PRIMARY KEY (day>? AND day<?) / "
                           "SEARCH r USING PRIMARY KEY (import_id=? AND day=? AND property_id=?)")


# ---------------------------------------------------------------------------
# Payout ledger, the frame: kill -9 at chosen points, one step at a time
# ---------------------------------------------------------------------------

# --- The commands and the read endpoints ---


def ledger_command(run, db, *args):
    """Run a ledger command in-process: (exit status, stdout bytes, stderr text)."""
    out, err = io.BytesIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run([*args, "--db", db], {}, out)
    return code, out.getvalue(), err.getvalue()


def pay_args(until="2020-10-03T00:00:00Z", pay_now="0.6", final="0.9", *more):
    return ["--until", until, "--pay-now-share", pay_now, "--final-share", final, *more]


# --- kill -9 at chosen points of a real command ---

# Runs a command of spp_server.py in a process that SIGKILLs itself just
# before or just after one of its functions runs.
KILL_AT = """
import os, signal, sys
import spp_server
name, when = sys.argv[1], sys.argv[2]
original = getattr(spp_server, name)
def killing(*args, **kwargs):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(spp_server, name, killing)
sys.exit(spp_server.main(sys.argv[3:]))
"""


def ledger_month(db):
    """Two paid days, one to come, booked figures for two: a ledger to kill steps of."""
    store = spp_server.Store(db, writer="thread")
    try:
        add_sessions(store, [(f"u{i % 7}", ("p1", "p2", None)[i % 3], 1000 * i + 1, at(i % 4, i % 24))
                             for i in range(200)])
        pay(store, at(1, 0))
        book_rows(store, [(day_text(0), "p1", 90_000), (day_text(1), "p2", 5_000_000)])
    finally:
        store.close()


LEDGER_TABLES = ("payout_runs", "payout_parts", "payout_lines", "payout_deductions", "settlements",
                 "settlement_days", "settlement_lines", "ledger_balances")
# Detail rows are staged before their step's header row: readers see those of a header only.
STAGED = {"payout_parts": "run_id <= (SELECT coalesce(max(id), 0) FROM payout_runs)",
          "payout_lines": "run_id <= (SELECT coalesce(max(id), 0) FROM payout_runs)",
          "settlement_lines": "settlement_id <= (SELECT coalesce(max(id), 0) FROM settlements)"}


def ledger_rows(db, staged=True):
    """Every ledger row (only those readers see, unless `staged`), but the
    times of creation, which differ between two databases."""
    state = {t: rows(db, f"SELECT * FROM {t} WHERE {'1' if staged else STAGED.get(t, '1')} "
                         "ORDER BY 1, 2") for t in LEDGER_TABLES}
    for table in ("payout_runs", "settlements"):
        state[table] = [row[:4] + row[5:] if table == "payout_runs" else row[:1] + row[2:]
                        for row in state[table]]
    return state


@pytest.mark.parametrize("command, name, when", [
    (["pay", *pay_args(until="2020-10-04T00:00:00Z")], "plan_run", "after"),
    (["pay", *pay_args(until="2020-10-04T00:00:00Z")], "write_in_chunks", "after"),  # parts staged
    (["pay", *pay_args(until="2020-10-04T00:00:00Z")], "record_run", "after"),  # before COMMIT
    # After COMMIT, before the ledger journal holds it (its lines not released yet).
    (["pay", *pay_args(until="2020-10-04T00:00:00Z")], "journal_step", "before"),
    (["pay", *pay_args(until="2020-10-04T00:00:00Z")], "run_output", "before"),  # after COMMIT
    (["settle"], "settle_pools", "after"),
    (["settle"], "write_in_chunks", "after"),  # lines staged
    (["settle"], "record_settlement", "after"),
    (["settle"], "journal_step", "before"),
    (["settle"], "settlement_output", "before"),
])
def test_a_ledger_step_killed_at_any_point_is_whole_or_absent_and_a_rerun_completes_it(
        tmp_path, command, name, when):
    db, reference = str(tmp_path / "spp.db"), str(tmp_path / "reference.db")
    ledger_month(db)
    shutil.copy(db, reference)
    run = {"pay": spp_server.run_pay, "settle": spp_server.run_settle}[command[0]]
    expected = ledger_command(run, reference, *command[1:])
    assert expected[0] == 0 and expected[1].count(b"\n") > 1
    before = ledger_rows(db, staged=False)
    killed = subprocess.run([sys.executable, "-c", KILL_AT, name, when, *command, "--db", db],
                            cwd=HERE, capture_output=True, timeout=15)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert killed.stdout == b""
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    committed = name in ("run_output", "settlement_output", "journal_step")
    assert ledger_rows(db, staged=False) == (ledger_rows(reference) if committed else before)
    if name == "write_in_chunks":  # rows of the step were staged, and stay unseen
        assert ledger_rows(db) != ledger_rows(db, staged=False)
    # A re-run completes it; once committed, pay prints the run again, settle
    # prints the settlement again when asked for it by id.
    again = ["--settlement", "1"] if committed and command == ["settle"] else []
    code, out, err = ledger_command(run, db, *command[1:], *again)
    if again:  # printing it again repeats no warning about what stays pending
        expected = (*expected[:2], "".join(line for line in expected[2].splitlines(True)
                                           if ": warning: " not in line))
    assert (code, out, err) == expected
    assert ledger_rows(db) == ledger_rows(reference)
    # And the journal holds the step: a restore of the copy before it is seen.
    assert journal_steps(db) == journal_steps(reference)


def journal_steps(db):
    return rows(spp_server.journal_path(db), "SELECT kind, id FROM steps ORDER BY seq")


@pytest.mark.parametrize("command, name, when, committed", [
    (["erase", "u3", "--even-if-owed"], "erase_user", "after", False),  # before COMMIT
    (["erase", "u3", "--even-if-owed"], "compact_after_erasure", "before", True),
    (["hold", "u3", "--reason", "r"], "change_hold", "after", False),
    (["release", "u3", "--reason", "r"], "change_hold", "after", False),
    (["write-off-balances", "--older-than", "1d"], "write_off_aged", "after", False),
])
def test_the_other_ledger_commands_killed_at_any_point_leave_all_or_nothing_and_rerun_safely(
        tmp_path, command, name, when, committed):
    db = str(tmp_path / "spp.db")
    ledger_month(db)
    if command[0] == "release":
        assert ledger_command(spp_server.run_hold, db, "u3", "--reason", "r")[0] == 0
    if command[0] == "write-off-balances":  # balances carried long ago
        assert ledger_command(spp_server.run_settle, db)[0] == 0
        for path in (db, spp_server.journal_path(db)):  # the journal's copy of it too
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
                conn.execute("UPDATE settlements SET created_at_us = 0")
        assert rows(db, "SELECT count(*) FROM ledger_balances WHERE owed_nano > 0")[0][0] > 0
    before = ledger_rows(db) | {t: rows(db, f"SELECT * FROM {t}") for t in
                               ("ledger_holds", "balance_write_offs", "erasures")}
    killed = subprocess.run([sys.executable, "-c", KILL_AT, name, when, *command, "--db", db],
                            cwd=HERE, capture_output=True, timeout=15)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    after = ledger_rows(db) | {t: rows(db, f"SELECT * FROM {t}") for t in
                              ("ledger_holds", "balance_write_offs", "erasures")}
    assert (after != before) == committed
    run = {"erase": spp_server.run_erase, "hold": spp_server.run_hold,
           "release": functools.partial(spp_server.run_hold, action="release"),
           "write-off-balances": spp_server.run_write_off_balances}[command[0]]
    assert ledger_command(run, db, *command[1:])[0] == 0
    assert ledger_command(run, db, *command[1:])[0] == 0  # and again: nothing twice
    if command[0] == "erase":
        assert b"u3" not in file_bytes(db) and count(db, "erasures") == 1
    if command[0] in ("hold", "release"):
        assert count(db, "ledger_holds") == (1 if command[0] == "hold" else 2)
    if command[0] == "write-off-balances":
        assert count(db, "balance_write_offs") == 1
        assert rows(db, "SELECT count(*) FROM ledger_balances WHERE owed_nano > 0") == [(0,)]


# --- One step at a time, whatever path names the database ---
# A real pay that stops after staging its parts (its step alive, its rows
# staged and unseen) until a line comes on its stdin.
PAUSED_PAY = """
import sys
import spp_server
original = spp_server.write_in_chunks
def pausing(*args, **kwargs):
    original(*args, **kwargs)
    spp_server.write_in_chunks = original
    print("staged", file=sys.stderr, flush=True)
    sys.stdin.readline()
spp_server.write_in_chunks = pausing
sys.exit(spp_server.main(sys.argv[1:]))
"""


@contextlib.contextmanager
def paused_pay(db):
    """A real `pay` process holding the ledger lock with its parts staged: -> the Popen,
    resumed at the end of the block (its output read by proc.communicate)."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_PAY, "pay", *pay_args(), "--db", db],
                            cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stderr.readline() == b"staged\n"
        yield proc
    finally:
        if proc.poll() is None and not proc.stdin.closed:
            proc.stdin.write(b"\n")
            proc.stdin.flush()


def other_name(db, how, tmp_path):
    """Another way to name the database `db`: -> (path to pass, working directory)."""
    if how == "symlink":
        os.symlink(db, tmp_path / "alias.db")
        return str(tmp_path / "alias.db"), HERE
    if how == "symlinked directory":
        os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-link")
        return str(tmp_path.parent / f"{tmp_path.name}-link" / "spp.db"), HERE
    if how == "hard link":
        os.link(db, tmp_path / "linked.db")
        return str(tmp_path / "linked.db"), HERE
    assert how == "relative"
    (tmp_path / "sub").mkdir()
    return os.path.join("sub", "..", os.path.basename(db)), tmp_path


@pytest.mark.parametrize("how, command", [
    *((how, ["pay", *pay_args()]) for how in ("symlink", "symlinked directory", "hard link", "relative")),
    ("symlink", ["settle"])])
def test_one_ledger_step_at_a_time_whatever_path_names_the_database(tmp_path, db, how, command):
    """While a real pay has staged rows, a second step through another name
    of the same database waits and gives up (here at once): it deletes none of
    the live step's rows, and the first completes whole."""
    ledger_month(db)  # run 1 paid up to October 2nd
    reference = str(tmp_path / "reference.db")
    shutil.copy(db, reference)
    expected = ledger_command(spp_server.run_pay, reference, *pay_args())
    with paused_pay(db) as first:
        staged = ledger_rows(db)
        path, cwd = other_name(db, how, tmp_path)
        second = subprocess.run([sys.executable, str(SERVER), *command, "--db", path,
                                 "--lock-wait", "0"], cwd=cwd, capture_output=True, text=True,
                                timeout=15)
        assert (second.returncode, second.stdout) == (1, "")
        if how == "hard link":  # another lock by name: refused, whichever name
            assert "has 2 hard links" in second.stderr and second.stderr.count("\n") == 1
        else:
            assert second.stderr.splitlines() == [
                f"spp_server.py {command[0]}: waiting for another pay or settle to release "
                f"{os.path.realpath(db)}-ledger-lock (at most 0 s, --lock-wait)",
                f"spp_server.py {command[0]}: another pay or settle held "
                f"{os.path.realpath(db)}-ledger-lock for 0 s (--lock-wait); nothing changed: "
                "run it again once that step is done"]
        assert ledger_rows(db) == staged  # the live step's staged rows are all there
    out, err = first.communicate(timeout=15)
    assert (first.returncode, out, err) == (0, expected[1], b"")
    assert ledger_rows(db) == ledger_rows(reference)


def test_a_step_waiting_for_another_says_so_and_goes_on_once_it_is_done(tmp_path, db):
    ledger_month(db)
    os.symlink(db, tmp_path / "alias.db")
    with paused_pay(db) as first:
        second = subprocess.Popen([sys.executable, str(SERVER), "pay", *pay_args(),
                                   "--db", str(tmp_path / "alias.db")],
                                  env={**os.environ, "SPP_LEDGER_LOCK_WAIT": "60"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert second.stderr.readline().decode() == (
            "spp_server.py pay: waiting for another pay or settle to release "
            f"{os.path.realpath(db)}-ledger-lock (at most 60 s, --lock-wait)\n")
    out, err = first.communicate(timeout=15)
    assert (first.returncode, err) == (0, b"")
    assert second.wait(15) == 0 and second.stderr.read() == b""
    assert second.stdout.read() == out  # the run it asked for, recorded by the first
    assert count(db, "payout_runs") == 2


def test_the_lock_wait_is_a_whole_number_of_seconds(db, capsys):
    with pytest.raises(SystemExit) as exited:
        spp_server.run_settle(["--lock-wait", "1.5", "--db", db], {}, io.BytesIO())
    assert exited.value.code == 2
    assert "--lock-wait: must be a whole number of seconds from 0 to 86400" in capsys.readouterr().err


def test_ledger_steps_lists_every_recorded_step_for_the_routines(store, db):
    assert ledger_command(spp_server.run_ledger, db, "--steps") == (0, b"step,id,until\r\n", "")
    add_sessions(store, [("a", None, 1000, at(0)), ("b", None, 2000, at(2))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "", 900)])
    spp_server.settle(store)
    pay(store, at(3, 0))
    code, out, err = ledger_command(spp_server.run_ledger, db, "--steps")
    assert (code, err) == (0, "")
    assert out.decode().splitlines() == ["step,id,until", "run,1,2020-10-02T00:00:00Z",
                                         "run,2,2020-10-04T00:00:00Z", "settlement,1,"]


# ---------------------------------------------------------------------------
# Payout ledger, runs: each session paid once, one report offset, limits and refusals
# ---------------------------------------------------------------------------

# A month safely in the past: a run's until must be.
OCT = spp_server.parse_instant("2020-10-01T00:00:00Z")
HOUR_US = 3600 * 1_000_000
D = Decimal


def add_sessions(store, sessions):
    """sessions: (user, property or None, revenue nanos, received_at_us), in
    id order (a later id with an earlier time is a clock step).  -> ids."""

    def op(conn, _):
        ids = []
        for user, prop, nanos, at in sessions:
            sid = f"l-{next(_ids)}"
            conn.execute(spp_server.STORE_SQL["insert_session"],
                         (sid, user, prop, "IN", 1, 10, nanos, at, "{}"))
            ids.append(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        return ids

    return store.write(op)


def book_rows(store, rows_):
    """rows_: (day, property or '', revenue nanos) -> imported as booked revenue."""
    booked = [spp_server.BookedRow(day, prop, "", nanos) for day, prop, nanos in rows_]
    return spp_server.import_booked(store, booked, "test.csv")


def day_text(n):
    return spp_server.report_day_text(OCT // spp_server.DAY_US + n)


def at(day, hour=12):
    return OCT + day * spp_server.DAY_US + hour * HOUR_US


def pay(store, until_us, pay_now="0.6", final="0.9", offset=0):
    return spp_server.pay_run(store, until_us, D(pay_now), D(final), offset)


def run_text(store, run_id, fmt="csv"):
    return b"".join(spp_server.run_output(store, run_id, fmt))


def run_lines(store, run_id):
    return list(csv.DictReader(io.StringIO(run_text(store, run_id).decode())))


def settlement_lines(store, settlement_id):
    text = b"".join(spp_server.settlement_output(store, settlement_id, "csv")).decode()
    return list(csv.DictReader(io.StringIO(text)))


def nanos(text):
    return spp_server.usd_to_nanos(D(text))


def ledger_counts(db):
    return {t: count(db, t) for t in ("payout_runs", "payout_parts", "payout_lines", "settlements",
                                      "settlement_days", "settlement_lines", "ledger_balances")}


def test_a_run_pays_each_user_the_pay_now_share_of_each_part_rounded_down(store):
    add_sessions(store, [("b", "p", 333, at(0)), ("a", "p", 1_000_001, at(0)),
                         ("a", None, 7, at(1)), ("c", "p", 5, at(3))])
    run_id = pay(store, at(2, 0), pay_now="0.333333")
    # Per part (user, day, property), floor(estimate x share); then summed per user.
    assert run_lines(store, run_id) == [
        {"run-id": "1", "user-id": "a", "sessions": "2", "estimated-revenue": "0.001000008",
         "paid-now": nanos_to_text(1_000_001 * 333333 // 10**6 + 7 * 333333 // 10**6),
         "deducted": "0", "withheld": "0"},
        {"run-id": "1", "user-id": "b", "sessions": "1", "estimated-revenue": "0.000000333",
         "paid-now": nanos_to_text(333 * 333333 // 10**6), "deducted": "0", "withheld": "0"}]


def nanos_to_text(n):
    return f"{D(n).scaleb(-9):f}".rstrip("0").rstrip(".") if n else "0"


def test_asking_again_returns_the_recorded_run_byte_identical_and_pays_nothing(store, db):
    add_sessions(store, [("a", "p", 1000, at(0)), ("b", "p", 2000, at(1))])
    run_id = pay(store, at(2, 0))
    first = {fmt: run_text(store, run_id, fmt) for fmt in ("csv", "ndjson")}
    before = ledger_counts(db)
    add_sessions(store, [("a", "p", 5000, at(1, 23))])  # late, with an earlier time: next run
    assert pay(store, at(2, 0), pay_now="0.60", final="0.900") == run_id
    assert {fmt: run_text(store, run_id, fmt) for fmt in ("csv", "ndjson")} == first
    assert ledger_counts(db) == before
    second = pay(store, at(3, 0))
    assert [line["sessions"] for line in run_lines(store, second)] == ["1"]


@pytest.mark.parametrize("args, field, words", [
    ({"until_us": at(0)}, "until", ["before", "run 1"]),
    ({"until_us": at(2, 0), "final": "0.8"}, "final-share", ["0.9", "0.8"]),
    ({"until_us": at(2, 0), "pay_now": "0.5"}, "pay-now-share", ["0.6", "0.5"]),
    # Asked again with another offset: refused like other shares (issue 22 §1).
    ({"until_us": at(2, 0), "offset": 330}, "report-utc-offset", ["+00:00", "+05:30", "run 1"]),
    ({"until_us": at(3), "pay_now": "0.95"}, "pay-now-share", ["final"]),
    ({"until_us": spp_server.parse_instant("2999-01-01")}, "until", ["past"]),
])
def test_a_refused_run_names_the_field_and_changes_nothing(store, db, args, field, words):
    add_sessions(store, [("a", "p", 1000, at(0)), ("b", "p", 2000, at(2))])
    pay(store, at(2, 0))
    before = ledger_counts(db)
    with pytest.raises(spp_server.Invalid) as refused:
        pay(store, **args)
    assert refused.value.field == field
    for word in words:
        assert word in refused.value.message
    assert ledger_counts(db) == before


@pytest.mark.parametrize("text", ["0.6e0", "6E-1", "1.1", "-0.1", ".5", "0.", "0.1234567", "NaN",
                                  "Infinity", "1.0000001", " 0.5", "0,5", "+0.5", "2", "0x1", ""])
def test_a_share_is_a_plain_decimal_in_0_to_1_with_at_most_6_places(text):
    with pytest.raises(spp_server.Invalid) as refused:
        spp_server.parse_ledger_share(text, "final-share")
    assert refused.value.field == "final-share"


@pytest.mark.parametrize("text, value", [("0", "0"), ("1", "1"), ("1.000000", "1"),
                                         ("0.000001", "0.000001"), ("0.60", "0.6")])
def test_shares_are_read_exactly_and_stored_in_one_form(text, value):
    assert spp_server.share_text(spp_server.parse_ledger_share(text, "x")) == value


def test_runs_meet_end_to_start_by_row_id_even_when_the_clock_steps_back(store, db):
    ids = add_sessions(store, [("a", "p", 1, at(0)), ("a", "p", 2, at(5)),  # clock ahead...
                               ("a", "p", 4, at(1)), ("b", "p", 8, at(6))])  # ...then back
    first = pay(store, at(2, 0))
    # The largest id received before until is the third: the one received
    # "later" with a smaller id is paid now, with it, never skipped.
    assert rows(db, "SELECT after_session_id, last_session_id FROM payout_runs") == [(0, ids[2])]
    assert run_lines(store, first)[0]["estimated-revenue"] == "0.000000007"
    second = pay(store, at(7, 0))
    assert rows(db, "SELECT after_session_id, last_session_id FROM payout_runs WHERE id = ?",
                (second,)) == [(ids[2], ids[3])]
    empty = pay(store, at(8, 0))
    assert run_text(store, empty) == (b"run-id,user-id,sessions,estimated-revenue,paid-now,"
                                      b"deducted,withheld\r\n")


def test_a_days_booked_revenue_is_shared_exactly_ties_to_the_first_user_id(store):
    add_sessions(store, [("c", None, 100, at(0)), ("a", None, 100, at(0)), ("b", None, 100, at(0)),
                         ("d", None, 0, at(0))])
    pay(store, at(1, 0), pay_now="0", final="1")
    book_rows(store, [(day_text(0), "", 10)])
    lines = settlement_lines(store, spp_server.settle(store))
    assert [(line["user-id"], line["booked-part"], line["final"], line["top-up"]) for line in lines] == [
        ("a", "0.000000004", "0.000000004", "0.000000004"),
        ("b", "0.000000003", "0.000000003", "0.000000003"),
        ("c", "0.000000003", "0.000000003", "0.000000003"),
        ("d", "0", "0", "0")]


@given(st.integers(0, 10**12), st.lists(st.integers(0, 10**9), min_size=1, max_size=8))
def test_largest_remainder_parts_sum_exactly_and_stay_within_one_of_the_quota(total, weights):
    parts = spp_server.largest_remainder(total, weights)
    if sum(weights) == 0:
        assert parts == [0] * len(weights)
        return
    assert sum(parts) == total
    for part, weight in zip(parts, weights):
        quota = Fraction(total * weight, sum(weights))
        assert quota - 1 < part < quota + 1


@given(st.integers(0, 10**6), st.lists(st.integers(0, 40), min_size=1, max_size=12))
def test_largest_remainder_gives_what_is_left_to_the_largest_remainders_ties_to_the_first(
        total, weights):
    assume(sum(weights))  # small weights: many equal remainders
    quotas = [Fraction(total * weight, sum(weights)) for weight in weights]
    floors = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (floors[i] - quotas[i], i))
    raised = set(by_remainder[:total - sum(floors)])
    assert spp_server.largest_remainder(total, weights) == [
        floor + (i in raised) for i, floor in enumerate(floors)]


def test_estimates_of_zero_share_the_booked_figure_by_sessions(store):
    add_sessions(store, [("a", None, 0, at(0)), ("a", None, 0, at(0)), ("b", None, 0, at(0))])
    pay(store, at(1, 0), pay_now="0", final="1")
    book_rows(store, [(day_text(0), "", 3)])
    lines = settlement_lines(store, spp_server.settle(store))
    assert [line["booked-part"] for line in lines] == ["0.000000002", "0.000000001"]


def test_low_booked_revenue_carries_a_balance_taken_back_from_later_runs(store, db):
    add_sessions(store, [("a", None, 1_000_000, at(0)), ("b", None, 1_000_000, at(0))])
    pay(store, at(1, 0), pay_now="0.5", final="0.5")  # each paid 500,000 now
    book_rows(store, [(day_text(0), "", 400_000)])  # each is due 100,000 in the end
    lines = settlement_lines(store, spp_server.settle(store))
    assert {(line["user-id"], line["carried"], line["top-up"]) for line in lines} == {
        ("a", "0.0004", "0"), ("b", "0.0004", "0")}
    # a: 300,000 nanos now against 400,000 owed: paid nothing, owes 100,000 more.
    add_sessions(store, [("a", None, 600_000, at(1)), ("b", None, 2_000_000, at(1))])
    run = run_lines(store, pay(store, at(2, 0), pay_now="0.5", final="0.5"))
    assert [(line["user-id"], line["paid-now"], line["deducted"]) for line in run] == [
        ("a", "0", "0.0003"), ("b", "0.0006", "0.0004")]
    assert rows(db, "SELECT user_id, owed_nano FROM ledger_balances ORDER BY user_id") == [
        ("a", 100_000), ("b", 0)]
    statement = spp_server.statement(store, "a")
    assert statement["totals"]["owed"] == "0.0001"
    assert statement["totals"]["deducted"] == "0.0003"


def test_write_off_keeps_no_balance_and_records_what_was_written_off(store, db):
    add_sessions(store, [("a", None, 1_000_000, at(0))])
    pay(store, at(1, 0), pay_now="0.5", final="0.5")
    book_rows(store, [(day_text(0), "", 200_000)])
    lines = settlement_lines(store, spp_server.settle(store, write_off=True))
    assert [(line["carried"], line["written-off"]) for line in lines] == [("0", "0.0004")]
    assert rows(db, "SELECT count(*) FROM ledger_balances WHERE owed_nano > 0") == [(0,)]
    assert spp_server.ledger_summary(store)["totals"]["written-off"] == "0.0004"


def test_a_revised_booked_figure_gives_a_correcting_line_not_a_rewrite(store, db):
    add_sessions(store, [("a", None, 1_000_000, at(0)), ("b", None, 3_000_000, at(0))])
    pay(store, at(1, 0), pay_now="0.5", final="0.9")
    book_rows(store, [(day_text(0), "", 4_000_000)])
    first = spp_server.settle(store)
    assert spp_server.settle(store) is None  # nothing changed: nothing to settle
    kept = rows(db, "SELECT * FROM settlement_lines")
    book_rows(store, [(day_text(0), "", 2_000_000)])  # revised down
    second = spp_server.settle(store)
    assert rows(db, f"SELECT * FROM settlement_lines WHERE settlement_id = {first}") == kept
    lines = settlement_lines(store, second)
    # a: final 900,000 -> 450,000: the 450,000 topped up too much is carried.
    assert [(line["user-id"], line["final"], line["carried"], line["kind"]) for line in lines] == [
        ("a", "0.00045", "0.00045", "correction"), ("b", "0.00135", "0.00135", "correction")]
    book_rows(store, [(day_text(0), "", 3_000_000)])  # and up again
    lines = settlement_lines(store, spp_server.settle(store))
    # The top-ups (225,000 and 675,000) first take back the balances still owed.
    assert [(line["user-id"], line["top-up"], line["carried"], line["deducted"])
            for line in lines] == [("a", "0", "0", "0.000225"), ("b", "0", "0", "0.000675")]
    assert rows(db, "SELECT user_id, owed_nano FROM ledger_balances ORDER BY 1") == [
        ("a", 225_000), ("b", 675_000)]


def settle_pools_statements(store):
    """The statements settle_pools runs on a snapshot of `store`, and what it found."""
    statements = []
    with store.snapshot() as conn:
        conn.set_trace_callback(statements.append)
        try:
            found = spp_server.settle_pools(conn)
        finally:
            conn.set_trace_callback(None)
    return statements, found


def test_settle_finds_its_pools_in_as_many_queries_however_many_runs_and_pools(tmp_path):
    """One query per job over every pool, not one per run per pool (nor per
    day): a month of many runs and pools costs the queries of a small one."""
    counts = []
    for days, runs in [(2, 1), (12, 4)]:
        store = spp_server.Store(str(tmp_path / f"{days}.db"), writer="thread")
        try:
            add_sessions(store, [(f"u{i % 3}", ("p1", "p2", None)[i % 3], 1000 * (i + 1),
                                  at(day, i)) for day in range(days) for i in range(6)])
            for run in range(1, runs + 1):
                pay(store, at(days * run // runs, 0))
            book_rows(store, [(day_text(d), p, 7_000) for d in range(days) for p in ("p1", "p2")])
            assert spp_server.settle(store) is not None
            # p1's pools changed since (corrections); p3's booked rows match no session.
            book_rows(store, [(day_text(d), p, 9_000) for d in range(days) for p in ("p1", "p3")])
            statements, found = settle_pools_statements(store)
            assert len(found.pools) == 2 * days and len(found.warnings) == 2 * days
            counts.append(len(statements))
        finally:
            store.close()
    assert counts[0] == counts[1] < 20, counts


def test_a_day_is_settled_only_once_every_session_of_it_was_paid(store):
    add_sessions(store, [("a", None, 1000, at(0)), ("a", None, 1000, at(1, 1))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "", 900), (day_text(1), "", 900)])
    first = spp_server.settle(store)
    assert {line["day"] for line in settlement_lines(store, first)} == {day_text(0)}
    pay(store, at(1, 12))  # day 1 not over at this until
    assert spp_server.settle(store) is None
    pay(store, at(2, 0))
    assert {line["day"] for line in settlement_lines(store, spp_server.settle(store))} == {day_text(1)}


def test_a_session_of_a_day_received_after_the_last_run_holds_the_day_back(store):
    add_sessions(store, [("a", None, 1000, at(0))])
    pay(store, at(1, 0))
    add_sessions(store, [("a", None, 1000, at(0, 20))])  # the clock stepped back
    book_rows(store, [(day_text(0), "", 900)])
    assert spp_server.settle(store) is None
    pay(store, at(1, 1))
    lines = settlement_lines(store, spp_server.settle(store))
    assert [(line["sessions"], line["estimated-revenue"]) for line in lines] == [("2", "0.000002")]


@pytest.mark.parametrize("by_property", [False, True])
def test_a_late_session_on_a_settled_day_is_paid_in_a_later_pool_and_charges_no_one(
        store, db, by_property):
    prop = "p" if by_property else None
    add_sessions(store, [("a", prop, 1000, at(0, 10)), ("c", prop, 1000, at(0, 11))])
    pay(store, at(1, 0), pay_now="0.5", final="1")
    book_rows(store, [(day_text(0), prop or "", 2000)])
    spp_server.settle(store)  # a and c: 500 paid now, 500 topped up each
    add_sessions(store, [("b", prop, 1000, at(0, 20)), ("a", prop, 400, at(0, 21))])  # clock stepped back
    assert spp_server.settle(store) is None  # not paid yet
    code, _, err = ledger_command(spp_server.run_pay, db, *pay_args(
        spp_server.iso_utc(at(3, 5)), "0.5", "1"))
    assert code == 0
    assert f"2 session(s) received on report days already settled" in err and day_text(3) in err
    # The settled day is not settled again: no one of it is charged.
    assert spp_server.settle(store) is None
    assert rows(db, "SELECT day, user_id, sessions FROM payout_parts WHERE run_id = 2 "
                    "ORDER BY user_id") == [(day_text(3), "a", 1), (day_text(3), "b", 1)]
    assert spp_server.ledger_summary(store)["runs"][1]["moved-sessions"] == 2
    book_rows(store, [(day_text(3), prop or "", 1400)])
    pay(store, at(4, 0), pay_now="0.5", final="1")
    lines = settlement_lines(store, spp_server.settle(store))
    assert [(l["day"], l["user-id"], l["kind"], l["top-up"], l["carried"]) for l in lines] == [
        (day_text(3), "a", "settlement", "0.0000002", "0"),
        (day_text(3), "b", "settlement", "0.0000005", "0")]


def test_booked_rows_with_a_property_settle_each_property_apart(store):
    add_sessions(store, [("a", "p1", 1000, at(0)), ("b", "p2", 1000, at(0)), ("c", None, 1000, at(0))])
    pay(store, at(1, 0), pay_now="0", final="1")
    book_rows(store, [(day_text(0), "p1", 5000), (day_text(0), "p2", 100), (day_text(0), "p3", 7)])
    lines = settlement_lines(store, spp_server.settle(store))
    # c's session has no property: no booked row holds it, so it stays pending.
    assert [(line["property-id"], line["user-id"], line["final"]) for line in lines] == [
        ("p1", "a", "0.000005"), ("p2", "b", "0.0000001")]
    assert spp_server.statement(store, "c")["totals"]["pending"] == "0"  # paid 0 now
    summary = spp_server.ledger_summary(store)
    assert [(d["property-id"], d["booked-revenue"], d["paid-in-total"], d["margin"])
            for d in summary["days"]] == [
        ("p1", "0.000005", "0.000005", "0"), ("p2", "0.0000001", "0.0000001", "0"),
        ("p3", "0.000000007", "0", "0.000000007")]


def test_a_pool_paid_in_runs_of_different_final_shares_weighs_each_by_its_estimates(store):
    add_sessions(store, [("a", None, 1000, at(0, 1)), ("a", None, 3000, at(0, 20))])
    pay(store, at(0, 12), pay_now="0", final="0.5")
    pay(store, at(1, 0), pay_now="0", final="0.9")
    book_rows(store, [(day_text(0), "", 4_000_000)])
    lines = settlement_lines(store, spp_server.settle(store))
    # 1,000,000 of the booked part at 0.5 and 3,000,000 at 0.9.
    assert [line["final"] for line in lines] == ["0.0032"]


def test_reports_pending_and_held_back(store):
    add_sessions(store, [("a", None, 1_000_000, at(0)), ("a", None, 1_000_000, at(1))])
    pay(store, at(2, 0), pay_now="0.5", final="0.8")
    book_rows(store, [(day_text(0), "", 1_000_000)])
    spp_server.settle(store)
    summary = spp_server.ledger_summary(store)
    assert summary["runs"][0]["held-back"] == "0.0006"  # 0.8 x 2,000,000 - 1,000,000
    assert summary["totals"]["pending"] == "0.0005"  # day 1: paid now, not settled
    assert spp_server.statement(store, "a")["totals"] == summary["totals"]


@pytest.mark.parametrize("first, then, how", [
    ([""], ["p1"], "as a whole day"),
    (["p1", "p2"], [""], "by property"),
    (["p1"], ["p1", "p2"], None),  # another property booked: the same breakdown, settled
])
def test_a_day_settled_one_way_is_never_settled_again_the_other_way(store, db, first, then, how):
    """A re-import with the other breakdown replaces the day's rows, so its
    pools are new: settling them would pay the day twice."""
    add_sessions(store, [("a", "p1", 1000, at(0)), ("b", "p2", 3000, at(0))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), prop, 900) for prop in first])
    spp_server.settle(store)
    book_rows(store, [(day_text(0), prop, 700) for prop in then])
    before = ledger_counts(db)
    code, out, err = ledger_command(spp_server.run_settle, db)
    if how is None:
        assert code == 0 and ledger_counts(db) != before
        return
    # Partly settled (issue 22, 5): nothing else to settle here, and the day is named.
    assert (code, out.count(b"\n"), err.count("not settled")) == (4, 1, 1)
    assert f"spp_server.py settle: not settled: {day_text(0)} was settled {how}" in err
    assert ledger_counts(db) == before


@pytest.mark.parametrize("revision", [[("p1", 800)], [("p1", 800), ("p2", 0)]])
def test_a_settled_pool_whose_booked_row_a_revision_dropped_is_refused(store, db, revision):
    """A revision naming properties replaces the day's row without one: the
    sessions without a property were settled on it, so settle says so."""
    add_sessions(store, [("a", "p1", 1000, at(0)), ("b", None, 3000, at(0))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "p1", 900), (day_text(0), "", 2000)])
    spp_server.settle(store)
    book_rows(store, [(day_text(0), prop, n) for prop, n in revision])
    code, out, err = ledger_command(spp_server.run_settle, db)
    # Partly settled (issue 22, 5): the revised p1 is corrected, the dropped row named.
    assert code == 4 and "not settled: " + day_text(0) + " was settled against booked revenue " \
        "that is no longer stored" in err
    assert {line["property-id"] for line in settlement_lines(store, 2)} == {"p1"}
    book_rows(store, [(day_text(0), prop, n) for prop, n in [*revision, ("", 2000)]])
    assert ledger_command(spp_server.run_settle, db)[0] == 0  # re-imported whole: settled


def test_one_ledger_step_at_a_time_across_processes(store, db):
    add_sessions(store, [("a", None, 1000, at(0))])
    fd = os.open(db + "-ledger-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another pay or settle would hold it
        paid = []
        waiting = threading.Thread(target=lambda: paid.append(pay(store, at(1, 0))))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and count(db, "payout_runs") == 0  # it waits for the lock
    finally:
        os.close(fd)
    waiting.join(10)
    assert paid == [1]
    assert oct(os.stat(db + "-ledger-lock").st_mode & 0o777) == "0o600"


def test_report_days_are_cut_at_the_report_offset(store):
    # 20:00 UTC on October 1st is 01:30 on the 2nd at +05:30.
    add_sessions(store, [("a", None, 1000, at(0, 20)), ("b", None, 1000, at(0, 10))])
    pay(store, at(1, 19), pay_now="0", final="1", offset=330)  # the 2nd ends at 18:30 UTC
    book_rows(store, [(day_text(1), "", 500)])
    lines = settlement_lines(store, spp_server.settle(store))
    assert [(line["day"], line["user-id"], line["final"]) for line in lines] == [
        (day_text(1), "a", "0.0000005")]
    assert spp_server.ledger_summary(store)["settlements"][0]["report-utc-offset"] == "+05:30"


# --- One report offset, recorded with the runs (issue 22, 1) ---


def recorded_offsets(db):
    return rows(db, "SELECT run_id, first_day, report_utc_offset FROM report_offsets "
                    "ORDER BY run_id")


def test_an_offset_change_is_recorded_with_its_run_and_cuts_only_days_no_run_paid(store, db):
    # Run 1 pays up to 2020-10-03T00:00Z at +00:00; run 2 asks for +05:30.
    add_sessions(store, [("a", None, 1000, at(d, h)) for d in range(6) for h in (1, 12, 20)])
    pay(store, at(2, 0))
    code, _, err = ledger_command(spp_server.run_pay, db, *pay_args(
        "2020-10-07T00:00:00Z", "0.6", "0.9", "--report-utc-offset", "+05:30"))
    assert (code, err) == (0, ledger_illustration("text", ("illustration", "offset-change")))
    # The 3rd (UTC) is the last day at +00:00: it ends where the 4th starts at
    # +05:30, 2020-10-03T18:30Z; no session paid by run 1 changes its day.
    assert recorded_offsets(db) == [(1, None, 0), (2, day_text(3), 330)]
    parts = dict(((run, day), n) for run, day, n in rows(
        db, "SELECT run_id, day, sessions FROM payout_parts"))
    assert parts == {(1, day_text(0)): 3, (1, day_text(1)): 3, (2, day_text(2)): 2,
                     (2, day_text(3)): 3, (2, day_text(4)): 3, (2, day_text(5)): 3,
                     (2, day_text(6)): 1}  # the 20:00 UTC sessions are on the next day at +05:30
    # The same --until with another offset is refused like other shares.
    with pytest.raises(spp_server.Invalid) as refused:
        pay(store, at(6, 0), offset=0)
    assert refused.value.field == "report-utc-offset"
    assert pay(store, at(6, 0), offset=330) == pay(store, at(6, 0), offset=None) == 2
    # Settlement and the reconciliation cut the days as the runs did.
    book_rows(store, [(day_text(d), "", 10_000) for d in range(6)])
    spp_server.settle(store)
    settled = {day: int(n) for day, n in rows(db, "SELECT day, sessions FROM settlement_days")}
    assert settled == {day_text(d): n for d, n in enumerate([3, 3, 2, 3, 3, 3])}
    q = spp_server.reconciliation_query(day_text(0), day_text(7), None, None, None, None)
    report = spp_server.reconciliation(store, q)
    assert {d["day"]: d["sessions"] for d in report["days"]} == {**settled, day_text(6): 1}
    assert report["report-utc-offset"] == f"+00:00 to {day_text(2)}, +05:30 from {day_text(3)}"
    assert spp_server.ledger_summary(store)["runs"][1]["report-utc-offset"] == "+05:30"


def test_the_documented_offset_routine_first_weeks_on_the_default_then_found_and_changed(
        store, db):
    """docs/reconciling.md: pay weekly on the default offset, find the offset
    over three weeks of booked data, set SPP_REPORT_UTC_OFFSET (spp.env, which
    the payout unit reads): the next runs record it and succeed, and runs,
    settlements, statements and the reconciliation agree across the change."""
    true = 330  # Gamezop's report days start at 18:30 UTC
    traffic = [1, 5, 2, 8, 1, 6, 3] * 5  # per day: a day unlike the one before shows it
    sessions = [(f"u{h % 3}", "1234", 1000 * traffic[d] * (1 + h % 2), at(d, h))
                for d in range(35) for h in range(0, 24, 2)]
    add_sessions(store, sessions)
    true_days = spp_server.ReportDays.fixed(true)
    booked = Counter()
    for _, _, nanos_, t in sessions:  # Gamezop books 0.8 of each of its days
        booked[sql_report_day(true_days, t)] += nanos_
    first = OCT // spp_server.DAY_US
    book_rows(store, [(spp_server.report_day_text(day), "1234", n * 8 // 10)
                      for day, n in booked.items() if first < day < first + 34])

    def command(run, *args, env=None):
        out, err = io.BytesIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run([*args, "--db", db], env or {}, out)
        return code, out.getvalue(), err.getvalue()

    def weekly(week, env=None):
        until = spp_server.iso_utc(at(7 * week, 0))
        return command(spp_server.run_pay, "--until", until, "--pay-now-share", "0.6",
                       "--final-share", "0.9", env=env)

    for week in (1, 2, 3):
        assert weekly(week)[0] == 0
    ratios = {}
    for offset in ("+00:00", "+05:30"):  # the routine: the same weeks both ways
        code, out, _ = command(spp_server.run_reconcile, "--since", day_text(0), "--until",
                               day_text(21), f"--report-utc-offset={offset}")
        summary = json.loads(out)["summary"]
        ratios[offset] = D(summary["median-ratio"]) - D(summary["lowest-ratio"])
    assert ratios["+05:30"] < ratios["+00:00"]  # steadier: the right one
    env = {"SPP_REPORT_UTC_OFFSET": "+05:30"}
    code, _, err = weekly(4, env)
    assert code == 0 and "+05:30" in err and day_text(22) in err
    assert weekly(4, env)[0] == 0 and weekly(5, env)[0] == 0  # again, and the next week
    code, _, err = command(spp_server.run_settle)
    assert code == 0, err
    settled = {day: (n, estimated, booked_) for day, n, estimated, booked_ in rows(
        db, "SELECT day, sessions, estimated_nano, booked_nano FROM settlement_days")}
    # From the change on, each settled day is Gamezop's day: booked 0.8 of its estimate.
    for day in range(22, 34):
        n, estimated, booked_ = settled[day_text(day)]
        assert booked_ == estimated * 8 // 10 and n == 12
    # Without an offset, the reconciliation cuts the days as the ledger did, every day.
    code, out, _ = command(spp_server.run_reconcile, "--since", day_text(0),
                           "--until", day_text(34),
                           env={"SPP_REPORT_UTC_OFFSET": "-03:00"})  # the recorded ones win
    report = json.loads(out)
    assert {d["day"]: (d["sessions"], nanos(d["estimated-revenue"])) for d in report["days"]
            if d["day"] in settled} == {day: v[:2] for day, v in settled.items()}
    assert report["report-utc-offset"] == f"+00:00 to {day_text(21)}, +05:30 from {day_text(22)}"
    totals = [spp_server.statement(store, f"u{i}")["totals"] for i in range(3)]
    ledger = spp_server.ledger_summary(store)["totals"]
    for key in spp_server.LEDGER_TOTALS:
        assert sum(nanos(t[key]) for t in totals) == nanos(ledger[key])
    assert rows(db, "SELECT sum(sessions) FROM payout_parts") == [(35 * 12,)]


@pytest.mark.parametrize("old, new", [(0, 330), (330, 0), (-720, 840), (840, -720), (60, 90)])
def test_the_day_before_a_change_ends_where_the_first_new_day_starts(old, new):
    last_until = OCT + 5 * spp_server.DAY_US
    days = spp_server.ReportDays.fixed(old).changed_to(new, last_until)
    first = days.changes[-1][0]
    starts = [days.start_us(d) for d in range(first - 4, first + 3)]
    assert starts == sorted(starts)  # each day follows the one before
    assert days.start_us(first) == first * spp_server.DAY_US - new * 60_000_000 >= last_until
    old_days = spp_server.ReportDays.fixed(old)
    for d in range(first - 4, first):  # every day before it as it was, cut at the change
        assert days.start_us(d) == min(old_days.start_us(d), days.start_us(first))
    # No time before last_until (paid, maybe settled) is in another day now.
    assert old_days.start_us(first) > last_until
    for t in [last_until - 1, last_until, days.start_us(first) - 1, days.start_us(first),
              days.start_us(first - 1) - 1, days.start_us(first - 1)]:
        day = sql_report_day(days, t)  # how runs cut it; and settlement's bounds agree
        assert days.start_us(day) <= t < days.start_us(day + 1)


def sql_report_day(days, t):
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        sql = f"SELECT {days.sql()} FROM (SELECT ? AS received_at_us)"
        return conn.execute(sql, (t,)).fetchone()[0]


def test_a_booked_figure_imported_while_settling_is_settled_as_it_now_is(store, db, monkeypatch):
    add_sessions(store, [("a", None, 1000, at(0))])
    pay(store, at(1, 0), pay_now="0", final="1")
    book_rows(store, [(day_text(0), "", 500)])
    staged = spp_server.write_in_chunks

    def import_meanwhile(*args):
        staged(*args)
        if count(db, "settlement_lines") == 1:  # the first attempt's lines are staged
            book_rows(store, [(day_text(0), "", 700)])

    monkeypatch.setattr(spp_server, "write_in_chunks", import_meanwhile)
    settlement = spp_server.settle(store)
    assert [line["final"] for line in settlement_lines(store, settlement)] == ["0.0000007"]
    assert rows(db, "SELECT id FROM settlements") == [(1,)]
    assert count(db, "settlement_lines") == 1  # the stale attempt's lines are gone


def test_a_run_recorded_meanwhile_fails_the_write_of_another(store, db):
    add_sessions(store, [("a", None, 1000, at(0))])
    with store.snapshot() as conn:
        plan = spp_server.plan_run(conn, at(1, 0), D("0.5"), D("1"), 0)
    pay(store, at(0, 12))
    with pytest.raises(spp_server.LedgerMoved):
        store.write(functools.partial(spp_server.record_run, plan, 2,
                                      {"a": spp_server.RunLine(1, 1000, 500)}))
    assert count(db, "payout_runs") == 1


def test_a_ledger_that_keeps_moving_is_one_line_and_status_1(store, db, monkeypatch):
    add_sessions(store, [("a", None, 1000, at(0))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "", 500)])

    def moved(*args):
        raise spp_server.LedgerMoved()

    monkeypatch.setattr(spp_server, "record_settlement", moved)
    code, out, err = ledger_command(spp_server.run_settle, db)
    assert (code, out, err.count("\n")) == (1, b"", 1) and "run it again" in err
    assert count(db, "settlements") == 0


# --- Only users who can be credited are paid (issue 22, 2) ---


def test_sessions_without_a_sub_and_the_deploy_check_are_never_paid(client, db):
    store = client.app.store
    check = spp_server.DEPLOY_CHECK_USER
    add_sessions(store, [("a", None, 3000, at(0)), ("", None, 1000, at(0)), ("", None, 1000, at(0)),
                         (check, None, 0, at(0))])
    pay(store, at(1, 0), pay_now="0.5", final="1")
    assert [line["user-id"] for line in run_lines(store, 1)] == ["a"]
    [run] = spp_server.ledger_summary(store)["runs"]
    assert (run["users"], run["sessions"], run["paid-now"]) == (1, 1, "0.0000015")
    assert (run["unattributed-sessions"], run["unattributed-estimated-revenue"]) == (2, "0.000002")
    book_rows(store, [(day_text(0), "", 10_000)])  # 3 : 2 by the estimates
    lines = settlement_lines(store, spp_server.settle(store))
    assert b"".join(spp_server.settlement_output(store, 1, "csv")).decode().replace("\r\n", "\n") \
        == ledger_illustration("csv", ("illustration", "unattributed"))  # docs/ledger.md
    assert [(line["user-id"], line["booked-part"], line["final"], line["top-up"], line["kind"])
            for line in lines] == [
        ("", "0.000004", "0", "0", "unattributed"), ("a", "0.000006", "0.000006", "0.0000045",
                                                      "settlement")]
    [pool] = spp_server.ledger_summary(store)["days"]
    assert (pool["paid-in-total"], pool["margin"], pool["unattributed-booked"]) == (
        "0.000006", "0.000004", "0.000004")
    for user in ("", check):
        got = spp_server.statement(store, user)
        assert got["totals"]["paid-now"] == "0" and "unattributed" in got
    assert "unattributed" not in spp_server.statement(store, "a")
    # The deploy check stays out of the reports too, but its own earnings show it.
    window = {"since": "2020-10-01", "until": "2020-10-02"}
    assert check not in {json.loads(line)["user-id"]
                         for line in export(client, **window).body.splitlines()}
    assert client.get("/totals", params=window).json["totals"][0]["sessions"] == 3
    recon_ = recon(client, **window).json
    assert recon_["summary"]["sessions"] == 3
    assert client.get(f"/users/{check}/earnings").json["sessions"] == 1
    # Paid nothing, they have nothing to hold; '' is no one and the deploy
    # check no person: neither is erased (renamed, its sessions would be paid).
    for user in ("", check):
        code, out, err = ledger_command(spp_server.run_hold, db, user, "--reason", "x")
        assert (code, out) == (2, b"") and "nothing to hold" in err
    code, _, err = ledger_command(spp_server.run_erase, db, check, "--even-if-owed")
    assert code == 2 and "nothing to erase" in err
    assert count(db, "ledger_holds") == count(db, "erasures") == 0
    assert spp_server.suspects(store, at(0, 0), at(2, 0))["users"] == 1  # only 'a'


# --- Limits and refusals (issue 22, 6) ---


@pytest.mark.parametrize("option", ["--until", "--pay-now-share", "--final-share"])
def test_a_long_bad_value_is_cut_short_in_the_refusal(store, db, option):
    args = dict(zip(["--until", "--pay-now-share", "--final-share"], pay_args()[1::2]))
    args[option] = "9" * 100_000
    code, out, err = ledger_command(spp_server.run_pay, db,
                                    *itertools.chain.from_iterable(args.items()))
    assert (code, out, err.count("\n")) == (2, b"", 1)
    assert err.startswith(f"spp_server.py pay: {option}: ") and len(err) < 300


def test_write_off_with_a_settlement_to_print_again_is_refused_not_ignored(store, db):
    add_sessions(store, [("a", None, 1000, at(0))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "", 500)])
    spp_server.settle(store)
    code, out, err = ledger_command(spp_server.run_settle, db, "--settlement", "1", "--write-off")
    assert (code, out) == (2, b"") and err.startswith("spp_server.py settle: --write-off: ")
    assert "nothing changed" in err


@pytest.mark.parametrize("url", ["/ledger/runs/1?format=", "/ledger/settlements/1?format=",
                                 "/earnings?since=2020-10-01&until=2020-10-02&format=",
                                 "/reconciliation?since=2020-10-01&until=2020-10-02"
                                 "&report-utc-offset="])
def test_an_empty_format_or_offset_is_refused_like_an_empty_since(client, url):
    store = client.app.store
    add_sessions(store, [("a", None, 1000, at(0))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "", 500)])
    spp_server.settle(store)
    assert_error(client.get(url, status=400), 400, url.rsplit("&", 1)[-1].split("?")[-1][:-1])


def test_a_user_id_that_starts_with_a_dash_is_told_to_follow_two_dashes(store, db, capsys):
    add_sessions(store, [("-x", None, 1000, at(0))])
    pay(store, at(1, 0))
    with pytest.raises(SystemExit) as exited:
        spp_server.run_statement(["-x", "--db", db], {}, io.BytesIO())
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "'--'" in err and "-- -x" in err and "required" not in err
    out = io.BytesIO()
    assert spp_server.run_statement(["--db", db, "--", "-x"], {}, out) == 0
    assert json.loads(out.getvalue())["runs"][0]["run-id"] == 1


def test_printing_a_recorded_run_or_settlement_again_needs_no_write_access(
        make_client, shared_dir, nobody_spp):
    db = make_backup(make_client, shared_dir / "ro")
    store = spp_server.Store(str(db), writer="thread")
    add_sessions(store, [("a", None, 1000, at(0)), ("b", None, 3000, at(0))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "", 2000)])
    spp_server.settle(store)
    run, settled = run_text(store, 1), b"".join(spp_server.settlement_output(store, 1, "csv"))
    store.close()
    db.chmod(0o444)
    # Its ledger journal too, as readable as the database (the reprint checks it).
    Path(spp_server.journal_path(str(db))).chmod(0o444)
    before = db.read_bytes()
    for args, expected in [(["pay", *pay_args("2020-10-02T00:00:00Z")], run),
                           (["settle", "--settlement", "1"], settled)]:
        done = subprocess.run(nobody_spp(*args, "--db", str(db)), capture_output=True, timeout=30)
        assert (done.returncode, done.stdout, done.stderr) == (0, expected, b"")
    assert db.read_bytes() == before


@pytest.mark.parametrize("age", [1, 2])
@pytest.mark.parametrize("args, field", [
    (pay_args(pay_now="0.95"), "--pay-now-share"),
    (pay_args(final="x" * 50), "--final-share"),
    (pay_args(until="2020-10-02T00:00:00Z", pay_now="0.5"), "--pay-now-share"),
])
def test_an_older_schema_is_not_upgraded_by_a_step_that_refuses(db, args, field, age):
    version = SCHEMA_VERSIONS[-1] - age
    if "0.5" in args and version < spp_server.LEDGER_SCHEMA_VERSION:
        pytest.skip("no ledger yet: no run to differ from")
    conn = sqlite3.connect(db, isolation_level=None)
    spp_server.enable_wal(conn, 1)
    spp_server.migrate(conn, spp_server.SCHEMA_PATH.read_text(), target=version)
    if version >= spp_server.LEDGER_SCHEMA_VERSION:  # a run recorded for that until, at 0.6
        conn.execute("INSERT INTO payout_runs VALUES "
                     "(1, 0, 0, ?, 0, '0.6', '0.9', 0, 0, 0, 0, 0, 0)",
                     (spp_server.parse_instant("2020-10-02T00:00:00Z"),))
    conn.close()
    code, out, err = ledger_command(spp_server.run_pay, db, *args)
    assert (code, out) == (2, b"") and err.startswith(f"spp_server.py pay: {field}: "), err
    assert rows(db, "PRAGMA user_version") == [(version,)]


# ---------------------------------------------------------------------------
# Payout ledger, settlements: the buffer released, properties over random months
# ---------------------------------------------------------------------------

# --- Nothing pending without a word (issue 22, 5) ---


def test_what_no_booked_row_can_settle_is_named_at_settle_in_the_summary_and_at_import(
        store, db, tmp_path):
    add_sessions(store, [("a", "1234", 3000, at(0)), ("b", "p2", 1000, at(0)),
                         ("c", None, 2000, at(0)), ("a", "1234", 5000, at(1))])
    pay(store, at(2, 0), pay_now="0.5", final="1")
    report = tmp_path / "booked.csv"
    report.write_text(booked_csv((day_text(0), "01234", "", "0.000004"),
                                 (day_text(1), "1234", "", "0.000004")))
    out = io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert spp_server.run_import_booked([str(report), "--db", db], {}, out) == 0
    [warning] = err.getvalue().splitlines()
    assert f"{day_text(0)} property 01234: booked 0.000004" in warning and "1234, p2" in warning
    code, lines, err = ledger_command(spp_server.run_settle, db)
    assert code == 0  # settled what it could; the rest is named
    assert err == ledger_illustration("text", ("illustration", "pending"))  # docs/ledger.md
    named = err.splitlines()
    assert any(f"{day_text(0)} property 01234 booked 0.000004 that matches no session" in line
               for line in named)
    for prop, sessions, estimated, paid in [("1234", 1, "0.000003", "0.0000015"),
                                            ("p2", 1, "0.000001", "0.0000005")]:
        assert any(f"{day_text(0)} property {prop}: {sessions} sessions estimated at {estimated} "
                   f"(paid now {paid}) stay pending" in line for line in named), named
    assert any(f"{day_text(0)}: 1 sessions estimated at 0.000002" in line for line in named)
    summary = spp_server.ledger_summary(store)
    assert [(p["day"], p["property-id"], p["sessions"])
            for p in summary["pending-without-booked"]] == [
        (day_text(0), "", 1), (day_text(0), "1234", 1), (day_text(0), "p2", 1)]
    assert summary["booked-without-sessions"] == [
        {"day": day_text(0), "property-id": "01234", "booked-revenue": "0.000004"}]


# --- Properties over random months ---

LEDGER_SETTINGS = settings(max_examples=15, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck))


def share_strategy():
    return st.integers(0, 10**6).map(lambda n: nanos_to_text(n * 1000))


@st.composite
def months(draw):
    """Random sessions over ten days, runs cutting them, booked figures with revisions."""
    sessions = draw(st.lists(st.tuples(
        st.sampled_from(["a", "b", "c", "d", "é"]), st.integers(0, 9), st.integers(0, 23),
        st.sampled_from([None, "p1", "p2"]),
        # Up to the largest estimate a postback may give.
        st.one_of(st.integers(0, 10**7), st.integers(0, spp_server.MAX_ESTIMATE_NANOS))),
        max_size=40))
    order = draw(st.sampled_from(["time", "clock steps"]))
    cuts = sorted(set(draw(st.lists(st.integers(1, 11 * 24), min_size=1, max_size=4))))
    final = draw(share_strategy())
    pay_nows = [draw(share_strategy().filter(lambda s: D(s) <= D(final))) for _ in cuts]
    by_property = draw(st.booleans())
    booked = draw(st.dictionaries(
        st.tuples(st.integers(0, 9), st.sampled_from(["p1", "p2", ""] if by_property else [""])),
        st.one_of(st.integers(0, 1000), st.integers(0, 10**13)), max_size=12))
    revisions = draw(st.dictionaries(st.sampled_from(sorted(booked)), st.integers(0, 10**13),
                                     max_size=4)) if booked else {}
    write_off = draw(st.booleans())
    # Issue 22: sessions that reach days after they were settled (a clock step
    # backwards), users held (and then released or not), balances written off
    # for their age, a user erased.
    late = draw(st.lists(st.tuples(st.sampled_from(["a", "b", "é"]), st.integers(0, 9),
                                   st.sampled_from([None, "p1"]), st.integers(0, 10**9)),
                         max_size=5))
    held = draw(st.sets(st.sampled_from(["a", "b", "c", "d", "é"]), max_size=2))
    hold_from = draw(st.integers(0, len(cuts) - 1))
    release = draw(st.sampled_from([None, "release", "write-off"]))
    age_off = draw(st.booleans())
    erased = draw(st.sampled_from([None, "a", "c"]))
    return (sessions, order, cuts, final, pay_nows, booked, revisions, write_off,
            late, held, hold_from, release, age_off, erased)


def check_ledger(store, db, final, write_off):
    """Every property the ledger promises, from the tables and from the sessions."""
    runs = rows(db, "SELECT id, after_session_id, last_session_id, sessions, estimated_nano, "
                    "paid_now_nano, deducted_nano, withheld_nano FROM payout_runs ORDER BY id")
    # Runs meet end to start; every session up to the last is in exactly one run.
    for previous, run in zip([(0, 0, 0)] + runs, runs):
        assert run[1] == previous[2]
    last = runs[-1][2] if runs else 0
    sessions = rows(db, "SELECT id, user_id, coalesce(property_id, ''), revenue_nano FROM sessions")
    for run_id, after, last_id, n, estimated, paid, deducted, withheld in runs:
        # A run's totals are its lines': no user it cannot credit (issue 22, 2).
        mine = [s for s in sessions if after < s[0] <= last_id
                and s[1] not in spp_server.UNCREDITED_USERS]
        assert (n, estimated) == (len(mine), sum(s[3] for s in mine))
        lines = run_lines(store, run_id)
        assert sum(int(line["sessions"]) for line in lines) == n
        assert sum(nanos(line["estimated-revenue"]) for line in lines) == estimated
        assert sum(nanos(line["paid-now"]) for line in lines) == paid - deducted - withheld
        assert sum(nanos(line["deducted"]) for line in lines) == deducted
        assert sum(nanos(line["withheld"]) for line in lines) == withheld
        # A held user is paid nothing now, and nothing is taken from them.
        assert all(nanos(line["deducted"]) == 0 for line in lines if nanos(line["withheld"]))
    assert rows(db, "SELECT coalesce(sum(sessions), 0) FROM payout_parts") == [
        (len([s for s in sessions if s[0] <= last and s[1] != spp_server.DEPLOY_CHECK_USER]),)]
    # Every settled pool: users get the final share of booked, less under a nano each.
    pools = rows(db, "SELECT day, property_id, by_property, booked_nano, sessions, "
                     "max(settlement_id) FROM settlement_days GROUP BY day, property_id")
    for day, prop, by_property, booked, settled_sessions, newest in pools:
        where = "day = ?" + (" AND property_id = ?" if by_property else "")
        params = (day, prop) if by_property else (day,)
        # A session that reached a settled day later (a clock step) is paid in
        # a later pool: a settled pool's sessions never change.
        assert rows(db, f"SELECT coalesce(sum(sessions), 0) FROM payout_parts WHERE {where}",
                    params) == [(settled_sessions,)]
        paid = dict(rows(db, f"SELECT user_id, sum(paid_now_nano) FROM payout_parts "
                             f"WHERE {where} GROUP BY user_id", params))
        lines = rows(db, "SELECT user_id, top_up_nano - carried_nano, written_off_nano - "
                         "written_back_nano, held FROM settlement_lines WHERE day = ? AND "
                         "property_id = ?", (day, prop))
        # A balance written off for its age: the user keeps it, as if written off when settled.
        aged = dict(rows(db, "SELECT user_id, sum(written_off_nano) FROM balance_write_off_lines "
                             "WHERE day = ? AND property_id = ? GROUP BY user_id", (day, prop)))
        held = {user for user, _, _, was_held in lines if was_held}
        # A held user's line moves nothing: their fate is the publisher's (release).
        assert all(moved == standing == 0 for _, moved, standing, was_held in lines if was_held)
        # Held users share nothing; the uncredited take their share to the margin.
        counted = [u for u in paid if u not in held]
        users = [u for u in counted if u not in spp_server.UNCREDITED_USERS]
        aged = sum(n for u, n in aged.items() if u not in held)
        moved = sum(m for u, m, _, _ in lines if u not in held) + aged
        standing = sum(w for u, _, w, _ in lines if u not in held) + aged
        parts = rows(db, "SELECT coalesce(sum(booked_part_nano), 0) FROM settlement_lines "
                         "WHERE settlement_id = ? AND day = ? AND property_id = ?", (newest, day, prop))
        if counted:
            assert parts == [(booked,)]
        # The share of the users who cannot be credited is the margin's (issue 22, 2).
        [(uncredited,)] = rows(
            db, f"SELECT coalesce(sum(booked_part_nano), 0) FROM settlement_lines "
                f"WHERE settlement_id = ? AND day = ? AND property_id = ? "
                f"AND user_id IN {spp_server.SQL_UNCREDITED}", (newest, day, prop))
        total = sum(paid[u] for u in users) + moved  # now + top-ups - balances carried
        due = Fraction(D(final)) * (booked - uncredited) if users else 0
        # What stands written off is what users hold above their final amounts:
        # a correction never charges it again, nor leaves it forgiven twice.
        assert due - len(users) <= total - standing <= due
        if not write_off:  # only balances written off for their age, maybe written back
            assert 0 <= standing <= aged
    # The statements add up to the ledger.
    summary = spp_server.ledger_summary(store)
    users = [u for (u,) in rows(db, "SELECT DISTINCT user_id FROM sessions")]
    statements = [spp_server.statement(store, u)["totals"] for u in users]
    for key in spp_server.LEDGER_TOTALS:
        assert sum(nanos(s[key]) for s in statements) == nanos(summary["totals"][key]), key
    owed = dict(rows(db, "SELECT user_id, owed_nano FROM ledger_balances"))
    for u in users:
        carried = rows(db, "SELECT coalesce(sum(carried_nano), 0) FROM settlement_lines "
                           "WHERE user_id = ?", (u,))[0][0]
        deducted = rows(db, "SELECT (SELECT coalesce(sum(deducted_nano), 0) FROM payout_deductions "
                            "WHERE user_id = :u) + (SELECT coalesce(sum(deducted_nano), 0) FROM "
                            "settlement_lines WHERE user_id = :u) + (SELECT coalesce(sum("
                            "written_off_nano), 0) FROM balance_write_off_lines WHERE user_id = :u)",
                        {"u": u})[0][0]
        assert owed.get(u, 0) == carried - deducted >= 0
        # A balance is taken back from top-ups too: a user who still owes was
        # credited no top-up in their last settlement.
        if owed.get(u, 0):
            assert rows(db, "SELECT count(*) FROM settlement_lines WHERE user_id = ? AND "
                            "top_up_nano > deducted_nano AND settlement_id = (SELECT "
                            "max(settlement_id) FROM settlement_lines WHERE user_id = ?)",
                        (u, u)) == [(0,)]


@contextlib.contextmanager
def month_in_store(sessions, order, booked):
    """A fresh database holding a random month's sessions (in time order, or
    in the drawn order: clock steps) and booked figures -> (store, db)."""
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "spp.db")
        store = spp_server.Store(db, writer="thread")
        try:
            timed = [(user, prop, nanos_, at(day, hour)) for user, day, hour, prop, nanos_ in sessions]
            if order == "time":
                timed.sort(key=lambda s: s[3])
            add_sessions(store, timed)
            book_rows(store, [(day_text(day), prop, n) for (day, prop), n in booked.items()])
            yield store, db
        finally:
            store.close()


def uncredited_month(month):
    """A random month where 'd' posted without a sub and 'c' is the deploy
    check: the month's holds and erasure name them too, when they do."""
    rename = {"d": "", "c": spp_server.DEPLOY_CHECK_USER}
    (sessions, order, cuts, final, pay_nows, booked, revisions, write_off,
     late, held, hold_from, release, age_off, erased) = month
    return ([(rename.get(user, user), *more) for user, *more in sessions], order, cuts, final,
            pay_nows, booked, revisions, write_off, late, {rename.get(u, u) for u in held},
            hold_from, release, age_off, rename.get(erased, erased))


def held_if_credited(store, held):
    """Hold the users of `held` (a set) that can be held -> those.  A user
    the ledger cannot credit has nothing to hold: refused (issue 22, 2 and 4)."""
    for user in sorted(held & set(spp_server.UNCREDITED_USERS)):
        with pytest.raises(spp_server.Invalid, match="nothing to hold"):
            spp_server.hold_user(store, user, "hold", "suspect")
    held = held - set(spp_server.UNCREDITED_USERS)
    for user in sorted(held):
        spp_server.hold_user(store, user, "hold", "suspect")
    return held


@given(st.one_of(months(), months().map(uncredited_month)))
@LEDGER_SETTINGS
def test_ledger_properties_hold_over_random_months(month):
    (sessions, order, cuts, final, pay_nows, booked, revisions, write_off,
     late, held, hold_from, release, age_off, erased) = month
    with month_in_store(sessions, order, booked) as (store, db):
        outputs = {}
        for i, (cut, pay_now) in enumerate(zip(cuts, pay_nows)):
            if i == hold_from:
                held = held_if_credited(store, held)
            run_id = pay(store, OCT + cut * HOUR_US, pay_now, final)
            outputs[run_id] = run_text(store, run_id)
            if cut % 2:
                spp_server.settle(store, write_off)
            if i == 0:  # the clock steps back: sessions on days maybe settled already
                add_sessions(store, [(u, prop, n, at(day, 23)) for u, day, prop, n in late])
        pays = len(outputs)
        run_id = pay(store, OCT + 12 * 24 * HOUR_US, pay_nows[-1], final)  # pays the late ones
        outputs[run_id] = run_text(store, run_id)
        cuts, pay_nows = [*cuts, 12 * 24], [*pay_nows, pay_nows[-1]]
        assert pays + 1 == len(outputs)
        spp_server.settle(store, write_off)
        if release:
            for user in sorted(held):
                spp_server.hold_user(store, user, release, "checked")
        if age_off:  # every balance counts as aged: a cutoff after now
            spp_server.write_off_balances(store, -1)
        # A revised report gives its days again whole, in the same breakdown.
        revised = {key: revisions.get(key, n) for key, n in booked.items()
                   if key[0] in {day for day, _ in revisions}}
        book_rows(store, [(day_text(day), prop, n) for (day, prop), n in revised.items()])
        spp_server.settle(store, write_off)
        for run_id, cut, pay_now in zip(outputs, cuts, pay_nows):
            assert pay(store, OCT + cut * HOUR_US, pay_now, final) == run_id
            assert run_text(store, run_id) == outputs[run_id]
        check_ledger(store, db, final, write_off)
        if erased in spp_server.UNCREDITED_USERS:  # the deploy check is no person
            with pytest.raises(spp_server.Invalid, match="nothing to erase"):
                spp_server.erase(store, erased, force=True)
        elif erased:  # every total stays exact under the pseudonym
            summary = spp_server.ledger_summary(store)
            spp_server.erase(store, erased, force=True)
            assert spp_server.ledger_summary(store) == summary
            assert rows(db, "SELECT count(*) FROM sessions WHERE user_id = ?", (erased,)) == [(0,)]
            check_ledger(store, db, final, write_off)


OFFSETS = st.sampled_from([None, 0, 330, -180, 840, -720])


@given(months(), st.lists(OFFSETS, min_size=4, max_size=4))
@LEDGER_SETTINGS
def test_report_offset_changes_keep_every_ledger_property_over_random_months(month, offsets):
    """Runs asking for other offsets: each session is paid in one part, on
    the day the recorded offsets give its receive time, and every ledger
    property still holds (issue 22, 1).  A session that reached a day
    already settled (a clock step) is paid on its run's last report day, as
    the offsets recorded cut it (issue 22, 3)."""
    sessions, order, cuts, final, pay_nows, booked, _, write_off, late, *_ = month
    with month_in_store(sessions, order, booked) as (store, db):
        settled_before = {}  # run -> the days settled when it was computed
        for i, (cut, pay_now, offset) in enumerate(zip([*cuts, 12 * 24], [*pay_nows, final],
                                                       [*offsets[:len(cuts)], None])):
            settled = {day for (day,) in rows(db, "SELECT day FROM settlement_days")}
            try:
                run_id = pay(store, OCT + cut * HOUR_US, pay_now, final, offset)
            except spp_server.Invalid as refused:  # a change that has not started yet
                assert refused.field == "report-utc-offset"
                run_id = pay(store, OCT + cut * HOUR_US, pay_now, final, None)
            settled_before[run_id] = settled
            if cut % 2:
                spp_server.settle(store, write_off)
            if i == 0:  # the clock steps back: sessions on days maybe settled already
                add_sessions(store, [(u, prop, n, at(day, 23)) for u, day, prop, n in late])
        spp_server.settle(store, write_off)
        days = spp_server.recorded_report_days(store, 0)
        runs = rows(db, "SELECT id, after_session_id, last_session_id, until_us FROM payout_runs")
        expected = Counter()
        for sid, user, prop, t, day in rows(
                db, f"SELECT id, user_id, coalesce(property_id, ''), received_at_us, "
                    f"{days.sql()} FROM sessions"):
            assert days.start_us(day) <= t < days.start_us(day + 1) and days.day_of(t) == day
            run = [(r, until) for r, after, last, until in runs if after < sid <= last]
            if run:
                [(run_id, until)] = run
                if day_text(day - OCT // spp_server.DAY_US) in settled_before[run_id]:
                    day = days.day_of(until - 1)
                expected[run_id, day_text(day - OCT // spp_server.DAY_US), prop, user] += 1
        assert dict(expected) == {tuple(key): n for *key, n in rows(
            db, "SELECT run_id, day, property_id, user_id, sessions FROM payout_parts")}
        check_ledger(store, db, final, write_off)


@given(months().map(uncredited_month))
@LEDGER_SETTINGS
def test_only_users_who_can_be_credited_are_paid_over_random_months(month):
    """Issue 22, 2: no run line, pay-now, top-up or balance for '' or the
    deploy check; ''s share of a booked figure is the margin's; the deploy
    check's sessions are in no part at all."""
    sessions, order, cuts, final, pay_nows, booked, _, write_off, *_ = month
    with month_in_store(sessions, order, booked) as (store, db):
        for cut, pay_now in zip(cuts, pay_nows):
            run_id = pay(store, OCT + cut * HOUR_US, pay_now, final)
            assert {line["user-id"] for line in run_lines(store, run_id)}.isdisjoint(
                {"", spp_server.DEPLOY_CHECK_USER})
            if cut % 2:
                spp_server.settle(store, write_off)
        spp_server.settle(store, write_off)
        uncredited = ("", spp_server.DEPLOY_CHECK_USER)
        assert rows(db, "SELECT count(*) FROM payout_parts WHERE user_id = ?",
                    (spp_server.DEPLOY_CHECK_USER,)) == [(0,)]
        for table in ("payout_parts", "settlement_lines"):
            assert rows(db, f"SELECT coalesce(sum(paid_now_nano), 0) FROM {table} "
                            "WHERE user_id IN (?, ?)", uncredited) == [(0,)]
        assert rows(db, "SELECT coalesce(sum(final_nano + top_up_nano + carried_nano "
                        "+ written_off_nano), 0) FROM settlement_lines WHERE user_id IN (?, ?)",
                    uncredited) == [(0,)]
        for (settlement_id,) in rows(db, "SELECT id FROM settlements"):  # each line its kind
            assert all((line["kind"] == "unattributed") == (line["user-id"] in uncredited)
                       for line in settlement_lines(store, settlement_id))
        assert rows(db, "SELECT count(*) FROM ledger_balances WHERE user_id IN (?, ?)",
                    uncredited) == [(0,)]
        summary = spp_server.ledger_summary(store)
        for run in summary["runs"]:  # a run's totals are its lines'; '' is shown apart
            unpaid = rows(db, "SELECT count(*), coalesce(sum(revenue_nano), 0) FROM sessions s "
                              "JOIN payout_runs r ON s.id > r.after_session_id "
                              "AND s.id <= r.last_session_id WHERE r.id = ? AND s.user_id = ''",
                          (run["run-id"],))[0]
            assert (run["unattributed-sessions"], nanos(run["unattributed-estimated-revenue"])) \
                == unpaid
        for pool in summary["days"]:  # what '' would have had is the margin's
            credited = rows(db, "SELECT coalesce(sum(booked_part_nano), 0), count(*) "
                                "FROM settlement_lines WHERE settlement_id = ? AND day = ? "
                                "AND property_id = ? AND user_id <> ''",
                            (pool["settlement-id"], pool["day"], pool["property-id"]))[0]
            paid_in_total = nanos(pool["paid-in-total"])
            assert nanos(pool["unattributed-booked"]) + credited[0] in (
                nanos(pool["booked-revenue"]), 0)
            if not write_off and credited[1]:
                assert paid_in_total <= Fraction(D(final)) * credited[0] or any(
                    n for (n,) in rows(db, "SELECT count(*) FROM settlement_days WHERE day = ? "
                                           "AND property_id = ? AND settlement_id < ?",
                                       (pool["day"], pool["property-id"], pool["settlement-id"])))
        check_ledger(store, db, final, write_off)


# ---------------------------------------------------------------------------
# Payout ledger, adjustments: balances that end, holds, erasure
# ---------------------------------------------------------------------------

# --- Balances that end, and an honest margin (issue 22, section 3) ---


def test_a_carried_balance_is_taken_back_from_later_top_ups_not_only_pay_now(store, db):
    # Day 0 booked low: a carries 300; day 1 booked high: a's top-up repays it first.
    add_sessions(store, [("a", None, 1000, at(0)), ("a", None, 1000, at(1))])
    pay(store, at(2, 0), pay_now="0.6", final="0.6")
    book_rows(store, [(day_text(0), "", 500)])
    first = settlement_lines(store, spp_server.settle(store))
    assert [(l["carried"], l["top-up"]) for l in first] == [("0.0000003", "0")]
    book_rows(store, [(day_text(1), "", 2000)])
    [line] = settlement_lines(store, spp_server.settle(store))
    # final 1200, paid now 600: a top-up of 600, 300 of it taken back.
    assert (line["top-up"], line["deducted"]) == ("0.0000003", "0.0000003")
    totals = spp_server.statement(store, "a")["totals"]
    assert (totals["owed"], totals["deducted"], totals["topped-up"]) == ("0", "0.0000003",
                                                                         "0.0000003")
    assert rows(db, "SELECT owed_nano FROM ledger_balances WHERE user_id = 'a'") == [(0,)]


def test_a_balance_carried_and_a_top_up_in_one_settlement_are_netted(store):
    add_sessions(store, [("a", None, 1000, at(0)), ("a", None, 1000, at(1))])
    pay(store, at(2, 0), pay_now="0.5", final="1")
    book_rows(store, [(day_text(0), "", 2000), (day_text(1), "", 100)])
    lines = settlement_lines(store, spp_server.settle(store))
    assert [(l["top-up"], l["carried"], l["deducted"]) for l in lines] == [
        ("0.0000011", "0", "0.0000004"), ("0", "0.0000004", "0")]
    assert spp_server.statement(store, "a")["totals"]["owed"] == "0"


@pytest.mark.parametrize("revised, top_up, carried, written_off", [
    (600_000_000, "0", "0", "-0.09"),      # the issue's case: holds 0.6, final 0.54
    (800_000_000, "0.12", "0", "-0.15"),   # final 0.72 above what was paid: write-off undone
    (300_000_000, "0", "0.18", "0"),       # lower still: the new shortfall only is carried
    (500_000_000, None, None, None),       # unchanged: not settled again
])
def test_a_correction_accounts_for_what_was_written_off(store, db, revised, top_up, carried,
                                                        written_off):
    add_sessions(store, [("a", None, 1_000_000_000, at(0))])
    pay(store, at(1, 0), pay_now="0.6", final="0.9")
    book_rows(store, [(day_text(0), "", 500_000_000)])
    [first] = settlement_lines(store, spp_server.settle(store, write_off=True))
    assert (first["final"], first["written-off"]) == ("0.45", "0.15")
    book_rows(store, [(day_text(0), "", revised)])
    settlement_id = spp_server.settle(store)
    if top_up is None:
        assert settlement_id is None
        return
    [line] = settlement_lines(store, settlement_id)
    assert (line["kind"], line["top-up"], line["carried"], line["written-off"]) == (
        "correction", top_up, carried, written_off)
    # What stands written off is what the user holds above the new final amount.
    totals = spp_server.statement(store, "a")["totals"]
    held = nanos("0.6") + nanos(totals["topped-up"]) - nanos(totals["carried"])
    assert held - nanos(totals["written-off"]) == nanos(line["final"])


def test_balances_older_than_a_chosen_age_are_written_off_recorded_and_not_charged_again(
        store, db, clock):
    add_sessions(store, [("a", None, 1000, at(0)), ("a", None, 1000, at(1)),
                         ("a", None, 1000, at(2))])
    clock.set("2026-01-01T00:00:00Z")
    pay(store, at(1, 0), pay_now="0.6", final="1")
    book_rows(store, [(day_text(0), "", 300)])
    spp_server.settle(store)  # 600 paid now, final 300: 300 carried
    clock.set("2026-03-01T00:00:00Z")
    pay(store, at(2, 0), pay_now="0.6", final="1")  # the 300 taken back from its 600
    assert rows(db, "SELECT owed_nano FROM ledger_balances") == [(0,)]
    book_rows(store, [(day_text(1), "", 100)])
    spp_server.settle(store)  # 500 carried on 1 March
    pay(store, at(3, 0), pay_now="0.1", final="1")  # 100 taken back: 400 owed
    clock.set("2026-04-15T00:00:00Z")
    code, out, err = ledger_command(spp_server.run_write_off_balances, db, "--older-than", "60d")
    assert (code, out, err) == (0, b"write-off-id,user-id,day,property-id,written-off\r\n",
                                "spp_server.py write-off-balances: nothing to write off\n")
    code, out, err = ledger_command(spp_server.run_write_off_balances, db, "--older-than", "30d")
    assert (code, err) == (0, "")
    assert out == (b"write-off-id,user-id,day,property-id,written-off\r\n"
                   + f"1,a,{day_text(1)},,0.0000004\r\n".encode())
    statement = spp_server.statement(store, "a")
    assert statement["balance-write-offs"] == [{
        "write-off-id": 1, "created-at": "2026-04-15T00:00:00Z", "day": day_text(1),
        "property-id": "", "written-off": "0.0000004"}]
    assert (statement["totals"]["owed"], statement["totals"]["written-off"]) == ("0", "0.0000004")
    # Run again: nothing more.
    assert ledger_command(spp_server.run_write_off_balances, db, "--older-than", "30d")[0] == 0
    assert count(db, "balance_write_offs") == 1
    # Gamezop revises day 1 up: the user holds 600 - 500 + 400 forgiven = 500 for it.
    book_rows(store, [(day_text(1), "", 700)])
    [line] = settlement_lines(store, spp_server.settle(store))
    assert (line["final"], line["top-up"], line["carried"], line["written-off"]) == (
        "0.0000007", "0.0000002", "0", "-0.0000004")


def test_the_margin_is_shown_with_and_without_balances_not_yet_taken_back(store):
    add_sessions(store, [("a", None, 1000, at(0)), ("b", None, 1000, at(0))])
    pay(store, at(1, 0), pay_now="0.8", final="0.9")
    book_rows(store, [(day_text(0), "", 1000)])  # finals 450 each: 350 carried each
    spp_server.settle(store)
    margin = spp_server.ledger_summary(store)["margin"]
    # Paid out 1600; counted as recovered, 700 comes back: 1000 - 900.
    assert margin == {"booked-revenue": "0.000001", "paid-in-total": "0.0000009",
                      "margin": "0.0000001", "owed": "0.0000007",
                      "margin-without-owed": "-0.0000006"}
    day = spp_server.ledger_summary(store)["days"][0]
    assert (day["paid-in-total"], day["margin"]) == ("0.0000009", "0.0000001")


# --- A hold for suspect users (issue 22, section 4) ---


def hold(db, action, user, reason="farming?", *more):
    run = spp_server.run_hold if action == "hold" else functools.partial(
        spp_server.run_hold, action="release")
    code, out, err = ledger_command(run, db, user, "--reason", reason, *more)
    assert err == ""
    return code, list(csv.DictReader(io.StringIO(out.decode())))


@pytest.mark.parametrize("write_off", [False, True])
def test_a_held_users_pay_now_is_withheld_recorded_and_released_or_written_off(
        store, db, clock, write_off):
    add_sessions(store, [("bot", None, 1000, at(0)), ("a", None, 1000, at(0)),
                         ("bot", None, 3000, at(2))])
    code, [record] = hold(db, "hold", "bot", "200 sessions a day")
    assert (code, record["action"], record["reason"], record["amount"]) == (
        0, "hold", "200 sessions a day", "0")
    assert record["at"] == spp_server.iso_utc(clock.us)
    assert hold(db, "hold", "bot", "again") == (0, [record])  # asked again: the same record
    pay(store, at(1, 0), pay_now="0.5", final="0.9")
    lines = {line["user-id"]: line for line in run_lines(store, 1)}
    assert (lines["bot"]["paid-now"], lines["bot"]["withheld"]) == ("0", "0.0000005")
    assert (lines["a"]["paid-now"], lines["a"]["withheld"]) == ("0.0000005", "0")
    statement = spp_server.statement(store, "bot")
    assert statement["runs"][0]["withheld"] == "0.0000005"
    assert [h["action"] for h in statement["holds"]] == ["hold"]
    assert statement["totals"]["withheld"] == "0.0000005"
    clock.set("2026-11-24T08:00:00Z")
    more = ("--write-off",) if write_off else ()
    code, [released] = hold(db, "release", "bot", "a real player after all", *more)
    assert (code, released["action"], released["amount"]) == (
        0, "write-off" if write_off else "release", "0.0000005")
    assert hold(db, "release", "bot", "twice", *more) == (0, [released])
    pay(store, at(3, 0), pay_now="0.5", final="0.9")  # released: paid again
    [line] = run_lines(store, 2)
    assert (line["paid-now"], line["withheld"]) == ("0.0000015", "0")
    totals = spp_server.statement(store, "bot")["totals"]
    assert (totals["withheld"], totals["released"], totals["withheld-written-off"]) == (
        ("0", "0", "0.0000005") if write_off else ("0", "0.0000005", "0"))
    assert [(h["action"], h["reason"]) for h in spp_server.statement(store, "bot")["holds"]] == [
        ("hold", "200 sessions a day"),
        ("write-off" if write_off else "release", "a real player after all")]


def test_releasing_a_user_not_held_or_without_a_reason_is_refused(store, db):
    code, out, err = ledger_command(functools.partial(spp_server.run_hold, action="release"),
                                    db, "u", "--reason", "x")
    assert (code, out) == (2, b"") and "is not held" in err
    code, _, err = ledger_command(spp_server.run_hold, db, "u", "--reason", " ")
    assert code == 2 and "--reason" in err and count(db, "ledger_holds") == 0


def test_the_users_worth_a_look_are_those_far_outside_the_others_with_the_figures(store, db):
    def session(user, day, nanos=1000, duration=100):
        return (f"w-{next(_ids)}", user, None, "IN", 1, duration, nanos, at(day), "{}")

    sessions = [session(f"u{n}", day) for n in range(8) for day in range(3) for _ in range(2)]
    sessions += [session("bot", 1) for _ in range(50)]
    sessions += [session("whale", day, nanos=1_000_000) for day in range(3) for _ in range(2)]
    sessions += [session("quick", day, duration=3) for day in range(3) for _ in range(2)]
    store.write(lambda conn, _: conn.executemany(spp_server.STORE_SQL["insert_session"], sessions))
    hold(db, "hold", "bot")
    code, out, err = ledger_command(spp_server.run_suspects, db, "--since",
                                    spp_server.iso_utc(at(0, 0)), "--until", spp_server.iso_utc(at(3, 0)))
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["users"] == 11
    assert report["typical"] == {
        "sessions-per-day": {"median": "2.00", "spread": "0.20"},
        "revenue-per-session": {"median": "0.000001000", "spread": "0.000000100"},
        "mean-duration-s": {"median": "100.0", "spread": "10.0"}}
    assert [(s["user-id"], s["held"], s["sessions-per-day"], s["revenue-per-session"],
             s["mean-duration-s"], [(o["figure"], o["direction"]) for o in s["outside"]])
            for s in report["suspects"]] == [
        ("whale", False, "2.00", "0.001000000", "100.0", [("revenue-per-session", "above")]),
        ("bot", True, "50.00", "0.000001000", "100.0", [("sessions-per-day", "above")]),
        ("quick", False, "2.00", "0.000001000", "3.0", [("mean-duration-s", "below")])]
    assert report["suspects"][1]["outside"][0]["spreads"] == "240.0"


@pytest.mark.parametrize("command, argv, said", [
    # A ledger step refuses it as its other options: one line, nothing changed.
    ("pay", ["--until", "soon", "--pay-now-share", "0.5", "--final-share", "0.9"],
     ["spp_server.py pay: --until: must be ", "not 'soon'; nothing changed"]),
    # A report, as export and reconcile: a usage error.
    ("suspects", ["--since", "soon"], ["usage: ", "spp_server.py suspects: error: --since/--until"]),
    ("export", ["--since", "soon", "--until", "2026-11-02"],
     ["usage: ", "spp_server.py export: error: --since"])])
def test_a_time_that_is_no_time_is_refused_with_status_2_and_the_database_untouched(
        tmp_path, command, argv, said):
    db = tmp_path / "absent.db"  # never opened: the refusal comes first
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = spp_server.COMMANDS[command][0]([*argv, "--db", str(db)], {}, io.BytesIO())
        except SystemExit as exited:  # argparse's usage error
            status = exited.code
    lines = err.getvalue().splitlines()
    assert status == 2 and lines[0].startswith(said[0]) and said[1] in lines[-1], lines
    assert command != "pay" or len(lines) == 1, lines
    assert not db.exists()


def test_at_settlement_a_held_users_estimates_take_no_share_of_the_others(store, db):
    add_sessions(store, [("a", None, 1000, at(0)), ("bot", None, 9000, at(0))])
    pay(store, at(1, 0), pay_now="0.5", final="1")  # a: 500 paid now
    hold(db, "hold", "bot")
    book_rows(store, [(day_text(0), "", 1000)])  # Gamezop booked only a's session
    lines = {l["user-id"]: l for l in settlement_lines(store, spp_server.settle(store))}
    assert (lines["a"]["booked-part"], lines["a"]["top-up"], lines["a"]["carried"]) == (
        "0.000001", "0.0000005", "0")
    assert (lines["bot"]["kind"], lines["bot"]["booked-part"], lines["bot"]["carried"]) == (
        "held", "0", "0")
    # Released later, a correction of the day still leaves the bot out of it.
    hold(db, "release", "bot")
    book_rows(store, [(day_text(0), "", 2000)])
    lines = {l["user-id"]: l for l in settlement_lines(store, spp_server.settle(store))}
    assert (lines["a"]["booked-part"], lines["bot"]["booked-part"], lines["bot"]["kind"]) == (
        "0.000002", "0", "held")


# --- Erasure on request (issue 22, section 7) ---

ERASED = "erase-me-7f3aé"


def file_bytes(db):
    """The database file, its WAL and shared-memory files and its ledger
    journal, as they are on disk."""
    return b"".join(Path(path).read_bytes() for path in (
        db, db + "-wal", db + "-shm", spp_server.journal_path(db)) if os.path.exists(path))


def erasable_month(client, clock, store, db):
    """ERASED and 'keep' with sessions paid and settled (nothing pending or
    owed), a conflicting duplicate and a rejected postback of ERASED, and the
    id left in free space by an older version that deleted without zeroing."""
    clock.set("2020-10-01T10:00:00Z")
    first = postback(user_id=ERASED, your_estimated_revenue="0.001", property_id=None)
    post(client, first)
    post(client, {**first, "your-estimated-revenue": "0.002"})  # a conflict
    post(client, postback(user_id=ERASED, your_estimated_revenue="0.003", property_id=None))
    post(client, postback(user_id="keep", your_estimated_revenue="0.004", property_id=None))
    escaped = json.dumps(postback(user_id=ERASED, your_estimated_revenue="x"), ensure_ascii=True)
    post(client, escaped.replace("erase", "\\u0065rase"), status=400)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as raw:
        raw.execute("PRAGMA secure_delete = OFF")
        raw.execute("INSERT INTO rejected (received_at_us, field, reason, raw_body) "
                    "VALUES (1, 'x', 'y', ?)", (ERASED.encode() * 50,))
        raw.execute("DELETE FROM rejected WHERE received_at_us = 1")
    clock.set("2026-11-23T10:00:00Z")
    hold(db, "hold", ERASED, f"{ERASED}: too many sessions?")  # a reason that names them
    hold(db, "release", ERASED, "fine")
    pay(store, at(1, 0), pay_now="0.5", final="0.9")
    book_rows(store, [(day_text(0), "", 8_000_000)])
    spp_server.settle(store)
    assert ERASED.encode() in file_bytes(db)
    assert ERASED.encode() in Path(spp_server.journal_path(db)).read_bytes()  # its lines


def test_an_erased_user_leaves_no_trace_in_the_file_and_every_total_stays_exact(
        client, clock, store, db):
    erasable_month(client, clock, store, db)
    before = spp_server.ledger_summary(store)
    keep = spp_server.statement(store, "keep")
    run_before = run_lines(store, 1)
    code, out, err = ledger_command(spp_server.run_erase, db, ERASED)
    assert (code, err) == (0, "")
    assert out == b"erased: 2 session(s), 1 rejected and 1 conflicting postback(s); the file is compacted\n"
    for text in (ERASED, json.dumps(ERASED), ERASED.encode("utf-16-le").decode("latin-1")):
        assert text.encode("utf-8") not in file_bytes(db)
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0
    # Every money figure is what it was; the user is a pseudonym no one can reverse.
    assert spp_server.ledger_summary(store) == before
    assert spp_server.statement(store, "keep") == keep
    run_after = run_lines(store, 1)
    assert [{**line, "user-id": ""} for line in run_after] == [
        {**line, "user-id": ""} for line in run_before]
    [pseudonym] = {line["user-id"] for line in run_after} - {"keep"}
    assert pseudonym.startswith("erased:") and ERASED not in pseudonym
    assert rows(db, "SELECT count(*), min(raw_body) FROM sessions WHERE user_id = ?",
                (pseudonym,)) == [(2, "")]
    assert spp_server.statement(store, ERASED)["runs"] == []
    # Recorded, but not whose.
    assert rows(db, "SELECT sessions, forced FROM erasures") == [(2, 0)]
    # Asked again (after a crash before the compaction, say): nothing more, no second record.
    code, out, _ = ledger_command(spp_server.run_erase, db, ERASED)
    assert (code, out) == (0, b"erased: 0 session(s), 0 rejected and 0 conflicting postback(s); "
                              b"the file is compacted\n")
    assert count(db, "erasures") == 1


def test_a_cleared_body_is_overwritten_not_left_in_free_space(store, db):
    marker = "cleared-body-marker-" * 20

    def op(conn, _):
        conn.execute(spp_server.STORE_SQL["insert_session"],
                     ("c-1", "u", None, "IN", 1, 10, 5, at(0), marker))
    with contextlib.closing(spp_server.connect(db, 5000)) as conn:
        store.write(op)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the body is in the file itself
        assert marker.encode() in file_bytes(db)
        store.write(lambda conn, _: conn.execute(spp_server.RETENTION_SQL["clear_bodies"], (0, 10, at(1))))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert marker.encode() not in file_bytes(db)


@pytest.mark.parametrize("body, names", [
    (b'{"user-id": "a", "session-id": "s"}', True),
    (b'{"user-id": "\\u0061", "x": 1}', True),
    (b'{"user-id": "bob", "session-id": "a-1"}', False),  # "a" inside other strings
    (b'{"user-id": "bob", "note": "a"}', True),           # "a" as a string of its own
    (b'{"user-id": "a', True),                            # cut short: not JSON
    (b'\xff\xfe not json, no such letter', False),
    (b'\xff\xfe not json, and the letter a', True),    # not JSON: any occurrence, to be safe
])
def test_an_erasure_finds_the_postbacks_that_name_the_user_and_only_those(body, names):
    assert spp_server.names_user(body, "a") is names


def test_erasing_a_user_still_owed_or_owing_is_refused_unless_forced(store, db):
    add_sessions(store, [("u", None, 1000, at(0)), ("u", None, 1000, at(3))])
    pay(store, at(1, 0))
    ledger_before = ledger_counts(db)
    code, out, err = ledger_command(spp_server.run_erase, db, "u")
    assert (code, out) == (2, b"")
    assert "0.0000006 pending" in err and "1 session(s) not paid" in err and "nothing changed" in err
    assert ledger_counts(db) == ledger_before and count(db, "erasures") == 0
    assert rows(db, "SELECT count(*) FROM sessions WHERE user_id = 'u'") == [(2,)]
    code, _, err = ledger_command(spp_server.run_erase, db, "u", "--even-if-owed")
    assert (code, err) == (0, "")
    assert rows(db, "SELECT count(*) FROM sessions WHERE user_id = 'u'") == [(0,)]
    assert rows(db, "SELECT sessions, forced FROM erasures") == [(2, 1)]
    # The unattributed '' is no one: never erased.
    add_sessions(store, [("", None, 5, at(0))])
    code, _, err = ledger_command(spp_server.run_erase, db, "", "--even-if-owed")
    assert code == 2 and "must not be empty" in err and count(db, "erasures") == 1


# ---------------------------------------------------------------------------
# Payout ledger, statements: the commands, the read endpoints, the documented routine
# ---------------------------------------------------------------------------

def test_pay_and_settle_commands_print_the_lines_and_asking_again_pays_nothing(store, db):
    add_sessions(store, [("a", None, 1_000_000, at(0)), ("b,c", None, 3_000_000, at(1))])
    book_rows(store, [(day_text(0), "", 2_000_000)])
    code, out, err = ledger_command(spp_server.run_pay, db, *pay_args())
    assert (code, err) == (0, "")
    assert out == (b"run-id,user-id,sessions,estimated-revenue,paid-now,deducted,withheld\r\n"
                   b"1,a,1,0.001,0.0006,0,0\r\n1,\"b,c\",1,0.003,0.0018,0,0\r\n")
    again = ledger_command(spp_server.run_pay, db, *pay_args("1601683200", "0.600", "0.9"))
    assert again == (0, out, "")
    assert count(db, "payout_runs") == 1
    code, out, err = ledger_command(spp_server.run_settle, db, "--format", "ndjson")
    assert code == 0 and err == ""
    [line] = [json.loads(line) for line in out.splitlines()]
    assert (line["user-id"], line["final"], line["top-up"]) == ("a", "0.0018", "0.0012")
    code, out, err = ledger_command(spp_server.run_settle, db)
    # Nothing new: the header only, and how to print the newest again (after a crash, say).
    assert (code, out.count(b"\r\n"), err) == (0, 1, "spp_server.py settle: nothing to settle "
                                              "(settlement 1 is the newest: settle --settlement 1 "
                                              "prints it again)\n")
    code, again, err = ledger_command(spp_server.run_settle, db, "--settlement", "1", "--format",
                                      "ndjson")
    assert (code, json.loads(again), err) == (0, line, "")
    code, out, err = ledger_command(spp_server.run_settle, db, "--settlement", "2")
    assert (code, out) == (2, b"") and err.startswith("spp_server.py settle: --settlement: ")


@pytest.mark.parametrize("args, field", [
    (pay_args(until="yesterday"), "--until"),
    (pay_args(until="2999-01-01"), "--until"),
    (pay_args(pay_now="60%"), "--pay-now-share"),
    (pay_args(final="1e0"), "--final-share"),
    (pay_args(pay_now="0.95"), "--pay-now-share"),
])
def test_a_refused_pay_command_is_one_line_status_2_and_changes_nothing(store, db, capsys, args, field):
    add_sessions(store, [("a", None, 1000, at(0))])
    code, out, err = ledger_command(spp_server.run_pay, db, *args)
    assert (code, out, err.count("\n")) == (2, b"", 1)
    assert err.startswith(f"spp_server.py pay: {field}: ") and "Traceback" not in err
    assert count(db, "payout_runs") == 0


def test_ledger_commands_on_a_missing_database_are_one_line_and_create_nothing(tmp_path, capsys):
    db = str(tmp_path / "missing.db")
    for run, args in [(spp_server.run_pay, pay_args()), (spp_server.run_settle, []),
                      (spp_server.run_statement, ["a"]), (spp_server.run_ledger, [])]:
        code, out, err = ledger_command(run, db, *args)
        assert (code, out, err.count("\n")) == (1, b"", 1) and "no database" in err
    assert list(tmp_path.iterdir()) == []


def test_statement_and_ledger_commands_match_the_endpoints_byte_for_byte(client, db):
    store = client.app.store
    add_sessions(store, [("a", "p", 1_000_000, at(0)), ("ユ/ー", "p", 3_000_000, at(0))])
    pay(store, at(1, 0))
    book_rows(store, [(day_text(0), "p", 1_000_000)])
    spp_server.settle(store)
    for user in ("a", "ユ/ー", "nobody"):
        res = client.get(f"/users/{quote(user, safe='')}/statement")
        assert res.content_type == "application/json"
        assert ledger_command(spp_server.run_statement, db, user) == (0, res.body, "")
    res = client.get("/ledger")
    assert ledger_command(spp_server.run_ledger, db) == (0, res.body, "")
    assert res.json["totals"]["carried"] == "0.0015"  # 0.6 x 4M paid, 0.9 x 1M due
    assert client.get("/ledger/runs/1").body == run_text(store, 1, "ndjson")
    assert client.get("/ledger/runs/1", params={"format": "csv"}).body == run_text(store, 1)
    assert client.get("/ledger/settlements/1", params={"format": "csv"}).body == b"".join(
        spp_server.settlement_output(store, 1, "csv"))


def test_unknown_runs_and_bad_formats_are_json_errors_naming_the_field(client):
    assert_error(client.get("/ledger/runs/7", status=404), 404, "run-id")
    assert_error(client.get("/ledger/settlements/7", status=404), 404, "settlement-id")
    assert_error(client.get("/ledger/runs/1?format=xml", status=400), 400, "format")
    assert_error(client.get("/ledger/runs/x", status=404), 404)


def test_the_lines_of_a_run_need_the_read_token(make_client):
    client = make_client(read_tokens=(b"reader",))
    add_sessions(client.app.store, [("a", None, 1000, at(0))])
    pay(client.app.store, at(1, 0))
    for url in ("/ledger/runs/1", "/ledger/settlements/1"):
        assert_error(client.get(url, status=401), 401)
    assert json.loads(client.get("/ledger/runs/1", headers=bearer("reader")).body)["user-id"] == "a"


def test_ledger_reads_use_their_indexes(store, db):
    for name, params in [("user_run_lines", ("a",)), ("user_settlement_lines", ("a",)),
                         ("run_lines", (1,))]:
        assert "SCAN" not in query_plan(db, name, params), name
    # settle_pools' queries over every pool: one index search per day or pool
    # of the JSON list, or per run and day (the runs are scanned, not their parts).
    days, pools = ('["d"]',), ('[["d", "p"]]',)
    for name, params in [("parts_of_days", days), ("run_day_property_parts", days),
                         ("settled_pools_of_days", days), ("earlier_pool_lines", pools),
                         ("pools_balance_write_offs", pools),
                         ("sessions_of_days", ('[["d", 0, 1]]',))]:
        steps = query_plan(db, name, params).split(" / ")
        assert any(step.startswith("SEARCH") for step in steps), (name, steps)
        assert [step for step in steps if step.startswith("SCAN") and "VIRTUAL TABLE" not in step
                and not step.startswith("SCAN r")] == [], (name, steps)


# --- The documented routine, run as written ---


def documented_scripts():
    """The shell scripts of docs/ledger.md, in order: the weekly payout, the monthly settlement."""
    text = (HERE / "docs" / "ledger.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(#!/bin/sh\n.*?)```", text, re.S)


# The routines' commands of spp_server.py.  Importing the module is most of
# what a short command costs, and the routine tests run hundreds of commands:
# so one process per test worker imports it once (ROUTINE_COMMANDS), and each
# command is a process forked from it, handed the argv, environment, working
# directory, umask, standard streams and process group of the $SPP the
# routine started (ROUTINE_SHIM), which exits with the command's status.
# The documentation's examples run their commands this way too (DocSandbox).
# In a routine, each command counts the commands run (in a file), and SIGKILLs the
# routine's whole process group and itself just before the command numbered
# SHIM_KILL_AT, just after the step it runs is committed (before its lines
# are written), or just after it.
ROUTINE_COMMANDS = """
import ast, os, signal, socket, sys, traceback
sys.path[0] = sys.argv[1]  # spp_server from the checkout, nothing from the working directory
import spp_server
listener = socket.socket(fileno=int(sys.argv[2]))

def command(argv, env, cwd, umask, group):
    os.chdir(cwd)
    os.umask(umask)
    os.environ.clear()
    os.environ.update(env)
    counter, kill_at, when = env.get("SHIM_COUNT"), env.get("SHIM_KILL_AT"), env.get("SHIM_WHEN")
    kill = False
    if counter:  # the routines count their commands (the docs' examples do not)
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        with open(counter, "w") as f:
            f.write(str(n + 1))
        kill = kill_at is not None and int(kill_at) == n
    def die():
        sys.stdout.flush()
        os.killpg(group, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if kill and when == "before":
        die()
    if kill and when == "committed":
        for name in ("run_output", "settlement_output"):
            setattr(spp_server, name, lambda *args, **kwargs: die())
    try:
        status = spp_server.main(argv)
    except SystemExit as exited:  # as the interpreter takes sys.exit's argument
        status = exited.code
    if kill:
        die()
    sys.stdout.flush()
    if status is None or isinstance(status, int):
        return status or 0
    print(status, file=sys.stderr)
    return 1

while True:
    connection, _ = listener.accept()
    request, streams, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    while chunk := connection.recv(1 << 16):
        request += chunk
    if os.fork() == 0:
        status = 1
        try:
            listener.close()
            for target, fd in enumerate(streams):
                os.dup2(fd, target)
                os.close(fd)
            status = command(*ast.literal_eval(request.decode()))
        except BaseException:
            traceback.print_exc()
        finally:
            connection.sendall(str(status).encode())
            os._exit(status)
    connection.close()
    for fd in streams:
        os.close(fd)
    while True:  # collect the commands that ended
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
"""

# $SPP in the routines: runs its command in a process forked by
# ROUTINE_COMMANDS, and exits with its status.  -I -S: the standard library only.
ROUTINE_SHIM = """
import os, socket, sys
umask = os.umask(0o22)
os.umask(umask)
with socket.socket(socket.AF_UNIX) as commands:
    commands.connect(os.environ["SHIM_COMMANDS"])
    request = (sys.argv[1:], dict(os.environ), os.getcwd(), umask, os.getpgid(0))
    socket.send_fds(commands, [repr(request).encode()], [0, 1, 2])
    commands.shutdown(socket.SHUT_WR)
    status = commands.recv(16)
sys.exit(int(status) if status else 1)
"""


@functools.lru_cache(maxsize=None)
def routine_commands():
    """-> the socket of ROUTINE_COMMANDS, started once per test process."""
    folder = tempfile.mkdtemp(prefix="spp-routine-commands-")
    path = os.path.join(folder, "commands")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(16)  # commands wait here until it has started
        process = subprocess.Popen(
            [sys.executable, "-c", ROUTINE_COMMANDS, str(HERE), str(listener.fileno())],
            pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def stop():
        process.kill()
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    return path


class Routines:
    """The scripts of docs/ledger.md as written, run in a process group of
    their own with `SPP_TODAY`, delivering to `out`."""

    def __init__(self, tmp_path, db, **env):
        self.dir, self.db, self.out = tmp_path, db, tmp_path / "payouts"
        weekly, monthly = documented_scripts()
        self.scripts = {"weekly": tmp_path / "weekly", "monthly": tmp_path / "monthly"}
        self.scripts["weekly"].write_text(weekly)
        self.scripts["monthly"].write_text(monthly)
        shim = tmp_path / "shim.py"
        shim.write_text(ROUTINE_SHIM)
        self.env = {**os.environ, "SPP": f"{sys.executable} -I -S {shim}", "SPP_DB": db,
                    "SHIM_COMMANDS": routine_commands(),
                    "SPP_PAYOUTS": str(self.out), "SHIM_COUNT": str(tmp_path / "commands"),
                    "SPP_WEEKLY_PAYOUT": f"sh {self.scripts['weekly']}", **env}

    def run(self, name, today, kill_at=None, when=None):
        """-> (exit status, stderr) of the script `name` run on `today`."""
        Path(self.env["SHIM_COUNT"]).write_text("0")
        env = {**self.env, "SPP_TODAY": today}
        if kill_at is not None:
            env.update(SHIM_KILL_AT=str(kill_at), SHIM_WHEN=when)
        done = subprocess.run(["sh", str(self.scripts[name])], env=env, capture_output=True,
                              timeout=15, start_new_session=True)
        return done.returncode, done.stderr.decode()

    def commands(self):
        """How many commands of spp_server.py the last run started."""
        return int(Path(self.env["SHIM_COUNT"]).read_text())

    def delivered(self):
        """{file name: bytes} of what the routines delivered (dot-files are not)."""
        return {p.name: p.read_bytes() for p in sorted(self.out.iterdir())
                if p.is_file() and not p.name.startswith(".")}

    def book(self, month, *rows):
        """Last month's report where the monthly routine looks for it."""
        (self.out / "booked").mkdir(parents=True, exist_ok=True)
        (self.out / "booked" / f"booked-{month}.json").write_text(booked_csv(*rows))


def test_the_documented_weekly_and_monthly_routine_runs_as_written(real_server, tmp_path, db):
    store = spp_server.Store(db, writer="thread")  # what postbacks stored in October 2020
    add_sessions(store, [(f"u{i % 3}", ("p1", "p2")[i % 2], 1000 * i, at(i // 8, i % 8))
                         for i in range(32)])
    store.close()
    server = real_server(db)
    assert server.post(postback(user_id="live"))[0] == 200  # received now: a later run's
    report = tmp_path / "booked-2020-10.csv"
    report.write_text(booked_csv(("2020-10-02", "p1", "", "0.5"), ("2020-10-02", "p2", "", "0.25")))
    routines = Routines(tmp_path, db, SPP_BOOKED_REPORT=str(report))
    out = routines.out

    def served(path):
        status, _, body = http_request(server.port, "GET", path)
        assert status == 200
        return body

    assert routines.run("weekly", "2020-10-03") == (0, "")
    paid = (out / "run-2020-10-03T00:00:00Z.csv").read_bytes()
    assert paid == served("/ledger/runs/1?format=csv")
    # October 1st and 2nd: sessions 0 to 15, to u0, u1, u2 in turn.
    assert [line["sessions"] for line in csv.DictReader(io.StringIO(paid.decode()))] == ["6", "5", "5"]
    assert routines.run("weekly", "2020-10-03") == (0, "")  # again, as after a reboot
    assert (out / "run-2020-10-03T00:00:00Z.csv").read_bytes() == paid
    assert count(db, "payout_runs") == 1
    assert routines.run("monthly", "2020-10-03")[0] == 0
    settled = (out / "settlement-1.csv").read_bytes()
    assert settled == served("/ledger/settlements/1?format=csv")
    assert {(line["day"], line["property-id"])
            for line in csv.DictReader(io.StringIO(settled.decode()))} == {
        ("2020-10-02", "p1"), ("2020-10-02", "p2")}
    assert routines.run("monthly", "2020-10-03")[0] == 0  # nothing new: no second settlement
    assert sorted(routines.delivered()) == ["run-2020-10-03T00:00:00Z.csv", "settlement-1.csv"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "booked", *routines.delivered()]
    assert json.loads(served("/users/live/statement"))["runs"] == []
    assert server.post(postback(user_id="live"))[0] == 200  # ingest went on throughout


def test_the_routines_files_are_for_root_and_the_wallet_group_only(tmp_path, db):
    """Whatever umask they are started with: directories 0750, files 0640."""
    ledger_month(db)
    report = tmp_path / "report.csv"
    report.write_text(booked_csv(("2020-10-01", "p1", "", "0.5")))
    routines = Routines(tmp_path, db, SPP_BOOKED_REPORT=str(report))
    old = os.umask(0)
    try:
        assert routines.run("monthly", "2020-11-05")[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [routines.out, *routines.out.iterdir()]}
    assert modes == {"payouts": "0o750", "booked": "0o750", ".lock": "0o640",
                     "run-2020-11-05T00:00:00Z.csv": "0o640", "settlement-1.csv": "0o640"}
    service = documented_units()["spp-payout.service"]
    assert "UMask=0027" in service and "StateDirectoryMode=0750" in service
    assert "Group=spp-wallet" in service


@pytest.mark.parametrize("today, month", [
    ("2026-03-31", "2026-02"), ("2026-03-29", "2026-02"), ("2026-05-31", "2026-04"),
    ("2026-12-30", "2026-11"), ("2027-01-05", "2026-12"), ("2024-03-01", "2024-02"),
])
def test_the_monthly_routine_reads_last_months_report_on_every_day(tmp_path, db, today, month):
    """`date -d 'last month'` on the 31st of March names March: the routine
    asks for the month before, whatever the day (here a report that is missing)."""
    ledger_month(db)
    routines = Routines(tmp_path, db)
    before = ledger_rows(db)
    code, err = routines.run("monthly", today)
    assert code == 1
    assert f"no {routines.out}/booked/booked-{month}.json: save last month's report there" in err
    assert routines.commands() == 0 and ledger_rows(db) == before  # checked before any change
    assert (routines.out / "booked").is_dir()  # the one place, created by the routine


def test_the_monthly_routine_fails_before_any_change_without_its_folder(tmp_path, db):
    ledger_month(db)
    routines = Routines(tmp_path, db)
    routines.out.write_text("a file where the folder should be")
    before = ledger_rows(db)
    code, err = routines.run("monthly", "2020-11-05")
    assert code != 0 and "mkdir" in err
    assert routines.commands() == 0 and ledger_rows(db) == before


@pytest.mark.parametrize("name", ["weekly", "monthly"])
def test_a_routine_waiting_for_the_other_says_so_and_gives_up_having_changed_nothing(
        tmp_path, db, name):
    ledger_month(db)
    report = tmp_path / "report.csv"
    report.write_text(booked_csv(("2020-10-01", "p1", "", "0.5")))
    routines = Routines(tmp_path, db, SPP_BOOKED_REPORT=str(report), SPP_LEDGER_LOCK_WAIT="0")
    routines.out.mkdir()
    before = ledger_rows(db)
    with open(routines.out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the other routine, running, holds it
        code, err = routines.run(name, "2020-11-05")
    script = {"weekly": "spp-weekly-payout", "monthly": "spp-monthly-settlement"}[name]
    assert (code, err.splitlines()) == (1, [
        f"{script}: waiting for the other routine ({routines.out}/.lock), at most 0 s",
        f"{script}: gave up waiting; nothing changed"])
    assert routines.commands() == 0 and ledger_rows(db) == before
    assert routines.run(name, "2020-11-05")[0] == 0  # once it is free


def settle_a_month_by_the_routines(tmp_path, year, month, settle_day):
    """Sessions on every day of the month (its first and last second too),
    each day booked; the weekly routine on the last Monday up to the
    settlement (by the timer, 02:00, before the settlement's 03:00), then the
    monthly one on `settle_day` of the next month: -> the days it settled."""
    first = datetime.date(year, month, 1)
    after = (first + datetime.timedelta(days=31)).replace(day=1)
    days = [first + datetime.timedelta(n) for n in range((after - first).days)]
    start = spp_server.parse_instant(first.isoformat())
    end = spp_server.parse_instant(after.isoformat())
    db = str(tmp_path / "spp.db")
    store = spp_server.Store(db, writer="thread")
    try:
        add_sessions(store, [("u", "p1", 1000, spp_server.parse_instant(f"{day}T12:00:00Z"))
                             for day in days] + [("u", "p1", 1000, start), ("u", "p1", 1000, end - 1),
                                                 ("u", "p1", 1000, end)])
    finally:
        store.close()
    routines = Routines(tmp_path, db, SPP_PAY_FROM=first.isoformat())  # the ledger takes over
    routines.book(f"{first:%Y-%m}", *((day.isoformat(), "p1", "", "0.002") for day in days))
    settling = after.replace(day=settle_day)
    monday = settling - datetime.timedelta(days=settling.weekday())
    assert routines.run("weekly", monday.isoformat()) == (0, "")
    code, err = routines.run("monthly", settling.isoformat())
    assert code == 0, err
    [settlement] = [name for name in routines.delivered() if name.startswith("settlement-")]
    lines = csv.DictReader(io.StringIO(routines.delivered()[settlement].decode()))
    return sorted({line["day"] for line in lines}), [day.isoformat() for day in days]


def documented_settlement_day():
    """The day of the month of the settlement timer in docs/ledger.md."""
    text = (HERE / "docs" / "ledger.md").read_text(encoding="utf-8")
    [day] = re.findall(r"`OnCalendar=\*-\*-(\d\d) 03:00:00 UTC`", text)
    return int(day)


# A month ending on each weekday, Monday to Sunday (November 2026 ends on a Monday).
@pytest.mark.parametrize("year, month", [(2026, 11), (2025, 9), (2025, 12), (2025, 7), (2025, 10),
                                         (2025, 5), (2025, 8)])
def test_the_monthly_routine_settles_every_day_of_last_month(tmp_path, year, month):
    last = datetime.date(year, month % 12 + 1, 1) - datetime.timedelta(1) if month < 12 else \
        datetime.date(year, 12, 31)
    assert last.month == month
    settled, days = settle_a_month_by_the_routines(tmp_path, year, month, documented_settlement_day())
    assert settled == days


@given(year=st.integers(2001, 2025), month=st.integers(1, 12), settle_day=st.integers(1, 28))
@settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_day_settles_in_the_first_settlement_after_its_report_on_any_day(
        tmp_path_factory, year, month, settle_day):
    """Whatever day the monthly routine runs (the 5th, or a catch-up later),
    it settles every day of the month before, with a clock the script reads
    from SPP_TODAY."""
    tmp_path = tmp_path_factory.mktemp("calendar")
    settled, days = settle_a_month_by_the_routines(tmp_path, year, month, settle_day)
    assert settled == days


def routine_month(db):
    """A new database with sessions in October and November 2020."""
    store = spp_server.Store(db, writer="thread")
    try:
        add_sessions(store, [(f"u{i % 5}", ("p1", "p2")[i % 2], 1000 * i + 7, at(i % 45, i % 24))
                             for i in range(120)])
    finally:
        store.close()


def routine_reports(routines):
    routines.book("2020-10", *((f"2020-10-{d:02}", p, "", f"0.00{d}") for d in (1, 2, 30, 31)
                               for p in ("p1", "p2")))
    routines.book("2020-11", *((f"2020-11-{d:02}", "p1", "", "0.0001") for d in (1, 14)))


# The routines' calendar: Mondays, and the 5th.
ROUTINE_CALENDAR = [("weekly", "2020-10-26"), ("weekly", "2020-11-02"), ("monthly", "2020-11-05"),
                    ("monthly", "2020-12-05")]


@functools.lru_cache(maxsize=None)
def uninterrupted_routines():
    """[(commands run, {file: bytes} delivered)] after each routine of
    ROUTINE_CALENDAR, uninterrupted, and the directory holding the database
    and the payouts before each (computed once: every kill test starts from
    one and compares with them)."""
    tmp = Path(tempfile.mkdtemp(prefix="spp-routines-"))
    atexit.register(shutil.rmtree, tmp, True)
    db = str(tmp / "spp.db")
    routine_month(db)
    # A month of history before the first run: the ledger pays it all.
    routines = Routines(tmp, db, SPP_PAY_FROM="1970-01-01")
    routine_reports(routines)
    done = []
    for step, (name, today) in enumerate(ROUTINE_CALENDAR):
        shutil.copytree(tmp, tmp.parent / f"{tmp.name}-{step}", symlinks=True)
        atexit.register(shutil.rmtree, tmp.parent / f"{tmp.name}-{step}", True)
        assert routines.run(name, today)[0] == 0
        done.append((routines.commands(), routines.delivered()))
    return done, [tmp.parent / f"{tmp.name}-{step}" for step in range(len(ROUTINE_CALENDAR))]


def routines_before(step, tmp_path):
    """Routines in `tmp_path` on the database and payouts of the uninterrupted
    calendar before its routine `step`."""
    _, before = uninterrupted_routines()
    shutil.copy(before[step] / "spp.db", tmp_path / "spp.db")
    shutil.copytree(before[step] / "payouts", tmp_path / "payouts", symlinks=True)
    return Routines(tmp_path, str(tmp_path / "spp.db"), SPP_PAY_FROM="1970-01-01")


# (routine of ROUTINE_CALENDAR, command it runs, when) -> a kill point.  The
# monthly routine runs pay, import-booked, settle, ledger --steps and settle
# --settlement; "committed" is "after" for a command that records no step.
# A weekly run is run again a week later, a monthly one the same day.
ROUTINE_KILLS = [(step, n, when) for step, commands in ((0, 1), (1, 1), (2, 5))
                 for n in range(commands) for when in ("before", "committed", "after")
                 if when != "committed" or (step, n) not in ((2, 1), (2, 3))]


@pytest.mark.parametrize("step, kill_at, when", ROUTINE_KILLS)
def test_a_routine_killed_at_any_step_delivers_each_step_once_when_run_again(
        tmp_path, step, kill_at, when):
    """SIGKILL of the script's whole process group before a command of
    spp_server.py, after its step commits (before its lines are written), or
    after it (between `settle` and the file's rename, say); then the routine
    run again: what is delivered is, byte for byte, what the uninterrupted
    calendar delivered, each step exactly once."""
    done, _ = uninterrupted_routines()
    assert [commands for commands, _ in done] == [1, 1, 5, 5]
    routines = routines_before(step, tmp_path)
    name, today = ROUTINE_CALENDAR[step]
    assert routines.run(name, today, kill_at, when)[0] == -signal.SIGKILL
    assert routines.commands() == kill_at + 1
    assert routines.delivered().items() <= done[step][1].items()  # never half a file
    again, delivered = (step, done[step][1]) if name == "monthly" else (step + 1, done[step + 1][1])
    code, err = routines.run(ROUTINE_CALENDAR[again][0], ROUTINE_CALENDAR[again][1])
    assert code == 0, err
    assert routines.delivered() == delivered
    assert sorted(p.name for p in routines.out.iterdir() if p.name.startswith(".")) == [".lock"]


def test_a_settlement_left_undelivered_is_delivered_by_the_next_months_routine(tmp_path):
    """Killed between settle and the rename, not run again that month: the
    next month's routine delivers it before its own."""
    *_, (_, expected) = uninterrupted_routines()[0]
    routines = routines_before(2, tmp_path)
    assert routines.run("monthly", "2020-11-05", 2, "after")[0] == -signal.SIGKILL
    assert "settlement-1.csv" not in routines.delivered()
    assert routines.run("monthly", "2020-12-05")[0] == 0
    assert routines.delivered() == expected


def ledger_illustration(language, option=None):
    """The text of docs/ledger.md's one block in `language` (with `option`)."""
    [lines] = [lines for _, lang, options, lines in doc_blocks("docs/ledger.md")
               if lang == language and (option is None or option in options.items())]
    return "\n".join(lines) + "\n"


def test_the_ledger_settlement_illustration_is_what_settle_prints(store, db):
    """docs/ledger.md cannot run a settlement on a fresh server (no day has
    ended before a run's until); its illustrated month is built here with
    November receive times, and what it shows must be what the code prints."""
    nov = spp_server.parse_instant("2026-11-01T00:00:00Z")

    def on(day, hour=12):  # 2026-11-<day>, UTC
        return nov + (day - 1) * spp_server.DAY_US + hour * HOUR_US

    add_sessions(store, [("sub1", None, 20_000, on(3, h)) for h in (9, 12, 15)]
                 + [("sub1", None, 20_000, on(day)) for day in range(5, 14)]
                 + [("sub2", None, 30_000, on(3)), ("sub2", None, 20_000, on(4))])
    assert ledger_command(spp_server.run_pay, db, *pay_args("2026-11-30T00:00:00Z"),
                          "--from", "2026-11-01")[0] == 0
    book_rows(store, [("2026-11-03", "", 100_000), ("2026-11-04", "", 10_000)])
    code, out, err = ledger_command(spp_server.run_settle, db)
    assert (code, err) == (0, "")
    assert out.decode().replace("\r\n", "\n") == ledger_illustration("csv", ("illustration", "settlement"))
    assert spp_server.statement(store, "sub1") == json.loads(ledger_illustration("json"))


def documented_units():
    """{file name: text} of the unit files docs/ledger.md shows in full."""
    text = (HERE / "docs" / "ledger.md").read_text(encoding="utf-8")
    return dict(re.findall(r"`/etc/systemd/system/([a-z@-]+\.(?:service|timer))`.*?```ini\n(.*?)```",
                           text, re.S))


def test_systemd_accepts_the_documented_ledger_units(tmp_path):
    units = documented_units()
    assert sorted(units) == ["spp-ledger-failed@.service", "spp-payout.service", "spp-payout.timer"]
    assert "ExecStart=/usr/local/bin/spp-weekly-payout" in units["spp-payout.service"]
    # A failed payout or settlement starts the unit that logs it at priority crit.
    assert "\nOnFailure=spp-ledger-failed@%n.service\n" in units["spp-payout.service"]
    assert "--priority daemon.crit" in units["spp-ledger-failed@.service"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in units)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_COLORS": "0", "LC_ALL": "C"})
    # The script is not installed here, nor spp.service: nothing else may be wrong.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "spp-weekly-payout" not in line and "spp.service" not in line]
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------------------
# Payout ledger, replay: steps a restore lost put back; where the ledger takes over
# ---------------------------------------------------------------------------

def backup_of(db, path):
    """A copy taken as docs/operating.md says: `sqlite3 DB ".backup PATH"`
    (SQLite's online backup API where the sqlite3 shell is missing)."""
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", db, f".backup {path}"], check=True, timeout=15)
    else:
        with contextlib.closing(sqlite3.connect(db)) as source, \
                contextlib.closing(sqlite3.connect(path)) as copy:
            source.backup(copy)
    return path


def paid_session_ids(db):
    """{run id: the session-ids of the sessions in its id range}, as of now."""
    return {run: {sid for (sid,) in rows(db, "SELECT session_id FROM sessions WHERE id > ? AND "
                                              "id <= ?", (after, last))}
            for run, after, last in rows(db, "SELECT id, after_session_id, last_session_id "
                                             "FROM payout_runs")}


class LedgerModel:
    """What was delivered, as a wallet app sees it: each step's lines by id,
    and the session-ids each run paid when it was made.  check() asserts the
    issue's promises on the database as it is now."""

    def __init__(self, db):
        self.db, self.runs, self.settlements, self.paid = db, {}, {}, {}

    def delivered(self, kind, step_id, text):
        book = self.runs if kind == "run" else self.settlements
        assert book.setdefault(step_id, text) == text, f"{kind} {step_id} names two things"
        if kind == "run" and step_id not in self.paid:
            self.paid[step_id] = paid_session_ids(self.db)[step_id]

    def pay(self, until, *more):
        code, out, err = ledger_command(spp_server.run_pay, self.db, *pay_args(until), *more)
        if code == 0:
            self.delivered("run", int(out.splitlines()[1].split(b",")[0]) if out.count(b"\n") > 1
                           else max(paid_session_ids(self.db)), out)
        return code, err

    def settle(self):
        code, out, err = ledger_command(spp_server.run_settle, self.db)
        if code == 0 and out.count(b"\n") > 1:
            self.delivered("settlement", int(out.splitlines()[1].split(b",")[0]), out)
        return code, err

    def check(self):
        store = spp_server.Store(self.db, writer="thread")
        try:
            for run_id, text in self.runs.items():  # every delivered id names what was delivered
                assert b"".join(spp_server.run_output(store, run_id, "csv")) == text
            for sid, text in self.settlements.items():
                assert b"".join(spp_server.settlement_output(store, sid, "csv")) == text
        finally:
            store.close()
        seen = collections.Counter(s for paid in self.paid.values() for s in paid)
        assert [s for s, n in seen.items() if n > 1] == [], "a session paid twice"
        # Each run's lines count the sessions it paid when made, no more.
        for run_id, paid in self.paid.items():
            [(sessions,)] = rows(self.db, "SELECT sessions FROM payout_runs WHERE id = ?", (run_id,))
            assert sessions == len(paid)
        # Every session of the database up to the last run's end is paid by some run.
        [(last,)] = rows(self.db, "SELECT coalesce(max(last_session_id), 0) FROM payout_runs")
        here = {s for (s,) in rows(self.db, "SELECT session_id FROM sessions WHERE id <= ? AND id > "
                                   "(SELECT coalesce(min(after_session_id), 0) FROM payout_runs)",
                                   (last,))}
        assert here <= set(seen)
        # No pool is topped up twice: one settlement line per pool and user, corrections aside.
        assert rows(self.db, "SELECT day, property_id, user_id FROM settlement_lines WHERE "
                    "correction = 0 GROUP BY 1, 2, 3 HAVING count(*) > 1") == []


def add_day_sessions(db, day, n, users=3):
    store = spp_server.Store(db, writer="thread")
    try:
        add_sessions(store, [(f"u{i % users}", ("p1", "p2")[i % 2], 1000 * (i + 1), at(day, i % 20))
                             for i in range(n)])
    finally:
        store.close()


def book_days(db, *days):
    store = spp_server.Store(db, writer="thread")
    try:
        book_rows(store, [(day_text(d), p, 7_000) for d in days for p in ("p1", "p2")])
    finally:
        store.close()


def day_iso(day):
    return spp_server.iso_utc(at(day, 0))


def replay(db):
    out = io.BytesIO()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = spp_server.run_ledger_replay(["--db", db], {}, out)
    return code, out.getvalue().decode(), err.getvalue()


def test_a_release_a_restore_lost_is_put_back_and_never_credited_twice(tmp_path, db):
    """A release credits what a hold withheld: the journal keeps it, so the
    restored copy refuses a second release until replay puts the first back."""
    add_day_sessions(db, 0, 10)
    assert ledger_command(spp_server.run_hold, db, "u1", "--reason", "farming?")[0] == 0
    assert LedgerModel(db).pay(day_iso(1))[0] == 0
    [(withheld,)] = rows(db, "SELECT withheld_nano FROM payout_withheld WHERE user_id = 'u1'")
    backup = backup_of(db, str(tmp_path / "backup.db"))
    release = functools.partial(spp_server.run_hold, action="release")
    code, released, _ = ledger_command(release, db, "u1", "--reason", "checked")
    assert code == 0
    restore(db, backup)
    code, out, err = ledger_command(release, db, "u1", "--reason", "checked")
    assert (code, out) == (1, b"") and "hold 2 was recorded after this copy" in err, err
    assert replay(db)[:2] == (0, "put back hold 2 from the ledger journal\n")
    assert rows(db, "SELECT action, amount_nano FROM ledger_holds ORDER BY id") == [
        ("hold", 0), ("release", withheld)]
    # Asked again: the same record, nothing credited twice.
    assert ledger_command(release, db, "u1", "--reason", "checked")[:2] == (0, released)
    assert count(db, "ledger_holds") == 2


def test_a_replay_whose_output_is_lost_says_what_it_put_back_is_committed(tmp_path, db, capsys):
    """As every step that commits: status 3 and a line saying so, not 1 and
    "the output is incomplete" (as if running it again were needed)."""
    add_day_sessions(db, 0, 10)
    backup = backup_of(db, str(tmp_path / "backup.db"))
    assert LedgerModel(db).pay(day_iso(1))[0] == 0
    restore(db, backup)
    assert spp_server.run_ledger_replay(["--db", db], {}, FullDisk(0)) == COMMITTED
    one_line_error(capsys, "spp_server.py ledger-replay: run 1 put back (committed), but "
                   "writing its output failed: No space left on device")
    assert replay(db)[:2] == (0, "nothing to put back: the database holds every step of its "
                                 "ledger journal\n")


def test_a_run_a_restore_lost_is_put_back_with_the_report_offset_it_changed(tmp_path, db):
    """The report offset is recorded with the runs (issue 22, 1): the journal
    keeps a run's change with it, and replay puts it back, so that the next
    run cuts the days as the lost one did."""
    add_day_sessions(db, 0, 10)
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(1)))[0] == 0
    backup = backup_of(db, str(tmp_path / "backup.db"))
    add_day_sessions(db, 1, 10)
    code, _, err = ledger_command(spp_server.run_pay, db, *pay_args(day_iso(2)),
                                  "--report-utc-offset", "+05:30")
    assert code == 0 and "recorded the report offset +05:30" in err
    offsets = rows(db, "SELECT run_id, first_day, report_utc_offset FROM report_offsets")
    assert offsets == [(1, None, 0), (2, day_text(2), 330)]
    restore(db, backup)
    assert replay(db)[:2] == (0, "put back run 2 from the ledger journal\n")
    assert rows(db, "SELECT run_id, first_day, report_utc_offset FROM report_offsets") == offsets


def test_a_balance_write_off_a_restore_lost_is_put_back_and_not_charged_again(tmp_path):
    """Balances written off for their age are forgiven: a write-off the
    restore lost comes back from the journal, so nobody owes them again."""
    db = str(tmp_path / "spp.db")
    ledger_month(db)
    assert ledger_command(spp_server.run_settle, db)[0] == 0
    for path in (db, spp_server.journal_path(db)):  # balances carried long ago
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("UPDATE settlements SET created_at_us = 0")
    owed = "SELECT user_id, owed_nano FROM ledger_balances WHERE owed_nano > 0 ORDER BY user_id"
    assert rows(db, owed)
    backup = backup_of(db, str(tmp_path / "backup.db"))
    assert ledger_command(spp_server.run_write_off_balances, db, "--older-than", "1d")[0] == 0
    written, owed_after = rows(db, "SELECT * FROM balance_write_off_lines"), rows(db, owed)
    assert written
    restore(db, backup)
    code, out, err = ledger_command(spp_server.run_write_off_balances, db, "--older-than", "1d")
    assert (code, out) == (1, b"") and "balance-write-off 1 was recorded after this copy" in err
    assert replay(db)[:2] == (0, "put back balance-write-off 1 from the ledger journal\n")
    assert rows(db, "SELECT * FROM balance_write_off_lines") == written
    assert rows(db, owed) == owed_after


def test_every_ledger_step_refuses_a_restored_database_with_one_line_until_it_is_replayed(
        tmp_path, db, make_client):
    add_day_sessions(db, 0, 10)
    model = LedgerModel(db)
    assert model.pay(day_iso(1))[0] == 0
    backup = backup_of(db, str(tmp_path / "backup.db"))
    add_day_sessions(db, 1, 10)
    book_days(db, 0)
    assert model.pay(day_iso(2))[0] == 0
    assert model.settle()[0] == 0
    restore(db, backup)
    add_day_sessions(db, 2, 4)  # take the ids of sessions run 2 paid
    before = ledger_rows(db)
    commands = [(spp_server.run_pay, pay_args(day_iso(3))),
                (spp_server.run_pay, pay_args(day_iso(2))),  # run 2's --until: print it again
                (spp_server.run_settle, []), (spp_server.run_settle, ["--settlement", "1"]),
                (spp_server.run_statement, ["u1"]), (spp_server.run_ledger, []),
                # Every other command that changes the ledger, and erase (the journal holds ids).
                (spp_server.run_hold, ["u1", "--reason", "r"]),
                (functools.partial(spp_server.run_hold, action="release"), ["u1", "--reason", "r"]),
                (spp_server.run_write_off_balances, ["--older-than", "1d"]),
                (spp_server.run_erase, ["u1", "--even-if-owed"])]
    for run, args in commands:
        code, out, err = ledger_command(run, db, *args)
        assert (code, out) == (1, b""), (run, err)
        assert err.count("\n") == 1 and "run 2, settlement 1 were recorded after this copy" in err
        assert f"`spp_server.py ledger-replay --db {db}`" in err
    assert ledger_rows(db) == before
    # And the server's ledger reads: a 503 saying the same, never the restored copy's ledger.
    app = make_client()
    for path in ("/ledger", "/ledger/runs/1", "/ledger/settlements/1", "/users/u1/statement"):
        assert "ledger-replay --db" in app.get(path, status=503).json["error"]
    assert "ledger-replay --db" in app.get("/view/ledger", status=503).text
    assert replay(db)[:2] == (0, "put back run 2, settlement 1 from the ledger journal\n")
    assert app.get("/ledger/runs/2?format=csv").body == model.runs[2]
    assert replay(db)[:2] == (0, "nothing to put back: the database holds every step of its "
                                 "ledger journal\n")
    assert model.pay(day_iso(2)) == (0, "")  # run 2 printed again, byte for byte
    assert model.pay(day_iso(3)) == (0, "")
    book_days(db, 0, 1, 2)  # the restore lost the import of day 0's report too
    assert model.settle() == (0, "")
    model.check()
    # The four new sessions (ids that run 2 had paid) are paid by run 3, once.
    assert len(model.paid[3]) == 4


@pytest.mark.parametrize("backup_after", range(5))
def test_after_restoring_any_backup_and_replaying_nothing_is_paid_twice_and_no_id_reused(
        tmp_path, db, backup_after):
    """A ledger of four steps; a backup taken before any or after each; more
    steps, the restore, new sessions (taking lost ids), and more steps."""
    model = LedgerModel(db)

    def paying(first_day, until_day):  # sessions come in, then a run pays them
        for day in range(first_day, until_day):
            add_day_sessions(db, day, 6 + day)
        return model.pay(day_iso(until_day))

    steps = [lambda: paying(0, 2), lambda: paying(2, 4),
             lambda: (book_days(db, 0, 1, 2), model.settle())[1], lambda: paying(4, 6)]
    backup = None
    for i, step in enumerate(steps):
        if i == backup_after:
            backup = backup_of(db, str(tmp_path / "backup.db"))
        assert step()[0] == 0
    backup = backup or backup_of(db, str(tmp_path / "backup.db"))
    restore(db, backup)
    add_day_sessions(db, 6, 5)  # received after the restore
    code, err = model.pay(day_iso(7))
    lost = backup_after < len(steps)
    assert code == (1 if lost else 0), err
    assert replay(db)[0] == 0
    assert model.pay(day_iso(7))[0] == 0
    book_days(db, *range(7))  # the reports the restore lost, and the newer ones
    assert model.settle() == (0, "")
    model.check()
    assert {s for (s,) in rows(db, "SELECT session_id FROM sessions")} <= set().union(
        *model.paid.values())  # and every session the copy holds is paid


def test_a_backup_older_than_two_runs_is_replayed_and_restored_twice(tmp_path, db):
    model = LedgerModel(db)
    add_day_sessions(db, 0, 5)
    first = backup_of(db, str(tmp_path / "first.db"))  # before any run
    for day in (1, 2, 3):
        add_day_sessions(db, day, 5)
        assert model.pay(day_iso(day + 1))[0] == 0
    restore(db, first)
    add_day_sessions(db, 4, 3)
    assert replay(db)[:2] == (0, "put back run 1, run 2, run 3 from the ledger journal\n")
    assert model.pay(day_iso(5))[0] == 0
    second = backup_of(db, str(tmp_path / "second.db"))
    add_day_sessions(db, 5, 4)
    assert model.pay(day_iso(6))[0] == 0
    restore(db, first)  # older again: the replayed runs and the one after them are lost
    add_day_sessions(db, 6, 2)
    assert replay(db)[0] == 0
    assert model.pay(day_iso(7))[0] == 0
    model.check()
    restore(db, second)
    assert replay(db)[0] == 0
    model.check()


def test_a_backup_older_than_the_cut_over_leaves_its_sessions_unpaid_and_pays_the_new_ones(
        tmp_path, store, db):
    add_sessions(store, [("old", None, 1000, at(d)) for d in range(5)])
    backup = backup_of(db, str(tmp_path / "backup.db"))
    add_sessions(store, [("old", None, 1000, at(d)) for d in range(5, 10)])
    model = LedgerModel(db)
    assert model.pay(day_iso(10), "--from", day_iso(8))[0] == 0  # the last two days
    store.close()
    restore(db, backup)
    store = spp_server.Store(db, writer="thread")
    try:
        # Received after the restore (after run 1 was made): ids 6 to 8.
        add_sessions(store, [("new", None, 1000, spp_server.now_us()) for _ in range(3)])
        until = spp_server.iso_utc(spp_server.now_us())
    finally:
        store.close()
    assert replay(db)[:2] == (0, "put back run 1 from the ledger journal\n")
    assert model.pay(until)[0] == 0
    assert model.runs[2].decode().splitlines()[1:] == ["2,new,3,0.000003,0.0000018,0,0"]
    model.check()


def test_the_ledger_journal_is_private_and_owned_like_the_database(db):
    add_day_sessions(db, 0, 3)
    old = os.umask(0)
    try:
        if os.geteuid() == 0:
            os.chown(db, 4321, 4321)
        assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(1)))[0] == 0
    finally:
        os.umask(old)
    info = os.stat(spp_server.journal_path(db))
    assert stat.S_IMODE(info.st_mode) == 0o600
    if os.geteuid() == 0:
        assert (info.st_uid, info.st_gid) == (4321, 4321)


def test_a_journal_of_another_database_is_refused_not_replayed(tmp_path, db):
    add_day_sessions(db, 0, 3)
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(1)))[0] == 0
    other = str(tmp_path / "other.db")
    shutil.copy(db, other)
    shutil.copy(spp_server.journal_path(db), spp_server.journal_path(other))
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(2)))[0] == 0
    with contextlib.closing(sqlite3.connect(other)) as conn:  # its own run 2
        conn.execute("UPDATE payout_runs SET created_at_us = created_at_us + 1")
        conn.commit()
    shutil.copy(spp_server.journal_path(db), spp_server.journal_path(other))
    code, _, err = ledger_command(spp_server.run_pay, other, *pay_args(day_iso(3)))
    assert code == 1 and "disagree about run 1" in err
    assert replay(other)[0] == 1


def test_a_run_killed_before_its_journal_entry_is_not_served_until_a_step_journals_it(
        db, make_client):
    add_day_sessions(db, 0, 4)
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(1)))[0] == 0
    add_day_sessions(db, 1, 4)
    killed = subprocess.run([sys.executable, "-c", KILL_AT, "journal_step", "before", "pay",
                             *pay_args(day_iso(2)), "--db", db], cwd=HERE, capture_output=True,
                            timeout=15)
    assert killed.returncode == -signal.SIGKILL and killed.stdout == b""
    assert count(db, "payout_runs") == 2  # committed, its lines never released
    client = make_client()
    assert client.get("/ledger/runs/2", status=404).json["field"] == "run-id"
    code, lines, _ = ledger_command(spp_server.run_pay, db, *pay_args(day_iso(2)))
    assert code == 0 and journal_steps(db) == [("run", 1), ("run", 2)]
    assert client.get("/ledger/runs/2?format=csv").body == lines


# --- Where the ledger takes over: the first run's --from ---


def test_a_first_run_over_older_history_refuses_unless_told_where_the_ledger_takes_over(
        store, db):
    add_sessions(store, [("a", "p", 1000, at(d)) for d in range(30)])
    before = ledger_rows(db)
    code, out, err = ledger_command(spp_server.run_pay, db, *pay_args(day_iso(30)))
    assert (code, out) == (2, b"")
    assert err == ("spp_server.py pay: --from: this first run would pay every session since "
                   "2020-10-01T12:00:00Z, more than 7 days before --until: name where the ledger "
                   "takes over with --from (an instant or a feed cursor; --from 1970-01-01 to pay "
                   "them all), see docs/ledger.md; nothing changed\n")
    assert ledger_rows(db) == before
    code, first, _ = ledger_command(spp_server.run_pay, db, *pay_args(day_iso(30)),
                                    "--from", day_iso(20))
    assert code == 0 and run_lines(store, 1)[0]["sessions"] == "10"  # days 20 to 29
    assert rows(db, "SELECT started_from FROM payout_runs") == [("2020-10-21T00:00:00Z",)]
    # Asked again with the same start, or none: the same run; another start is refused.
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(30)), "--from",
                          "2020-10-21")[:2] == (0, first)
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(30)))[:2] == (0, first)
    code, _, err = ledger_command(spp_server.run_pay, db, *pay_args(day_iso(31)),
                                  "--from", day_iso(19))
    assert code == 2 and err.startswith("spp_server.py pay: --from: the ledger took over from "
                                        "2020-10-21T00:00:00Z with run 1")
    assert count(db, "payout_runs") == 1


@pytest.mark.parametrize("age_us, refused", [(spp_server.FIRST_RUN_WINDOW_US, False),
                                             (spp_server.FIRST_RUN_WINDOW_US + 1, True)])
def test_older_than_its_window_is_more_than_seven_days_before_until(store, db, age_us, refused):
    until = at(20, 0)
    add_sessions(store, [("a", None, 1000, until - age_us), ("b", None, 1000, until - 1)])
    code, _, err = ledger_command(spp_server.run_pay, db, *pay_args(spp_server.iso_utc(until)))
    assert (code, "--from:" in err) == ((2, True) if refused else (0, False))
    if not refused:
        assert len(run_lines(store, 1)) == 2


def test_a_first_run_can_take_over_after_a_feed_cursor_of_this_database_only(store, db):
    add_sessions(store, [(f"u{i}", None, 1000, at(0, i)) for i in range(8)])
    sessions, _ = spp_server.session_feed_page(store, "0", 5)  # what a feed consumer credited
    cursor = sessions[-1]["cursor"]
    wrong = cursor.split("-")[0] + "-00000000"
    code, _, err = ledger_command(spp_server.run_pay, db, *pay_args(day_iso(1)), "--from", wrong)
    assert code == 2 and "--from: names a session this database does not hold at 5" in err
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(1)), "--from", cursor)[0] == 0
    assert [line["user-id"] for line in run_lines(store, 1)] == ["u5", "u6", "u7"]
    assert rows(db, "SELECT after_session_id, started_from FROM payout_runs") == [(5, cursor)]


@pytest.mark.parametrize("start, settled", [(at(1, 0), ["2020-10-02", "2020-10-03", "2020-10-04"]),
                                            (at(1, 12), ["2020-10-03", "2020-10-04"])])
def test_settle_never_settles_a_day_holding_sessions_from_before_the_cut_over(
        store, db, start, settled):
    add_sessions(store, [(f"u{h % 2}", "p1", 1000 + h, at(d, h)) for d in range(4)
                         for h in (6, 18)])
    book_rows(store, [(day_text(d), "p1", 5_000) for d in range(4)])
    assert ledger_command(spp_server.run_pay, db, *pay_args(day_iso(4)), "--from",
                          spp_server.iso_utc(start))[0] == 0
    assert ledger_command(spp_server.run_settle, db)[0] == 0
    assert sorted({line["day"] for line in settlement_lines(store, 1)}) == settled


def test_the_weekly_routine_refuses_history_until_told_where_the_ledger_takes_over(tmp_path, db):
    routine_month(db)  # October and November 2020, no run yet
    code, err = Routines(tmp_path, db).run("weekly", "2020-11-02")
    assert code != 0 and "spp_server.py pay: --from: this first run would pay every session" in err
    assert count(db, "payout_runs") == 0
    routines = Routines(tmp_path, db, SPP_PAY_FROM="2020-10-26")  # as in /etc/spp/spp.env
    assert routines.run("weekly", "2020-11-02") == (0, "")
    assert routines.run("weekly", "2020-11-09") == (0, "")  # the same start, accepted again
    assert rows(db, "SELECT started_from FROM payout_runs") == [("2020-10-26T00:00:00Z",), (None,)]
    # It starts after the last session received before 26 October, as a run
    # starts after the one before it.
    assert rows(db, "SELECT after_session_id FROM payout_runs WHERE id = 1") == rows(
        db, "SELECT max(id) FROM sessions WHERE received_at_us < ?", (at(25, 0),))


# --- Real processes: the routines as written, a kill -9 at each point, the restore as written ---


def start_server_group(db, port):
    """The server in a process group of its own, so that kill -9 takes its writer too."""
    process = subprocess.Popen([sys.executable, str(SERVER), "--db", db, "--port", str(port)],
                               stderr=subprocess.DEVNULL, process_group=0)
    deadline = time.monotonic() + 15
    while True:
        try:
            if http_request(port, "GET", "/healthz")[0] == 200:
                return process
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)  # polling for the port to open, not covering a race


def kill_group(process):
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def documented_restore(live_dir, backup):
    """docs/operating.md's Restore block, for a database in `live_dir`."""
    [block] = [lines for _, language, _, lines in doc_blocks("docs/operating.md")
               if language == "sh" and any("ledger-replay" in line for line in lines)]
    text = "\n".join(block)
    for path, here in (("/var/lib/private/spp", str(live_dir)),
                       ("/var/backups/spp/spp-2026-01-31.db", str(backup)),
                       ("/opt/spp/.venv/bin/python /opt/spp/spp_server.py",
                        f"{sys.executable} {SERVER}")):
        text = text.replace(path, here)
    # No root, no systemd here: sudo runs the command, the service was stopped (killed).
    return "sudo() { \"$@\"; }\nsystemctl() { :; }\nset -eu\n" + text


def test_the_documented_restore_after_a_kill_keeps_the_wal_of_the_database_it_replaces(tmp_path):
    live = tmp_path / "spp"
    live.mkdir(mode=0o700)
    db = str(live / "spp.db")
    port = free_port()
    server = start_server_group(db, port)
    try:
        backup = backup_of(db, str(tmp_path / "spp-2026-01-31.db"))
        posted = [postback() for _ in range(5)]
        for body in posted:
            assert http_request(port, "POST", "/postback", json.dumps(body).encode())[0] == 200
        assert os.path.getsize(db + "-wal") > 0  # the newest commits are in the -wal only
    finally:
        kill_group(server)
    done = subprocess.run(["bash", "-c", documented_restore(live, backup)], capture_output=True,
                          text=True, timeout=15)
    assert done.returncode == 0, done.stderr
    [replaced] = [p for p in live.iterdir() if p.is_dir()]
    kept = {s for (s,) in rows(str(replaced / "spp.db"), "SELECT session_id FROM sessions")}
    assert kept == {body["session-id"] for body in posted}
    assert count(db, "sessions") == 0 and stat.S_IMODE(os.stat(db).st_mode) == 0o600


@pytest.mark.parametrize("kill", ["server", "pay after its commit", "settle after its commit",
                                  "replay after a run", "replay after a settlement"])
def test_the_routines_as_written_never_pay_twice_across_a_restore_killed_at_each_point(
        tmp_path, kill):
    """The daily backup (as docs/operating.md takes it), two weekly payouts,
    the monthly settlement, the server killed -9, the restore as written,
    new sessions, and the routines again: with a kill -9 at each point, and
    whatever was killed run again."""
    live = tmp_path / "spp"
    live.mkdir(mode=0o700)
    db = str(live / "spp.db")
    port = free_port()
    server = start_server_group(db, port)
    routines = Routines(tmp_path, db)
    killer = tmp_path / "kill_at.py"  # spp_server.py, killed at a point (see KILL_AT)
    killer.write_text(KILL_AT)
    routines.env["PYTHONPATH"] = str(HERE)

    def killed(name, today, point):
        shim = routines.env["SPP"]
        routines.env["SPP"] = f"{sys.executable} {killer} {point}"
        try:
            assert routines.run(name, today)[0] != 0
        finally:
            routines.env["SPP"] = shim

    try:
        add_day_sessions(db, 0, 8)
        # The daily backup, before the runs: older than the two runs and the settlement.
        backup = backup_of(db, str(tmp_path / "spp-2026-01-31.db"))
        assert routines.run("weekly", day_text(1)) == (0, "")
        add_day_sessions(db, 1, 8)
        if kill == "pay after its commit":  # committed, not in the journal, not delivered
            killed("weekly", day_text(2), "journal_step before")
        assert routines.run("weekly", day_text(2)) == (0, "")
        routines.book("2020-09", (day_text(0), "p1", "", "0.004"), (day_text(1), "p2", "", "0.02"))
        if kill == "settle after its commit":
            # Committed, never journaled, never delivered: the restore loses
            # it whole, and no one was told of it.
            killed("monthly", day_text(2), "journal_step before")
        else:
            assert routines.run("monthly", day_text(2))[0] == 0
    finally:
        kill_group(server)
    delivered = routines.delivered()
    restore_script = documented_restore(live, backup)
    if kill.startswith("replay"):
        point = "put_back_run after" if kill == "replay after a run" else "put_back_settlement after"
        killing = restore_script.replace(f"{sys.executable} {SERVER} ledger-replay",
                                         f"{sys.executable} {killer} {point} ledger-replay")
        assert subprocess.run(["bash", "-c", killing], capture_output=True, timeout=15,
                              env=routines.env).returncode
        # Run again from its last step: the rest of the restore is done.
        done = subprocess.run([sys.executable, str(SERVER), "ledger-replay", "--db", db],
                              capture_output=True, text=True, timeout=15)
    else:
        done = subprocess.run(["bash", "-c", restore_script], capture_output=True, text=True,
                              timeout=15)
    assert done.returncode == 0, done.stderr
    server = start_server_group(db, port)
    try:
        add_day_sessions(db, 2, 4)  # received on day 2, taking ids run 2 had paid
        for _ in range(2):  # received today: a later run's
            assert http_request(port, "POST", "/postback", json.dumps(postback()).encode())[0] == 200
        assert routines.run("weekly", day_text(3)) == (0, "")
        assert routines.run("monthly", day_text(3))[0] == 0
        after = routines.delivered()
        for name, data in delivered.items():  # each delivered id still names what it named
            assert after[name] == data
        assert sorted(set(after) - set(delivered)) == [
            f"run-{day_text(3)}T00:00:00Z.csv",
            *(["settlement-1.csv"] if kill == "settle after its commit" else [])]
        # Run 3 paid the four sessions of day 2, the first two runs their own, none twice.
        assert rows(db, "SELECT id, sessions FROM payout_runs") == [(1, 8), (2, 8), (3, 4)]
        assert rows(db, "SELECT after_session_id, last_session_id FROM payout_runs "
                        "WHERE id = 3") == [(8, 12)]  # 13 and 14: today's postbacks
        assert count(db, "settlements") == 1
    finally:
        kill_group(server)


# ---------------------------------------------------------------------------
# Limits: no input can take a sum past 64 bits and block the ledger
# ---------------------------------------------------------------------------

LARGEST = spp_server.MAX_ESTIMATE_NANOS  # the largest estimate a postback may give


def insert_sessions(db, user, nanos, n, day=0, prop=None, first=0):
    """n sessions of `user` at `nanos` each, written straight to the file (an
    older receiver's, or what many postbacks would leave), on report day `day`."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO sessions (session_id, user_id, property_id, revenue_nano, received_at_us,"
            " raw_body) VALUES (?, ?, ?, ?, ?, ?)",
            ((f"{user}-{first + i}", user, prop, nanos, at(day, i % 24),
              json.dumps({"your-estimated-revenue": nanos_to_text(nanos)})) for i in range(n)))


def read_every_page(client, user, run_id=None, settlement_id=None):
    """Every read endpoint and web view page that sums estimates or ledger
    amounts, answered 200 (never a 500 from an overflow) -> /metrics text."""
    window = {"since": "2020-09-01", "until": "2020-12-01"}
    for url in [f"/users/{user}/earnings", f"/users/{user}/statement", "/ledger", "/stats",
                "/sessions", "/rejected", "/view/ledger", "/view/postbacks", f"/view/users/{user}",
                "/view/?month=2020-10", "/view/users?month=2020-10"]:
        client.get(url, status=200)
    for group_by in ("day", "property-id", "country", "day,property-id,country"):
        client.get("/totals", params={**window, "group-by": group_by}, status=200)
    client.get("/earnings", params=window, status=200)
    client.get("/reconciliation", params=window, status=200)
    for path, step in (("runs", run_id), ("settlements", settlement_id)):
        if step is not None:
            client.get(f"/ledger/{path}/{step}", status=200)
    return client.get("/metrics", status=200).text


def test_the_largest_estimate_is_taken_and_one_nano_usd_more_is_refused_by_name(client, db):
    for literal in ['"10"', "10", '"1e1"', '"9.9999999995"']:  # the last rounds half-even to 10
        text = json.dumps(postback(session_id=f"s{literal}")).replace(
            '"0.000012"', literal)
        assert send_raw(client, text.encode()).json == {"status": "recorded"}
    assert rows(db, "SELECT DISTINCT revenue_nano FROM sessions") == [(LARGEST,)]
    for literal in ['"10.000000001"', "10.000000001", '"10.0000000001"', '"1.0000000001e1"',
                    "999999", '"999999"', "11"]:
        text = json.dumps(postback(session_id="above")).replace('"0.000012"', literal)
        res = send_raw(client, text.encode())
        assert_error(res, 400, "your-estimated-revenue")
        assert "at most 10 USD" in res.json["error"]
    assert count(db, "sessions") == 4
    assert count(db, "rejected") == 7  # each body kept, as for any refusal
    assert [b"10.000000001" in body for (body,) in rows(db, "SELECT raw_body FROM rejected")] == [
        True, True, False, False, False, False, False]


def test_many_sessions_at_the_largest_estimate_pay_settle_and_read(client, db, store, capsys):
    # 30,000 sessions at 10 USD of one user on one day (one part of a run)
    # and another user's on the next, booked at the largest total an import
    # takes: every step and every page works, to the nano-USD.
    insert_sessions(db, "max", LARGEST, 30_000, day=0)
    insert_sessions(db, "other", LARGEST, 100, day=1)
    total = spp_server.MAX_BOOKED_TOTAL
    book_rows(store, [(day_text(d), "", nanos(str(total / 200))) for d in range(2)] +
              [(day_text(d + 2), "", nanos(str(total / 200))) for d in range(98)])
    assert run_cli(spp_server.run_pay, ["--db", db, "--until", iso(at(2, 0)),
                                        "--pay-now-share", "0.6", "--final-share", "0.9"]) == 0
    assert run_cli(spp_server.run_settle, ["--db", db]) == 0
    assert run_cli(spp_server.run_statement, ["max", "--db", db]) == 0
    assert run_cli(spp_server.run_ledger, ["--db", db]) == 0
    capsys.readouterr()
    assert earnings(client, "max").json["estimated-revenue"] == "300000"
    assert run_lines(store, 1)[0] == {
        "run-id": "1", "user-id": "max", "sessions": "30000", "estimated-revenue": "300000",
        "paid-now": "180000", "deducted": "0", "withheld": "0"}
    # Day 0's pool: booked 500,000 USD, all to the one user; final 0.9 of it.
    line = next(line for line in settlement_lines(store, 1) if line["user-id"] == "max")
    assert (line["booked-part"], line["final"], line["top-up"]) == ("500000", "450000", "270000")
    metrics = read_every_page(client, "max", run_id=1, settlement_id=1)
    assert metric_value(metrics, "spp_estimated_revenue_usd_total") == 301_000


def test_an_import_takes_the_booked_total_up_to_the_bound_and_refuses_past_it(
        store, db, tmp_path, capsys):
    per_day = spp_server.MAX_BOOKED_TOTAL / 125  # 800,000 USD: below the 1,000,000 of a row
    report = tmp_path / "r.csv"
    days = [day_text(d) for d in range(125)]
    report.write_text("date,revenue\n" + "".join(f"{d},{per_day}\n" for d in days))
    assert run_cli(spp_server.run_import_booked, [str(report), "--db", db]) == 0
    extra = tmp_path / "extra.csv"
    extra.write_text(f"date,revenue\n{day_text(125)},0.000000001\n")
    assert run_cli(spp_server.run_import_booked, [str(extra), "--db", db]) == 1
    err = capsys.readouterr().err
    assert "100000000.000000001 USD, above the 100000000 USD" in err and "nothing imported" in err
    assert count(db, "booked_revenue") == 125
    # Replacing a day by a lower figure is taken, and then the one nano-USD more fits.
    lower = tmp_path / "lower.csv"
    lower.write_text(f"date,revenue\n{days[0]},799999.999999999\n")
    assert run_cli(spp_server.run_import_booked, [str(lower), "--db", db]) == 0
    assert run_cli(spp_server.run_import_booked, [str(extra), "--db", db]) == 0
    assert rows(db, "SELECT sum(revenue_nano) FROM booked_revenue") == [(10**17,)]


def test_booked_revenue_stored_above_the_bound_is_refused_by_settle_until_corrected(
        store, db, tmp_path, capsys):
    # The issue's file: 13,520 rows at 999,999.99 USD, stored by an older receiver.
    add_sessions(store, [("u", None, 1_000_000, at(d)) for d in range(20)])
    pay(store, at(20, 0))
    countries = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany("INSERT INTO booked_rows VALUES (1, ?, '', ?, ?, 0, 'old.csv')",
                         ((day_text(d), c, nanos("999999.99")) for d in range(20) for c in countries))
        conn.executemany("INSERT INTO booked_current VALUES (?, '', 1)",
                         ((day_text(d),) for d in range(20)))
    assert count(db, "booked_revenue") == 13_520
    before = ledger_counts(db)
    assert run_cli(spp_server.run_settle, ["--db", db]) == 2
    err = capsys.readouterr().err
    assert "booked-revenue: the booked revenue stored adds up to 13519999864.8 USD" in err
    assert "import the right report" in err and "nothing changed" in err
    assert ledger_counts(db) == before
    right = tmp_path / "right.csv"  # lower than what is stored: taken although still above
    right.write_text("date,revenue\n" + "".join(f"{day_text(d)},0.002\n" for d in range(10)))
    assert run_cli(spp_server.run_import_booked, [str(right), "--db", db]) == 0
    assert run_cli(spp_server.run_settle, ["--db", db]) == 2
    assert "adds up to 6759999932.42 USD" in capsys.readouterr().err
    right.write_text("date,revenue\n" + "".join(f"{day_text(d)},0.002\n" for d in range(10, 20)))
    assert run_cli(spp_server.run_import_booked, [str(right), "--db", db]) == 0
    assert run_cli(spp_server.run_settle, ["--db", db]) == 0
    assert count(db, "settlement_lines") == 20


def test_estimates_stored_above_the_largest_are_refused_by_pay_until_set_aside(
        client, db, store, capsys, monkeypatch):
    # An older receiver took 10,000 postbacks at 999,999 USD: their sum passes
    # 2^63 nano-USD.  One at 20 USD was paid before (as if by that receiver).
    add_sessions(store, [("u", None, 1_000_000, at(0)), ("paid", None, 20 * 10**9, at(0))])
    with monkeypatch.context() as patch:
        patch.setattr(spp_server, "MAX_ESTIMATE_NANOS", 10**15)
        pay(store, at(1, 0))
    insert_sessions(db, "whale", nanos("999999"), 10_000, day=1)
    add_sessions(store, [("u", None, 2_000_000, at(1))])
    # Reads sum them past 64 bits, exactly.
    assert earnings(client, "whale").json["estimated-revenue"] == "9999990000"
    assert metric_value(read_every_page(client, "whale"), "spp_estimated_revenue_usd_total") == (
        D("9999990020.003"))
    assert suspects_of(store)  # the report of users worth a look reads them too
    pay_args = ["--db", db, "--until", iso(at(2, 0)), "--pay-now-share", "0.6",
                "--final-share", "0.9"]
    before = ledger_counts(db)
    assert run_cli(spp_server.run_pay, pay_args) == 2
    err = capsys.readouterr().err
    assert "your-estimated-revenue: 10000 sessions to pay are above 10 USD, up to 999999 USD" in err
    assert "'whale-0'" in err and "void-oversized" in err and "nothing changed" in err
    assert ledger_counts(db) == before
    out = []
    assert run_cli(spp_server.run_void_oversized, ["--db", db], out) == 0
    assert out == ["10000 sessions above 10 USD set to 0, kept in rejected\n"]
    assert count(db, "rejected") == 10_000
    [(field, reason, body)] = rows(db, "SELECT field, reason, raw_body FROM rejected LIMIT 1")
    assert field == "your-estimated-revenue" and "999999 USD and 0 nano-USD" in reason
    assert "whale-" in reason and json.loads(body) == {"your-estimated-revenue": "999999"}
    client.get("/view/postbacks?outcome=rejected", status=200)
    assert client.get("/rejected", status=200).json["rejected"][0]["raw-body"] == body.decode()
    # The session paid before keeps its estimate: its run stands as it was paid.
    assert rows(db, "SELECT revenue_nano FROM sessions WHERE user_id = 'paid'") == [(20 * 10**9,)]
    assert run_cli(spp_server.run_pay, pay_args) == 0
    lines = {line["user-id"]: line for line in run_lines(store, 2)}
    assert (lines["whale"]["estimated-revenue"], lines["u"]["paid-now"]) == ("0", "0.0012")
    assert run_cli(spp_server.run_void_oversized, ["--db", db], out) == 0
    assert out[1].startswith("0 sessions above")


def test_a_sum_past_64_bits_that_no_bound_foresaw_is_one_line_not_a_traceback(
        store, db, capsys, monkeypatch):
    add_sessions(store, [("u", None, 1_000_000, at(0))])
    monkeypatch.setattr(spp_server, "run_lines_of", lambda parts: {"u": spp_server.RunLine(1, 2**63, 0)})
    assert run_cli(spp_server.run_pay, ["--db", db, "--until", iso(at(1, 0)),
                                        "--pay-now-share", "0.6", "--final-share", "0.9"]) == 1
    err = capsys.readouterr().err
    assert "beyond what SQLite's 64-bit integers hold; nothing is recorded" in err
    assert "Traceback" not in err
    assert count(db, "payout_runs") == 0


class AnyTextSink(io.BytesIO):
    """stdout for a command: some write text, others bytes."""

    def write(self, data):
        return super().write(data.encode() if isinstance(data, str) else data)


def run_cli(command, argv, output=None):
    """Run a command's run_ function -> its exit status; what it wrote to
    stdout is appended to `output` (a list), when given."""
    out = AnyTextSink()
    status = command(argv, {}, out)
    if output is not None:
        output.append(out.getvalue().decode())
    return status


def iso(us):
    return spp_server.iso_utc(us)


def metric_value(text, name):
    return D(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def suspects_of(store):
    return spp_server.suspects(store, OCT, at(30))["users"]


# ---------------------------------------------------------------------------
# Retention: prune clears old raw bodies and deletes old refusals
# ---------------------------------------------------------------------------

def run_prune(db, *args):
    """`spp_server.py prune` in-process: (exit code, stdout)."""
    out = io.StringIO()
    code = spp_server.run_prune(["--db", db, *args], {}, out)
    return code, out.getvalue()


def bytes_of(db, sql):
    return sum(len(value.encode() if isinstance(value, str) else value)
               for (value,) in rows(db, sql))


def test_prune_clears_old_raw_bodies_and_keeps_earnings_and_deduplication(client, clock, db):
    old = [post_at(client, clock, f"2026-11-0{day}T12:00:00Z", user_id="u",
                   your_estimated_revenue="0.1") for day in range(1, 5)]
    new = post_at(client, clock, "2026-11-05T00:00:00Z", user_id="u", your_estimated_revenue="0.2")
    before = earnings(client, "u").json
    old_bytes = bytes_of(db, "SELECT raw_body FROM sessions WHERE received_at_us < "
                             f"{spp_server.parse_instant('2026-11-05')}")
    code, out = run_prune(db, "--raw-bodies-before", "2026-11-05")
    assert code == 0
    assert f"raw bodies received before 2026-11-05T00:00:00Z: 4 cleared, {old_bytes} bytes" in out
    assert "VACUUM" in out
    assert rows(db, "SELECT session_id FROM sessions WHERE raw_body != ''") == [(new["session-id"],)]
    assert earnings(client, "u").json == before
    assert post(client, old[0]).json == {"status": "duplicate"}  # still deduplicated
    assert count(db, "sessions") == 5
    assert run_prune(db, "--raw-bodies-before", "2026-11-05")[1].startswith(
        "raw bodies received before 2026-11-05T00:00:00Z: 0 cleared, 0 bytes")


def test_prune_works_in_short_transactions_through_the_write_path(client, clock, db, monkeypatch):
    for n in range(5):
        post_at(client, clock, f"2026-11-01T00:00:0{n}Z")
    monkeypatch.setattr(spp_server, "PRUNE_BATCH_ROWS", 2)
    batches = []
    write = spp_server.Store.write
    monkeypatch.setattr(spp_server.Store, "write", lambda self, op: batches.append(
        write(self, op)) or batches[-1])
    assert spp_server.prune(client.app.store, "raw bodies", spp_server.parse_instant("2027-01-01"))[0] == 5
    assert [rows_ for rows_, _ in batches] == [2, 2, 1]


PRUNE_OPTION = {"raw bodies": "--raw-bodies-before", "rejected": "--rejected-before",
                "conflicts": "--rejected-before"}
KEPT = {"raw bodies": "SELECT received_at_us FROM sessions WHERE raw_body != ''",
        "rejected": "SELECT received_at_us FROM rejected",
        "conflicts": "SELECT received_at_us FROM conflicts"}


def store_one_of_each(conn, n, received_at_us):
    """A session, a refusal and a conflict received at `received_at_us`."""
    conn.execute("INSERT INTO sessions (session_id, user_id, revenue_nano, received_at_us, "
                 "raw_body) VALUES (?, 'u', 0, ?, '{}')", (f"s{n}", received_at_us))
    conn.execute("INSERT INTO rejected (received_at_us, field, reason, raw_body) "
                 "VALUES (?, NULL, 'r', x'00')", (received_at_us,))
    conn.execute("INSERT INTO conflicts (session_id, received_at_us, stored_body, new_body) "
                 "VALUES (?, ?, '{}', '{}')", (f"s{n}", received_at_us))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hours=st.lists(st.integers(0, 47), min_size=1, max_size=12), cut=st.integers(0, 48),
       what=st.sampled_from(list(PRUNE_OPTION)))
def test_prune_touches_nothing_received_after_the_cut_whatever_the_id_order(
        db, hours, cut, what):
    """Receive times out of id order (the clock stepped back): prune clears
    or deletes what was received before the cut (at the worst leaving some
    of it for the next run), never anything received later."""
    if not os.path.exists(db):
        spp_server.Store(db, writer="thread").close()
    start = spp_server.parse_instant("2026-11-01")
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous = OFF")  # test data: no fsync
        conn.execute("BEGIN")
        for table in ("sessions", "rejected", "conflicts"):
            conn.execute(f"DELETE FROM {table}")
        for n, hour in enumerate(hours):
            store_one_of_each(conn, n, start + hour * 3_600_000_000)
        conn.execute("COMMIT")
    cut_us = start + cut * 3_600_000_000
    before = sorted(t for (t,) in rows(db, KEPT[what]))
    code, out = run_prune(db, PRUNE_OPTION[what], spp_server.iso_utc(cut_us))
    assert code == 0
    after = sorted(t for (t,) in rows(db, KEPT[what]))
    assert [t for t in after if t >= cut_us] == [t for t in before if t >= cut_us]
    gone = len(before) - len(after)
    assert f"{what} received before {spp_server.iso_utc(cut_us)}: {gone} " in out
    if hours == sorted(hours):  # in order: all of it
        assert [t for t in after if t < cut_us] == []


def test_prune_after_the_clock_stepped_back_keeps_what_came_after_the_cut(client, clock, db):
    # The cut falls at the first receipt on or after it (the 3rd id), but the
    # 2nd id came later still.
    for when in ["2026-11-01T00:00:00Z", "2026-11-03T00:00:00Z", "2026-11-02T18:00:00Z"]:
        post_at(client, clock, when, user_id=when)
    code, out = run_prune(db, "--raw-bodies-before", "2026-11-02T12:00:00Z")
    assert code == 0 and "1 cleared" in out
    assert rows(db, "SELECT user_id FROM sessions WHERE raw_body = ''") == [("2026-11-01T00:00:00Z",)]


def test_prune_deletes_old_refusals_and_conflicts(client, clock, db):
    clock.set("2026-11-01T00:00:00Z")
    post(client, b"not json", status=400)
    first = postback()
    post(client, first)
    post(client, {**first, "user-id": "changed"})
    clock.set("2026-11-03T00:00:00Z")
    post(client, b"[]", status=400)
    sizes = (bytes_of(db, "SELECT raw_body FROM rejected WHERE id = 1"),
             bytes_of(db, "SELECT stored_body FROM conflicts") + bytes_of(db, "SELECT new_body FROM conflicts"))
    code, out = run_prune(db, "--rejected-before", "2026-11-02")
    assert code == 0
    assert f"rejected received before 2026-11-02T00:00:00Z: 1 deleted, {sizes[0]} bytes" in out
    assert f"conflicts received before 2026-11-02T00:00:00Z: 1 deleted, {sizes[1]} bytes" in out
    assert rows(db, "SELECT raw_body FROM rejected") == [(b"[]",)]
    assert count(db, "conflicts") == 0 and count(db, "sessions") == 1


def test_prune_dry_run_counts_and_changes_nothing(client, clock, db):
    post_at(client, clock, "2026-11-01T00:00:00Z")
    post(client, b"x", status=400)
    state = file_state(Path(db).parent)["spp.db"]
    code, out = run_prune(db, "--raw-bodies-before", "2027-01-01", "--rejected-before", "2027-01-01",
                          "--dry-run")
    assert code == 0
    assert "raw bodies received before 2027-01-01T00:00:00Z: 1 would be cleared" in out
    assert "rejected received before 2027-01-01T00:00:00Z: 1 would be deleted, 1 bytes" in out
    assert rows(db, "SELECT count(*) FROM sessions WHERE raw_body != ''") == [(1,)]
    assert count(db, "rejected") == 1
    assert file_state(Path(db).parent)["spp.db"] == state


@pytest.mark.parametrize("dry_run", [False, True])
def test_prune_hints_at_vacuum_only_after_clearing_something(client, clock, db, dry_run):
    """The hint names the socket (under systemd it would start the server
    again), and a dry run or a prune that cleared nothing gives no hint."""
    post_at(client, clock, "2026-11-01T00:00:00Z")
    flags = ["--dry-run"] if dry_run else []
    assert "VACUUM" not in run_prune(db, "--raw-bodies-before", "2026-10-01", *flags)[1]
    assert "VACUUM" not in run_prune(db, "--rejected-before", "2027-01-01", *flags)[1]
    out = run_prune(db, "--raw-bodies-before", "2027-01-01", *flags)[1]
    if dry_run:
        assert "VACUUM" not in out
    else:
        assert "systemctl stop spp.socket spp.service" in out
        assert f"sqlite3 {db} VACUUM" in out
        # Run again: nothing left to clear, so no hint.
        assert "VACUUM" not in run_prune(db, "--raw-bodies-before", "2027-01-01")[1]


@pytest.mark.parametrize("args, words", [
    ([], ["--raw-bodies-before", "--rejected-before"]),
    (["--raw-bodies-before", "soon"], ["--raw-bodies-before", "soon"]),
])
def test_prune_usage_errors(db, capsys, args, words):
    with pytest.raises(SystemExit) as exit_:
        run_prune(db, *args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


def test_prune_finds_its_cut_through_the_receive_time_index(client, db):
    plan = query_plan(db, "first_session_id_from", (0,))
    assert plan.startswith("SEARCH sessions USING COVERING INDEX sessions_by_time"), plan
    assert "SEARCH sessions USING INTEGER PRIMARY KEY" in query_plan(db, "prunable_bodies", (0, 1, 0))


def test_prune_of_a_missing_database_creates_nothing(tmp_path, capsys):
    db = str(tmp_path / "nope.db")
    assert run_prune(db, "--raw-bodies-before", "2026-11-01") == (1, "")
    one_line_error(capsys, "no database at")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# HTTP: errors, health, the watchdog, logs
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def write_lock_held_by_another_connection(db):
    """What an operator's sqlite3 shell does with BEGIN IMMEDIATE."""
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_unexpected_exception_is_logged_and_answered_500_json(client, monkeypatch, caplog):
    def boom(body):
        raise RuntimeError("bug")

    monkeypatch.setattr(spp_server, "parse_postback", boom)
    res = post(client, SAMPLE, status=500)
    assert_error(res, 500)
    assert "Traceback" not in res.text and "bug" not in res.text
    assert any(r.exc_info and "bug" in str(r.exc_info[1]) for r in caplog.records)
    monkeypatch.undo()
    post(client, SAMPLE, status=200)


def broken_sql(monkeypatch, db, name):
    """Writes through SQL[name] fail with a database error."""
    monkeypatch.setitem(queries_holding(name), name, "INSERT INTO no_such_table VALUES (1)")
    return contextlib.nullcontext()


def failing_op(monkeypatch, db, name):
    """The write op `name` raises an error that is not the database's: a bug."""
    def fail(*args):
        raise RuntimeError("bug in the op")
    monkeypatch.setattr(spp_server, name, fail)
    return contextlib.nullcontext()


def failing_parse(monkeypatch, db, body):
    def fail(body):
        raise KeyError("bug in the parser")
    monkeypatch.setattr(spp_server, "parse_postback", fail)
    return contextlib.nullcontext()


# How a postback can fail on the server's side -> (status, outcome counted,
# whether its session-id is known when it fails).
POSTBACK_FAILURES = {
    "write lock held": (lambda mp, db, _: write_lock_held_by_another_connection(db), 503,
                        "unavailable", True),
    "insert refused": (lambda mp, db, _: broken_sql(mp, db, "insert_session"), 503,
                       "unavailable", True),
    "refusal's insert refused": (lambda mp, db, _: broken_sql(mp, db, "insert_rejected"), 503,
                                 "unavailable", "invalid"),
    "insert op raises": (lambda mp, db, _: failing_op(mp, db, "insert_session"), 500, "error",
                         True),
    "refusal's op raises": (lambda mp, db, _: failing_op(mp, db, "insert_rejected"), 500,
                            "error", "invalid"),
    "parser raises": (failing_parse, 500, "error", False),
}


@pytest.mark.parametrize("failure", sorted(POSTBACK_FAILURES))
def test_postbacks_answered_503_or_500_are_counted_and_logged_by_outcome(
        make_client, db, monkeypatch, caplog, failure):
    make_failure, status, outcome, known = POSTBACK_FAILURES[failure]
    client = make_client(busy_timeout_ms=100)
    post(client, postback())
    bodies = [postback(user_id=f"lost-{n}") for n in range(3)]
    if known == "invalid":  # a refusal whose row cannot be stored
        bodies = [{**body, "country": "not a country"} for body in bodies]
    with monkeypatch.context() as mp, make_failure(mp, db, None):
        for body in bodies:
            assert_error(post(client, body, status=status), status)
    stats = client.get("/stats").json
    expected = {**dict.fromkeys(spp_server.PostbackCounters.OUTCOMES, 0), "recorded": 1,
                outcome: len(bodies)}
    assert stats["since-start"] == expected
    _, samples = scrape(client)
    assert {dict(labels)["outcome"]: value for (name, labels), value in samples.items()
            if name == "spp_postbacks_total"} == expected
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(f"postback {outcome} status={status}")]
    assert len(lines) == len(bodies)
    for line, body in zip(lines, bodies):
        assert line.endswith(f'session-id="{body["session-id"]}" user-id="{body["user-id"]}"'
                             if known else "session-id=- user-id=-")
    assert stats["sessions"] == 1 and stats["rejected"] == 0  # nothing of them was kept


def test_healthz_is_ok_and_needs_no_auth(make_client):
    client = make_client(read_tokens=(b"reader",), postback_tokens=(b"poster",))
    assert client.get("/healthz", status=200).json == {"status": "ok"}


def test_health_is_the_databases_state_now_not_the_last_postbacks(make_client, db, monkeypatch):
    monkeypatch.setattr(spp_server, "HEALTH_FRESH_S", 0)  # every check looks afresh
    client = make_client(busy_timeout_ms=100)
    assert client.get("/healthz").json == {"status": "ok"}  # healthy before any postback
    with write_lock_held_by_another_connection(db):
        assert_error(post(client, SAMPLE, status=503), 503)
        assert_error(client.get("/healthz", status=503), 503)
    # The fault is gone; no postback since: healthy again.
    assert client.get("/healthz").json == {"status": "ok"}
    assert count(db, "sessions") == 0
    assert count(db, "health_probe") == 1  # what told it: a probe commit


def test_a_fresh_write_answers_for_health_without_a_probe(make_client, db, monkeypatch):
    monkeypatch.setattr(spp_server, "HEALTH_FRESH_S", 3600)
    client = make_client(busy_timeout_ms=100)
    post(client, SAMPLE)
    assert client.get("/healthz").json == {"status": "ok"}
    assert count(db, "health_probe") == 0  # a busy server is never probed
    with write_lock_held_by_another_connection(db):
        post(client, postback(), status=503)
    health = client.get("/healthz", status=503)  # the failure is fresh: no probe needed
    assert health.json["error"].startswith("the last write failed")


def test_watchdog_pings_a_quiet_server_and_again_once_a_fault_is_gone(make_client, db, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(spp_server, "HEALTH_FRESH_S", 0)
    store = make_client(busy_timeout_ms=100).app.store
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    environ = {"WATCHDOG_USEC": "100000", "NOTIFY_SOCKET": str(tmp_path / "notify")}
    stopping = threading.Event()
    watchdog = spp_server.start_watchdog(store, environ, stopping)
    try:
        assert notify.recv(100) == b"WATCHDOG=1"  # no postback ever: still pinged
        with write_lock_held_by_another_connection(db):
            notify.settimeout(1)
            pings = []
            for _ in range(3):  # one ping already on its way may still arrive
                try:
                    pings.append(notify.recv(100))
                except socket.timeout:
                    break
            assert len(pings) < 3  # then none while no write can commit
        notify.settimeout(10)
        assert notify.recv(100) == b"WATCHDOG=1"  # and again once it can, without a postback
    finally:
        stopping.set()
        watchdog.join(5)
        notify.close()
    assert not watchdog.is_alive()


@pytest.mark.parametrize("within, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200),
                                             ("1d", 86400)])
def test_healthz_with_postbacks_within_is_silent_past_that_age(client, clock, within, seconds):
    assert client.get(f"/healthz?postbacks-within={within}", status=503).json == {
        "status": "silent", "last-received-age-seconds": None}  # nothing ever received
    post_at(client, clock, "2026-11-23T10:00:00Z")
    clock.us += seconds * 1_000_000  # exactly that old: still within
    assert client.get(f"/healthz?postbacks-within={within}", status=200).json == {
        "status": "ok", "last-received-age-seconds": seconds}
    clock.us += 1_000_000
    assert client.get(f"/healthz?postbacks-within={within}", status=503).json == {
        "status": "silent", "last-received-age-seconds": seconds + 1}
    assert client.get("/healthz", status=200).json == {"status": "ok"}  # plain health ignores it


def test_silence_is_judged_on_stored_sessions_not_refused_postbacks(make_client, clock):
    client = make_client(postback_tokens=(b"t",))
    clock.set("2026-11-23T10:00:00Z")
    post(client, postback(), headers=bearer("t"))
    clock.set("2026-11-23T11:00:00Z")
    post(client, SAMPLE, status=401)  # a token rotated on one side only
    post(client, b"[]", status=400, headers=bearer("t"))
    assert client.get("/healthz?postbacks-within=30m", status=503).json["status"] == "silent"


@pytest.mark.parametrize("bad", ["", "30", "0m", "m", "30x", "1.5h", "-1h", " 30m", "99999999s"])
def test_a_bad_postbacks_within_is_a_400_naming_it(client, bad):
    assert_error(client.get(f"/healthz?postbacks-within={quote(bad)}", status=400), 400,
                 "postbacks-within")


def test_the_silence_check_needs_no_token_and_shows_no_data(make_client, clock):
    client = make_client(read_tokens=(b"r",), postback_tokens=(b"t",))
    clock.set("2026-11-23T10:00:00Z")
    post(client, postback(), headers=bearer("t"))
    assert set(client.get("/healthz?postbacks-within=1h").json) == {
        "status", "last-received-age-seconds"}


def test_debug_logs_one_line_per_postback_without_secrets(make_client, caplog):
    caplog.set_level(logging.DEBUG, logger="spp")
    client = make_client(postback_tokens=(b"tok-123",))
    post(client, SAMPLE, headers=bearer("tok-123"))
    post(client, SAMPLE, headers=bearer("tok-123"))
    post(client, b"{}", status=400, headers=bearer("tok-123"))
    post(client, SAMPLE, status=401, headers=bearer("tok-12"))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records
             if r.getMessage().startswith("postback ")]
    assert [(level, line.split()[1]) for level, line in lines] == [
        ("DEBUG", "recorded"), ("DEBUG", "duplicate"), ("WARNING", "rejected"),
        ("INFO", "unauthorized")]
    assert f'session-id="{SAMPLE["session-id"]}" user-id="sub1"' in lines[0][1]
    assert "status=200" in lines[0][1] and "status=401" in lines[3][1]
    assert "tok-12" not in caplog.text


def test_info_logs_only_the_postbacks_that_need_attention(client, caplog):
    caplog.set_level(logging.INFO, logger="spp")
    post(client, SAMPLE)
    post(client, SAMPLE)
    post(client, postback(session_id=SAMPLE["session-id"], user_id="changed"))
    post(client, b"{}", status=400)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[:2] for line in lines] == [
        ["postback", f'session-id="{SAMPLE["session-id"]}"'], ["postback", "rejected"]]
    assert "repeats a stored session with different fields" in lines[0]


@pytest.mark.parametrize("fields, field, session_id, user_id", [
    ({"count_of_ads_viewed": "many"}, "count-of-ads-viewed", "s-known", "u-known"),
    ({"user_id": 42}, "user-id", "s-known", None),
    ({"session_id": "", "user_id": "u\nx"}, "session-id", None, "u\nx"),
    ({"session_id": None}, "session-id", None, "u-known"),
])
def test_a_refused_postbacks_log_line_says_why_and_whose_it_was(
        client, caplog, fields, field, session_id, user_id):
    body = {**postback(session_id="s-known", user_id="u-known"),
            **{k.replace("_", "-"): v for k, v in fields.items()}}
    body = {k: v for k, v in body.items() if v is not None}
    reason = post(client, body, status=400).json["error"]
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line == (f"postback rejected status=400 field={json.dumps(field)} "
                    f"reason={json.dumps(reason)} "
                    f"session-id={json.dumps(session_id) if session_id else '-'} "
                    f"user-id={json.dumps(user_id) if user_id else '-'}")


@pytest.mark.parametrize("body", [b"not json", b"x" * (spp_server.MAX_BODY_BYTES + 1)])
def test_a_postback_refused_before_its_fields_logs_the_reason(client, caplog, body):
    reason = post(client, body, status="4*").json["error"]
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"reason={json.dumps(reason)}" in line and line.endswith("session-id=- user-id=-")


def test_log_line_cannot_be_forged_with_a_newline(client, caplog):
    caplog.set_level(logging.INFO, logger="spp")
    post(client, postback(user_id="x\nINFO spp: postback recorded"))
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_waitress_queue_depth_warnings_are_kept_out_of_the_log():
    queue_logger = logging.getLogger("waitress.queue")
    old_level = queue_logger.level
    try:
        spp_server.setup_logging()
        assert not queue_logger.isEnabledFor(logging.WARNING)
    finally:
        queue_logger.setLevel(old_level)


# ---------------------------------------------------------------------------
# Web view: read-only pages, the same figures as the API
# ---------------------------------------------------------------------------

VIEW_PAGES = ["/view/", "/view/ledger", "/view/users", "/view/users?search=u",
              "/view/users/u1", "/view/postbacks", "/view/postbacks?outcome=rejected"]
READ = "read-token-1"


def basic(password, user="me"):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def view(client, path, status=200, **params):
    return client.get(path, params=params, headers=basic(READ), status=status)


def view_soup(res):
    from bs4 import BeautifulSoup
    return BeautifulSoup(res.text, "html.parser")


def api_text(value):
    """A JSON value as the view shows it."""
    return "none" if value is None else "; ".join(value) if isinstance(value, list) else str(value)


def view_table(res, caption):
    """The table with that caption -> its rows as dicts of cell texts."""
    soup = view_soup(res)
    [table] = [t for t in soup.find_all("table") if t.caption and t.caption.text == caption]
    columns = [th.text for th in table.thead.find_all("th")]
    rows_ = [[td.text for td in tr.find_all("td")] for tr in table.tbody.find_all("tr")]
    return [dict(zip(columns, r)) for r in rows_ if r != ["none"]]


def view_fields(res, heading):
    """The definition list under the <h2> `heading` -> {term: text}."""
    soup = view_soup(res)
    [h2] = [h for h in soup.find_all("h2") if h.text == heading]
    dl = h2.find_next("dl")
    return {dt.text: dd.text for dt, dd in zip(dl.find_all("dt"), dl.find_all("dd"))}


def as_shown(records):
    return [{k: api_text(v) for k, v in r.items()} for r in records]


def chart_titles(res, chart_title):
    """{label: exact text} of the bars of one chart (their SVG <title>s)."""
    soup = view_soup(res)
    [svg] = [s for s in soup.find_all("svg") if s.get("aria-label") == chart_title]
    return dict(rect.title.text.split(" · ", 1)[0:1] + [rect.title.text.rsplit(": ", 1)[1]]
                for rect in svg.find_all("rect"))


def test_view_asks_a_browser_for_the_read_token_as_a_basic_password(view_client):
    post(view_client, postback(user_id="u1"))
    for path in [*VIEW_PAGES, "/view/view.css", "/view/icon.svg"]:
        refused = view_client.get(path, status=401)
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="spp view", charset="UTF-8"'
        assert_error(refused, 401)
        view_client.get(path, headers=basic("wrong"), status=401)
        view_client.get(path, headers=basic(READ + "x"), status=401)
        view_client.get(path, headers={"Authorization": "Basic !!!"}, status=401)
        view_client.get(path, headers=basic(""), status=401)
        assert view_client.get(path, headers=basic(READ, user="")).status_int == 200
        assert view_client.get(path, headers=bearer(READ)).status_int == 200  # curl's way too
    # Without a read token (the loopback-only default), like the API: open.
    assert make_app_open(view_client).status_int == 200


def make_app_open(view_client):
    app = spp_server.create_app({"db": view_client.app.store.path, "writer": "thread"})
    try:
        return TestApp(app).get("/view/")
    finally:
        app.store.close()


def test_view_answers_carry_a_strict_policy_even_when_refused(view_client):
    post(view_client, postback(user_id="u1"))
    for res in [view_client.get("/view/", status=401), view(view_client, "/view/", 400, month="x"),
                *(view(view_client, path) for path in VIEW_PAGES)]:
        csp = res.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "script-src" not in csp and "unsafe" not in csp and "http" not in csp
        assert res.headers["X-Content-Type-Options"] == "nosniff"
        assert res.headers["Referrer-Policy"] == "no-referrer"
        assert res.headers["Cache-Control"] == "no-store"
    css = view(view_client, "/view/view.css")
    assert css.content_type == "text/css" and b"prefers-color-scheme: dark" in css.body


def test_view_pages_hold_no_script_no_inline_style_and_nothing_from_elsewhere(view_client):
    post(view_client, postback(user_id="u1"))
    for path in VIEW_PAGES:
        soup = view_soup(view(view_client, path))
        assert not soup.find_all("script") and not soup.find_all("style")
        assert not soup.find_all(style=True)
        assert not [t for t in soup.find_all(True) if any(a.startswith("on") for a in t.attrs)]
        for tag, attr in (("link", "href"), ("a", "href"), ("form", "action"), ("img", "src")):
            for element in soup.find_all(tag):
                if element.get(attr) is not None:
                    assert element[attr].startswith(("/view", "#")), (path, element)


HOSTILE_IDS = ['<img src=x onerror="document.title=1">', "</script><script>alert(1)</script>",
               "\u202egnp.exe", "\x01\x02\x7f\x1b[31m\ufffe" + "\u00ff" * 3, "a\"'&<>/b"]


def test_view_shows_hostile_values_as_text(view_client):
    for user_id in HOSTILE_IDS:
        post(view_client, postback(user_id=user_id))
    post(view_client, b'{"user-id": "<b>bold</b>", "session-id": 7}', status=400)
    pages = [*VIEW_PAGES, "/view/postbacks?outcome=recorded",
             *(f"/view/users/{quote(u, safe='')}" for u in HOSTILE_IDS)]
    for path in pages:
        res = view(view_client, path)
        soup = view_soup(res)
        assert not soup.find_all(["img", "script", "b"]), path
        assert "\u202e" not in res.text and "\x1b" not in res.text and "\x01" not in res.text
    users = view(view_client, "/view/users")
    shown = {a.text for a in view_soup(users).select("a.id")}
    # Invisible characters are shown as escapes; the rest as it is.
    assert {'<img src=x onerror="document.title=1">', "\\u202egnp.exe", "a\"'&<>/b"} <= shown
    # Each user's link leads to that user's page.
    for a in view_soup(users).select("a.id"):
        page = view_client.get(a["href"], headers=basic(READ))
        assert page.status_int == 200
        assert "1" == view_fields(page, view_soup(page).find_all("h2")[0].text)["sessions"]


@pytest.mark.parametrize("rollup", ["kept", "too many cells"])
def test_view_month_equals_reconciliation_and_totals(make_client, clock, monkeypatch, rollup):
    if rollup == "too many cells":  # then the page reads with the API's own SQL
        monkeypatch.setattr(spp_server.Rollup, "MAX_CELLS", 0)
    client = make_client(read_tokens=(READ.encode(),), reward_share=D("0.7"),
                         report_utc_offset=330)
    for day in range(1, 10):
        for n in range(day):
            post_at(client, clock, f"2026-11-{day:02d}T{(n * 5) % 24:02d}:00:00Z",
                    user_id=f"u{n}", property_id=["1234", "5678", None][n % 3],
                    country=["IN", "BR"][n % 2], your_estimated_revenue=f"0.00{n}1")
    post_at(client, clock, "2026-10-31T19:00:00Z", user_id="early")  # 1 Nov at +05:30
    post_at(client, clock, "2026-11-30T20:00:00Z", user_id="late")  # December at +05:30
    spp_server.import_booked(
        client.app.store,
        [spp_server.BookedRow(f"2026-11-{d:02d}", "", "", d * 900_000) for d in range(1, 8)],
        "nov.csv")
    clock.set("2026-11-20T00:00:00Z")
    api = client.get("/reconciliation", headers=bearer(READ), params={
        "since": "2026-11-01", "until": "2026-12-01", "report-utc-offset": "+05:30"}).json
    for _ in range(2):  # the second load reads its rollup, caught up
        page = view(client, "/view/")
        assert as_shown(api["days"]) == view_table(page, "Days")
        assert (client.app.rollup.cells == {}) == (rollup == "too many cells")
        assert {k: api_text(v) for k, v in api["summary"].items()} == view_fields(
            page, "The month in sum")
        for group, caption in (("property-id", "Totals by property"),
                               ("country", "Totals by country")):
            totals_ = client.get("/totals", headers=bearer(READ), params={
                "since": "2026-11-01T00:00:00+05:30", "until": "2026-12-01T00:00:00+05:30",
                "group-by": group}).json["totals"]
            assert as_shown(totals_) == view_table(page, caption)
        sessions = chart_titles(page, "Sessions per report day, 2026-11")
        assert sessions == {d["day"]: str(d["sessions"]) for d in api["days"]}
        for svg in view_soup(page).find_all("svg"):  # every chart's axes are labelled
            labels = [t.text for t in svg.find_all("text", class_="label")]
            assert labels[0] == "report day" and labels[1] in ("sessions", "USD", "ratio")
        share = api["summary"]["suggested-reward-share"]
        assert share and f"suggested reward share: {share}" in page.text
        # A postback after the first load is in the second.
        post_at(client, clock, "2026-11-02T10:00:00Z", user_id="again")
        clock.set("2026-11-20T00:00:00Z")
        api = client.get("/reconciliation", headers=bearer(READ), params={
            "since": "2026-11-01", "until": "2026-12-01", "report-utc-offset": "+05:30"}).json
    assert "1" in view_table(view(client, "/view/", month="2026-12"), "Days")[0]["sessions"]


def test_view_month_tells_whether_postbacks_arrive(view_client, clock):
    page = view(view_client, "/view/")
    assert view_fields(page, "Are postbacks arriving?")["silence alarm (30m)"] == "silent"
    post_at(view_client, clock, "2026-11-23T10:00:00Z")
    post(view_client, b"{", status=400)
    clock.set("2026-11-23T10:29:00Z")
    fields = view_fields(view(view_client, "/view/"), "Are postbacks arriving?")
    assert fields["silence alarm (30m)"] == "ok"
    assert fields["last postback received"] == "2026-11-23T10:00:00Z (1,740 s ago)"
    assert fields["rejected postbacks kept"] == "1"
    clock.set("2026-11-23T10:31:00Z")
    fields = view_fields(view(view_client, "/view/"), "Are postbacks arriving?")
    assert fields["silence alarm (30m)"] == "silent"
    assert view_client.get("/healthz?postbacks-within=30m", status=503)


def test_view_month_rollup_starts_over_when_the_ids_mean_other_sessions(view_client, clock):
    post_at(view_client, clock, "2026-11-02T10:00:00Z", user_id="a")
    post_at(view_client, clock, "2026-11-02T11:00:00Z", user_id="b")
    assert chart_titles(view(view_client, "/view/"), "Sessions per report day, 2026-11") == {
        "2026-11-02": "2"}
    # A restored backup: the newest session is gone, another takes its id.
    view_client.app.store.write(lambda conn, _: conn.execute(
        "DELETE FROM sessions WHERE id = (SELECT max(id) FROM sessions)"))
    post_at(view_client, clock, "2026-11-03T10:00:00Z", user_id="c")
    assert chart_titles(view(view_client, "/view/"), "Sessions per report day, 2026-11") == {
        "2026-11-02": "1", "2026-11-03": "1"}


def test_the_view_sums_hold_the_last_92_days_and_older_months_are_read_with_sql(view_client,
                                                                             clock):
    rollup = view_client.app.rollup
    post_at(view_client, clock, "2026-08-05T10:00:00Z", user_id="a")
    post_at(view_client, clock, "2026-11-05T10:00:00Z", user_id="b")
    clock.set("2026-11-20T00:00:00Z")  # the horizon: 2026-08-20
    sessions_per_day = lambda month: chart_titles(  # noqa: E731
        view(view_client, "/view/", month=month), f"Sessions per report day, {month}")
    assert sessions_per_day("2026-11") == {"2026-11-05": "1"}
    assert sessions_per_day("2026-08") == {"2026-08-05": "1"}  # before it: from SQL
    assert [key[0] for key in rollup.cells] == [spp_server.report_day_number("2026-11-05")]
    clock.set("2027-02-10T00:00:00Z")  # the horizon moves on to 2026-11-10
    post_at(view_client, clock, "2027-02-10T01:00:00Z", user_id="c")
    assert sessions_per_day("2027-02") == {"2027-02-10": "1"}
    assert [key[0] for key in rollup.cells] == [spp_server.report_day_number("2027-02-10")]
    assert sessions_per_day("2026-11") == {"2026-11-05": "1"}  # now from SQL, the same


def test_a_catch_up_reads_only_the_new_sessions_by_their_ids(store, db):
    store_sessions(db, 2000)
    params = {"after": 1990, "last": 2000, "offset_us": 0, "horizon_us": 0}
    assert query_plan(db, "rollup_rows", params).startswith(
        "SEARCH sessions USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)")


def test_the_view_sums_are_caught_up_in_the_background_at_the_lowest_priority(view_client, clock):
    app = view_client.app
    newest = lambda: app.store.read("SELECT max(id) FROM sessions")[0][0]  # noqa: E731
    post_at(view_client, clock, "2026-11-02T10:00:00Z", user_id="a")
    stopping = threading.Event()
    thread = spp_server.start_rollup_refresh(app, stopping, interval=0.05)
    try:
        wait_for(lambda: app.rollup.last_id == newest(), "the sums at once, no page loaded")
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == 19
        post_at(view_client, clock, "2026-11-03T10:00:00Z", user_id="b")
        wait_for(lambda: app.rollup.last_id == newest(), "the sums caught up again")
        assert sorted(day for day, _, _ in app.rollup.cells) == [
            spp_server.report_day_number(d) for d in ("2026-11-02", "2026-11-03")]
    finally:
        stopping.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_catch_up_cut_short_changes_none_of_the_sums(view_client, db, clock):
    clock.set("2023-11-15T00:00:00Z")
    store_sessions(db, 3000)  # far more SQLite steps than between two looks
    rollup = view_client.app.rollup
    looks = []
    with pytest.raises(spp_server.StoreUnavailable, match="interrupted"):
        rollup.refresh(view_client.app.store, cancelled=lambda: looks.append(1) or len(looks) > 1)
    assert looks and (rollup.last_id, rollup.cells) == (0, {})
    assert rollup.refresh(view_client.app.store)  # and the next catch-up adds every session once
    assert [cell[0] for cell in rollup.cells.values()] == [3000] and rollup.last_id == 3000


class StopsOnceLookedAt(threading.Event):
    """An Event that is set from its second look on: `stopping` for a server
    that stops while its first catch-up is reading."""

    looks = 0

    def is_set(self):
        self.looks += 1
        return self.looks > 1 or super().is_set()

    def wait(self, timeout=None):
        return self.is_set() or super().wait(timeout)


def test_the_background_catch_up_ends_when_the_server_stops_even_mid_read(view_client, db,
                                                                        caplog, clock):
    clock.set("2023-11-15T00:00:00Z")
    store_sessions(db, 3000)
    stopping = StopsOnceLookedAt()
    thread = spp_server.start_rollup_refresh(view_client.app, stopping, interval=3600)
    thread.join(5)
    assert not thread.is_alive() and view_client.app.rollup.last_id == 0  # cut short
    assert stopping.looks > 2  # looked at during the read
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # stopping is no fault


def test_the_view_sums_stop_being_caught_up_once_too_many(view_client, clock, monkeypatch):
    monkeypatch.setattr(spp_server.Rollup, "MAX_CELLS", 0)
    post_at(view_client, clock, "2026-11-02T10:00:00Z", user_id="a")
    thread = spp_server.start_rollup_refresh(view_client.app, threading.Event(), interval=0.05)
    thread.join(5)  # ends on its own: nothing kept, pages read with SQL
    assert not thread.is_alive() and view_client.app.rollup.too_many


def test_the_real_server_catches_the_view_sums_up_from_its_start(make_client, db, real_server):
    post(make_client(), postback())  # a session already stored when the server starts
    server = real_server(db, args=["--log-level", "debug"])
    wait_for(lambda: "the month's sums are caught up to session row 1" in server.log_text(),
             "the server's first catch-up")
    assert server.stop() == 0


def test_view_users_rank_by_revenue_page_and_equal_the_api(view_client, clock):
    for n in range(120):
        post_at(view_client, clock, "2026-11-05T10:00:00Z", user_id=f"u{n:03d}",
                your_estimated_revenue=f"0.{n % 40 + 1:06d}")
    post_at(view_client, clock, "2026-10-05T10:00:00Z", user_id="october-only",
            your_estimated_revenue="9")
    clock.set("2026-11-20T00:00:00Z")
    expected = sorted((f"u{n:03d}" for n in range(120)), key=lambda u: (-(int(u[1:]) % 40), u))
    shown = []
    for page in (1, 2, 3):
        res = view(view_client, "/view/users", page=str(page))
        table = view_table(res, "Users, 2026-11")
        shown += [r["user-id"] for r in table]
        assert f"page {page} of 3 (120 users with sessions in 2026-11)" in res.text
        for row in table[:3]:
            api = earnings(view_client, row["user-id"], headers=bearer(READ),
                           since="2026-11-01", until="2026-12-01").json
            ledger = view_client.get(f"/users/{row['user-id']}/statement",
                                     headers=bearer(READ)).json["totals"]
            assert row == {"user-id": row["user-id"], "sessions": str(api["sessions"]),
                           "estimated-revenue": api["estimated-revenue"],
                           "rewardable-revenue": api["rewardable-revenue"],
                           "paid-now (all time)": ledger["paid-now"],
                           "pending": ledger["pending"], "owed": ledger["owed"]}
    assert shown == expected
    october = view_table(view(view_client, "/view/users", month="2026-10"), "Users, 2026-10")
    assert [r["user-id"] for r in october] == ["october-only"]
    found = view_table(view(view_client, "/view/users", search="u11"), "Users, 2026-11")
    assert [r["user-id"] for r in found] == [f"u11{n}" for n in range(10)]
    assert view_table(view(view_client, "/view/users", search="v"), "Users, 2026-11") == []
    view(view_client, "/view/users", 400, page="0")
    view(view_client, "/view/users", 400, month="2026-13")
    view(view_client, "/view/users", 400, sort="x")


def test_view_users_order_is_kept_a_while_the_figures_are_read_fresh(view_client, clock,
                                                                    monkeypatch):
    post_at(view_client, clock, "2026-11-05T10:00:00Z", user_id="a", your_estimated_revenue="0.1")
    post_at(view_client, clock, "2026-11-05T10:00:00Z", user_id="b", your_estimated_revenue="0.2")
    def shown():
        table = view_table(view(view_client, "/view/users"), "Users, 2026-11")
        return [(r["user-id"], r["estimated-revenue"]) for r in table]
    assert shown() == [("b", "0.2"), ("a", "0.1")]
    post_at(view_client, clock, "2026-11-05T11:00:00Z", user_id="a", your_estimated_revenue="0.5")
    assert shown() == [("b", "0.2"), ("a", "0.6")]  # the order of a minute ago, today's figures
    monkeypatch.setattr(spp_server.Ranking, "RANKING_TTL_S", -1)
    assert shown() == [("a", "0.6"), ("b", "0.2")]


def test_view_user_page_is_the_statement_and_the_sessions(make_client, clock):
    client = make_client(read_tokens=(READ.encode(),))
    store = client.app.store
    add_sessions(store, [("who", "p", 2_000_000, at(d)) for d in (0, 0, 1, 3)]
                 + [("other", "p", 5_000_000, at(1))])
    book_rows(store, [(day_text(d), "p", 1_000_000) for d in range(4)])
    pay(store, at(5))
    spp_server.settle(store)
    clock.set("2020-10-20T00:00:00Z")
    res = view(client, "/view/users/who")
    statement_ = client.get("/users/who/statement", headers=bearer(READ)).json
    assert view_fields(res, "Statement: where the reward is") == {
        k: api_text(v) for k, v in statement_["totals"].items()}
    assert view_table(res, "Runs that paid this user") == as_shown(statement_["runs"])
    assert view_table(res, "Settlement lines of this user") == as_shown(statement_["settlements"])
    sessions = client.get("/users/who/sessions?limit=20", headers=bearer(READ)).json["sessions"]
    assert view_table(res, "Sessions, newest first") == as_shown(sessions)
    assert chart_titles(res, "Sessions per report day, 2020-10") == {
        "2020-10-01": "2", "2020-10-02": "1", "2020-10-04": "1"}
    month = earnings(client, "who", headers=bearer(READ), since="2020-10-01",
                     until="2020-11-01").json
    assert view_fields(res, "2020-10") == {k: api_text(v) for k, v in month.items()}


def test_view_user_page_pages_the_sessions(view_client, clock):
    for n in range(25):
        post_at(view_client, clock, f"2026-11-05T10:{n:02d}:00Z", user_id="many")
    first = view(view_client, "/view/users/many")
    older = view_soup(first).find("a", string="older sessions →")["href"]
    second = view_client.get(older, headers=basic(READ))
    api = view_client.get("/users/many/sessions", params={"limit": "20"}, headers=bearer(READ)).json
    api2 = view_client.get("/users/many/sessions", params={"limit": "20", "before": api["next"]},
                           headers=bearer(READ)).json
    assert view_table(second, "Sessions, newest first") == as_shown(api2["sessions"])
    assert len(api2["sessions"]) == 5


def test_view_ledger_equals_get_ledger(make_client, clock):
    client = make_client(read_tokens=(READ.encode(),))
    store = client.app.store
    add_sessions(store, [(f"u{n}", "p", 3_000_000 * (n + 1), at(n % 3)) for n in range(6)])
    book_rows(store, [(day_text(d), "p", 9_000_000) for d in range(3)])
    pay(store, at(1))
    pay(store, at(5))
    spp_server.settle(store)
    res = view(client, "/view/ledger")
    api = client.get("/ledger", headers=bearer(READ)).json
    assert view_fields(res, "Totals") == {k: api_text(v) for k, v in api["totals"].items()}
    assert view_table(res, "Runs") == as_shown(api["runs"])
    assert view_table(res, "Settlements") == as_shown(api["settlements"])
    assert view_table(res, "Settled days") == as_shown(api["days"])
    assert chart_titles(res, "Paid now per run (USD)") == {
        f"run {r['run-id']}": r["paid-now"] for r in api["runs"]}
    assert chart_titles(res, "Top-ups per settlement (USD)") == {
        f"settlement {s['settlement-id']}": s["released"] for s in api["settlements"]}


def test_view_postbacks_show_each_outcome_with_its_body(view_client, clock):
    first = postback(user_id="x")
    post_at(view_client, clock, "2026-11-05T10:00:00Z", **{k.replace("-", "_"): v
                                                           for k, v in first.items()})
    clock.set("2026-11-05T10:01:00Z")
    post(view_client, first)  # an exact duplicate
    clock.set("2026-11-05T10:02:00Z")
    post(view_client, {**first, "country": "BR"})  # a conflicting one
    clock.set("2026-11-05T10:03:00Z")
    post(view_client, postback(country="India"), status=400)
    table = view_table(view(view_client, "/view/postbacks"), "Latest postbacks, newest first")
    assert [r["outcome"] for r in table] == ["rejected", "conflict", "duplicate", "recorded"]
    assert [r["received-at"] for r in table] == [f"2026-11-05T10:0{m}:00Z" for m in (3, 2, 1, 0)]
    assert table[0]["reason"].startswith("country: ")
    assert json.loads(table[0]["raw body"])["country"] == "India"
    assert json.loads(table[1]["raw body"])["country"] == "BR"
    assert table[1]["user-id"] == table[2]["user-id"] == table[3]["user-id"] == "x"
    assert json.loads(table[2]["raw body"]) == first
    assert table[3]["session-id"] == first["session-id"]
    rejected = view_client.get("/rejected", headers=bearer(READ)).json["rejected"][0]
    assert table[0]["reason"] == f"{rejected['field']}: {rejected['reason']}"
    for outcome in spp_server.POSTBACK_OUTCOMES:
        only = view_table(view(view_client, "/view/postbacks", outcome=outcome),
                          "Latest postbacks, newest first")
        assert [r["outcome"] for r in only] == [outcome]
    view(view_client, "/view/postbacks", 400, outcome="lost")
    assert_error(view(view_client, "/view/postbacks", 400, before="yesterday"), 400, "before")
    # Paged by receive time: two a page, the next page from the link.
    page = view(view_client, "/view/postbacks", limit="2")
    seen = []
    while True:
        seen += [r["outcome"] for r in view_table(page, "Latest postbacks, newest first")]
        link = view_soup(page).find("a", string="older →")
        if link is None:
            break
        page = view_client.get(link["href"], headers=basic(READ))
    assert seen == ["rejected", "conflict", "duplicate", "recorded"]
    older = view(view_client, "/view/postbacks", outcome="rejected", before="2026-11-05T10:03:00Z")
    assert view_table(older, "Latest postbacks, newest first") == []


def test_view_changes_nothing(view_client, clock):
    post_at(view_client, clock, "2026-11-05T10:00:00Z", user_id="u1")
    changes = view_client.app.store.write(lambda conn, _: conn.total_changes)
    for path in VIEW_PAGES:
        view(view_client, path)
    assert view_client.app.store.write(lambda conn, _: conn.total_changes) == changes




# --- The view in a real browser: headless Chromium from Debian, driven by Playwright ---

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = HERE / "docs"


def browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium: apt-get install chromium chromium-driver (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no Playwright: pip install -r requirements-dev.txt")
    return sync_playwright


class OtherOrigin:
    """An HTTP server on another port: any request that reaches it is a
    page loading something from another origin."""

    def __init__(self):
        import http.server

        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


# other.test: the browser resolves it to the OtherOrigin server
# (--host-resolver-rules), so the ids, and so the screenshots, stay the same.
OTHER_HOST = "http://other.test"
BROWSER_HOSTILE_IDS = [f'<img src="{OTHER_HOST}/img" onerror="alert(1)">',
                       f'</script><script src="{OTHER_HOST}/js"></script>',
                       f'<link rel=stylesheet href="{OTHER_HOST}/css">\u202eevil',
                       "\u202e" + "txt.exe" + "\u202c",
                       "\x01\x02\x7f\x1b[31m" + bytes(range(0x80, 0xff)).decode("latin-1"),
                       "w" * 255]


def types_namespace(**fields):
    import types

    return types.SimpleNamespace(**fields)


def api_json(site, path):
    status, _, body = http_request(site.server.port, "GET", path, headers=bearer(READ))
    assert status == 200, (path, body)
    return json.loads(body)


@contextlib.contextmanager
def view_tab(site, width=1024, password=READ, dark=False):
    """A fresh browser context (no cookies, no cached credentials) and a
    page that records console errors, dialogs and every request."""
    context = site.browser.new_context(
        viewport={"width": width, "height": 800}, color_scheme="dark" if dark else "light",
        http_credentials={"username": "me", "password": password} if password else None)
    page = context.new_page()
    page.problems, page.requests = [], []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(f"script ran: {e}"))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: page.requests.append(r.url))
    try:
        yield page
    finally:
        context.close()


def open_view(site, page, path, shot=None):
    """Open a page: it renders (200), no console error, no script, nothing
    from another origin, no horizontal overflow at the page's width."""
    response = page.goto(site.origin + path)
    assert response.status == 200, path
    page.wait_for_load_state("load")
    assert page.problems == [], (path, page.problems)
    foreign = [url for url in page.requests if not url.startswith(site.origin + "/view/")
               and url != site.origin + path]
    assert foreign == [], (path, foreign)
    assert page.evaluate("document.scripts.length + document.images.length") == 0, path
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, (path, f"{overflow}px wider than the window")
    if shot:
        # What changes by the second (the last postback's time) is masked:
        # the pictures change only when the pages do.
        page.screenshot(path=str(SCREENSHOTS / shot), full_page="month" in shot,
                        mask=[page.locator(".live")], mask_color="#8a8a8a")
    return page


BROWSER_PAGES = [("/view/?month=2020-10", "view-month.png"), ("/view/ledger", "view-ledger.png"),
                 ("/view/users?month=2020-10", "view-users.png"),
                 ("/view/users/user-03?month=2020-10", "view-user.png"),
                 ("/view/postbacks", "view-postbacks.png"), ("/view/", None),
                 ("/view/users", None), ("/view/users?search=user-1", None)]


def test_browser_every_page_renders_with_nothing_from_elsewhere(view_site):
    with view_tab(view_site) as page:
        for path, shot in BROWSER_PAGES:
            open_view(view_site, page, path, shot)
    with view_tab(view_site, width=360) as page:  # every other page at 360: the next test
        open_view(view_site, page, "/view/?month=2020-10", "view-month-360.png")
    with view_tab(view_site, dark=True) as page:
        open_view(view_site, page, "/view/users/user-03?month=2020-10", "view-user-dark.png")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(18, 18, 18)"  # dark mode followed
    assert view_site.other.requests == []


def test_browser_hostile_ids_stay_text(view_site):
    paths = ["/view/", "/view/users", "/view/postbacks", "/view/postbacks?outcome=rejected",
             "/view/ledger", "/view/users/user-03?month=2020-10", "/view/users?month=2020-10",
             # The 10 KB id is refused (over 256 characters): its body is on the
             # rejected list; a search for it fits the server's 16 KiB of headers.
             f"/view/users?search={quote(view_site.long_id[:1000])}",
             *(f"/view/users/{quote(u, safe='')}" for u in view_site.hostile)]
    for width in (360,):  # the narrowest a layout must hold at
        with view_tab(view_site, width=width) as page:
            for path in paths:
                open_view(view_site, page, path)
                assert page.title().endswith("· spp-receiver")
            # Each id reads back as it was posted (invisible characters as escapes).
            open_view(view_site, page, "/view/users")
            ids = page.locator("a.id").all_inner_texts()
            assert view_site.hostile[0] in ids and view_site.hostile[5] in ids
            assert "\\u202etxt.exe\\u202c" in ids
    assert view_site.other.requests == []


def test_browser_numbers_equal_the_api(view_site):
    with view_tab(view_site) as page:
        open_view(view_site, page, "/view/?month=2020-10")
        report = api_json(view_site, "/reconciliation?since=2020-10-01&until=2020-11-01")
        bars = page.locator('svg[aria-label="Sessions per report day, 2020-10"] rect title')
        assert bars.all_text_contents() == [f"{d['day']} · sessions: {d['sessions']:,}"
                                          for d in report["days"]]
        share = report["summary"]["suggested-reward-share"]
        assert page.locator("line.share title").text_content() == f"suggested reward share: {share}"
        open_view(view_site, page, "/view/ledger")
        ledger = api_json(view_site, "/ledger")
        bars = page.locator('svg[aria-label="Paid now per run (USD)"] rect title')
        assert bars.all_text_contents() == [f"run {r['run-id']} · paid now: {r['paid-now']}"
                                          for r in ledger["runs"]]
        open_view(view_site, page, "/view/users?month=2020-10")
        first = page.locator("tbody tr").first.locator("td").all_inner_texts()
        api = api_json(view_site, f"/users/{first[0]}/earnings?since=2020-10-01&until=2020-11-01")
        assert first[1:3] == [str(api["sessions"]), api["estimated-revenue"]]
        open_view(view_site, page, "/view/postbacks?outcome=rejected")
        rejected = api_json(view_site, "/rejected")["rejected"]
        assert page.locator("tbody tr").count() == len(rejected) == 1


def test_browser_token_refused_then_accepted(view_site):
    from playwright.sync_api import Error as BrowserError

    for password in (None, READ[:-1]):
        with view_tab(view_site, password=password) as page:
            try:  # the browser is asked for a password; with none or a wrong one, refused
                response = page.goto(view_site.origin + "/view/")
            except BrowserError as refused:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(refused)
            else:
                assert response.status == 401
                assert "Basic" in response.headers["www-authenticate"]
                assert "user-" not in response.text()
    with view_tab(view_site) as page:
        open_view(view_site, page, "/view/")
        assert all(READ not in url for url in page.requests)  # never in a URL
    assert READ not in view_site.server.log_text()


def test_browser_keyboard_reaches_every_link_and_form(view_site):
    with view_tab(view_site) as page:
        open_view(view_site, page, "/view/users?month=2020-10")
        reached = []
        while "search" not in reached and len(reached) < 10:
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.textContent.trim() || "
                                         "document.activeElement.name"))
        assert reached == ["Skip to the content", "Month", "Ledger", "Users", "Postbacks",
                           "search"]
        page.keyboard.type("user-1")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "search=user-1" in page.url
        assert page.locator("a.id").first.inner_text().startswith("user-1")


# ---------------------------------------------------------------------------
# Waitress's internals: only one section touches them, those of the pinned version
# ---------------------------------------------------------------------------

# What of waitress is not its public API (create_server and its settings).
WAITRESS_INTERNALS = re.compile(r"\b(wasyncore|HTTPChannel|BaseWSGIServer|MultiSocketServer|"
                                r"task_dispatcher)\b|\._map\b")


def test_only_the_waitress_internals_section_touches_waitress_internals():
    source = SERVER.read_text(encoding="utf-8")
    sections = re.split(r"^# -{75}\n# (.*)\n# -{75}\n", source, flags=re.M)
    touching = {name for name, body in zip(sections[1::2], sections[2::2])
                if WAITRESS_INTERNALS.search(body)}
    assert WAITRESS_INTERNALS.search(sections[0]) is None  # the imports
    assert touching == {"Waitress's internals: the only code that touches them"}


def test_the_waitress_internals_are_those_of_the_pinned_waitress():
    """The section names the version it was written against: the one
    requirements.txt pins, and the one installed."""
    import importlib.metadata
    [pinned] = re.findall(r"^waitress==(\S+)$", (HERE / "requirements.txt").read_text(), re.M)
    assert spp_server.WAITRESS_PINNED == pinned == importlib.metadata.version("waitress")


# ---------------------------------------------------------------------------
# Server and command line: configuration, options, commands
# ---------------------------------------------------------------------------

def test_defaults(fake_serve, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert spp_server.main([], environ={}) == 0
    [config] = fake_serve
    assert (config["db"], config["host"], config["port"], config["threads"]) == (
        "spp.db", "127.0.0.1", 8080, 16)
    assert fake_serve.log_levels == ["info"]
    assert (tmp_path / "spp.db").exists()


def test_environment_sets_options_and_flags_win(fake_serve, db):
    environ = {"SPP_DB": db, "SPP_HOST": "::1", "SPP_PORT": "9000", "SPP_THREADS": "8",
               "SPP_LOG_LEVEL": "DEBUG"}
    assert spp_server.main(["--port", "9100"], environ=environ) == 0
    assert spp_server.main(["--log-level", "warning"], environ=environ) == 0
    first, second = fake_serve
    assert (first["db"], first["host"], first["port"], first["threads"]) == (
        db, "::1", 9100, 8)
    assert second["port"] == 9000
    assert fake_serve.log_levels == ["debug", "warning"]


@pytest.mark.parametrize("argv, environ, named", [
    (["--log-level", "verbose"], {}, "--log-level"),
    ([], {"SPP_LOG_LEVEL": "trace"}, "SPP_LOG_LEVEL='trace'")])
def test_unknown_log_level_is_a_usage_error(fake_serve, db, argv, environ, named, capsys):
    with pytest.raises(SystemExit) as exited:
        spp_server.main(["--db", db, *argv], environ=environ)
    assert exited.value.code == 2
    assert f"{named}: must be one of debug, info, warning, error" in capsys.readouterr().err
    assert fake_serve == []


def test_help_explains_every_option_and_variable(capsys):
    with pytest.raises(SystemExit) as exited:
        spp_server.main(["--help"], environ={})
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ["--db", "--host", "--port", "--threads", "SPP_DB", "SPP_HOST", "SPP_PORT",
                 "SPP_THREADS", "SPP_POSTBACK_TOKEN", "SPP_READ_TOKEN", "CREDENTIALS_DIRECTORY",
                 "COMMAND --help"]:
        assert word in text


def test_help_lists_every_command_with_a_line_saying_what_it_does(capsys):
    with pytest.raises(SystemExit) as exited:
        spp_server.main(["--help"], environ={})
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 100 for line in lines)
    for name in ["export", "import-booked", "reconcile", "prune"]:
        [line] = [line for line in lines if line.split()[:1] == [name]]
        assert len(line.split()) >= 5, line  # the name, then what it does
        with pytest.raises(SystemExit) as exited:  # and it is a command that runs
            spp_server.main([name, "--help"], environ={})
        assert exited.value.code == 0 and f"spp_server.py {name}" in capsys.readouterr().out


@pytest.mark.parametrize("typed, meant", [
    ("exprot", "export"), ("expor", "export"), ("import_booked", "import-booked"),
    ("importbooked", "import-booked"), ("reconcle", "reconcile"), ("purne", "prune"),
    ("Export", "export")])
def test_a_misspelt_command_names_the_nearest_one(fake_serve, capsys, typed, meant):
    with pytest.raises(SystemExit) as exited:
        spp_server.main([typed, "--db", "x.db"], environ={})
    assert exited.value.code == 2 and fake_serve == []
    err = capsys.readouterr().err
    assert f"{typed!r} is not a command: did you mean {meant!r}?" in err


def test_a_word_like_no_command_lists_the_commands(fake_serve, capsys):
    with pytest.raises(SystemExit) as exited:
        spp_server.main(["serve"], environ={})
    assert exited.value.code == 2 and fake_serve == []
    assert "the commands are export, import-booked, reconcile, prune" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["reconcile", "--since", "2026-11-01", "--until",
                                          "2026-11-02"]])
@pytest.mark.parametrize("value", ["-03:00", "-00:30", "-14:00"])
def test_a_negative_offset_after_a_space_hints_at_the_equals_form(fake_serve, db, capsys, command,
                                                                  value):
    with pytest.raises(SystemExit) as exited:
        spp_server.main([*command, "--db", db, "--report-utc-offset", value], environ={})
    assert exited.value.code == 2 and fake_serve == []
    assert f"--report-utc-offset={value}" in capsys.readouterr().err


def test_an_option_missing_its_value_gets_argparses_own_error(fake_serve, db, capsys):
    with pytest.raises(SystemExit):
        spp_server.main(["--report-utc-offset", "--db", db], environ={})
    err = capsys.readouterr().err
    assert "expected one argument" in err and "=" not in err.splitlines()[-1]


@pytest.mark.parametrize("command", [[], ["export", "--since", "1", "--until", "2"],
                                     ["reconcile", "--since", "2026-11-01", "--until", "2026-11-02"]])
@pytest.mark.parametrize("variable, value, flag", [
    ("SPP_PORT", "x", "--port"), ("SPP_PORT", "70000", "--port"), ("SPP_THREADS", "0", "--threads"),
    ("SPP_THREADS", "1e3", "--threads"), ("SPP_LOG_LEVEL", "loud", "--log-level"),
    ("SPP_REWARD_SHARE", "2", "--reward-share"), ("SPP_REWARD_SHARE", "NaN", "--reward-share"),
    ("SPP_REPORT_UTC_OFFSET", "+5", "--report-utc-offset"), ("SPP_HOST", "", "--host"),
    ("SPP_HOST", "999.1.1.1", "--host"), ("SPP_HOST", "no such host", "--host")])
def test_a_bad_environment_variable_is_named_not_a_flag_never_given(
        fake_serve, db, capsys, command, variable, value, flag):
    parser_of = {(): spp_server.build_parser, ("export",): spp_server.build_export_parser,
                 ("reconcile",): spp_server.build_reconcile_parser}[tuple(command[:1])]
    if flag not in parser_of({}).format_help():
        return  # this command has no such option, so it reads no such variable
    with pytest.raises(SystemExit) as exited:
        spp_server.main([*command, "--db", db], environ={variable: value})
    assert exited.value.code == 2 and fake_serve == []
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"{variable}={value!r}" in error
    assert flag not in error and "invalid" not in error and "<" not in error
    given = {"--port": "9000", "--threads": "2", "--log-level": "info", "--reward-share": "0.5",
             "--report-utc-offset": "+01:00", "--host": "127.0.0.1"}[flag]
    if not command:  # the flag wins over the variable, which is then not read at all
        assert spp_server.main(["--db", db, f"{flag}={given}"], environ={variable: value}) == 0


EVERY_COMMAND = [[], ["export", "--since", "1", "--until", "2"],
                 ["reconcile", "--since", "2026-11-01", "--until", "2026-11-02"],
                 ["import-booked", "r.csv"], ["prune", "--rejected-before", "1"],
                 ["pay", "--until", "1", "--pay-now-share", "0.5", "--final-share", "0.9"],
                 ["settle"], ["statement", "u"], ["ledger"], ["ledger-replay"], ["erase", "u"],
                 ["hold", "u", "--reason", "r"], ["release", "u", "--reason", "r"],
                 ["write-off-balances", "--older-than", "90d"], ["suspects"], ["void-oversized"]]


def test_every_command_is_in_the_list_of_every_command():
    assert {argv[0] for argv in EVERY_COMMAND if argv} == set(spp_server.COMMANDS)


@pytest.mark.parametrize("command", EVERY_COMMAND)
def test_an_empty_database_path_is_named_as_the_variable_or_the_flag(fake_serve, capsys, command):
    """SPP_DB= left blank named no file: "cannot open the database : [Errno 2] ..."."""
    for argv, environ, named in [(command, {"SPP_DB": ""}, "SPP_DB=''"),
                                 ([*command, "--db="], {}, "argument --db")]:
        with pytest.raises(SystemExit) as exited:
            spp_server.main(argv, environ=environ)
        assert exited.value.code == 2 and fake_serve == []
        error = capsys.readouterr().err.splitlines()[-1]
        assert named in error and "not empty" in error and "Errno" not in error


@pytest.mark.parametrize("build, option, low, high", [
    (spp_server.build_parser, "--port", 0, 65535),
    (spp_server.build_parser, "--threads", 1, 10**9 - 1),
    (spp_server.build_settle_parser, "--settlement", 1, 10**9 - 1),
])
def test_every_whole_number_option_takes_both_ends_of_its_range_and_nothing_past_them(
        build, option, low, high, capsys):
    parser = build({})
    dest = option[2:].replace("-", "_")
    for value in (low, high):
        assert getattr(parser.parse_args([option, str(value)]), dest) == value
    for value in (low - 1, high + 1, f"{high}0"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([f"{option}={value}"])
        assert exited.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert f"argument {option}: must be a whole number" in error and f"'{value}'" in error


def test_settle_asks_for_the_highest_settlement_id_there_can_be(db):
    spp_server.Store(db, writer="thread").close()
    code, out, err = ledger_command(spp_server.run_settle, db, "--settlement", "999999999")
    assert (code, out) == (2, b"")  # read as an id, and found to be none
    assert err == "spp_server.py settle: --settlement: there is no settlement 999999999; nothing changed\n"


@pytest.mark.parametrize("bad", [["--port", "70000"], ["--threads", "0"], ["--port", "x"],
                                 ["--host="], ["--host", "999.1.1.1"], ["--host", "not a host"]])
def test_bad_option_values_exit_with_usage(fake_serve, capsys, bad):
    """Before anything opens: an address waitress cannot listen on was a
    traceback from inside waitress when serving started."""
    with pytest.raises(SystemExit) as exited:
        spp_server.main(bad, environ={})
    assert exited.value.code == 2 and fake_serve == []
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"argument {bad[0].rstrip('=')}: must be" in error and "Traceback" not in error


@given(value=st.text(min_size=200, max_size=5000))
@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("variable", ["SPP_PORT", "SPP_THREADS", "SPP_LOG_LEVEL",
                                      "SPP_REWARD_SHARE", "SPP_REPORT_UTC_OFFSET"])
def test_a_long_bad_value_is_named_in_a_short_line(fake_serve, capsys, variable, value):
    """The line names the variable and quotes the start of the value, not
    all of it (a megabyte of it would be the whole error)."""
    value = "x" + value.replace("\x00", "")  # never valid: no option starts with a letter x
    with pytest.raises(SystemExit) as exited:
        spp_server.main([], environ={variable: value})
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert variable in error and len(error) < 400, error


def test_tokens_come_from_credential_files_ignoring_trailing_whitespace(tmp_path):
    (tmp_path / "postback-token").write_text("first\nsecond \n\n")
    (tmp_path / "read-token").write_text("reader\n")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert spp_server.load_tokens("SPP_POSTBACK_TOKEN", "postback-token", environ) == (
        b"first", b"second")
    assert spp_server.load_tokens("SPP_READ_TOKEN", "read-token", environ) == (b"reader",)


def test_tokens_come_from_the_environment_comma_separated(tmp_path):
    environ = {"SPP_POSTBACK_TOKEN": "a, b", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    (tmp_path / "postback-token").write_text("from-file")
    assert spp_server.load_tokens("SPP_POSTBACK_TOKEN", "postback-token", environ) == (
        b"a", b"b")
    assert spp_server.load_tokens("SPP_READ_TOKEN", "read-token", {}) == ()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_token_file_refuses_to_start(fake_serve, tmp_path, db, content, caplog):
    (tmp_path / "postback-token").write_text(content)
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path), "SPP_DB": db}
    assert spp_server.main([], environ=environ) == 2
    assert fake_serve == []
    assert (f"cannot start: the token file {tmp_path / 'postback-token'} exists but holds "
            "no token: put the token in it, or remove it to run without one") in caplog.text


@pytest.mark.parametrize("count", ["abc", "", "-1", "1e2", "٣", "9" * 30])
def test_a_listen_fds_that_is_no_count_is_named_not_a_traceback(fake_serve, db, caplog, count):
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    assert spp_server.main(["--db", db], environ=environ) == 2
    assert fake_serve == []
    assert "cannot start: LISTEN_FDS=" in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("content", [b"\xff\xfetoken", None])
def test_a_token_file_that_cannot_be_read_is_named(fake_serve, db, tmp_path, caplog, content):
    """Not UTF-8, or a directory where the file should be: the file is named."""
    path = tmp_path / "postback-token"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert spp_server.main(["--db", db], environ=environ) == 2
    assert fake_serve == []
    assert f"cannot start: cannot read the token file {path}: " in caplog.text
    assert "codec" not in caplog.text and "Errno" not in caplog.text


@pytest.mark.parametrize("variable", ["SPP_POSTBACK_TOKEN", "SPP_READ_TOKEN"])
@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_an_empty_token_variable_refuses_to_start(fake_serve, db, variable, value, caplog):
    assert spp_server.main([], environ={variable: value, "SPP_DB": db}) == 2
    assert fake_serve == []
    assert (f"cannot start: {variable} is set but holds no token: put the token in it, "
            "or remove it to run without one") in caplog.text


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_non_loopback_host_without_read_token_refuses_to_start(fake_serve, db, host, caplog):
    assert spp_server.main(["--host", host, "--db", db], environ={}) == 2
    assert fake_serve == []
    assert "read token" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_host_needs_no_read_token(fake_serve, db, host):
    assert spp_server.main(["--host", host, "--db", db], environ={}) == 0


def test_a_host_name_that_does_not_resolve_is_one_line_not_a_traceback(db, caplog):
    """The name is well-formed, so only listening can tell (.invalid never resolves)."""
    environ = {"SPP_READ_TOKEN": "r"}
    assert spp_server.main(["--host", "spp.invalid", "--port", "0", "--db", db], environ) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot listen on spp.invalid" in errors[0]
    assert "does not resolve" in errors[0]


def test_non_loopback_host_with_read_token_starts(fake_serve, db):
    assert spp_server.main(["--host", "0.0.0.0", "--db", db], environ={"SPP_READ_TOKEN": "r"}) == 0


def test_missing_postback_token_is_warned_about_at_start(fake_serve, db, caplog):
    caplog.set_level(logging.WARNING, logger="spp")
    spp_server.main(["--db", db], environ={})
    assert "no postback token" in caplog.text
    caplog.clear()
    spp_server.main(["--db", db], environ={"SPP_POSTBACK_TOKEN": "p"})
    assert "no postback token" not in caplog.text


def test_unopenable_database_exits_non_zero(fake_serve, tmp_path, caplog):
    assert spp_server.main(["--db", str(tmp_path / "missing-dir" / "spp.db")], environ={}) == 1
    assert "cannot open the database" in caplog.text


def test_importing_the_module_has_no_side_effects(tmp_path):
    code = "import threading, spp_server; print(threading.active_count())"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# A real server process: crash, SIGTERM drain, load, slow clients
# ---------------------------------------------------------------------------

CONNECTION_ERRORS = (OSError, http.client.HTTPException)  # refused, reset, closed early


def section_titles(source):
    return re.findall(r"^# -{75}\n# (.*)\n# -{75}\n", source, flags=re.M)


def test_the_module_docstring_lists_its_sections_in_order():
    """The module's map: each "- name" line of the docstring's section list is
    a section header of the module (its title, or the part before its colon),
    in the same order, and no header is left out."""
    listed = re.findall(r"^- (.+)$", spp_server.__doc__.split("Sections", 1)[1], flags=re.M)
    titles = section_titles(SERVER.read_text(encoding="utf-8"))
    assert len(listed) == len(titles) > 10
    for name, title in zip(listed, titles):
        assert title == name or title.startswith(name + ":"), (name, title)


# This file's sections that test no one section of the module, each with the
# module section it comes after here (None: first).
TEST_ONLY_SECTIONS = {
    "Helpers": None,
    "Limits": "Payout ledger, replay",
    "A real server process": "Server and command line",
    "systemd": "Server and command line",
    "systemd units": "Server and command line",
    "Documentation examples": "Server and command line",
}


def test_the_test_file_follows_the_modules_map():
    """A rule and its test are found the same way: this file's section headers
    are the module's sections (their names, before the colon), in the module's
    order, each once, and the test-only sections stand where they are declared."""
    listed = re.findall(r"^- (.+)$", spp_server.__doc__.split("Sections", 1)[1], flags=re.M)
    names = [entry.split(":")[0] for entry in listed]
    after, tested = {}, []
    for title in section_titles(Path(__file__).read_text(encoding="utf-8")):
        name = title.split(":")[0]
        if name in TEST_ONLY_SECTIONS:
            after[name] = tested[-1] if tested else None
        else:
            tested.append(name)
    assert tested == names
    assert after == TEST_ONLY_SECTIONS


def resident_kb(pid):
    """VmRSS of pid and its children (the writer process), summed."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text())[1])
               for p in [pid, *map(int, children)])


def test_the_server_run_as_a_script_holds_no_more_memory_than_run_as_the_module(tmp_path):
    """`python spp_server.py` (README, spp.service) used to hold about 4 MB more
    in each process than `python -m spp_server`: CPython keeps a script's
    syntax tree while the script runs.  Both are measured in this run, at rest,
    with the module's bytecode cached beforehand where the run keeps it
    (conftest.py; compiling it is another test's subject), so that neither
    start compiles it, whichever test ran first."""
    subprocess.run([sys.executable, "-c", "import spp_server"], cwd=HERE, check=True)
    held = {}
    for name, how in [("script", [str(SERVER)]), ("module", ["-m", "spp_server"])]:
        server = RealServer.__new__(RealServer)
        server.db, server.port = str(tmp_path / f"{name}.db"), free_port()
        server.log = open(tmp_path / f"{name}.log", "ab")
        server.process = subprocess.Popen(
            [sys.executable, *how, "--db", server.db, "--port", str(server.port)],
            cwd=HERE, stderr=server.log)
        try:
            server.wait_until_ready()
            assert server.post(postback())[0] == 200
            held[name] = resident_kb(server.process.pid)
        finally:
            assert server.stop() == 0
    assert held["script"] <= held["module"] + 1024, held


def test_a_server_that_compiles_the_module_holds_no_more_memory_than_one_with_its_bytecode(
        tmp_path):
    """spp.service reads /opt/spp with no bytecode cache: each start compiles
    the module.  The compiler's freed memory is given back before the writer
    forks, so that start holds about what a start from a cached .pyc holds:
    2 MB more at most measured (heap the compiler left between live objects),
    against 21.7 MB more without giving it back."""
    cache = tmp_path / "pycache"
    subprocess.run([sys.executable, "-c", "import spp_server"], cwd=HERE, check=True,
                   env={**os.environ, "PYTHONPYCACHEPREFIX": str(cache)}
                   | {"PYTHONDONTWRITEBYTECODE": ""})
    assert list(cache.rglob("spp_server*.pyc"))
    held = {}
    for name, env in [("compiled at start", {"PYTHONPYCACHEPREFIX": str(tmp_path / "empty"),
                                             "PYTHONDONTWRITEBYTECODE": "1"}),
                      ("from the cache", {"PYTHONPYCACHEPREFIX": str(cache),
                                          "PYTHONDONTWRITEBYTECODE": "1"})]:
        server = RealServer(str(tmp_path / f"{name}.db"), env=env)
        try:
            assert server.post(postback())[0] == 200
            held[name] = resident_kb(server.process.pid)
        finally:
            assert server.stop() == 0
    assert not (tmp_path / "empty").exists()  # it did compile, and wrote nothing
    assert held["compiled at start"] <= held["from the cache"] + 5 * 1024, held


class LoadGenerator:
    """Threads that post fresh postbacks, one connection per request, until the
    server stops answering; every outcome is kept with the payload sent."""

    def __init__(self, server, threads=6, deadline_s=10):
        self.server = server
        self.outcomes = []  # (payload, status or "connection error", body)
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + deadline_s
        self._threads = [threading.Thread(target=self._send, args=(n,)) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _send(self, n):
        while time.monotonic() < self._deadline:
            payload = postback(user_id=f"load-{n}", your_estimated_revenue=f"0.00000{n + 1}")
            try:
                status, body = self.server.post(payload)
            except CONNECTION_ERRORS:
                with self._lock:
                    self.outcomes.append((payload, "connection error", None))
                return
            except ValueError:  # an answer that is not JSON: fails the status checks
                with self._lock:
                    self.outcomes.append((payload, "not JSON", None))
                return
            with self._lock:
                self.outcomes.append((payload, status, body))

    def acknowledged(self):
        with self._lock:
            return [p for p, status, _ in self.outcomes if status == 200]

    def wait_for_acknowledged(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.acknowledged()) < n:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged())} acknowledged"
            time.sleep(0.01)  # polling for progress

    def join(self, timeout=15):
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a client thread never finished"


def stored_bodies(db):
    return dict(rows(db, "SELECT session_id, raw_body FROM sessions"))


def read_http_response(sock, method="POST"):
    res = http.client.HTTPResponse(sock, method=method)
    res.begin()
    return res.status, res.getheader("Content-Type"), res.read()


def chunked_body(size, piece=8192):
    body = json.dumps(postback(padding="p" * size)).encode()[:size - 2] + b'"}'
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                    for i in range(0, len(body), piece)) + b"0\r\n\r\n"


def test_real_server_records_and_reports_the_sample(real_server):
    server = real_server()
    assert server.post(SAMPLE) == (200, {"status": "recorded"})
    assert server.post(SAMPLE) == (200, {"status": "duplicate"})
    status, body = server.request("GET", "/users/sub1/earnings")
    assert (status, body["estimated-revenue"], body["sessions"]) == (200, "0.000012", 1)
    status, body = server.request("POST", "/postback", b"x" * (spp_server.MAX_BODY_BYTES + 1))
    assert (status, set(body)) == (413, {"error", "field"})


def test_sigterm_exits_0_and_keeps_every_acknowledged_row(real_server):
    server = real_server()
    acknowledged = [p["session-id"] for p in (postback() for _ in range(20))
                    if server.post(p)[0] == 200]
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped cleanly" in server.log_text()
    stored = {sid for (sid,) in rows(server.db, "SELECT session_id FROM sessions")}
    assert stored == set(acknowledged) and len(acknowledged) == 20


@EACH_WRITER
def test_rows_acknowledged_before_sigkill_survive(real_server, db, cpus):
    server = real_server(db, cpus=cpus)
    sent = [postback() for _ in range(20)]
    for payload in sent:
        assert server.post(payload)[0] == 200
    server.stop(signal.SIGKILL)
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert count(db, "sessions") == 20
    server = real_server(db, cpus=cpus)
    assert server.request("GET", "/users/sub1/earnings")[1]["sessions"] == 20


def test_connection_accepted_before_sigterm_still_gets_its_answer(tmp_path, db):
    """A postback whose connection was open but silent when SIGTERM came (as
    with a socket-activated restart) is served, not dropped."""
    with server_with_notify_socket(tmp_path, db) as (process, port, notify):
        assert notify.recv(100) == b"READY=1"
        early = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        early.connect()
        # Connections are accepted in order: once a later one is answered,
        # the early one has been accepted too.
        later = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        later.request("GET", "/healthz")
        assert later.getresponse().status == 200
        later.close()
        process.send_signal(signal.SIGTERM)
        assert notify.recv(100) == b"STOPPING=1"
        early.request("POST", "/postback", json.dumps(SAMPLE))
        assert early.getresponse().status == 200
        early.close()
        assert process.wait(15) == 0
    assert count(db, "sessions") == 1


def test_sigterm_with_an_idle_keep_alive_connection_exits_within_seconds(real_server, db):
    """A reverse proxy keeps a connection open between postbacks.  At SIGTERM
    that idle connection is closed at once, not waited on until the drain's
    deadline (DRAIN_TIMEOUT_S), so a restart does not hang for 20 s."""
    server = real_server(db)
    proxy = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    proxy.request("POST", "/postback", json.dumps(SAMPLE))
    res = proxy.getresponse()
    assert (res.status, json.loads(res.read())) == (200, {"status": "recorded"})
    assert not res.will_close  # HTTP/1.1 keep-alive: the connection stays open, idle
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert proxy.sock.recv(1) == b""  # the server closed it (blocks until then)
    assert server.process.wait(5) == 0
    assert time.monotonic() - started < 5 < spp_server.DRAIN_TIMEOUT_S
    proxy.close()
    assert "stopped cleanly" in server.log_text()
    assert count(db, "sessions") == 1


@EACH_WRITER
def test_sigkill_mid_stream_keeps_every_acknowledged_session_exactly_once(real_server, db, cpus):
    server = real_server(db, cpus=cpus)
    load = LoadGenerator(server, threads=6)
    load.wait_for_acknowledged(150)
    server.process.kill()  # SIGKILL while the clients are still sending
    server.stop()
    load.join()
    acknowledged = load.acknowledged()
    assert [status for _, status, _ in load.outcomes if status != 200] == ["connection error"] * 6
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]

    server = real_server(db, cpus=cpus)  # restart on the same file
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    stored = stored_bodies(db)
    for payload in acknowledged:  # present, and exactly as acknowledged
        assert stored.get(payload["session-id"]) == json.dumps(payload)
    assert rows(db, "SELECT session_id FROM sessions GROUP BY session_id HAVING count(*) > 1") == []
    assert count(db, "sessions") == len(stored)
    # A sender retrying everything it was not sure of gets "duplicate" or "recorded", never twice.
    for payload, status, _ in load.outcomes:
        expected = "duplicate" if payload["session-id"] in stored else "recorded"
        assert server.post(payload) == (200, {"status": expected})
    assert count(db, "sessions") == len({p["session-id"] for p, _, _ in load.outcomes})
    status, body = server.request("GET", "/users/load-0/earnings")
    assert status == 200 and body["sessions"] == sum(
        1 for p, _, _ in load.outcomes if p["user-id"] == "load-0")
    assert server.stop() == 0


@EACH_WRITER
def test_sigterm_under_load_exits_0_and_loses_no_acknowledged_session(real_server, db, cpus):
    server = real_server(db, cpus=cpus)
    load = LoadGenerator(server, threads=8)
    load.wait_for_acknowledged(100)
    server.process.send_signal(signal.SIGTERM)
    load.join()  # each client stops at its first connection error
    code = server.process.wait(15)  # one SIGTERM only: stop() would send a second
    server.stop()
    assert code == 0
    assert "stopped cleanly" in server.log_text()
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    stored = stored_bodies(db)
    for payload, status, body in load.outcomes:
        if status == 200:  # never a 200 for a row that was not stored
            assert body in ({"status": "recorded"}, {"status": "duplicate"})
            assert stored.get(payload["session-id"]) == json.dumps(payload)
        elif status != "connection error":  # an error answer must not have stored it
            assert payload["session-id"] not in stored, (status, body)
    statuses = {status for _, status, _ in load.outcomes}
    assert statuses <= {200, "connection error"}, statuses
    # Nothing but what was sent is stored.
    assert set(stored) <= {p["session-id"] for p, _, _ in load.outcomes}


def test_prune_while_postbacks_arrive_fails_none_and_keeps_every_session(real_server, db):
    server = real_server(db)
    load = LoadGenerator(server, threads=4)
    load.wait_for_acknowledged(200)
    pruned = subprocess.run(
        [sys.executable, str(SERVER), "prune", "--db", db, "--raw-bodies-before", "2100-01-01"],
        capture_output=True, text=True, timeout=30)
    acknowledged_at_prune = len(load.acknowledged())
    load.wait_for_acknowledged(acknowledged_at_prune + 100)  # still answering after it
    server.stop()
    load.join()
    assert pruned.returncode == 0, pruned.stderr
    assert {status for _, status, _ in load.outcomes} <= {200, "connection error"}
    stored = {row[0] for row in rows(db, "SELECT session_id FROM sessions")}
    assert {p["session-id"] for p, status, _ in load.outcomes if status == 200} <= stored


def test_duplicate_storm_from_16_threads_stores_one_row_and_counts_it_once(real_server, db):
    server = real_server(db)
    payload = postback(user_id="storm", your_estimated_revenue="0.123456789")
    body = json.dumps(payload).encode()
    barrier = threading.Barrier(16)
    answers = []
    lock = threading.Lock()

    def send(times):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # keep-alive
        barrier.wait()
        try:
            for _ in range(times):
                conn.request("POST", "/postback", body=body)
                res = conn.getresponse()
                answer = (res.status, json.loads(res.read()))
                with lock:
                    answers.append(answer)
        finally:
            conn.close()

    threads = [threading.Thread(target=send, args=(13 if n < 8 else 12,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert len(answers) == 200
    assert sorted(answers, key=str) == [(200, {"status": "duplicate"})] * 199 + [
        (200, {"status": "recorded"})]
    assert count(db, "sessions") == 1
    assert count(db, "conflicts") == 0
    status, body = server.request("GET", "/users/storm/earnings")
    assert (status, body["sessions"], body["estimated-revenue"]) == (200, 1, "0.123456789")
    since_start = server.request("GET", "/stats")[1]["since-start"]
    assert (since_start["recorded"], since_start["duplicate"]) == (1, 199)


def test_stalled_and_oversized_clients_do_not_hold_up_other_clients(real_server, db):
    server = real_server(db, args=("--threads", "2"))
    head = b"POST /postback HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    bad_requests = [
        head,  # headers never finished
        head + b"Content-Length: 500\r\n\r\n",  # headers, then nothing
        head + b"Content-Length: 500\r\n\r\n",
        head + b"Content-Length: 60000\r\n\r\n{\"session-id\": ",  # a little of what it announced
        head + b"Transfer-Encoding: chunked\r\n\r\n1000\r\nabc",  # a chunk that never ends
        head + b"Transfer-Encoding: chunked\r\n\r\n1000\r\nabc",
        head + b"Content-Length: 1000000000\r\n\r\n{",  # huge announcement, little sent
    ]
    sockets = []
    try:
        for request in bad_requests:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sockets.append(sock)
            sock.sendall(request)
        for _ in range(3):  # more bad clients than threads, and others are still served
            started = time.monotonic()
            assert server.post(postback(user_id="patient")) == (200, {"status": "recorded"})
            assert time.monotonic() - started < 1
        assert server.request("GET", "/healthz") == (200, {"status": "ok"})
        # The huge announcement is refused by waitress's own backstop, without the body.
        status, content_type, text = read_http_response(sockets[-1])
        assert (status, content_type.split(";")[0]) == (413, "text/plain")
        # An oversized chunked body: up to waitress's 128 KiB the app answers 413 JSON...
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sockets.append(sock)
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked_body(100_000))
        status, content_type, text = read_http_response(sock)
        assert (status, content_type) == (413, "application/json")
        assert json.loads(text) == {"error": "the body must be at most 65536 bytes",
                                    "field": None}
        # ...past it, waitress's own plain-text 413 (the body is never handed to the app).
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sockets.append(sock)
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked_body(200_000))
        status, content_type, text = read_http_response(sock)
        assert (status, content_type.split(";")[0]) == (413, "text/plain")
        assert b"Request Entity Too Large" in text
        # Still answering promptly with every stalled connection open.
        started = time.monotonic()
        assert server.post(postback(user_id="patient")) == (200, {"status": "recorded"})
        assert time.monotonic() - started < 1
    finally:
        for sock in sockets:
            sock.close()
    assert server.stop() == 0
    assert rows(db, "SELECT DISTINCT user_id FROM sessions") == [("patient",)]
    assert count(db, "sessions") == 4


# ---------------------------------------------------------------------------
# systemd: socket activation, readiness, watchdog
# ---------------------------------------------------------------------------

SYSTEMD_LIKE_EXEC = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)  # the first passed socket is fd 3 (SD_LISTEN_FDS_START)
os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])  # same process, same pid
"""


@contextlib.contextmanager
def activated_server_until_sigterm(db, listener):
    """A socket-activated server for the block; then SIGTERM, which must end it
    with status 0 (killed if the block failed first)."""
    process = start_activated_server(db, listener)
    try:
        yield process
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()


def start_activated_server(db, listener, env=None):
    """Start the server the way systemd does with a .socket unit: the listening
    socket on fd 3, LISTEN_FDS=1 and LISTEN_PID = the server's own pid."""
    return subprocess.Popen(
        [sys.executable, "-c", SYSTEMD_LIKE_EXEC, str(listener.fileno()),
         str(SERVER), "--db", db, "--port", "1"],
        env={**os.environ, **(env or {})},
        pass_fds=(listener.fileno(),),
        stderr=subprocess.DEVNULL,
    )


def test_socket_passed_by_systemd_is_used(db):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with activated_server_until_sigterm(db, listener):
        # The kernel queues our connection on the inherited socket until the server accepts.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("POST", "/postback", json.dumps(SAMPLE))
        res = conn.getresponse()
        assert (res.status, json.loads(res.read())) == (200, {"status": "recorded"})
        conn.close()
    assert count(db, "sessions") == 1


def test_readiness_is_notified_once_listening_and_stopping_on_sigterm(tmp_path, db):
    with server_with_notify_socket(tmp_path, db, {"WATCHDOG_USEC": "200000"}) as (
            process, port, notify):
        assert notify.recv(100) == b"READY=1"
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # accepting already
        assert notify.recv(100) == b"WATCHDOG=1"  # pinged while the database answers
        process.send_signal(signal.SIGTERM)
        messages = []
        while b"STOPPING=1" not in messages:
            messages.append(notify.recv(100))
        assert set(messages) <= {b"WATCHDOG=1", b"STOPPING=1"}
        assert process.wait(15) == 0


def test_inherited_sockets_are_ignored_when_meant_for_another_process():
    assert spp_server.inherited_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
    assert spp_server.inherited_sockets({}) == []


# ---------------------------------------------------------------------------
# systemd units: accepted by systemd, tightly sandboxed, in step with the code
# ---------------------------------------------------------------------------

SERVICE = HERE / "spp.service"


SOCKET = HERE / "spp.socket"


MAX_EXPOSURE = 0.5  # `systemd-analyze security` scale: 0 (locked down) to 10


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def unit_settings(path):
    """[(key, value), ...] of a unit file, in order, comments and sections left out."""
    settings = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        settings.append((key.strip(), value.strip()))
    return settings


def unit_values(path, key):
    return [value for k, value in unit_settings(path) if k == key]


def run_analyze(*args):
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, env=env
    )


def systemd_version():
    first = run_analyze("--version").stdout.split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else 0


@needs_systemd_analyze
def test_systemd_accepts_the_units():
    """`systemd-analyze verify` finds nothing wrong but the ExecStart program
    missing (the repository is not installed at /opt/spp here)."""
    (exec_start,) = unit_values(SERVICE, "ExecStart")
    program = exec_start.lstrip("-@:+!").split()[0]
    result = run_analyze("verify", str(SOCKET), str(SERVICE))
    lines = (result.stdout + result.stderr).splitlines()
    problems = [
        line for line in lines
        if line.strip() and not (program in line and not Path(program).exists())
    ]
    assert problems == [], "\n".join(problems)


@needs_systemd_analyze
def test_service_sandbox_exposure_is_low():
    if systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    result = run_analyze("security", "--offline=true", str(SERVICE))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)", output)
    assert match, output
    # Rows that add to the exposure end in their weight ("... 0.1").
    exposed = "\n".join(
        line for line in output.splitlines()
        if re.search(r"\s[0-9]+\.[0-9]+$", line) and "Overall" not in line
    )
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure}; still open:\n{exposed}"


def test_unit_names_only_settings_the_server_reads():
    """Every SPP_* variable spp.service mentions (settings and comments) and
    every credential it loads is read by spp_server.py and, for variables,
    documented in --help: a renamed variable must not leave the unit setting
    something the server silently ignores."""
    unit_text = SERVICE.read_text(encoding="utf-8")
    source = SERVER.read_text(encoding="utf-8")
    variables = sorted(set(re.findall(r"\bSPP_[A-Z0-9_]+\b", unit_text)))
    assert variables, "spp.service names no SPP_* variable"
    credentials = [
        value.split(":", 1)[0]
        for key, value in unit_settings(SERVICE)
        if key in ("LoadCredential", "LoadCredentialEncrypted")
    ]
    assert credentials, "spp.service loads no credentials"

    def read_in_source(name):
        return re.search(r"""["']""" + re.escape(name) + r"""["']""", source)

    assert [v for v in variables if not read_in_source(v)] == []
    assert [c for c in credentials if not read_in_source(c)] == []

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPP_")}
    env.update(COLUMNS="100", PYTHON_COLORS="0", NO_COLOR="1")
    result = subprocess.run(
        [sys.executable, str(SERVER), "--help"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert [v for v in variables if v not in result.stdout] == []


def test_socket_listens_on_loopback_only():
    """Read endpoints stay on this machine; the HTTPS proxy forwards postbacks."""
    for address in unit_values(SOCKET, "ListenStream"):
        host = address.rpartition(":")[0].strip("[]")
        assert ipaddress.ip_address(host).is_loopback, address


def test_no_sql_statement_is_named_twice():
    """A dict literal keeps the last of two equal keys, silently: one query
    would run where another was meant."""
    import ast
    tree = ast.parse(SERVER.read_text(encoding="utf-8"))
    # One query dict per section (STORE_SQL, RUNS_SQL, ...): no name twice
    # in one dict, nor in two of them.
    dicts = [node.value for node in tree.body if isinstance(node, ast.Assign)
             and any(getattr(target, "id", "").endswith("_SQL") for target in node.targets)]
    names = [key.value for sql in dicts for key in sql.keys]
    assert len(dicts) > 5 and len(names) > 50
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_stop_timeout_leaves_room_for_the_longest_stop():
    """systemd must not SIGKILL the server while it still drains requests or
    its writer process commits: TimeoutStopSec exceeds the code's worst case,
    and the comment next to it states that worst case."""
    (timeout,) = unit_values(SERVICE, "TimeoutStopSec")
    assert re.fullmatch(r"\d+s?", timeout), f"write TimeoutStopSec in seconds, not {timeout!r}"
    worst = spp_server.worst_case_stop_s()
    assert int(timeout.rstrip("s")) > worst
    assert worst >= spp_server.DRAIN_TIMEOUT_S + 2 * spp_server.write_wait_s(
        spp_server.DEFAULTS["busy_timeout_ms"])
    text = SERVICE.read_text(encoding="utf-8")
    comment = text[:text.index("\nTimeoutStopSec=")].rsplit("\n\n", 1)[-1]
    assert f"{worst:g} s" in comment, comment


# ---------------------------------------------------------------------------
# Documentation examples: what README.md and docs/ show is what happens
# ---------------------------------------------------------------------------
# The convention (docs/design.md, "Examples that the tests run"):
# - A ```console block is run: each `$ ` line is a command for bash, continued
#   on the next lines while the line ends in `\` or a quote is still open;
#   the lines up to the next `$ ` are its expected output (stdout and stderr
#   together).  A command that exits non-zero must show `[exit N]` last.
# - In the expected output `…` stands for any text within a line, a line of
#   only `…` for any number of lines; `<time>` for an ISO 8601 UTC time,
#   `<date>` for a YYYY-MM-DD, `<n>` for a whole number, `<cursor>` for a
#   cursor.  Trailing spaces do not count.
# - The blocks of one page run in order, in one directory of their own, against
#   one real server on a free port: `127.0.0.1:8080` in a command is rewritten
#   to it, and back in the output.  Shell variables set by one command are
#   there for the next (they are exported and carried over).  The directory
#   has `.venv/bin/python`, `spp_server.py` and `spp.db`, the server's own.
# - A block opened with ```sh file=NAME or ```python file=NAME is written to
#   NAME in that directory (port rewritten) for later blocks to run; a sh one
#   is checked by `bash -n` and shellcheck like every other ```sh block, which
#   is not run (it needs root, systemd or a VPS).

DOC_PAGES = {  # page -> how its server runs: the tokens and options it says to use
    "README.md": {},
    "docs/api.md": {"env": {"SPP_READ_TOKEN": "read-secret"}, "args": ["--reward-share", "0.7"]},
    "docs/paying-users.md": {"env": {"SPP_READ_TOKEN": "read-secret"}},
    "docs/reconciling.md": {"env": {"SPP_READ_TOKEN": "read-secret"}, "args": ["--reward-share", "0.7"]},
    # READ is set at the top of the page from the root-only token file, in a
    # block that is not run: the test gives the shell the same header.
    "docs/operating.md": {"env": {"SPP_READ_TOKEN": "read-secret"},
                          "shell": {"READ": "Authorization: Bearer read-secret"}},
    # pay, settle and statement run beside the server, on its spp.db.
    "docs/ledger.md": {"env": {"SPP_READ_TOKEN": "read-secret"}},
    "docs/view.md": {"env": {"SPP_READ_TOKEN": "read-secret"}},
}
DOC_PLACEHOLDERS = {
    "…": r"[^\n]*?",
    "<time>": r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?Z",
    "<date>": r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    "<n>": r"[0-9]+",
    "<cursor>": r"[A-Za-z0-9_:.=-]+",
}
DOC_PLACEHOLDER = re.compile("|".join(map(re.escape, DOC_PLACEHOLDERS)))
FENCE = re.compile(r"^( *)```(\S*)(.*)$")


def fenced_blocks(text):
    """[(line number, language, {options}, [lines])] of a Markdown text; a
    block indented in a list item loses that indentation."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(2):
            i += 1
            continue
        indent, start, body = len(match.group(1)), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].lstrip(" ").startswith("```"):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        options = dict(word.split("=", 1) for word in match.group(3).split() if "=" in word)
        blocks.append((start, match.group(2), options, body))
        i += 1
    return blocks


def command_incomplete(text):
    if text.endswith("\\"):
        return True
    try:
        shlex.split(text)
    except ValueError:  # no closing quotation: bash would ask for more
        return True
    return False


def console_steps(lines):
    """The lines of a console block -> [(command, [expected output lines])]."""
    steps = []
    for line in lines:
        if line.startswith("$ ") and not (steps and command_incomplete(steps[-1][0])):
            steps.append((line[2:], []))
        elif steps and command_incomplete(steps[-1][0]):
            steps[-1] = (steps[-1][0] + "\n" + line, steps[-1][1])
        elif steps:
            steps[-1][1].append(line)
        else:
            raise ValueError(f"a console block must start with `$ `: {line!r}")
    return steps


def expected_pattern(lines):
    """Expected output lines -> a regular expression for the whole output."""
    parts = []
    for line in lines:
        line = line.rstrip()
        if line == "…":
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        pieces = DOC_PLACEHOLDER.split(line)
        holes = DOC_PLACEHOLDER.findall(line)
        regex = re.escape(pieces[0])
        for hole, piece in zip(holes, pieces[1:]):
            regex += DOC_PLACEHOLDERS[hole] + re.escape(piece)
        parts.append(regex + r"\n")
    return re.compile("".join(parts) + r"\Z")


def output_matches(expected_lines, actual):
    actual = "".join(line.rstrip() + "\n" for line in actual.splitlines())
    return expected_pattern(expected_lines).match(actual) is not None


class DocSandbox:
    """A directory where one page's blocks run, against its own real server."""

    STATE = ".doc-example-env"

    def __init__(self, directory, server_config=None):
        self.dir = Path(directory)
        (self.dir / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
        python = self.dir / ".venv" / "bin" / "python"
        # `python spp_server.py COMMAND …` (a first argument that is not an
        # option, as the script itself tells a command from a server start)
        # runs the command in a process of its own forked by routine_commands(),
        # with the streams, environment and directory the block gave it: the
        # module is not compiled and imported again for each command.  A server
        # start and everything else run in the interpreter itself.
        python.write_text(
            "#!/bin/sh\n"
            'case "$1 $2" in\n'
            '"spp_server.py "[!-]*)\n'
            "    shift\n"
            f"    SHIM_COMMANDS={shlex.quote(routine_commands())} exec"
            f' {shlex.quote(sys.executable)} -I -S -c {shlex.quote(ROUTINE_SHIM)} "$@";;\n'
            "esac\n"
            f'exec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
        for name in ("spp_server.py", "schema.sql"):
            if not (self.dir / name).exists():
                (self.dir / name).symlink_to(HERE / name)
        config = server_config or {}
        self.env = config.get("env", {})
        self.shell = config.get("shell", {})
        self.server = RealServer(str(self.dir / "spp.db"), env=self.env, args=config.get("args", ()))

    def to_server(self, text):
        return text.replace("127.0.0.1:8080", f"127.0.0.1:{self.server.port}")

    def from_server(self, text):
        return text.replace(f"127.0.0.1:{self.server.port}", "127.0.0.1:8080")

    def write_file(self, name, lines):
        path = self.dir / name
        path.write_text(self.to_server("\n".join(lines) + "\n"))
        path.chmod(0o755)

    def run(self, command, timeout=15):
        """Run one command as bash would; -> its output, `[exit N]` added when N != 0."""
        script = (f"set -a\n[ -f {self.STATE} ] && . ./{self.STATE}\n"
                  f"trap 'export -p > {self.STATE}' EXIT\n" + self.to_server(command) + "\n")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPP_")}, **self.env,
               **self.shell, "LC_ALL": "C.UTF-8"}
        result = subprocess.run(["bash", "-c", script], cwd=self.dir, env=env, timeout=timeout,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = self.from_server(result.stdout)
        if result.returncode:
            output += f"{'' if output.endswith(chr(10)) or not output else chr(10)}[exit {result.returncode}]\n"
        return output

    def run_block(self, language, options, lines):
        """Run or write one block -> [] or the mismatches, each shown in full."""
        if "file" in options:
            self.write_file(options["file"], lines)
            return []
        if language != "console":
            return []
        problems = []
        for command, expected in console_steps(lines):
            actual = self.run(command)
            if not output_matches(expected, actual):
                problems.append(f"$ {command}\n--- expected:\n" + "\n".join(expected)
                                + f"\n--- got:\n{actual}")
        return problems

    def close(self):
        if self.server.process.returncode is None:
            self.server.stop()


def doc_blocks(page):
    return fenced_blocks((HERE / page).read_text(encoding="utf-8"))


def doc_examples():
    """(page, line) of every block the harness runs or writes, for test ids."""
    return [(page, line) for page in DOC_PAGES if (HERE / page).exists()
            for line, language, options, _ in doc_blocks(page)
            if language == "console" or "file" in options]


DOC_EXAMPLES = doc_examples()


@pytest.mark.parametrize("page, line", DOC_EXAMPLES, ids=lambda v: str(v))
def test_documentation_example_runs_as_shown(doc_sandboxes, page, line):
    """Each block runs after the page's earlier ones (run first if skipped)."""
    box, done = doc_sandboxes(page)
    for number, language, options, lines in doc_blocks(page):
        if number > line:
            break
        if number not in done:
            done.add(number)
            problems = box.run_block(language, options, lines)
            if number == line:
                if line == max(l for p, l in DOC_EXAMPLES if p == page):
                    box.close()  # the page's last block: stop its server now, not all at the end
                assert problems == [], f"{page} line {line}:\n" + "\n\n".join(problems)


def test_a_wrong_expected_output_fails_the_example_check(tmp_path):
    """The harness itself: a changed answer, a missing line, a wrong exit
    status and a placeholder in the wrong place each fail."""
    box = DocSandbox(tmp_path)
    try:
        post_ = "$ curl -s -X POST http://127.0.0.1:8080/postback -d '{\"user-id\": \"u\",\n  \"session-id\": \"s1\", \"your-estimated-revenue\": \"0.1\"}'"
        assert box.run_block("console", {}, [post_, '{"status": "recorded"}']) == []
        read = "$ curl -s http://127.0.0.1:8080/users/u/earnings"
        right = ('{"user-id": "u", "sessions": 1, "ads-viewed": 0, "session-duration": 0, '
                 '"estimated-revenue": "0.1", "first-received-at": "<time>", '
                 '"last-received-at": "<time>", "since": null, "until": null}')
        assert box.run_block("console", {}, [read, right]) == []
        assert box.run_block("console", {}, [read, '{"user-id": "u", "sessions": 1, …}']) == []
        for wrong in ([read, right.replace('"0.1"', '"0.2"')],
                      [read],
                      [read, right, "extra line"],
                      [read, right.replace('"<time>"', "<time>")],
                      [post_, '{"status": "recorded"}'],  # now a duplicate
                      ["$ false", ""],
                      ["$ exit 3", "[exit 2]"]):
            problems = box.run_block("console", {}, wrong)
            assert len(problems) == 1 and "--- got:" in problems[0], wrong
        assert box.run_block("console", {}, ["$ exit 3", "[exit 3]"]) == []
        assert box.run_block("console", {}, ["$ x=5", "$ echo $((x + 1))", "6"]) == []
        assert box.run_block("console", {}, ["$ printf 'a\\nb\\nc\\n'", "a", "…"]) == []
    finally:
        box.close()


def test_fenced_blocks_are_found_with_their_language_options_and_indentation():
    text = "x\n```console\n$ a\n```\n- item\n\n  ```sh file=f.sh\n  b\n    c\n  ```\n```\nplain\n```\n"
    assert fenced_blocks(text) == [(2, "console", {}, ["$ a"]),
                                   (7, "sh", {"file": "f.sh"}, ["b", "  c"])]


def test_console_blocks_are_split_into_commands_and_their_output():
    lines = ["$ echo 'a", "b'", "a", "b", "$ curl \\", "  -s x", "$ true"]
    assert console_steps(lines) == [("echo 'a\nb'", ["a", "b"]), ("curl \\\n  -s x", []),
                                    ("true", [])]
    with pytest.raises(ValueError):
        console_steps(["output before a command"])


def shell_snippets():
    """(page, line, text) of every ```sh / ```bash block of README.md and docs/."""
    pages = ["README.md"] + sorted(str(p.relative_to(HERE)) for p in (HERE / "docs").glob("*.md"))
    return [(page, line, "\n".join(lines)) for page in pages
            for line, language, _, lines in doc_blocks(page) if language in ("sh", "bash")]


@pytest.mark.parametrize("page, line, text", shell_snippets(), ids=lambda v: str(v)[:40])
def test_shell_snippets_parse_and_pass_shellcheck(page, line, text):
    """Snippets that need root, systemd or a VPS are not run here; bash -n
    and shellcheck catch a broken quote or an unset variable (.ci/run
    installs shellcheck; without it only bash -n runs)."""
    result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, f"{page} line {line}: {result.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    # SC2034 (a variable set but not used) is expected: a snippet sets $READ
    # and the like for the commands that follow it on the page.
    result = subprocess.run(["shellcheck", "-s", "bash", "-S", "style", "-e", "SC2034", "-"],
                            input=text, capture_output=True, text=True)
    assert result.returncode == 0, f"{page} line {line}:\n{result.stdout}"


def doc_file(page, name, port):
    """The ```… file=NAME block of a page, as a test would run it on `port`."""
    [lines] = [lines for _, _, options, lines in doc_blocks(page) if options.get("file") == name]
    return "\n".join(lines).replace("127.0.0.1:8080", f"127.0.0.1:{port}") + "\n"


def wait_for(condition, what, timeout=10):
    """Poll `condition` (a state another process reaches) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_payout_script_fails_loudly_leaves_nothing_and_recovers(real_server, tmp_path):
    """docs/paying-users.md's payout.sh: an error status and a server that is
    down each exit non-zero with no .part file and last-payout-until left
    alone; after a restart the same run pays the window."""
    server = real_server(env={"SPP_READ_TOKEN": "t"})
    for user, revenue in (("a", "0.1"), ("b", "0.25")):
        assert server.post(postback(user_id=user, your_estimated_revenue=revenue))[0] == 200
    work = tmp_path / "payouts"
    work.mkdir()
    (work / "payout.sh").write_text(doc_file("docs/paying-users.md", "payout.sh", server.port))
    env = {**os.environ, "SPP_READ_TOKEN": "t"}

    def pay(until):
        result = subprocess.run(["bash", "payout.sh", until], cwd=work, env=env, timeout=15,
                                capture_output=True, text=True)
        assert not list(work.glob("*.part")), "a partial file was left behind"
        return result

    def now():  # after every postback above was answered: they are before it
        return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    ahead = pay((datetime.datetime.now(datetime.timezone.utc)
                 + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert ahead.returncode == 2 and "is in the future" in ahead.stderr  # and nothing written
    assert sorted(p.name for p in work.iterdir()) == ["payout.sh"]
    first = now()
    paid = pay(first)
    assert paid.returncode == 0, paid.stderr
    with open(work / "payout-2000-01-01.csv", newline="") as f:
        assert [(r["user-id"], r["estimated-revenue"]) for r in csv.DictReader(f)] == [
            ("a", "0.1"), ("b", "0.25")]
    assert (work / "last-payout-until").read_text() == first + "\n"

    again = pay(first)  # an empty window: the server answers 400
    assert again.returncode != 0 and "400" in again.stderr and '"field": "until"' in again.stderr
    server.stop()
    second = now()
    down = pay(second)
    assert down.returncode != 0 and "curl: (7)" in down.stderr
    assert sorted(p.name for p in work.iterdir()) == [
        "last-payout-until", "payout-2000-01-01.csv", "payout.sh"]
    assert (work / "last-payout-until").read_text() == first + "\n"

    real_server(db=server.db, env={"SPP_READ_TOKEN": "t"}, port=server.port)
    later = pay(second)
    assert later.returncode == 0, later.stderr
    assert (work / f"payout-{first}.csv").read_text().count("\n") == 1  # the header only
    assert (work / "last-payout-until").read_text() == second + "\n"


def test_the_feed_consumer_credits_each_session_once_across_a_server_restart(real_server, tmp_path):
    """docs/paying-users.md's credit_wallets.py, as written, against a server
    that stops and starts again in the middle: it waits, then goes on."""
    server = real_server(env={"SPP_READ_TOKEN": "t"})
    sent = [postback(your_estimated_revenue="0.000012") for _ in range(3)]
    for body in sent[:2]:
        assert server.post(body)[0] == 200
    work = tmp_path / "consumer"
    work.mkdir()
    (work / "credit_wallets.py").write_text(
        doc_file("docs/paying-users.md", "credit_wallets.py", server.port))
    log = open(work / "stderr", "wb")
    consumer = subprocess.Popen(
        [sys.executable, "credit_wallets.py"], cwd=work, stderr=log,
        env={**os.environ, "SPP_READ_TOKEN": "t", "IDLE_SECONDS": "0.05"})
    wallets = str(work / "wallets.db")

    def credits():
        try:
            return rows(wallets, "SELECT session_id, user_id, nano_usd FROM credits ORDER BY 1")
        except sqlite3.Error:  # not created yet
            return []

    try:
        wait_for(lambda: len(credits()) == 2, "the first two credits")
        server.stop()
        wait_for(lambda: b"feed unavailable" in (work / "stderr").read_bytes(), "a retry")
        assert consumer.poll() is None, "the consumer died while the server was down"
        server = real_server(db=server.db, env={"SPP_READ_TOKEN": "t"}, port=server.port)
        assert server.post(sent[2])[0] == 200
        assert server.post(sent[0])[0] == 200  # a duplicate: no second credit
        wait_for(lambda: len(credits()) == 3, "the credit after the restart")
        assert consumer.poll() is None
    finally:
        consumer.kill()
        consumer.wait()
        log.close()
    assert credits() == sorted((b["session-id"], b["user-id"], 8400) for b in sent)
    assert "retrying in" in (work / "stderr").read_text()


def test_the_feed_consumer_stops_at_once_on_a_refusal(real_server, tmp_path):
    server = real_server(env={"SPP_READ_TOKEN": "t"})
    (tmp_path / "credit_wallets.py").write_text(
        doc_file("docs/paying-users.md", "credit_wallets.py", server.port))
    result = subprocess.run(
        [sys.executable, "credit_wallets.py"], cwd=tmp_path, capture_output=True, text=True,
        timeout=15, env={**os.environ, "SPP_READ_TOKEN": "wrong"})
    assert result.returncode == 1
    assert result.stderr.startswith("the feed refused: 401 ") and "retrying" not in result.stderr


def test_the_feed_consumer_stops_on_a_restored_database_and_resumes_from_0(real_server, tmp_path):
    """After a restore, a new session takes a lost one's position: the
    consumer stops with a 410 and says how to resume; from cursor 0 it credits
    the new session once and keeps the credits the backup lacks."""
    server = real_server(env={"SPP_READ_TOKEN": "t"})
    kept, lost, new = (postback(your_estimated_revenue="0.000012") for _ in range(3))
    for body in (kept, new):  # the restored database: `new` where `lost` was
        assert server.post(body)[0] == 200
    (tmp_path / "credit_wallets.py").write_text(
        doc_file("docs/paying-users.md", "credit_wallets.py", server.port))
    wallets = str(tmp_path / "wallets.db")
    with contextlib.closing(sqlite3.connect(wallets)) as conn, conn:
        conn.executescript("""
            CREATE TABLE feed (one INTEGER PRIMARY KEY CHECK (one = 1), cursor TEXT NOT NULL);
            CREATE TABLE credits (session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL,
                                  nano_usd INTEGER NOT NULL);""")
        conn.execute("INSERT INTO feed VALUES (1, ?)",
                     (spp_server.feed_cursor(2, lost["session-id"]),))
        conn.executemany("INSERT INTO credits VALUES (?, ?, 8400)",
                         [(b["session-id"], b["user-id"]) for b in (kept, lost)])
    env = {**os.environ, "SPP_READ_TOKEN": "t", "IDLE_SECONDS": "0.05"}
    stopped = subprocess.run([sys.executable, "credit_wallets.py"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=15)
    assert stopped.returncode == 1 and "retrying" not in stopped.stderr
    assert "(410)" in stopped.stderr and "UPDATE feed SET cursor = '0'" in stopped.stderr
    assert len(rows(wallets, "SELECT * FROM credits")) == 2
    with contextlib.closing(sqlite3.connect(wallets)) as conn, conn:  # what the message says
        conn.execute("UPDATE feed SET cursor = '0'")
    consumer = subprocess.Popen([sys.executable, "credit_wallets.py"], cwd=tmp_path, env=env,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(rows(wallets, "SELECT * FROM credits")) == 3, "the new credit")
    finally:
        consumer.kill()
        consumer.wait()
    assert rows(wallets, "SELECT session_id, nano_usd FROM credits ORDER BY 1") == sorted(
        (b["session-id"], 8400) for b in (kept, lost, new))


@needs_systemd_analyze
def test_the_documented_backup_units_are_accepted_by_systemd(tmp_path):
    units = [(options["file"], lines) for _, _, options, lines in doc_blocks("docs/operating.md")
             if options.get("file", "").startswith("spp-backup.")]
    assert sorted(name for name, _ in units) == ["spp-backup.service", "spp-backup.timer"]
    for name, lines in units:
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    result = run_analyze("verify", *(str(tmp_path / name) for name, _ in units))
    assert (result.stdout + result.stderr).strip() == ""


def heading_anchors(text):
    """GitHub's anchors for the headings of a Markdown text (outside code blocks)."""
    anchors, in_code = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", [page for page in DOC_PAGES if page != "README.md"])
def test_moving_each_pages_database_aside_keeps_the_previous_pages_copy(tmp_path, page):
    """Each page says how to move the previous page's database aside: done
    after two pages in turn, both copies must still be there."""
    text = " ".join((HERE / page).read_text().split())
    [command] = re.findall(r"move its database into a folder of its own \(`([^`]+)`\)", text)
    for content in (b"first page", b"second page"):
        (tmp_path / "spp.db").write_bytes(content)
        (tmp_path / "spp.db-wal").write_bytes(content + b" wal")
        subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=10)
        assert not list(tmp_path.glob("spp.db*"))
    kept = sorted(path.read_bytes() for path in tmp_path.glob("old/*/spp.db*"))
    assert kept == [b"first page", b"first page wal", b"second page", b"second page wal"]


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 shell is not installed")
def test_moving_to_a_bigger_machine_keeps_sessions_ledger_tokens_files_and_feed_cursors(
        real_server, tmp_path):
    """docs/operating.md's move-out.sh and move-in.sh as written, with the
    machines' paths in temporary directories and systemctl a stand-in that
    logs what it was asked.  The old server is killed, so that its newest
    commits are still in the WAL."""
    machines = {side: {name: tmp_path / side / name for name in ("state", "etc", "payouts", "bin")}
                for side in ("old", "new")}
    for paths in machines.values():
        for path in paths.values():
            path.mkdir(parents=True)
        (paths["bin"] / "systemctl").write_text('#!/bin/sh\necho "$@" >> "${0%/*}/calls"\n')
        (paths["bin"] / "systemctl").chmod(0o755)
    old, new = machines["old"], machines["new"]
    (old["etc"] / "postback-token").write_text("p-secret\n")
    (old["etc"] / "read-token").write_text("r-secret\n")
    (old["payouts"] / "run-1.csv").write_text("run-id,user-id\n1,a\n")
    auth, read = {"Authorization": "Bearer p-secret"}, {"Authorization": "Bearer r-secret"}
    server = real_server(db=str(old["state"] / "spp.db"),
                         env={"CREDENTIALS_DIRECTORY": str(old["etc"])})
    for i in range(6):
        body = json.dumps(postback(user_id=f"u{i % 2}", your_estimated_revenue="0.5")).encode()
        assert server.request("POST", "/postback", body, auth)[0] == 200
    until = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    pay = ["pay", "--until", until, "--pay-now-share", "0.5", "--final-share", "0.9"]
    paid = subprocess.run([sys.executable, str(SERVER), *pay, "--db", server.db],
                          capture_output=True, timeout=15)
    assert paid.returncode == 0 and paid.stdout.count(b"\n") == 3, paid.stderr
    status, first_page = server.request("GET", "/sessions?after=0&limit=4", headers=read)
    assert status == 200 and len(first_page["sessions"]) == 4
    status, rest_on_old = server.request("GET", f"/sessions?after={first_page['next']}",
                                         headers=read)
    stats_on_old = server.request("GET", "/stats", headers=read)[1]
    # As systemd kills the whole control group: a writer process left alive
    # would close its connection cleanly, checkpointing the WAL away.
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    writers = [int(pid) for pid in children.read_text().split()]
    for pid in writers:
        os.kill(pid, signal.SIGSTOP)
    server.stop(signal.SIGKILL)
    for pid in writers:
        os.kill(pid, signal.SIGKILL)
    assert os.path.getsize(server.db + "-wal") > 0  # commits the database file lacks
    fresh = real_server(db=str(new["state"] / "spp.db"))  # deploy.md on the new machine
    fresh.stop()

    def run(script, paths, *args):
        env = {**os.environ, "PATH": f"{paths['bin']}:{os.environ['PATH']}",
               "SPP_STATE": str(paths["state"]), "SPP_ETC": str(paths["etc"]),
               "SPP_PAYOUTS": str(paths["payouts"])}
        (tmp_path / script).write_text(doc_file("docs/operating.md", script, 0))
        return subprocess.run(["bash", str(tmp_path / script), *args], env=env,
                              capture_output=True, text=True, timeout=30)

    archive = tmp_path / "spp-move.tar.gz"
    out = run("move-out.sh", old, str(archive))
    assert out.returncode == 0 and "6 sessions" in out.stdout, out.stderr
    assert archive.stat().st_mode & 0o077 == 0
    moved = run("move-in.sh", new, str(archive))
    assert moved.returncode == 0 and "6 sessions" in moved.stdout, moved.stderr
    assert "stop spp-payout.timer spp-settlement.timer spp.socket spp.service" in (
        old["bin"] / "calls").read_text()
    assert "start spp.socket spp.service" in (new["bin"] / "calls").read_text()
    assert (new["payouts"] / "run-1.csv").read_text() == "run-id,user-id\n1,a\n"
    server = real_server(db=str(new["state"] / "spp.db"),
                         env={"CREDENTIALS_DIRECTORY": str(new["etc"])})
    stats_on_new = server.request("GET", "/stats", headers=read)[1]
    assert (stats_on_new["sessions"], stats_on_new["last-received-at"]) == (
        stats_on_old["sessions"], stats_on_old["last-received-at"]) == (6, stats_on_old[
            "last-received-at"])
    # The feed consumer's cursor goes on where it was; the old tokens work.
    assert server.request("GET", f"/sessions?after={first_page['next']}", headers=read) == (
        status, rest_on_old)
    assert server.request("GET", "/stats", headers={"Authorization": "Bearer x"})[0] == 401
    body = json.dumps(postback(user_id="u9")).encode()
    assert server.request("POST", "/postback", body, auth)[0] == 200
    again = subprocess.run([sys.executable, str(SERVER), *pay, "--db", server.db],
                           capture_output=True, timeout=15)
    assert (again.returncode, again.stdout) == (0, paid.stdout)  # the same run 1, not a new one
    # A second move-in onto a database that holds sessions changes nothing.
    refused = run("move-in.sh", new, str(archive))
    assert refused.returncode == 1 and "holds sessions: not replacing it" in refused.stderr


def test_links_between_the_docs_lead_to_a_page_and_heading_that_exist():
    pages = ["README.md"] + sorted(str(p.relative_to(HERE)) for p in (HERE / "docs").glob("*.md"))
    broken = []
    for page in pages:
        text = (HERE / page).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (HERE / page).parent / path if path else HERE / page
            if not file.exists() or anchor and anchor not in heading_anchors(file.read_text()):
                broken.append(f"{page}: {target}")
    assert broken == []
