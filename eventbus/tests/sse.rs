//! `GET /v1/sse`: a real HTTP client reading the event stream; resume through `Last-Event-ID`
//! after a dropped connection gets every missed event once, per channel in order; bad requests get
//! problem documents.

use eventbus_testkit::Cluster;
use serde_json::{Value, json};

/// One SSE message: its id (if any) and its data (if any).
#[derive(Debug, Clone)]
struct Message {
    id: Option<String>,
    data: Option<Value>,
}

struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(base: &str, query: &str, last_event_id: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new().get(format!("{base}/v1/sse?{query}"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send().await.expect("GET /v1/sse")
    }

    /// The next message (comments and keep-alives skipped).
    async fn next(&mut self) -> Message {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut message = Message {
                    id: None,
                    data: None,
                };
                for line in block.lines() {
                    if let Some(id) = line
                        .strip_prefix("id: ")
                        .or_else(|| line.strip_prefix("id:"))
                    {
                        message.id = Some(id.to_owned());
                    } else if let Some(data) = line
                        .strip_prefix("data: ")
                        .or_else(|| line.strip_prefix("data:"))
                    {
                        message.data = Some(serde_json::from_str(data).expect("data is JSON"));
                    }
                }
                if message.id.is_some() || message.data.is_some() {
                    return message;
                }
                continue;
            }
            let chunk = tokio::time::timeout(eventbus_testkit::WAIT, self.response.chunk())
                .await
                .expect("an SSE message in time")
                .expect("stream read")
                .expect("stream ended");
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    /// The next `n` events, with the id that came with each.
    async fn events(&mut self, n: usize) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = self.next().await;
            if let (Some(id), Some(data)) = (m.id, m.data)
                && data.get("seq").is_some()
            {
                out.push((id, data));
            }
        }
        out
    }
}

fn seqs_of(events: &[(String, Value)], channel: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|(_, e)| e["channel"] == channel)
        .map(|(_, e)| e["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn sse_resumes_every_channel_through_last_event_id_exactly_once() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let gateway = bus.ws.replace("ws://", "http://").replace("/v1/ws", "");
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "reader", &["news.a", "news.b"], &[])
        .await;
    let publish = |channel: &'static str, n: u64| {
        let (api, service) = (bus.api.clone(), service.clone());
        async move {
            for i in 0..n {
                let answer = api
                    .publish(
                        &service,
                        &json!({"channel": channel, "type": "item", "data": i}),
                    )
                    .await;
                assert_eq!(answer.status, 200);
            }
        }
    };
    publish("news.a", 2).await; // history before the stream: not delivered (live from the head)

    let query = format!("channel=news.a&channel=news.b&token={token}");
    let response = Stream::open(&gateway, &query, None).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = Stream {
        response,
        buffer: String::new(),
    };
    let first = stream.next().await;
    assert_eq!(
        first.id.as_deref(),
        Some("news.a:2,news.b:0"),
        "where the stream starts"
    );
    assert_eq!(first.data, Some(json!({"news.a": 2, "news.b": 0})));

    publish("news.a", 2).await;
    publish("news.b", 2).await;
    let seen = stream.events(4).await;
    assert_eq!(seqs_of(&seen, "news.a"), [3, 4]);
    assert_eq!(seqs_of(&seen, "news.b"), [1, 2]);
    let last_id = seen.last().expect("events").0.clone();
    assert_eq!(last_id, "news.a:4,news.b:2");
    drop(stream); // the connection drops

    publish("news.b", 3).await;
    publish("news.a", 1).await;
    let response = Stream::open(&gateway, &query, Some(&last_id)).await;
    assert_eq!(response.status(), 200);
    let mut resumed = Stream {
        response,
        buffer: String::new(),
    };
    assert_eq!(resumed.next().await.id.as_deref(), Some(last_id.as_str()));
    let missed = resumed.events(4).await;
    assert_eq!(seqs_of(&missed, "news.a"), [5]);
    assert_eq!(seqs_of(&missed, "news.b"), [3, 4, 5]);
    // Live again after the catch-up, nothing doubled.
    publish("news.a", 1).await;
    let live = resumed.events(1).await;
    assert_eq!(seqs_of(&live, "news.a"), [6]);
    assert_eq!(live[0].0, "news.a:6,news.b:5");

    // The same position as a query parameter, for clients that cannot set the header.
    let response = Stream::open(
        &gateway,
        &format!("{query}&last_event_id=news.a%3A5%2Cnews.b%3A5"),
        None,
    )
    .await;
    let mut by_query = Stream {
        response,
        buffer: String::new(),
    };
    by_query.next().await;
    assert_eq!(seqs_of(&by_query.events(1).await, "news.a"), [6]);
    cluster.stop().await;
}

/// docs/protocol.md §6b: `after=N` with one channel reads its history from N, then live; a `Last-Event-ID`
/// (the browser's reconnect) wins over it.
#[tokio::test]
async fn sse_after_reads_one_channel_from_a_seq() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let gateway = bus.ws.replace("ws://", "http://").replace("/v1/ws", "");
    let service = bus.service_token().await;
    for i in 1..=4 {
        let answer = bus
            .api
            .publish(
                &service,
                &json!({"channel": "news.c", "type": "t", "data": i}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let query = format!("channel=news.c&after=2&token={service}");
    let mut stream = Stream {
        response: Stream::open(&gateway, &query, None).await,
        buffer: String::new(),
    };
    assert_eq!(stream.response.status(), 200);
    assert_eq!(seqs_of(&stream.events(2).await, "news.c"), [3, 4]);
    let mut resumed = Stream {
        response: Stream::open(&gateway, &query, Some("news.c:3")).await,
        buffer: String::new(),
    };
    assert_eq!(
        seqs_of(&resumed.events(1).await, "news.c"),
        [4],
        "Last-Event-ID wins"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn sse_refuses_bad_requests_with_problems() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let gateway = bus.ws.replace("ws://", "http://").replace("/v1/ws", "");
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "reader", &["news.a"], &[])
        .await;
    let cases = [
        (format!("token={token}"), None, 400, "no channel"),
        (
            format!("channel=news.a&token={token}&colour=red"),
            None,
            400,
            "unknown parameter",
        ),
        (
            format!("channel=news.*&token={service}"),
            None,
            400,
            "a pattern",
        ),
        ("channel=news.a".to_owned(), None, 401, "no token"),
        (
            "channel=news.a&token=not-a-token".to_owned(),
            None,
            401,
            "bad token",
        ),
        (
            format!("channel=secret&token={token}"),
            None,
            403,
            "forbidden channel",
        ),
        (
            format!("channel=news..a&token={service}"),
            None,
            400,
            "invalid channel",
        ),
        (
            format!("channel=news.a&token={token}"),
            Some("news.a:99"),
            400,
            "resume beyond the head",
        ),
        (
            format!("channel=news.a&channel=news.b&after=0&token={service}"),
            None,
            400,
            "after with two channels",
        ),
        (
            format!("channel=news.a&after=-1&token={token}"),
            None,
            400,
            "after not a seq",
        ),
        (
            format!("channel=news.a&after=99&token={token}"),
            None,
            400,
            "after beyond the head",
        ),
    ];
    for (query, last_event_id, status, what) in cases {
        let response = Stream::open(&gateway, &query, last_event_id).await;
        assert_eq!(response.status().as_u16(), status, "{what}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_type, "application/problem+json", "{what}");
    }
    cluster.stop().await;
}
