//! Where the Redis broker connects: one Redis (`redis://`, `rediss://`), a master found through
//! Sentinel (`redis+sentinel://`, `rediss+sentinel://`) or a Redis Cluster (`redis+cluster://`,
//! `rediss+cluster://`), with TLS through the redis crate's rustls support.
//!
//! This module only parses and builds clients; the Redis broker's tasks ([`super::redis`]) own
//! the connections. A Sentinel endpoint is asked for the current
//! master at every (re)connect, which is how a node follows a failover without a restart.
//!
//! URL forms (credentials, when given, are those of the Redis servers, not of the sentinels):
//! - `redis://[user:pass@]host:port[/db]`, `rediss://…` (TLS)
//! - `redis+sentinel://[user:pass@]host:port,host:port/MASTER_NAME[/db]`, `rediss+sentinel://…`
//!   (TLS to the sentinels and to the master; a sentinel port defaults to 26379)
//! - `redis+cluster://[user:pass@]host:port,host:port`, `rediss+cluster://…` (seed nodes; the
//!   rest of the cluster is discovered)
//!
//! TLS verifies the server certificate against the system roots, or only against
//! `--redis-ca-file` when one is given; an untrusted certificate is refused (there is no option
//! to skip verification). `--redis-client-cert` and `--redis-client-key` add a client
//! certificate for mutual TLS.

use std::path::PathBuf;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates, TlsMode};

use super::BrokerError;

/// TLS files for Redis connections (all optional).
#[derive(Debug, Clone, Default)]
pub struct RedisTlsFiles {
    /// PEM bundle of the CAs to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

impl RedisTlsFiles {
    /// Whether any file is set (then the URL must use TLS).
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// Reads the files into the redis crate's form.
    fn load(&self) -> Result<TlsCertificates, BrokerError> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| BrokerError::Config(format!("cannot read {}: {e}", p.display())))
        };
        let client_tls = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(BrokerError::Config(
                    "--redis-client-cert and --redis-client-key go together".into(),
                ))
            }
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert: self.ca_file.as_ref().map(read).transpose()?,
        })
    }
}

/// A parsed Redis endpoint.
pub enum Endpoint {
    /// One Redis server.
    Single(redis::Client),
    /// A master found through Sentinel; asked again at every connect. A tokio lock: the lookup
    /// awaits the sentinels, and only the (re)connecting tasks take it. The sentinels are also
    /// the witnesses of an outage ([`Sentinels`]).
    Sentinel(tokio::sync::Mutex<SentinelClient>, Sentinels),
    /// A Redis Cluster (sharded pub/sub).
    Cluster(ClusterSeeds),
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Endpoint::Single",
            Self::Sentinel(..) => "Endpoint::Sentinel",
            Self::Cluster(_) => "Endpoint::Cluster",
        })
    }
}

/// The sentinels themselves, asked directly (`SENTINEL MASTER`) when this node loses the master:
/// whether they lost it too (see [`super::redis`]'s witness).
#[derive(Debug, Clone)]
pub struct Sentinels {
    /// The master's name in the sentinels' configuration.
    pub master: String,
    /// One client per sentinel of the URL (TLS when the scheme asks for it; no credentials:
    /// those of the URL are the Redis servers').
    pub clients: Vec<redis::Client>,
}

/// What is needed to build cluster clients (the subscriber needs RESP3 and a push sender, so
/// each connection builds its own client).
#[derive(Debug, Clone)]
pub struct ClusterSeeds {
    /// `redis://` or `rediss://` URLs of the seed nodes, credentials included.
    pub nodes: Vec<String>,
    /// TLS, when the scheme asked for it.
    pub tls: Option<TlsCertificates>,
    /// The seeds' addresses, to ask for the slot map.
    pub addrs: Vec<(String, u16)>,
    /// `user:pass@` (or empty), for URLs of discovered nodes.
    pub creds: String,
}

