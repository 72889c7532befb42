//! The store's tables in PostgreSQL, created and migrated at start. Each migration runs once, in
//! order, in one transaction with the version it brings recorded in `eventbus_schema`; replicas
//! that start together take turns on an advisory lock. A migration, once released, is never
//! edited: a change to the schema is a new entry at the end.

use tokio_postgres::Client;

/// Taken (for the transaction) while migrating, so that replicas starting at once take turns.
const MIGRATION_LOCK: i64 = 0x6576_656e_7462_7573; // "eventbus"

/// (version, what it does, SQL). Names sort in byte order (`COLLATE "C"`), as the embedded log
/// lists them.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "channels, events, idempotency ids, snapshots",
        r#"
CREATE TABLE eventbus_channels (
    name    text COLLATE "C" PRIMARY KEY,
    -- The newest seq; appends lock this row, so seqs are contiguous whichever replica appends.
    head    bigint NOT NULL,
    -- The first seq retention keeps.
    first   bigint NOT NULL,
    -- The publisher that created the channel, for EVENTBUS_STORE_MAX_CHANNELS_PER_SOURCE.
    creator text COLLATE "C" NOT NULL,
    -- Grows when a channel is added: how groups know to list the channels again.
    number  bigserial NOT NULL
);
CREATE INDEX eventbus_channels_number ON eventbus_channels (number);
CREATE INDEX eventbus_channels_creator ON eventbus_channels (creator);

CREATE TABLE eventbus_events (
    channel text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    key     text COLLATE "C",
    deleted boolean NOT NULL,
    time_ms bigint NOT NULL,
    -- The event as served: its JSON object with "seq" first.
    json    bytea NOT NULL,
    PRIMARY KEY (channel, seq)
);
-- The compacted view: the newest event of each key.
CREATE INDEX eventbus_events_key ON eventbus_events (channel, key, seq) WHERE key IS NOT NULL;

-- The idempotency window: (channel, source, id) → the seq it was stored at. Byte order ("C")
-- everywhere: these are identifiers, and the database's locale would make every comparison of
-- its indexes a strcoll (seen: a tenth of the writer's time).
CREATE TABLE eventbus_ids (
    channel text COLLATE "C" NOT NULL,
    source  text COLLATE "C" NOT NULL,
    id      text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    time_ms bigint NOT NULL,
    PRIMARY KEY (channel, source, id)
);
CREATE INDEX eventbus_ids_time ON eventbus_ids (time_ms);

CREATE TABLE eventbus_snapshots (
    channel text COLLATE "C" PRIMARY KEY,
    seq     bigint NOT NULL,
    data    bytea NOT NULL
);
"#,
    ),
    (
        2,
        "durable groups' state, and which replica serves them",
        r#"
-- One row per durable group: its state as the serving replica last saved it.
CREATE TABLE eventbus_groups (
    name  text COLLATE "C" PRIMARY KEY,
    state bytea NOT NULL
);

-- Who holds a role (the groups' leadership), and where the other replicas reach it.
CREATE TABLE eventbus_leaders (
    role    text PRIMARY KEY,
    address text NOT NULL,
    since   timestamptz NOT NULL DEFAULT now()
);
"#,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("migrating the schema: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error(
        "the database's schema is at version {found}, newer than this eventbus knows ({known}): run a newer eventbus"
    )]
    Newer { found: i32, known: i32 },
}

/// Brings the schema up to the newest version this build knows; returns that version.
pub async fn migrate(client: &mut Client) -> Result<i32, SchemaError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS eventbus_schema (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now(),
            summary    text NOT NULL
        )",
    )
    .await?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM eventbus_schema", &[])
        .await?
        .get(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if found > known {
        return Err(SchemaError::Newer { found, known });
    }
    for (version, summary, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO eventbus_schema (version, summary) VALUES ($1, $2)",
            &[version, summary],
        )
        .await?;
        tracing::info!(version, summary, "schema migrated");
    }
    tx.commit().await?;
    Ok(known)
}
