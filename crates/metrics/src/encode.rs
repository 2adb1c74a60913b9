//! The Prometheus text exposition (format 0.0.4) of merged shard metrics, written by the
//! `prometheus-client` crate's encoder: a [`Collector`] hands it the families on each scrape.
//! Family names are a contract (the dashboard and alert rules use them): see docs/metrics.md.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::histogram::Histogram;
use crate::shard::{ShardMetrics, QUEUE_STATES};

/// What a scrape shows: the shards' numbers merged, and the context to name them.
#[derive(Debug)]
pub struct Exposition {
    pub metrics: ShardMetrics,
    /// Label value of each listener (its address), in configuration order.
    pub listener_names: Vec<String>,
    pub shards: usize,
    pub now_unix_s: u64,
    pub events: EventCounts,
    pub suppression: SuppressionCounts,
}

/// The suppression list's numbers (process-wide: one list for all shards); zeros when it is off.
#[derive(Debug, Clone, Copy, Default)]
pub struct SuppressionCounts {
    pub entries: u64,
    pub entries_max: u64,
    /// Entries added since start, by source (hard-bounce, complaint, operator, import).
    pub added_by_source: [(&'static str, u64); 4],
    /// Adds refused because the list was full of live entries.
    pub refused_full: u64,
}

/// The event webhook's counters (process-wide, not per shard); zeros when it is off.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventCounts {
    pub posted: u64,
    pub dropped: u64,
    pub failed_posts: u64,
    pub buffered: u64,
}

/// Renders the exposition as Prometheus text.
pub fn encode(exposition: Exposition) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(exposition));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn counter_family<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&value, None)?;
    }
    Ok(())
}

fn gauge_family<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, i64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        m.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> fmt::Result {
    let m: MetricEncoder = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    histogram_series(m, h)
}

fn histogram_series(mut m: MetricEncoder, h: &Histogram) -> fmt::Result {
    m.encode_histogram::<NoLabelSet>(h.sum(), h.count(), &h.buckets(), None)
}

impl Collector for Exposition {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        self.encode_connections(&mut e)?;
        self.encode_messages(&mut e)?;
        self.encode_replies(&mut e)?;
        self.encode_delivery(&mut e)?;
        self.encode_queue(&mut e)?;
        self.encode_storage(&mut e)?;
        self.encode_network(&mut e)
    }
}

impl Exposition {
    fn listener_name(&self, i: usize) -> &str {
        self.listener_names.get(i).map_or("unknown", String::as_str)
    }

    fn encode_connections(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let listeners = self.metrics.listeners.iter().enumerate();
        counter_family(
            e,
            "gannet_connections",
            "Inbound connections by listener and result (accepted, or refused_<reason>).",
            listeners.clone().flat_map(|(i, l)| {
                let name = self.listener_name(i);
                let accepted = (l.connections.get("accepted") == 0).then_some(("accepted", 0));
                l.connections
                    .iter()
                    .chain(accepted)
                    .map(move |(result, v)| (vec![("listener", name), ("result", result)], v))
            }),
        )?;
        gauge_family(
            e,
            "gannet_connections_active",
            "Inbound SMTP sessions open now, by listener.",
            listeners.map(|(i, l)| (vec![("listener", self.listener_name(i))], l.connections_active)),
        )
    }

    fn encode_messages(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let listeners = || self.metrics.listeners.iter().enumerate();
        counter_family(
            e,
            "gannet_messages_received",
            "Messages accepted (250 after the content), by listener.",
            listeners().map(|(i, l)| (vec![("listener", self.listener_name(i))], l.messages_received)),
        )?;
        counter_family(
            e,
            "gannet_received_bytes",
            "Bytes of accepted message content, by listener.",
            listeners().map(|(i, l)| (vec![("listener", self.listener_name(i))], l.received_bytes)),
        )?;
        counter_family(
            e,
            "gannet_messages_rejected",
            "Transactions refused at MAIL, RCPT, DATA/BDAT or the end of content, by listener and reason.",
            listeners().flat_map(|(i, l)| {
                let name = self.listener_name(i);
                l.messages_rejected
                    .iter()
                    .map(move |(reason, v)| (vec![("listener", name), ("reason", reason)], v))
            }),
        )
    }

    fn encode_replies(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let mut all: Vec<(Labels, u64)> = Vec::new();
        for (direction, counts) in [
            ("inbound", &self.metrics.replies_inbound),
            ("outbound", &self.metrics.replies_outbound),
        ] {
            for (k, v) in counts.iter() {
                let (code, enhanced) = k.split_once(' ').unwrap_or((k, ""));
                let enhanced = if code == "other" { "other" } else { enhanced };
                all.push((
                    vec![("direction", direction), ("code", code), ("enhanced", enhanced)],
                    v,
                ));
            }
        }
        counter_family(
            e,
            "gannet_smtp_replies",
            "SMTP replies: inbound are those we sent to clients, outbound those remote servers sent us.",
            all,
        )
    }

