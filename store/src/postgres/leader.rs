//! The groups' leadership among store replicas on one database. Each replica tries for a
//! session advisory lock on a connection of its own; the holder records its address, loads the
//! groups' state and serves them, saving their state on that same connection (so that a replica
//! whose session is gone, its lock with it, cannot overwrite its successor's saves). The others
//! pass group calls on to the recorded address. A holder that loses its connection stops serving
//! at once; PostgreSQL frees the lock when the session ends, and another replica takes over
//! within about a second, from the last saved state: events held by members of the old one come
//! back after their visibility timeout, as after any restart.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventbus_runtime::Shutdown;
use eventbus_store_client::StoreClient;
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::unavailable;
use crate::engine::Engine;
use crate::groups::Groups;
use crate::groups::route::Route;
use crate::groups::saving::{self, Saving};
use crate::groups::state::Saved;
use crate::log::LogError;

/// The advisory lock of the groups' leadership.
const GROUPS_LOCK: i64 = 0x6576_656e_7467_7270;
/// How often a follower tries for the lock, and a leader checks its session.
const EVERY: Duration = Duration::from_secs(1);

/// What a replica needs to take part.
pub struct Election {
    pub database: super::Database,
    pub engine: Arc<dyn Engine>,
    /// Where the other replicas reach this one's gRPC.
    pub me: String,
    /// How this replica reaches the leader's gRPC.
    pub credential: eventbus_runtime::internal::Credential,
    pub trust: eventbus_runtime::tls::Trust,
    pub routes: watch::Sender<Route>,
    pub shutdown: Shutdown,
}

/// Group state in `eventbus_groups`, written on the leadership's own session.
struct Table {
    client: Arc<Client>,
}

#[async_trait]
impl Saving for Table {
    async fn load(&self) -> Result<Vec<(String, Saved)>, LogError> {
        let rows = self
            .client
            .query("SELECT name, state FROM eventbus_groups", &[])
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let name: String = row.get(0);
                let state: Vec<u8> = row.get(1);
                let saved = saving::decode_row(&name, &state)?;
                Ok((name, saved))
            })
            .collect()
    }

    async fn save(&self, changed: Vec<(String, Saved)>) -> Result<(), LogError> {
        let mut names = Vec::with_capacity(changed.len());
        let mut states = Vec::with_capacity(changed.len());
        for (name, saved) in &changed {
            names.push(name.as_str());
            states.push(saving::encode(saved)?);
        }
        // One statement: all or none.
        self.client
            .execute(
                "INSERT INTO eventbus_groups (name, state)
                 SELECT * FROM unnest($1::text[], $2::bytea[])
                 ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state",
                &[&names, &states],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), LogError> {
        self.client
            .execute("DELETE FROM eventbus_groups WHERE name = $1", &[&name])
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

impl Election {
    /// Until shutdown: follows or leads. Returns once a leader has saved its groups' state.
    pub async fn run(self) {
        let mut following: Option<String> = None;
        while !self.shutdown.is_triggered() {
            let client = match self.database.connect().await {
                Ok(client) => Arc::new(client),
                Err(err) => {
                    self.set(Route::Nobody("the database is unreachable"), &mut following);
                    warn!(cause = %err, "groups' leadership: cannot reach the database");
                    self.nap().await;
                    continue;
                }
            };
            match self.follow(&client, &mut following).await {
                Ok(true) => {
                    following = None;
                    if let Err(err) = self.lead(client).await {
                        warn!(cause = %err, "groups' leadership lost");
                    }
                }
                Ok(false) => return,
                Err(err) => {
                    self.set(Route::Nobody("the database is unreachable"), &mut following);
                    warn!(cause = %err, "groups' leadership: database error");
                    self.nap().await;
                }
            }
        }
        let _ = self.routes.send(Route::Nobody("the store is stopping"));
    }

    async fn nap(&self) {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = self.shutdown.wait() => {}
        }
    }

    fn set(&self, route: Route, following: &mut Option<String>) {
        let address = match &route {
            Route::Leader { address, .. } => Some(address.clone()),
            _ => None,
        };
        if *following != address || address.is_none() {
            *following = address;
            let _ = self.routes.send(route);
        }
    }

    /// Tries for the lock every second, pointing calls at the recorded leader meanwhile; true
    /// once it holds the lock, false at shutdown.
    async fn follow(
        &self,
        client: &Client,
        following: &mut Option<String>,
    ) -> Result<bool, tokio_postgres::Error> {
        loop {
            if self.shutdown.is_triggered() {
                return Ok(false);
            }
            let ours: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&GROUPS_LOCK])
                .await?
                .get(0);
            if ours {
                return Ok(true);
            }
            let leader: Option<String> = client
                .query_opt(
                    "SELECT address FROM eventbus_leaders WHERE role = 'groups'",
                    &[],
                )
                .await?
                .map(|row| row.get(0));
            match leader {
                Some(address) if address != self.me => {
                    if following.as_deref() != Some(address.as_str()) {
                        match StoreClient::new(&address, self.credential.clone(), &self.trust) {
                            Ok(leader) => {
                                info!(%address, "durable groups are served by another replica");
                                self.set(
                                    Route::Leader {
                                        address,
                                        client: Box::new(leader),
                                    },
                                    following,
                                );
                            }
                            Err(err) => {
                                warn!(%address, cause = %err, "the groups' leader's address is unusable");
                                self.set(
                                    Route::Nobody("the groups' leader is unreachable"),
                                    following,
                                );
                            }
                        }
                    }
                }
                // Recorded as us, but the lock is another's: a leader that has not yet written
                // its address. Wait for it.
                _ => self.set(Route::Nobody("the groups' leader is changing"), following),
            }
            self.nap().await;
        }
    }

    /// Serves the groups while the session holding the lock lives.
    async fn lead(&self, client: Arc<Client>) -> Result<(), LogError> {
        client
            .execute(
                "INSERT INTO eventbus_leaders (role, address) VALUES ('groups', $1)
                 ON CONFLICT (role) DO UPDATE SET address = EXCLUDED.address, since = now()",
                &[&self.me],
            )
            .await
            .map_err(unavailable)?;
        let serving = Shutdown::new();
        let groups = Arc::new(
            Groups::open(
                self.engine.clone(),
                Arc::new(Table {
                    client: client.clone(),
                }),
                serving.clone(),
            )
            .await?,
        );
        info!(address = %self.me, "this replica serves the durable groups");
        let _ = self.routes.send(Route::Here(groups.clone()));
        let maintain = tokio::spawn({
            let groups = groups.clone();
            async move { groups.maintain().await }
        });
        drop(groups);
        let outcome = loop {
            tokio::select! {
                _ = self.shutdown.wait() => break Ok(()),
                _ = tokio::time::sleep(EVERY) => {}
            }
            if let Err(err) = client.simple_query("SELECT 1").await {
                break Err(unavailable(err));
            }
        };
        // Stop serving before anything else can: the session (and the lock) may be gone.
        let _ = self
            .routes
            .send(Route::Nobody("the groups' leader is changing"));
        serving.trigger();
        let _ = maintain.await;
        outcome
    }
}
