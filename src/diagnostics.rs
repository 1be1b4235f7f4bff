//! `file:line: message` errors, collected all at once.
//!
//! A routing table or config file is validated completely before it is rejected, so an
//! operator sees every problem in one run instead of fixing them one at a time.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

/// How many problems are kept in detail; a CSV with a million bad rows still reports the
/// total, but does not hold a million messages in memory.
pub const MAX_DETAILED: usize = 1000;

/// One problem at one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    #[serde(serialize_with = "ser_path")]
    pub file: Arc<Path>,
    /// 1-based; 0 when the problem has no line (a missing file).
    pub line: u32,
    pub message: String,
}

fn ser_path<S: serde::Serializer>(p: &Arc<Path>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.display().to_string())
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

/// Every problem found in one validation run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Diagnostics {
    pub errors: Vec<Diagnostic>,
    /// Problems beyond [`MAX_DETAILED`], counted but not kept.
    pub more: usize,
}

impl Diagnostics {
    pub fn push(&mut self, file: &Arc<Path>, line: u32, message: impl Into<String>) {
        if self.errors.len() < MAX_DETAILED {
            self.errors.push(Diagnostic {
                file: Arc::clone(file),
                line,
                message: message.into(),
            });
        } else {
            self.more += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty() && self.more == 0
    }

    pub fn len(&self) -> usize {
        self.errors.len() + self.more
    }

    pub fn extend(&mut self, other: Diagnostics) {
        for d in other.errors {
            if self.errors.len() < MAX_DETAILED {
                self.errors.push(d);
            } else {
                self.more += 1;
            }
        }
        self.more += other.more;
    }

    /// Orders problems by place; files keep the order in which they were read.
    pub fn sort(&mut self, file_order: &[Arc<Path>]) {
        let rank = |p: &Arc<Path>| file_order.iter().position(|f| f == p).unwrap_or(usize::MAX);
        self.errors.sort_by_key(|d| (rank(&d.file), d.line));
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        if self.more > 0 {
            write!(f, "\n… and {} more errors", self.more)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Maps byte offsets of a text file to 1-based line numbers.
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        Self::from_bytes(text.as_bytes())
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut starts = vec![0];
        starts.extend(memchr::memchr_iter(b'\n', bytes).map(|i| i + 1));
        Self { starts }
    }

    pub fn line(&self, offset: usize) -> u32 {
        let l = self.starts.partition_point(|&s| s <= offset);
        u32::try_from(l).unwrap_or(u32::MAX)
    }
}

/// toml's messages span several lines; a diagnostic is one.
pub fn one_line(msg: &str) -> String {
    let line = msg
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    // Found by fuzzing: a lone CR gets a parse error whose message is blank.
    if line.is_empty() {
        "invalid TOML syntax".to_string()
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_counts_from_one() {
        let idx = LineIndex::new("a\nbb\n\nc");
        assert_eq!(idx.line(0), 1);
        assert_eq!(idx.line(2), 2);
        assert_eq!(idx.line(5), 3);
        assert_eq!(idx.line(6), 4);
    }

    #[test]
    fn diagnostics_cap_and_count() {
        let f: Arc<Path> = Arc::from(Path::new("x.csv"));
        let mut d = Diagnostics::default();
        for i in 0..(MAX_DETAILED + 5) {
            d.push(&f, i as u32 + 1, "bad");
        }
        assert_eq!(d.errors.len(), MAX_DETAILED);
        assert_eq!(d.len(), MAX_DETAILED + 5);
        assert!(d.to_string().ends_with("… and 5 more errors"));
        assert!(d.to_string().starts_with("x.csv:1: bad"));
    }
}
