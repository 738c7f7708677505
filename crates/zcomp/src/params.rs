//! Algorithm parameters in zram's syntax.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::backend::{Backend, Lz4, Zstd};
use crate::error::ConfigError;

/// Which algorithm of a [`Comp`](crate::Comp) compressed some data: 0 is the primary one,
/// 1..=3 the secondary (recompression) ones. Fits in two bits of a slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Priority(u8);

impl Priority {
    /// The primary algorithm.
    pub const PRIMARY: Priority = Priority(0);
    /// The highest priority: a set has at most `MAX + 1` algorithms.
    pub const MAX: u8 = 3;

    /// The priority `p`, if `p <= Priority::MAX`.
    pub const fn new(p: u8) -> Option<Priority> {
        if p <= Self::MAX {
            Some(Priority(p))
        } else {
            None
        }
    }

    /// The number, `0..=Priority::MAX`.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Whether this is the primary algorithm's priority.
    pub const fn is_primary(self) -> bool {
        self.0 == 0
    }

    pub(crate) const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A compression algorithm zcomp implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// LZ4 block format through lz4_flex: fastest, about 2.4x on swap.
    Lz4,
    /// Zstandard through the zstd crate (libzstd): slower, about 3.1-3.7x on swap.
    Zstd,
}

impl Algorithm {
    /// Every algorithm, for listings.
    pub const ALL: [Algorithm; 2] = [Algorithm::Lz4, Algorithm::Zstd];

    /// The name zram uses for it.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| ConfigError::UnknownAlgorithm(s.to_string()))
    }
}

/// One algorithm with its parameters, as zram's `algorithm_params` / `recomp_algorithm` spell
/// it (see the crate docs for the syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Compression level (zstd only); `None` is the algorithm's default.
    pub level: Option<i32>,
    /// A dictionary file (zstd only).
    pub dict: Option<PathBuf>,
    /// The priority in a [`Comp`](crate::Comp); `None` means "primary" for the primary and
    /// "lowest free" for a secondary.
    pub priority: Option<Priority>,
}

impl Params {
    /// `algorithm` with default parameters.
    pub fn new(algorithm: Algorithm) -> Self {
        Params {
            algorithm,
            level: None,
            dict: None,
            priority: None,
        }
    }

    /// Checks the parameters against what the algorithm accepts (no file access).
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.algorithm {
            Algorithm::Lz4 => {
                // lz4_flex has a single speed and no prepared dictionaries (its dictionary
                // variant would re-hash the dictionary for every page).
                if self.level.is_some() {
                    return Err(ConfigError::Unsupported {
                        algo: "lz4",
                        param: "level",
                    });
                }
                if self.dict.is_some() {
                    return Err(ConfigError::Unsupported {
                        algo: "lz4",
                        param: "dict",
                    });
                }
            }
            Algorithm::Zstd => {
                if let Some(level) = self.level {
                    crate::backend::check_zstd_level(level)?;
                }
            }
        }
        Ok(())
    }

    /// Validates the parameters, reads the dictionary if any, and makes the backend.
    pub fn build(&self) -> Result<Arc<dyn Backend>, ConfigError> {
        self.validate()?;
        Ok(match self.algorithm {
            Algorithm::Lz4 => Arc::new(Lz4::new()),
            Algorithm::Zstd => {
                let level = self.level.unwrap_or(zstd::DEFAULT_COMPRESSION_LEVEL);
                let dict = match &self.dict {
                    None => None,
                    Some(path) => {
                        let bytes =
                            std::fs::read(path).map_err(|source| ConfigError::DictRead {
                                path: path.clone(),
                                source,
                            })?;
                        if bytes.is_empty() {
                            return Err(ConfigError::DictEmpty { path: path.clone() });
                        }
                        Some(bytes)
                    }
                };
                Arc::new(Zstd::new(level, dict)?)
            }
        })
    }
}

impl FromStr for Params {
    type Err = ConfigError;

    /// Parses `lz4`, `zstd:3` or `algo=zstd level=3 dict=/path priority=1` (pairs separated by
    /// spaces or commas).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.contains('=') {
            let (name, level) = match s.split_once(':') {
                Some((name, level)) => (name, Some(level)),
                None => (s, None),
            };
            let mut params = Params::new(name.trim().parse()?);
            if let Some(level) = level {
                params.level = Some(parse_level(params.algorithm, level.trim())?);
            }
            params.validate()?;
            return Ok(params);
        }

        let mut algorithm = None;
        let mut level = None;
        let mut dict = None;
        let mut priority = None;
        for pair in s.split([' ', '\t', ',']).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| ConfigError::Malformed(pair.to_string()))?;
            let key = match key {
                "algo" | "algorithm" => "algo",
                "level" => "level",
                "dict" => "dict",
                "priority" => "priority",
                other => return Err(ConfigError::UnknownParam(other.to_string())),
            };
            let fresh = match key {
                "algo" => algorithm.replace(value).is_none(),
                "level" => level.replace(value).is_none(),
                "dict" => dict.replace(value).is_none(),
                _ => priority.replace(value).is_none(),
            };
            if !fresh {
                return Err(ConfigError::Duplicate(key));
            }
        }
        let algorithm: Algorithm = algorithm
            .ok_or_else(|| ConfigError::MissingAlgorithm(s.to_string()))?
            .parse()?;
        let params = Params {
            algorithm,
            level: level.map(|l| parse_level(algorithm, l)).transpose()?,
            dict: match dict {
                Some("") => return Err(ConfigError::Malformed("dict=".into())),
                d => d.map(PathBuf::from),
            },
            priority: priority
                .map(|p| {
                    p.parse::<u8>()
                        .ok()
                        .and_then(Priority::new)
                        .ok_or_else(|| ConfigError::BadPriority(p.to_string()))
                })
                .transpose()?,
        };
        params.validate()?;
        Ok(params)
    }
}

