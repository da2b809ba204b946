//! A repository read over HTTP(S) from any static web server: every file is fetched by name,
//! so no directory listing is needed. Transient failures (dropped connections, 5xx, timeouts)
//! are retried with backoff, so a flaky network slows a restore down instead of failing it.

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
/// Largest metadata file (manifest, chunk index, file list) fetched into memory: a file list
/// of ten million entries fits.
const MAX_METADATA: u64 = 1 << 30;

pub struct HttpRepo {
    base: String,
    client: Client,
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

/// The HTTP client bmr uses everywhere (repositories, rescue reports).
pub fn client() -> Result<Client> {
    Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(120))
        .user_agent(concat!("bmr/", env!("CARGO_PKG_VERSION")))
        .tls_certs_only(trust_roots()?)
        .build()
        .context("cannot set up the HTTP client")
}

impl HttpRepo {
    pub fn open(url: &str) -> Result<HttpRepo> {
        let client = client()?;
        let repo = HttpRepo {
            base: url.trim_end_matches('/').to_string(),
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

    /// GET a whole file, refusing a body larger than `max` before it is read.
    fn get(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let url = format!("{}/{rel}", self.base);
        // The body can fail mid-transfer too: retry the whole request then.
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let Some(r) = self.request(rel, false)? else {
                return Ok(None);
            };
            if let Some(n) = r.content_length()
                && n > max
            {
                bail!(
                    "{url} is {n} bytes, more than bmr accepts for it ({max}): check the repository URL"
                );
            }
            let mut body = Vec::with_capacity(r.content_length().unwrap_or(0) as usize);
            use std::io::Read;
            match r.take(max + 1).read_to_end(&mut body) {
                Ok(_) if body.len() as u64 > max => bail!(
                    "{url} is more than {max} bytes, more than bmr accepts for it: check the repository URL"
                ),
                Ok(_) => return Ok(Some(body)),
                Err(e) => last = Some(e),
            }
        }
        bail!(
            "cannot download {url}: the connection keeps dropping ({}): check the network",
            last.map(|e| e.to_string()).unwrap_or_default()
        )
    }
}

impl RepoRead for HttpRepo {
    fn location(&self) -> String {
        self.base.clone()
    }

    fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        self.get(rel, MAX_METADATA)
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
