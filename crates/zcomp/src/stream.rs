//! A worker's stream: contexts, output buffer and `local_copy`.

use std::fmt;

use crate::backend::Context;
use crate::error::Error;
use crate::params::Priority;
use crate::{BUFFER_SIZE, PAGE_SIZE};

const SLOTS: usize = Priority::MAX as usize + 1;

/// Everything one worker needs to compress and decompress pages, owned by that worker.
///
/// The two halves are public fields so that both can be borrowed at once: zsmalloc's read
/// guard borrows [`local_copy`](Stream::local_copy) while [`codec`](Stream::codec)
/// decompresses the bytes the guard shows (see the crate docs).
#[derive(Debug)]
pub struct Stream {
    /// A one-page buffer for zsmalloc's `read_begin`, which copies an object that spans two
    /// pages into it. zcomp itself never touches it.
    pub local_copy: Box<[u8; PAGE_SIZE]>,
    /// The algorithms' contexts and the compression output buffer.
    pub codec: Codec,
}

impl Stream {
    pub(crate) fn new(
        contexts: [Option<Box<dyn Context>>; SLOTS],
        names: [Option<&'static str>; SLOTS],
    ) -> Self {
        Stream {
            local_copy: Box::new([0; PAGE_SIZE]),
            codec: Codec {
                contexts,
                names,
                buffer: Box::new([0; BUFFER_SIZE]),
            },
        }
    }

    /// Both halves, borrowed separately (the same as borrowing the two fields).
    pub fn parts(&mut self) -> (&mut [u8; PAGE_SIZE], &mut Codec) {
        (&mut self.local_copy, &mut self.codec)
    }

    /// Compresses `src` with the primary algorithm; see [`Codec::compress_with`].
    pub fn compress(&mut self, src: &[u8; PAGE_SIZE]) -> Result<&[u8], Error> {
        self.codec.compress_with(Priority::PRIMARY, src)
    }

    /// Decompresses data the primary algorithm made; see [`Codec::decompress_with`].
    pub fn decompress(&mut self, src: &[u8], dst: &mut [u8; PAGE_SIZE]) -> Result<(), Error> {
        self.codec.decompress_with(Priority::PRIMARY, src, dst)
    }
}

/// One context per algorithm of a [`Comp`](crate::Comp) and the output buffer compression
/// writes into. Part of a [`Stream`].
pub struct Codec {
    contexts: [Option<Box<dyn Context>>; SLOTS],
    names: [Option<&'static str>; SLOTS],
    buffer: Box<[u8; BUFFER_SIZE]>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("algorithms", &self.names)
            .finish_non_exhaustive()
    }
}

impl Codec {
    /// The name of the algorithm with priority `p`, if the set has one.
    pub fn name(&self, p: Priority) -> Option<&'static str> {
        self.names[p.index()]
    }

    fn context(&mut self, p: Priority) -> Result<&mut dyn Context, Error> {
        match &mut self.contexts[p.index()] {
            Some(context) => Ok(context.as_mut()),
            None => Err(Error::NoSuchPriority(p)),
        }
    }

    /// Compresses `src` with the primary algorithm.
    pub fn compress(&mut self, src: &[u8; PAGE_SIZE]) -> Result<&[u8], Error> {
        self.compress_with(Priority::PRIMARY, src)
    }

    /// Compresses `src` with the algorithm of priority `p` and returns the compressed bytes,
    /// which stay in this stream's buffer until its next compression. They may be longer than
    /// a page (incompressible data); whether to store such a page raw is the caller's choice.
    /// Store `p` with the data: decompression needs it.
    ///
    /// May sleep: panics in debug builds inside a `preempt::NonSleepGuard` section.
    pub fn compress_with(&mut self, p: Priority, src: &[u8; PAGE_SIZE]) -> Result<&[u8], Error> {
        preempt::might_sleep();
        // Split borrow: the context and the buffer are different fields.
        let context = match &mut self.contexts[p.index()] {
            Some(context) => context,
            None => return Err(Error::NoSuchPriority(p)),
        };
        let len = context.compress(src, &mut self.buffer)?;
        Ok(&self.buffer[..len])
    }

    /// Decompresses data made by the primary algorithm.
    pub fn decompress(&mut self, src: &[u8], dst: &mut [u8; PAGE_SIZE]) -> Result<(), Error> {
        self.decompress_with(Priority::PRIMARY, src, dst)
    }

    /// Decompresses `src`, made by the algorithm of priority `p`, into `dst`.
    ///
    /// `Ok` means `dst` holds exactly one page. Corrupt input, input that decompresses to less
    /// or more than one page, or an unknown priority is an error; `dst` may then hold partial
    /// output. Never panics on bad input and never writes outside `dst`.
    ///
    /// May sleep: panics in debug builds inside a `preempt::NonSleepGuard` section.
    pub fn decompress_with(
        &mut self,
        p: Priority,
        src: &[u8],
        dst: &mut [u8; PAGE_SIZE],
    ) -> Result<(), Error> {
        preempt::might_sleep();
        self.context(p)?.decompress(src, dst)
    }
}
