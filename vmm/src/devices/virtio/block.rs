//! virtio-blk (virtio 1.2 section 5.2) backed by a raw image file or block device.
//!
//! Requests are served on the device's own worker thread. Every descriptor
//! of a request is checked (direction, length, range) before any I/O, and
//! guest memory is only touched through vm-memory's checked accessors: a
//! malformed chain gets an error status, never a panic or a stray access.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap, Le32, Le64};

use super::worker::{next_chain, notify_used, BrokenQueue, DeviceHandler};
use super::{
    read_config, ActivateContext, ActivateError, DeviceWorker, VirtioDevice, VirtioInterrupt,
    TYPE_BLOCK,
};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID string (virtio-blk's VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
/// Largest bounce buffer used for one data descriptor's I/O.
const IO_CHUNK: usize = 1 << 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk {0}: {1}")]
    Open(PathBuf, io::Error),
    #[error("disk {0} is {1} bytes, not a multiple of 512")]
    Size(PathBuf, u64),
}

/// Why a request was refused; turned into a status byte for the driver.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request header is not readable or shorter than 16 bytes")]
    BadHeader,
    #[error("descriptor chain has no writable status byte")]
    MissingStatus,
    #[error("data descriptor has the wrong direction")]
    WrongDirection,
    #[error("data length {0} is not a whole number of sectors")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{len} bytes lie outside the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory access failed")]
    Memory,
    #[error("disk I/O failed: {0}")]
    Io(String),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// One guest buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// A request whose shape has been checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    pub data: Vec<Segment>,
    pub status: GuestAddress,
}

impl Request {
    fn data_len(&self) -> u64 {
        self.data.iter().map(|s| s.len as u64).sum()
    }
}

/// Parses a chain's segments into a request, or says why it cannot be one.
/// On error, also returns where the status byte goes, if the chain has one.
pub fn parse_request(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
) -> Result<Request, (RequestError, Option<GuestAddress>)> {
    let status = segments
        .last()
        .filter(|s| s.write_only && s.len >= 1 && segments.len() >= 2)
        // The status byte is the last byte of the last descriptor.
        .map(|s| GuestAddress(s.addr.0.wrapping_add(s.len as u64 - 1)));
    let Some(status_addr) = status else {
        return Err((RequestError::MissingStatus, None));
    };
    let header = segments[0];
    if header.write_only || header.len < 16 {
        return Err((RequestError::BadHeader, status));
    }
    let kind: u32 = mem
        .read_obj(header.addr)
        .map_err(|_| (RequestError::Memory, status))?;
    let sector: u64 = mem
        .read_obj(GuestAddress(header.addr.0.wrapping_add(8)))
        .map_err(|_| (RequestError::Memory, status))?;
    let data: Vec<Segment> = segments[1..segments.len() - 1].to_vec();
    let want_write_only = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => Some(true),
        VIRTIO_BLK_T_OUT => Some(false),
        _ => None,
    };
    if let Some(w) = want_write_only {
        if data.iter().any(|s| s.write_only != w) {
            return Err((RequestError::WrongDirection, status));
        }
    }
    Ok(Request {
        kind,
        sector,
        data,
        status: status_addr,
    })
}

/// A disk image opened for the guest.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    file: File,
    read_only: bool,
    size: u64,
    id: [u8; ID_BYTES],
}

