-- wrk script: single-event publishes, each with a fresh id, with the token in $TOKEN.
--   TOKEN=... wrk -t2 -c64 -d10s -s bench/wrk/publish.lua http://127.0.0.1:8080/v1/events
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
  counter = counter + 1
  local body = string.format(
    '{"id":"w%d-%d","channel":"bench.w%d","type":"tick","data":"%s"}',
    thread_id, counter, counter % 16, string.rep("x", 40))
  return wrk.format(nil, nil, nil, body)
end
