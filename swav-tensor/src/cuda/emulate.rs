//! Runs [`Plan`]s on the kernel emulator (`swav-cuda-emu`): the CPU stand-in for the CUDA runtime in
//! tests. Enabled by the `emulate` feature (tests only).

use std::collections::HashMap;

pub use swav_cuda_emu::{round_bf16, Buffer, EmuError, Emulator, Schedule};
use swav_cuda_emu::{Arg as EmuArg, Elem, Launch as EmuLaunch};

use super::plan::{Arg, BufId, ConstData, DType, Plan, Role};
use super::Source;

/// The emulator of `sources` (compiled once and cached), or None where there is no C++ compiler (the
/// test prints why and passes; `SWAV_REQUIRE_EMULATOR=1` makes that a failure).
pub fn emulator(sources: &[Source]) -> Option<Emulator> {
    let texts: Vec<String> = sources.iter().map(Source::text).collect();
    let emu_sources: Vec<swav_cuda_emu::Source<'_>> =
        sources.iter().zip(&texts).map(|(s, t)| swav_cuda_emu::Source { name: s.name, code: t }).collect();
    Emulator::new_or_skip(&emu_sources)
}

fn elem(d: DType) -> Elem {
    match d {
        DType::F32 => Elem::F32,
        DType::Bf16 => Elem::Bf16,
        DType::I32 => Elem::I32,
        DType::U32 => Elem::U32,
        DType::U8 => Elem::U8,
        DType::U64 => Elem::U64,
    }
}

/// The buffers of one plan, by name.
#[derive(Debug)]
pub struct Memory {
    index: HashMap<BufId, usize>,
    buffers: Vec<Buffer>,
}

impl Memory {
    /// Allocates every buffer of `plan`: inputs (`In`, `InOut`) from `inputs`, constants from the plan,
    /// outputs and scratch poisoned (NaN), so that a value a kernel forgets to write shows up.
    pub fn new(plan: &Plan, inputs: Vec<(BufId, Buffer)>) -> Result<Memory, String> {
        let mut given: HashMap<BufId, Buffer> = HashMap::new();
        for (id, b) in inputs {
            let decl = plan.get(id).ok_or_else(|| format!("input {id:?} is not a buffer of the plan"))?;
            if b.elem() != elem(decl.dtype) || b.len() != decl.len {
                return Err(format!("input {id:?}: {:?} x {} for {:?} x {}", b.elem(), b.len(), decl.dtype, decl.len));
            }
            given.insert(id, b);
        }
        let mut index = HashMap::new();
        let mut buffers = Vec::new();
        for decl in &plan.buffers {
            let b = match (&decl.role, given.remove(&decl.id)) {
                (Role::Const(_), Some(_)) => return Err(format!("{:?} is a constant of the plan", decl.id)),
                (Role::Const(ConstData::I32(v)), None) => Buffer::from_i32(v),
                (Role::Const(ConstData::U32(v)), None) => Buffer::from_u32(v),
                (_, Some(b)) => b,
                (Role::In | Role::InOut, None) => return Err(format!("input {:?} missing", decl.id)),
                (Role::Out | Role::Scratch, None) => Buffer::poisoned(elem(decl.dtype), decl.len),
            };
            index.insert(decl.id, buffers.len());
            buffers.push(b);
        }
        Ok(Memory { index, buffers })
    }

    /// The buffer `id` (panics if the plan has none).
    pub fn get(&self, id: BufId) -> &Buffer {
        &self.buffers[self.index[&id]]
    }

    /// The buffer `id`, writable.
    pub fn get_mut(&mut self, id: BufId) -> &mut Buffer {
        let i = self.index[&id];
        &mut self.buffers[i]
    }

    /// The values of an F32 or Bf16 buffer, as f32.
    pub fn f32(&self, id: BufId) -> Vec<f32> {
        self.get(id).to_f32_vec()
    }
}

