//! Classification rules as data: TOML `[[rule]]` tables that match a failure's basic code,
//! enhanced status code, reply text (a regular expression) and receiving MX hosts, each naming
//! the class it gives. The operator's rules come first, then the default file's; the first rule
//! that matches decides, and a failure no rule matches is classed by its status codes.
//!
//! Invariant: a compiled [`Rules`] holds at most [`RULES_MAX`] rules, each with at least one
//! condition, and its text patterns are all in one `RegexSet` (one pass over the reply).

use std::time::Duration;

use regex::{RegexSet, RegexSetBuilder};
use serde::Deserialize;

use crate::status::{class_of_status, enhanced_code};
use crate::{Action, Class, Failure};

/// The default rules, embedded.
pub const DEFAULT_RULES: &str = include_str!("../default-rules.toml");
/// How errors name the embedded default rules.
pub const DEFAULT_RULES_NAME: &str = "<embedded bounce rules>";
/// Rules at most (the operator's and the defaults together).
pub const RULES_MAX: usize = 2_000;
/// Bytes of one text pattern at most.
pub const RULE_PATTERN_BYTES_MAX: usize = 1_024;
/// The compiled patterns' size at most (regex's own limit, raised from its 10 MiB default
/// only so far as a full table of rules needs).
const COMPILED_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

/// One rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    class: String,
    /// Basic reply code: three characters, each a digit or `x` ("550", "5xx", "45x").
    reply_code: Option<String>,
    /// Enhanced status code: three parts, each a number or `*` ("5.1.1", "4.7.*").
    status: Option<String>,
    /// A regular expression the reply text must match, case-insensitively.
    text: Option<String>,
    /// Suffixes of the receiving site's MX host names (".google.com"); any one matches.
    #[serde(default)]
    mx: Vec<String>,
    /// Where the reply text comes from (documentation; required in the default file).
    #[allow(dead_code)]
    source: Option<String>,
    /// A reply this rule must classify (`"<code> <text>"`); checked when the rules load.
    example: Option<String>,
    /// What a match does, instead of its class's action: retry, bounce, suppress, suspend.
    action: Option<String>,
    /// With `action = "suspend"`: for how long ("90s", "30m", "2h", "1d"; up to 7 days).
    suspend_for: Option<String>,
    /// With `action = "slow"`: for how long (as `suspend_for`).
    slow_for: Option<String>,
    /// With `action = "slow"`: the rate while slowed, in messages per second (0.001 to 1000).
    slow_rate: Option<f64>,
}

/// A classification: the class, and the matching rule's own action, if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    pub class: Class,
    pub action: Option<Action>,
    /// How long a `suspend` action of the rule suspends (None: the configuration's default).
    pub suspend_for: Option<Duration>,
    /// How long a `slow` action of the rule slows (None: the configuration's default).
    pub slow_for: Option<Duration>,
    /// The time between messages while slowed (None: the configuration's default).
    pub slow_interval: Option<Duration>,
}

/// The longest suspension a rule may ask for.
pub const SUSPEND_FOR_MAX: Duration = Duration::from_secs(7 * 86_400);
/// The slowest and the fastest rate a `slow` action may set, in messages per second.
pub const SLOW_RATE_MIN: f64 = 0.001;
pub const SLOW_RATE_MAX: f64 = 1000.0;

/// A rule file that cannot be used: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub source_name: String,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.source_name, self.message),
            None => write!(f, "{}: {}", self.source_name, self.message),
        }
    }
}

impl std::error::Error for RuleError {}

#[derive(Debug, Clone)]
struct Rule {
    class: Class,
    /// Per digit: Some(d) must equal, None is `x`.
    reply_code: Option<[Option<u8>; 3]>,
    status: Option<[Option<u16>; 3]>,
    /// Index of its pattern in the set.
    text: Option<usize>,
    mx: Vec<String>,
    action: Option<Action>,
    suspend_for: Option<Duration>,
    slow_for: Option<Duration>,
    slow_interval: Option<Duration>,
}

/// Compiled rules (see the module's doc).
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
    texts: RegexSet,
}

