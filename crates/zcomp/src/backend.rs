//! The backend trait and the two backends, lz4 and zstd.

use std::fmt;
use std::sync::Arc;

use lz4_flex::block::{CompressTable, DecompressError};

use crate::error::{ConfigError, Error};
use crate::{BUFFER_SIZE, PAGE_SIZE};

/// One configured compression algorithm, shared by all workers.
///
/// Immutable once made; everything that changes while compressing lives in the [`Context`]s it
/// makes, one per stream.
pub trait Backend: Send + Sync + fmt::Debug {
    /// zram's name for the algorithm (`lz4`, `zstd`).
    fn name(&self) -> &'static str;

    /// Makes the per-worker state: allocated here, once, and reused for every page.
    fn new_context(&self) -> Result<Box<dyn Context>, ConfigError>;
}

/// The per-worker state of one [`Backend`].
///
/// Callers go through [`Codec`](crate::Codec), which checks that the caller may sleep first;
/// implementations only compress.
pub trait Context: Send + fmt::Debug {
    /// Compresses one page into `dst` and returns the compressed length. The result may exceed
    /// `PAGE_SIZE` for incompressible pages; deciding to store such a page raw is the caller's.
    fn compress(
        &mut self,
        src: &[u8; PAGE_SIZE],
        dst: &mut [u8; BUFFER_SIZE],
    ) -> Result<usize, Error>;

    /// Decompresses `src` into `dst`. Returns `Ok` only if `src` is valid and decompresses to
    /// exactly `PAGE_SIZE` bytes; must never panic or write outside `dst`, whatever `src` is.
    fn decompress(&mut self, src: &[u8], dst: &mut [u8; PAGE_SIZE]) -> Result<(), Error>;
}

// The output buffer must hold lz4's worst case for one page.
const _: () = assert!(lz4_flex::block::get_maximum_output_size(PAGE_SIZE) <= BUFFER_SIZE);

/// LZ4 (block format, no frame) through lz4_flex's fast paths.
#[derive(Debug, Default)]
pub struct Lz4 {
    _private: (),
}

impl Lz4 {
    /// The lz4 backend; it has no parameters.
    pub fn new() -> Self {
        Lz4 { _private: () }
    }
}

impl Backend for Lz4 {
    fn name(&self) -> &'static str {
        "lz4"
    }

    fn new_context(&self) -> Result<Box<dyn Context>, ConfigError> {
        Ok(Box::new(Lz4Context {
            // 16-bit positions suffice for 4 KiB inputs; kept per stream, cleared per page.
            table: CompressTable::small(),
        }))
    }
}

struct Lz4Context {
    table: CompressTable,
}

impl fmt::Debug for Lz4Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lz4Context").finish_non_exhaustive()
    }
}

impl Context for Lz4Context {
    fn compress(
        &mut self,
        src: &[u8; PAGE_SIZE],
        dst: &mut [u8; BUFFER_SIZE],
    ) -> Result<usize, Error> {
        lz4_flex::block::compress_into_with_table(src, dst, &mut self.table).map_err(|e| {
            Error::Compress {
                algo: "lz4",
                reason: e.to_string(),
            }
        })
    }

    fn decompress(&mut self, src: &[u8], dst: &mut [u8; PAGE_SIZE]) -> Result<(), Error> {
        // The block decoder bounds-checks every literal run, match offset and match length
        // against `src` and `dst` (unconditionally in lz4_flex 0.14, also without `safe-decode`),
        // so corrupt input is an error, never an out-of-bounds access.
        match lz4_flex::block::decompress_into(src, dst) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(len) => Err(Error::ShortPage { algo: "lz4", len }),
            Err(DecompressError::OutputTooSmall { .. }) => Err(Error::Corrupt {
                algo: "lz4",
                reason: "decompresses to more than one page".into(),
            }),
            Err(e) => Err(Error::Corrupt {
                algo: "lz4",
                reason: e.to_string(),
            }),
        }
    }
}

/// Zstandard through the zstd crate: a level (negative levels are the fast modes) and an
/// optional dictionary.
pub struct Zstd {
    level: i32,
    dict: Option<Arc<[u8]>>,
}

/// Checks `level` against the range the linked libzstd accepts.
pub(crate) fn check_zstd_level(level: i32) -> Result<(), ConfigError> {
    let range = zstd::compression_level_range();
    if range.contains(&level) {
        Ok(())
    } else {
        Err(ConfigError::LevelOutOfRange {
            level,
            min: *range.start(),
            max: *range.end(),
        })
    }
}

impl Zstd {
    /// A zstd backend at `level` with an optional dictionary (zstd-format or raw content).
    ///
    /// Makes one context to check that libzstd accepts the level and the dictionary, so that a
    /// bad configuration fails here and not in a worker.
    pub fn new(level: i32, dict: Option<Vec<u8>>) -> Result<Self, ConfigError> {
        check_zstd_level(level)?;
        let zstd = Zstd {
            level,
            dict: dict.map(Arc::from),
        };
        zstd.new_context()?;
        Ok(zstd)
    }

    /// The compression level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// The dictionary, if any.
    pub fn dict(&self) -> Option<&[u8]> {
        self.dict.as_deref()
    }
}

impl fmt::Debug for Zstd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zstd")
            .field("level", &self.level)
            .field("dict_len", &self.dict.as_ref().map(|d| d.len()))
            .finish()
    }
}

impl Backend for Zstd {
    fn name(&self) -> &'static str {
        "zstd"
    }

    fn new_context(&self) -> Result<Box<dyn Context>, ConfigError> {
        let context = |source| ConfigError::Context {
            algo: "zstd",
            source,
        };
        // With a dictionary, libzstd digests it into the context once (a local CDict / DDict)
        // and reuses it for every page; the zstd crate's prepared dictionaries would share one
        // digest between streams but tie each context to a borrow of it.
        let dict = self.dict.as_deref().unwrap_or(&[]);
        let compressor =
            zstd::bulk::Compressor::with_dictionary(self.level, dict).map_err(context)?;
        let decompressor = zstd::bulk::Decompressor::with_dictionary(dict).map_err(context)?;
        Ok(Box::new(ZstdContext {
            compressor,
            decompressor,
        }))
    }
}

struct ZstdContext {
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl fmt::Debug for ZstdContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZstdContext").finish_non_exhaustive()
    }
}

impl Context for ZstdContext {
    fn compress(
        &mut self,
        src: &[u8; PAGE_SIZE],
        dst: &mut [u8; BUFFER_SIZE],
    ) -> Result<usize, Error> {
        self.compressor
            .compress_to_buffer(src, &mut dst[..])
            .map_err(|e| Error::Compress {
                algo: "zstd",
                reason: e.to_string(),
            })
    }

    fn decompress(&mut self, src: &[u8], dst: &mut [u8; PAGE_SIZE]) -> Result<(), Error> {
        // The frame records the content size and libzstd refuses output that does not fit
        // `dst` ("Destination buffer is too small"), so an overlong page is an error here.
        match self.decompressor.decompress_to_buffer(src, &mut dst[..]) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(len) => Err(Error::ShortPage { algo: "zstd", len }),
            Err(e) => Err(Error::Corrupt {
                algo: "zstd",
                reason: e.to_string(),
            }),
        }
    }
}