impl DiskImage {
    /// A disk from an open image (see `crate::boot_file`); `path` names it
    /// in errors and gives the disk's serial (its last component).
    pub fn from_file(path: &Path, file: File, read_only: bool) -> Result<Self, BlockError> {
        // Block devices report 0 in metadata; seeking to the end works for both.
        let size = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))
                .map_err(|e| BlockError::Open(path.to_owned(), e))?
        };
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Size(path.to_owned(), size));
        }
        let mut id = [0u8; ID_BYTES];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            path: path.to_owned(),
            file,
            read_only,
            size,
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            Ok(())
        } else {
            self.file.sync_data()
        }
    }

    /// Executes a checked request; returns the bytes written to guest memory
    /// (not counting the status byte).
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        req: &Request,
        bounce: &mut Vec<u8>,
    ) -> Result<u32, RequestError> {
        match req.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                if req.kind == VIRTIO_BLK_T_OUT && self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let len = req.data_len();
                if len % SECTOR_SIZE != 0 {
                    return Err(RequestError::UnalignedLength(len));
                }
                let start = req
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .filter(|s| s.checked_add(len).is_some_and(|end| end <= self.size))
                    .ok_or(RequestError::OutOfRange {
                        sector: req.sector,
                        len,
                    })?;
                let mut offset = start;
                for seg in &req.data {
                    self.transfer(mem, req.kind, *seg, offset, bounce)?;
                    offset += seg.len as u64;
                }
                Ok(if req.kind == VIRTIO_BLK_T_IN {
                    len as u32
                } else {
                    0
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                self.flush().map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0usize;
                for seg in &req.data {
                    if written == ID_BYTES {
                        break;
                    }
                    let n = (seg.len as usize).min(ID_BYTES - written);
                    mem.write_slice(&self.id[written..written + n], seg.addr)
                        .map_err(|_| RequestError::Memory)?;
                    written += n;
                }
                Ok(written as u32)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        kind: u32,
        seg: Segment,
        disk_offset: u64,
        bounce: &mut Vec<u8>,
    ) -> Result<(), RequestError> {
        let mut done = 0u64;
        while done < seg.len as u64 {
            let n = (seg.len as u64 - done).min(IO_CHUNK as u64) as usize;
            bounce.resize(n, 0);
            let gaddr = seg
                .addr
                .0
                .checked_add(done)
                .map(GuestAddress)
                .ok_or(RequestError::Memory)?;
            if kind == VIRTIO_BLK_T_IN {
                self.file
                    .read_exact_at(&mut bounce[..n], disk_offset + done)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                mem.write_slice(&bounce[..n], gaddr)
                    .map_err(|_| RequestError::Memory)?;
            } else {
                mem.read_slice(&mut bounce[..n], gaddr)
                    .map_err(|_| RequestError::Memory)?;
                self.file
                    .write_all_at(&bounce[..n], disk_offset + done)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// The part of `struct virtio_blk_config` (virtio 1.2 section 5.2.4) this
/// device offers: the fields up to `seg_max` (VIRTIO_BLK_F_SEG_MAX). The
/// rest (geometry, blk_size, ...) belongs to features it does not offer
/// and reads as zeroes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: Le64,
    /// Largest segment (VIRTIO_BLK_F_SIZE_MAX, not offered): zero.
    pub size_max: Le32,
    /// Most data segments in one request.
    pub seg_max: Le32,
}

// SAFETY: BlockConfig is repr(C) with only little-endian integer fields,
// 8 + 4 + 4 bytes with no padding (asserted below), so every byte pattern
// is a valid value and it has no references.
unsafe impl ByteValued for BlockConfig {}
const _: () = assert!(std::mem::size_of::<BlockConfig>() == 16);

/// virtio-blk device: config space and queue worker around a [`DiskImage`].
pub struct Block {
    disk: Option<Arc<DiskImage>>,
    config: BlockConfig,
    label: String,
}

impl Block {
    pub fn new(disk: DiskImage) -> Self {
        let config = BlockConfig {
            capacity: disk.sectors().into(),
            size_max: 0.into(),
            // A request's chain is its header, its data and its status.
            seg_max: (QUEUE_SIZE as u32 - 2).into(),
        };
        let label = disk.path().display().to_string();
        Self {
            disk: Some(Arc::new(disk)),
            config,
            label,
        }
    }

    /// The disk, shared with the worker; the VMM flushes it on exit.
    pub fn disk(&self) -> Option<Arc<DiskImage>> {
        self.disk.clone()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = self.disk.as_ref().is_some_and(|d| d.read_only());
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | if ro { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(&self.config, offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<DeviceWorker, ActivateError> {
        let disk = self.disk.clone().ok_or(ActivateError::QueueCount {
            expected: 1,
            got: 0,
        })?;
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let [queue]: [Queue; 1] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    expected: 1,
                    got: q.len(),
                })?;
        let device = format!("virtio-blk ({})", self.label);
        let worker_interrupt = interrupt.clone();
        DeviceWorker::start("virtio-blk", device, queue_events, interrupt, move |_| {
            Ok(BlockWorker {
                disk,
                mem,
                queue,
                interrupt: worker_interrupt,
                bounce: Vec::new(),
            })
        })
    }
}

fn chain_segments(chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Vec<Segment> {
    chain
        .map(|d| Segment {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        })
        .collect()
}

/// Serves every available request; returns whether any was. An error is a
/// ring the driver broke (see [`next_chain`]); a malformed request is not
/// one, it is answered with an error status.
pub fn process_queue(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    bounce: &mut Vec<u8>,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = next_chain(queue, mem)? {
            let head = chain.head_index();
            let segments = chain_segments(chain);
            let (status, len, status_addr) = match parse_request(mem, &segments) {
                Ok(req) => match disk.execute(mem, &req, bounce) {
                    Ok(n) => (VIRTIO_BLK_S_OK, n, Some(req.status)),
                    Err(e) => {
                        tracing::debug!("virtio-blk: request failed: {e}");
                        (e.status(), 0, Some(req.status))
                    }
                },
                Err((e, addr)) => {
                    tracing::debug!("virtio-blk: malformed request: {e}");
                    (e.status(), 0, addr)
                }
            };
            let mut used_len = len;
            if let Some(addr) = status_addr {
                if mem.write_obj(status, addr).is_ok() {
                    used_len += 1;
                }
            }
            queue.add_used(mem, head, used_len)?;
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(used_any)
}

/// The worker's side of the device: its one queue.
struct BlockWorker {
    disk: Arc<DiskImage>,
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    bounce: Vec<u8>,
}

impl DeviceHandler for BlockWorker {
    type Error = BrokenQueue;

    fn queue_event(&mut self, queue: usize) -> Result<(), BrokenQueue> {
        let broken = |error| BrokenQueue { queue, error };
        if process_queue(&self.disk, &self.mem, &mut self.queue, &mut self.bounce)
            .map_err(broken)?
        {
            notify_used(&mut self.queue, &self.mem, &self.interrupt).map_err(broken)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn disk(read_only: bool, sectors: u64) -> (DiskImage, PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "coworkvm-blk-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let data: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .unwrap();
        (DiskImage::from_file(&path, file, read_only).unwrap(), path)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::SeqCst)
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn seg(addr: u64, len: u32, w: bool) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
            write_only: w,
        }
    }

    #[test]
    fn parse_well_formed_read() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 7);
        let segs = [
            seg(0x1000, 16, false),
            seg(0x2000, 1024, true),
            seg(0x3000, 1, true),
        ];
        let r = parse_request(&m, &segs).unwrap();
        assert_eq!(r.kind, VIRTIO_BLK_T_IN);
        assert_eq!(r.sector, 7);
        assert_eq!(r.data.len(), 1);
        assert_eq!(r.status, GuestAddress(0x3000));
    }

    #[test]
    fn hostile_shapes_are_refused() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        // Only one descriptor: no status.
        assert_eq!(
            parse_request(&m, &[seg(0x1000, 16, false)]).unwrap_err().0,
            RequestError::MissingStatus
        );
        // Status not writable.
        assert_eq!(
            parse_request(&m, &[seg(0x1000, 16, false), seg(0x3000, 1, false)])
                .unwrap_err()
                .0,
            RequestError::MissingStatus
        );
        // Short header.
        assert_eq!(
            parse_request(&m, &[seg(0x1000, 8, false), seg(0x3000, 1, true)]).unwrap_err(),
            (RequestError::BadHeader, Some(GuestAddress(0x3000)))
        );
        // Read into a device-readable buffer.
        assert_eq!(
            parse_request(
                &m,
                &[
                    seg(0x1000, 16, false),
                    seg(0x2000, 512, false),
                    seg(0x3000, 1, true)
                ]
            )
            .unwrap_err()
            .0,
            RequestError::WrongDirection
        );
        // Header outside guest memory.
        assert_eq!(
            parse_request(&m, &[seg(0xffff_ff00, 16, false), seg(0x3000, 1, true)])
                .unwrap_err()
                .0,
            RequestError::Memory
        );
    }

    #[test]
    fn read_write_flush_and_id() {
        let m = mem();
        let (d, path) = disk(false, 16);
        let mut bounce = Vec::new();
        let req = |kind, sector, data: Vec<Segment>| Request {
            kind,
            sector,
            data,
            status: GuestAddress(0x9000),
        };
        // Read sector 2.
        let n = d
            .execute(
                &m,
                &req(VIRTIO_BLK_T_IN, 2, vec![seg(0x2000, 512, true)]),
                &mut bounce,
            )
            .unwrap();
        assert_eq!(n, 512);
        let b: u8 = m.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(b, (1024 % 251) as u8);
        // Write sector 3 from guest memory, then read it back from the file.
        m.write_slice(&[0xab; 512], GuestAddress(0x4000)).unwrap();
        d.execute(
            &m,
            &req(VIRTIO_BLK_T_OUT, 3, vec![seg(0x4000, 512, false)]),
            &mut bounce,
        )
        .unwrap();
        d.execute(&m, &req(VIRTIO_BLK_T_FLUSH, 0, vec![]), &mut bounce)
            .unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[3 * 512..4 * 512].iter().all(|&b| b == 0xab));
        // GET_ID is the file name, truncated to 20 bytes.
        let n = d
            .execute(
                &m,
                &req(VIRTIO_BLK_T_GET_ID, 0, vec![seg(0x5000, 64, true)]),
                &mut bounce,
            )
            .unwrap();
        assert_eq!(n as usize, ID_BYTES);
        let mut id = [0u8; ID_BYTES];
        m.read_slice(&mut id, GuestAddress(0x5000)).unwrap();
        assert!(id.starts_with(b"coworkvm-blk-"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn out_of_range_unaligned_readonly_unsupported() {
        let m = mem();
        let (d, path) = disk(true, 4);
        let mut b = Vec::new();
        let req = |kind, sector, len| Request {
            kind,
            sector,
            data: vec![seg(0x2000, len, kind != VIRTIO_BLK_T_OUT)],
            status: GuestAddress(0x9000),
        };
        assert!(matches!(
            d.execute(&m, &req(VIRTIO_BLK_T_IN, 4, 512), &mut b),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.execute(&m, &req(VIRTIO_BLK_T_IN, u64::MAX / 2, 512), &mut b),
            Err(RequestError::OutOfRange { .. })
        ));
        assert_eq!(
            d.execute(&m, &req(VIRTIO_BLK_T_IN, 0, 100), &mut b),
            Err(RequestError::UnalignedLength(100))
        );
        assert_eq!(
            d.execute(&m, &req(VIRTIO_BLK_T_OUT, 0, 512), &mut b),
            Err(RequestError::ReadOnly)
        );
        assert_eq!(
            d.execute(&m, &req(77, 0, 512), &mut b),
            Err(RequestError::Unsupported(77))
        );
        assert_eq!(RequestError::Unsupported(77).status(), VIRTIO_BLK_S_UNSUPP);
        // Data buffer outside guest memory: an error, not a fault.
        let bad = Request {
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            data: vec![seg(0xffff_f000, 512, true)],
            status: GuestAddress(0x9000),
        };
        assert_eq!(d.execute(&m, &bad, &mut b), Err(RequestError::Memory));
        std::fs::remove_file(path).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    #[test]
    fn queue_serves_good_and_bad_chains_without_panicking() {
        let m = mem();
        let (d, path) = disk(false, 8);
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_000, VIRTIO_BLK_T_IN, 1);
        // Chain 0: a good read of sector 1.
        // Chain 1 (head 3): a looping chain (desc 3 -> 4 -> 3).
        // Chain 2 (head 5): next index beyond the queue.
        let descs = [
            desc(0x10_000, 16, F_NEXT, 1),
            desc(0x20_000, 512, F_NEXT | F_WRITE, 2),
            desc(0x30_000, 1, F_WRITE, 0),
            desc(0x10_000, 16, F_NEXT, 4),
            desc(0x20_000, 512, F_NEXT | F_WRITE, 3),
            desc(0x10_000, 16, F_NEXT, 999),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut bounce = Vec::new();
        assert!(process_queue(&d, &m, &mut q, &mut bounce).unwrap());
        let status: u8 = m.read_obj(GuestAddress(0x30_000)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let first: u8 = m.read_obj(GuestAddress(0x20_000)).unwrap();
        assert_eq!(first, (512 % 251) as u8);
        // All three chains were returned to the driver.
        let used_idx: u16 = m.read_obj(vq.used_addr().checked_add(2).unwrap()).unwrap();
        assert!(used_idx >= 1, "the good request completed");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_fields_sit_at_their_spec_offsets() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(BlockConfig, capacity), 0);
        assert_eq!(offset_of!(BlockConfig, size_max), 8);
        assert_eq!(offset_of!(BlockConfig, seg_max), 12);
    }

    #[test]
    fn config_reads_at_every_offset_and_width() {
        let (d, path) = disk(true, 0x1234);
        let dev = Block::new(d);
        // virtio_blk_config as the spec lays it out, then zeroes.
        let mut spec = Vec::new();
        spec.extend_from_slice(&0x1234u64.to_le_bytes());
        spec.extend_from_slice(&0u32.to_le_bytes());
        spec.extend_from_slice(&(QUEUE_SIZE as u32 - 2).to_le_bytes());
        spec.resize(48, 0);
        crate::devices::virtio::assert_config_reads(&dev, &spec);
        let mut wide = [0xa5u8; 32];
        dev.read_config(12, &mut wide);
        assert_eq!(&wide[..4], &spec[12..16]);
        assert!(wide[4..].iter().all(|&b| b == 0));
        std::fs::remove_file(path).unwrap();
    }

    /// How a driver breaks its ring.
    #[derive(Clone, Copy)]
    pub(crate) enum Breakage {
        /// The available index runs more than the queue's size ahead.
        AvailIndexBeyondSize,
        /// The available ring names a head beyond the descriptor table.
        HeadBeyondQueue,
    }

    /// A 16-entry queue broken as `how`, and the memory it lives in.
    pub(crate) fn broken_queue(how: Breakage) -> (GuestMemoryMmap, Queue) {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        match how {
            Breakage::AvailIndexBeyondSize => vq.avail().idx().store(17),
            Breakage::HeadBeyondQueue => {
                vq.avail().ring().ref_at(0).unwrap().store(16);
                vq.avail().idx().store(1);
            }
        }
        let q: Queue = vq.create_queue().unwrap();
        (m.clone(), q)
    }

    /// Activates `dev` on `queue`, kicks it and returns its worker and
    /// interrupt.
    pub(crate) fn activate_and_kick(
        dev: &mut dyn VirtioDevice,
        mem: GuestMemoryMmap,
        queue: Queue,
    ) -> (DeviceWorker, Arc<VirtioInterrupt>) {
        let evt = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let worker = dev
            .activate(ActivateContext {
                mem,
                queues: vec![queue],
                queue_events: vec![evt],
                interrupt: interrupt.clone(),
                acked_features: 0,
            })
            .unwrap();
        kick.write(1).unwrap();
        (worker, interrupt)
    }

    #[test]
    fn a_broken_ring_stops_the_worker_with_needs_reset() {
        use crate::devices::virtio::worker::tests::{assert_ends, assert_reported};
        for how in [Breakage::AvailIndexBeyondSize, Breakage::HeadBeyondQueue] {
            let (d, path) = disk(false, 8);
            let mut dev = Block::new(d);
            let (m, q) = broken_queue(how);
            let (worker, interrupt) = activate_and_kick(&mut dev, m, q);
            assert_ends(worker);
            assert_reported(&interrupt);
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn a_good_ring_keeps_the_worker_serving() {
        use crate::devices::virtio::INT_USED_RING;
        let (d, path) = disk(false, 8);
        let mut dev = Block::new(d);
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_000, VIRTIO_BLK_T_IN, 1);
        vq.build_desc_chain(&[
            desc(0x10_000, 16, F_NEXT, 1),
            desc(0x20_000, 512, F_NEXT | F_WRITE, 2),
            desc(0x30_000, 1, F_WRITE, 0),
        ])
        .unwrap();
        let q: Queue = vq.create_queue().unwrap();
        let (worker, interrupt) = activate_and_kick(&mut dev, m.clone(), q);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while interrupt.status() & INT_USED_RING == 0 {
            assert!(std::time::Instant::now() < deadline, "request served");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!worker.is_finished());
        assert!(!interrupt.needs_reset());
        let status: u8 = m.read_obj(GuestAddress(0x30_000)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK);
        drop(worker);
        std::fs::remove_file(path).unwrap();
    }
}
