//! The vhost-user session: connect, negotiate, hand over memory, set up vrings.

use crate::mem::GuestMem;
use crate::queue::Queue;
use crate::virtio::*;
use crate::{Error, Result, vhost_err};
use std::fmt;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend as VhostFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// How to connect and what to negotiate.
#[derive(Clone, Debug)]
pub struct Options {
    /// Queues to set up (1..=what the backend offers).
    pub num_queues: u16,
    /// Entries per queue (a power of two).
    pub queue_size: u16,
    /// Guest memory size for [`Frontend::connect`] (one region at [`crate::DEFAULT_GUEST_BASE`]).
    pub mem_size: u64,
    /// Acknowledge `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Acknowledge `VIRTIO_RING_F_INDIRECT_DESC` if offered.
    pub indirect: bool,
    /// Keep retrying the connect (the daemon may still be starting) until this long.
    pub connect_timeout: Duration,
    /// Bytes of config space to ask for with `GET_CONFIG`.
    pub config_len: u32,
    /// Acknowledge `VHOST_USER_PROTOCOL_F_REPLY_ACK` and ask for an ack of every request.
    pub reply_ack: bool,
    /// Hand memory over with one `ADD_MEM_REG` per region instead of `SET_MEM_TABLE`
    /// (needs `CONFIGURE_MEM_SLOTS`).
    pub add_mem_reg: bool,
    /// Features acknowledged = offered & this mask (EVENT_IDX and INDIRECT_DESC further
    /// depend on the flags above).
    pub feature_mask: u64,
    /// Send exactly these bits with `SET_FEATURES`, offered or not (to test the backend's
    /// refusal).
    pub features_override: Option<u64>,
    /// How long one vhost-user request may take, reply included (None: forever). A backend
    /// that stops answering gets its connection shut down and the call fails with
    /// [`Error::NoReply`] instead of hanging the caller.
    pub reply_timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            event_idx: true,
            indirect: true,
            connect_timeout: Duration::from_secs(10),
            config_len: BLK_CONFIG_LEN,
            reply_ack: true,
            add_mem_reg: false,
            feature_mask: WANTED_FEATURES,
            features_override: None,
            reply_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// The frontend's end of one vhost-user-blk connection: what QEMU does for a vhost-user-blk
/// device, without a VM.
///
/// Dropping it (or [`Frontend::disconnect`]) closes the socket; queues taken out of it stay
/// usable as ring memory and can be attached to a later connection with
/// [`Frontend::attach_queue`].
pub struct Frontend {
    session: Session,
    /// A duplicate of the vhost-user socket that queues watch for the backend hanging up
    /// (they hold it weakly: dropping the device still closes the connection).
    peer: Arc<OwnedFd>,
    socket: PathBuf,
    mem: Arc<GuestMem>,
    offered: u64,
    acked: u64,
    protocol_offered: u64,
    protocol_acked: u64,
    max_queues: u64,
    config: BlkConfig,
    config_len: u32,
    queues: Vec<Option<Queue>>,
}

impl fmt::Debug for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frontend")
            .field("socket", &self.socket)
            .field("features", &feature_names(self.acked))
            .field(
                "protocol_features",
                &format_args!("{:#x}", self.protocol_acked),
            )
            .field("max_queues", &self.max_queues)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Connects to `path`, retrying while the socket is missing or refuses, until `timeout`.
pub(crate) fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    }
}

impl Frontend {
    /// Connects with fresh guest memory of `opts.mem_size` bytes.
    pub fn connect(path: impl AsRef<Path>, opts: &Options) -> Result<Frontend> {
        let mem = GuestMem::with_size(opts.mem_size)?;
        Frontend::connect_with_memory(path, opts, mem)
    }

