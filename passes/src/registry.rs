//! The pass registry and textual pipelines.
//!
//! Every pass is registered exactly once, with its kebab-case name, a one-line description, the options
//! it accepts and a constructor. A pipeline is written as text, the same string in the CLI, the tests and
//! the docs: `canonicalize,fold-constants{max-elements=4096},eliminate-dead-code`.

use crate::pass::{OptionSpec, Pass, PassError, PassOptions};
use std::collections::BTreeMap;
use std::fmt;

/// Registration record of one pass.
#[derive(Clone, Copy)]
pub struct PassEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub options: &'static [OptionSpec],
    pub build: fn(&PassOptions) -> Result<Box<dyn Pass>, PassError>,
}

impl fmt::Debug for PassEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassEntry").field("name", &self.name).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("unknown pass '{name}'; valid passes: {valid}")]
    UnknownPass { name: String, valid: String },
    #[error("malformed pipeline entry '{entry}': {message}")]
    Syntax { entry: String, message: String },
    #[error("invalid options for pass '{pass}': {source}")]
    Options { pass: String, source: PassError },
}

/// One entry of a parsed pipeline: the built pass and its canonical text.
pub struct PipelineEntry {
    pub pass: Box<dyn Pass>,
    pub options: PassOptions,
}

impl PipelineEntry {
    pub fn name(&self) -> &'static str {
        self.pass.name()
    }

    /// `name` or `name{k=v,...}` with the explicitly given options.
    pub fn text(&self) -> String {
        format!("{}{}", self.pass.name(), self.options)
    }
}

/// A parsed pipeline, in order.
#[derive(Default)]
pub struct Pipeline {
    pub entries: Vec<PipelineEntry>,
}

impl Pipeline {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<String> = self.entries.iter().map(PipelineEntry::text).collect();
        f.write_str(&texts.join(","))
    }
}

/// The set of known passes.
pub struct Registry {
    entries: Vec<PassEntry>,
}

impl Registry {
    /// Every pass qcc ships, in the order `qcc passes` lists them.
    pub fn standard() -> Registry {
        Registry::from_entries(crate::all_pass_entries())
    }

    /// A registry of the given entries (names must be unique; a duplicate is a programming error).
    pub fn from_entries(entries: Vec<PassEntry>) -> Registry {
        for (i, e) in entries.iter().enumerate() {
            assert!(entries[..i].iter().all(|o| o.name != e.name), "pass '{}' registered twice", e.name);
        }
        Registry { entries }
    }

    pub fn entries(&self) -> &[PassEntry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&PassEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }

    /// One line per pass, `name  description`, names padded to a column (what `qcc passes` prints).
    pub fn describe(&self) -> String {
        let width = self.entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for e in &self.entries {
            out.push_str(&format!("{:width$}  {}\n", e.name, e.description));
        }
        out
    }

    /// Builds one pass from its name and option text (`key=value` pairs).
    pub fn build(&self, name: &str, options: BTreeMap<String, String>) -> Result<PipelineEntry, PipelineError> {
        let entry = self
            .get(name)
            .ok_or_else(|| PipelineError::UnknownPass { name: name.to_string(), valid: self.names().join(", ") })?;
        let wrap = |source| PipelineError::Options { pass: name.to_string(), source };
        let options = PassOptions::new(entry.name, entry.options, options).map_err(wrap)?;
        let pass = (entry.build)(&options).map_err(wrap)?;
        Ok(PipelineEntry { pass, options })
    }

    /// Parses `a,b{x=1,y=2},c`. Whitespace around names, keys and values is ignored; an empty string is
    /// the empty pipeline.
    pub fn parse_pipeline(&self, text: &str) -> Result<Pipeline, PipelineError> {
        let mut entries = Vec::new();
        for raw in split_top_level(text)? {
            let raw = raw.trim();
            if raw.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(PipelineError::Syntax { entry: text.to_string(), message: "empty pass name".into() });
            }
            let (name, options) = parse_entry(raw)?;
            entries.push(self.build(&name, options)?);
        }
        Ok(Pipeline { entries })
    }
}

/// Splits at commas outside braces.
fn split_top_level(text: &str) -> Result<Vec<&str>, PipelineError> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => {
                depth += 1;
                if depth > 1 {
                    return Err(PipelineError::Syntax { entry: text.to_string(), message: "nested '{'".into() });
                }
            }
            '}' => {
                depth = depth.checked_sub(1).ok_or_else(|| PipelineError::Syntax {
                    entry: text.to_string(),
                    message: "'}' without '{'".into(),
                })?;
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(PipelineError::Syntax { entry: text.to_string(), message: "unclosed '{'".into() });
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_entry(raw: &str) -> Result<(String, BTreeMap<String, String>), PipelineError> {
    let syntax = |message: &str| PipelineError::Syntax { entry: raw.to_string(), message: message.to_string() };
    let (name, rest) = match raw.find('{') {
        Some(i) => (&raw[..i], Some(&raw[i + 1..])),
        None => (raw, None),
    };
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return Err(syntax("a pass name is kebab-case (lowercase letters, digits, '-')"));
    }
    let mut options = BTreeMap::new();
    if let Some(rest) = rest {
        let body = rest.strip_suffix('}').ok_or_else(|| syntax("text after '}'"))?;
        for pair in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| syntax("options are written key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(syntax("empty option key or value"));
            }
            if options.insert(k.to_string(), v.to_string()).is_some() {
                return Err(syntax(&format!("option '{k}' given twice")));
            }
        }
    }
    Ok((name.to_string(), options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_pass_builds_with_defaults_and_reports_its_name() {
        let reg = Registry::standard();
        for e in reg.entries() {
            let built = reg.build(e.name, BTreeMap::new()).unwrap();
            assert_eq!(built.name(), e.name);
            assert_eq!(built.pass.description(), e.description);
            assert!(!e.description.contains('\n') && !e.description.is_empty());
            assert!(e.name.chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{} is not kebab-case", e.name);
        }
    }

    #[test]
    fn parses_and_prints_pipelines() {
        let reg = Registry::standard();
        let p = reg.parse_pipeline(" canonicalize , fold-constants{ max-elements = 16 },eliminate-dead-code").unwrap();
        assert_eq!(p.to_string(), "canonicalize,fold-constants{max-elements=16},eliminate-dead-code");
        assert_eq!(p.len(), 3);
        assert!(reg.parse_pipeline("").unwrap().is_empty());
    }

    #[test]
    fn unknown_pass_lists_valid_names() {
        let reg = Registry::standard();
        let err = reg.parse_pipeline("canonicalize,fuse-everything").err().unwrap().to_string();
        assert!(err.contains("unknown pass 'fuse-everything'"), "{err}");
        for name in reg.names() {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn syntax_errors() {
        let reg = Registry::standard();
        for bad in
            ["canonicalize{", "canonicalize}", "a{{x=1}}", "fold-constants{x}", "canonicalize,,eliminate-dead-code"]
        {
            assert!(matches!(reg.parse_pipeline(bad), Err(PipelineError::Syntax { .. })), "{bad}");
        }
        let err = reg.parse_pipeline("eliminate-dead-code{x=1}").err().unwrap().to_string();
        assert!(err.contains("no option 'x'"), "{err}");
    }
}
