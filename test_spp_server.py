"""Tests for spp_server.py: the HTTP contract through WebTest, and end-to-end
tests against a real `python spp_server.py` process."""

import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import pytest
from webtest import TestApp

import spp_server

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


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


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


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "spp.db")


@pytest.fixture
def make_client(db):
    """make_client(**config) -> TestApp on a fresh app (database `db` by default)."""
    apps = []

    def make(**config):
        app = spp_server.create_app({"db": db, **config})
        apps.append(app)
        return TestApp(app)

    yield make
    for app in apps:
        app.store.close()


@pytest.fixture
def client(make_client):
    return make_client()


# ---------------------------------------------------------------------------
# POST /postback: recording and deduplication
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


# ---------------------------------------------------------------------------
# POST /postback: body and field validation
# ---------------------------------------------------------------------------


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


class CountingStream:
    """An endless request body that counts what was read from it."""

    def __init__(self):
        self.read_bytes = 0

    def read(self, size=-1):
        assert size >= 0, "an unbounded read of the body"
        self.read_bytes += size
        return b" " * size


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
        ({"your_estimated_revenue": "999999.999999999"}, "revenue_nano", 999_999_999_999_999),
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


# ---------------------------------------------------------------------------
# Money: exact sums, exact strings
# ---------------------------------------------------------------------------


def test_many_tenths_add_up_exactly(client):
    for _ in range(30):
        post(client, postback(user_id="tenths", your_estimated_revenue="0.1"))
    assert earnings(client, "tenths").json["estimated-revenue"] == "3"


def test_earnings_sum_is_exact_for_awkward_amounts(client):
    amounts = ["0.000012", "0.000000001", "123.456789012", "0.3", "999999.999999999", "7"]
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
    assert earnings(client, "u").json == {
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
    }


@pytest.mark.parametrize(
    "nanos, text",
    [(0, "0"), (1, "0.000000001"), (12_000, "0.000012"), (10**9, "1"), (1_500_000_000, "1.5"),
     (10**24 + 7, "1000000000000000.000000007")],
)
def test_nanos_are_written_as_exact_decimal_strings(nanos, text):
    assert spp_server.nanos_to_usd(nanos) == text


@pytest.mark.parametrize(
    "user_id", ["a/b", "50%", "with space", "ユーザー", "emoji-🎮", "a+b", "?x=1&y", "trailing/"]
)
def test_any_user_id_round_trips_when_percent_encoded(client, user_id):
    post(client, postback(user_id=user_id))
    assert earnings(client, user_id).json["user-id"] == user_id
    assert earnings(client, user_id).json["sessions"] == 1


def test_unattributed_sessions_are_kept_under_the_empty_user_id(client):
    post(client, postback(user_id=""))
    res = client.get("/users//earnings", status=200)
    assert (res.json["user-id"], res.json["sessions"]) == ("", 1)


# ---------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Errors, storage failures, health, logs
# ---------------------------------------------------------------------------


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


def test_healthz_is_ok_and_needs_no_auth(make_client):
    client = make_client(read_tokens=(b"reader",), postback_tokens=(b"poster",))
    assert client.get("/healthz", status=200).json == {"status": "ok"}


def test_one_log_line_per_postback_without_secrets(make_client, caplog):
    caplog.set_level(logging.INFO, logger="spp")
    client = make_client(postback_tokens=(b"tok-123",))
    post(client, SAMPLE, headers=bearer("tok-123"))
    post(client, SAMPLE, headers=bearer("tok-123"))
    post(client, b"{}", status=400, headers=bearer("tok-123"))
    post(client, SAMPLE, status=401, headers=bearer("tok-12"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("postback ")]
    assert [line.split()[1] for line in lines] == [
        "recorded", "duplicate", "rejected", "unauthorized"]
    assert f'session-id="{SAMPLE["session-id"]}" user-id="sub1"' in lines[0]
    assert "status=200" in lines[0] and "status=401" in lines[3]
    assert "tok-12" not in caplog.text


def test_log_line_cannot_be_forged_with_a_newline(client, caplog):
    caplog.set_level(logging.INFO, logger="spp")
    post(client, postback(user_id="x\nINFO spp: postback recorded"))
    assert all("\n" not in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# Storage: files, schema, upgrades
# ---------------------------------------------------------------------------


def test_database_files_are_private_whatever_the_umask(client, db):
    old = os.umask(0)
    try:
        post(client, SAMPLE)
    finally:
        os.umask(old)
    for path in [db, db + "-wal"]:
        assert os.stat(path).st_mode & 0o077 == 0, path


def test_database_is_in_wal_mode_with_latest_schema(client, db):
    latest = spp_server.schema_versions(spp_server.SCHEMA_PATH.read_text())[-1][0]
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "PRAGMA user_version") == [(latest,)]


def test_reopening_keeps_rows_and_does_not_reapply_the_schema(make_client, db):
    post(make_client(), SAMPLE)
    client = make_client()
    assert earnings(client, "sub1").json["sessions"] == 1


SCHEMA_VERSIONS = [v for v, _ in spp_server.schema_versions(spp_server.SCHEMA_PATH.read_text())]


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
    app = spp_server.create_app({"db": db})
    try:
        client = TestApp(app)
        assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSIONS[-1],)]
        post(client, SAMPLE)
        assert earnings(client, "sub1").json["estimated-revenue"] == "0.000017"
    finally:
        app.store.close()


