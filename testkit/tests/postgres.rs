//! The PostgreSQL the store's tests will run on, from Debian's package: a primary and a
//! synchronous standby, as the operators' guide recommends. Every commit the primary acknowledged
//! is on the standby when the primary is killed with -9; promoted, the standby takes writes, and a
//! multi-host URL with `target_session_attrs=read-write` finds it.

use eventbus_testkit::postgres::{Postgres, USER};

#[tokio::test]
async fn a_synchronous_standby_holds_every_acknowledged_commit_when_the_primary_dies() {
    let mut primary = Postgres::primary().await;
    let standby = Postgres::standby(&primary, true).await;
    primary.sql("CREATE TABLE acknowledged (n integer PRIMARY KEY)");
    // Each statement its own transaction: psql returns once the commit is acknowledged.
    for n in 0..50 {
        primary.sql(&format!("INSERT INTO acknowledged VALUES ({n})"));
    }
    let url = format!(
        "postgres://{USER}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=2",
        primary.port, standby.port
    );
    assert_eq!(
        Postgres::sql_at(&url, "SELECT count(*) FROM acknowledged").trim(),
        "50"
    );
    primary.kill();
    standby.promote().await;
    assert_eq!(
        Postgres::sql_at(&url, "SELECT count(*) FROM acknowledged").trim(),
        "50",
        "an acknowledged commit is missing after the failover"
    );
    Postgres::sql_at(&url, "INSERT INTO acknowledged VALUES (50)");
    assert_eq!(standby.sql("SELECT max(n) FROM acknowledged").trim(), "50");
}
