//! Runs `kernels.cu` and `naive.cu` without a GPU: compiles them as C++ (host compiler `c++`, C++20) with a
//! small emulation of the CUDA built-ins (every thread of a block is a host thread; `__syncthreads` is a
//! barrier; warp shuffles go through a block-wide buffer), then executes the very plans that drive the GPU
//! (`plan.rs`), all-reduces included, and compares with the CPU implementation. This checks the kernels'
//! syntax, indexing, synchronisation and argument order, leaving only NVRTC specifics and speed to the
//! GPU machine. Skipped (loudly) when no C++ compiler is installed.

use super::plan::{self, Arg, Buf, Plan, Step};
use super::{KERNELS_CU, NAIVE_CU};
use crate::{Params, Problem};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const SHIM: &str = r#"
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <math.h>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static

struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local emu_dim3 threadIdx;
thread_local emu_dim3 blockIdx;
emu_dim3 blockDim;
emu_dim3 gridDim;
static std::barrier<>* emu_barrier = nullptr;
static float emu_shuffle[1024];

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

// Every thread of the block calls this together (true of sk_block_reduce), so a block barrier is a
// faithful stand-in for the warp's lockstep exchange.
inline float __shfl_xor_sync(unsigned, float v, int offset) {
    emu_shuffle[threadIdx.x] = v;
    __syncthreads();
    float other = emu_shuffle[threadIdx.x ^ (unsigned)offset];
    __syncthreads();
    return other;
}

template <class F>
void emu_launch(unsigned grid, unsigned block, F f) {
    if (block == 0 || block > 1024 || block % 32 != 0) { fprintf(stderr, "bad block %u\n", block); exit(3); }
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        emu_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&f, t, b] { threadIdx.x = t; blockIdx.x = b; f(); });
        }
        for (auto& t : threads) t.join();
    }
}
"#;

const DRIVER: &str = r#"
// Plan interpreter: `world W`, `buf NAME LEN`, `launch KERNEL GRID BLOCK ARGS...` (B:NAME, I:int,
// F:hex bits), `reduce_max NAME`, `reduce_sum NAME`. Reads DIR/Scores_R.bin, writes DIR/NAME_R.bin.
struct EmuArg { char t; std::string name; long long i = 0; float f = 0; float* p = nullptr; };

static void need(bool ok, const char* what) { if (!ok) { fprintf(stderr, "argument kind mismatch: %s\n", what); exit(4); } }
template <class T> T emu_get(EmuArg& a);
template <> const float* emu_get<const float*>(EmuArg& a) { need(a.t == 'B', "pointer"); return a.p; }
template <> float* emu_get<float*>(EmuArg& a) { need(a.t == 'B', "pointer"); return a.p; }
template <> int emu_get<int>(EmuArg& a) { need(a.t == 'I', "int"); return (int)a.i; }
template <> float emu_get<float>(EmuArg& a) { need(a.t == 'F', "float"); return a.f; }

template <class... Ps, size_t... Is>
void emu_call(void (*k)(Ps...), std::vector<EmuArg>& a, std::index_sequence<Is...>) { k(emu_get<Ps>(a[Is])...); }

template <class... Ps>
void emu_run(void (*k)(Ps...), unsigned grid, unsigned block, std::vector<EmuArg>& a) {
    if (a.size() != sizeof...(Ps)) { fprintf(stderr, "expected %zu arguments, got %zu\n", sizeof...(Ps), a.size()); exit(5); }
    emu_launch(grid, block, [&] { emu_call(k, a, std::index_sequence_for<Ps...>{}); });
}

