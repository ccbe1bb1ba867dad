// swav-cuda-emu: the CUDA built-ins for host C++20, so that kernel sources written for NVRTC compile and
// run on the CPU. Included first by every generated translation unit (see build.rs).
//
// Execution model. A block runs on one host thread; each CUDA thread of the block is a fiber (ucontext)
// with its own small stack. A fiber runs until it reaches a barrier (__syncthreads, or a warp-synchronous
// built-in such as __shfl_xor_sync) or returns; the scheduler then releases a barrier once every live
// thread of its scope (the block, or the warp) waits at it. So:
// - the order of threads between barriers is fixed (ascending, or descending with the reverse schedule):
//   a kernel whose result depends on it has a race, and running both schedules exposes it;
// - a barrier that some threads never reach (one inside divergent code, or after an early return) is
//   reported, instead of hanging or silently passing; so __syncthreads must be reached by the whole block;
// - warp-synchronous built-ins must be called by EVERY live lane of the warp together, with the full mask
//   0xffffffff (the usual reduction idiom). Reading a lane that exited or does not exist is an error.
// Blocks are spread over a few host threads (workers); static __shared__ variables are thread_local, so
// each block sees its own, and dynamic shared memory is a per-worker buffer filled with 0xFF (NaN) at the
// start of every block so that reading it before writing shows up.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <tuple>
#include <type_traits>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)
#define __constant__ static const

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
using uint3 = dim3;
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------------
// Launch description shared with Rust (lib.rs, `RawLaunch` / `RawArg`): keep the two in sync.
namespace emu {
enum ArgKind : uint32_t { ARG_PTR = 0, ARG_I32 = 1, ARG_U32 = 2, ARG_F32 = 3, ARG_I64 = 4, ARG_U64 = 5 };
enum Elem : uint32_t { E_F32 = 0, E_BF16 = 1, E_I32 = 2, E_U32 = 3, E_U8 = 4, E_I64 = 5, E_U64 = 6, E_ANY = 99 };
struct RawArg {
    uint32_t kind;
    uint32_t elem;  // pointers: element type (E_ANY for a null pointer)
    uint64_t bits;  // scalars: the value's bits, zero-extended
    void* ptr;
};
struct RawLaunch {
    uint32_t grid[3];
    uint32_t block[3];
    uint64_t shared_bytes;
    uint32_t reverse;
    uint32_t workers;
    const RawArg* args;
    uint64_t nargs;
    char* error;
    uint64_t error_len;
};

inline const char* elem_name(uint32_t e) {
    switch (e) {
        case E_F32: return "float";
        case E_BF16: return "__nv_bfloat16";
        case E_I32: return "int";
        case E_U32: return "unsigned int";
        case E_U8: return "unsigned char";
        case E_I64: return "long long";
        case E_U64: return "unsigned long long";
        default: return "null";
    }
}
}  // namespace emu

// ---------------------------------------------------------------------------------------------------------
// bf16: a 16-bit storage type with CUDA's conversions (round to nearest even; NaN -> canonical 0x7fff).
struct __nv_bfloat16 {
    unsigned short __x;
};
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.__x = 0x7fff;
        return r;
    }
    const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    r.__x = (unsigned short)((u + rounding) >> 16);
    return r;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.__x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short s) {
    __nv_bfloat16 r;
    r.__x = s;
    return r;
}

// ---------------------------------------------------------------------------------------------------------
// Math and bit casts (the fast intrinsics are their exact versions here).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.0f), 1.0f); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
template <class T>
inline T __ldg(const T* p) { return *p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Atomics: blocks may run concurrently on several workers, so these are real atomics.
template <class T>
inline T emu_atomic_add(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return emu_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return emu_atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return emu_atomic_add(p, v); }
template <class T, class F>
inline T emu_atomic_update(T* p, F f) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (!a.compare_exchange_weak(old, f(old))) {
    }
    return old;
}
inline int atomicMax(int* p, int v) { return emu_atomic_update(p, [v](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return emu_atomic_update(p, [v](unsigned o) { return o > v ? o : v; }); }
inline int atomicMin(int* p, int v) { return emu_atomic_update(p, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return emu_atomic_update(p, [v](unsigned o) { return o < v ? o : v; }); }
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).exchange(v); }
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v); }
inline int atomicCAS(int* p, int cmp, int v) {
    std::atomic_ref<int>(*p).compare_exchange_strong(cmp, v);
    return cmp;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
    std::atomic_ref<unsigned>(*p).compare_exchange_strong(cmp, v);
    return cmp;
}

