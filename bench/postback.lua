-- wrk script for bench/bench.py: POSTs realistic Gamezop Session Performance
-- Postbacks to /postback.
--
--   wrk -t2 -c16 -d11s --latency -s bench/postback.lua http://127.0.0.1:PORT/postback \
--       -- <load seconds> <duplicate share> [connections]
--
-- Every body carries a fresh session-id (run nonce, wrk thread id, counter), so
-- they are unique across threads; a share of requests (default 0.05) re-sends,
-- byte for byte, a body this thread sent earlier (an exact duplicate, as
-- Gamezop's retries are).
--
-- Exact accounting: after <load seconds> each connection, once its last
-- postback has been answered, sends a request announcing a body it never
-- sends.  The server waits for that body, so every postback sent is answered
-- before wrk stops (run wrk ~1 s longer than <load seconds>); the parked
-- requests never complete, so they appear in neither the counts nor the
-- latency histogram.  Hence "distinct session-ids acknowledged" is exactly
-- the number of unique bodies sent when every postback got a 200.
--
-- done() prints one line "SPP_BENCH {json}" for bench.py.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } spp_timespec;
  int clock_gettime(int clk_id, spp_timespec *tp);
]]
local ts = ffi.new("spp_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

-- Runs in the main Lua state, once per thread: give each its id and keep the
-- thread objects so that done() can read their counters.
local threads = {}
local next_id = 1
local run_nonce = string.format("%08x", (os.time() * 7919 + math.floor(os.clock() * 1e6)) % 0xffffffff)

function setup(thread)
  thread:set("thread_id", next_id)
  thread:set("nonce", run_nonce)
  table.insert(threads, thread)
  next_id = next_id + 1
end

-- ---------------------------------------------------------------- per thread
local COUNTRIES = { "IN", "IN", "IN", "ID", "BR", "US", "PH", "BD", "NG", "VN", "EG", "PK" }
local PROPERTIES = { "1234", "1234", "5678", "9012" }
local RING = 4096 -- bodies remembered for duplicates

local load_until, dup_share, connections
local ring, ring_n = {}, 0
local parked_request, counter, verifying

-- Counters read by done() through thread:get().
sent_unique, sent_dup, sent_parked = 0, 0, 0
resp_total, resp_2xx, resp_non2xx, resp_recorded, resp_duplicate = 0, 0, 0, 0, 0

function init(args)
  local load_s = tonumber(args[1] or "10")
  dup_share = tonumber(args[2] or "0.05")
  connections = tonumber(args[3] or "16")
  load_until = now() + load_s
  counter = 0
  verifying = (thread_id == 1)
  math.randomseed(thread_id * 1000003 + os.time())
  if not wrk.headers["Host"] then
    wrk.headers["Host"] = wrk.port and (wrk.host .. ":" .. wrk.port) or wrk.host
  end
  wrk.headers["Content-Type"] = "application/json"
  parked_request = "POST " .. wrk.path .. " HTTP/1.1\r\nHost: " .. wrk.headers["Host"] ..
      "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
end

local function new_body()
  counter = counter + 1
  local session_id = string.format("%s-%04x-4%03x-a%03x-%012x", nonce, thread_id,
    math.random(0, 4095), math.random(0, 4095), counter)
  local ads = math.random(0, 8)
  local revenue = string.format("0.%06d", ads * math.random(1, 30))
  return string.format(
    '{"user-id": "user-%06d", "session-id": "%s", "country": "%s", ' ..
    '"count-of-ads-viewed": %d, "your-estimated-revenue": "%s", ' ..
    '"session-duration": %d, "property-id": "%s"}',
    math.random(0, 99999), session_id, COUNTRIES[math.random(#COUNTRIES)], ads, revenue,
    math.random(15, 1800), PROPERTIES[math.random(#PROPERTIES)])
end

function request()
  if verifying then
    -- wrk calls request() once on thread 1, right after init(), only to check
    -- what it returns; that request is never sent, so it is not counted.
    verifying = false
    return wrk.format("POST", nil, nil, "{}")
  end
  if now() >= load_until then
    sent_parked = sent_parked + 1
    return parked_request
  end
  local body
  -- A duplicate re-sends a body sent at least `connections` sends ago on this
  -- thread, so that its first copy has (almost surely) been answered.
  if ring_n > connections and math.random() < dup_share then
    local back = math.random(connections, math.min(ring_n, RING) - 1)
    body = ring[(ring_n - back) % RING]
    sent_dup = sent_dup + 1
  else
    body = new_body()
    ring[ring_n % RING] = body
    ring_n = ring_n + 1
    sent_unique = sent_unique + 1
  end
  return wrk.format("POST", nil, nil, body)
end

function response(status, headers, body)
  resp_total = resp_total + 1
  if status >= 200 and status < 300 then
    resp_2xx = resp_2xx + 1
    if string.find(body, '"recorded"', 1, true) then
      resp_recorded = resp_recorded + 1
    elseif string.find(body, '"duplicate"', 1, true) then
      resp_duplicate = resp_duplicate + 1
    end
  else
    resp_non2xx = resp_non2xx + 1
  end
end

-- ---------------------------------------------------------------- main state
function done(summary, latency, requests)
  local keys = { "sent_unique", "sent_dup", "sent_parked", "resp_total", "resp_2xx",
    "resp_non2xx", "resp_recorded", "resp_duplicate" }
  local totals = {}
  for _, k in ipairs(keys) do totals[k] = 0 end
  for _, t in ipairs(threads) do
    for _, k in ipairs(keys) do totals[k] = totals[k] + (t:get(k) or 0) end
  end
  local e = summary.errors
  local parts = {
    string.format('"duration_us": %d', summary.duration),
    string.format('"requests": %d', summary.requests),
    string.format('"bytes": %d', summary.bytes),
    string.format('"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us": {"min": %d, "mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}',
      latency.min, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)),
    string.format('"threads": %d', #threads),
  }
  for _, k in ipairs(keys) do
    table.insert(parts, string.format('"%s": %d', k, totals[k]))
  end
  io.write("SPP_BENCH {" .. table.concat(parts, ", ") .. "}\n")
end
