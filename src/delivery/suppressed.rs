//! Queued mail for suppressed recipients is not delivered: before a message is planned, its
//! pending recipients are checked against the suppression list (`crate::suppression`), and
//! those found are finished with the `suppressed` outcome: a log line, an event and a count,
//! but no delivery status notification (a notice about a suppressed address would only feed
//! the loop the list is there to break).

use std::rc::Rc;

use gannet_sched::Completed;
use gannet_smtp::deadline::Now;
use gannet_spool::MessageId;
use tracing::info;

use super::Deliverer;
use crate::metrics;

impl Deliverer {
    /// Finishes the suppressed pending recipients of `id`; true if that finished the message.
    pub(super) fn drop_suppressed(self: &Rc<Self>, id: MessageId) -> bool {
        let Some(list) = crate::suppression::get() else {
            return false;
        };
        if list.list().is_empty() {
            return false;
        }
        let now = Now::read();
        let (sender, found) = {
            let sched = self.sched.borrow();
            let Some(message) = sched.queue().get(&id) else {
                return false;
            };
            if message.jobs_outstanding > 0 || message.held {
                return false;
            }
            let view = message.envelope.view();
            let found: Vec<(u32, String, String)> = view
                .recipients()
                .enumerate()
                .filter(|(i, _)| !message.done.contains(*i))
                .filter_map(|(i, r)| {
                    let hit = list.check(r.address, view.sender, now.unix_s)?;
                    let why = format!(
                        "{} entry, {}: {}",
                        hit.scope.as_str(),
                        hit.entry.source.as_str(),
                        hit.entry.reason
                    );
                    Some((i as u32, String::from_utf8_lossy(r.address).into_owned(), why))
                })
                .collect();
            (String::from_utf8_lossy(view.sender).into_owned(), found)
        };
        if found.is_empty() {
            return false;
        }
        let indexes: Vec<u32> = found.iter().map(|(i, _, _)| *i).collect();
        let completed = self.sched.borrow_mut().finish_undelivered(id, &indexes);
        if completed.is_none() {
            return false;
        }
        metrics::with(|m| m.suppressed.add("delivery", found.len() as u64));
        for (_, to, why) in found {
            info!(shard = self.shard, %id, %to, "suppressed: not delivered ({why})");
            if crate::events::enabled() {
                crate::events::emit(crate::events::EventBody {
                    kind: "suppressed",
                    message_id: id.to_string(),
                    sender: sender.clone(),
                    recipient: Some(to),
                    recipients: None,
                    size_bytes: None,
                    client: None,
                    relay: None,
                    reply: Some(why),
                    class: None,
                });
            }
        }
        let finished = completed == Some(Completed::Finished);
        if finished {
            self.store.forget(&id);
        }
        self.flush_state_soon();
        finished
    }
}
