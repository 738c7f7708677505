//! Virtio and virtio-blk wire definitions: split-ring descriptors, used elements, the
//! virtio-blk config space. Request types, status codes and feature bits are virtio_bindings'
//! own (`virtio_blk::VIRTIO_BLK_T_IN`, ...), re-exported by the crate; what is here are the
//! values it does not name.

use serde::Serialize;
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use zram::SECTOR_SIZE;

/// `VHOST_USER_F_PROTOCOL_FEATURES`, the vhost-user feature bit (virtio_bindings has no name
/// for it).
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The features this frontend acknowledges when the backend offers them (EVENT_IDX only when
/// [`crate::Options::event_idx`] is set).
pub const WANTED_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | F_PROTOCOL_FEATURES
    | 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_TOPOLOGY
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES
    | 1 << VIRTIO_BLK_F_RO;

/// Size of the virtio-blk request header (type, ioprio, sector).
pub const BLK_HEADER_LEN: usize = 16;
/// Size of one discard / write-zeroes segment.
pub const BLK_SEGMENT_LEN: usize = 16;

/// A split-ring descriptor, as raw as the ring holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address of the buffer (or of the indirect table).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` flags; any bits may be set.
    pub flags: u16,
    /// Next descriptor index when `NEXT` is set; any value may be written.
    pub next: u16,
}

impl Desc {
    /// A device-readable descriptor that ends a chain.
    pub fn readable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable descriptor that ends a chain.
    pub fn writable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE as u16,
            next: 0,
        }
    }

    /// This descriptor, continued at `next`.
    pub fn then(mut self, next: u16) -> Desc {
        self.flags |= VRING_DESC_F_NEXT as u16;
        self.next = next;
        self
    }

    /// A descriptor that points at an indirect table of `count` descriptors.
    pub fn indirect(table: u64, count: u32) -> Desc {
        Desc {
            addr: table,
            len: count * 16,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        }
    }

    /// The 16 bytes the ring holds (little-endian).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..14].copy_from_slice(&self.flags.to_le_bytes());
        out[14..16].copy_from_slice(&self.next.to_le_bytes());
        out
    }

    /// Parses the 16 bytes of a ring slot.
    pub fn from_bytes(b: &[u8; 16]) -> Desc {
        Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
        }
    }
}

/// One element of the used ring, exactly as the backend wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UsedElem {
    /// Head descriptor index of the completed chain (32 bits on the wire; a backend may write
    /// anything here, so it is not narrowed).
    pub id: u32,
    /// Bytes the device says it wrote into the chain's writable buffers.
    pub len: u32,
}

/// The virtio-blk configuration space, parsed (fields the device did not return are 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum size of one segment (SIZE_MAX).
    pub size_max: u32,
    /// Maximum number of data segments in a request (SEG_MAX).
    pub seg_max: u32,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size in bytes (BLK_SIZE).
    pub blk_size: u32,
    /// log2(physical blocks per logical block) (TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (TOPOLOGY).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks (TOPOLOGY).
    pub min_io_size: u16,
    /// Optimal sustained I/O size in blocks (TOPOLOGY).
    pub opt_io_size: u32,
    /// Write-back cache mode (CONFIG_WCE).
    pub writeback: u8,
    /// Number of request queues (MQ).
    pub num_queues: u16,
    /// Maximum sectors of one discard segment (DISCARD).
    pub max_discard_sectors: u32,
    /// Maximum discard segments per request (DISCARD).
    pub max_discard_seg: u32,
    /// Discard alignment in sectors (DISCARD).
    pub discard_sector_alignment: u32,
    /// Maximum sectors of one write-zeroes segment (WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments per request (WRITE_ZEROES).
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with UNMAP may deallocate (WRITE_ZEROES).
    pub write_zeroes_may_unmap: u8,
    /// Maximum sectors of one secure-erase segment.
    pub max_secure_erase_sectors: u32,
    /// Maximum secure-erase segments per request.
    pub max_secure_erase_seg: u32,
    /// Secure-erase alignment in sectors.
    pub secure_erase_sector_alignment: u32,
}

/// Size of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` and its
/// padding; the default length this frontend asks for with `GET_CONFIG`.
pub const BLK_CONFIG_LEN: u32 = 60;

impl BlkConfig {
    /// Parses (a prefix of) the config space; missing bytes read as zero.
    pub fn parse(bytes: &[u8]) -> BlkConfig {
        let mut b = [0u8; 96];
        let n = bytes.len().min(b.len());
        b[..n].copy_from_slice(&bytes[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        BlkConfig {
            capacity: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            cylinders: u16_at(16),
            heads: b[18],
            sectors: b[19],
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
            max_secure_erase_sectors: u32_at(60),
            max_secure_erase_seg: u32_at(64),
            secure_erase_sector_alignment: u32_at(68),
        }
    }

    /// Encodes the config space (96 bytes, the zoned part zero): what a backend returns.
    pub fn to_bytes(&self) -> [u8; 96] {
        let mut b = [0u8; 96];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[16..18].copy_from_slice(&self.cylinders.to_le_bytes());
        b[18] = self.heads;
        b[19] = self.sectors;
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b[60..64].copy_from_slice(&self.max_secure_erase_sectors.to_le_bytes());
        b[64..68].copy_from_slice(&self.max_secure_erase_seg.to_le_bytes());
        b[68..72].copy_from_slice(&self.secure_erase_sector_alignment.to_le_bytes());
        b
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }
}

/// Names of the feature bits set in `features` (virtio, ring and blk bits this crate knows),
/// for logs and reports.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    const NAMES: &[(u32, &str)] = &[
        (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
        (VIRTIO_BLK_F_RO, "RO"),
        (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (VIRTIO_BLK_F_MQ, "MQ"),
        (VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (F_PROTOCOL_FEATURES.trailing_zeros(), "PROTOCOL_FEATURES"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| features & 1 << bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desc_round_trips_le() {
        let d = Desc {
            addr: 0x0102_0304_0506_0708,
            len: 0x1122_3344,
            flags: 0x5566,
            next: 0x7788,
        };
        let b = d.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 0x44);
        assert_eq!(b[12], 0x66);
        assert_eq!(b[14], 0x88);
        assert_eq!(Desc::from_bytes(&b), d);
    }

    #[test]
    fn config_round_trips() {
        let c = BlkConfig {
            capacity: 1 << 21,
            seg_max: 254,
            blk_size: 4096,
            num_queues: 4,
            max_discard_sectors: 1 << 20,
            max_discard_seg: 16,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 1 << 20,
            max_write_zeroes_seg: 16,
            write_zeroes_may_unmap: 1,
            opt_io_size: 7,
            ..Default::default()
        };
        assert_eq!(BlkConfig::parse(&c.to_bytes()), c);
        // A short config (a backend that only knows the first fields) parses with zeros.
        let short = BlkConfig::parse(&c.to_bytes()[..36]);
        assert_eq!(short.num_queues, 4);
        assert_eq!(short.max_discard_seg, 0);
    }
}