    /// Connects and negotiates, hands `mem` to the backend and sets up `opts.num_queues` queues
    /// with fresh rings allocated in `mem` (none if `num_queues` is 0: attach existing ones).
    ///
    /// Order: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG,
    /// SET_FEATURES, SET_MEM_TABLE (or ADD_MEM_REG), then per queue SET_VRING_NUM, _ADDR,
    /// _BASE, _CALL, _KICK, _ENABLE.
    pub fn connect_with_memory(
        path: impl AsRef<Path>,
        opts: &Options,
        mem: Arc<GuestMem>,
    ) -> Result<Frontend> {
        let path = path.as_ref();
        let stream = connect_socket(path, opts.connect_timeout)?;
        let peer = Arc::new(OwnedFd::from(stream.try_clone()?));
        let mut fe = Session::new(
            stream,
            u64::from(opts.num_queues.max(1)),
            opts.reply_timeout,
        )?;

        fe.call("SET_OWNER", |f| f.set_owner())?;
        let offered = fe.call("GET_FEATURES", |f| f.get_features())?;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::MissingFeature("VIRTIO_F_VERSION_1"));
        }

        let (mut protocol_offered, mut protocol_acked) = (0, 0);
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let p = fe.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let mut want = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::RESET_DEVICE;
            if opts.reply_ack {
                want |= VhostUserProtocolFeatures::REPLY_ACK;
            }
            let ack = p & want;
            fe.call("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(ack))?;
            // Only now: libvhost-user (QSD) acks every NEED_REPLY message even before
            // REPLY_ACK is negotiated, while the vhost crate waits for an ack only after.
            if ack.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            protocol_offered = p.bits();
            protocol_acked = ack.bits();
        }
        let has = |f: VhostUserProtocolFeatures| protocol_acked & f.bits() != 0;

        let max_queues = if has(VhostUserProtocolFeatures::MQ) {
            fe.call("GET_QUEUE_NUM", |f| f.get_queue_num())?
        } else {
            1
        };
        if u64::from(opts.num_queues) > max_queues {
            return Err(Error::Invalid(format!(
                "{} queues requested, the backend offers {max_queues}",
                opts.num_queues
            )));
        }

        if !has(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        let config = read_config(&mut fe, opts.config_len)?;

        let mut mask = opts.feature_mask;
        if !opts.event_idx {
            mask &= !(1 << VIRTIO_RING_F_EVENT_IDX);
        }
        if !opts.indirect {
            mask &= !(1 << VIRTIO_RING_F_INDIRECT_DESC);
        }
        let acked = opts.features_override.unwrap_or(offered & mask);
        fe.call("SET_FEATURES", |f| f.set_features(acked))?;

        let regions = mem.vhost_regions()?;
        if opts.add_mem_reg {
            if !has(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                return Err(Error::MissingFeature(
                    "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
                ));
            }
            for r in &regions {
                fe.call("ADD_MEM_REG", |f| f.add_mem_region(r))?;
            }
        } else {
            fe.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        }

        let mut dev = Frontend {
            session: fe,
            peer,
            socket: path.to_path_buf(),
            mem,
            offered,
            acked,
            protocol_offered,
            protocol_acked,
            max_queues,
            config,
            config_len: opts.config_len,
            queues: Vec::new(),
        };
        for i in 0..opts.num_queues {
            let q = dev.setup_queue(i, opts.queue_size)?;
            dev.queues.push(Some(q));
        }
        log::debug!("connected {dev:?}");
        Ok(dev)
    }

    /// A new queue with fresh rings, set up on the backend as queue `index`.
    pub fn setup_queue(&mut self, index: u16, size: u16) -> Result<Queue> {
        let mut q = Queue::new(&self.mem, index, size)?;
        self.attach_queue(&mut q, 0)?;
        Ok(q)
    }

    /// Sets up `q`'s existing rings on this connection (SET_VRING_NUM, _ADDR, _BASE = `base`,
    /// _CALL, _KICK, _ENABLE), e.g. after a reconnect. `q` must live in this device's memory.
    pub fn attach_queue(&mut self, q: &mut Queue, base: u16) -> Result<()> {
        if !Arc::ptr_eq(q.mem(), &self.mem) {
            return Err(Error::Invalid(
                "the queue lives in another guest memory than the device's".into(),
            ));
        }
        q.set_event_idx(self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        q.set_peer(Arc::downgrade(&self.peer));
        q.set_indirect(self.acked & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0);
        let i = q.index() as usize;
        let fe = &mut self.session;
        fe.call("SET_VRING_NUM", |f| f.set_vring_num(i, q.size()))?;
        let addrs = VringConfigData {
            queue_max_size: q.size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: self.mem.host_address(q.desc_table_gpa())?,
            used_ring_addr: self.mem.host_address(q.used_gpa())?,
            avail_ring_addr: self.mem.host_address(q.avail_gpa())?,
            log_addr: None,
        };
        fe.call("SET_VRING_ADDR", |f| f.set_vring_addr(i, &addrs))?;
        fe.call("SET_VRING_BASE", |f| f.set_vring_base(i, base))?;
        fe.call("SET_VRING_CALL", |f| f.set_vring_call(i, q.call_fd()))?;
        fe.call("SET_VRING_KICK", |f| f.set_vring_kick(i, q.kick_fd()))?;
        if self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            fe.call("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
        }
        Ok(())
    }

    /// Stops queue `index` with GET_VRING_BASE; returns the backend's next avail index.
    pub fn stop_queue(&mut self, index: u16) -> Result<u16> {
        let base = self
            .session
            .call("GET_VRING_BASE", |f| f.get_vring_base(index as usize))?;
        u16::try_from(base).map_err(|_| {
            Error::Protocol(format!("GET_VRING_BASE of queue {index} answered {base}"))
        })
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&mut self, index: u16, enable: bool) -> Result<()> {
        self.session.call("SET_VRING_ENABLE", |f| {
            f.set_vring_enable(index as usize, enable)
        })
    }

    /// RESET_DEVICE (needs the protocol feature).
    pub fn reset_device(&mut self) -> Result<()> {
        self.session.call("RESET_DEVICE", |f| f.reset_device())
    }

    /// Reads the config space again.
    pub fn refresh_config(&mut self) -> Result<BlkConfig> {
        self.config = read_config(&mut self.session, self.config_len)?;
        Ok(self.config.clone())
    }

    /// The config space read at connect (or the last refresh).
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.config.capacity_bytes()
    }

    /// Features sent with SET_FEATURES.
    pub fn features(&self) -> u64 {
        self.acked
    }

    /// Features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Protocol features acknowledged (bits of `VhostUserProtocolFeatures`).
    pub fn protocol_features(&self) -> u64 {
        self.protocol_acked
    }

    /// Protocol features the backend offered.
    pub fn offered_protocol_features(&self) -> u64 {
        self.protocol_offered
    }

    /// Queues the backend offers (GET_QUEUE_NUM, or 1 without MQ).
    pub fn max_queues(&self) -> u64 {
        self.max_queues
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Takes queue `index` (set up at connect) out of the device.
    pub fn take_queue(&mut self, index: u16) -> Option<Queue> {
        self.queues.get_mut(index as usize).and_then(Option::take)
    }

    /// Takes all queues that are still in the device.
    pub fn take_queues(&mut self) -> Vec<Queue> {
        self.queues.iter_mut().filter_map(Option::take).collect()
    }

    /// Queue `index`, if still in the device.
    pub fn queue_mut(&mut self, index: u16) -> Option<&mut Queue> {
        self.queues.get_mut(index as usize).and_then(Option::as_mut)
    }

    /// The vhost crate's frontend, for messages this type has no method for (not covered by
    /// the reply timeout).
    pub fn frontend(&mut self) -> &mut VhostFrontend {
        &mut self.session.fe
    }

    /// Closes the connection.
    pub fn disconnect(self) {}
}

