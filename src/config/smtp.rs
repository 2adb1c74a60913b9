//! `[smtp]`: protocol choices for inbound mail (what to do with bare line endings).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndingPolicy {
    Reject,
    Normalize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smtp {
    /// What to do with a bare CR or LF in message content: "reject" (550 5.5.2) or "normalize".
    #[serde(default = "default_bare_line_endings")]
    pub bare_line_endings: BareLineEndingPolicy,
}

fn default_bare_line_endings() -> BareLineEndingPolicy {
    BareLineEndingPolicy::Reject
}

impl Default for Smtp {
    fn default() -> Smtp {
        Smtp {
            bare_line_endings: default_bare_line_endings(),
        }
    }
}
