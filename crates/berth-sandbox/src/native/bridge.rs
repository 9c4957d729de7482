//! The box side of the loopback bridges, in the supervisor: a TCP listener on `127.0.0.1:PORT`
//! inside the box per bridged port, each connection spliced to the Unix socket the host placed
//! in `/run/berth` for it. Every connection begins with its port, two bytes big-endian
//! ([`preface`]): the host may then serve all of a box's ports on one socket (the server
//! does, to hold one descriptor per box for them, not one per port).

use super::Bridge;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

/// One bridged port's listener in the box and the host socket it leads to.
pub(super) struct Listening {
    pub listener: TcpListener,
    pub port: u16,
    pub target: String,
}

/// What a bridged connection to `port` begins with on the host's socket.
pub fn preface(port: u16) -> [u8; 2] {
    port.to_be_bytes()
}

/// Listen on each bridge's port in the box's loopback (a port that cannot be bound is left
/// out, and said so on the box's log).
pub(super) fn listen(bridges: Vec<Bridge>) -> Vec<Listening> {
    bridges
        .into_iter()
        .filter_map(|b| match TcpListener::bind(("127.0.0.1", b.port)) {
            Ok(listener) => Some(Listening {
                listener,
                port: b.port,
                target: format!("/run/berth/{}", b.socket),
            }),
            Err(e) => {
                eprintln!("berth-supervisor: bridge port {}: {e}", b.port);
                None
            }
        })
        .collect()
}

/// Accept one connection on a bridge's (non-blocking) listener and splice it, with its
/// preface, to the host's socket in a thread of its own.
pub(super) fn accept_bridge(b: &Listening) {
    let tcp = match b.listener.accept() {
        Ok((tcp, _)) => tcp,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
        Err(_) => {
            // Out of descriptors, say: the socket stays readable, so do not spin on it.
            thread::sleep(Duration::from_millis(10));
            return;
        }
    };
    if tcp.set_nonblocking(false).is_err() {
        return;
    }
    let (target, port) = (b.target.clone(), b.port);
    let _ = thread::Builder::new().spawn(move || {
        if let Ok(mut unix) = UnixStream::connect(&target) {
            if unix.write_all(&preface(port)).is_ok() {
                splice(tcp, unix);
            }
        }
    });
}

/// Copy both ways until each side has ended, passing on each half-close.
pub(super) fn splice(tcp: TcpStream, unix: UnixStream) {
    let (Ok(mut tcp_r), Ok(mut unix_w)) = (tcp.try_clone(), unix.try_clone()) else {
        return;
    };
    let Ok(up) = thread::Builder::new().spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(std::net::Shutdown::Write);
    }) else {
        return;
    };
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    let _ = io::copy(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}
