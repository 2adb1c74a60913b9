//! Who an authenticated client is, and which envelope senders it may use (`auth.sender_must_match`).

/// An authenticated user and the envelope senders it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Lower-case addresses, or `@domain` for a whole domain. The user name counts when it
    /// contains `@`.
    senders: Vec<String>,
}

impl Identity {
    pub fn new(user: &str, senders: &[String]) -> Identity {
        let mut all = Vec::with_capacity(senders.len() + 1);
        if user.contains('@') {
            all.push(user.to_ascii_lowercase());
        }
        all.extend(senders.iter().map(|s| s.to_ascii_lowercase()));
        Identity {
            user: user.to_string(),
            senders: all,
        }
    }

    /// Whether this user may use `sender` (an address as written in MAIL FROM, without angle
    /// brackets) as its envelope sender. Domains compare case-insensitively, and so do local
    /// parts (as nearly every mail system treats them).
    pub fn may_send_as(&self, sender: &[u8]) -> bool {
        let Ok(sender) = std::str::from_utf8(sender) else {
            return false;
        };
        let sender = sender.to_ascii_lowercase();
        let domain = sender.rsplit_once('@').map(|(_, d)| d);
        self.senders.iter().any(|allowed| match allowed.strip_prefix('@') {
            Some(d) => domain == Some(d),
            None => *allowed == sender,
        })
    }
}
