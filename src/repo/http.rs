//! A repository read over HTTP(S) from any static web server: every file is fetched by name,
//! so no directory listing is needed. Transient failures (dropped connections, 5xx, stalls)
//! are retried with backoff, so a flaky network slows a restore down instead of failing it.
//! Transfers time out on inactivity, never on total duration: a thin but working link (a
//! branch office's WAN) finishes, however long a 4 MiB chunk takes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::Certificate;
use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};

use super::backend::{RepoRead, check_chunk_size};
use super::chunk::{Digest, MAX_STORED_CHUNK};
use super::paths;

const ATTEMPTS: u32 = 6;
/// A stalled server is retried less often than a dropped connection: each try costs an idle
/// timeout.
const STALL_ATTEMPTS: u32 = 3;
/// Seconds without data from the server before a transfer is given up (then retried).
pub const DEFAULT_IDLE_TIMEOUT: u64 = 30;
/// A server sending less than this per idle timeout is stalled too (a trickle of a byte a
/// second would otherwise hold a restore for weeks).
const MIN_BYTES_PER_WINDOW: u64 = 1024;

pub struct HttpRepo {
    base: String,
    /// host[:port] for messages (no credentials, no path).
    server: String,
    idle: Duration,
    client: Client,
}

/// Why a body could not be read.
enum BodyError {
    /// Larger than the cap: not retried.
    TooBig,
    /// No (or too little) data for an idle timeout.
    Stalled(String),
    Dropped(std::io::Error),
}

fn is_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|i| i.downcast_ref::<reqwest::Error>())
            .is_some_and(|r| r.is_timeout())
}

static CA_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Trust these CA certificates (PEM files, from `--ca` or `bmr.ca=`) for every later client.
pub fn add_ca_files(files: Vec<PathBuf>) {
    if let Ok(mut v) = CA_FILES.lock() {
        v.extend(files);
    }
}

/// System bundles on common distributions; the rescue system has none.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];

/// Trust roots: Mozilla's (built in, so an initramfs without a CA store works), the system
/// bundle where there is one, and the operator's own CA files.
fn trust_roots() -> Result<Vec<Certificate>> {
    let mut roots = Vec::new();
    for der in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        if let Ok(c) = Certificate::from_der(der.as_ref()) {
            roots.push(c);
        }
    }
    for b in SYSTEM_BUNDLES {
        if let Ok(pem) = std::fs::read(b) {
            roots.extend(Certificate::from_pem_bundle(&pem).unwrap_or_default());
            break;
        }
    }
    let files = CA_FILES.lock().map(|v| v.clone()).unwrap_or_default();
    for f in &files {
        let pem = std::fs::read(f)
            .with_context(|| format!("cannot read CA file {}: check --ca / bmr.ca", f.display()))?;
        let certs = Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty());
        let Some(certs) = certs else {
            bail!(
                "CA file {} holds no PEM certificate: give a PEM file (-----BEGIN CERTIFICATE-----)",
                f.display()
            );
        };
        roots.extend(certs);
    }
    Ok(roots)
}

/// An error with its causes: reqwest hides the useful part (refused, certificate) in sources.
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The inactivity timeout: `BMR_HTTP_IDLE_TIMEOUT` (seconds) or [`DEFAULT_IDLE_TIMEOUT`].
pub fn idle_timeout() -> Result<Duration> {
    match std::env::var("BMR_HTTP_IDLE_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(DEFAULT_IDLE_TIMEOUT)),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
            .map(Duration::from_secs_f64)
            .with_context(|| {
                format!("BMR_HTTP_IDLE_TIMEOUT={v:?} is not a number of seconds (0 < N <= 86400)")
            }),
    }
}

/// The HTTP client bmr uses everywhere (repositories, rescue reports).
pub fn client() -> Result<Client> {
    Client::builder()
        .connect_timeout(Duration::from_secs(10))
        // reqwest's blocking timeout bounds each wait (for the response head, for each read
        // of the body), not the whole transfer: it is the inactivity timeout.
        .timeout(idle_timeout()?)
        .user_agent(concat!("bmr/", env!("CARGO_PKG_VERSION")))
        .tls_certs_only(trust_roots()?)
        .build()
        .context("cannot set up the HTTP client")
}

