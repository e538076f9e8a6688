//! Where the load goes: gateway base URLs (`ws://`, `wss://`, or the `http(s)://` spelling of the
//! same), resolved once at the start, with curl-style `--resolve HOST:PORT:ADDR` overrides so a
//! test can use a host name (for TLS) without touching `/etc/hosts`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// One `--resolve HOST:PORT:ADDR` entry, as curl spells it (`ADDR` may be `[::1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOverride {
    /// Host name as it appears in the target URL (compared case-insensitively).
    pub host: String,
    /// Port of the target URL.
    pub port: u16,
    /// Address to connect to instead of asking DNS.
    pub addr: IpAddr,
}

impl FromStr for ResolveOverride {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: write HOST:PORT:ADDR, e.g. gw.test:443:127.0.0.1");
        let (host, rest) = s.split_once(':').ok_or_else(bad)?;
        let (port, addr) = rest.split_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            addr,
        })
    }
}

/// A gateway base URL with the address it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `ws://host:port` or `wss://host:port`; the load tester appends `/ws/ROOM?…`.
    pub url: String,
    /// Host name or address as written (no brackets): SNI and the `Host` header.
    pub host: String,
    /// Port (80 or 443 when the URL gives none).
    pub port: u16,
    /// Whether the connection speaks TLS.
    pub tls: bool,
    /// Where TCP connects.
    pub addr: SocketAddr,
}

impl Target {
    /// The HTTP base URL of the same node or load balancer, for the HTTP API.
    pub fn http_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!(
            "{scheme}://{}",
            self.url.split_once("://").map(|x| x.1).unwrap_or("")
        )
    }
}

/// Parses a target into (base URL, host, port, tls) without resolving it.
pub fn parse(raw: &str) -> Result<(String, String, u16, bool), String> {
    let raw = raw.trim().trim_end_matches('/');
    let (tls, rest) = if let Some(r) = raw.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = raw.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = raw.strip_prefix("ws://") {
        (false, r)
    } else if let Some(r) = raw.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "`{raw}`: targets start with ws://, wss://, http:// or https://"
        ));
    };
    if rest.contains('/') || rest.contains('?') || rest.contains('@') || rest.is_empty() {
        return Err(format!(
            "`{raw}`: give the base URL only (scheme, host, port); the load tester adds /ws/ROOM"
        ));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{raw}`: unclosed [ in the host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("`{raw}`: bad port"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("`{raw}`: bad port")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("`{raw}`: bad port"))?,
            ),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("`{raw}`: no host"));
    }
    let scheme = if tls { "wss" } else { "ws" };
    Ok((format!("{scheme}://{rest}"), host, port, tls))
}

/// Parses and resolves a target, `--resolve` entries first, then the system resolver.
pub fn resolve(raw: &str, overrides: &[ResolveOverride]) -> Result<Target, String> {
    let (url, host, port, tls) = parse(raw)?;
    let lower = host.to_ascii_lowercase();
    let addr = match overrides.iter().find(|o| o.host == lower && o.port == port) {
        Some(o) => SocketAddr::new(o.addr, port),
        None => (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} resolves to no address"))?,
    };
    Ok(Target {
        url,
        host,
        port,
        tls,
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_every_scheme_and_host() {
        let p = |s| parse(s).unwrap();
        assert_eq!(
            p("http://127.0.0.1:8080/"),
            (
                "ws://127.0.0.1:8080".into(),
                "127.0.0.1".into(),
                8080,
                false
            )
        );
        assert_eq!(
            p("wss://gw.example.com"),
            (
                "wss://gw.example.com".into(),
                "gw.example.com".into(),
                443,
                true
            )
        );
        assert_eq!(
            p("https://gw.example.com:8443"),
            (
                "wss://gw.example.com:8443".into(),
                "gw.example.com".into(),
                8443,
                true
            )
        );
        assert_eq!(p("ws://[::1]:80").1, "::1");
        assert_eq!(p("ws://192.168.1.1").2, 80);
        for bad in [
            "ws://127.0.0.1:8080/ws/x",
            "ftp://x",
            "ws://",
            "ws://h:port",
            "ws://[::1",
            "ws://u@h",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolve_overrides_win() {
        let o: ResolveOverride = "GW.test:443:127.0.0.7".parse().unwrap();
        let t = resolve("wss://gw.test", std::slice::from_ref(&o)).unwrap();
        assert_eq!(t.addr, "127.0.0.7:443".parse().unwrap());
        assert_eq!(t.host, "gw.test");
        assert_eq!(t.http_url(), "https://gw.test");
        let v6: ResolveOverride = "h:80:[::1]".parse().unwrap();
        assert_eq!(v6.addr, "::1".parse::<IpAddr>().unwrap());
        assert!("h:x:127.0.0.1".parse::<ResolveOverride>().is_err());
        assert!("h:80".parse::<ResolveOverride>().is_err());
        // Another port is not overridden.
        let t = resolve("ws://localhost:9", &[o]).unwrap();
        assert!(t.addr.ip().is_loopback());
    }
}
