//! The launch plan of one CUDA Sinkhorn call, as data: kernels with their grid, block and arguments, and
//! the all-reduces between them. The same plan drives the GPU ([`super::CudaSinkhorn`]) and, in the tests,
//! a host emulation of `kernels.cu` (`emulate.rs`), so the order of launches and of arguments is checked
//! without a GPU.

use crate::{Problem, SinkhornError};

/// Device buffers of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Buf {
    /// The caller's scores, rows x K.
    Scores,
    /// The caller's output, rows x K.
    Q,
    /// Per-tile column maxima (pass 0), tiles x K.
    PartMax,
    /// Per-tile column sums, tiles x K.
    PartSum,
    /// Per-tile "non-finite score seen" flags, tiles.
    PartFlag,
    /// Per-prototype maxima, K, then the non-finite flag: K + 1. All-reduced (max).
    ColMax,
    /// This rank's own maxima (before the all-reduce), K.
    LocalMax,
    /// Per-prototype sums r_k, K. All-reduced (sum).
    ColSum,
    /// Per-row maxima A_b, rows.
    RowMax,
    /// Per-row sums (naive baseline only), rows.
    RowSum,
    /// Total sum (naive baseline only), 1.
    Total,
}

impl Buf {
    pub(crate) const SCRATCH: [Buf; 9] = [
        Buf::PartMax,
        Buf::PartSum,
        Buf::PartFlag,
        Buf::ColMax,
        Buf::LocalMax,
        Buf::ColSum,
        Buf::RowMax,
        Buf::RowSum,
        Buf::Total,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    Buf(Buf),
    I32(i32),
    F32(f32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Colstats,
    ColstatsCombine,
    Rescale,
    SumTiles,
    RowsC8,
    RowsC32,
    NaiveExp,
    NaiveColsumTiles,
    NaiveRowsum,
    NaiveTotal,
    NaiveDivTotal,
    NaiveDivCols,
    NaiveDivRows,
}

impl Kernel {
    pub(crate) const ALL: [Kernel; 13] = [
        Kernel::Colstats,
        Kernel::ColstatsCombine,
        Kernel::Rescale,
        Kernel::SumTiles,
        Kernel::RowsC8,
        Kernel::RowsC32,
        Kernel::NaiveExp,
        Kernel::NaiveColsumTiles,
        Kernel::NaiveRowsum,
        Kernel::NaiveTotal,
        Kernel::NaiveDivTotal,
        Kernel::NaiveDivCols,
        Kernel::NaiveDivRows,
    ];

    /// The `extern "C"` name in `kernels.cu`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Colstats => "sk_colstats",
            Kernel::ColstatsCombine => "sk_colstats_combine",
            Kernel::Rescale => "sk_rescale",
            Kernel::SumTiles => "sk_sum_tiles",
            Kernel::RowsC8 => "sk_rows_c8",
            Kernel::RowsC32 => "sk_rows_c32",
            Kernel::NaiveExp => "sk_naive_exp",
            Kernel::NaiveColsumTiles => "sk_naive_colsum_tiles",
            Kernel::NaiveRowsum => "sk_naive_rowsum",
            Kernel::NaiveTotal => "sk_naive_total",
            Kernel::NaiveDivTotal => "sk_naive_div_total",
            Kernel::NaiveDivCols => "sk_naive_div_cols",
            Kernel::NaiveDivRows => "sk_naive_div_rows",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    Launch { kernel: Kernel, grid: u32, block: u32, args: Vec<Arg> },
    AllReduceMax(Buf),
    AllReduceSum(Buf),
}

#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) steps: Vec<Step>,
    pub(crate) rows: usize,
    pub(crate) prototypes: usize,
    pub(crate) tiles: usize,
}

impl Plan {
    /// Length in floats of each buffer.
    pub(crate) fn len(&self, buf: Buf) -> usize {
        let (rows, k, tiles) = (self.rows, self.prototypes, self.tiles);
        match buf {
            Buf::Scores | Buf::Q => rows * k,
            Buf::PartMax | Buf::PartSum => tiles * k,
            Buf::PartFlag => tiles,
            Buf::ColMax => k + 1,
            Buf::LocalMax | Buf::ColSum => k,
            Buf::RowMax | Buf::RowSum => rows,
            Buf::Total => 1,
        }
    }
}

/// Largest K the row kernels handle (32 columns per thread x 1024 threads).
pub(crate) const MAX_PROTOTYPES: usize = 32 * 1024;
const SMALL_BLOCK: u32 = 256;

fn check_limits(p: &Problem) -> Result<(), SinkhornError> {
    if p.prototypes > MAX_PROTOTYPES {
        return Err(SinkhornError::Unsupported(format!(
            "{} prototypes: the CUDA kernels handle at most {MAX_PROTOTYPES} (use the CPU implementation)",
            p.prototypes
        )));
    }
    if p.rows > 1 << 30 {
        return Err(SinkhornError::Unsupported(format!("{} rows: the CUDA kernels handle at most 2^30", p.rows)));
    }
    Ok(())
}

/// Rows per tile and number of tiles: two tiles per multiprocessor, enough blocks to fill the GPU and
/// few partial sums to combine.
fn tiling(rows: usize, sm_count: usize) -> (usize, usize) {
    let tile_rows = rows.div_ceil(2 * sm_count.max(1)).max(2);
    (tile_rows, rows.div_ceil(tile_rows))
}

/// The plan for `p` on a device with `sm_count` multiprocessors.
pub(crate) fn plan(p: &Problem, sm_count: usize) -> Result<Plan, SinkhornError> {
    check_limits(p)?;
    let (rows, k) = (p.rows, p.prototypes);
    let (tile_rows, tiles) = tiling(rows, sm_count);
    let (row_kernel, cpt) = if k <= 8 * 512 { (Kernel::RowsC8, 8) } else { (Kernel::RowsC32, 32) };
    let row_block = (k.div_ceil(cpt).div_ceil(32) * 32) as u32;
    let col_grid = |n: usize| n.div_ceil(SMALL_BLOCK as usize) as u32;

    let (rows_i, k_i, tiles_i, tile_rows_i) = (rows as i32, k as i32, tiles as i32, tile_rows as i32);
    let mut steps = vec![
        Step::Launch {
            kernel: Kernel::Colstats,
            grid: tiles as u32,
            block: SMALL_BLOCK,
            args: vec![
                Arg::Buf(Buf::Scores),
                Arg::I32(rows_i),
                Arg::I32(k_i),
                Arg::I32(tile_rows_i),
                Arg::F32(p.inv_eps),
                Arg::Buf(Buf::PartMax),
                Arg::Buf(Buf::PartSum),
                Arg::Buf(Buf::PartFlag),
            ],
        },
        Step::Launch {
            kernel: Kernel::ColstatsCombine,
            grid: col_grid(k + 1),
            block: SMALL_BLOCK,
            args: vec![
                Arg::Buf(Buf::PartMax),
                Arg::Buf(Buf::PartSum),
                Arg::Buf(Buf::PartFlag),
                Arg::I32(tiles_i),
                Arg::I32(k_i),
                Arg::F32(p.inv_eps),
                Arg::Buf(Buf::ColMax),
                Arg::Buf(Buf::LocalMax),
                Arg::Buf(Buf::ColSum),
            ],
        },
    ];
    if p.world_size > 1 {
        steps.push(Step::AllReduceMax(Buf::ColMax));
        steps.push(Step::Launch {
            kernel: Kernel::Rescale,
            grid: col_grid(k),
            block: SMALL_BLOCK,
            args: vec![
                Arg::Buf(Buf::LocalMax),
                Arg::Buf(Buf::ColMax),
                Arg::I32(k_i),
                Arg::F32(p.inv_eps),
                Arg::Buf(Buf::ColSum),
            ],
        });
        steps.push(Step::AllReduceSum(Buf::ColSum));
    }
    for pass in 1..=p.iterations {
        let output = pass == p.iterations;
        steps.push(Step::Launch {
            kernel: row_kernel,
            grid: tiles as u32,
            block: row_block,
            args: vec![
                Arg::Buf(Buf::Scores),
                Arg::I32(rows_i),
                Arg::I32(k_i),
                Arg::I32(tile_rows_i),
                Arg::F32(p.inv_eps),
                Arg::F32(p.inv_k),
                Arg::F32(p.inv_b),
                Arg::Buf(Buf::ColMax),
                Arg::Buf(Buf::ColSum),
                Arg::Buf(Buf::RowMax),
                Arg::I32((pass == 1) as i32),
                Arg::I32(output as i32),
                Arg::Buf(Buf::PartSum),
                Arg::Buf(Buf::Q),
            ],
        });
        if !output {
            steps.push(Step::Launch {
                kernel: Kernel::SumTiles,
                grid: col_grid(k),
                block: SMALL_BLOCK,
                args: vec![Arg::Buf(Buf::PartSum), Arg::I32(tiles_i), Arg::I32(k_i), Arg::Buf(Buf::ColSum)],
            });
            if p.world_size > 1 {
                steps.push(Step::AllReduceSum(Buf::ColSum));
            }
        }
    }
    Ok(Plan { steps, rows, prototypes: k, tiles })
}

/// The plan of the naive baseline (`naive.cu`; one process only): exp, then every normalisation of the
/// official code as its own full pass.
pub(crate) fn naive_plan(p: &Problem, sm_count: usize) -> Result<Plan, SinkhornError> {
    check_limits(p)?;
    if p.world_size != 1 {
        return Err(SinkhornError::Unsupported("the naive baseline runs in one process only".into()));
    }
    let (rows, k) = (p.rows, p.prototypes);
    let (tile_rows, tiles) = tiling(rows, sm_count);
    let (rows_i, k_i, tiles_i, tile_rows_i) = (rows as i32, k as i32, tiles as i32, tile_rows as i32);
    let elementwise = (p.elements.div_ceil(SMALL_BLOCK as usize)).min(32 * sm_count.max(1)) as u32;
    let col_grid = k.div_ceil(SMALL_BLOCK as usize) as u32;
    let launch = |kernel, grid, args| Step::Launch { kernel, grid, block: SMALL_BLOCK, args };
    let column_sums = |steps: &mut Vec<Step>| {
        steps.push(launch(
            Kernel::NaiveColsumTiles,
            tiles as u32,
            vec![Arg::Buf(Buf::Q), Arg::I32(rows_i), Arg::I32(k_i), Arg::I32(tile_rows_i), Arg::Buf(Buf::PartSum)],
        ));
        steps.push(launch(
            Kernel::SumTiles,
            col_grid,
            vec![Arg::Buf(Buf::PartSum), Arg::I32(tiles_i), Arg::I32(k_i), Arg::Buf(Buf::ColSum)],
        ));
    };
    let mut steps = vec![launch(
        Kernel::NaiveExp,
        elementwise,
        vec![Arg::Buf(Buf::Scores), Arg::I32(rows_i), Arg::I32(k_i), Arg::F32(p.epsilon), Arg::Buf(Buf::Q)],
    )];
    column_sums(&mut steps);
    steps.push(launch(Kernel::NaiveTotal, 1, vec![Arg::Buf(Buf::ColSum), Arg::I32(k_i), Arg::Buf(Buf::Total)]));
    steps.push(launch(
        Kernel::NaiveDivTotal,
        elementwise,
        vec![Arg::Buf(Buf::Q), Arg::I32(rows_i), Arg::I32(k_i), Arg::Buf(Buf::Total)],
    ));
    let b = (rows * p.world_size) as f32;
    for pass in 1..=p.iterations {
        column_sums(&mut steps);
        steps.push(launch(
            Kernel::NaiveDivCols,
            elementwise,
            vec![Arg::Buf(Buf::Q), Arg::I32(rows_i), Arg::I32(k_i), Arg::Buf(Buf::ColSum), Arg::F32(k as f32)],
        ));
        steps.push(launch(
            Kernel::NaiveRowsum,
            rows as u32,
            vec![Arg::Buf(Buf::Q), Arg::I32(rows_i), Arg::I32(k_i), Arg::Buf(Buf::RowSum)],
        ));
        let scale = if pass == p.iterations { b } else { 1.0 };
        steps.push(launch(
            Kernel::NaiveDivRows,
            elementwise,
            vec![
                Arg::Buf(Buf::Q),
                Arg::I32(rows_i),
                Arg::I32(k_i),
                Arg::Buf(Buf::RowSum),
                Arg::F32(b),
                Arg::F32(scale),
            ],
        ));
    }
    Ok(Plan { steps, rows, prototypes: k, tiles })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Params;

    /// Parameter kinds of every `extern "C" __global__` function in the sources: 'B' pointer, 'I' int,
    /// 'F' float.
    fn kernel_signatures() -> Vec<(String, Vec<char>)> {
        let src = format!("{}\n{}", super::super::KERNELS_CU, super::super::NAIVE_CU);
        let mut out = Vec::new();
        for piece in src.split("extern \"C\" __global__ void").skip(1) {
            let piece = piece.trim_start();
            let piece = match piece.strip_prefix("__launch_bounds__(") {
                Some(rest) => rest[rest.find(')').unwrap() + 1..].trim_start(),
                None => piece,
            };
            let open = piece.find('(').unwrap();
            let name = piece[..open].trim().to_string();
            let close = piece.find(')').unwrap();
            let kinds = piece[open + 1..close]
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    if p.contains('*') {
                        'B'
                    } else if p.starts_with("int ") {
                        'I'
                    } else if p.starts_with("float ") {
                        'F'
                    } else {
                        panic!("unexpected parameter `{p}` in {name}")
                    }
                })
                .collect();
            out.push((name, kinds));
        }
        out
    }

    #[test]
    fn every_launch_matches_the_kernel_signature() {
        let sigs = kernel_signatures();
        for kernel in Kernel::ALL {
            assert!(sigs.iter().any(|(n, _)| n == kernel.name()), "{} missing from kernels.cu", kernel.name());
        }
        for (rows, k, world, iters) in [(4096, 3000, 1, 3), (37, 11, 3, 1), (5, 5000, 2, 4), (1, 1, 1, 2)] {
            let p = Problem::new(rows, k, &Params { epsilon: 0.05, iterations: iters, threads: 0 }, world).unwrap();
            let fused = plan(&p, 132).unwrap();
            let launches = fused.steps.iter().filter(|s| matches!(s, Step::Launch { .. })).count();
            assert_eq!(launches, 2 + (world > 1) as usize + iters + (iters - 1));
            let mut steps = fused.steps;
            if world == 1 {
                steps.extend(naive_plan(&p, 132).unwrap().steps);
            }
            for step in &steps {
                if let Step::Launch { kernel, grid, block, args } = step {
                    let (_, kinds) = sigs.iter().find(|(n, _)| n == kernel.name()).unwrap();
                    let got: Vec<char> = args
                        .iter()
                        .map(|a| match a {
                            Arg::Buf(_) => 'B',
                            Arg::I32(_) => 'I',
                            Arg::F32(_) => 'F',
                        })
                        .collect();
                    assert_eq!(&got, kinds, "arguments of {}", kernel.name());
                    assert!(*grid >= 1 && *block >= 32 && *block <= 1024 && block % 32 == 0);
                }
            }
        }
    }

    #[test]
    fn blocks_cover_all_columns_and_tiles_cover_all_rows() {
        for k in [1, 31, 32, 3000, 4096, 4097, 30000, 32768] {
            for rows in [1, 2, 3, 255, 256, 4096] {
                let p = Problem::new(rows, k, &Params::default(), 1).unwrap();
                let plan = plan(&p, 132).unwrap();
                for step in &plan.steps {
                    if let Step::Launch { kernel: kernel @ (Kernel::RowsC8 | Kernel::RowsC32), grid, block, args } =
                        step
                    {
                        let cpt = if *kernel == Kernel::RowsC8 { 8 } else { 32 };
                        let limit = if *kernel == Kernel::RowsC8 { 512 } else { 1024 };
                        assert!(*block as usize * cpt >= k && *block <= limit, "k {k} block {block}");
                        let Arg::I32(tile_rows) = args[3] else { panic!() };
                        assert!(*grid as usize * tile_rows as usize >= rows);
                        assert!((*grid as usize - 1) * (tile_rows as usize) < rows);
                    }
                }
            }
        }
        let p = Problem::new(4, MAX_PROTOTYPES + 1, &Params::default(), 1).unwrap();
        assert!(matches!(plan(&p, 132), Err(SinkhornError::Unsupported(_))));
    }
}