impl ClusterSeeds {
    /// A builder with the seeds, TLS and timeouts set.
    pub fn builder(&self, timeout: Duration) -> ClusterClientBuilder {
        let mut b = ClusterClientBuilder::new(self.nodes.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2);
        if let Some(certs) = &self.tls {
            b = b.tls(TlsMode::Secure).certs(certs.clone());
        }
        b
    }

    /// A plain client for one node of the cluster (probes), with the seeds' credentials and TLS.
    pub fn node_client(&self, host: &str, port: u16) -> redis::RedisResult<redis::Client> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let url = format!("{scheme}://{}{host}:{port}/", self.creds);
        match &self.tls {
            Some(c) => redis::Client::build_with_tls(url, c.clone()),
            None => redis::Client::open(url),
        }
    }

    /// A plain (RESP2) cluster client.
    pub fn client(&self, timeout: Duration) -> Result<ClusterClient, BrokerError> {
        self.builder(timeout)
            .build()
            .map_err(|e| BrokerError::Config(e.to_string()))
    }
}

impl Endpoint {
    /// Parses `url` with the TLS files.
    pub fn parse(url: &str, tls: &RedisTlsFiles) -> Result<Self, BrokerError> {
        let bad = |m: String| BrokerError::Config(m);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("a Redis URL starts with redis://, rediss://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://".into()))?;
        let secure = scheme.starts_with("rediss");
        if tls.any() && !secure {
            return Err(bad(
                "--redis-ca-file / --redis-client-cert need a rediss:// URL".into(),
            ));
        }
        if secure {
            // The process-wide rustls provider; an error only means one is installed already.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        let certs = if secure { Some(tls.load()?) } else { None };
        match scheme {
            "redis" | "rediss" => {
                let client = match certs {
                    Some(c) => redis::Client::build_with_tls(url, c),
                    None => redis::Client::open(url),
                }
                .map_err(|e| bad(e.to_string()))?;
                Ok(Self::Single(client))
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let (auth, hosts, path) = split_authority(rest);
                let mut path = path.split('/').filter(|s| !s.is_empty());
                let master = path
                    .next()
                    .ok_or_else(|| bad("a Sentinel URL names the master: redis+sentinel://host:port,host:port/MASTER".into()))?;
                let db: i64 = match path.next() {
                    Some(d) => d.parse().map_err(|_| bad(format!("bad database `{d}`")))?,
                    None => 0,
                };
                let mut addrs = Vec::new();
                let mut witnesses = Vec::new();
                for h in hosts.split(',').filter(|h| !h.is_empty()) {
                    let (host, port) = host_port(h, 26379).map_err(bad)?;
                    let bracketed = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host.clone()
                    };
                    let url = format!(
                        "{}://{bracketed}:{port}/",
                        &scheme[..scheme.find('+').unwrap_or(scheme.len())]
                    );
                    witnesses.push(
                        match &certs {
                            Some(c) => redis::Client::build_with_tls(url, c.clone()),
                            None => redis::Client::open(url),
                        }
                        .map_err(|e| bad(e.to_string()))?,
                    );
                    addrs.push(if secure {
                        ConnectionAddr::TcpTls {
                            host,
                            port,
                            insecure: false,
                            tls_params: None,
                        }
                    } else {
                        ConnectionAddr::Tcp(host, port)
                    });
                }
                if addrs.is_empty() {
                    return Err(bad("a Sentinel URL lists at least one sentinel".into()));
                }
                let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                    .map_err(|e| bad(e.to_string()))?
                    .set_client_to_redis_db(db);
                if let Some((user, pass)) = auth {
                    if !user.is_empty() {
                        b = b.set_client_to_redis_username(user);
                    }
                    if let Some(p) = pass {
                        b = b.set_client_to_redis_password(p);
                    }
                }
                if let Some(c) = certs {
                    b = b
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_redis_certificates(c.clone())
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_certificates(c);
                }
                let client = b.build().map_err(|e| bad(e.to_string()))?;
                let sentinels = Sentinels {
                    master: master.to_string(),
                    clients: witnesses,
                };
                Ok(Self::Sentinel(tokio::sync::Mutex::new(client), sentinels))
            }
            "redis+cluster" | "rediss+cluster" => {
                let (auth, hosts, _) = split_authority(rest);
                let base = if secure { "rediss" } else { "redis" };
                let creds = match auth {
                    Some((u, Some(p))) => format!("{u}:{p}@"),
                    Some((u, None)) => format!("{u}@"),
                    None => String::new(),
                };
                let mut nodes = Vec::new();
                let mut addrs = Vec::new();
                for h in hosts.split(',').filter(|h| !h.is_empty()) {
                    let (host, port) = host_port(h, 6379).map_err(bad)?;
                    addrs.push((host.clone(), port));
                    let node = format!("{base}://{creds}{host}:{port}");
                    node.as_str()
                        .into_connection_info()
                        .map_err(|e| bad(e.to_string()))?;
                    nodes.push(node);
                }
                if nodes.is_empty() {
                    return Err(bad("a cluster URL lists at least one node".into()));
                }
                Ok(Self::Cluster(ClusterSeeds {
                    nodes,
                    tls: certs,
                    addrs,
                    creds,
                }))
            }
            other => Err(bad(format!("unknown Redis URL scheme `{other}`"))),
        }
    }

    /// A client for the current master (single and Sentinel endpoints).
    pub async fn client(&self) -> Result<redis::Client, redis::RedisError> {
        match self {
            Self::Single(c) => Ok(c.clone()),
            Self::Sentinel(s, _) => s.lock().await.async_get_client().await,
            Self::Cluster(_) => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a cluster endpoint has no single client",
            ))),
        }
    }
}