def test_schema_sections_are_numbered_in_increasing_order():
    assert SCHEMA_VERSIONS == sorted(set(SCHEMA_VERSIONS)) and SCHEMA_VERSIONS[0] == 1


# ---------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------


@pytest.fixture
def fake_serve(monkeypatch):
    """Replace the waitress loop: main() runs up to serving and records how."""
    calls = []
    monkeypatch.setattr(spp_server, "serve", lambda app, config, sockets: calls.append(config))
    monkeypatch.setattr(spp_server, "setup_logging", lambda: None)
    return calls


def test_defaults(fake_serve, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert spp_server.main([], environ={}) == 0
    [config] = fake_serve
    assert (config["db"], config["host"], config["port"], config["threads"]) == (
        "spp.db", "127.0.0.1", 8080, 4)
    assert (tmp_path / "spp.db").exists()


def test_environment_sets_options_and_flags_win(fake_serve, db):
    environ = {"SPP_DB": db, "SPP_HOST": "::1", "SPP_PORT": "9000", "SPP_THREADS": "8"}
    assert spp_server.main(["--port", "9100"], environ=environ) == 0
    [config] = fake_serve
    assert (config["db"], config["host"], config["port"], config["threads"]) == (
        db, "::1", 9100, 8)


def test_help_explains_every_option_and_variable(capsys):
    with pytest.raises(SystemExit) as exited:
        spp_server.main(["--help"], environ={})
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ["--db", "--host", "--port", "--threads", "SPP_DB", "SPP_HOST", "SPP_PORT",
                 "SPP_THREADS", "SPP_POSTBACK_TOKEN", "SPP_READ_TOKEN", "CREDENTIALS_DIRECTORY"]:
        assert word in text


@pytest.mark.parametrize("bad", [["--port", "70000"], ["--threads", "0"], ["--port", "x"]])
def test_bad_option_values_exit_with_usage(fake_serve, bad):
    with pytest.raises(SystemExit) as exited:
        spp_server.main(bad, environ={})
    assert exited.value.code == 2


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
    assert "holds no token" in caplog.text


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_non_loopback_host_without_read_token_refuses_to_start(fake_serve, db, host, caplog):
    assert spp_server.main(["--host", host, "--db", db], environ={}) == 2
    assert fake_serve == []
    assert "read token" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_host_needs_no_read_token(fake_serve, db, host):
    assert spp_server.main(["--host", host, "--db", db], environ={}) == 0


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
# End to end: a real server process
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RealServer:
    """`python spp_server.py` on a free port of 127.0.0.1, waited for until it answers."""

    def __init__(self, db, env=None, args=()):
        self.db = db
        self.port = free_port()
        self.log = open(Path(db).with_suffix(".log"), "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), "--db", db, "--port", str(self.port), *args],
            env={**os.environ, **(env or {})},
            stderr=self.log,
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
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            res = conn.getresponse()
            return res.status, json.loads(res.read() or b"null")
        finally:
            conn.close()

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


def test_rows_acknowledged_before_sigkill_survive(real_server, db):
    server = real_server(db)
    sent = [postback() for _ in range(20)]
    for payload in sent:
        assert server.post(payload)[0] == 200
    server.stop(signal.SIGKILL)
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert count(db, "sessions") == 20
    server = real_server(db)
    assert server.request("GET", "/users/sub1/earnings")[1]["sessions"] == 20
