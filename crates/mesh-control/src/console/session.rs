//! The console's sign-ins: sessions, their CSRF tokens and one-time sign-in links, with time passed in so
//! expiry is tested without waiting. Only hashes of the secrets are kept, as for the admin token: a memory
//! dump or a debug print shows nothing a browser could replay.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// How long a sign-in lasts (seconds). A working day: an administrator is not asked again mid-task, and a
/// cookie left on a shared machine dies by night.
pub const SESSION_LIFETIME: u64 = 8 * 3600;
/// How long a link from `meshd control admin-link` may be used (seconds).
pub const LINK_LIFETIME: u64 = 10 * 60;
/// Sessions kept at once; the oldest goes first. One administrator signs in from a few browsers, and a
/// flood of valid sign-ins (which need the token) cannot grow the table without bound.
const MAX_SESSIONS: usize = 64;
/// Unused links kept at once.
const MAX_LINKS: usize = 16;

/// A signed-in browser.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// Every state-changing form carries it; a page on another site cannot read it.
    pub csrf: String,
    pub created_at: u64,
    pub expires_at: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the CSRF token: like every other secret, it stays out of output.
        f.debug_struct("Session").field("created_at", &self.created_at).field("expires_at", &self.expires_at).finish()
    }
}

/// What a change leaves for the page its redirect leads to, shown once: a new key's secret (so a reload
/// or the back button shows it no more, and makes no second key), or what a new policy took back.
#[derive(Clone, PartialEq, Eq)]
pub enum Flash {
    Key { id: u64, secret: String, summary: String },
    TakenBack(Vec<String>),
}

impl std::fmt::Debug for Flash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key { id, .. } => f.debug_struct("Key").field("id", id).finish_non_exhaustive(),
            Self::TakenBack(items) => f.debug_tuple("TakenBack").field(items).finish(),
        }
    }
}

#[derive(Default)]
pub struct Sessions {
    /// By the SHA-256 of the cookie's value.
    sessions: HashMap<String, Session>,
    /// At most one per session, by the same key.
    flashes: HashMap<String, Flash>,
    /// By the SHA-256 of the link's token: when it stops working.
    links: HashMap<String, u64>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("sessions", &self.sessions.len())
            .field("links", &self.links.len())
            .field("flashes", &self.flashes.len())
            .finish()
    }
}

pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    hex::encode(bytes)
}

fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Equal strings, compared in time that does not depend on where they differ (for the CSRF token, which a
/// page could otherwise guess byte by byte from response times).
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    /// A new session; returns the cookie's value and the session.
    pub fn create(&mut self, now: u64) -> (String, Session) {
        self.sweep(now);
        while self.sessions.len() >= MAX_SESSIONS {
            let oldest = self.sessions.iter().min_by_key(|(_, s)| s.created_at).map(|(k, _)| k.clone());
            match oldest {
                Some(key) => {
                    self.flashes.remove(&key);
                    self.sessions.remove(&key)
                }
                None => break,
            };
        }
        let cookie = random_token();
        let session = Session { csrf: random_token(), created_at: now, expires_at: now + SESSION_LIFETIME };
        self.sessions.insert(hash(&cookie), session.clone());
        (cookie, session)
    }

    /// The live session a cookie names.
    pub fn get(&mut self, cookie: &str, now: u64) -> Option<Session> {
        let key = hash(cookie);
        match self.sessions.get(&key) {
            Some(session) if session.expires_at > now => Some(session.clone()),
            Some(_) => {
                self.sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Signs a browser out: its cookie names nothing from now on.
    pub fn remove(&mut self, cookie: &str) {
        self.sessions.remove(&hash(cookie));
        self.flashes.remove(&hash(cookie));
    }

    /// Leaves `flash` for the session's next page (replacing one not yet shown).
    pub fn set_flash(&mut self, cookie: &str, flash: Flash) {
        let key = hash(cookie);
        if self.sessions.contains_key(&key) {
            self.flashes.insert(key, flash);
        }
    }

    /// The flash left for this session, once.
    pub fn take_flash(&mut self, cookie: &str) -> Option<Flash> {
        self.flashes.remove(&hash(cookie))
    }

    /// A one-time sign-in link's token.
    pub fn create_link(&mut self, now: u64) -> String {
        self.sweep(now);
        while self.links.len() >= MAX_LINKS {
            let oldest = self.links.iter().min_by_key(|(_, expires)| **expires).map(|(k, _)| k.clone());
            match oldest {
                Some(key) => self.links.remove(&key),
                None => break,
            };
        }
        let token = random_token();
        self.links.insert(hash(&token), now + LINK_LIFETIME);
        token
    }

    /// Uses a link: true once, while it lives.
    pub fn redeem_link(&mut self, token: &str, now: u64) -> bool {
        self.links.remove(&hash(token)).is_some_and(|expires| expires > now)
    }

    fn sweep(&mut self, now: u64) {
        self.sessions.retain(|_, s| s.expires_at > now);
        let sessions = &self.sessions;
        self.flashes.retain(|key, _| sessions.contains_key(key));
        self.links.retain(|_, expires| *expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_its_lifetime_and_not_past_sign_out() {
        let mut sessions = Sessions::default();
        let (cookie, session) = sessions.create(1000);
        assert_eq!(sessions.get(&cookie, 1000 + SESSION_LIFETIME - 1), Some(session.clone()));
        assert_eq!(sessions.get(&cookie, 1000 + SESSION_LIFETIME), None, "expired");
        let (cookie, _) = sessions.create(5000);
        assert!(sessions.get("not a cookie", 5000).is_none());
        sessions.remove(&cookie);
        assert!(sessions.get(&cookie, 5000).is_none(), "signed out");
    }

    #[test]
    fn each_session_has_its_own_unguessable_csrf_token() {
        let mut sessions = Sessions::default();
        let (a_cookie, a) = sessions.create(0);
        let (b_cookie, b) = sessions.create(0);
        assert_ne!(a_cookie, b_cookie);
        assert_ne!(a.csrf, b.csrf);
        assert_eq!(a.csrf.len(), 64);
        assert!(same_secret(&a.csrf, &a.csrf.clone()));
        assert!(!same_secret(&a.csrf, &b.csrf));
        assert!(!same_secret(&a.csrf, ""));
    }

    #[test]
    fn the_oldest_session_goes_when_the_table_is_full() {
        let mut sessions = Sessions::default();
        let (first, _) = sessions.create(0);
        let rest: Vec<String> = (1..=MAX_SESSIONS as u64).map(|t| sessions.create(t).0).collect();
        assert!(sessions.get(&first, 100).is_none());
        assert!(rest.iter().all(|c| sessions.get(c, 100).is_some()));
    }

    #[test]
    fn a_flash_is_shown_once_to_its_own_session() {
        let mut sessions = Sessions::default();
        let (mine, _) = sessions.create(0);
        let (other, _) = sessions.create(0);
        sessions.set_flash(&mine, Flash::TakenBack(vec!["a: tag:x".into()]));
        sessions.set_flash("no such session", Flash::TakenBack(Vec::new()));
        assert_eq!(sessions.take_flash(&other), None);
        assert_eq!(sessions.take_flash(&mine), Some(Flash::TakenBack(vec!["a: tag:x".into()])));
        assert_eq!(sessions.take_flash(&mine), None, "once");
        sessions.set_flash(&mine, Flash::TakenBack(Vec::new()));
        sessions.remove(&mine);
        assert_eq!(sessions.take_flash(&mine), None, "signed out");
        assert_eq!(sessions.flashes.len(), 0);
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let mut sessions = Sessions::default();
        let (cookie, session) = sessions.create(0);
        let link = sessions.create_link(0);
        let flash = Flash::Key { id: 1, secret: "mkey-abc-0123456789".into(), summary: String::new() };
        sessions.set_flash(&cookie, flash.clone());
        let printed = format!("{sessions:?} {session:?} {flash:?}");
        for secret in [&cookie, &session.csrf, &link, &hash(&cookie), &hash(&link), &"mkey-abc-0123456789".to_string()]
        {
            assert!(!printed.contains(secret.as_str()), "{printed}");
        }
    }

    #[test]
    fn a_link_works_once_and_only_while_it_lives() {
        let mut sessions = Sessions::default();
        let link = sessions.create_link(0);
        assert!(sessions.redeem_link(&link, 10));
        assert!(!sessions.redeem_link(&link, 11), "used");
        let late = sessions.create_link(0);
        assert!(!sessions.redeem_link(&late, LINK_LIFETIME), "expired");
        assert!(!sessions.redeem_link("made up", 0));
    }
}