#define KERNEL(name) if (kernel == #name) { emu_run(name, grid, block, args); return; }
static void dispatch(const std::string& kernel, unsigned grid, unsigned block, std::vector<EmuArg>& args) {
    KERNEL(sk_colstats) KERNEL(sk_colstats_combine) KERNEL(sk_rescale) KERNEL(sk_sum_tiles)
    KERNEL(sk_rows_c8) KERNEL(sk_rows_c32)
    KERNEL(sk_naive_exp) KERNEL(sk_naive_colsum_tiles) KERNEL(sk_naive_rowsum) KERNEL(sk_naive_total)
    KERNEL(sk_naive_div_total) KERNEL(sk_naive_div_cols) KERNEL(sk_naive_div_rows)
    fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
    exit(6);
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    std::string dir = argv[2];
    std::ifstream plan(argv[1]);
    std::string line;
    int world = 1;
    std::vector<std::map<std::string, std::vector<float>>> bufs;
    while (std::getline(plan, line)) {
        std::istringstream in(line);
        std::string op;
        in >> op;
        if (op == "world") {
            in >> world;
            bufs.resize(world);
        } else if (op == "buf") {
            std::string name; size_t len; in >> name >> len;
            for (int r = 0; r < world; ++r) {
                bufs[r][name].assign(len, 0.0f);
                if (name == "Scores") {
                    std::ifstream f(dir + "/Scores_" + std::to_string(r) + ".bin", std::ios::binary);
                    f.read((char*)bufs[r][name].data(), len * sizeof(float));
                    if (!f) { fprintf(stderr, "short scores file\n"); return 7; }
                }
            }
        } else if (op == "launch") {
            std::string kernel; unsigned grid, block; in >> kernel >> grid >> block;
            std::vector<std::string> tokens; std::string tok;
            while (in >> tok) tokens.push_back(tok);
            for (int r = 0; r < world; ++r) {
                std::vector<EmuArg> args;
                for (auto& t : tokens) {
                    EmuArg a; a.t = t[0];
                    std::string v = t.substr(2);
                    if (a.t == 'B') {
                        if (!bufs[r].count(v)) { fprintf(stderr, "no buffer %s\n", v.c_str()); return 8; }
                        a.name = v; a.p = bufs[r][v].data();
                    } else if (a.t == 'I') { a.i = std::stoll(v); }
                    else { uint32_t bits = (uint32_t)std::stoul(v, nullptr, 16); std::memcpy(&a.f, &bits, 4); }
                    args.push_back(a);
                }
                dispatch(kernel, grid, block, args);
            }
        } else if (op == "reduce_max" || op == "reduce_sum") {
            std::string name; in >> name;
            size_t n = bufs[0][name].size();
            std::vector<float> acc = bufs[0][name];
            for (int r = 1; r < world; ++r)
                for (size_t i = 0; i < n; ++i)
                    acc[i] = op == "reduce_max" ? fmaxf(acc[i], bufs[r][name][i]) : acc[i] + bufs[r][name][i];
            for (int r = 0; r < world; ++r) bufs[r][name] = acc;
        } else if (!op.empty()) {
            fprintf(stderr, "bad plan line %s\n", line.c_str());
            return 9;
        }
    }
    for (int r = 0; r < world; ++r)
        for (auto& [name, data] : bufs[r]) {
            std::ofstream f(dir + "/" + name + "_" + std::to_string(r) + ".bin", std::ios::binary);
            f.write((const char*)data.data(), data.size() * sizeof(float));
        }
    return 0;
}
"#;

/// The compiled emulator, cached in the temp folder under a hash of its source (so edits to the kernels
/// rebuild it); None (with the reason printed) when there is no C++ compiler.
fn emulator() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let source = format!("{SHIM}\n{KERNELS_CU}\n{NAIVE_CU}\n{DRIVER}");
        let hash = source.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let bin = std::env::temp_dir().join(format!("swav-sinkhorn-emulator-{hash:016x}"));
        if bin.exists() {
            return Some(bin);
        }
        let dir = scratch_dir("build");
        let src = dir.join("emulate.cpp");
        std::fs::write(&src, &source).unwrap();
        let built = dir.join("emulate");
        let out = match Command::new("c++")
            .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-o"])
            .arg(&built)
            .arg(&src)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("SKIPPED: kernel emulation needs a C++20 compiler (`c++`): {e}");
                return None;
            }
        };
        assert!(
            out.status.success(),
            "the CUDA kernels do not compile as C++:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Atomic publish: concurrent test processes may build the same emulator.
        std::fs::rename(&built, &bin).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Some(bin)
    })
    .as_deref()
}

