//! A real HTTP client for the public API.

use reqwest::StatusCode;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct Http {
    pub base: String,
    client: reqwest::Client,
}

/// An answer: status, headers and the body as JSON (Null when it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The problem `type` without its prefix, for error answers.
    pub fn problem(&self) -> String {
        self.body["type"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("urn:eventbus:problem:")
            .to_owned()
    }
}

impl Http {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::Client::new(),
        }
    }

    /// As [`Http::new`], with `client` (e.g. one trusting a test CA).
    pub fn with_client(base: &str, client: reqwest::Client) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
        }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("http request failed");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("http body failed");
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.base))
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.put(format!("{}{path}", self.base))
    }

    /// A PUT with a JSON body and a bearer token.
    pub fn put_json(&self, path: &str, token: &str, body: &Value) -> reqwest::RequestBuilder {
        self.put(path).bearer_auth(token).json(body)
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.delete(format!("{}{path}", self.base))
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base))
    }

    /// `POST /v1/tokens` with an optional bearer credential; panics unless it succeeds.
    pub async fn token(&self, credential: Option<&str>, request: Value) -> String {
        let mut builder = self.post("/v1/tokens").json(&request);
        if let Some(credential) = credential {
            builder = builder.bearer_auth(credential);
        }
        let answer = self.send(builder).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "token request failed: {}",
            answer.body
        );
        answer.body["token"]
            .as_str()
            .expect("token in answer")
            .to_owned()
    }

    /// A client token minted by `service_token`.
    pub async fn client_token(
        &self,
        service_token: &str,
        sub: &str,
        subscribe: &[&str],
        publish: &[&str],
    ) -> String {
        self.token(
            Some(service_token),
            json!({"sub": sub, "role": "client", "subscribe": subscribe, "publish": publish}),
        )
        .await
    }

    /// `POST /v1/events` with a JSON body.
    pub async fn publish(&self, token: &str, body: &Value) -> Answer {
        self.send(self.post("/v1/events").bearer_auth(token).json(body))
            .await
    }

    /// `GET /v1/channels/{channel}/events` with a query string.
    pub async fn history(&self, token: &str, channel: &str, query: &str) -> Answer {
        self.send(
            self.get(&format!("/v1/channels/{channel}/events?{query}"))
                .bearer_auth(token),
        )
        .await
    }
}
