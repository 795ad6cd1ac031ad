//! What each console page shows, as the templates in `templates/console/` read it: plain data made from the
//! store's records, so the templates hold no logic beyond loops and conditions.

use askama::Template;
use axum::http::StatusCode;
use mesh_proto::utc_text;
use similar::{ChangeTag, TextDiff};

use crate::control::{AdvertisedRoute, AuthKey, AuthKeyOptions, ControlError, NodeRecord, PolicyChange, StoredPolicy};
use crate::http::{AppState, ONLINE_WINDOW};

/// What every page's frame needs: its title, which tab is current, and the session's CSRF token for the
/// sign-out form (none on the signed-out pages).
#[derive(Debug, Clone)]
pub struct Layout {
    pub title: String,
    pub active: &'static str,
    pub csrf: Option<String>,
    pub note: Option<Note>,
}

impl Layout {
    pub fn signed_out(title: &str) -> Self {
        Self { title: title.to_string(), active: "", csrf: None, note: None }
    }

    /// The tabs, as (path, label, current).
    pub fn tabs(&self) -> Vec<(&'static str, &'static str, bool)> {
        [
            ("/admin/machines", "Machines", "machines"),
            ("/admin/keys", "Keys", "keys"),
            ("/admin/policy", "Policy", "policy"),
            ("/admin/dns", "DNS", "dns"),
            ("/admin/users", "Users", "users"),
        ]
        .into_iter()
        .map(|(path, label, name)| (path, label, name == self.active))
        .collect()
    }
}

/// What a change did, shown once on the page it led back to. A fixed set, named in the address by a code:
/// a link cannot make the console say something of its choosing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    Approved,
    Rejected,
    Renamed,
    Expired,
    Deleted,
    Revoked,
    KeyCreated,
    UserCreated,
    UserDeleted,
    MagicOn,
    MagicOff,
    PolicySaved,
    DnsSaved,
}

const NOTES: [(Note, &str, &str); 13] = [
    (Note::Approved, "approved", "Route approved. Nodes that accept routes have it within a second or two."),
    (Note::Rejected, "rejected", "Route rejected. Nodes drop it with their next netmap."),
    (Note::Renamed, "renamed", "Machine renamed."),
    (Note::Expired, "expired", "Machine expired: its peers drop it, and it must sign in again."),
    (Note::Deleted, "deleted", "Machine deleted."),
    (Note::Revoked, "revoked", "Auth key revoked."),
    (Note::KeyCreated, "key-created", "Auth key created. Copy it now: it is not shown again."),
    (Note::UserCreated, "user-created", "User created."),
    (Note::UserDeleted, "user-deleted", "User deleted."),
    (Note::MagicOn, "magic-on", "MagicDNS is on."),
    (Note::MagicOff, "magic-off", "MagicDNS is off."),
    (Note::PolicySaved, "policy-saved", "Policy saved as a new version. Nodes get it with their next netmap."),
    (Note::DnsSaved, "dns-saved", "DNS settings saved as a new version. Nodes get them with their next netmap."),
];

impl Note {
    pub fn code(self) -> &'static str {
        NOTES.iter().find(|(n, _, _)| *n == self).map_or("", |(_, code, _)| code)
    }

    pub fn text(&self) -> &'static str {
        NOTES.iter().find(|(n, _, _)| n == self).map_or("", |(_, _, text)| text)
    }

    pub fn from_code(code: &str) -> Option<Self> {
        NOTES.iter().find(|(_, c, _)| *c == code).map(|(n, _, _)| *n)
    }
}

/// How long ago, in the largest unit that fits: `just now`, `5 min ago`, `3 h ago`, `2 d ago`.
pub fn ago(then: u64, now: u64) -> String {
    let seconds = now.saturating_sub(then);
    match seconds {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86_400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86_400),
    }
}

/// How long until, as `ago` puts it.
fn within(then: u64, now: u64) -> String {
    let seconds = then.saturating_sub(now);
    match seconds {
        0..3600 => format!("in {} min", seconds.div_ceil(60)),
        3600..86_400 => format!("in {} h", seconds / 3600),
        _ => format!("in {} d", seconds / 86_400),
    }
}