    fn encode_delivery(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let mut attempts = Vec::new();
        let mut active = Vec::new();
        for (name, counts) in m.destinations.iter() {
            for result in ["delivered", "deferred", "failed"] {
                attempts.push((
                    vec![("destination", name), ("result", result)],
                    counts.attempts.get(result),
                ));
            }
            active.push((vec![("destination", name)], counts.connections_active));
        }
        counter_family(
            e,
            "gannet_delivery_attempts",
            "Delivery attempts per recipient by destination (receiving site) and result.",
            attempts,
        )?;
        gauge_family(
            e,
            "gannet_outbound_connections_active",
            "Outbound SMTP connections open now, by destination.",
            active,
        )?;
        counter_family(
            e,
            "gannet_destination_health",
            "Destinations marked down after connection failures in a row (down), probes of down destinations that failed (probe_failed), destinations up again (up).",
            m.destination_health.iter().map(|(event, v)| (vec![("event", event)], v)),
        )?;
        gauge_family(
            e,
            "gannet_destinations_down",
            "Destinations down now: their mail waits for a probe.",
            [(vec![], m.destinations_down as i64)],
        )?;
        counter_family(
            e,
            "gannet_retries",
            "Delivery attempts that were retries of deferred mail.",
            [(vec![], m.retries)],
        )?;
        counter_family(
            e,
            "gannet_bounces",
            "Delivery failures and deferrals per recipient, by bounce class and result (failed, expired, deferred, operator).",
            m.bounces
                .iter()
                .map(|((class, result), v)| (vec![("class", class), ("result", result)], v)),
        )?;
        counter_family(
            e,
            "gannet_bounce_actions",
            "Actions bounce classes took beyond the reply's own code: bounce (a temporary failure returned now), suppress, suspend (the recipient's domain).",
            m.bounce_actions.iter().map(|(action, v)| (vec![("action", action)], v)),
        )?;
        counter_family(
            e,
            "gannet_suppressed",
            "Recipients the suppression list stopped, by stage: rcpt (refused with 550 5.1.1), delivery (dropped from the queue, no notice).",
            ["rcpt", "delivery"].map(|stage| (vec![("stage", stage)], m.suppressed.get(stage))),
        )?;
        counter_family(
            e,
            "gannet_bounce_reports",
            "Reports read at the bounce domain, by kind (dsn, arf, unknown) and result (suppressed, recorded, forged, unattributed, unparseable).",
            m.bounce_reports
                .iter()
                .map(|((kind, result), v)| (vec![("kind", kind), ("result", result)], v)),
        )?;
        let s = &self.suppression;
        gauge_family(
            e,
            "gannet_suppression_entries",
            "Entries in the suppression list (expired ones until they are pruned).",
            [(vec![], s.entries as i64)],
        )?;
        gauge_family(
            e,
            "gannet_suppression_entries_max",
            "The suppression list's bound (suppression.entries_max).",
            [(vec![], s.entries_max as i64)],
        )?;
        counter_family(
            e,
            "gannet_suppression_added",
            "Suppression entries added since start, by source.",
            s.added_by_source
                .iter()
                .filter(|(source, _)| !source.is_empty())
                .map(|(source, v)| (vec![("source", *source)], *v)),
        )?;
        counter_family(
            e,
            "gannet_suppression_refused_full",
            "Suppression entries refused because the list was full of live entries.",
            [(vec![], s.refused_full)],
        )?;
        counter_family(
            e,
            "gannet_expired",
            "Recipients that reached the queue lifetime.",
            [(vec![], m.expired)],
        )?;
        histogram(
            e,
            "gannet_delivery_duration_seconds",
            "Time of one delivery attempt: connection (or reuse) to the last reply.",
            &m.delivery_duration,
        )
    }

    fn encode_queue(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let q = &self.metrics.queue;
        gauge_family(
            e,
            "gannet_queue_messages",
            "Queued messages by state.",
            QUEUE_STATES
                .iter()
                .zip(q.messages)
                .map(|(s, v)| (vec![("state", *s)], v as i64)),
        )?;
        gauge_family(
            e,
            "gannet_queue_recipients",
            "Unfinished recipients by their message's state.",
            QUEUE_STATES
                .iter()
                .zip(q.recipients)
                .map(|(s, v)| (vec![("state", *s)], v as i64)),
        )?;
        let oldest = q
            .oldest_received_unix_s
            .map_or(0, |t| self.now_unix_s.saturating_sub(t));
        gauge_family(
            e,
            "gannet_queue_oldest_age_seconds",
            "Age of the oldest queued message (0 when the queue is empty).",
            [(vec![], oldest as i64)],
        )?;
        histogram(
            e,
            "gannet_queue_time_seconds",
            "Time from reception to the last recipient's delivery or bounce.",
            &self.metrics.queue_time,
        )
    }

