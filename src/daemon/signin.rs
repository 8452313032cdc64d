//! The node's side of joining by signing in with the identity provider
//! (`tailgate up --login-server URL`, issue 13): learning the control
//! server's key, and showing the sign-in URL while the node waits.
#![warn(missing_docs)]

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::control::ControlTarget;
use crate::control::transport::{ControlUrl, dial};
use crate::dataplane::wg;

/// The control server at `url`, with its Noise key: `pinned` if given
/// (`--login-server-key`), else as the server itself reports it at
/// `GET /tailgate/key`. That answer is trusted on first use, like an SSH
/// host key: it is saved with the state and pinned from then on.
pub(crate) async fn target_for(url: &str, pinned: Option<&str>, ca_pem: Option<&str>) -> Result<ControlTarget> {
    let url = url.trim_end_matches('/').to_string();
    let parsed = ControlUrl::parse(&url).map_err(|e| anyhow::anyhow!("--login-server: {e}"))?;
    let ca = ca_pem.map(str::to_string);
    if let Some(k) = pinned {
        let server_public = wg::key_from_base64(k.trim()).context("--login-server-key is not a base64 WireGuard-style key")?;
        return Ok(ControlTarget { url, server_public, ca_pem: ca });
    }
    let fetch = async {
        let mut s = dial(&url, ca_pem, Duration::from_secs(15)).await.map_err(std::io::Error::other)?;
        let hosthdr = parsed.host_header();
        s.write_all(format!("GET /tailgate/key HTTP/1.1\r\nHost: {hosthdr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        // A key is 45 bytes; anything much longer is not our server.
        s.take(4096).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(15), fetch)
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach the control server at {url}: timed out"))?
        .with_context(|| format!("cannot reach the control server at {url}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{url} did not give its key at /tailgate/key; is it a tailgate control server?");
    }
    let server_public = wg::key_from_base64(body.trim()).with_context(|| format!("{url} sent a malformed server key"))?;
    Ok(ControlTarget { url, server_public, ca_pem: ca })
}

/// Only a plain http(s) URL is shown: the server is trusted, but nothing it
/// sends gets to drive the terminal.
fn printable(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && url.len() <= 2048 && !url.chars().any(|c| c.is_control())
}

/// Prints each sign-in URL the server sends ("To sign in, visit: URL") and,
/// when stderr is a terminal, a spinner until [`Prompt::done`].
pub(crate) struct Prompt {
    pub urls: mpsc::UnboundedSender<String>,
    waiting: Arc<AtomicBool>,
}

impl Prompt {
    pub(crate) fn start() -> Prompt {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let waiting = Arc::new(AtomicBool::new(true));
        let spinning = Arc::new(AtomicBool::new(false));
        let (w, sp) = (waiting.clone(), spinning.clone());
        tokio::spawn(async move {
            while let Some(url) = rx.recv().await {
                if !printable(&url) {
                    tracing::warn!("the control server sent a sign-in URL that is not a plain http(s) URL; not shown");
                    continue;
                }
                eprintln!("\nTo sign in, visit:\n\n\t{url}\n");
                tracing::info!("waiting for a sign-in at {url}");
                if std::io::stderr().is_terminal() && !sp.swap(true, Ordering::SeqCst) {
                    tokio::spawn(spin(w.clone()));
                }
            }
        });
        Prompt { urls: tx, waiting }
    }

    /// The wait is over (signed in, refused, or given up).
    pub(crate) fn done(&self) {
        self.waiting.store(false, Ordering::SeqCst);
    }
}

async fn spin(waiting: Arc<AtomicBool>) {
    const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
    let mut i = 0;
    while waiting.load(Ordering::SeqCst) {
        eprint!("\r{} waiting for you to sign in...", FRAMES[i % FRAMES.len()]);
        let _ = std::io::stderr().flush();
        i += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eprint!("\r\x1b[K");
}
