# A client written only from docs/protocol.md: dev token, subscribe, publish over HTTP, receive,
# disconnect, resume with after; and publish -> deliver latency over N events.
import asyncio, json, sys, time, statistics, urllib.request
import websockets

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
WS = BASE.replace("http", "ws") + "/v1/ws"

def post(path, body, token=None):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": "Bearer " + token} if token else {})})
    with urllib.request.urlopen(req) as r:
        return json.load(r)

async def main():
    service = post("/v1/tokens", {})["token"]
    client = post("/v1/tokens", {"sub": "py", "role": "client", "subscribe": ["lat"], "publish": []})["token"]
    async with websockets.connect(WS) as ws:
        await ws.send(json.dumps({"op": "hello", "token": client}))
        print("welcome:", json.loads(await ws.recv()))
        await ws.send(json.dumps({"op": "subscribe", "channel": "lat"}))
        sub = json.loads(await ws.recv()); print("subscribed:", sub)
        latencies = []
        last = sub["head"]
        for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 300):
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, post, "/v1/events", {"channel": "lat", "type": "ping", "data": i}, service)
            frame = json.loads(await ws.recv())
            latencies.append((time.perf_counter() - t0) * 1000)
            await fut
            assert frame["op"] == "event" and frame["event"]["seq"] == last + 1, frame
            last = frame["event"]["seq"]
        latencies.sort()
        print("publish->deliver ms: p50 %.2f p90 %.2f p99 %.2f max %.2f (n=%d)" % (
            statistics.median(latencies), latencies[int(len(latencies)*0.9)], latencies[int(len(latencies)*0.99)], latencies[-1], len(latencies)))
    # disconnected; 5 more events; resume with after
    for i in range(5):
        post("/v1/events", {"channel": "lat", "type": "missed", "data": i}, service)
    async with websockets.connect(WS) as ws:
        await ws.send(json.dumps({"op": "hello", "token": client})); await ws.recv()
        await ws.send(json.dumps({"op": "subscribe", "channel": "lat", "after": last}))
        print("resumed:", json.loads(await ws.recv()))
        got = [json.loads(await ws.recv())["event"]["seq"] for _ in range(5)]
        print("missed events received:", got)
        assert got == list(range(last + 1, last + 6))
asyncio.run(main())