fn parse_level(algorithm: Algorithm, s: &str) -> Result<i32, ConfigError> {
    s.parse().map_err(|_| ConfigError::LevelNotNumber {
        algo: algorithm.name(),
        value: s.to_string(),
    })
}

impl fmt::Display for Params {
    /// The `key=value` form, which [`Params::from_str`] parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "algo={}", self.algorithm)?;
        if let Some(level) = self.level {
            write!(f, " level={level}")?;
        }
        if let Some(dict) = &self.dict {
            write!(f, " dict={}", dict.display())?;
        }
        if let Some(priority) = self.priority {
            write!(f, " priority={priority}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Params {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> ConfigError {
        match s.parse::<Params>() {
            Ok(p) => panic!("{s} parsed as {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn short_forms() {
        assert_eq!(p("lz4"), Params::new(Algorithm::Lz4));
        assert_eq!(p(" zstd "), Params::new(Algorithm::Zstd));
        assert_eq!(p("zstd:3").level, Some(3));
        assert_eq!(p("zstd:-5").level, Some(-5));
    }

    #[test]
    fn key_value_forms() {
        let q = p("algo=zstd level=3 dict=/etc/swap.dict");
        assert_eq!(q.algorithm, Algorithm::Zstd);
        assert_eq!(q.level, Some(3));
        assert_eq!(q.dict, Some(PathBuf::from("/etc/swap.dict")));
        assert_eq!(q.priority, None);
        let q = p("algo=zstd level=-5");
        assert_eq!(q.level, Some(-5));
        let q = p("algorithm=zstd,level=9,priority=1");
        assert_eq!(q.priority, Priority::new(1));
        let q = p("priority=2  algo=lz4");
        assert_eq!(
            (q.algorithm, q.priority),
            (Algorithm::Lz4, Priority::new(2))
        );
    }

    #[test]
    fn display_parses_back() {
        for s in ["lz4", "zstd:-7", "algo=zstd level=19 dict=/x/y priority=3"] {
            let q = p(s);
            assert_eq!(p(&q.to_string()), q);
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(matches!(err("lzo"), ConfigError::UnknownAlgorithm(a) if a == "lzo"));
        assert!(matches!(
            err("algo=brotli"),
            ConfigError::UnknownAlgorithm(_)
        ));
        assert!(matches!(
            err("zstd:fast"),
            ConfigError::LevelNotNumber { .. }
        ));
        assert!(matches!(
            err("algo=zstd level=23"),
            ConfigError::LevelOutOfRange {
                level: 23,
                max: 22,
                ..
            }
        ));
        assert!(matches!(
            err("zstd:-200000"),
            ConfigError::LevelOutOfRange { .. }
        ));
        assert!(matches!(
            err("lz4:1"),
            ConfigError::Unsupported { param: "level", .. }
        ));
        assert!(matches!(
            err("algo=lz4 dict=/d"),
            ConfigError::Unsupported { param: "dict", .. }
        ));
        assert!(matches!(err("algo=zstd speed=3"), ConfigError::UnknownParam(k) if k == "speed"));
        assert!(matches!(err("algo=zstd level"), ConfigError::Malformed(_)));
        assert!(matches!(
            err("algo=zstd level=1 level=2"),
            ConfigError::Duplicate("level")
        ));
        assert!(matches!(
            err("level=1 priority=1"),
            ConfigError::MissingAlgorithm(_)
        ));
        assert!(matches!(
            err("algo=zstd priority=4"),
            ConfigError::BadPriority(_)
        ));
        assert!(matches!(
            err("algo=zstd priority=-1"),
            ConfigError::BadPriority(_)
        ));
        assert!(matches!(err("algo=zstd dict="), ConfigError::Malformed(_)));
        assert_eq!(
            err("zstd:99").to_string(),
            "zstd level 99 is outside -131072..=22"
        );
        assert!(err("lz5").to_string().contains("lz4, zstd"));
    }

    #[test]
    fn priorities() {
        assert_eq!(Priority::new(3).map(Priority::get), Some(3));
        assert_eq!(Priority::new(4), None);
        assert!(Priority::PRIMARY.is_primary());
        assert!(!Priority::new(1).unwrap().is_primary());
    }
}