// ---------------------------------------------------------------------------------------------------------
// The fiber scheduler.
namespace emu {
constexpr size_t STACK_BYTES = 128 * 1024;
constexpr size_t GUARD_BYTES = 4096;
constexpr uint64_t MAX_SHARED_BYTES = 48 * 1024;  // above this a launch needs an opt-in attribute

enum class State { Run, AtBlock, AtWarp, Done };

struct Fiber {
    ucontext_t ctx;
    State state = State::Run;
    uint64_t shuffles = 0;  // warp-synchronous calls made, to check that lanes call them together
};

struct Worker {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;  // each with a PROT_NONE guard page below it
    std::vector<uint64_t> slots;  // one exchange slot per thread for shuffles
    std::vector<unsigned char> dynamic_shared;
    ucontext_t scheduler;
    unsigned current = 0;
    unsigned threads = 0;
    void (*body)(void*) = nullptr;
    void* env = nullptr;
    std::string error;

    ~Worker() {
        for (char* s : stacks) munmap(s - GUARD_BYTES, STACK_BYTES + GUARD_BYTES);
    }
    void ensure_stacks(unsigned n) {
        while (stacks.size() < n) {
            void* m = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) {
                fprintf(stderr, "swav-cuda-emu: cannot map a fiber stack\n");
                abort();
            }
            mprotect(m, GUARD_BYTES, PROT_NONE);
            stacks.push_back((char*)m + GUARD_BYTES);
        }
    }
};

inline thread_local Worker* current_worker = nullptr;

inline void set_thread_index(unsigned tid) {
    threadIdx.x = tid % blockDim.x;
    threadIdx.y = (tid / blockDim.x) % blockDim.y;
    threadIdx.z = tid / (blockDim.x * blockDim.y);
}

// Back to the scheduler, leaving this fiber in `state`.
inline void yield(State state) {
    Worker* w = current_worker;
    Fiber& f = w->fibers[w->current];
    f.state = state;
    swapcontext(&f.ctx, &w->scheduler);
}

// Stops the launch with an error (the fiber is never resumed).
[[noreturn]] inline void fail(const std::string& what) {
    Worker* w = current_worker;
    if (w->error.empty()) {
        w->error = what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
                   " thread " + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + ")";
    }
    yield(State::Done);
    abort();  // unreachable: a failed launch never resumes its fibers
}

inline void fiber_entry() {
    Worker* w = current_worker;
    w->body(w->env);
    w->fibers[w->current].state = State::Done;
    // uc_link returns to the scheduler.
}

inline unsigned linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// Runs one block to completion; false (with w.error set) on a deadlock or a failed check.
inline bool run_block(Worker& w, bool reverse) {
    const unsigned n = w.threads;
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = w.fibers[t];
        f.state = State::Run;
        f.shuffles = 0;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = w.stacks[t];
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &w.scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    if (!w.dynamic_shared.empty()) std::memset(w.dynamic_shared.data(), 0xff, w.dynamic_shared.size());
    const unsigned warps = (n + 31) / 32;
    for (;;) {
        for (unsigned i = 0; i < n; ++i) {
            const unsigned t = reverse ? n - 1 - i : i;
            if (w.fibers[t].state != State::Run) continue;
            w.current = t;
            set_thread_index(t);
            swapcontext(&w.scheduler, &w.fibers[t].ctx);
            if (!w.error.empty()) return false;
        }
        // Nothing runnable: release a barrier whose whole scope has arrived.
        bool released = false;
        unsigned live = 0, at_block = 0, at_warp = 0;
        for (unsigned wp = 0; wp < warps; ++wp) {
            unsigned wl = 0, ww = 0;
            for (unsigned t = wp * 32; t < std::min(n, wp * 32 + 32); ++t) {
                const State s = w.fibers[t].state;
                wl += s != State::Done;
                ww += s == State::AtWarp;
                at_block += s == State::AtBlock;
            }
            live += wl;
            at_warp += ww;
            const unsigned lanes = std::min(n, wp * 32 + 32) - wp * 32;
            if (ww > 0 && ww == wl && wl < lanes) {
                w.error = "in block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ", warp " +
                          std::to_string(wp) + ": " + std::to_string(lanes - wl) +
                          " lanes exited without reaching a warp-synchronous built-in that the others wait at (every lane must call it)";
                return false;
            }
            if (ww > 0 && ww == wl) {
                for (unsigned t = wp * 32; t < std::min(n, wp * 32 + 32); ++t) {
                    if (w.fibers[t].state == State::AtWarp) w.fibers[t].state = State::Run;
                }
                released = true;
            }
        }
        if (released) continue;
        if (live == 0) return true;
        if (at_block == live && live < n) {
            w.error = "in block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ": " +
                      std::to_string(n - live) + " threads exited without reaching a __syncthreads that the other " + std::to_string(live) +
                      " wait at (a barrier must be reached by the whole block: no early return before it)";
            return false;
        }
        if (at_block == live) {
            for (unsigned t = 0; t < n; ++t) {
                if (w.fibers[t].state == State::AtBlock) w.fibers[t].state = State::Run;
            }
            continue;
        }
        w.error = "deadlock in block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ": " +
                  std::to_string(at_block) + " of " + std::to_string(live) + " live threads wait at __syncthreads and " + std::to_string(at_warp) +
                  " at a warp-synchronous built-in (a barrier or shuffle that part of the block or warp never reaches)";
        return false;
    }
}

