//! Gannet's delivery scheduler, sans-IO: what to deliver, where, when and how many at once.
//! The shell (glommio: sockets, DNS lookups, spool reads and writes) drives it with the time
//! passed in; the simulator drives it with simulated time and receivers.
//!
//! - [`queue`]: the index of unfinished messages, compact, rebuilt from the spool segment by
//!   segment;
//! - [`site`]: receiving sites (a smarthost, or the MX hosts a domain's mail goes to: domains
//!   with the same MX hosts share one site), their limits and rules;
//! - [`lanes`]: fresh mail, retries and bounces in lanes of their own;
//! - [`backoff`]: the retry schedule as data;
//! - [`health`]: sites marked down after connection failures in a row, and their probes;
//! - [`provider`]: providers (MX suffixes) whose sites share limits, and slowed rates;
//! - [`scheduler`]: the scheduler that ties them together.

pub mod backoff;
pub mod health;
pub mod lanes;
pub mod provider;
pub mod queue;
pub mod rng;
pub mod scheduler;
pub mod site;
pub mod suspend;

pub use health::{Change as HealthChange, HealthRules};
pub use lanes::Lane;
pub use provider::{ProviderRule, Slowdown, PROVIDERS_MAX};
pub use queue::{QueueIndex, QueuedMessage, RecipientSet};
pub use scheduler::{
    Classified, Completed, Job, PendingState, Plan, Route, RouteTarget, SchedConfig, Scheduler, Verdict, Waiting,
};
pub use site::{Site, SiteKey, SiteLimits, SiteRule};
