//! PostgreSQL over TLS: managed services (RDS with `rds.force_ssl`, Cloud SQL, Azure) refuse
//! plain connections, so `sslmode=require` in `database_url` must work, and a server that
//! takes only TLS must refuse a client that asks for none.

use berth_store::testing::PgCluster;
use berth_store::*;

#[tokio::test]
async fn a_tls_only_postgres_is_reached_with_sslmode_require() {
    let mut c = PgCluster::start().expect("test PostgreSQL");
    c.restart_tls_only().expect("TLS-only restart");
    let url = c.url();
    // Plain TCP is refused by the server…
    let plain = PostgresStore::open(&format!("{url}?sslmode=disable")).await;
    assert!(plain.is_err(), "a plain connection was accepted");
    // …TLS (the certificate is self-signed: `require` encrypts without verifying it) works,
    // and the store is usable over it.
    let s = PostgresStore::open(&format!("{url}?sslmode=require"))
        .await
        .expect("open over TLS");
    s.ping().await.expect("ping over TLS");
    s.ensure_tenant("t1").await.expect("a write over TLS");
    // A client that verifies the certificate against the system's roots refuses this one.
    let verified = PostgresStore::open(&format!("{url}?sslmode=verify-full")).await;
    assert!(
        verified.is_err(),
        "an unverifiable certificate was accepted"
    );
}
