-- Schema of the SPP receiver, as an append-only list of versions.
--
-- On start, spp_server.py applies every section numbered above the database's
-- PRAGMA user_version, all in one transaction, then sets user_version to the
-- last one.  A new database gets every section; an older one gets only what
-- it lacks, keeping its rows.  Never edit a released section: add a new one.
--
-- Money is an integer number of nano-USD (1e-9 USD): never a float.
-- Times are integer microseconds since the Unix epoch, UTC.

-- version 1
CREATE TABLE sessions (
    id              INTEGER PRIMARY KEY,
    session_id      TEXT    NOT NULL UNIQUE,   -- Gamezop's deduplication key
    user_id         TEXT    NOT NULL,          -- the publisher's sub; '' = unattributed
    property_id     TEXT,
    country         TEXT,
    ads_viewed      INTEGER,
    duration_s      INTEGER,
    revenue_nano    INTEGER NOT NULL CHECK (revenue_nano >= 0),
    received_at_us  INTEGER NOT NULL,
    raw_body        TEXT    NOT NULL           -- the postback exactly as received
);

-- Covering index for one user's earnings: the sums never touch the table.
-- id after the receive time gives the (received_at_us, id) keyset order.
CREATE INDEX sessions_by_user
    ON sessions (user_id, received_at_us, id, property_id, revenue_nano, ads_viewed, duration_s);

-- Postbacks that passed auth but were refused with 400: kept for inspection.
CREATE TABLE rejected (
    id              INTEGER PRIMARY KEY,
    received_at_us  INTEGER NOT NULL,
    field           TEXT,
    reason          TEXT    NOT NULL,
    raw_body        BLOB    NOT NULL           -- bytes as received, maybe not UTF-8
);

-- A duplicate session-id whose fields differ from the stored copy.
CREATE TABLE conflicts (
    id              INTEGER PRIMARY KEY,
    session_id      TEXT    NOT NULL,
    received_at_us  INTEGER NOT NULL,
    stored_body     TEXT    NOT NULL,
    new_body        TEXT    NOT NULL
);

-- version 2
-- Covering index on the receive time, for the payout export and the
-- reconciliation totals, which read one window of receipts.
CREATE INDEX sessions_by_time
    ON sessions (received_at_us, user_id, property_id, country, revenue_nano, ads_viewed, duration_s);

-- version 3
-- One row that /healthz and the systemd watchdog overwrite when no postback
-- has been written for a moment: a write that commits is what "healthy" means.
CREATE TABLE health_probe (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at_us    INTEGER NOT NULL
);

-- version 4
-- Booked revenue from Gamezop's Ad Revenue Reports (`spp_server.py
-- import-booked`), held against SPP's estimates by GET /reconciliation.
-- One row per report day, property and country; '' stands for "the report has
-- no such breakdown", because UNIQUE and PRIMARY KEY treat NULLs as distinct
-- and a re-import must replace its row, not add a second one.
CREATE TABLE booked_revenue (
    day             TEXT    NOT NULL CHECK (day GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]'),
    property_id     TEXT    NOT NULL DEFAULT '',
    country         TEXT    NOT NULL DEFAULT '',
    revenue_nano    INTEGER NOT NULL CHECK (revenue_nano >= 0),
    imported_at_us  INTEGER NOT NULL,
    source_file     TEXT    NOT NULL,
    PRIMARY KEY (day, property_id, country)
) WITHOUT ROWID;
