//! Name lookups in the egress proxy are bounded per box and overall, and time out; host names
//! are matched in one normalised form (case, a trailing dot).

use berth_gateway::conn::Incoming;
use berth_gateway::egress::{DnsLimits, Egress, EgressConfig, Resolver, Secret};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send `head` to a box's proxy socket; the whole answer (the proxy closes after it).
async fn ask(sock: &std::path::Path, head: String) -> String {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("answered within 10 s")
        .expect("read");
    out
}

fn connect(host: &str) -> String {
    format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n")
}

/// A resolver whose `hang*` names never answer (until released) and whose other names answer
/// at once with a loopback address (refused later as not globally reachable).
struct Fake {
    hanging: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
}

fn fake() -> (Fake, Resolver) {
    let hanging = Arc::new(AtomicUsize::new(0));
    let (release, rx) = tokio::sync::watch::channel(false);
    let h = hanging.clone();
    let resolver = Resolver::new(move |host: String, port: u16| {
        let (h, mut rx) = (h.clone(), rx.clone());
        async move {
            if host.starts_with("hang") {
                h.fetch_add(1, Ordering::SeqCst);
                let _ = rx.wait_for(|r| *r).await;
                h.fetch_sub(1, Ordering::SeqCst);
                return Err(std::io::Error::other("released"));
            }
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        }
    });
    (Fake { hanging, release }, resolver)
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn lookups_are_capped_per_box_and_overall_and_time_out() {
    let (fake, resolver) = fake();
    let (egress, _decisions) = Egress::new(EgressConfig {
        dns: DnsLimits {
            per_box: 4,
            global: 6,
            timeout: Duration::from_secs(2),
        },
        resolver,
        ..Default::default()
    })
    .expect("egress");
    let dir = tempfile::tempdir().expect("tmp");
    let mut socks = Vec::new();
    let mut tasks = Vec::new();
    for b in ["a", "b", "c"] {
        let sock = dir.path().join(format!("{b}.sock"));
        tasks.push(egress.serve_box(
            b,
            vec!["*.test".into()],
            vec![],
            Incoming::bind(&sock).expect("bind"),
        ));
        socks.push(sock);
    }
    // Box a asks for five names that never resolve: four lookups run, the fifth waits.
    let t0 = Instant::now();
    let a: Vec<_> = (0..5)
        .map(|i| {
            tokio::spawn(ask_owned(
                socks[0].clone(),
                connect(&format!("hang{i}.test")),
            ))
        })
        .collect();
    until("box a's four lookups run", || {
        fake.hanging.load(Ordering::SeqCst) == 4
    })
    .await;
    // Box c's lookup proceeds meanwhile (it is answered by what the name resolved to).
    let t = Instant::now();
    let c = ask(&socks[2], connect("fine.test")).await;
    assert!(c.starts_with("HTTP/1.1 403"), "{c}");
    assert!(c.contains("not globally reachable"), "{c}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(
        fake.hanging.load(Ordering::SeqCst),
        4,
        "box a's fifth lookup did not start"
    );
    // Box b's four hanging lookups meet the global cap of six.
    let b: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(ask_owned(
                socks[1].clone(),
                connect(&format!("hang-b{i}.test")),
            ))
        })
        .collect();
    until("box b's lookups reach the global cap", || {
        fake.hanging.load(Ordering::SeqCst) == 6
    })
    .await;
    // Every one of them is refused with a 502 at the timeout, none hangs.
    for r in a.into_iter().chain(b) {
        let out = r.await.expect("task");
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
        assert!(out.contains("timed out"), "{out}");
    }
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert_eq!(fake.hanging.load(Ordering::SeqCst), 6, "never more than 6");
    // Once the resolver answers, the slots come back.
    let _ = fake.release.send(true);
    until("lookups finished", || {
        fake.hanging.load(Ordering::SeqCst) == 0
    })
    .await;
    let _ = fake.release.send(false);
    let c = ask(&socks[0], connect("fine.test")).await;
    assert!(c.starts_with("HTTP/1.1 403"), "box a resolves again: {c}");
    for t in tasks {
        t.abort();
    }
}

async fn ask_owned(sock: std::path::PathBuf, head: String) -> String {
    ask(&sock, head).await
}

/// `API.Test.` is the same host as `api.test`: the override maps it and its secret goes with it.
#[tokio::test]
async fn a_trailing_dot_or_capitals_name_the_same_host() {
    // An upstream that answers with the headers it got.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = String::from_utf8_lossy(&got).to_string();
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let (egress, _decisions) = Egress::new(EgressConfig {
        overrides: HashMap::from([("Api.Test".to_string(), up)]),
        ..Default::default()
    })
    .expect("egress");
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("p.sock");
    let task = egress.serve_box(
        "a",
        vec!["api.test".into()],
        vec![Secret {
            host: "api.test".into(),
            header: "x-key".into(),
            value: "s3cret".into(),
            tls: false,
        }],
        Incoming::bind(&sock).expect("bind"),
    );
    let port = up.port();
    for host in ["API.Test.", "api.test", "Api.TEST."] {
        let out = ask(
            &sock,
            format!("GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{host}: {out}");
        assert!(out.contains("x-key: s3cret"), "{host}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains(&format!("host: api.test:{port}")),
            "{host}: {out}"
        );
    }
    let out = ask(
        &sock,
        format!("GET http://api.test..:{port}/x HTTP/1.1\r\nHost: api.test..:{port}\r\n\r\n"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    task.abort();
}
