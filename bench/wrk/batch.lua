-- wrk script: batches of 100 events, each with a fresh id, with the token in $TOKEN.
--   TOKEN=... wrk -t2 -c16 -d10s -s bench/wrk/batch.lua http://127.0.0.1:8080/v1/events
-- Requests/sec x 100 is events/s.
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
end

function request()
  local events = {}
  for i = 1, 100 do
    counter = counter + 1
    events[i] = string.format(
      '{"id":"b%d-%d","channel":"bench.b%d","type":"tick","data":"%s"}',
      thread_id, counter, counter % 16, string.rep("x", 40))
  end
  return wrk.format(nil, nil, nil, "[" .. table.concat(events, ",") .. "]")
end
