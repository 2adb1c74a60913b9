//! Configuration errors: [`ConfigError`], and how a validator names the file, line and key.

use std::fmt;

/// A configuration the server cannot start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or "<embedded default>".
    pub source_name: String,
    pub line: Option<usize>,
    /// `section.key`, when one key is to blame.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source_name)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// How a section's validator blames a key: `fail(section, index, key, message)` is the error for
/// `key` in `[section]` (or `[[section]]` number `index`; section "" for a top-level key).
pub(super) type Fail<'a> = dyn Fn(&str, usize, &str, String) -> ConfigError + 'a;

/// The [`Fail`] for the file `source_name` holding `text`: its errors carry the key's line.
pub(super) fn fail<'a>(text: &'a str, source_name: &'a str) -> impl Fn(&str, usize, &str, String) -> ConfigError + 'a {
    move |section: &str, index: usize, key: &str, message: String| ConfigError {
        source_name: source_name.to_string(),
        line: line_of(text, section, index, key),
        key: Some(if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        }),
        message,
    }
}

/// Finds the line of `key` inside `[section]` (or `[[section]]` number `index`) in the TOML text.
pub(super) fn line_of(text: &str, section: &str, index: usize, key: &str) -> Option<usize> {
    let mut in_section = section.is_empty();
    let mut seen = 0usize;
    let mut section_line = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section && {
                seen += 1;
                seen == index + 1
            };
            if in_section {
                section_line = Some(n + 1);
            }
            continue;
        }
        if in_section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(n + 1);
                }
            }
        }
    }
    section_line
}