impl Rules {
    /// The default rules alone.
    pub fn defaults() -> Rules {
        Rules::compile(&[(DEFAULT_RULES, DEFAULT_RULES_NAME)]).expect("the default bounce rules are valid")
    }

    /// Compiles rule files in order of precedence: `(text, name for errors)`. Every rule's
    /// `example` must come out as its class under its own file's rules (a file is checked on
    /// its own, so that an operator's rule may override a default one).
    pub fn compile(files: &[(&str, &str)]) -> Result<Rules, RuleError> {
        if let [(text, name)] = files {
            // One file: the set compiled to check its examples is the whole set.
            return compile_file(text, name).map(|(own, _)| own);
        }
        let mut rules = Vec::new();
        let mut patterns = Vec::new();
        for (text, name) in files {
            let (own, file_patterns) = compile_file(text, name)?;
            let file_rules = own.rules;
            if rules.len() + file_rules.len() > RULES_MAX {
                return Err(RuleError {
                    source_name: (*name).to_string(),
                    line: None,
                    message: format!("more than {RULES_MAX} bounce rules in all; merge some"),
                });
            }
            let offset = patterns.len();
            rules.extend(file_rules.into_iter().map(|mut r| {
                r.text = r.text.map(|i| i + offset);
                r
            }));
            patterns.extend(file_patterns);
        }
        let name = files.first().map_or("", |f| f.1);
        build(rules, &patterns, name)
    }

    /// How many rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The class of a failure (see the module's doc).
    pub fn classify(&self, failure: &Failure<'_>) -> Class {
        self.classify_fully(failure).class
    }

    /// The class of a failure and the action of the rule that gave it.
    pub fn classify_fully(&self, failure: &Failure<'_>) -> Classification {
        let enhanced = enhanced_code(failure.text);
        let matched = self.texts.matches(failure.text);
        let digits = [
            (failure.code / 100 % 10) as u8,
            (failure.code / 10 % 10) as u8,
            (failure.code % 10) as u8,
        ];
        for rule in &self.rules {
            if let Some(want) = &rule.reply_code {
                if want.iter().zip(digits).any(|(w, d)| w.is_some_and(|w| w != d)) {
                    continue;
                }
            }
            if let Some(want) = &rule.status {
                let Some((c, s, d)) = enhanced else { continue };
                let have = [u16::from(c), s, d];
                if want.iter().zip(have).any(|(w, h)| w.is_some_and(|w| w != h)) {
                    continue;
                }
            }
            if rule.text.is_some_and(|i| !matched.matched(i)) {
                continue;
            }
            if !rule.mx.is_empty()
                && !failure
                    .mx_hosts
                    .iter()
                    .any(|host| rule.mx.iter().any(|suffix| host.ends_with(suffix.as_str())))
            {
                continue;
            }
            return Classification {
                class: rule.class,
                action: rule.action,
                suspend_for: rule.suspend_for,
                slow_for: rule.slow_for,
                slow_interval: rule.slow_interval,
            };
        }
        Classification {
            class: class_of_status(failure.code, enhanced),
            action: None,
            suspend_for: None,
            slow_for: None,
            slow_interval: None,
        }
    }

    /// Classifies a whole reply line, `"<code> <text>"` (or `"<code>-<text>"`).
    pub fn classify_reply(&self, reply: &str, mx_host: Option<&str>) -> Class {
        let code = reply.get(..3).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0);
        let text = reply.get(4..).unwrap_or("");
        let hosts: Vec<&str> = mx_host.map(|h| h.trim_start_matches('.')).into_iter().collect();
        let hosts: Vec<String> = hosts.iter().map(|h| format!("mx.{h}")).collect();
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        self.classify(&Failure {
            code,
            text,
            mx_hosts: &hosts,
        })
    }
}