/// Runs every launch of `plan` on `memory`, in order.
pub fn run(emu: &Emulator, plan: &Plan, memory: &mut Memory, schedule: Schedule) -> Result<(), EmuError> {
    plan.validate().map_err(EmuError::Arguments)?;
    for l in &plan.launches {
        let args = l
            .args
            .iter()
            .map(|a| match *a {
                Arg::Buf(id) => EmuArg::Buf(memory.index[&id]),
                Arg::Null => EmuArg::Null,
                Arg::I32(v) => EmuArg::I32(v),
                Arg::U32(v) => EmuArg::U32(v),
                Arg::F32(v) => EmuArg::F32(v),
                Arg::I64(v) => EmuArg::I64(v),
                Arg::U64(v) => EmuArg::U64(v),
            })
            .collect();
        let launch = EmuLaunch {
            kernel: l.kernel.to_string(),
            grid: l.grid,
            block: l.block,
            shared_bytes: l.shared_bytes,
            args,
        };
        emu.launch(&launch, &mut memory.buffers, schedule)?;
    }
    Ok(())
}

/// Checks every launch of `plan` against the `extern "C"` signatures in `sources` (no compiler needed):
/// the kernel exists, the argument count matches, each buffer's type is the pointer's element type and
/// each scalar its parameter's type. Returns the kernels the plan launches.
pub fn check_signatures(plan: &Plan, sources: &[Source]) -> Result<Vec<&'static str>, String> {
    use swav_cuda_emu::{ParamKind, Scalar};
    plan.validate()?;
    let mut sigs = Vec::new();
    for s in sources {
        sigs.extend(swav_cuda_emu::parse_kernels(&s.text()).map_err(|e| format!("{}: {e}", s.name))?);
    }
    let mut used = Vec::new();
    for l in &plan.launches {
        let sig = sigs.iter().find(|s| s.name == l.kernel).ok_or_else(|| format!("no kernel named {}", l.kernel))?;
        if l.args.len() != sig.params.len() {
            return Err(format!("{}: {} arguments for {} parameters", l.kernel, l.args.len(), sig.params.len()));
        }
        for (a, p) in l.args.iter().zip(&sig.params) {
            let ok = match (a, p.kind) {
                (Arg::Buf(id), ParamKind::Ptr { elem: e, .. }) => plan.get(*id).is_some_and(|b| elem(b.dtype) == e),
                (Arg::Null, ParamKind::Ptr { .. }) => true,
                (Arg::I32(_), ParamKind::Scalar(Scalar::I32))
                | (Arg::U32(_), ParamKind::Scalar(Scalar::U32))
                | (Arg::F32(_), ParamKind::Scalar(Scalar::F32))
                | (Arg::I64(_), ParamKind::Scalar(Scalar::I64))
                | (Arg::U64(_), ParamKind::Scalar(Scalar::U64)) => true,
                _ => false,
            };
            if !ok {
                return Err(format!("{}: `{}` is {:?}, the plan gives {a:?}", l.kernel, p.name, p.kind));
            }
        }
        used.push(l.kernel);
    }
    Ok(used)
}

/// The names of every `extern "C"` kernel in `sources`.
pub fn kernel_names(sources: &[Source]) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for s in sources {
        names.extend(
            swav_cuda_emu::parse_kernels(&s.text())
                .map_err(|e| format!("{}: {e}", s.name))?
                .into_iter()
                .map(|k| k.name),
        );
    }
    Ok(names)
}

/// Runs `plan` twice from the same `inputs`, blocks and threads in ascending then in descending order,
/// and checks that every buffer the caller gets back (`Out`, `InOut`) has the same bits in both runs:
/// the kernels are deterministic and free of races between threads. Returns the first run's memory.
pub fn run_both_schedules(emu: &Emulator, plan: &Plan, inputs: &[(BufId, Buffer)]) -> Result<Memory, String> {
    let mut runs = Vec::new();
    for schedule in [Schedule::Forward, Schedule::Reverse] {
        let mut mem = Memory::new(plan, inputs.to_vec())?;
        run(emu, plan, &mut mem, schedule).map_err(|e| e.to_string())?;
        runs.push(mem);
    }
    for b in &plan.buffers {
        if matches!(b.role, Role::Out | Role::InOut) && runs[0].get(b.id).bytes() != runs[1].get(b.id).bytes() {
            return Err(format!("{:?} differs between the forward and the reverse schedule", b.id));
        }
    }
    Ok(runs.swap_remove(0))
}
