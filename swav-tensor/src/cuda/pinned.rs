//! Page-locked host memory for the real device's copies, so that neither direction makes the host wait
//! for the stream:
//!
//! - uploads go through a ring of page-locked staging blocks: the bytes are copied into a free block,
//!   the device copy is queued behind the work already on the stream, and an event marks when the
//!   block may be written again. The host goes on at once (a copy from pageable memory may make the
//!   driver wait for the stream; one from page-locked memory never does);
//! - [`PinnedDownload`] queues a device-to-host copy into a page-locked block and reads it only when
//!   asked, which is how a training step's loss and metrics come back one step late, without stalling
//!   the step after it.
//!
//! `SWAV_CUDA_SYNC_COPIES=1` makes every copy wait for the stream instead (for debugging on a GPU).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result as drv, sys as drv_sys, CudaContext};

use crate::cuda::runtime::DevPtr;
use crate::error::TensorError;
use crate::Result;

fn err(what: impl std::fmt::Display) -> TensorError {
    TensorError::Device(format!("cuda: {what}"))
}

/// Whether copies wait for the stream (`SWAV_CUDA_SYNC_COPIES=1`).
pub(crate) fn synchronous_copies() -> bool {
    std::env::var("SWAV_CUDA_SYNC_COPIES").is_ok_and(|v| v == "1")
}

/// A CUDA event of the current context, destroyed when dropped (the driver keeps it alive until the
/// work it marks is done).
pub(crate) struct Event(drv_sys::CUevent);

// SAFETY: an event handle may be used from any thread with its context current, which every user
// binds first.
unsafe impl Send for Event {}

