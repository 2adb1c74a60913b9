//! Where mail for a domain goes (RFC 5321 section 5.1): its MX hosts by preference (random among
//! equal preferences), or the domain itself when it has no MX (implicit MX); a null MX
//! (RFC 7505) or a domain that does not exist fails for good.

use crate::message::Answer;

/// MX hosts tried at most, and addresses per host.
pub const MX_HOSTS_MAX: usize = 10;
pub const ADDRESSES_PER_HOST_MAX: usize = 4;

/// Why a domain has no address to deliver to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxError {
    /// Fails for good (bounce), with an SMTP-style reply text.
    Permanent(String),
    /// Try again later.
    Temporary(String),
}

/// Orders MX records: by preference, shuffled among equal preferences with `random` bits.
pub fn order_exchanges(mut records: Vec<(u16, String)>, mut random: u64) -> Vec<String> {
    records.sort_by_key(|(pref, _)| *pref);
    let mut start = 0;
    while start < records.len() {
        let end = records[start..]
            .iter()
            .position(|(p, _)| *p != records[start].0)
            .map_or(records.len(), |n| start + n);
        for i in (start + 1..end).rev() {
            let j = start + (random % (i - start + 1) as u64) as usize;
            random = random.rotate_right(7) ^ 0x9E37_79B9_7F4A_7C15;
            records.swap(i, j);
        }
        start = end;
    }
    records.into_iter().map(|(_, host)| host).take(MX_HOSTS_MAX).collect()
}

/// The mail exchangers to try for `domain`, in order, from its MX answer: the hosts by
/// preference, the domain itself when it has no MX (implicit MX, RFC 5321 5.1), or why there is
/// nowhere to go (null MX, RFC 7505; no such domain; a failed lookup).
pub fn exchanges(domain: &str, answer: &Answer, random: u64) -> Result<Vec<String>, MxError> {
    match answer {
        Answer::Mx(records) if records.len() == 1 && records[0].1.is_empty() => Err(MxError::Permanent(format!(
            "556 5.1.10 {domain} accepts no mail (null MX, RFC 7505)"
        ))),
        Answer::Mx(records) => Ok(order_exchanges(
            records.iter().filter(|(_, h)| !h.is_empty()).cloned().collect(),
            random,
        )),
        Answer::NoData | Answer::Addresses(_) | Answer::Txt(_) | Answer::Names(_) => {
            Ok(vec![domain.to_ascii_lowercase()])
        }
        Answer::NxDomain => Err(MxError::Permanent(format!("550 5.1.2 domain {domain} does not exist"))),
        Answer::ServerFailure(why) => Err(MxError::Temporary(format!(
            "451 4.4.3 cannot look up MX of {domain}: {why}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanges_are_ordered_by_preference_and_shuffled_within_one() {
        let records = vec![(20, "c".into()), (10, "a".into()), (10, "b".into()), (30, "d".into())];
        let mut firsts = std::collections::BTreeSet::new();
        for random in 0..64u64 {
            let order = order_exchanges(records.clone(), random.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            assert_eq!(&order[2..], &["c".to_string(), "d".to_string()]);
            firsts.insert(order[0].clone());
        }
        assert_eq!(firsts.len(), 2, "both equal-preference hosts come first sometimes");
    }
}
