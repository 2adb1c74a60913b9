//! `[bounces]`: how delivery failures are classified (`gannet_bounce`) and what each class
//! does. The rules are data: the embedded default file (crates/bounce/default-rules.toml) and,
//! read before it, the operator's `rules_file`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gannet_bounce::{Action, Class, Rules, CLASSES, DEFAULT_RULES, DEFAULT_RULES_NAME};
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::Span;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounces {
    /// The operator's classification rules (TOML `[[rule]]` tables), consulted before the
    /// default ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_file: Option<PathBuf>,
    /// Actions by class name, overriding the defaults (`invalid-recipient` and
    /// `invalid-domain`: suppress; every other class: retry).
    #[serde(default)]
    pub actions: BTreeMap<String, String>,
    /// How long the `suspend` action suspends the recipient's domain.
    #[serde(default = "default_suspend_for")]
    pub suspend_for: Span,
    /// How long the `slow` action lowers a destination's (its provider's) rate.
    #[serde(default = "default_slow_for")]
    pub slow_for: Span,
    /// The rate while slowed, in messages per second (per shard).
    #[serde(default = "default_slow_rate")]
    pub slow_rate: f64,
    /// The compiled rules and actions (filled in when the configuration is read).
    #[serde(skip)]
    pub compiled: Option<Arc<Classifier>>,
}

/// The rules and every class's action, ready for the deliverers.
#[derive(Debug)]
pub struct Classifier {
    pub rules: Rules,
    actions: [Action; CLASSES.len()],
}

impl Classifier {
    pub fn action(&self, class: Class) -> Action {
        self.actions[class.index()]
    }

    /// The defaults alone (tests, and a configuration built in code).
    pub fn defaults() -> Classifier {
        Classifier {
            rules: Rules::defaults(),
            actions: CLASSES.map(Class::default_action),
        }
    }
}

fn default_suspend_for() -> Span {
    Span(Duration::from_secs(600))
}
fn default_slow_for() -> Span {
    Span(Duration::from_secs(600))
}
fn default_slow_rate() -> f64 {
    1.0
}

impl Default for Bounces {
    fn default() -> Bounces {
        Bounces {
            rules_file: None,
            actions: BTreeMap::new(),
            suspend_for: default_suspend_for(),
            slow_for: default_slow_for(),
            slow_rate: default_slow_rate(),
            compiled: None,
        }
    }
}

impl Bounces {
    /// The time between messages the `slow` action sets.
    pub fn slow_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.slow_rate)
    }

    /// The classifier (the defaults when the configuration was not read through `parse`,
    /// compiled once for the process, not once per call).
    pub fn classifier(&self) -> Arc<Classifier> {
        static DEFAULTS: std::sync::OnceLock<Arc<Classifier>> = std::sync::OnceLock::new();
        self.compiled
            .clone()
            .unwrap_or_else(|| DEFAULTS.get_or_init(|| Arc::new(Classifier::defaults())).clone())
    }
}

/// Checks the actions and compiles the rules (reading `rules_file`).
pub(super) fn compile(b: &mut Bounces, fail: &Fail<'_>) -> Result<(), ConfigError> {
    let mut actions = CLASSES.map(Class::default_action);
    for (name, action) in &b.actions {
        let class: Class = name.parse().map_err(|e| fail("bounces.actions", 0, name, e))?;
        let action: Action = action.parse().map_err(|e| fail("bounces.actions", 0, name, e))?;
        actions[class.index()] = action;
    }
    if b.suspend_for.0.is_zero() || b.suspend_for.0 > Duration::from_secs(7 * 86_400) {
        return Err(fail("bounces", 0, "suspend_for", "must be between 1s and 7d".into()));
    }
    if b.slow_for.0.is_zero() || b.slow_for.0 > Duration::from_secs(7 * 86_400) {
        return Err(fail("bounces", 0, "slow_for", "must be between 1s and 7d".into()));
    }
    if !(gannet_bounce::SLOW_RATE_MIN..=gannet_bounce::SLOW_RATE_MAX).contains(&b.slow_rate) {
        return Err(fail(
            "bounces",
            0,
            "slow_rate",
            format!(
                "must be between {} and {} messages per second",
                gannet_bounce::SLOW_RATE_MIN,
                gannet_bounce::SLOW_RATE_MAX
            ),
        ));
    }
    let own = match &b.rules_file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            fail(
                "bounces",
                0,
                "rules_file",
                format!(
                    "cannot read {}: {e}; write the path of a TOML file of [[rule]] tables",
                    path.display()
                ),
            )
        })?),
        None => None,
    };
    let name = b
        .rules_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut files = Vec::new();
    if let Some(text) = &own {
        files.push((text.as_str(), name.as_str()));
    }
    files.push((DEFAULT_RULES, DEFAULT_RULES_NAME));
    let rules = Rules::compile(&files).map_err(|e| ConfigError {
        source_name: e.source_name.clone(),
        line: e.line,
        key: None,
        message: e.message,
    })?;
    b.compiled = Some(Arc::new(Classifier { rules, actions }));
    Ok(())
}
