//! Which replica serves the durable groups. With the embedded log, always this one. On
//! PostgreSQL several store replicas share one log, but a group's state machine must live in one
//! place: the replica holding the groups' leadership (an advisory lock in the database) serves
//! them, and the others pass group calls on to it (crate::postgres::leader).

use std::sync::Arc;

use eventbus_store_client::StoreClient;

use super::Groups;

#[derive(Clone)]
pub enum Route {
    /// This process serves the groups.
    Here(Arc<Groups>),
    /// The replica at `address` does.
    Leader {
        address: String,
        client: Box<StoreClient>,
    },
    /// Nobody can right now (an election, the database away, a stop): callers retry.
    Nobody(&'static str),
}

pub type Routes = tokio::sync::watch::Receiver<Route>;
