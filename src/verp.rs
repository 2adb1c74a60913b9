//! Signed VERP return paths in the server (docs/bounces.md, "Asynchronous bounces and
//! complaints"): the process-wide [`gannet_bounce::verp::Verp`] made at start from
//! `[verp]` and its key file, the return path each delivery uses, and the RCPT check for the
//! bounce domain (only return paths and the complaints address have mailboxes there).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;

use gannet_bounce::verp::Verp;

use crate::config::Config;

/// The shortest key accepted.
const SECRET_BYTES_MIN: usize = 16;
/// The key file made when none is configured.
pub const KEY_FILE: &str = "verp.key";

/// The signer, the complaints address and where complaints' entries go.
pub struct Shell {
    pub verp: Verp,
    /// Lowercase.
    pub complaints: String,
    pub complaint_scope_sender_domain: bool,
}

static SHELL: OnceLock<Shell> = OnceLock::new();

/// The VERP shell, when `[verp] enabled`.
pub fn get() -> Option<&'static Shell> {
    SHELL.get()
}

/// Reads (or makes) the key and sets the shell up; called once at start.
pub fn open(config: &Config) -> Result<(), String> {
    let v = &config.verp;
    if !v.enabled {
        return Ok(());
    }
    let secret = match &v.secret_file {
        Some(path) => {
            std::fs::read(path).map_err(|e| format!("cannot read verp.secret_file {}: {e}", path.display()))?
        }
        None => key_in_spool(&config.spool.directory)?,
    };
    let secret = trim_ascii(&secret);
    if secret.len() < SECRET_BYTES_MIN {
        return Err(format!(
            "the VERP key is {} bytes; it must have at least {SECRET_BYTES_MIN} (e.g. head -c 32 /dev/urandom | base64 > verp.key)",
            secret.len()
        ));
    }
    let shell = Shell {
        verp: Verp::new(secret, &v.prefix, &v.domain),
        complaints: v.complaints(),
        complaint_scope_sender_domain: v.complaint_scope == "sender-domain",
    };
    SHELL
        .set(shell)
        .map_err(|_| "the VERP shell was set up twice".to_string())
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// `<spool>/verp.key`, made (32 random bytes as hex, mode 0600, synced) if it is missing.
fn key_in_spool(spool: &Path) -> Result<Vec<u8>, String> {
    let path = spool.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => return Ok(bytes),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot read {}: {e}", path.display()))
        }
        Err(_) => {}
    }
    let random = gannet_bounce::verp::new_secret().ok_or("no randomness for the VERP key")?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(hex.as_bytes())?;
            f.sync_all()
        });
    made.map_err(|e| format!("cannot make the VERP key {}: {e}", path.display()))?;
    tracing::info!("made the VERP key {}", path.display());
    Ok(hex.into_bytes())
}

impl Shell {
    /// The return path for recipient `index` (`recipient`) of message `message_id`.
    pub fn return_path(&self, message_id: &str, index: u32, recipient: &[u8]) -> Vec<u8> {
        self.verp
            .address(message_id, index, &String::from_utf8_lossy(recipient))
            .into_bytes()
    }

    /// Whether `local` (at the bounce domain) has a mailbox: a return path or the complaints
    /// address.
    pub fn has_mailbox(&self, local: &str) -> bool {
        let complaints_local = self.complaints.rsplit_once('@').map_or("", |(l, _)| l);
        local.eq_ignore_ascii_case(complaints_local) || self.verp.parse_local(local).is_some()
    }
}

/// The RCPT check for local domains: at the bounce domain, only return paths and the
/// complaints address are mailboxes.
pub fn unknown_local(recipient: &gannet_smtp::address::Mailbox<'_>) -> Option<String> {
    let shell = get()?;
    if !recipient.domain.eq_ignore_ascii_case(shell.verp.domain().as_bytes()) {
        return None;
    }
    let local = String::from_utf8_lossy(recipient.local);
    if shell.has_mailbox(&local) {
        return None;
    }
    Some("no such mailbox at the bounce domain; bounces come back to the return path they were sent from".into())
}
