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

-- version 5
-- The payout ledger (`spp_server.py pay`, `settle`; docs/ledger.md).  A run
-- pays the sessions whose row ids are in (after_session_id, last_session_id]:
-- each run starts where the previous one ended, so no session is in two runs
-- and none is skipped.  Shares are the exact decimal text the publisher gave.
CREATE TABLE payout_runs (
    id                  INTEGER PRIMARY KEY,     -- its staged rows are written first
    after_session_id    INTEGER NOT NULL,
    last_session_id     INTEGER NOT NULL CHECK (last_session_id >= after_session_id),
    until_us            INTEGER NOT NULL UNIQUE,
    created_at_us       INTEGER NOT NULL,
    pay_now_share       TEXT    NOT NULL,
    final_share         TEXT    NOT NULL,
    report_utc_offset   INTEGER NOT NULL,          -- minutes east of UTC of the parts' days
    users               INTEGER NOT NULL,
    sessions            INTEGER NOT NULL,
    estimated_nano      INTEGER NOT NULL,
    paid_now_nano       INTEGER NOT NULL,          -- before deductions
    deducted_nano       INTEGER NOT NULL           -- carried balances taken back
);

-- What a run paid per user, report day and property: what settlement needs.
-- property_id '' = the session had none.  The run's id first: a run over a
-- month inserts about one row per session, and appending them (in staged
-- chunks, see spp_server.write_in_chunks) keeps postbacks from waiting.
-- Rows of a run id without a payout_runs row are staged, never read.
CREATE TABLE payout_parts (
    run_id              INTEGER NOT NULL,
    day                 TEXT    NOT NULL,
    property_id         TEXT    NOT NULL,
    user_id             TEXT    NOT NULL,
    sessions            INTEGER NOT NULL,
    estimated_nano      INTEGER NOT NULL,
    paid_now_nano       INTEGER NOT NULL,   -- before deductions
    PRIMARY KEY (run_id, day, property_id, user_id)
) WITHOUT ROWID;

-- A run's lines: per user, its parts summed (staged like the parts).
CREATE TABLE payout_lines (
    run_id              INTEGER NOT NULL,
    user_id             TEXT    NOT NULL,
    sessions            INTEGER NOT NULL,
    estimated_nano      INTEGER NOT NULL,
    paid_now_nano       INTEGER NOT NULL,   -- before deductions
    PRIMARY KEY (run_id, user_id)
) WITHOUT ROWID;
CREATE INDEX payout_lines_by_user ON payout_lines (user_id, run_id);

-- Carried balances taken back in a run: the line credits paid_now - deducted.
CREATE TABLE payout_deductions (
    run_id              INTEGER NOT NULL REFERENCES payout_runs (id),
    user_id             TEXT    NOT NULL,
    deducted_nano       INTEGER NOT NULL CHECK (deducted_nano > 0),
    PRIMARY KEY (run_id, user_id)
) WITHOUT ROWID;
CREATE INDEX payout_deductions_by_user ON payout_deductions (user_id, run_id);

CREATE TABLE settlements (
    id                  INTEGER PRIMARY KEY,
    created_at_us       INTEGER NOT NULL,
    report_utc_offset   INTEGER NOT NULL,
    write_off           INTEGER NOT NULL,
    pools               INTEGER NOT NULL,
    booked_nano         INTEGER NOT NULL,
    top_up_nano         INTEGER NOT NULL,
    carried_nano        INTEGER NOT NULL,
    written_off_nano    INTEGER NOT NULL
);

-- One row per settlement per pool: a report day and property (by_property =
-- 1) or a whole day (by_property = 0, property_id '').  The pool's state when
-- settled; a later settlement of the same pool is a correction.
CREATE TABLE settlement_days (
    day                 TEXT    NOT NULL,
    property_id         TEXT    NOT NULL,
    settlement_id       INTEGER NOT NULL REFERENCES settlements (id),
    by_property         INTEGER NOT NULL,
    booked_nano         INTEGER NOT NULL,
    sessions            INTEGER NOT NULL,
    estimated_nano      INTEGER NOT NULL,
    paid_now_nano       INTEGER NOT NULL,
    final_nano          INTEGER NOT NULL,
    top_up_nano         INTEGER NOT NULL,
    carried_nano        INTEGER NOT NULL,
    written_off_nano    INTEGER NOT NULL,
    PRIMARY KEY (day, property_id, settlement_id)
) WITHOUT ROWID;

