//! zcomp's errors: configuration (parsing, dictionaries, contexts) and per-page work.

use std::io;
use std::path::PathBuf;

use crate::PAGE_SIZE;
use crate::params::Priority;

/// Why an algorithm set or a stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An algorithm name zcomp does not implement.
    #[error("unknown compression algorithm `{0}` (known: lz4, zstd)")]
    UnknownAlgorithm(String),
    /// A `key=value` list part without `=` or with an empty value.
    #[error("`{0}` is not of the form key=value")]
    Malformed(String),
    /// A key other than algo, level, dict, priority.
    #[error("unknown algorithm parameter `{0}` (known: algo, level, dict, priority)")]
    UnknownParam(String),
    /// The same key twice.
    #[error("algorithm parameter `{0}` given twice")]
    Duplicate(&'static str),
    /// A `key=value` list without `algo=`.
    #[error("`{0}` names no algorithm (add algo=lz4 or algo=zstd)")]
    MissingAlgorithm(String),
    /// A level that is not an integer.
    #[error("{algo} level `{value}` is not an integer")]
    LevelNotNumber {
        /// The algorithm.
        algo: &'static str,
        /// The text given as level.
        value: String,
    },
    /// A zstd level outside the linked libzstd's range.
    #[error("zstd level {level} is outside {min}..={max}")]
    LevelOutOfRange {
        /// The level given.
        level: i32,
        /// Lowest (fastest) level.
        min: i32,
        /// Highest level.
        max: i32,
    },
    /// A parameter the algorithm does not take.
    #[error("{algo} takes no {param} parameter")]
    Unsupported {
        /// The algorithm.
        algo: &'static str,
        /// The parameter.
        param: &'static str,
    },
    /// A priority that is not 0..=3.
    #[error("priority `{0}` is not one of 0..=3")]
    BadPriority(String),
    /// Two algorithms of one set with the same priority.
    #[error("two algorithms have priority {0}")]
    DuplicatePriority(Priority),
    /// The primary algorithm given a priority other than 0.
    #[error("the primary algorithm has priority 0, not {0}")]
    PrimaryPriority(Priority),
    /// A secondary algorithm given priority 0, or more secondaries than free priorities.
    #[error("secondary algorithms take priorities 1..=3 (0 is the primary): {0}")]
    SecondaryPriority(String),
    /// The dictionary file could not be read.
    #[error("cannot read dictionary {}: {source}", path.display())]
    DictRead {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The dictionary file is empty.
    #[error("dictionary {} is empty", path.display())]
    DictEmpty {
        /// The file.
        path: PathBuf,
    },
    /// The library refused to set up a context (out of memory, a malformed dictionary).
    #[error("{algo}: cannot set up a compression context: {source}")]
    Context {
        /// The algorithm.
        algo: &'static str,
        /// The library's error.
        #[source]
        source: io::Error,
    },
}

/// Why one page could not be compressed or decompressed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream's set has no algorithm with this priority.
    #[error("no compression algorithm has priority {0}")]
    NoSuchPriority(Priority),
    /// The compressor failed (it should not: the output buffer fits any page).
    #[error("{algo}: compression failed: {reason}")]
    Compress {
        /// The algorithm.
        algo: &'static str,
        /// The library's reason.
        reason: String,
    },
    /// The input is not valid compressed data, or decompresses to more than one page.
    #[error("{algo}: corrupt compressed data: {reason}")]
    Corrupt {
        /// The algorithm.
        algo: &'static str,
        /// The library's reason.
        reason: String,
    },
    /// The input is valid but decompresses to less than one page.
    #[error("{algo}: data decompresses to {len} bytes, not one {PAGE_SIZE}-byte page")]
    ShortPage {
        /// The algorithm.
        algo: &'static str,
        /// The decompressed length.
        len: usize,
    },
}
