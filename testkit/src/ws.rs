//! A real WebSocket client speaking the protocol of docs/protocol.md.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::WAIT;

pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What came instead of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The connection ended without a close frame.
    Dropped,
    /// Nothing came within the wait bound.
    TimedOut,
}

impl Ws {
    /// Connects to `url` (e.g. `ws://127.0.0.1:1234/v1/ws`).
    pub async fn connect(url: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect failed");
        Ws { stream }
    }

    /// Connects to `url` with these request headers (a browser's cookie, say).
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("websocket URL");
        for (name, value) in headers {
            request.headers_mut().append(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .expect("header name"),
                value.parse().expect("header value"),
            );
        }
        let (stream, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connect failed");
        Ws { stream }
    }

    /// Connects to a `wss://` URL trusting `tls`.
    pub async fn connect_tls(url: &str, tls: rustls::ClientConfig) -> Ws {
        let connector = tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(tls));
        let (stream, _) =
            tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
                .await
                .expect("websocket connect failed");
        Ws { stream }
    }

    /// Connects and authenticates with hello; returns the client and the welcome frame.
    pub async fn hello(url: &str, token: &str) -> (Ws, Value) {
        let mut ws = Ws::connect(url).await;
        ws.send(json!({"op": "hello", "token": token})).await;
        let welcome = ws.recv().await;
        assert_eq!(welcome["op"], "welcome", "expected welcome, got {welcome}");
        (ws, welcome)
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_raw(Message::text(frame.to_string())).await;
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream
            .send(message)
            .await
            .expect("websocket send failed");
    }

    /// The next text frame as JSON; panics on close or after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Ok(value) => value,
            Err(closed) => panic!("expected a frame, connection closed: {closed:?}"),
        }
    }

    /// The next text frame, or how the connection ended.
    pub async fn next(&mut self) -> Result<Value, Closed> {
        loop {
            let Ok(message) = tokio::time::timeout(WAIT, self.stream.next()).await else {
                return Err(Closed::TimedOut);
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Ok(
                        serde_json::from_str(&text).expect("server sent a frame that is not JSON")
                    );
                }
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                    return Err(Closed::Code(code.into()));
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                    return Err(Closed::Dropped);
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame whose `op` is `op`, skipping others.
    pub async fn recv_op(&mut self, op: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["op"] == op {
                return frame;
            }
        }
    }

    /// Reads frames until the connection closes; returns how it closed.
    pub async fn closed(&mut self) -> Closed {
        loop {
            if let Err(closed) = self.next().await {
                return closed;
            }
        }
    }

    /// Subscribes and waits for `subscribed`; returns it.
    pub async fn subscribe(&mut self, request: Value) -> Value {
        let mut frame = request;
        frame["op"] = json!("subscribe");
        self.send(frame).await;
        let answer = self.recv().await;
        assert_eq!(
            answer["op"], "subscribed",
            "expected subscribed, got {answer}"
        );
        answer
    }

    /// The next `n` event frames' events.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let frame = self.recv().await;
            assert_eq!(frame["op"], "event", "expected an event, got {frame}");
            out.push(frame["event"].clone());
        }
        out
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}
