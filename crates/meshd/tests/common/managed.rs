//! A coordination server and managed nodes for the end-to-end tests: the server speaks HTTPS with a
//! certificate from a CA the test makes, nodes run `meshd daemon` without --config and join with `meshd up`.

use std::path::PathBuf;
use std::time::Duration;

use mesh_netns::{Lab, make_certificates, stdout, wait_until};

use super::MESHD;

/// A registration body as node `node` (private key `[node; 32]`) sends it, signed for the server whose
/// `GET /api/v1/server-key` answer is `server_key_json` (the tests that speak the API without `meshd up`).
pub fn signed_registration(server_key_json: &str, auth_key: &str, node: u8, hostname: &str, routes: &[&str]) -> String {
    use mesh_proto::proof;
    let server: mesh_proto::ServerKey = serde_json::from_str(server_key_json).expect("a server key");
    let private = [node; 32];
    let mut request = mesh_proto::RegisterRequest {
        version: mesh_proto::VERSION,
        auth_key: auth_key.into(),
        node_key: proof::encode_key(&proof::public_key(&private)),
        hostname: hostname.into(),
        advertise_routes: routes.iter().map(|r| r.parse().expect("a prefix")).collect(),
        tags: Vec::new(),
        timestamp_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64,
        proof: String::new(),
    };
    proof::sign(&mut request, &private, &proof::decode_key(&server.public_key).expect("base64 key"));
    serde_json::to_string(&request).unwrap()
}

/// Waits until the `meshd control serve` process `p` listens, or fails the test with its log.
pub fn wait_for_server(lab: &mut Lab, p: usize) {
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || lab
            .process(p)
            .log_text()
            .contains("coordination server listening")),
        "the server did not start:\n{}",
        lab.process(p).log_text()
    );
}

/// A switch with the server (at 10.99.0.1, started with `policy`) and `n` node namespaces at 10.99.0.2.. .
pub fn switched_mesh(name: &str, n: usize, policy: Option<&str>) -> (Lab, Control, Vec<usize>) {
    let mut lab = Lab::new(name);
    let hub = lab.netns("cs");
    let hosts: Vec<usize> = (0..n).map(|i| lab.netns(&format!("n{i}"))).collect();
    let addrs: Vec<String> = (0..n).map(|i| format!("10.99.0.{}/24", i + 2)).collect();
    let members: Vec<(usize, &str)> = hosts.iter().zip(&addrs).map(|(h, a)| (*h, a.as_str())).collect();
    lab.switch(hub, "10.99.0.1/24", &members);
    let control = Control::start(&mut lab, hub, "10.99.0.1", policy);
    (lab, control, hosts)
}

/// A running coordination server and how to reach it.
pub struct Control {
    pub ns: usize,
    pub process: usize,
    pub url: String,
    pub ca: String,
    pub token: String,
    listen: String,
    /// More `control serve` flags, given on every start.
    extra: Vec<String>,
}

/// The output of one meshd command: exit status, stdout and stderr, trimmed.
pub type Outcome = (Option<i32>, String, String);

fn outcome(out: &std::process::Output) -> Outcome {
    (out.status.code(), stdout(out).trim().to_string(), String::from_utf8_lossy(&out.stderr).trim().to_string())
}

impl Control {
    /// Starts the server in `ns` on `ip:8443` with HTTPS and, if given, a policy file.
    pub fn start(lab: &mut Lab, ns: usize, ip: &str, policy: Option<&str>) -> Self {
        Self::start_with(lab, ns, ip, policy, &[])
    }

