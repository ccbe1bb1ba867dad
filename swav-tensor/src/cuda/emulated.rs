//! An emulated CUDA device: device memory is host memory, kernels run on the CPU emulator
//! (swav-cuda-emu, the same `.cu` text NVRTC compiles), and cuDNN / cuBLAS calls are executed by the
//! CPU engine through their descriptors ([`ConvCall::execute_cpu`], [`GemmCall::execute_cpu`]). With it,
//! every device code path above the [`Backend`] trait runs in the tests of a machine without a GPU.
//!
//! Addresses are real host addresses of 16-byte aligned blocks, so tables of device pointers built on
//! the host (the multi-tensor optimizer's) work as on a GPU. Each launch copies the blocks it is given
//! into typed emulator buffers (with guard zones, so an overrun is reported) and back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use swav_cuda_emu::{Arg as EmuArg, Buffer, Elem, Emulator, Launch as EmuLaunch, ParamKind, Schedule};

use crate::cuda::calls::{swav_round_bf16, ConvCall, ConvPass, GemmCall};
use crate::cuda::plan::{Launch, Storage};
use crate::cuda::runtime::{Backend, ConvPtrs, DevPtr, LaunchArg};
use crate::cuda::Source;
use crate::error::TensorError;
use crate::Result;

struct Block {
    words: Vec<u128>,
    bytes: usize,
}

impl Block {
    fn data(&self) -> &[u8] {
        // SAFETY: the words hold at least `bytes` bytes; u8 has no alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.bytes) }
    }

    fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.bytes) }
    }
}

/// The emulated device.
#[derive(Default)]
pub struct EmulatedBackend {
    memory: Mutex<BTreeMap<DevPtr, Block>>,
    emulators: Mutex<HashMap<&'static str, Emulator>>,
}

fn err(what: impl std::fmt::Display) -> TensorError {
    TensorError::Device(format!("emulated cuda: {what}"))
}

fn elem_of(kind: &ParamKind) -> Option<Elem> {
    match kind {
        ParamKind::Ptr { elem, .. } => Some(*elem),
        _ => None,
    }
}