/// One file's rules (compiled) and patterns, its examples checked against them.
fn compile_file(text: &str, name: &str) -> Result<(Rules, Vec<String>), RuleError> {
    let fail = |index: Option<usize>, message: String| RuleError {
        source_name: name.to_string(),
        line: index.and_then(|i| line_of_rule(text, i)),
        message,
    };
    let file: RulesFile = toml::from_str(text).map_err(|e| RuleError {
        source_name: name.to_string(),
        line: e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
        message: e.message().to_string(),
    })?;
    if file.rules.len() > RULES_MAX {
        return Err(fail(None, format!("more than {RULES_MAX} bounce rules; merge some")));
    }
    let mut rules = Vec::with_capacity(file.rules.len());
    let mut patterns = Vec::new();
    let mut examples = Vec::new();
    for (i, spec) in file.rules.into_iter().enumerate() {
        let rule = compile_rule(&spec, &mut patterns).map_err(|m| fail(Some(i), m))?;
        if let Some(example) = spec.example {
            examples.push((i, example, rule.class, rule.mx.first().cloned()));
        }
        rules.push(rule);
    }
    let own = build(rules, &patterns, name)?;
    for (i, example, class, mx) in examples {
        let got = own.classify_reply(&example, mx.as_deref());
        if got != class {
            return Err(fail(Some(i), format!("its example {example:?} is classed {got}, not {class}: an earlier rule matches it first, or this one does not match it")));
        }
    }
    Ok((own, patterns))
}

fn build(rules: Vec<Rule>, patterns: &[String], name: &str) -> Result<Rules, RuleError> {
    let texts = RegexSetBuilder::new(patterns)
        .case_insensitive(true)
        .size_limit(COMPILED_BYTES_MAX)
        .build()
        .map_err(|e| RuleError {
            source_name: name.to_string(),
            line: None,
            message: format!("the rules' patterns together are too big to compile: {e}"),
        })?;
    Ok(Rules { rules, texts })
}

fn compile_rule(spec: &RuleSpec, patterns: &mut Vec<String>) -> Result<Rule, String> {
    let class: Class = spec.class.parse()?;
    if spec.reply_code.is_none() && spec.status.is_none() && spec.text.is_none() {
        return Err("a rule needs reply_code, status or text to match on".into());
    }
    let reply_code = spec.reply_code.as_deref().map(parse_reply_code).transpose()?;
    let status = spec.status.as_deref().map(parse_status).transpose()?;
    let text = match &spec.text {
        Some(pattern) => {
            if pattern.len() > RULE_PATTERN_BYTES_MAX {
                return Err(format!(
                    "text is longer than {RULE_PATTERN_BYTES_MAX} bytes; shorten the pattern"
                ));
            }
            regex::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("text is not a regular expression regex can use: {e}"))?;
            patterns.push(pattern.clone());
            Some(patterns.len() - 1)
        }
        None => None,
    };
    let mx = spec
        .mx
        .iter()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let action = spec.action.as_deref().map(str::parse::<Action>).transpose()?;
    let suspend_for = spec.suspend_for.as_deref().map(parse_duration).transpose()?;
    if suspend_for.is_some() && action != Some(Action::Suspend) {
        return Err("suspend_for needs action = \"suspend\"".into());
    }
    let slow_for = spec.slow_for.as_deref().map(parse_duration).transpose()?;
    if (slow_for.is_some() || spec.slow_rate.is_some()) && action != Some(Action::Slow) {
        return Err("slow_for and slow_rate need action = \"slow\"".into());
    }
    let slow_interval = match spec.slow_rate {
        Some(rate) if (SLOW_RATE_MIN..=SLOW_RATE_MAX).contains(&rate) => Some(Duration::from_secs_f64(1.0 / rate)),
        Some(rate) => {
            return Err(format!(
                "slow_rate {rate} is not a rate from {SLOW_RATE_MIN} to {SLOW_RATE_MAX} messages per second"
            ))
        }
        None => None,
    };
    Ok(Rule {
        class,
        reply_code,
        status,
        text,
        mx,
        action,
        suspend_for,
        slow_for,
        slow_interval,
    })
}

/// "90s", "30m", "2h", "1d": from 1 s to [`SUSPEND_FOR_MAX`].
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("suspend_for {s:?} is not a duration from 1s to 7d like \"90s\", \"30m\", \"2h\"");
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3_600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(bad()),
    };
    let d = Duration::from_secs(seconds);
    if d.is_zero() || d > SUSPEND_FOR_MAX {
        return Err(bad());
    }
    Ok(d)
}