    /// `start`, with more `control serve` flags.
    pub fn start_with(lab: &mut Lab, ns: usize, ip: &str, policy: Option<&str>, extra: &[&str]) -> Self {
        make_certificates(lab, ip);
        let mut control = Control {
            ns,
            process: 0,
            url: format!("https://{ip}:8443"),
            ca: lab.path("ca.pem").to_str().unwrap().to_string(),
            token: format!("file:{}", lab.path("control-data").join("admin-token").display()),
            listen: format!("{ip}:8443"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let policy = policy.map(|p| lab.write("policy.hujson", p));
        control.process = control.spawn(lab, policy, "control");
        control
    }

    fn spawn(&self, lab: &mut Lab, policy: Option<PathBuf>, name: &str) -> usize {
        let data = lab.path("control-data");
        let (cert, key) = (lab.path("server.pem"), lab.path("server.key"));
        let mut args = vec!["control", "serve", "--listen", &self.listen, "--data-dir", data.to_str().unwrap()];
        args.extend(["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
        let policy_text = policy.as_ref().map(|p| p.to_str().unwrap().to_string());
        if let Some(p) = &policy_text {
            args.extend(["--policy", p.as_str()]);
        }
        args.extend(self.extra.iter().map(String::as_str));
        let p = lab.spawn(self.ns, name, MESHD, &args, &[]);
        wait_for_server(lab, p);
        p
    }

    /// Stops the server (SIGTERM, then waits).
    pub fn stop(&self, lab: &mut Lab) {
        lab.process(self.process).stop(Duration::from_secs(5));
    }

    /// Starts it again on the same data directory.
    pub fn restart(&mut self, lab: &mut Lab) {
        let policy = Some(lab.path("policy.hujson")).filter(|p| p.exists());
        self.process = self.spawn(lab, policy, "control-again");
    }

    /// `meshd control ARGS` with this server's URL, token and CA.
    pub fn admin(&self, lab: &Lab, args: &[&str]) -> Outcome {
        let mut all: Vec<&str> = vec!["control"];
        all.extend_from_slice(args);
        all.extend(["--control-url", &self.url, "--admin-token", &self.token, "--ca-cert", &self.ca]);
        outcome(&lab.ns(self.ns).exec(MESHD, &all))
    }

    /// A new auth key made with `authkey create ARGS`.
    pub fn authkey(&self, lab: &Lab, args: &[&str]) -> String {
        let mut all = vec!["authkey", "create"];
        all.extend_from_slice(args);
        let (status, key, err) = self.admin(lab, &all);
        assert_eq!(status, Some(0), "authkey create: {err}");
        key
    }
}

/// A managed node: `meshd daemon` without --config, its socket and state in the lab directory.
pub struct Node {
    pub ns: usize,
    pub name: String,
    pub tun: String,
    pub process: usize,
    socket: String,
    env: Vec<(String, String)>,
}

impl Node {
    pub fn start(lab: &mut Lab, ns: usize, name: &str) -> Self {
        Self::start_with_env(lab, ns, name, &[])
    }

    /// `start`, with more environment for the daemon (fault injection).
    pub fn start_with_env(lab: &mut Lab, ns: usize, name: &str, env: &[(&str, &str)]) -> Self {
        let tun = lab.unique(&format!("m{name}"));
        let socket = lab.path(&format!("{name}.sock")).to_str().unwrap().to_string();
        let mut node = Node { ns, name: name.to_string(), tun, process: 0, socket, env: Vec::new() };
        node.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        node.process = node.spawn(lab, name);
        node
    }

    fn spawn(&self, lab: &mut Lab, log_name: &str) -> usize {
        let state = lab.path(&format!("{}-state", self.name)).to_str().unwrap().to_string();
        let run = lab.path(&format!("{}-run", self.name)).to_str().unwrap().to_string();
        let args = [
            "daemon",
            "--socket",
            &self.socket,
            "--state-dir",
            &state,
            "--tun",
            &self.tun,
            "--port",
            "41641",
            "--uapi-dir",
            &run,
            "--run-dir",
            &run,
        ];
        let mut env = vec![("MESHD_LOG", "debug,ureq=info,ureq_proto=info,rustls=info")];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let p = lab.spawn(self.ns, log_name, MESHD, &args, &env);
        let socket = PathBuf::from(&self.socket);
        assert!(
            wait_until(Duration::from_secs(10), Duration::from_millis(50), || socket.exists()
                && lab.process(p).log_text().contains("meshd is up")),
            "the daemon did not start:\n{}",
            lab.process(p).log_text()
        );
        p
    }

    /// Starts the daemon again after it stopped or was killed.
    pub fn restart(&mut self, lab: &mut Lab, log_name: &str) {
        self.process = self.spawn(lab, log_name);
    }

    /// `meshd ARGS --socket S`.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> Outcome {
        let mut all = args.to_vec();
        all.extend(["--socket", &self.socket]);
        outcome(&lab.ns(self.ns).exec(MESHD, &all))
    }

    /// `meshd up` against `control` with `key` and `extra` flags; panics unless it connects. Returns the
    /// mesh IPv4 it printed.
    pub fn up(&self, lab: &Lab, control: &Control, key: &str, extra: &[&str]) -> String {
        let mut args = vec!["up", "--control-url", &control.url, "--ca-cert", &control.ca, "--auth-key", key];
        args.extend(["--hostname", &self.name, "--timeout", "20s"]);
        args.extend_from_slice(extra);
        let (status, ip, err) = self.cli(lab, &args);
        assert_eq!(status, Some(0), "meshd up on {}: {err}", self.name);
        ip
    }

    pub fn status(&self, lab: &Lab) -> serde_json::Value {
        let (status, text, err) = self.cli(lab, &["status", "--json"]);
        assert_eq!(status, Some(0), "status: {err}");
        serde_json::from_str(&text).unwrap()
    }

    /// The routes in the node's table 52, one per line as `ip route show table 52` prints them.
    pub fn table52(&self, lab: &Lab) -> String {
        stdout(&lab.ns(self.ns).ip(&["route", "show", "table", "52"]))
    }
}