-- Staged like a run's parts: rows of a settlement id without a settlements
-- row are never read.
CREATE TABLE settlement_lines (
    settlement_id       INTEGER NOT NULL,
    day                 TEXT    NOT NULL,
    property_id         TEXT    NOT NULL,
    user_id             TEXT    NOT NULL,
    sessions            INTEGER NOT NULL,
    estimated_nano      INTEGER NOT NULL,
    booked_part_nano    INTEGER NOT NULL,
    final_nano          INTEGER NOT NULL,
    paid_now_nano       INTEGER NOT NULL,
    top_up_nano         INTEGER NOT NULL CHECK (top_up_nano >= 0),
    carried_nano        INTEGER NOT NULL CHECK (carried_nano >= 0),
    written_off_nano    INTEGER NOT NULL CHECK (written_off_nano >= 0),
    correction          INTEGER NOT NULL,
    PRIMARY KEY (settlement_id, day, property_id, user_id)
) WITHOUT ROWID;
CREATE INDEX settlement_lines_by_user ON settlement_lines (user_id, day, property_id, settlement_id);

-- What each user owes from carried balances, taken back from later runs.
CREATE TABLE ledger_balances (
    user_id             TEXT    PRIMARY KEY,
    owed_nano           INTEGER NOT NULL CHECK (owed_nano >= 0)
) WITHOUT ROWID;

-- version 6
-- Ledger cut-over (restore; issue 21, docs/ledger.md "The first run: where
-- the ledger takes over"): the first run's --from as given (an instant in ISO
-- 8601 UTC, or a feed cursor), NULL when the ledger pays from the first
-- session.  The run's after_session_id is where it took over.
ALTER TABLE payout_runs ADD COLUMN started_from TEXT;

-- import-booked in steps (importops): a report's rows are staged under a new
-- import id in short transactions, unseen, then one short transaction points
-- each day and property it covers at them, then the rows it superseded are
-- deleted in short transactions.  booked_revenue becomes the view of the
-- current rows, with the columns the table had.
CREATE TABLE booked_rows (
    import_id       INTEGER NOT NULL,
    day             TEXT    NOT NULL CHECK (day GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]'),
    property_id     TEXT    NOT NULL,
    country         TEXT    NOT NULL,
    revenue_nano    INTEGER NOT NULL CHECK (revenue_nano >= 0),
    imported_at_us  INTEGER NOT NULL,
    source_file     TEXT    NOT NULL,
    PRIMARY KEY (import_id, day, property_id, country)
) WITHOUT ROWID;
-- Whose rows stand for each day and property an import covered.  The rows of
-- an import id above the largest here are staged (or left by a killed import).
CREATE TABLE booked_current (
    day             TEXT    NOT NULL,
    property_id     TEXT    NOT NULL,
    import_id       INTEGER NOT NULL,
    PRIMARY KEY (day, property_id)
) WITHOUT ROWID;
-- Rows a switch made obsolete, deleted after it (by the next import if killed).
CREATE TABLE booked_superseded (
    import_id       INTEGER NOT NULL,
    day             TEXT    NOT NULL,
    property_id     TEXT    NOT NULL,
    PRIMARY KEY (import_id, day, property_id)
) WITHOUT ROWID;
INSERT INTO booked_rows
    SELECT 0, day, property_id, country, revenue_nano, imported_at_us, source_file
    FROM booked_revenue;
INSERT INTO booked_current SELECT DISTINCT day, property_id, 0 FROM booked_revenue;
DROP TABLE booked_revenue;
CREATE VIEW booked_revenue AS
    -- c's day and property: a query by day and property reads c in its key
    -- order.  The unary + keeps SQLite from copying a range on c.day to r.day,
    -- which it would search by instead of the equality (every row of the
    -- import in the range, for each day and property).
    SELECT c.day, c.property_id, r.country, r.revenue_nano, r.imported_at_us, r.source_file
    FROM booked_current c
    JOIN booked_rows r
      ON r.import_id = c.import_id AND r.day = +c.day AND r.property_id = c.property_id;

