//! Kernel launches as plain data: what a CUDA runtime executes on a stream, what the emulator runs in
//! tests, and what a reader checks. A [`Plan`] names the buffers it touches (with type, length and role)
//! and lists its launches in stream order; no device handle or address appears in it, so plans are
//! built, compared and tested without a GPU.

/// The name of a buffer within a plan (`"x"`, `"partials"`, ...): the runtime binds each name to a
/// device allocation. Each op module lists the names of its plans as constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufId(pub &'static str);

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// `float`.
    F32,
    /// `__nv_bfloat16`.
    Bf16,
    /// `int`.
    I32,
    /// `unsigned int`.
    U32,
    /// `unsigned char`.
    U8,
    /// `unsigned long long` (device addresses in pointer tables).
    U64,
}

/// How activations are stored on the device. Statistics, parameters and accumulations are always fp32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// fp32 activations.
    F32,
    /// bf16 activations (mixed precision).
    Bf16,
}

impl Storage {
    /// The buffer type of an activation.
    pub fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::Bf16 => DType::Bf16,
        }
    }

    /// Picks the kernel of this storage type among its two variants.
    pub fn pick(self, f32_kernel: &'static str, bf16_kernel: &'static str) -> &'static str {
        match self {
            Storage::F32 => f32_kernel,
            Storage::Bf16 => bf16_kernel,
        }
    }
}

/// Contents a plan supplies itself (index tables computed from the shapes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConstData {
    /// For `I32` buffers.
    I32(Vec<i32>),
    /// For `U32` buffers.
    U32(Vec<u32>),
}

/// What a plan does with a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Read only; the caller's data.
    In,
    /// Written before it is read; the caller gets it back.
    Out,
    /// Read and updated in place (running statistics, accumulated gradients).
    InOut,
    /// The plan's own working memory: undefined on entry, meaningless on exit (the runtime may reuse it
    /// between plans).
    Scratch,
    /// Read only, with contents given by the plan (upload once, keep with the plan).
    Const(ConstData),
}

/// One buffer of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// Its name.
    pub id: BufId,
    /// Element type.
    pub dtype: DType,
    /// Length in elements (the kernels touch at most this many).
    pub len: usize,
    /// Role.
    pub role: Role,
}

/// A kernel argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// The device address of a buffer of the plan.
    Buf(BufId),
    /// A null pointer (an optional input or output that is absent).
    Null,
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `float`.
    F32(f32),
    /// `long long`.
    I64(i64),
    /// `unsigned long long`.
    U64(u64),
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The kernel's `extern "C"` name.
    pub kernel: &'static str,
    /// Blocks per dimension.
    pub grid: [u32; 3],
    /// Threads per block per dimension.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Arguments in the kernel's parameter order.
    pub args: Vec<Arg>,
}

/// The buffers and the launches (in stream order) of one op call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Every buffer the launches use.
    pub buffers: Vec<Buffer>,
    /// The launches, in order.
    pub launches: Vec<Launch>,
}

/// Threads per block of the elementwise (grid-stride) kernels.
pub const ELEMENTWISE_BLOCK: u32 = 256;
/// Most blocks an elementwise launch uses; each thread then loops (grid-stride).
pub const ELEMENTWISE_MAX_GRID: usize = 1 << 16;

/// Grid of a grid-stride launch over `n` elements.
pub fn elementwise_grid(n: usize) -> [u32; 3] {
    [n.div_ceil(ELEMENTWISE_BLOCK as usize).clamp(1, ELEMENTWISE_MAX_GRID) as u32, 1, 1]
}

impl Plan {
    /// Declares a buffer.
    pub fn buffer(&mut self, id: BufId, dtype: DType, len: usize, role: Role) -> &mut Plan {
        self.buffers.push(Buffer { id, dtype, len, role });
        self
    }

    /// Appends a launch without dynamic shared memory.
    pub fn launch(&mut self, kernel: &'static str, grid: [u32; 3], block: [u32; 3], args: Vec<Arg>) -> &mut Plan {
        self.launches.push(Launch { kernel, grid, block, shared_bytes: 0, args });
        self
    }

    /// The declaration of `id`.
    pub fn get(&self, id: BufId) -> Option<&Buffer> {
        self.buffers.iter().find(|b| b.id == id)
    }

    /// Checks what a plan must satisfy whatever the kernels: unique buffer names, every buffer argument
    /// declared, constant contents of the declared type and length, launch shapes within CUDA's limits.
    pub fn validate(&self) -> Result<(), String> {
        for (i, b) in self.buffers.iter().enumerate() {
            if self.buffers[..i].iter().any(|o| o.id == b.id) {
                return Err(format!("buffer {:?} declared twice", b.id));
            }
            if let Role::Const(data) = &b.role {
                let (dtype, len) = match data {
                    ConstData::I32(v) => (DType::I32, v.len()),
                    ConstData::U32(v) => (DType::U32, v.len()),
                };
                if dtype != b.dtype || len != b.len {
                    return Err(format!(
                        "constant buffer {:?}: {len} values of {dtype:?} for {:?} x {}",
                        b.id, b.dtype, b.len
                    ));
                }
            }
        }
        for l in &self.launches {
            let threads: u64 = l.block.iter().map(|&d| d as u64).product();
            if threads == 0 || threads > 1024 || l.block[2] > 64 {
                return Err(format!("{}: block {:?}", l.kernel, l.block));
            }
            if l.grid.contains(&0) || l.grid[0] > i32::MAX as u32 || l.grid[1] > 65535 || l.grid[2] > 65535 {
                return Err(format!("{}: grid {:?}", l.kernel, l.grid));
            }
            if l.shared_bytes > 48 * 1024 {
                return Err(format!("{}: {} bytes of dynamic shared memory", l.kernel, l.shared_bytes));
            }
            for a in &l.args {
                if let Arg::Buf(id) = a {
                    if self.get(*id).is_none() {
                        return Err(format!("{}: buffer {id:?} is not declared", l.kernel));
                    }
                }
            }
        }
        Ok(())
    }
}