#[derive(Debug, Clone)]
pub struct RouteRow {
    pub prefix: String,
    pub approved: bool,
    pub primary: bool,
}

#[derive(Debug, Clone)]
pub struct MachineRow {
    pub id: u64,
    pub name: String,
    pub fqdn: String,
    pub ipv4: String,
    pub ipv6: String,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ephemeral: bool,
    pub expired: bool,
    pub online: bool,
    pub last_seen: String,
    pub last_seen_utc: String,
    pub endpoints: Vec<String>,
    pub routes: Vec<RouteRow>,
    pub key_expiry: String,
}

impl MachineRow {
    /// Whether a filter's text (lower case) is in its name, a tag, its user or an address.
    pub fn matches(&self, needle: &str) -> bool {
        self.name.to_ascii_lowercase().contains(needle)
            || self.tags.iter().any(|t| t.contains(needle))
            || self.user.as_deref().is_some_and(|u| u.to_ascii_lowercase().contains(needle))
            || self.ipv4.contains(needle)
            || self.ipv6.contains(needle)
    }

    /// Its own page.
    pub fn page(&self) -> String {
        format!("/admin/machines/{}", self.id)
    }

    pub fn status(&self) -> &'static str {
        if self.expired {
            "expired"
        } else if self.online {
            "online"
        } else {
            "offline"
        }
    }

    pub fn owner(&self) -> String {
        if self.tags.is_empty() { self.user.clone().unwrap_or_else(|| "-".into()) } else { self.tags.join(", ") }
    }
}

pub fn machine_rows(state: &AppState, nodes: Vec<NodeRecord>, routes: &[AdvertisedRoute]) -> Vec<MachineRow> {
    let now = state.now();
    let domain = state.domain();
    nodes
        .into_iter()
        .map(|n| MachineRow {
            id: n.id,
            fqdn: format!("{}.{domain}", n.name),
            ipv4: n.ipv4.to_string(),
            ipv6: n.ipv6.to_string(),
            user: n.user,
            tags: n.tags,
            ephemeral: n.ephemeral,
            expired: n.expired,
            online: now.saturating_sub(n.last_seen) < ONLINE_WINDOW,
            last_seen: if n.last_seen == 0 { "never".into() } else { ago(n.last_seen, now) },
            last_seen_utc: if n.last_seen == 0 { String::new() } else { utc_text(n.last_seen) },
            endpoints: n.endpoints.iter().map(ToString::to_string).collect(),
            routes: routes
                .iter()
                .filter(|r| r.node == n.id)
                .map(|r| RouteRow { prefix: r.prefix.to_string(), approved: r.approved, primary: r.primary })
                .collect(),
            key_expiry: match n.key_expiry {
                None => "never".into(),
                Some(at) if at <= now => format!("expired {}", utc_text(at)),
                Some(at) => format!("{} ({})", within(at, now), utc_text(at)),
            },
            name: n.name,
        })
        .collect()
}

#[derive(Template)]
#[template(path = "console/error.html")]
pub struct ErrorPage {
    pub layout: Layout,
    pub message: String,
}

#[derive(Template)]
#[template(path = "console/refused.html")]
pub struct RefusedPage {
    pub layout: Layout,
    pub message: String,
    pub back: String,
}

#[derive(Template)]
#[template(path = "console/login.html")]
pub struct LoginPage {
    pub layout: Layout,
    pub csrf: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "console/link.html")]
pub struct LinkPage {
    pub layout: Layout,
    pub token: String,
    pub csrf: String,
}

#[derive(Template)]
#[template(path = "console/machines.html")]
pub struct MachinesPage {
    pub layout: Layout,
    pub machines: Vec<MachineRow>,
    pub total: usize,
    pub q: String,
    pub state: String,
}