inline int report(const RawLaunch* l, const std::string& what) {
    if (l->error && l->error_len > 0) {
        const size_t n = std::min<size_t>(what.size(), l->error_len - 1);
        std::memcpy(l->error, what.data(), n);
        l->error[n] = 0;
    }
    return 1;
}

// Runs the whole grid: blocks are claimed in order (or reverse order) by `workers` host threads.
inline int launch(const RawLaunch* l, void (*body)(void*), void* env) {
    const uint64_t threads = (uint64_t)l->block[0] * l->block[1] * l->block[2];
    if (threads == 0 || threads > 1024 || l->block[0] > 1024 || l->block[1] > 1024 || l->block[2] > 64) {
        return report(l, "invalid block " + std::to_string(l->block[0]) + "x" + std::to_string(l->block[1]) + "x" + std::to_string(l->block[2]) +
                             " (at most 1024 threads, z at most 64)");
    }
    if (l->grid[0] == 0 || l->grid[1] == 0 || l->grid[2] == 0 || l->grid[0] > 0x7fffffffu || l->grid[1] > 65535 || l->grid[2] > 65535) {
        return report(l, "invalid grid " + std::to_string(l->grid[0]) + "x" + std::to_string(l->grid[1]) + "x" + std::to_string(l->grid[2]));
    }
    if (l->shared_bytes > MAX_SHARED_BYTES) {
        return report(l, std::to_string(l->shared_bytes) + " bytes of dynamic shared memory: more than 48 KiB needs "
                         "cudaFuncAttributeMaxDynamicSharedMemorySize, which plans do not set");
    }
    const uint64_t blocks = (uint64_t)l->grid[0] * l->grid[1] * l->grid[2];
    const unsigned workers = (unsigned)std::max<uint64_t>(1, std::min<uint64_t>(l->workers, blocks));
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::string first_error;
    std::atomic_flag error_taken = ATOMIC_FLAG_INIT;
    auto work = [&] {
        Worker w;
        current_worker = &w;
        w.threads = (unsigned)threads;
        w.fibers.resize(threads);
        w.ensure_stacks((unsigned)threads);
        w.slots.assign(threads, 0);
        w.dynamic_shared.assign(l->shared_bytes, 0xff);
        w.body = body;
        w.env = env;
        blockDim = dim3{l->block[0], l->block[1], l->block[2]};
        gridDim = dim3{l->grid[0], l->grid[1], l->grid[2]};
        for (;;) {
            const uint64_t i = next.fetch_add(1);
            if (i >= blocks || failed.load()) break;
            const uint64_t b = l->reverse ? blocks - 1 - i : i;
            blockIdx = dim3{(unsigned)(b % l->grid[0]), (unsigned)((b / l->grid[0]) % l->grid[1]), (unsigned)(b / ((uint64_t)l->grid[0] * l->grid[1]))};
            if (!run_block(w, l->reverse != 0)) {
                failed.store(true);
                if (!error_taken.test_and_set()) first_error = w.error;
                break;
            }
        }
        current_worker = nullptr;
    };
    if (workers == 1) {
        work();
    } else {
        std::vector<std::thread> pool;
        for (unsigned i = 0; i < workers; ++i) pool.emplace_back(work);
        for (auto& t : pool) t.join();
    }
    return failed.load() ? report(l, first_error) : 0;
}

inline unsigned char* dynamic_shared() { return current_worker->dynamic_shared.data(); }

// ---------------------------------------------------------------------------------------------------------
// Warp-synchronous built-ins: every live lane calls them together (see the header).
inline void warp_barrier() { yield(State::AtWarp); }

template <class T>
inline T shuffle(unsigned mask, T v, int src_lane) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffled type");
    Worker* w = current_worker;
    if (mask != 0xffffffffu) fail("warp built-in with a partial mask: only the full mask 0xffffffff is emulated");
    const unsigned tid = linear_tid();
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w->slots[tid] = bits;
    const uint64_t call = ++w->fibers[tid].shuffles;
    warp_barrier();
    T out = v;
    if (src_lane >= 0) {
        const unsigned src = (tid & ~31u) + (unsigned)src_lane;
        if (src >= w->threads || w->fibers[src].shuffles != call) {
            fail("shuffle reads lane " + std::to_string(src_lane) + ", which does not exist or did not take part");
        }
        std::memcpy(&out, &w->slots[src], sizeof(T));
    }
    warp_barrier();  // nobody overwrites a slot before every lane has read
    return out;
}
}  // namespace emu

