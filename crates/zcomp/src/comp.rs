//! The algorithm set of a device: a primary algorithm and up to three secondary ones.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::ConfigError;
use crate::params::{Params, Priority};
use crate::stream::Stream;

const SLOTS: usize = Priority::MAX as usize + 1;

/// A primary algorithm (priority 0) and up to three secondary ones (priorities 1..=3), shared
/// by all workers of a device (`Arc<Comp>`). Each worker makes its own [`Stream`] from it.
#[derive(Debug, Clone)]
pub struct Comp {
    backends: [Option<Arc<dyn Backend>>; SLOTS],
    params: [Option<Params>; SLOTS],
}

impl Comp {
    /// A set with one algorithm, the primary.
    pub fn new(primary: &Params) -> Result<Comp, ConfigError> {
        Comp::with_secondaries(primary, &[])
    }

    /// A set of a primary algorithm and secondary ones. The primary's priority must be unset
    /// or 0; a secondary without a priority gets the lowest free one of 1..=3.
    pub fn with_secondaries(primary: &Params, secondary: &[Params]) -> Result<Comp, ConfigError> {
        let mut params: [Option<Params>; SLOTS] = Default::default();
        match primary.priority {
            None | Some(Priority::PRIMARY) => {}
            Some(p) => return Err(ConfigError::PrimaryPriority(p)),
        }
        params[0] = Some(Params {
            priority: Some(Priority::PRIMARY),
            ..primary.clone()
        });
        // Explicit priorities first, so that an unset one cannot take a slot named later.
        for s in secondary.iter().filter(|s| s.priority.is_some()) {
            let p = s.priority.unwrap_or_default();
            if p.is_primary() {
                return Err(ConfigError::SecondaryPriority(s.to_string()));
            }
            if params[p.index()].is_some() {
                return Err(ConfigError::DuplicatePriority(p));
            }
            params[p.index()] = Some(s.clone());
        }
        for s in secondary.iter().filter(|s| s.priority.is_none()) {
            let free = (1..SLOTS).find(|&i| params[i].is_none()).ok_or_else(|| {
                ConfigError::SecondaryPriority(format!("no priority left for {s}"))
            })?;
            params[free] = Some(Params {
                priority: Priority::new(free as u8),
                ..s.clone()
            });
        }
        let mut backends: [Option<Arc<dyn Backend>>; SLOTS] = Default::default();
        for (backend, p) in backends.iter_mut().zip(&params) {
            if let Some(p) = p {
                *backend = Some(p.build()?);
            }
        }
        Ok(Comp { backends, params })
    }

    /// Parses zram-style strings (see the crate docs) and builds the set: `primary` as
    /// `comp_algorithm`, each of `secondary` as a `recomp_algorithm` line.
    pub fn parse(primary: &str, secondary: &[&str]) -> Result<Comp, ConfigError> {
        let primary: Params = primary.parse()?;
        let secondary = secondary
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<Params>, _>>()?;
        Comp::with_secondaries(&primary, &secondary)
    }

    /// A set of ready-made backends (for backends outside this crate, and tests).
    pub fn from_backends(
        primary: Arc<dyn Backend>,
        secondary: Vec<(Priority, Arc<dyn Backend>)>,
    ) -> Result<Comp, ConfigError> {
        let mut backends: [Option<Arc<dyn Backend>>; SLOTS] = Default::default();
        backends[0] = Some(primary);
        for (p, backend) in secondary {
            if p.is_primary() {
                return Err(ConfigError::SecondaryPriority(backend.name().to_string()));
            }
            if backends[p.index()].is_some() {
                return Err(ConfigError::DuplicatePriority(p));
            }
            backends[p.index()] = Some(backend);
        }
        Ok(Comp {
            backends,
            params: Default::default(),
        })
    }

    /// The backend of priority `p`, if the set has one.
    pub fn backend(&self, p: Priority) -> Option<&Arc<dyn Backend>> {
        self.backends[p.index()].as_ref()
    }

    /// The parameters the backend of priority `p` was built from (`None` for backends given to
    /// [`Comp::from_backends`]).
    pub fn params(&self, p: Priority) -> Option<&Params> {
        self.params[p.index()].as_ref()
    }

    /// The priorities this set has algorithms for, ascending; the first is always 0.
    pub fn priorities(&self) -> impl Iterator<Item = Priority> + '_ {
        (0..SLOTS as u8)
            .filter_map(Priority::new)
            .filter(|p| self.backends[p.index()].is_some())
    }

    /// A stream for one worker: one context per algorithm of the set, its output buffer and its
    /// `local_copy`. Allocates; call once per worker, not per page.
    pub fn new_stream(&self) -> Result<Stream, ConfigError> {
        let mut contexts: [Option<Box<dyn crate::Context>>; SLOTS] = Default::default();
        for (context, backend) in contexts.iter_mut().zip(&self.backends) {
            if let Some(backend) = backend {
                *context = Some(backend.new_context()?);
            }
        }
        let names = self
            .backends
            .each_ref()
            .map(|b| b.as_ref().map(|b| b.name()));
        Ok(Stream::new(contexts, names))
    }
}