impl Event {
    fn new() -> Result<Event> {
        drv::event::create(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(|e| err(format!("cuEventCreate: {e}")))
    }

    /// A new event after the work queued so far on `stream`.
    pub(crate) fn after(stream: drv_sys::CUstream) -> Result<Event> {
        let event = Event::new()?;
        event.record(stream)?;
        Ok(event)
    }

    /// Marks the point after the work queued so far on `stream`.
    fn record(&self, stream: drv_sys::CUstream) -> Result<()> {
        // SAFETY: our own live event and a live stream of the current context.
        unsafe { drv::event::record(self.0, stream) }.map_err(|e| err(format!("cuEventRecord: {e}")))
    }

    /// Makes the work queued on `stream` from now on wait for this event.
    pub(crate) fn wait_on(&self, stream: drv_sys::CUstream) -> Result<()> {
        // SAFETY: our own live event and a live stream of the current context.
        unsafe { drv::stream::wait_event(stream, self.0, drv_sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(|e| err(format!("cuStreamWaitEvent: {e}")))
    }

    /// Whether the marked work is done (without waiting).
    fn done(&self) -> bool {
        // SAFETY: our own live event.
        unsafe { drv::event::query(self.0) }.is_ok()
    }

    /// Waits on the host for the marked work.
    fn synchronize(&self) -> Result<()> {
        // SAFETY: our own live event.
        unsafe { drv::event::synchronize(self.0) }.map_err(|e| err(format!("cuEventSynchronize: {e}")))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { drv::event::destroy(self.0) };
    }
}

/// A page-locked host block with the event of the last copy that reads or writes it.
struct Block {
    host: *mut c_void,
    capacity: usize,
    event: Event,
    /// A copy was queued since the event was last seen complete.
    busy: bool,
}

impl Block {
    fn new(capacity: usize) -> Result<Block> {
        // SAFETY: plain allocations; freed in `Drop`.
        let host = unsafe { drv::malloc_host(capacity.max(1), 0) }.map_err(|e| err(format!("cuMemHostAlloc: {e}")))?;
        let event = match Event::new() {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: allocated just above, freed once.
                let _ = unsafe { drv::free_host(host) };
                return Err(e);
            }
        };
        Ok(Block { host, capacity: capacity.max(1), event, busy: false })
    }

    /// Whether the last copy of this block has finished (without waiting).
    fn idle(&mut self) -> bool {
        if self.busy && self.event.done() {
            self.busy = false;
        }
        !self.busy
    }

    fn wait(&mut self) -> Result<()> {
        if self.busy {
            self.event.synchronize()?;
            self.busy = false;
        }
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // A block is freed only once the copy that uses it is done (its event goes after it).
        let _ = self.wait();
        // SAFETY: allocated in `new`, freed once.
        let _ = unsafe { drv::free_host(self.host) };
    }
}

/// The most staging blocks kept; beyond that an upload waits for the oldest copy.
const MAX_BLOCKS: usize = 8;

/// The upload staging ring of one device (used with the backend's handles mutex held).
#[derive(Default)]
pub(crate) struct Staging {
    blocks: Vec<Block>,
    next: usize,
}

// SAFETY: the raw pointers are page-locked host memory and an event of the backend's context, used
// only under the backend's mutex.
unsafe impl Send for Staging {}

impl Staging {
    /// Queues the copy of `src` to `dst` on `stream` and returns without waiting for it.
    pub(crate) fn upload(&mut self, stream: drv_sys::CUstream, dst: DevPtr, src: &[u8]) -> Result<()> {
        let i = self.block_for(src.len())?;
        let b = &mut self.blocks[i];
        // SAFETY: the block holds at least `src.len()` bytes and no copy uses it (`block_for` waited);
        // `dst` holds at least as many (the caller's contract); the event is recorded after the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), b.host as *mut u8, src.len());
            drv_sys::cuMemcpyHtoDAsync_v2(dst, b.host, src.len(), stream)
                .result()
                .map_err(|e| err(format!("cuMemcpyHtoDAsync of {} bytes: {e}", src.len())))?;
        }
        b.event.record(stream)?;
        b.busy = true;
        Ok(())
    }

    /// An idle block of at least `bytes`: a free one, a new one while there are fewer than
    /// [`MAX_BLOCKS`], else the next in turn once its copy is done (grown if too small).
    fn block_for(&mut self, bytes: usize) -> Result<usize> {
        if let Some(i) = self.blocks.iter_mut().position(|b| b.capacity >= bytes && b.idle()) {
            return Ok(i);
        }
        if self.blocks.len() < MAX_BLOCKS {
            self.blocks.push(Block::new(bytes.next_power_of_two())?);
            return Ok(self.blocks.len() - 1);
        }
        let i = self.next % MAX_BLOCKS;
        self.next += 1;
        self.blocks[i].wait()?;
        if self.blocks[i].capacity < bytes {
            self.blocks[i] = Block::new(bytes.next_power_of_two())?;
        }
        Ok(i)
    }
}

/// A device-to-host copy in flight into page-locked memory; [`PinnedDownload::take`] waits for it.
pub(crate) struct PinnedDownload {
    ctx: Arc<CudaContext>,
    block: Block,
    bytes: usize,
}

// SAFETY: the block is owned by this value alone; its event and memory belong to `ctx`, which is
// bound to the calling thread before they are used.
unsafe impl Send for PinnedDownload {}

impl PinnedDownload {
    /// Queues the copy of `bytes` bytes at `src` on `stream`, behind the work already queued.
    pub(crate) fn start(ctx: Arc<CudaContext>, stream: drv_sys::CUstream, src: DevPtr, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(err)?;
        let mut block = Block::new(bytes)?;
        // SAFETY: the block holds `bytes` bytes, `src` as many (the caller's contract); the event is
        // recorded after the copy.
        unsafe {
            drv_sys::cuMemcpyDtoHAsync_v2(block.host, src, bytes, stream)
                .result()
                .map_err(|e| err(format!("cuMemcpyDtoHAsync of {bytes} bytes: {e}")))?;
        }
        block.event.record(stream)?;
        block.busy = true;
        Ok(PinnedDownload { ctx, block, bytes })
    }

    /// Waits for the copy and returns the bytes.
    pub(crate) fn take(mut self) -> Result<Vec<u8>> {
        self.ctx.bind_to_thread().map_err(err)?;
        self.block.wait()?;
        let mut out = vec![0u8; self.bytes];
        // SAFETY: the copy into the block is complete and the block holds `bytes` bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.block.host as *const u8, out.as_mut_ptr(), self.bytes) };
        Ok(out)
    }
}

impl Drop for PinnedDownload {
    fn drop(&mut self) {
        // The block's event and memory are freed next, with the context current on this thread.
        let _ = self.ctx.bind_to_thread();
    }
}