impl HttpRepo {
    pub fn open(url: &str) -> Result<HttpRepo> {
        let client = client()?;
        let server = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| {
                u.host_str()
                    .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
            })
            .unwrap_or_else(|| "the server".into());
        let repo = HttpRepo {
            base: url.trim_end_matches('/').to_string(),
            server,
            idle: idle_timeout()?,
            client,
        };
        super::check_config(&repo)?;
        Ok(repo)
    }

    /// GET or HEAD with retries; Ok(None) on 404.
    fn request(&self, rel: &str, head: bool) -> Result<Option<Response>> {
        let url = format!("{}/{rel}", self.base);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(250 << attempt.min(5)));
            }
            let req = if head {
                self.client.head(&url)
            } else {
                self.client.get(&url)
            };
            match req.send() {
                Ok(r) if r.status() == StatusCode::NOT_FOUND => return Ok(None),
                Ok(r) if r.status().is_success() => return Ok(Some(r)),
                Ok(r)
                    if r.status().is_server_error()
                        || r.status() == StatusCode::TOO_MANY_REQUESTS =>
                {
                    last = format!("HTTP {}", r.status());
                }
                Ok(r) => bail!(
                    "{url}: HTTP {}: check the repository URL and the server",
                    r.status()
                ),
                Err(e) if e.is_timeout() => {
                    last = self.no_data();
                }
                Err(e) => {
                    last = describe(&e);
                    // Retrying cannot fix a certificate the client does not trust.
                    if last.contains("certificate") {
                        bail!(
                            "{url}: TLS certificate not trusted ({last}): pass the server's CA with --ca FILE (bmr.ca= in the rescue system)"
                        );
                    }
                }
            }
        }
        bail!(
            "cannot fetch {url} after {ATTEMPTS} attempts ({last}): check the network and the server"
        )
    }

    fn no_data(&self) -> String {
        format!(
            "no data from {} for {} s",
            self.server,
            self.idle.as_secs_f64()
        )
    }

    /// Read a body into `body`, at most `max` bytes, giving up when the server sends nothing
    /// (or next to nothing) for an idle timeout.
    fn read_body(&self, r: &mut Response, max: u64, body: &mut Vec<u8>) -> Result<(), BodyError> {
        use std::io::Read;
        let mut window = std::time::Instant::now();
        let mut in_window = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if is_timeout(&e) => return Err(BodyError::Stalled(self.no_data())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BodyError::Dropped(e)),
            };
            if body.len() as u64 + n as u64 > max {
                return Err(BodyError::TooBig);
            }
            body.extend_from_slice(&buf[..n]);
            in_window += n as u64;
            if window.elapsed() >= self.idle {
                if in_window < MIN_BYTES_PER_WINDOW {
                    return Err(BodyError::Stalled(format!(
                        "only {in_window} bytes from {} in {} s",
                        self.server,
                        self.idle.as_secs_f64()
                    )));
                }
                window = std::time::Instant::now();
                in_window = 0;
            }
        }
    }

    /// GET a whole file, refusing a body larger than `max` before it is read (by its
    /// Content-Length, and by counting: a server may send more than it declared, or no length).
    fn get(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let url = format!("{}/{rel}", self.base);
        let too_big = |n: Option<u64>| {
            anyhow::anyhow!(
                "{url} is {}, more than bmr accepts for this file ({max} bytes): the repository is damaged or the URL is wrong",
                n.map_or_else(
                    || format!("more than {max} bytes"),
                    |n| format!("{n} bytes")
                )
            )
        };
        // The body can fail mid-transfer too: retry the whole request then.
        let (mut dropped, mut stalled) = (0u32, 0u32);
        let mut last = String::new();
        while dropped < ATTEMPTS && stalled < STALL_ATTEMPTS {
            if dropped + stalled > 0 {
                std::thread::sleep(Duration::from_millis(250 << (dropped + stalled).min(5)));
            }
            let Some(mut r) = self.request(rel, false)? else {
                return Ok(None);
            };
            if let Some(n) = r.content_length()
                && n > max
            {
                return Err(too_big(Some(n)));
            }
            // Capacity from the declared length only up to the cap (checked above).
            let mut body = Vec::with_capacity(r.content_length().unwrap_or(0) as usize);
            match self.read_body(&mut r, max, &mut body) {
                Ok(()) => return Ok(Some(body)),
                Err(BodyError::TooBig) => return Err(too_big(None)),
                Err(BodyError::Stalled(why)) => {
                    stalled += 1;
                    last = why;
                }
                Err(BodyError::Dropped(e)) => {
                    dropped += 1;
                    last = format!("the connection keeps dropping ({e})");
                }
            }
        }
        bail!(
            "cannot download {url}: {last} ({} attempts): check the network and the server, or raise BMR_HTTP_IDLE_TIMEOUT for a slow link",
            dropped + stalled
        )
    }
}

impl RepoRead for HttpRepo {
    fn location(&self) -> String {
        self.base.clone()
    }

    fn read_file(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>> {
        self.get(rel, max)
    }

    fn read_chunk_into(&self, d: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self
            .get(&paths::chunk(d), MAX_STORED_CHUNK)
            .and_then(|b| b.with_context(|| format!("chunk {d} is missing from {}", self.base)))
            .or_else(|e| {
                // Name the limit the format sets, not the HTTP detail, for an oversized chunk.
                if let Ok(Some(n)) = self.chunk_len(d) {
                    check_chunk_size(d, n, &self.base)?;
                }
                Err(e)
            })?;
        Ok(())
    }

    fn chunk_len(&self, d: &Digest) -> Result<Option<u64>> {
        // The header itself: a HEAD response has no body for reqwest to measure.
        Ok(self.request(&paths::chunk(d), true)?.and_then(|r| {
            r.headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        }))
    }

    fn local_path(&self) -> Option<&Path> {
        None
    }
}
