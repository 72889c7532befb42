//! HTTP errors as RFC 9457 problem documents (`application/problem+json`) with stable `type` URIs,
//! so clients branch on `type`, never on the human text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// The kinds of problem the HTTP APIs answer with; each has a stable `type` and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    /// The request contradicts what exists (a durable group's pattern).
    Conflict,
    /// The events asked for are no longer retained.
    Truncated,
    TooLarge,
    UnsupportedMediaType,
    Overloaded,
    Unavailable,
    Internal,
}

impl Kind {
    pub fn slug(self) -> &'static str {
        match self {
            Kind::InvalidRequest => "invalid-request",
            Kind::Unauthorized => "unauthorized",
            Kind::Forbidden => "forbidden",
            Kind::NotFound => "not-found",
            Kind::Conflict => "conflict",
            Kind::Truncated => "truncated",
            Kind::TooLarge => "too-large",
            Kind::UnsupportedMediaType => "unsupported-media-type",
            Kind::Overloaded => "overloaded",
            Kind::Unavailable => "unavailable",
            Kind::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Kind::InvalidRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Truncated => StatusCode::GONE,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Kind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::InvalidRequest => "The request is invalid",
            Kind::Unauthorized => "No valid token",
            Kind::Forbidden => "Not permitted",
            Kind::NotFound => "Not found",
            Kind::Conflict => "Conflicts with what exists",
            Kind::Truncated => "No longer retained",
            Kind::TooLarge => "Too large",
            Kind::UnsupportedMediaType => "Unsupported media type",
            Kind::Overloaded => "Overloaded, retry later",
            Kind::Unavailable => "Unavailable, retry later",
            Kind::Internal => "Internal error",
        }
    }
}

/// Prefix of every problem `type`.
pub const TYPE_PREFIX: &str = "urn:eventbus:problem:";

#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: Kind,
    pub detail: String,
    pub extra: Map<String, Value>,
    pub retry_after_s: Option<u32>,
}

impl Problem {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        let retry_after_s = matches!(kind, Kind::Overloaded | Kind::Unavailable).then_some(1);
        Self {
            kind,
            detail: detail.into(),
            extra: Map::new(),
            retry_after_s,
        }
    }

    /// Adds a member such as `field` or `index`.
    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(name.to_owned(), value.into());
        self
    }

    /// A JSON request body of shape `T`, or a 400 whose `field` names the member at fault, for a
    /// value of the wrong type as for an unknown member (the documented "invalid … with
    /// `field`"). `shape` says in words what the body should be.
    pub fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, Self> {
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut json);
        let refused = |detail: String, field: Option<String>| {
            let problem = Self::new(Kind::InvalidRequest, format!("{shape}: {detail}"));
            match field {
                Some(field) => problem.with("field", field),
                None => problem,
            }
        };
        match parsed {
            Ok(value) => match json.end() {
                Ok(()) => Ok(value),
                Err(err) => Err(refused(err.to_string(), None)),
            },
            Err(err) => {
                // The path of the member being read, an unknown member's own name included;
                // none when the body as a whole is at fault (not an object, cut short).
                let located = err.path().iter().next().is_some()
                    && !err
                        .path()
                        .iter()
                        .any(|s| matches!(s, serde_path_to_error::Segment::Unknown));
                let field = located.then(|| err.path().to_string());
                let inner = err.into_inner();
                Err(refused(inner.to_string(), field))
            }
        }
    }

    pub fn body(&self) -> Value {
        let mut body = json!({
            "type": format!("{TYPE_PREFIX}{}", self.kind.slug()),
            "title": self.kind.title(),
            "status": self.kind.status().as_u16(),
            "detail": self.detail,
        });
        if let Value::Object(map) = &mut body {
            map.extend(self.extra.clone());
        }
        body
    }
}

/// A permission refusal, the same status wherever it happens (publish, history, snapshots, SSE,
/// presence): a malformed target is the request's fault (400), the rest is not allowed (403).
impl From<eventbus_router::Denied> for Problem {
    fn from(denied: eventbus_router::Denied) -> Problem {
        use eventbus_router::Denied;
        let kind = match denied {
            Denied::InvalidChannel { .. } | Denied::PatternNotAllowed => Kind::InvalidRequest,
            Denied::ForeignInbox(_)
            | Denied::NotSubscribable(_)
            | Denied::NotPublishable(_)
            | Denied::GroupNotAllowed
            | Denied::Reserved(_) => Kind::Forbidden,
        };
        Problem::new(kind, denied.to_string())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.kind.status(), self.body().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.kind == Kind::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Request {
        ttl_s: Option<u64>,
        channels: Option<Vec<String>>,
        inner: Option<Inner>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u64,
    }

    fn field(body: &str) -> Option<Value> {
        match Problem::json_body::<Request>(body.as_bytes(), "a request") {
            Ok(request) => panic!("{body} was taken as {request:?}"),
            Err(problem) => problem.extra.get("field").cloned(),
        }
    }

    #[test]
    fn a_refused_body_names_the_member_at_fault() {
        assert_eq!(field(r#"{"ttl_s":-1}"#), Some(json!("ttl_s")));
        assert_eq!(field(r#"{"ttl_s":"x"}"#), Some(json!("ttl_s")));
        assert_eq!(field(r#"{"bogus":1}"#), Some(json!("bogus")));
        assert_eq!(field(r#"{"channels":["a",1]}"#), Some(json!("channels[1]")));
        assert_eq!(field(r#"{"inner":{"x":1}}"#), Some(json!("inner.x")));
        assert_eq!(field(r#"{"inner":{"n":true}}"#), Some(json!("inner.n")));
        assert_eq!(field("[1]"), None, "the whole body is at fault");
        assert_eq!(field("{} trailing"), None);
        assert_eq!(field("{"), None);
        assert!(Problem::json_body::<Request>(br#"{"ttl_s":5}"#, "a request").is_ok());
    }
}