-- Ledger rules, part b (issue 22: balances that end, holds, erasure; docs/ledger.md).
-- A carried balance is taken back from a settlement's top-ups too (deducted);
-- a correction gives back what an earlier write-off of the pool no longer
-- needs (written_back); a held user's line shares nothing (held = 1).
ALTER TABLE settlement_lines ADD COLUMN deducted_nano INTEGER NOT NULL DEFAULT 0 CHECK (deducted_nano >= 0);
ALTER TABLE settlement_lines ADD COLUMN written_back_nano INTEGER NOT NULL DEFAULT 0 CHECK (written_back_nano >= 0);
ALTER TABLE settlement_lines ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE settlements ADD COLUMN deducted_nano INTEGER NOT NULL DEFAULT 0;
-- Sessions a run found on days already settled (a clock step backwards): paid
-- in the pool of the run's last report day instead, moved_to_day.
ALTER TABLE payout_runs ADD COLUMN moved_sessions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE payout_runs ADD COLUMN moved_to_day TEXT;
ALTER TABLE payout_runs ADD COLUMN withheld_nano INTEGER NOT NULL DEFAULT 0;

-- A held user's pay-now, withheld in a run (the line credits paid - deducted - withheld).
CREATE TABLE payout_withheld (
    run_id              INTEGER NOT NULL REFERENCES payout_runs (id),
    user_id             TEXT    NOT NULL,
    withheld_nano       INTEGER NOT NULL CHECK (withheld_nano > 0),
    PRIMARY KEY (run_id, user_id)
) WITHOUT ROWID;
CREATE INDEX payout_withheld_by_user ON payout_withheld (user_id, run_id);

-- Every hold, release and write-off of what was held, with its time and reason.
-- amount_nano: what a release credits or a write-off forfeits (0 for a hold).
CREATE TABLE ledger_holds (
    id                  INTEGER PRIMARY KEY,
    user_id             TEXT    NOT NULL,
    action              TEXT    NOT NULL CHECK (action IN ('hold', 'release', 'write-off')),
    at_us               INTEGER NOT NULL,
    reason              TEXT    NOT NULL,
    amount_nano         INTEGER NOT NULL CHECK (amount_nano >= 0)
);
CREATE INDEX ledger_holds_by_user ON ledger_holds (user_id, id);

-- Balances older than a chosen age written off (`write-off-balances`), per
-- user and the pool the balance was carried from (oldest first).
CREATE TABLE balance_write_offs (
    id                  INTEGER PRIMARY KEY,
    created_at_us       INTEGER NOT NULL,
    older_than_us       INTEGER NOT NULL,
    users               INTEGER NOT NULL,
    written_off_nano    INTEGER NOT NULL
);
CREATE TABLE balance_write_off_lines (
    write_off_id        INTEGER NOT NULL REFERENCES balance_write_offs (id),
    user_id             TEXT    NOT NULL,
    day                 TEXT    NOT NULL,
    property_id         TEXT    NOT NULL,
    written_off_nano    INTEGER NOT NULL CHECK (written_off_nano > 0),
    PRIMARY KEY (write_off_id, user_id, day, property_id)
) WITHOUT ROWID;
CREATE INDEX balance_write_off_lines_by_user ON balance_write_off_lines (user_id, write_off_id);
CREATE INDEX balance_write_off_lines_by_pool ON balance_write_off_lines (day, property_id);

-- That a user's data was erased on request (`erase`): when, and how much;
-- never who.
CREATE TABLE erasures (
    id                  INTEGER PRIMARY KEY,
    erased_at_us        INTEGER NOT NULL,
    sessions            INTEGER NOT NULL,
    forced              INTEGER NOT NULL
);

-- Ledger rules (issue 22, one report offset): the offsets that cut receive
-- times into report days, each recorded by the run that started it.  The
-- first applies from the start (first_day NULL); a change from first_day on.
CREATE TABLE report_offsets (
    run_id              INTEGER PRIMARY KEY REFERENCES payout_runs (id),
    first_day           TEXT,
    report_utc_offset   INTEGER NOT NULL   -- minutes east of UTC
);
INSERT INTO report_offsets (run_id, first_day, report_utc_offset)
    SELECT id, NULL, report_utc_offset FROM payout_runs ORDER BY id LIMIT 1;
