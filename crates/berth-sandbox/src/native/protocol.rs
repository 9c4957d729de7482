//! Wire protocol between the host side of the native backend and the in-box supervisor.
//!
//! One Unix stream connection per exec. Every message is a frame: a kind byte, a big-endian
//! `u32` payload length, then the payload. The host opens with one [`Frame::Request`] (JSON
//! [`ExecRequest`]); after that the host may send stdin, stdin-EOF and signal frames while the
//! supervisor sends `Started`, stdout/stderr chunks and finally exactly one `Exit` (or `Error`).
//! A request with `tty` runs on a pseudo-terminal: its output is `Stdout` only, `Stdin` is
//! typed into it, and `Resize` frames change its size.
//! A connection may instead open with `Connect` to reach a port inside the box.
//! The control socket lives outside the box's file tree, so only the host can connect.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Largest payload a frame may carry; anything larger is a protocol error.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 0,
    Stdout = 1,
    Stderr = 2,
    Exit = 3,
    Stdin = 4,
    StdinEof = 5,
    Signal = 6,
    Started = 7,
    Error = 8,
    /// Host → supervisor, first frame instead of `Request`: connect to this loopback port in
    /// the box (payload: the port as text). Answered with `Started` (then the connection
    /// carries raw bytes both ways) or `Error`.
    Connect = 9,
    /// Host → supervisor during a terminal exec: the terminal's new size (JSON
    /// [`crate::TtySize`]).
    Resize = 10,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Request,
            1 => Kind::Stdout,
            2 => Kind::Stderr,
            3 => Kind::Exit,
            4 => Kind::Stdin,
            5 => Kind::StdinEof,
            6 => Kind::Signal,
            7 => Kind::Started,
            8 => Kind::Error,
            9 => Kind::Connect,
            10 => Kind::Resize,
            _ => return None,
        })
    }
}

/// What the host asks the supervisor to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub cwd: String,
    pub env: Vec<(String, String)>,
    /// uid (and gid) inside the box; the supervisor refuses 0.
    pub uid: u32,
    /// Paths (inside the box) the process may write beneath; everything else is read-only.
    pub writable: Vec<String>,
    pub timeout_ms: Option<u64>,
    /// Run on a pseudo-terminal of this size, opened by the supervisor inside the box.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<crate::TtySize>,
}

/// How a process ended, as seen from inside the box.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

pub fn write_frame<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

pub fn read_frame<R: Read>(r: &mut R) -> io::Result<(Kind, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let (kind, len) = parse_head(head)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok((kind, buf))
}

pub fn parse_head(head: [u8; 5]) -> io::Result<(Kind, usize)> {
    let kind = Kind::from_u8(head[0])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown frame kind"))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    Ok((kind, len))
}

/// Async counterparts used by the host side.
pub mod aio {
    use super::{parse_head, Kind};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub async fn write_frame<W: AsyncWrite + Unpin>(
        w: &mut W,
        kind: Kind,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large")
        })?;
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind as u8);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(payload);
        w.write_all(&buf).await?;
        w.flush().await
    }

    pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(Kind, Vec<u8>)> {
        let mut head = [0u8; 5];
        r.read_exact(&mut head).await?;
        let (kind, len) = parse_head(head)?;
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).await?;
        Ok((kind, buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").expect("write");
        let (k, p) = read_frame(&mut buf.as_slice()).expect("read");
        assert_eq!(k, Kind::Stdout);
        assert_eq!(p, b"hello");
        let bad = [42u8, 0, 0, 0, 0];
        assert!(read_frame(&mut bad.as_slice()).is_err());
        let huge = [1u8, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut huge.as_slice()).is_err());
    }
}
