//! The ways in that userspace mode's flags declare: `--forward LISTEN=NAME:PORT[/udp]` and
//! `--expose PORT[=LOCALPORT][/udp]`. Parsed here, checked whole, so a bad flag stops the daemon before it
//! changes anything.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Splits a trailing `/tcp` or `/udp` off.
fn split_proto(text: &str) -> Result<(&str, Proto), String> {
    match text.rsplit_once('/') {
        Some((rest, "udp")) => Ok((rest, Proto::Udp)),
        Some((rest, "tcp")) => Ok((rest, Proto::Tcp)),
        Some((_, other)) => Err(format!("unknown protocol {other:?} (use /tcp or /udp)")),
        None => Ok((text, Proto::Tcp)),
    }
}

fn port(text: &str, what: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{what} {text:?} is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// A target: a mesh name (or any name MagicDNS answers) or an address, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// The address when the host is one already.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Target { host: addr.ip().to_string(), port: addr.port() });
        }
        let Some((host, p)) = text.rsplit_once(':') else {
            return Err(format!("{text:?} needs a port: NAME:PORT"));
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let valid = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(valid) {
            return Err(format!("{host:?} is neither a host name nor an IP address"));
        }
        Ok(Target { host, port: port(p, "in the target, ")? })
    }
}

/// `--forward LISTEN=NAME:PORT[/udp]`: a local socket whose flows go to a mesh target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: Target,
    pub proto: Proto,
}

impl FromStr for Forward {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |e: String| format!("--forward {text:?}: {e}");
        let (spec, proto) = split_proto(text.trim()).map_err(bad)?;
        let Some((listen, target)) = spec.split_once('=') else {
            return Err(bad("expected LISTEN=NAME:PORT, e.g. 127.0.0.1:5432=db:5432".into()));
        };
        // A bare port listens on loopback: the safe default for a sidecar.
        let listen = match listen.parse::<u16>() {
            Ok(p) => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port(&p.to_string(), "the listen port").map_err(bad)?)
            }
            Err(_) => listen.parse::<SocketAddr>().map_err(|_| bad(format!("{listen:?} is not IP:PORT or PORT")))?,
        };
        if listen.port() == 0 {
            return Err(bad("the listen port must not be 0".into()));
        }
        Ok(Forward { listen, target: target.parse().map_err(bad)?, proto })
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.listen, self.target)?;
        if self.proto == Proto::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

/// `--expose PORT[=LOCALPORT][/udp]`: peers the ACL allows reach this local port at the mesh port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Expose {
    pub port: u16,
    pub local: SocketAddr,
    pub proto: Proto,
}

impl FromStr for Expose {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |e: String| format!("--expose {text:?}: {e}");
        let (spec, proto) = split_proto(text.trim()).map_err(bad)?;
        let (mesh, local) = spec.split_once('=').unwrap_or((spec, spec));
        let port = port(mesh, "the mesh port").map_err(bad)?;
        let local = match local.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self::port(local, "the local port").map_err(bad)?)
            }
        };
        Ok(Expose { port, local, proto })
    }
}

/// Checks a set of forwards and exposes: no two listen on one socket, no two expose one mesh port.
pub fn check(forwards: &[Forward], exposes: &[Expose]) -> Result<(), String> {
    for (i, a) in forwards.iter().enumerate() {
        if let Some(b) = forwards[i + 1..].iter().find(|b| b.listen == a.listen && b.proto == a.proto) {
            return Err(format!("--forward {a} and --forward {b} listen on the same {} socket", a.proto));
        }
    }
    for (i, a) in exposes.iter().enumerate() {
        if exposes[i + 1..].iter().any(|b| b.port == a.port && b.proto == a.proto) {
            return Err(format!("--expose names mesh port {}/{} twice", a.port, a.proto));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_with_their_defaults() {
        let f: Forward = "127.0.0.1:5432=stackeye-db-prd:5432".parse().unwrap();
        assert_eq!(f.listen, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(f.target, Target { host: "stackeye-db-prd".into(), port: 5432 });
        assert_eq!(f.proto, Proto::Tcp);
        let f: Forward = "5353=DNS.Mesh.Internal.:53/udp".parse().unwrap();
        assert_eq!(f.listen, "127.0.0.1:5353".parse().unwrap());
        assert_eq!(f.target.host, "dns.mesh.internal");
        assert_eq!(f.proto, Proto::Udp);
        let f: Forward = "[::1]:8080=[fd7a::5]:80".parse().unwrap();
        assert_eq!(f.target.ip(), Some("fd7a::5".parse().unwrap()));
        assert_eq!(f.to_string(), "[::1]:8080=[fd7a::5]:80");
    }

    #[test]
    fn bad_forwards_say_what_is_wrong() {
        for (text, says) in [
            ("5432", "expected LISTEN=NAME:PORT"),
            ("5432=db", "needs a port"),
            ("5432=db:0", "not a port"),
            ("0=db:5432", "not a port"),
            ("x:1=db:5432", "not IP:PORT or PORT"),
            ("5432=db:5432/sctp", "unknown protocol"),
            ("5432=d b:5432", "neither a host name"),
        ] {
            let e = text.parse::<Forward>().unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn exposes_parse_and_clash() {
        let e: Expose = "8080".parse().unwrap();
        assert_eq!((e.port, e.local, e.proto), (8080, "127.0.0.1:8080".parse().unwrap(), Proto::Tcp));
        let e: Expose = "80=8080/udp".parse().unwrap();
        assert_eq!((e.port, e.local.port(), e.proto), (80, 8080, Proto::Udp));
        assert!("0".parse::<Expose>().is_err());
        let twice = ["80".parse().unwrap(), "80=81".parse().unwrap()];
        assert!(check(&[], &twice).unwrap_err().contains("twice"));
        let both = ["80".parse().unwrap(), "80/udp".parse().unwrap()];
        assert!(check(&[], &both).is_ok());
        let f: Vec<Forward> = vec!["5432=a:1".parse().unwrap(), "127.0.0.1:5432=b:1".parse().unwrap()];
        assert!(check(&f, &[]).unwrap_err().contains("same tcp socket"));
    }
}
