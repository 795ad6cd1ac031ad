//! SOCKS5 (RFC 1928) with username/password authentication (RFC 1929): the messages, parsed from bytes an
//! untrusted local client sent. Each parser takes what has arrived so far and says whether it is whole
//! (`Ok(Some((value, used)))`), needs more (`Ok(None)`), or is wrong (`Err`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::spec::Target;

pub const VERSION: u8 = 5;
pub const NO_AUTH: u8 = 0x00;
pub const USER_PASS: u8 = 0x02;
pub const NO_ACCEPTABLE: u8 = 0xff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    UdpAssociate,
}

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub target: Target,
}

/// What is wrong with a message, and the reply code to refuse it with (if the protocol has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub reason: &'static str,
    pub reply: Option<Reply>,
}

fn error(reason: &'static str, reply: Option<Reply>) -> Error {
    Error { reason, reply }
}

type Parsed<T> = Result<Option<(T, usize)>, Error>;

/// The client's greeting: the methods it offers.
pub fn greeting(buf: &[u8]) -> Parsed<Vec<u8>> {
    let [version, count, ..] = *buf else { return Ok(None) };
    if version != VERSION {
        return Err(error("not SOCKS version 5", None));
    }
    let end = 2 + usize::from(count);
    if count == 0 {
        return Err(error("no authentication methods offered", None));
    }
    Ok(buf.get(2..end).map(|methods| (methods.to_vec(), end)))
}

/// Username and password (RFC 1929).
pub fn credentials(buf: &[u8]) -> Parsed<(Vec<u8>, Vec<u8>)> {
    let [version, user_len, ..] = *buf else { return Ok(None) };
    if version != 1 {
        return Err(error("not username/password version 1", None));
    }
    let user_end = 2 + usize::from(user_len);
    let Some(&pass_len) = buf.get(user_end) else { return Ok(None) };
    let end = user_end + 1 + usize::from(pass_len);
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(((buf[2..user_end].to_vec(), buf[user_end + 1..end].to_vec()), end)))
}

/// An address as SOCKS5 writes it (ATYP, address, port), from `buf`.
fn address(buf: &[u8]) -> Parsed<Target> {
    let Some(&kind) = buf.first() else { return Ok(None) };
    let (host, end) = match kind {
        1 => {
            let Some(b) = buf.get(1..5) else { return Ok(None) };
            (Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(), 5)
        }
        4 => {
            let Some(b) = buf.get(1..17) else { return Ok(None) };
            let bytes: [u8; 16] = b.try_into().expect("16 bytes");
            (Ipv6Addr::from(bytes).to_string(), 17)
        }
        3 => {
            let Some(&len) = buf.get(1) else { return Ok(None) };
            let end = 2 + usize::from(len);
            let Some(name) = buf.get(2..end) else { return Ok(None) };
            let name = std::str::from_utf8(name)
                .map_err(|_| error("the host name is not text", Some(Reply::HostUnreachable)))?;
            (name.to_string(), end)
        }
        _ => return Err(error("unknown address type", Some(Reply::AddressTypeNotSupported))),
    };
    let Some(port) = buf.get(end..end + 2) else { return Ok(None) };
    let port = u16::from_be_bytes([port[0], port[1]]);
    let target = if kind == 3 {
        format!("{host}:{port}").parse().map_err(|_| error("not a host name", Some(Reply::HostUnreachable)))?
    } else {
        Target { host, port }
    };
    Ok(Some((target, end + 2)))
}

/// The client's request.
pub fn request(buf: &[u8]) -> Parsed<Request> {
    let [version, command, _reserved, ..] = *buf else { return Ok(None) };
    if version != VERSION {
        return Err(error("not SOCKS version 5", Some(Reply::GeneralFailure)));
    }
    let command = match command {
        1 => Command::Connect,
        3 => Command::UdpAssociate,
        _ => return Err(error("command not supported (BIND)", Some(Reply::CommandNotSupported))),
    };
    Ok(address(&buf[3..])?.map(|(target, used)| (Request { command, target }, 3 + used)))
}

/// A UDP ASSOCIATE datagram's header: the target and where the payload starts. Fragments are refused.
pub fn udp_header(datagram: &[u8]) -> Result<(Target, usize), Error> {
    let [0, 0, fragment, ..] = *datagram else { return Err(error("a short or malformed datagram header", None)) };
    if fragment != 0 {
        return Err(error("fragmented datagrams are not supported", None));
    }
    match address(&datagram[3..])? {
        Some((target, used)) => Ok((target, 3 + used)),
        None => Err(error("a short datagram header", None)),
    }
}

fn push_address(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// The reply to a request; `bound` is the address the server used (or the UDP relay's, for ASSOCIATE).
pub fn reply(code: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code as u8, 0];
    push_address(&mut out, bound);
    out
}

/// The header the relay puts before a datagram it hands back to the client.
pub fn udp_reply_header(from: SocketAddr) -> Vec<u8> {
    let mut out = vec![0, 0, 0];
    push_address(&mut out, from);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_greeting_and_credentials_parse_in_pieces() {
        let hello = [5, 2, 0, 2, 0xaa];
        for cut in 0..4 {
            assert_eq!(greeting(&hello[..cut]), Ok(None));
        }
        assert_eq!(greeting(&hello), Ok(Some((vec![0, 2], 4))));
        assert!(greeting(&[4, 1, 0]).is_err());
        assert!(greeting(&[5, 0]).is_err());
        let auth = [1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        for cut in 0..auth.len() {
            assert_eq!(credentials(&auth[..cut]), Ok(None), "{cut}");
        }
        assert_eq!(credentials(&auth), Ok(Some(((b"bob".to_vec(), b"pw".to_vec()), 8))));
    }

    #[test]
    fn requests_name_their_target() {
        let by_name = [5, 1, 0, 3, 4, b'D', b'B', b'-', b'1', 0x15, 0x38];
        let (r, used) = request(&by_name).unwrap().unwrap();
        assert_eq!((r.command, r.target.host.as_str(), r.target.port, used), (Command::Connect, "db-1", 5432, 11));
        for cut in 0..by_name.len() {
            assert_eq!(request(&by_name[..cut]), Ok(None));
        }
        let by_v6 = [[5, 3, 0, 4].as_slice(), &[0xfd; 16], &[0, 53]].concat();
        let (r, _) = request(&by_v6).unwrap().unwrap();
        assert_eq!(
            (r.command, r.target.ip()),
            (Command::UdpAssociate, Some("fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd".parse().unwrap()))
        );
        assert_eq!(request(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 1]).unwrap_err().reply, Some(Reply::CommandNotSupported));
        assert_eq!(request(&[5, 1, 0, 9, 0]).unwrap_err().reply, Some(Reply::AddressTypeNotSupported));
        assert!(request(&[5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 1]).is_err());
    }

    #[test]
    fn replies_and_datagram_headers_round_trip() {
        let from: SocketAddr = "100.64.0.7:53".parse().unwrap();
        assert_eq!(reply(Reply::Succeeded, from), [5, 0, 0, 1, 100, 64, 0, 7, 0, 53]);
        let mut datagram = udp_reply_header(from);
        let start = datagram.len();
        datagram.extend_from_slice(b"payload");
        let (target, at) = udp_header(&datagram).unwrap();
        assert_eq!((target.ip(), target.port, &datagram[at..]), (Some(from.ip()), 53, b"payload".as_slice()));
        assert_eq!(at, start);
        assert!(udp_header(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 1]).is_err());
        assert!(udp_header(&[0, 0, 0, 1, 1]).is_err());
    }
}
