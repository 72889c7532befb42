//! The store's connections to PostgreSQL over TLS, as the URL's `sslmode` asks: verified against
//! the CA named by `sslrootcert` or trusted with `--ca-file`, refused (saying why) when the
//! server's certificate cannot be verified, and plain as before without `sslmode`. The server
//! itself says which of the store's sessions are encrypted (`pg_stat_ssl`).

use bytes::Bytes;
use eventbus_runtime::tls::Trust;
use eventbus_store::Engine;
use eventbus_store::log::{Entry, LogError};
use eventbus_store::postgres::{Options, Postgres};
use eventbus_testkit::postgres::Postgres as Server;
use eventbus_testkit::tls::TestCa;

async fn open(options: Options) -> Result<Postgres, LogError> {
    Postgres::open(options).await.map(|(pg, _committed)| pg)
}

/// Appends one event and reads it back: the connection really carries the log.
async fn round_trip(pg: &Postgres, id: &str) {
    let appended = pg
        .append(vec![Entry {
            channel: "tls.c".into(),
            id: id.into(),
            source: "svc".into(),
            key: None,
            deleted: false,
            body: Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
        }])
        .await
        .expect("append");
    let read = pg
        .read("tls.c", appended[0].seq - 1, 1, false)
        .await
        .expect("read");
    assert_eq!(read.events.len(), 1);
}

/// The store's sessions the server sees, as (encrypted, count).
fn sessions(server: &Server) -> String {
    server.sql(
        "SELECT s.ssl, count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'eventbus-store' GROUP BY s.ssl ORDER BY s.ssl",
    )
}

#[tokio::test]
async fn the_log_reaches_postgres_over_verified_tls_and_only_so() {
    let server = Server::primary().await;
    let ca = TestCa::new();
    server.serve_tls(&ca).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path());

    // The CA named in the URL, libpq's way.
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server.url(),
        ca_file.display()
    );
    let pg = open(Options::new(url)).await.expect("open over TLS");
    round_trip(&pg, "a").await;
    assert_eq!(sessions(&server).trim(), "t|2", "the writer and a reader");
    drop(pg);

    // The CA trusted by the whole bus instead (--ca-file / SSL_CERT_FILE).
    let pg = open(Options {
        trust: Trust::with_ca_file(Some(ca_file.clone())),
        ..Options::new(format!("{}?sslmode=require", server.url()))
    })
    .await
    .expect("open over TLS with the bus's trust");
    round_trip(&pg, "b").await;
    drop(pg);

    // A server whose certificate nothing vouches for: no connection, and the error says why.
    let refused = open(Options::new(format!("{}?sslmode=require", server.url())))
        .await
        .err()
        .expect("an unverifiable server is refused");
    assert!(
        refused.to_string().contains("certificate"),
        "says why: {refused}"
    );
    // A CA file that is not one: refused before any connection.
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").expect("write");
    let refused = open(Options::new(format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server.url(),
        bogus.display()
    )))
    .await
    .err()
    .expect("a bad sslrootcert is refused");
    assert!(refused.to_string().contains("sslrootcert"), "{refused}");

    // No sslmode: plain, as before.
    let pg = open(Options::new(server.url())).await.expect("open plain");
    round_trip(&pg, "c").await;
    assert!(sessions(&server).contains("f|"), "{}", sessions(&server));
}
