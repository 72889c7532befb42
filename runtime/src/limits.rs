//! The event size limit, one setting for every way in (HTTP and WebSocket publishing).

#[derive(clap::Args, Debug, Clone)]
#[group(id = "event_limits")]
pub struct EventLimits {
    /// Largest event, serialized, in bytes; a larger one is refused (413 or an error frame).
    #[arg(long = "max-event-bytes", env = "EVENTBUS_MAX_EVENT_BYTES", default_value_t = eventbus_model::event::DEFAULT_MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
}

impl EventLimits {
    pub fn model(&self) -> eventbus_model::Limits {
        eventbus_model::Limits {
            max_event_bytes: self.max_event_bytes,
        }
    }
}

impl Default for EventLimits {
    fn default() -> Self {
        crate::config::defaults()
    }
}