    fn encode_storage(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        gauge_family(
            e,
            "gannet_spool_bytes",
            "Bytes of spool segment files on disk.",
            [(vec![], m.spool_bytes as i64)],
        )?;
        gauge_family(
            e,
            "gannet_spool_segments",
            "Spool segment files on disk.",
            [(vec![], m.spool_segments as i64)],
        )?;
        histogram(
            e,
            "gannet_commit_batch_messages",
            "Messages acknowledged by one group commit.",
            &m.commit_batch,
        )?;
        histogram(
            e,
            "gannet_fdatasync_seconds",
            "Time of one fdatasync of a spool segment.",
            &m.fdatasync,
        )?;
        gauge_family(
            e,
            "gannet_shards",
            "Shards (executors, one per core) serving.",
            [(vec![], self.shards as i64)],
        )?;
        let ev = &self.events;
        counter_family(
            e,
            "gannet_events_posted",
            "Delivery events the webhook took.",
            [(vec![], ev.posted)],
        )?;
        counter_family(
            e,
            "gannet_events_dropped",
            "Delivery events dropped because the buffer was full.",
            [(vec![], ev.dropped)],
        )?;
        counter_family(
            e,
            "gannet_events_failed_posts",
            "POSTs to the webhook that failed (and were retried).",
            [(vec![], ev.failed_posts)],
        )?;
        gauge_family(
            e,
            "gannet_events_buffered",
            "Delivery events waiting to be posted.",
            [(vec![], ev.buffered as i64)],
        )
    }

    fn encode_network(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let dns = ["hit", "miss", "negative"].map(|r| (vec![("result", r)], m.dns_lookups.get(r)));
        counter_family(e, "gannet_dns_cache_lookups", "DNS cache lookups by result.", dns)?;
        histogram(
            e,
            "gannet_dns_query_seconds",
            "Time of one DNS query to a server (cache misses).",
            &m.dns_query,
        )?;
        counter_family(
            e,
            "gannet_tls_handshakes",
            "TLS handshakes by direction (inbound, outbound), protocol version and result.",
            m.tls_handshakes
                .iter()
                .map(|((d, ver, r), v)| (vec![("direction", d), ("version", ver), ("result", r)], v)),
        )?;
        counter_family(
            e,
            "gannet_auth",
            "SMTP AUTH attempts by mechanism and result.",
            m.auth
                .iter()
                .map(|((mech, r), v)| (vec![("mechanism", mech), ("result", r)], v)),
        )?;
        counter_family(
            e,
            "gannet_rate_limited",
            "Connections and commands refused by a limit, by the limit.",
            m.rate_limited.iter().map(|(limit, v)| (vec![("limit", limit)], v)),
        )?;
        counter_family(
            e,
            "gannet_dkim_signatures",
            "DKIM signatures made for accepted messages, by algorithm and result (signed, error).",
            m.dkim_signatures
                .iter()
                .map(|((a, r), v)| (vec![("algorithm", a), ("result", r)], v)),
        )?;
        histogram(
            e,
            "gannet_dkim_sign_seconds",
            "Time from a message's end to its DKIM signatures being ready, waiting for the signing thread included.",
            &m.dkim_sign,
        )?;
        counter_family(
            e,
            "gannet_mail_authentication",
            "Verdicts on incoming mail by method (spf, dkim: one per signature, dmarc) and result.",
            m.mail_authentication
                .iter()
                .map(|((method, r), v)| (vec![("method", method), ("result", r)], v)),
        )?;
        histogram(
            e,
            "gannet_mail_authentication_seconds",
            "Time one incoming message's SPF, DKIM, DMARC and ARC verification took, its DNS lookups included.",
            &m.mail_authentication_seconds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::MetricsLimits;

    fn exposition(metrics: ShardMetrics) -> String {
        encode(Exposition {
            metrics,
            listener_names: vec!["127.0.0.1:2525".into()],
            shards: 2,
            now_unix_s: 100,
            events: EventCounts::default(),
            suppression: SuppressionCounts::default(),
        })
        .unwrap()
    }

    #[test]
    fn counters_gauges_and_histograms_come_out_in_prometheus_text() {
        let mut m = ShardMetrics::new(
            1,
            MetricsLimits {
                destinations_max: 2,
                destination_label_after_attempts: 1,
            },
        );
        m.listener(0).connections.add("accepted", 3);
        m.listener(0).messages_received = 2;
        m.count_inbound_replies(b"250 2.0.0 Ok\r\n");
        m.destinations.attempt("mx.example", "delivered");
        m.fdatasync.observe(0.002);
        m.queue.oldest_received_unix_s = Some(40);
        let text = exposition(m);
        for line in [
            "# TYPE gannet_connections_total counter",
            "gannet_connections_total{listener=\"127.0.0.1:2525\",result=\"accepted\"} 3",
            "gannet_messages_received_total{listener=\"127.0.0.1:2525\"} 2",
            "gannet_smtp_replies_total{direction=\"inbound\",code=\"250\",enhanced=\"2.0.0\"} 1",
            "gannet_delivery_attempts_total{destination=\"mx.example\",result=\"delivered\"} 1",
            "gannet_delivery_attempts_total{destination=\"other\",result=\"failed\"} 0",
            "gannet_fdatasync_seconds_bucket{le=\"0.0025\"} 1",
            "gannet_fdatasync_seconds_count 1",
            "gannet_queue_oldest_age_seconds 60",
            "gannet_shards 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"), "classic text format, not OpenMetrics");
    }
}
