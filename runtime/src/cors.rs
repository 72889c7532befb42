//! Which browser origins may use the public endpoints (`EVENTBUS_CORS_ORIGINS`).

use axum::http::{HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "cors")]
pub struct Args {
    /// Browser origins allowed to call the HTTP API and open WebSocket/SSE streams, comma separated
    /// (e.g. `https://app.example.com`). `*` allows any origin.
    #[arg(
        long = "cors-origins",
        env = "EVENTBUS_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub origins: Vec<String>,
}

/// The origin policy of one service.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    any: bool,
    allowed: Vec<String>,
}

impl Origins {
    /// `dev` allows any origin, as the development mode promises.
    pub fn new(args: &Args, dev: bool) -> Self {
        let allowed: Vec<String> = args
            .origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        Self {
            any: dev || allowed.iter().any(|o| o == "*"),
            allowed,
        }
    }

    /// Whether a request with this `Origin` header may open a stream. Requests without one come
    /// from non-browser clients, which origins do not concern.
    pub fn permits(&self, origin: Option<&HeaderValue>) -> bool {
        match origin.and_then(|o| o.to_str().ok()) {
            None => true,
            Some(origin) => self.any || self.allowed.iter().any(|allowed| allowed == origin),
        }
    }

    /// A CORS layer answering preflights for the allowed origins.
    pub fn layer(&self) -> CorsLayer {
        let allow = if self.any {
            AllowOrigin::mirror_request()
        } else {
            let values: Vec<HeaderValue> = self
                .allowed
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect();
            AllowOrigin::list(values)
        };
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([header::RETRY_AFTER])
    }
}
