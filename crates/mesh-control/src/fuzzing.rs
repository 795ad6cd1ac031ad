//! The body of the `control_api` fuzz target, shared with the test that replays its corpus on every CI run:
//! untrusted bytes as each body the server parses (a registration, an endpoints report, a policy file),
//! driven through a live store so parsing and the decisions after it are both exercised.

use mesh_proto::{EndpointsUpdate, RegisterRequest, proof};

use crate::policy::Policy;
use crate::{AuthKeyOptions, Control};

const NOW: u64 = 1_800_000_000;
/// The store starts afresh after this many registrations, so a long run does not grow without bound.
const NODES_PER_STORE: usize = 256;

pub struct Target {
    control: Control,
    key: String,
    node: u64,
    registered: usize,
    server_public: [u8; 32],
    signed: u64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the key: even a fuzzing key stays out of output, like every other.
        f.debug_struct("Target").field("node", &self.node).field("registered", &self.registered).finish()
    }
}

impl Default for Target {
    fn default() -> Self {
        Self::new()
    }
}

impl Target {
    pub fn new() -> Self {
        let policy =
            Policy::parse(r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}}}"#).expect("literal policy");
        let control = Control::in_memory(policy, "mesh.example").expect("in-memory store");
        let options = AuthKeyOptions { reusable: true, tags: vec!["tag:router".into()], ..Default::default() };
        let (_, key) = control.create_auth_key(&options, NOW).expect("auth key");
        let server_public = control.server_public_key().ok().and_then(|k| proof::decode_key(&k)).expect("server key");
        let anchor_private = [0x11; 32];
        let mut anchor = RegisterRequest {
            version: mesh_proto::VERSION,
            auth_key: key.clone(),
            node_key: proof::encode_key(&proof::public_key(&anchor_private)),
            hostname: "anchor".into(),
            advertise_routes: vec!["10.1.0.0/16".parse().expect("literal prefix")],
            tags: Vec::new(),
            timestamp_ms: NOW * 1000,
            proof: String::new(),
        };
        proof::sign(&mut anchor, &anchor_private, &server_public);
        let node = control.register(&anchor, NOW).expect("anchor node").node_id;
        Self { control, key, node, registered: 0, server_public, signed: 0 }
    }

    pub fn feed(&mut self, data: &[u8]) {
        if self.registered >= NODES_PER_STORE {
            *self = Self::new();
        }
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = Policy::parse(text);
        }
        crate::console::fuzz_forms(data);
        if let Ok(mut request) = serde_json::from_slice::<RegisterRequest>(data) {
            // The fuzzer cannot guess an auth key or forge a proof; half the inputs use the real key and are
            // signed by a node key of their own, to reach what follows.
            if data.len().is_multiple_of(2) {
                request.auth_key = self.key.clone();
                let private = [data.len() as u8 | 1; 32];
                request.node_key = proof::encode_key(&proof::public_key(&private));
                self.signed += 1;
                request.timestamp_ms = NOW * 1000 + self.signed;
                proof::sign(&mut request, &private, &self.server_public);
            }
            if let Ok(response) = self.control.register(&request, NOW) {
                self.registered += 1;
                assert!(
                    response.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                    "names are DNS labels: {:?}",
                    response.name
                );
                self.control.netmap(response.node_id, |_| true).expect("a registered node has a netmap");
            }
        }
        if let Ok(update) = serde_json::from_slice::<mesh_proto::RoutesUpdate>(data) {
            let accepted = self.control.set_advertised(self.node, &update).is_ok();
            let map = self.control.netmap(self.node, |_| true).expect("the anchor has a netmap");
            if accepted {
                let held: Vec<_> = map.routes.iter().map(|r| r.prefix).collect();
                assert!(update.advertise_routes.iter().all(|p| held.contains(&p.trunc())), "{held:?}");
            }
        }
        if let Ok(update) = serde_json::from_slice::<EndpointsUpdate>(data) {
            let accepted = self.control.set_endpoints(self.node, &update).is_ok();
            let map = self.control.netmap(self.node, |_| true).expect("the anchor has a netmap");
            if accepted {
                assert!(map.node.endpoints.len() <= mesh_proto::MAX_ENDPOINTS);
                assert!(map.node.endpoints.iter().all(|e| update.endpoints.contains(e)));
            }
        }
    }
}

/// The body of the `policy` fuzz target: arbitrary text as a policy file; what parses is compiled for a
/// small mesh (a user's node, a tagged node, a subnet router, an exit node) and its tests are run. Nothing
/// may panic; no node may see itself or get a rule it could never receive.
pub fn policy(data: &[u8]) {
    use crate::policy::{PolicyNode, compile};
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(policy) = Policy::parse(text) else { return };
    let node = |id: u64, user: Option<&str>, tags: &[&str], v4: [u8; 4], routes: &[&str]| PolicyNode {
        id,
        name: format!("n{id}"),
        user: user.map(str::to_string),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        addresses: vec![
            std::net::IpAddr::from(v4),
            std::net::IpAddr::from([0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, id as u16]),
        ],
        approved_routes: routes.iter().map(|r| r.parse().expect("literal route")).collect(),
    };
    let nodes = [
        node(1, Some("alice@example.com"), &[], [100, 64, 0, 1], &[]),
        node(2, None, &["tag:server"], [100, 64, 0, 2], &[]),
        node(3, None, &["tag:router"], [100, 64, 0, 3], &["10.0.0.0/16"]),
        node(4, None, &["tag:exit"], [100, 64, 0, 4], &["0.0.0.0/0", "::/0"]),
    ];
    let _ = policy.check_tests(&nodes);
    let mesh = ["100.64.0.0/10".parse().expect("literal"), "fd7a:115c:a1e0::/48".parse().expect("literal")];
    let compiled = compile(&policy, &nodes, &mesh);
    for (i, peers) in compiled.peers.iter().enumerate() {
        assert!(!peers.contains(&i), "a node sees itself");
        for &j in peers {
            assert!(compiled.peers[j].contains(&i), "visibility is symmetric");
        }
        for (k, _) in nodes.iter().enumerate() {
            for route in &nodes[k].approved_routes {
                let _ = compiled.may_use(&nodes, i, k, route);
            }
        }
    }
}