fn parse_reply_code(s: &str) -> Result<[Option<u8>; 3], String> {
    let bytes = s.as_bytes();
    let bad = || format!("reply_code {s:?} is not three digits or x (\"550\", \"5xx\")");
    if bytes.len() != 3 || !matches!(bytes[0], b'2'..=b'5') {
        return Err(bad());
    }
    let mut out = [None; 3];
    for (slot, b) in out.iter_mut().zip(bytes) {
        *slot = match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'x' | b'X' => None,
            _ => return Err(bad()),
        };
    }
    Ok(out)
}

fn parse_status(s: &str) -> Result<[Option<u16>; 3], String> {
    let bad = || format!("status {s:?} is not an enhanced status code like \"5.1.1\" or \"4.7.*\"");
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut out = [None; 3];
    for (slot, part) in out.iter_mut().zip(&parts) {
        *slot = match *part {
            "*" => None,
            n if (1..=3).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()) => {
                Some(n.parse().map_err(|_| bad())?)
            }
            _ => return Err(bad()),
        };
    }
    if !matches!(out[0], None | Some(2 | 4 | 5)) {
        return Err(bad());
    }
    Ok(out)
}

/// The line of the `index`th `[[rule]]` header.
fn line_of_rule(text: &str, index: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == "[[rule]]")
        .nth(index)
        .map(|(n, _)| n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(rules: &Rules, line: &str) -> Class {
        rules.classify_reply(line, None)
    }

    #[test]
    fn the_default_rules_compile_and_their_examples_hold() {
        let rules = Rules::defaults();
        assert!(rules.len() >= 25, "{} rules", rules.len());
    }

    #[test]
    fn real_replies_get_their_classes() {
        let rules = Rules::defaults();
        let cases = [
            (
                "550 5.1.1 The email account that you tried to reach does not exist.",
                Class::InvalidRecipient,
            ),
            (
                "452 4.2.2 The recipient's inbox is out of storage space.",
                Class::MailboxFull,
            ),
            (
                "552 5.3.4 Your message exceeded Google's message size limits.",
                Class::MessageTooLarge,
            ),
            (
                "421 4.7.28 Gmail has detected an unusual rate of mail",
                Class::RateLimited,
            ),
            (
                "550 5.7.25 The IP address sending this message does not have a PTR record setup",
                Class::AuthRequired,
            ),
            (
                "550 5.7.606 Access denied, banned sending IP [192.0.2.1].",
                Class::PolicyBlock,
            ),
            ("452 4.5.3 Too many recipients", Class::RateLimited),
            ("451 4.4.3 cannot look up mx.example.com: timed out", Class::Dns),
            ("451 4.4.0 no route for the recipient's domain", Class::Routing),
            (
                "550 5.1.2 no address for the mail exchangers of example.com",
                Class::InvalidDomain,
            ),
            ("421 connection closed by the server", Class::Transient),
            ("554 5.0.0 something else", Class::Other),
        ];
        for (line, class) in cases {
            assert_eq!(reply(&rules, line), class, "{line}");
        }
    }

    #[test]
    fn every_default_rule_cites_its_source_and_has_an_example() {
        let file: RulesFile = toml::from_str(DEFAULT_RULES).unwrap();
        for (i, rule) in file.rules.iter().enumerate() {
            assert!(
                rule.source.as_deref().is_some_and(|s| !s.is_empty()),
                "rule {i} has no source"
            );
            assert!(rule.example.is_some(), "rule {i} has no example");
        }
    }

    #[test]
    fn operator_rules_come_first() {
        let mine = "[[rule]]\nclass = \"rate-limited\"\ntext = \"try again in a little\"\nexample = \"451 4.7.1 try again in a little\"\n";
        let rules = Rules::compile(&[(mine, "mine.toml"), (DEFAULT_RULES, DEFAULT_RULES_NAME)]).unwrap();
        assert_eq!(
            reply(&rules, "451 4.7.1 Try again in a little while"),
            Class::RateLimited
        );
        assert_eq!(
            reply(&Rules::defaults(), "451 4.7.1 Try again in a little while"),
            Class::PolicyBlock
        );
    }

    #[test]
    fn status_codes_decide_when_no_rule_matches() {
        let rules = Rules::compile(&[("", "empty.toml")]).unwrap();
        assert_eq!(reply(&rules, "550 5.1.1 nobody"), Class::InvalidRecipient);
        assert_eq!(reply(&rules, "421 closing"), Class::Transient);
        assert_eq!(reply(&rules, "554 go away"), Class::Other);
    }

    #[test]
    fn mx_suffixes_restrict_a_rule() {
        let mine = "[[rule]]\nclass = \"rate-limited\"\nstatus = \"4.7.0\"\nmx = [\".example-provider.test\"]\n";
        let rules = Rules::compile(&[(mine, "mine.toml")]).unwrap();
        let failure = |hosts: &[&str]| {
            rules.classify(&Failure {
                code: 421,
                text: "4.7.0 later",
                mx_hosts: hosts,
            })
        };
        assert_eq!(failure(&["mx1.example-provider.test"]), Class::RateLimited);
        assert_eq!(failure(&["mx.other.test"]), Class::Transient);
        assert_eq!(failure(&[]), Class::Transient);
    }

    #[test]
    fn bad_rules_name_the_file_line_and_fix() {
        let cases = [
            (
                "[[rule]]\nclass = \"hard\"\nstatus = \"5.1.1\"\n",
                "unknown bounce class",
            ),
            ("[[rule]]\nclass = \"other\"\n", "needs reply_code, status or text"),
            (
                "\n[[rule]]\nclass = \"other\"\nstatus = \"5.1\"\n",
                "not an enhanced status code",
            ),
            ("[[rule]]\nclass = \"other\"\nreply_code = \"5x\"\n", "not three digits"),
            (
                "[[rule]]\nclass = \"other\"\ntext = \"(unclosed\"\n",
                "not a regular expression",
            ),
            (
                "[[rule]]\nclass = \"other\"\ntext = \"full\"\nexample = \"550 5.1.1 nobody\"\n",
                "is classed invalid-recipient, not other",
            ),
            ("[[rule]]\nclass = \"other\"\nbogus = 1\n", "unknown field"),
        ];
        for (text, want) in cases {
            let e = Rules::compile(&[(text, "mine.toml")]).unwrap_err();
            assert!(e.message.contains(want), "{text:?}: {e}");
            assert!(e.to_string().starts_with("mine.toml:"), "{e}");
        }
        let e = Rules::compile(&[("\n[[rule]]\nclass = \"other\"\nstatus = \"5.1\"\n", "mine.toml")]).unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn a_rule_may_carry_its_own_action() {
        let mine =
            "[[rule]]\nclass = \"rate-limited\"\ntext = \"TSS04\"\naction = \"suspend\"\nsuspend_for = \"30m\"\n";
        let rules = Rules::compile(&[(mine, "mine.toml")]).unwrap();
        let c = rules.classify_fully(&Failure {
            code: 421,
            text: "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred",
            mx_hosts: &[],
        });
        assert_eq!(
            c,
            Classification {
                class: Class::RateLimited,
                action: Some(Action::Suspend),
                suspend_for: Some(Duration::from_secs(1800)),
                slow_for: None,
                slow_interval: None,
            }
        );
        for (bad, want) in [
            ("action = \"suspend\"\nsuspend_for = \"8d\"", "not a duration"),
            ("action = \"suspend\"\nsuspend_for = \"0s\"", "not a duration"),
            ("suspend_for = \"1h\"", "needs action"),
            ("action = \"pause\"", "unknown action"),
        ] {
            let text = format!("[[rule]]\nclass = \"rate-limited\"\ntext = \"x\"\n{bad}\n");
            let e = Rules::compile(&[(&text, "mine.toml")]).unwrap_err();
            assert!(e.message.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn a_long_pattern_is_refused() {
        let text = format!(
            "[[rule]]\nclass = \"other\"\ntext = \"{}\"\n",
            "a".repeat(RULE_PATTERN_BYTES_MAX + 1)
        );
        assert!(Rules::compile(&[(&text, "mine.toml")])
            .unwrap_err()
            .message
            .contains("longer than"));
    }
}