/// Splits `[user[:pass]@]hosts[/path]`.
#[allow(clippy::type_complexity)]
fn split_authority(rest: &str) -> (Option<(String, Option<String>)>, &str, &str) {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((cred, hosts)) => {
            let (u, p) = match cred.split_once(':') {
                Some((u, p)) => (u.to_string(), Some(p.to_string())),
                None => (cred.to_string(), None),
            };
            (Some((u, p)), hosts, path)
        }
        None => (None, authority, path),
    }
}

fn host_port(h: &str, default_port: u16) -> Result<(String, u16), String> {
    match h.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            let port = port.parse().map_err(|_| format!("bad port in `{h}`"))?;
            Ok((host.trim_matches(['[', ']']).to_string(), port))
        }
        _ => Ok((h.trim_matches(['[', ']']).to_string(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_url_forms() {
        let none = RedisTlsFiles::default();
        assert!(matches!(
            Endpoint::parse("redis://127.0.0.1:6379/", &none),
            Ok(Endpoint::Single(_))
        ));
        assert!(matches!(
            Endpoint::parse("rediss://localhost:6380/", &none),
            Ok(Endpoint::Single(_))
        ));
        assert!(matches!(
            Endpoint::parse("redis+sentinel://a:26379,b/mymaster", &none),
            Ok(Endpoint::Sentinel(..))
        ));
        assert!(Endpoint::parse("redis+sentinel://a:26379", &none).is_err());
        match Endpoint::parse("rediss+cluster://u:p@a:7000,b:7001", &none) {
            Ok(Endpoint::Cluster(s)) => {
                assert_eq!(s.nodes, ["rediss://u:p@a:7000", "rediss://u:p@b:7001"]);
                assert!(s.tls.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert!(Endpoint::parse("http://a", &none).is_err());
        let ca = RedisTlsFiles {
            ca_file: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert!(
            Endpoint::parse("redis://a:1", &ca).is_err(),
            "a CA file needs TLS"
        );
        assert!(Endpoint::parse("rediss://a:1", &ca).is_err(), "unreadable");
    }
}