#[derive(Template)]
#[template(path = "console/machine.html")]
pub struct MachinePage {
    pub layout: Layout,
    pub m: MachineRow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmAction {
    Expire,
    Delete,
}

impl ConfirmAction {
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Expire => "Expire",
            Self::Delete => "Delete",
        }
    }

    pub fn path(&self) -> &'static str {
        match self {
            Self::Expire => "expire",
            Self::Delete => "delete",
        }
    }

    pub fn consequence(&self) -> &'static str {
        match self {
            Self::Expire => {
                "Its peers drop it at once, and it cannot connect again until it signs in with a new auth key."
            }
            Self::Delete => {
                "It leaves the mesh: its peers drop it, its addresses are freed and its routes are gone. This cannot \
                 be undone; the machine must join again with an auth key."
            }
        }
    }
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
pub struct ConfirmPage {
    pub layout: Layout,
    pub m: MachineRow,
    pub action: ConfirmAction,
}

#[derive(Debug, Clone)]
pub struct KeyRow {
    pub id: u64,
    pub kind: String,
    pub tags: String,
    pub user: String,
    pub uses: u64,
    pub expires: String,
    pub usable: bool,
    pub state: &'static str,
}

impl KeyRow {
    pub fn new(k: AuthKey, now: u64) -> Self {
        let expired = k.expires_at.is_some_and(|at| at <= now);
        let used_up = !k.reusable && k.uses > 0;
        let state = if k.revoked {
            "revoked"
        } else if expired {
            "expired"
        } else if used_up {
            "used"
        } else {
            "usable"
        };
        Self {
            id: k.id,
            kind: kind(k.reusable, k.ephemeral),
            tags: if k.tags.is_empty() { "-".into() } else { k.tags.join(", ") },
            user: k.user.unwrap_or_else(|| "-".into()),
            uses: k.uses,
            expires: match k.expires_at {
                None => "never".into(),
                Some(at) => utc_text(at),
            },
            usable: state == "usable",
            state,
        }
    }
}

fn kind(reusable: bool, ephemeral: bool) -> String {
    let mut words = vec![if reusable { "reusable" } else { "one-off" }];
    if ephemeral {
        words.push("ephemeral");
    }
    words.join(", ")
}

/// What a just-made key is, shown beside its secret.
pub fn key_summary(options: &AuthKeyOptions) -> String {
    let mut text = kind(options.reusable, options.ephemeral);
    if !options.tags.is_empty() {
        text.push_str(&format!(", tags {}", options.tags.join(", ")));
    }
    if let Some(user) = &options.user {
        text.push_str(&format!(", for {user}"));
    }
    match options.expiry {
        None => text.push_str(", never expires"),
        Some(seconds) => text.push_str(&format!(", expires in {}", duration(seconds))),
    }
    text
}

fn duration(seconds: u64) -> String {
    if seconds.is_multiple_of(86_400) { format!("{} d", seconds / 86_400) } else { format!("{} h", seconds / 3600) }
}

/// The expiries the form offers.
pub const EXPIRIES: [(&str, &str); 6] =
    [("1h", "1 hour"), ("1d", "1 day"), ("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"), ("never", "never")];

pub fn parse_expiry(text: &str) -> Option<u64> {
    match text {
        "1h" => Some(3600),
        "1d" => Some(86_400),
        "7d" => Some(7 * 86_400),
        "30d" => Some(30 * 86_400),
        "90d" => Some(90 * 86_400),
        _ => None,
    }
}

#[derive(Clone)]
pub struct CreatedKey {
    pub id: u64,
    pub secret: String,
    pub summary: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secret: it is shown on one page and kept nowhere else.
        f.debug_struct("CreatedKey").field("id", &self.id).field("summary", &self.summary).finish_non_exhaustive()
    }
}

#[derive(Template)]
#[template(path = "console/keys.html")]
pub struct KeysPage {
    pub layout: Layout,
    pub keys: Vec<KeyRow>,
    pub users: Vec<String>,
    pub created: Option<CreatedKey>,
}

impl KeysPage {
    pub fn expiries(&self) -> &'static [(&'static str, &'static str)] {
        &EXPIRIES
    }
}

// ---- policy

