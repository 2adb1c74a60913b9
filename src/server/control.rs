//! A shard's side of the admin API: a task that answers the admin thread's requests (metrics,
//! queue listings, flushes) from the shard's own state, on the shard's own thread, between its
//! other work. See `admin` for the other side.

use std::rc::Rc;

use gannet_smtp::received::unix_now_s;

use super::shard::Shard;
use crate::admin::protocol::{Answered, Reply, Request};
use crate::admin::ShardEnd;
use crate::metrics;

/// Answers requests until the admin thread goes away.
pub async fn serve(end: ShardEnd, shard: Rc<Shard>) {
    let requests = end.requests.connect().await;
    let replies = end.replies.connect().await;
    while let Some(asked) = requests.recv().await {
        let reply = answer(&shard, asked.request).await;
        if replies
            .send(Answered {
                serial: asked.serial,
                reply,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Answers one request from this shard's own state.
pub async fn answer(shard: &Rc<Shard>, request: Request) -> Reply {
    let deliverer = &shard.deliverer;
    match request {
        Request::Metrics => {
            let Some(mut m) = metrics::snapshot() else {
                return Reply::Unavailable;
            };
            m.queue = deliverer.queue_gauges();
            m.destinations_down = deliverer.sites_down_count() as u64;
            let segments = shard.appender.segment_count() as u64;
            m.spool_segments = segments;
            m.spool_bytes = segments * shard.config().spool.segment_size.0;
            Reply::Metrics(Box::new(m))
        }
        Request::List(listing) => {
            let (matched, messages) = deliverer.list(&listing, unix_now_s());
            Reply::List { matched, messages }
        }
        Request::Show(id) => Reply::Show(deliverer.show(&id).await.map(Box::new)),
        Request::Summary => Reply::Summary(deliverer.summary(unix_now_s())),
        Request::Act {
            action,
            selector,
            reason,
        } => Reply::Acted(deliverer.act(action, &selector, &reason).await),
        Request::Suspend { domain, until_unix_s } => Reply::Suspended(deliverer.suspend(&domain, until_unix_s)),
        Request::Resume { domain } => Reply::Resumed(deliverer.resume(&domain)),
        Request::Down => Reply::Down(deliverer.sites_down()),
        Request::Suspensions => Reply::Suspensions(deliverer.suspensions_in_force()),
        Request::Slowdowns => Reply::Slowdowns(deliverer.slowdowns_in_force()),
    }
}