fn scratch_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "swav-sinkhorn-emulate-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `plan` on the emulator with one score matrix per rank; returns every buffer of every rank.
fn run_plan(plan: &Plan, scores: &[Vec<f32>]) -> Option<Vec<std::collections::HashMap<String, Vec<f32>>>> {
    let bin = emulator()?;
    let dir = scratch_dir("run");
    let mut text = format!("world {}\n", scores.len());
    for buf in [Buf::Scores, Buf::Q].iter().chain(Buf::SCRATCH.iter()) {
        text += &format!("buf {buf:?} {}\n", plan.len(*buf));
    }
    for step in &plan.steps {
        match step {
            Step::Launch { kernel, grid, block, args } => {
                text += &format!("launch {} {grid} {block}", kernel.name());
                for a in args {
                    text += &match a {
                        Arg::Buf(b) => format!(" B:{b:?}"),
                        Arg::I32(v) => format!(" I:{v}"),
                        Arg::F32(v) => format!(" F:{:08x}", v.to_bits()),
                    };
                }
                text += "\n";
            }
            Step::AllReduceMax(b) => text += &format!("reduce_max {b:?}\n"),
            Step::AllReduceSum(b) => text += &format!("reduce_sum {b:?}\n"),
        }
    }
    std::fs::write(dir.join("plan.txt"), text).unwrap();
    for (r, s) in scores.iter().enumerate() {
        let bytes: Vec<u8> = s.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("Scores_{r}.bin")), bytes).unwrap();
    }
    let out = Command::new(bin).arg(dir.join("plan.txt")).arg(&dir).output().unwrap();
    assert!(out.status.success(), "emulator failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut ranks = Vec::new();
    for r in 0..scores.len() {
        let mut bufs = std::collections::HashMap::new();
        for buf in [Buf::Scores, Buf::Q].iter().chain(Buf::SCRATCH.iter()) {
            let bytes = std::fs::read(dir.join(format!("{buf:?}_{r}.bin"))).unwrap();
            let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            bufs.insert(format!("{buf:?}"), v);
        }
        ranks.push(bufs);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Some(ranks)
}

fn random_scores(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn assert_rows_sum_to_one(q: &[f32], k: usize) {
    for row in q.chunks(k) {
        let s: f64 = row.iter().map(|&x| x as f64).sum();
        assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
    }
}

#[test]
fn emulated_kernels_match_the_cpu() {
    // (rows, prototypes, epsilon, iterations, scale of scores, multiprocessors)
    let cases = [
        (37, 11, 0.05, 3, 0.7, 4),  // odd sizes, one warp
        (48, 300, 0.05, 3, 1.0, 4), // several warps, tiles of 6 rows
        (20, 100, 0.01, 5, 1.0, 3), // sharp: exp(2/0.01) overflows the official code
        (9, 5000, 0.05, 2, 1.0, 2), // the 32-columns-per-thread kernel
        (3, 1, 0.05, 1, 1.0, 1),    // one prototype, one iteration
        (1, 64, 0.03, 3, 1.0, 1),   // one row
    ];
    for (rows, k, eps, iters, scale, sms) in cases {
        let params = Params::new(eps, iters);
        let scores = random_scores(rows * k, (rows * 1000 + k) as u64, scale);
        let p = Problem::new(rows, k, &params, 1).unwrap();
        let Some(out) = run_plan(&plan::plan(&p, sms).unwrap(), std::slice::from_ref(&scores)) else {
            return;
        };
        let gpu = &out[0]["Q"];
        let cpu = crate::sinkhorn(&scores, rows, k, &params).unwrap();
        let err = crate::relative_error(gpu, &cpu);
        assert!(err < 1e-5, "{rows}x{k} eps {eps}: emulated CUDA vs CPU relative error {err}");
        assert_rows_sum_to_one(gpu, k);
        assert_eq!(out[0]["ColMax"][k], 0.0, "no non-finite flag");
    }
}

#[test]
fn emulated_distributed_run_matches_local_group() {
    let (rows, k, world) = (13, 40, 3);
    let params = Params::new(0.05, 3);
    let scores: Vec<Vec<f32>> = (0..world).map(|r| random_scores(rows * k, 77 + r as u64, 1.0)).collect();
    let p = Problem::new(rows, k, &params, world).unwrap();
    let Some(out) = run_plan(&plan::plan(&p, 2).unwrap(), &scores) else {
        return;
    };
    let refs: Vec<&[f32]> = scores.iter().map(|s| s.as_slice()).collect();
    let cpu = crate::sinkhorn_ranks(&refs, rows, k, &params).unwrap();
    for r in 0..world {
        let err = crate::relative_error(&out[r]["Q"], &cpu[r]);
        assert!(err < 1e-5, "rank {r}: relative error {err}");
    }
}

#[test]
fn emulated_kernels_flag_non_finite_scores_and_stay_finite() {
    let (rows, k) = (10, 50);
    let mut scores = random_scores(rows * k, 5, 1.0);
    scores[17] = f32::NAN;
    scores[230] = f32::INFINITY;
    scores[231] = f32::NEG_INFINITY;
    let p = Problem::new(rows, k, &Params::default(), 1).unwrap();
    let Some(out) = run_plan(&plan::plan(&p, 2).unwrap(), &[scores]) else {
        return;
    };
    assert_eq!(out[0]["ColMax"][k], 1.0, "non-finite flag");
    assert!(out[0]["Q"].iter().all(|x| x.is_finite()));
}

#[test]
fn emulated_naive_baseline_matches_the_official_order() {
    let (rows, k) = (24, 70);
    let params = Params::new(0.05, 3);
    let scores = random_scores(rows * k, 11, 1.0);
    let p = Problem::new(rows, k, &params, 1).unwrap();
    let Some(out) = run_plan(&plan::naive_plan(&p, 3).unwrap(), std::slice::from_ref(&scores)) else {
        return;
    };
    let official = crate::baseline::official(&scores, rows, k, 0.05, 3).unwrap();
    let err = crate::relative_error(&out[0]["Q"], &official);
    assert!(err < 1e-5, "naive kernels vs CPU official order: {err}");
}
