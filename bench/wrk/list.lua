-- wrk script: channel listings with a prefix nothing matches, with the token in $TOKEN.
--   TOKEN=... wrk -t1 -c8 -d10s -s bench/wrk/list.lua 'http://127.0.0.1:8080/v1/channels?prefix=nomatch&limit=10'
function init(args)
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
end
