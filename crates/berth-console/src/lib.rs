//! The web console: static assets (plain HTML, CSS and ES modules written in this crate's
//! `assets/`, no build step, nothing fetched at run time) embedded at build time and served
//! under `/ui` by `berth serve`.
//!
//! Trust boundary: the console is a client of the public API like any other. It holds the
//! API key the user typed in the tab's `sessionStorage` only (never a URL, never a cookie)
//! and sends it as the `Authorization` header (the terminal's WebSocket: as a subprotocol
//! entry). The assets carry no secret and need no key. Every answer carries a strict
//! Content-Security-Policy (scripts, styles and connections from this origin only; no inline
//! script or style, no framing), `X-Content-Type-Options: nosniff`, no referrer, and
//! `Cache-Control: no-store` (a console of a newer server is never mixed with an older one).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The policy every console answer carries.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The embedded files: (name under `/ui/`, content type, bytes).
pub const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../assets/index.html"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/style.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/api.js"),
    ),
    (
        "term.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/term.js"),
    ),
    (
        "pages.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/pages.js"),
    ),
    (
        "managed.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/managed.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../assets/favicon.svg"),
    ),
];

/// The console's shell (`/ui`, `/ui/`).
pub async fn index() -> Response {
    asset("index.html")
}

/// `/ui/{file}`: an embedded file; any other path under `/ui/` is the app (its pages are `#/…`
/// routes, so a reload of a page still gets the shell).
pub async fn file(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    asset(&file)
}

/// The console's routes on their own (the server lists the same three in its route table).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{*file}", get(file))
}

fn asset(name: &str) -> Response {
    let (ctype, body) = match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ctype, body)) => (*ctype, *body),
        None => {
            let mut r = (StatusCode::NOT_FOUND, "no such console file").into_response();
            secure(&mut r);
            return r;
        }
    };
    let mut r = ([(header::CONTENT_TYPE, ctype)], body).into_response();
    secure(&mut r);
    r
}

fn secure(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The whole console, gzip-compressed as a server would send it, stays under 1 MiB.
    #[test]
    fn the_console_is_under_one_mebibyte_compressed() {
        let mut total = 0usize;
        for (name, _, body) in ASSETS {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(body).expect("gzip");
            let n = gz.finish().expect("gzip").len();
            assert!(n > 0, "{name}");
            total += n;
        }
        assert!(total < 1 << 20, "console is {total} bytes compressed");
    }

    /// No inline script or style (the CSP would refuse them), and every file the page loads
    /// is embedded.
    #[test]
    fn the_shell_loads_only_embedded_files_and_nothing_inline() {
        let html = std::str::from_utf8(
            ASSETS
                .iter()
                .find(|(n, _, _)| *n == "index.html")
                .map(|(_, _, b)| *b)
                .expect("index"),
        )
        .expect("utf-8");
        assert!(!html.contains("<style"), "inline style");
        assert!(!html.contains("style="), "inline style attribute");
        for chunk in html.split("<script").skip(1) {
            let tag = chunk.split('>').next().unwrap_or_default();
            assert!(tag.contains("src="), "inline script: <script{tag}>");
        }
        let mut loaded = 0;
        for attr in ["src=\"", "href=\""] {
            for chunk in html.split(attr).skip(1) {
                let target = chunk.split('"').next().unwrap_or_default();
                // In-page links (`#/boxes`) load nothing.
                if target.starts_with('#') {
                    continue;
                }
                let file = target.strip_prefix("/ui/").unwrap_or(target);
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == file),
                    "{target} is not embedded"
                );
                loaded += 1;
            }
        }
        assert!(loaded >= 3, "the shell loads its script, style and icon");
    }
}
