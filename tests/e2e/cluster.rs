//! Warren's side of a cluster, one process at a time: a broker node that is
//! gone is passed over, and a pool follows the primary when its host goes
//! away. The whole cluster (three RabbitMQ nodes, a promoted standby,
//! partitions) is `scripts/chaos.sh`, which CI runs after these.

use sea_orm::{ConnectionTrait, Statement};
use secrecy::{ExposeSecret, SecretString};
use std::{net::SocketAddr, time::Duration};
use warren_shared::{broker, db, settings::DatabaseSettings};
use warren_tests::{Proxy, TestEnv, wait_until};

/// A loopback port nothing listens on: a node that is down.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_dead_broker_node_in_the_url_is_passed_over() {
    let env = TestEnv::new().await;
    let settings = env.settings();
    let live = settings.amqp.url.expose_secret();
    let url = SecretString::from(format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f;{live}",
        dead_port()
    ));
    // Each connection starts at a node picked by the clock: eight in a row
    // start at the dead one about half the time, and every one connects.
    for _ in 0..8 {
        let conn = broker::connect(&url, "cluster-test", Duration::from_secs(5))
            .await
            .expect("the live node answers");
        assert!(conn.status().connected());
        conn.close(200, "done".into()).await.unwrap();
    }
    let only_dead = SecretString::from(format!("amqp://guest:guest@127.0.0.1:{}/%2f", dead_port()));
    assert!(
        broker::connect(&only_dead, "cluster-test", Duration::from_secs(5))
            .await
            .is_err(),
        "with no live node, connecting fails"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_follows_the_primary_when_its_host_goes_away() {
    let env = TestEnv::new().await;
    let url = env.database_url();
    // postgres://user@host:port/db → the server's address and the rest.
    let (head, tail) = url.split_once('@').unwrap();
    let (server, db_name) = tail.split_once('/').unwrap();
    let server: SocketAddr = server.replace("localhost", "127.0.0.1").parse().unwrap();
    // The first host is a proxy to the same server: the pool is built on
    // it (it answers, and is a primary), then it goes away.
    let proxy = Proxy::start(server).await;
    let settings = DatabaseSettings {
        url: SecretString::from(format!(
            "{head}@{},{server}/{db_name}?target_session_attrs=read-write",
            proxy.addr()
        )),
        max_connections: 2,
        connect_timeout_seconds: 2.0,
        migrate_on_start: false,
    };
    let pool = db::connect(&settings, "cluster-test").await.unwrap();
    let one = || async {
        pool.query_one_raw(Statement::from_string(
            pool.get_database_backend(),
            "SELECT 1 AS one",
        ))
        .await
    };
    one().await.expect("through the first host");
    proxy.set_up(false);
    // Without the watcher every statement would fail from now on: the pool
    // would keep dialling the proxy, which refuses.
    wait_until(
        "a statement to succeed on the second host",
        Duration::from_secs(15),
        || async { one().await.ok().flatten() },
    )
    .await;
    pool.close().await.unwrap();
}