/// One line of the submitted text, numbered, marked when an error names it.
#[derive(Debug, Clone)]
pub struct NumberedLine {
    pub number: usize,
    pub text: String,
    pub error: bool,
}

#[derive(Debug, Clone)]
pub struct ErrorLine {
    pub line: Option<usize>,
    pub message: String,
}

/// The line an error names: `policy:LINE:COLUMN: ...` (parsing) or `policy:LINE: test failed: ...`.
pub fn error_line(message: &str) -> Option<usize> {
    let rest = &message[message.find("policy:")? + "policy:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|&line| line > 0)
}

#[derive(Debug, Clone)]
pub struct DiffLine {
    /// `+`, `-` or a space.
    pub sign: char,
    pub old: Option<usize>,
    pub new: Option<usize>,
    pub text: String,
}

impl DiffLine {
    pub fn class(&self) -> &'static str {
        match self.sign {
            '+' => "add",
            '-' => "del",
            _ => "same",
        }
    }
}

/// The lines that differ, with three of context around each change; `None` between separate hunks.
pub fn line_diff(old: &str, new: &str) -> Vec<Option<DiffLine>> {
    let diff = TextDiff::from_lines(old, new);
    let mut lines = Vec::new();
    for (i, group) in diff.grouped_ops(3).iter().enumerate() {
        if i > 0 {
            lines.push(None);
        }
        for op in group {
            for change in diff.iter_changes(op) {
                let sign = match change.tag() {
                    ChangeTag::Delete => '-',
                    ChangeTag::Insert => '+',
                    ChangeTag::Equal => ' ',
                };
                lines.push(Some(DiffLine {
                    sign,
                    old: change.old_index().map(|i| i + 1),
                    new: change.new_index().map(|i| i + 1),
                    text: change.value().trim_end_matches(['\n', '\r']).to_string(),
                }));
            }
        }
    }
    lines
}

#[derive(Debug)]
pub enum PolicyOutcome {
    Checked,
    Diff { diff: Vec<Option<DiffLine>>, change: PolicyChange },
}

/// A submitted policy, the version its page was made from, and what became of it (a save that worked
/// redirects instead).
#[derive(Debug)]
pub struct PolicyEdit {
    pub text: String,
    pub base: u64,
    pub outcome: Result<PolicyOutcome, ControlError>,
}

#[derive(Debug, Clone)]
pub struct HistoryRow {
    pub version: u64,
    pub set_by: String,
    pub set_at: String,
    pub ago: String,
}

impl HistoryRow {
    /// A stored version of the policy or the DNS settings, as the pages list it.
    fn of(stored: &StoredPolicy, now: u64) -> Self {
        Self {
            version: stored.version,
            set_by: stored.set_by.clone(),
            set_at: utc_text(stored.set_at),
            ago: ago(stored.set_at, now),
        }
    }
}

#[derive(Template)]
#[template(path = "console/policy.html")]
pub struct PolicyPage {
    pub layout: Layout,
    pub text: String,
    pub current: Option<HistoryRow>,
    pub history: Vec<HistoryRow>,
    pub errors: Vec<ErrorLine>,
    /// The submitted text, numbered, when it has errors.
    pub listing: Vec<NumberedLine>,
    pub checked: bool,
    pub diff: Option<Vec<Option<DiffLine>>>,
    /// What a save would take back (a preview) or took back (`revoked_by_save`: the save just made).
    pub revoked: Vec<String>,
    pub revoked_by_save: bool,
    /// The stored version the editor's text is based on (0: none yet); a save over another is refused.
    pub base: u64,
}

