//! `berth shell BOX`: an interactive shell in a box, over `GET /v1/boxes/{id}/pty`.
//!
//! On a terminal, the local terminal is put in raw mode (restored however the command ends)
//! and its size is sent at the start and on every SIGWINCH. Without one (stdin a pipe), the
//! bytes are relayed as they are and the end of stdin is typed as `^D`. Exits with the
//! shell's exit status (128 + signal when a signal ended it).
//!
//! An `https://` server is reached over `wss://`, checked against the built-in web roots, or
//! against the PEM certificates in the file `BERTH_CA_CERT` names instead (a server behind a
//! TLS terminator with a private CA).

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use nix::sys::termios;
use std::io::Write;
use std::os::fd::AsFd;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args)]
pub struct ShellArgs {
    /// Box id (`box-…`).
    pub box_id: String,
    #[command(flatten)]
    pub conn: super::Conn,
}

/// The local terminal, back in its own mode when dropped.
struct RawMode {
    saved: termios::Termios,
}

impl RawMode {
    /// Raw mode on stdin when it is a terminal; `None` otherwise.
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &self.saved);
    }
}

/// The local terminal's size (columns, rows), if stdout is one.
fn local_size() -> Option<(u16, u16)> {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into our local.
    let r = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

fn resize(cols: u16, rows: u16) -> Message {
    Message::Text(
        serde_json::json!({"type": "resize", "cols": cols, "rows": rows})
            .to_string()
            .into(),
    )
}

/// The TLS set-up for `wss://`: `None` is tungstenite's own (the built-in web roots); with
/// `BERTH_CA_CERT`, exactly the CA certificates in that PEM file.
fn tls() -> Result<Option<tokio_tungstenite::Connector>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let Some(path) = std::env::var_os("BERTH_CA_CERT") else {
        return Ok(None);
    };
    let shown = std::path::Path::new(&path).display().to_string();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path)
        .with_context(|| format!("BERTH_CA_CERT: reading {shown}"))?
    {
        let cert = cert.with_context(|| format!("BERTH_CA_CERT: a certificate in {shown}"))?;
        roots
            .add(cert)
            .with_context(|| format!("BERTH_CA_CERT: a certificate in {shown}"))?;
    }
    if roots.is_empty() {
        bail!("BERTH_CA_CERT: no certificate in {shown}");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_tungstenite::Connector::Rustls(
        std::sync::Arc::new(config),
    )))
}

/// Run the shell; the process exits with the shell's status when it is not 0.
pub async fn run(c: berth_client::Client, a: ShellArgs) -> Result<()> {
    let (cols, rows) = local_size().unwrap_or((80, 24));
    let base = c.base();
    let ws_base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        bail!("server URL {base} is neither http:// nor https://")
    };
    let url = format!(
        "{ws_base}/v1/boxes/{}/pty?cols={cols}&rows={rows}",
        a.box_id
    );
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", c.token())
            .parse()
            .context("the API key is not a valid header value")?,
    );
    let connector = if ws_base.starts_with("wss://") {
        tls()?
    } else {
        None
    };
    let (ws, _) =
        match tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| body.to_string());
                bail!("{} ({})", msg, resp.status())
            }
            Err(e) => return Err(e).context("opening the terminal"),
        };
    let (mut sink, mut stream) = ws.split();
    let raw = RawMode::enter();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 16 << 10];
    let mut stdin_open = true;
    let mut code: Option<i32> = None;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                let frame = match n {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        // The end of piped input is the end of the shell's input too.
                        vec![4u8]
                    }
                    Ok(n) => buf[..n].to_vec(),
                };
                if sink.send(Message::Binary(frame.into())).await.is_err() {
                    break;
                }
            }
            _ = winch.recv() => {
                if let Some((cols, rows)) = local_size() {
                    if sink.send(resize(cols, rows)).await.is_err() {
                        break;
                    }
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("exit") => {
                            code = Some(match (v["code"].as_i64(), v["signal"].as_i64()) {
                                (Some(c), _) => c as i32,
                                (None, Some(s)) => 128 + s as i32,
                                (None, None) => 1,
                            });
                        }
                        Some("error") => {
                            drop(raw);
                            bail!("terminal: {}", v["message"].as_str().unwrap_or("failed"));
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    if code.is_none() {
                        if let Some(f) = frame {
                            drop(raw);
                            bail!("the server closed the terminal: {}", f.reason);
                        }
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(raw);
                    return Err(e).context("terminal connection");
                }
                None => break,
            },
        }
    }
    drop(raw);
    match code {
        Some(0) => Ok(()),
        Some(c) => std::process::exit(c),
        None => bail!("the terminal closed before the shell ended"),
    }
}
