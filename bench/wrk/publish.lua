-- wrk script: publishes with fresh ids, with the token in $TOKEN; $BATCH events per request
-- (default 1: single events; more: a JSON array, and Requests/sec x BATCH is events/s).
--   TOKEN=... wrk -t2 -c64 -d10s -s bench/wrk/publish.lua http://127.0.0.1:8080/v1/events
--   TOKEN=... BATCH=100 wrk -t2 -c16 -d10s -s bench/wrk/publish.lua http://127.0.0.1:8080/v1/events
local counter = 0
local thread_id = 0
local threads = {}
local batch = tonumber(os.getenv("BATCH") or "1")

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
end

local function event()
  counter = counter + 1
  return string.format(
    '{"id":"w%d-%d","channel":"bench.w%d","type":"tick","data":"%s"}',
    thread_id, counter, counter % 16, string.rep("x", 40))
end

function request()
  if batch <= 1 then
    return wrk.format(nil, nil, nil, event())
  end
  local events = {}
  for i = 1, batch do
    events[i] = event()
  end
  return wrk.format(nil, nil, nil, "[" .. table.concat(events, ",") .. "]")
end