impl PolicyPage {
    /// `history` newest first: its first is the policy in force.
    pub fn new(
        layout: Layout,
        history: Vec<StoredPolicy>,
        edit: Option<PolicyEdit>,
        taken_back: Vec<String>,
        now: u64,
    ) -> Self {
        let current = history.first();
        let mut page = Self {
            layout,
            text: current.map_or_else(|| "{}\n".to_string(), |p| p.text.clone()),
            current: current.map(|p| HistoryRow::of(p, now)),
            history: history.iter().map(|p| HistoryRow::of(p, now)).collect(),
            errors: Vec::new(),
            listing: Vec::new(),
            checked: false,
            diff: None,
            revoked_by_save: !taken_back.is_empty(),
            revoked: taken_back,
            base: current.map_or(0, |p| p.version),
        };
        let Some(edit) = edit else { return page };
        page.text = edit.text;
        page.base = edit.base;
        match edit.outcome {
            Ok(PolicyOutcome::Checked) => page.checked = true,
            Ok(PolicyOutcome::Diff { diff, change }) => {
                page.diff = Some(diff);
                page.revoked = change.taken_back().cloned().collect();
            }
            Err(e) => {
                page.errors = e
                    .message
                    .lines()
                    .map(|line| ErrorLine { line: error_line(line), message: line.to_string() })
                    .collect();
                let marked: Vec<usize> = page.errors.iter().filter_map(|e| e.line).collect();
                page.listing = page
                    .text
                    .lines()
                    .enumerate()
                    .map(|(i, text)| NumberedLine {
                        number: i + 1,
                        text: text.to_string(),
                        error: marked.contains(&(i + 1)),
                    })
                    .collect();
            }
        }
        page
    }

    /// A refused policy answers 422, so scripts and tests tell it from a saved one.
    pub fn status(&self) -> StatusCode {
        if self.errors.is_empty() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY }
    }

    /// Rows for the editor: the text's lines and a few to spare.
    pub fn rows(&self) -> usize {
        (self.text.lines().count() + 3).clamp(12, 40)
    }
}

// ---- DNS

/// Submitted DNS settings, the version their page was made from, and whether they check (a save that
/// worked redirects instead).
#[derive(Debug)]
pub struct DnsEdit {
    pub text: String,
    pub base: u64,
    pub outcome: Result<(), String>,
}

#[derive(Debug, Clone)]
pub struct NameRow {
    pub name: String,
    pub fqdn: String,
    pub addresses: String,
}

#[derive(Template)]
#[template(path = "console/dns.html")]
pub struct DnsPage {
    pub layout: Layout,
    pub domain: String,
    pub magic_dns: bool,
    pub override_local_dns: bool,
    pub nameservers: Vec<String>,
    pub split: Vec<(String, String)>,
    pub search_domains: Vec<String>,
    pub records: Vec<(String, String, String)>,
    pub names: Vec<NameRow>,
    pub text: String,
    pub version: Option<HistoryRow>,
    pub error: Option<String>,
    pub checked: bool,
    pub base: u64,
}

impl DnsPage {
    pub fn new(
        layout: Layout,
        stored: Option<StoredPolicy>,
        config: mesh_proto::DnsConfig,
        domain: String,
        nodes: Vec<NodeRecord>,
        edit: Option<DnsEdit>,
        now: u64,
    ) -> Self {
        let mut page = Self {
            layout,
            magic_dns: config.magic_dns,
            override_local_dns: config.override_local_dns,
            nameservers: config.nameservers.iter().map(ToString::to_string).collect(),
            split: config
                .split
                .iter()
                .map(|(zone, list)| {
                    let servers: Vec<String> = list.iter().map(ToString::to_string).collect();
                    (zone.clone(), if servers.is_empty() { "answered locally".into() } else { servers.join(", ") })
                })
                .collect(),
            search_domains: config.search_domains.clone(),
            records: config
                .extra_records
                .iter()
                .map(|r| (r.name.clone(), format!("{:?}", r.kind), r.value.to_string()))
                .collect(),
            names: nodes
                .iter()
                .filter(|n| !n.expired)
                .map(|n| NameRow {
                    name: n.name.clone(),
                    fqdn: format!("{}.{domain}", n.name),
                    addresses: format!("{}, {}", n.ipv4, n.ipv6),
                })
                .collect(),
            domain,
            text: stored.as_ref().map_or_else(|| "{}\n".to_string(), |s| s.text.clone()),
            version: stored.as_ref().map(|s| HistoryRow::of(s, now)),
            error: None,
            checked: false,
            base: stored.as_ref().map_or(0, |s| s.version),
        };
        if let Some(edit) = edit {
            page.text = edit.text;
            page.base = edit.base;
            match edit.outcome {
                Ok(()) => page.checked = true,
                Err(e) => page.error = Some(e),
            }
        }
        page
    }