fn to_f32(bytes: &[u8], storage: Storage) -> Vec<f32> {
    match storage {
        Storage::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Storage::Bf16 => {
            bytes.chunks_exact(2).map(|c| swav_cuda_emu::bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
    }
}

fn from_f32(values: &[f32], storage: Storage, out: &mut [u8]) {
    match storage {
        Storage::F32 => out.iter_mut().zip(values.iter().flat_map(|v| v.to_le_bytes())).for_each(|(o, b)| *o = b),
        Storage::Bf16 => out
            .iter_mut()
            .zip(values.iter().flat_map(|&v| swav_cuda_emu::bf16_from_f32(swav_round_bf16(v)).to_le_bytes()))
            .for_each(|(o, b)| *o = b),
    }
}

fn storage_size(s: Storage) -> usize {
    match s {
        Storage::F32 => 4,
        Storage::Bf16 => 2,
    }
}

impl EmulatedBackend {
    /// A fresh device with no memory in use.
    pub fn new() -> EmulatedBackend {
        EmulatedBackend::default()
    }

    /// The block holding `ptr` and the offset of `ptr` in it.
    fn locate(memory: &BTreeMap<DevPtr, Block>, ptr: DevPtr) -> Result<(DevPtr, usize)> {
        let (&base, block) =
            memory.range(..=ptr).next_back().ok_or_else(|| err(format!("{ptr:#x} is not device memory")))?;
        let offset = (ptr - base) as usize;
        if offset >= block.bytes.max(1) {
            return Err(err(format!("{ptr:#x} is past the end of its block")));
        }
        Ok((base, offset))
    }

    /// Bytes `[ptr, ptr + len)` of device memory, copied.
    fn read(&self, ptr: DevPtr, len: usize) -> Result<Vec<u8>> {
        let mem = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let (base, off) = Self::locate(&mem, ptr)?;
        let data = mem[&base].data();
        data.get(off..off + len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| err(format!("read of {len} bytes at {ptr:#x} overruns its block")))
    }

    fn write(&self, ptr: DevPtr, bytes: &[u8]) -> Result<()> {
        let mut mem = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let (base, off) = Self::locate(&mem, ptr)?;
        let data = mem.get_mut(&base).expect("located").data_mut();
        let dst = data
            .get_mut(off..off + bytes.len())
            .ok_or_else(|| err(format!("write of {} bytes at {ptr:#x} overruns its block", bytes.len())))?;
        dst.copy_from_slice(bytes);
        Ok(())
    }

    fn block_len(&self, ptr: DevPtr) -> Result<usize> {
        let mem = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let (base, off) = Self::locate(&mem, ptr)?;
        Ok(mem[&base].bytes - off)
    }
}

impl Backend for EmulatedBackend {
    fn describe(&self) -> String {
        "emulated CUDA device (host memory, CPU kernel emulator, CPU cuDNN/cuBLAS)".into()
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let words = vec![0u128; bytes.div_ceil(16).max(1)];
        let ptr = words.as_ptr() as DevPtr;
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(ptr, Block { words, bytes });
        Ok(ptr)
    }

    fn free(&self, ptr: DevPtr, _bytes: usize) {
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).remove(&ptr);
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.write(dst, src)
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(&self.read(src, dst.len())?);
        Ok(())
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        let data = self.read(src, bytes)?;
        self.write(dst, &data)
    }

    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.write(dst, &vec![0u8; bytes])
    }

    fn launch(&self, source: &Source, launch: &Launch, args: &[LaunchArg]) -> Result<()> {
        let mut emulators = self.emulators.lock().unwrap_or_else(|e| e.into_inner());
        if !emulators.contains_key(source.name) {
            let text = source.text();
            let emu = Emulator::new(&[swav_cuda_emu::Source { name: source.name, code: &text }])
                .map_err(|e| err(format!("{}: {e}", source.name)))?;
            emulators.insert(source.name, emu);
        }
        let emu = &emulators[source.name];
        let sig = emu
            .signature(launch.kernel)
            .ok_or_else(|| err(format!("no kernel {} in {}", launch.kernel, source.name)))?;
        let mut buffers = Vec::new();
        let mut bound: Vec<DevPtr> = Vec::new();
        let mut emu_args = Vec::with_capacity(args.len());
        for (a, p) in args.iter().zip(&sig.params) {
            emu_args.push(match *a {
                LaunchArg::Ptr(0) => EmuArg::Null,
                // The same block passed twice (an in-place op) is one buffer, as on a device.
                LaunchArg::Ptr(ptr) if bound.contains(&ptr) => {
                    EmuArg::Buf(bound.iter().position(|&b| b == ptr).expect("contained"))
                }
                LaunchArg::Ptr(ptr) => {
                    let elem = elem_of(&p.kind)
                        .ok_or_else(|| err(format!("{}: `{}` is not a pointer", launch.kernel, p.name)))?;
                    let len = self.block_len(ptr)? / elem.size() * elem.size();
                    buffers.push(Buffer::from_bytes(elem, &self.read(ptr, len)?));
                    bound.push(ptr);
                    EmuArg::Buf(buffers.len() - 1)
                }
                LaunchArg::I32(v) => EmuArg::I32(v),
                LaunchArg::U32(v) => EmuArg::U32(v),
                LaunchArg::F32(v) => EmuArg::F32(v),
                LaunchArg::I64(v) => EmuArg::I64(v),
                LaunchArg::U64(v) => EmuArg::U64(v),
            });
        }
        let l = EmuLaunch {
            kernel: launch.kernel.to_string(),
            grid: launch.grid,
            block: launch.block,
            shared_bytes: launch.shared_bytes,
            args: emu_args,
        };
        emu.launch(&l, &mut buffers, Schedule::Forward).map_err(err)?;
        for (ptr, buf) in bound.iter().zip(&buffers) {
            self.write(*ptr, buf.bytes())?;
        }
        Ok(())
    }

    fn conv(&self, call: &ConvCall, ptrs: ConvPtrs) -> Result<()> {
        let s = call.x.storage;
        let size = storage_size(s);
        let (xl, wl, yl) = (call.x.span(), call.w.len(), call.y.span());
        let mut x = to_f32(&self.read(ptrs.x, xl * size)?, s);
        let mut w = to_f32(&self.read(ptrs.w, wl * size)?, s);
        let mut y = to_f32(&self.read(ptrs.y, yl * size)?, s);
        call.execute_cpu(&mut x, &mut w, &mut y)?;
        let (ptr, vals) = match call.pass {
            ConvPass::Forward => (ptrs.y, &y),
            ConvPass::BackwardData => (ptrs.x, &x),
            ConvPass::BackwardFilter => (ptrs.w, &w),
        };
        let mut out = vec![0u8; vals.len() * size];
        from_f32(vals, s, &mut out);
        self.write(ptr, &out)
    }

    fn gemm(&self, call: &GemmCall, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()> {
        let (sa, sb, sc) = call.spans();
        let ab = storage_size(call.ab);
        let av = to_f32(&self.read(a, sa * ab)?, call.ab);
        let bv = to_f32(&self.read(b, sb * ab)?, call.ab);
        let cs = storage_size(call.c);
        let mut cv = to_f32(&self.read(c, sc * cs)?, call.c);
        call.execute_cpu(&av, &bv, &mut cv)?;
        let mut out = vec![0u8; cv.len() * cs];
        from_f32(&cv, call.c, &mut out);
        self.write(c, &out)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
