//! The coordination server's metrics, in the Prometheus/OpenMetrics text format (`meshd control serve
//! --metrics ADDR`), with prometheus-client, the Prometheus project's own Rust client. Labels are bounded:
//! a route is its template (`/api/v1/admin/nodes/{id}`, never the id), a status is its class.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::http::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route's template, `unmatched` for none.
    route: String,
    method: String,
    /// `2xx`, `4xx`...
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

fn request_histogram() -> Histogram {
    // 1 ms to about 33 s: an admin verb, a registration, and a long poll (25 s) each have a bucket.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Debug)]
pub struct ControlMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    netmap_build: Histogram,
    nodes: Family<StateLabels, Gauge>,
    long_polls: Gauge,
    version: Gauge,
    sign_ins: Family<ResultLabels, Counter>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(request_histogram);
        registry.register(
            "meshd_control_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method and status class (long polls wait up to 25 s)",
            requests.clone(),
        );
        let netmap_build = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "meshd_control_netmap_build_seconds",
            "Time to build the snapshot every node's netmap of a version is made from",
            netmap_build.clone(),
        );
        let nodes = Family::<StateLabels, Gauge>::default();
        registry.register(
            "meshd_control_nodes",
            "Nodes by state: online (polled within 60 s), offline, expired",
            nodes.clone(),
        );
        let long_polls = Gauge::default();
        registry.register("meshd_control_long_polls", "Netmap long polls waiting for a change", long_polls.clone());
        let version = Gauge::default();
        registry.register(
            "meshd_control_netmap_version",
            "The netmap version: it grows with every change",
            version.clone(),
        );
        let sign_ins = Family::<ResultLabels, Counter>::default();
        registry.register(
            "meshd_control_console_sign_ins",
            "Admin console sign-in attempts by result (ok, wrong, limited, expired_form)",
            sign_ins.clone(),
        );
        // Every result from the start, at zero: a rate over a series that appears only with the first
        // attempt would miss it.
        for result in ["ok", "wrong", "limited", "expired_form"] {
            sign_ins.get_or_create(&ResultLabels { result }).inc_by(0);
        }
        Self { registry, requests, netmap_build, nodes, long_polls, version, sign_ins }
    }
}

impl ControlMetrics {
    pub(crate) fn netmap_built(&self, seconds: f64) {
        self.netmap_build.observe(seconds);
    }

    pub(crate) fn sign_in(&self, result: &'static str) {
        self.sign_ins.get_or_create(&ResultLabels { result }).inc();
    }
}

/// Times every request; the label is the route's template, so ids and names never become labels.
pub(crate) async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_string();
    let method = request.method().as_str().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    let status = format!("{}xx", response.status().as_u16() / 100);
    state
        .metrics()
        .requests
        .get_or_create(&RequestLabels { route, method, status })
        .observe(start.elapsed().as_secs_f64());
    response
}

/// The text a scrape gets: the gauges read now from the store and the server, then everything encoded.
pub async fn render(state: &Arc<AppState>) -> Result<String, crate::ControlError> {
    let (online, offline, expired, version) = state.node_counts().await?;
    let m = state.metrics();
    m.nodes.get_or_create(&StateLabels { state: "online" }).set(online);
    m.nodes.get_or_create(&StateLabels { state: "offline" }).set(offline);
    m.nodes.get_or_create(&StateLabels { state: "expired" }).set(expired);
    m.long_polls.set(state.waiting_polls() as i64);
    m.version.set(version);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &m.registry).expect("writing to a String");
    Ok(text)
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