    pub fn status(&self) -> StatusCode {
        if self.error.is_some() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK }
    }
}

/// The settings text with `magic_dns` set to `on`: the value replaced where it is written, or the key added
/// first in the object, so the rest of the text and its comments stay as the administrator wrote them.
pub fn set_magic_dns(text: &str, on: bool) -> Result<String, String> {
    use jsonc_parser::ast::Value;
    use jsonc_parser::common::Ranged;
    let parsed = jsonc_parser::parse_to_ast(text, &Default::default(), &crate::policy::parse::hujson())
        .map_err(|e| format!("dns: {e}"))?;
    let Some(Value::Object(object)) = parsed.value else {
        return Err("dns: the stored settings are not an object".into());
    };
    let value = if on { "true" } else { "false" };
    if let Some(prop) = object.properties.iter().find(|p| p.name.as_str() == "magic_dns") {
        let range = prop.value.range();
        return Ok(format!("{}{value}{}", &text[..range.start], &text[range.end..]));
    }
    let open = object.range.start + 1;
    let after = if object.properties.is_empty() { "\n" } else { "," };
    Ok(format!("{}\n  \"magic_dns\": {value}{after}{}", &text[..open], &text[open..]))
}

#[derive(Template)]
#[template(path = "console/users.html")]
pub struct UsersPage {
    pub layout: Layout,
    pub users: Vec<crate::User>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ages() {
        assert_eq!(ago(100, 130), "just now");
        assert_eq!(ago(0, 7200), "2 h ago");
        assert_eq!(within(3 * 86_400 + 5, 0), "in 3 d");
    }

    #[test]
    fn error_lines_are_found_in_both_shapes() {
        assert_eq!(error_line("policy:3:14: expected a comma"), Some(3));
        assert_eq!(error_line("policy:12: test failed: alice@ -> db:5432 is denied"), Some(12));
        assert_eq!(error_line("no place named"), None);
    }

    #[test]
    fn the_diff_has_changes_with_context_and_line_numbers() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n";
        let new = "a\nb\nc\nd\nE\nf\ng\nh\ni\nj\n";
        let diff: Vec<DiffLine> = line_diff(old, new).into_iter().flatten().collect();
        let changed: Vec<(char, Option<usize>, Option<usize>, &str)> =
            diff.iter().filter(|l| l.sign != ' ').map(|l| (l.sign, l.old, l.new, l.text.as_str())).collect();
        assert_eq!(changed, [('-', Some(5), None, "e"), ('+', None, Some(5), "E")]);
        assert_eq!(diff.len(), 2 + 6, "three lines of context each side");
        assert!(line_diff("same\n", "same\n").is_empty());
    }

    #[test]
    fn magic_dns_is_set_where_it_is_written_and_comments_stay() {
        let text = "{\n  // the office resolver\n  \"magic_dns\": false,\n  \"search_domains\": [\"corp\"],\n}\n";
        let on = set_magic_dns(text, true).unwrap();
        assert_eq!(on, text.replace("false", "true"));
        assert_eq!(set_magic_dns("{}", false).unwrap(), "{\n  \"magic_dns\": false\n}");
        let added = set_magic_dns("{ \"search_domains\": [] }", true).unwrap();
        assert!(crate::dns::parse(&added, "mesh.internal").unwrap().magic_dns);
        assert!(set_magic_dns("[]", true).is_err());
    }

    #[test]
    fn notes_round_trip_and_unknown_codes_say_nothing() {
        for (note, code, _) in NOTES {
            assert_eq!(Note::from_code(code), Some(note));
            assert_eq!(note.code(), code);
        }
        assert_eq!(Note::from_code("<script>"), None);
    }
}