fn read_config(fe: &mut Session, len: u32) -> Result<BlkConfig> {
    let buf = vec![0u8; len as usize];
    let (_, bytes) = fe.call("GET_CONFIG", |f| {
        f.get_config(0, len, VhostUserConfigFlags::empty(), &buf)
    })?;
    Ok(BlkConfig::parse(&bytes))
}

/// The frontend plus a watchdog that shuts the socket down when a request outlives the reply
/// timeout. (A socket read timeout does not work: the vhost crate retries EAGAIN in a loop.)
struct Session {
    fe: VhostFrontend,
    timeout: Option<Duration>,
    dog: Option<Arc<Watchdog>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct DogState {
    deadline: Option<Instant>,
    fired: bool,
    stop: bool,
}

struct Watchdog {
    state: Mutex<DogState>,
    cv: Condvar,
    sock: UnixStream,
}

impl Watchdog {
    fn run(&self) {
        let mut st = self.state.lock().unwrap();
        while !st.stop {
            st = match st.deadline {
                None => self.cv.wait(st).unwrap(),
                Some(d) if Instant::now() >= d => {
                    let _ = self.sock.shutdown(std::net::Shutdown::Both);
                    st.fired = true;
                    st.deadline = None;
                    st
                }
                Some(d) => self.cv.wait_timeout(st, d - Instant::now()).unwrap().0,
            };
        }
    }

    fn set(&self, deadline: Option<Instant>) -> bool {
        let mut st = self.state.lock().unwrap();
        st.deadline = deadline;
        self.cv.notify_one();
        st.fired
    }
}

impl Session {
    fn new(stream: UnixStream, max_queues: u64, timeout: Option<Duration>) -> Result<Session> {
        let (dog, thread) = match timeout {
            Some(_) => {
                let dog = Arc::new(Watchdog {
                    state: Mutex::default(),
                    cv: Condvar::new(),
                    sock: stream.try_clone()?,
                });
                let d = Arc::clone(&dog);
                let t = std::thread::Builder::new()
                    .name("vufront-watchdog".into())
                    .spawn(move || d.run())?;
                (Some(dog), Some(t))
            }
            None => (None, None),
        };
        Ok(Session {
            fe: VhostFrontend::from_stream(stream, max_queues),
            timeout,
            dog,
            thread,
        })
    }

    fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut VhostFrontend) -> vhost::Result<T>,
    ) -> Result<T> {
        let start = Instant::now();
        if let (Some(dog), Some(t)) = (&self.dog, self.timeout) {
            if dog.set(Some(start + t)) {
                return Err(Error::NoReply { op, waited: t });
            }
        }
        let r = f(&mut self.fe);
        let fired = self.dog.as_ref().is_some_and(|d| d.set(None));
        match r {
            Ok(v) => Ok(v),
            Err(_) if fired => Err(Error::NoReply {
                op,
                waited: start.elapsed(),
            }),
            Err(e) => Err(vhost_err(op)(e)),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(dog) = &self.dog {
            dog.state.lock().unwrap().stop = true;
            dog.cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
