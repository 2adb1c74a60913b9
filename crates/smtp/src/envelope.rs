//! The envelope of one mail transaction: who it is from, who it is for, and the ESMTP parameters
//! that must travel with it (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 DSN).
//!
//! Addresses live in one byte arena per transaction, so a warmed-up session allocates nothing
//! per recipient.

use std::net::IpAddr;
use std::ops::Range;

/// RFC 6152 BODY parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    Unspecified,
    SevenBit,
    EightBitMime,
}

/// RFC 3461 RET parameter: how much of the message a failure notice returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ret {
    #[default]
    Unspecified,
    Full,
    Headers,
}

/// RFC 3461 NOTIFY flags, as a bit set. Zero means "not given" (the default: failures only).
pub mod notify {
    pub const NEVER: u8 = 1;
    pub const SUCCESS: u8 = 2;
    pub const FAILURE: u8 = 4;
    pub const DELAY: u8 = 8;
}

/// One recipient: ranges into the envelope's arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub address: Range<u32>,
    pub notify: u8,
    /// RFC 3461 ORCPT (`addr-type;xtext`), empty when not given.
    pub orcpt: Range<u32>,
}

/// Where and when a message came from: recorded in the spool beside the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a [u8],
    pub received_unix_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    arena: Vec<u8>,
    sender: Range<u32>,
    recipients: Vec<Recipient>,
    pub body: BodyType,
    pub smtputf8: bool,
    pub size_declared_bytes: Option<u64>,
    pub ret: Ret,
    envid: Range<u32>,
}

impl Envelope {
    /// Empties the envelope but keeps its memory.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.recipients.clear();
        self.sender = 0..0;
        self.envid = 0..0;
        self.body = BodyType::Unspecified;
        self.smtputf8 = false;
        self.size_declared_bytes = None;
        self.ret = Ret::Unspecified;
    }

    fn push(&mut self, bytes: &[u8]) -> Range<u32> {
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(bytes);
        start..self.arena.len() as u32
    }

    fn get(&self, range: &Range<u32>) -> &[u8] {
        &self.arena[range.start as usize..range.end as usize]
    }

    /// Sets the sender (empty for the null reverse-path) from a writer of the address bytes.
    pub fn set_sender(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.arena.len() as u32;
        write(&mut self.arena);
        self.sender = start..self.arena.len() as u32;
    }

    pub fn set_envid(&mut self, envid: &[u8]) {
        self.envid = self.push(envid);
    }

    pub fn add_recipient(&mut self, write: impl FnOnce(&mut Vec<u8>), notify: u8, orcpt: &[u8]) {
        let start = self.arena.len() as u32;
        write(&mut self.arena);
        let address = start..self.arena.len() as u32;
        let orcpt = self.push(orcpt);
        self.recipients.push(Recipient { address, notify, orcpt });
    }

    pub fn sender(&self) -> &[u8] {
        self.get(&self.sender)
    }

    pub fn envid(&self) -> &[u8] {
        self.get(&self.envid)
    }

    pub fn recipient_count(&self) -> usize {
        self.recipients.len()
    }

    pub fn recipients(&self) -> impl Iterator<Item = (&[u8], u8, &[u8])> + '_ {
        self.recipients
            .iter()
            .map(|r| (self.get(&r.address), r.notify, self.get(&r.orcpt)))
    }
}

/// A recipient as stored in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecipient {
    pub address: Vec<u8>,
    pub notify: u8,
    pub orcpt: Vec<u8>,
}

/// An envelope as stored in the spool and read back from it (the owned form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    pub received_unix_s: u64,
    pub client_ip: IpAddr,
    pub smtputf8: bool,
    pub body: BodyType,
    pub ret: Ret,
    pub size_declared_bytes: Option<u64>,
    pub helo: Vec<u8>,
    pub sender: Vec<u8>,
    pub envid: Vec<u8>,
    pub recipients: Vec<StoredRecipient>,
}

impl StoredEnvelope {
    /// The stored form of a live session's envelope.
    pub fn from_envelope(envelope: &Envelope, origin: Origin<'_>) -> StoredEnvelope {
        StoredEnvelope {
            received_unix_s: origin.received_unix_s,
            client_ip: origin.client_ip,
            smtputf8: envelope.smtputf8,
            body: envelope.body,
            ret: envelope.ret,
            size_declared_bytes: envelope.size_declared_bytes,
            helo: origin.helo.to_vec(),
            sender: envelope.sender().to_vec(),
            envid: envelope.envid().to_vec(),
            recipients: envelope
                .recipients()
                .map(|(address, notify, orcpt)| StoredRecipient {
                    address: address.to_vec(),
                    notify,
                    orcpt: orcpt.to_vec(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_addresses_in_one_arena_and_reuses_it() {
        let mut env = Envelope::default();
        env.set_sender(|out| out.extend_from_slice(b"a@x.example"));
        env.add_recipient(
            |out| out.extend_from_slice(b"b@y.example"),
            notify::FAILURE,
            b"rfc822;b@y.example",
        );
        env.add_recipient(|out| out.extend_from_slice(b"c@y.example"), 0, b"");
        assert_eq!(env.sender(), b"a@x.example");
        let got: Vec<_> = env.recipients().collect();
        assert_eq!(
            got[0],
            (&b"b@y.example"[..], notify::FAILURE, &b"rfc822;b@y.example"[..])
        );
        assert_eq!(got[1], (&b"c@y.example"[..], 0, &b""[..]));
        let capacity = env.arena.capacity();
        env.clear();
        assert_eq!(env.recipient_count(), 0);
        assert_eq!(env.sender(), b"");
        assert_eq!(env.arena.capacity(), capacity);
    }
}
