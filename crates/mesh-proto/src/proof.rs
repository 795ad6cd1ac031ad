//! Proof that a registering node holds the private key of the node key it names.
//!
//! Without it, anyone with an auth key the server still accepts and a victim's public key (every netmap
//! lists it) could re-register as the victim and take its credential. The server has a static X25519 key
//! pair; the node MACs its request under a key only the holder of the node's private key and the holder of
//! the server's private key can compute, X25519(node private, server public). The request carries the
//! time it was made, so the server can refuse an old or replayed one.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use blake2::Blake2sMac256;
use blake2::digest::{FixedOutput, Update};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::RegisterRequest;

/// How far a request's clock may be from the server's, either way.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// BLAKE2s personalisation: the MAC of a registration is of no use as any other MAC.
const PERSONA: &[u8] = b"meshdreg";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofError {
    /// The node key is not 32 bytes of base64.
    NodeKey,
    /// The node key is a low-order point, so the shared secret would be known to everyone.
    WeakNodeKey,
    /// The proof is missing, malformed, or made with another key.
    Mismatch,
}

impl std::fmt::Display for ProofError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NodeKey => "the node key is not a 32-byte base64 WireGuard public key",
            Self::WeakNodeKey => "the node key is not a usable X25519 public key",
            Self::Mismatch => "the registration is not signed by the node key's private key",
        })
    }
}

impl std::error::Error for ProofError {}

/// The public half of an X25519 private key.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// Decodes a base64 WireGuard key.
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    STANDARD.decode(text).ok()?.try_into().ok()
}

pub fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// Every field of the request but the proof, each length-prefixed so no two requests share an encoding.
fn signed_bytes(request: &RegisterRequest) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = b"meshd register v1\0".to_vec();
    out.extend_from_slice(&request.version.to_be_bytes());
    field(&mut out, request.auth_key.as_bytes());
    field(&mut out, request.node_key.as_bytes());
    field(&mut out, request.hostname.as_bytes());
    out.extend_from_slice(&(request.advertise_routes.len() as u32).to_be_bytes());
    for route in &request.advertise_routes {
        field(&mut out, route.to_string().as_bytes());
    }
    out.extend_from_slice(&(request.tags.len() as u32).to_be_bytes());
    for tag in &request.tags {
        field(&mut out, tag.as_bytes());
    }
    out.extend_from_slice(&request.timestamp_ms.to_be_bytes());
    out
}

fn mac(shared: &[u8; 32], request: &RegisterRequest) -> [u8; 32] {
    let mut mac = Blake2sMac256::new_with_salt_and_personal(shared, &[], PERSONA)
        .expect("a 32-byte key and an 8-byte persona fit BLAKE2s");
    mac.update(&signed_bytes(request));
    mac.finalize_fixed().into()
}

/// Signs `request` (its `timestamp_ms` already set) for the server whose public key is `server_public`.
pub fn sign(request: &mut RegisterRequest, node_private: &[u8; 32], server_public: &[u8; 32]) {
    let shared = StaticSecret::from(*node_private).diffie_hellman(&PublicKey::from(*server_public));
    request.proof = STANDARD.encode(mac(shared.as_bytes(), request));
}

/// Checks that `request` was signed by the private key of the node key it names, for this server.
pub fn verify(request: &RegisterRequest, server_private: &[u8; 32]) -> Result<(), ProofError> {
    let node_key = decode_key(&request.node_key).ok_or(ProofError::NodeKey)?;
    let shared = StaticSecret::from(*server_private).diffie_hellman(&PublicKey::from(node_key));
    if !shared.was_contributory() {
        return Err(ProofError::WeakNodeKey);
    }
    let presented: [u8; 32] =
        STANDARD.decode(&request.proof).ok().and_then(|p| p.try_into().ok()).ok_or(ProofError::Mismatch)?;
    let expected = mac(shared.as_bytes(), request);
    // Constant time: a byte-by-byte early exit would let a prober learn the MAC a byte at a time.
    let difference = presented.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if difference == 0 { Ok(()) } else { Err(ProofError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VERSION;

    fn request(node_private: &[u8; 32]) -> RegisterRequest {
        RegisterRequest {
            version: VERSION,
            auth_key: "mkey-abc-def".into(),
            node_key: encode_key(&public_key(node_private)),
            hostname: "router-a".into(),
            advertise_routes: vec!["10.0.0.0/16".parse().unwrap()],
            tags: vec!["tag:router".into()],
            timestamp_ms: 1_700_000_000_000,
            proof: String::new(),
        }
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_breaks_it() {
        let (node, server) = ([7u8; 32], [9u8; 32]);
        let mut signed = request(&node);
        sign(&mut signed, &node, &public_key(&server));
        assert_eq!(verify(&signed, &server), Ok(()));

        let mut later = signed.clone();
        later.timestamp_ms += 1;
        assert_eq!(verify(&later, &server), Err(ProofError::Mismatch));
        let mut moved = signed.clone();
        moved.advertise_routes.push("0.0.0.0/0".parse().unwrap());
        assert_eq!(verify(&moved, &server), Err(ProofError::Mismatch));
        // Another server's key pair computes another shared secret.
        assert_eq!(verify(&signed, &[10u8; 32]), Err(ProofError::Mismatch));
    }

    #[test]
    fn an_attacker_without_the_private_key_cannot_sign_for_the_victim() {
        let (victim, attacker, server) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let mut forged = request(&victim);
        sign(&mut forged, &attacker, &public_key(&server));
        assert_eq!(verify(&forged, &server), Err(ProofError::Mismatch));
        forged.proof = String::new();
        assert_eq!(verify(&forged, &server), Err(ProofError::Mismatch));
    }

    #[test]
    fn low_order_and_malformed_node_keys_are_refused() {
        let mut zero = request(&[1u8; 32]);
        zero.node_key = encode_key(&[0u8; 32]);
        assert_eq!(verify(&zero, &[3u8; 32]), Err(ProofError::WeakNodeKey));
        zero.node_key = "c2hvcnQ=".into();
        assert_eq!(verify(&zero, &[3u8; 32]), Err(ProofError::NodeKey));
    }
}