inline void __syncthreads() { emu::yield(emu::State::AtBlock); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask");
    emu::warp_barrier();
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int lane = (int)(emu::linear_tid() & 31u);
    return emu::shuffle(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = (int)(emu::linear_tid() & 31u);
    const int src = lane ^ lane_mask;
    // A lane asking for a later group of `width` lanes gets its own value.
    return emu::shuffle(mask, v, (src / width) > (lane / width) ? -1 : src);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = (int)(emu::linear_tid() & 31u);
    return emu::shuffle(mask, v, (lane % width) + (int)delta >= width ? -1 : lane + (int)delta);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = (int)(emu::linear_tid() & 31u);
    return emu::shuffle(mask, v, (lane % width) < (int)delta ? -1 : lane - (int)delta);
}
inline void __trap() { emu::fail("__trap()"); }

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments: each parameter type checks the kind (and element type) the Rust side sent.
namespace emu {
template <class T>
struct ElemOf;
template <> struct ElemOf<float> { static constexpr uint32_t code = E_F32; };
template <> struct ElemOf<__nv_bfloat16> { static constexpr uint32_t code = E_BF16; };
template <> struct ElemOf<int> { static constexpr uint32_t code = E_I32; };
template <> struct ElemOf<unsigned> { static constexpr uint32_t code = E_U32; };
template <> struct ElemOf<unsigned char> { static constexpr uint32_t code = E_U8; };
template <> struct ElemOf<long long> { static constexpr uint32_t code = E_I64; };
template <> struct ElemOf<long> { static constexpr uint32_t code = E_I64; };
template <> struct ElemOf<unsigned long long> { static constexpr uint32_t code = E_U64; };
template <> struct ElemOf<unsigned long> { static constexpr uint32_t code = E_U64; };

template <class T>
struct Param {
    static_assert(std::is_arithmetic_v<T>, "unsupported kernel parameter type");
    static constexpr uint32_t kind = std::is_same_v<T, float> ? ARG_F32
                                     : sizeof(T) == 8      ? (std::is_signed_v<T> ? ARG_I64 : ARG_U64)
                                                           : (std::is_signed_v<T> ? ARG_I32 : ARG_U32);
    static T get(const RawArg& a, std::string& err, size_t i) {
        if (a.kind != kind || sizeof(T) < 4) {
            err = "argument " + std::to_string(i) + ": kind " + std::to_string(a.kind) + " given, the kernel takes kind " + std::to_string(kind);
            return T{};
        }
        T v;
        std::memcpy(&v, &a.bits, sizeof(T));
        return v;
    }
};
template <class T>
struct Param<T*> {
    static T* get(const RawArg& a, std::string& err, size_t i) {
        using E = std::remove_cv_t<T>;
        if (a.kind != ARG_PTR) {
            err = "argument " + std::to_string(i) + ": a scalar given for a pointer";
        } else if (a.elem != E_ANY && a.elem != ElemOf<E>::code) {
            err = "argument " + std::to_string(i) + ": a buffer of " + elem_name(a.elem) + " given for " + elem_name(ElemOf<E>::code) + "*";
        }
        return (T*)a.ptr;
    }
};

template <class... Ps>
struct Thunk {
    void (*kernel)(Ps...);
    std::tuple<Ps...> args;
    static void call(void* self) {
        Thunk* t = (Thunk*)self;
        std::apply(t->kernel, t->args);
    }
};

template <class... Ps, size_t... Is>
std::tuple<Ps...> convert(const RawArg* a, std::string& err, std::index_sequence<Is...>) {
    return std::tuple<Ps...>{Param<Ps>::get(a[Is], err, Is)...};
}

// The entry point of every kernel (generated per kernel by build.rs).
template <class... Ps>
int run(const RawLaunch* l, void (*kernel)(Ps...)) {
    if (l->nargs != sizeof...(Ps)) {
        return report(l, std::to_string(l->nargs) + " arguments given, the kernel takes " + std::to_string(sizeof...(Ps)));
    }
    std::string err;
    Thunk<Ps...> thunk{kernel, convert<Ps...>(l->args, err, std::index_sequence_for<Ps...>{})};
    if (!err.empty()) return report(l, err);
    return launch(l, &Thunk<Ps...>::call, &thunk);
}
}  // namespace emu
