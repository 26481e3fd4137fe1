//! What went wrong in a catalogue: every problem found, each naming where it is.

use std::fmt;

/// One problem in a catalogue source: which source, which model, where in it, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The source the entry came from (a file name, as the caller named it).
    pub source: String,
    /// The model's id, when it could be read.
    pub model: Option<String>,
    /// Where in the model: the entry (`signals[2] "pressure"`,
    /// `failure_modes[0] "scale": playbook step 3 (order_part)`, `rul`), or
    /// `line L, column C` when the TOML itself was refused; may be empty.
    pub path: String,
    /// What is wrong, lowercase, naming the offending value.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.source)?;
        if let Some(model) = &self.model {
            write!(f, "model {model:?}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A catalogue was refused. Holds every problem found, not only the first, so a service
/// team fixes an entry in one pass; `Display` prints one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_all(.problems))]
pub struct CatalogueError {
    /// The problems, in the order they were found (never empty).
    pub problems: Vec<Problem>,
}

impl CatalogueError {
    pub(crate) fn new(problems: Vec<Problem>) -> Self {
        debug_assert!(!problems.is_empty(), "an error needs at least one problem");
        Self { problems }
    }
}

fn display_all(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
