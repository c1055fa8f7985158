// mpl_emu: a small SIMT emulator that runs our CUDA kernels (csrc/cuda/*.cuh) on the CPU, compiled
// by the host compiler from the same source as nvcc compiles. Test-only: the emulated build
// (tests/emulated_build.py) includes it through csrc/cuda/launch.cuh; the extension never does.
//
// What it models
//   - __global__ __device__ __host__ __forceinline__ __launch_bounds__ expand to nothing (or
//     inline); __CUDA_ARCH__ is defined, so the device branches of shared headers are the ones
//     that run. Include c10/std headers BEFORE this one: they must see a host compile.
//   - gridDim, blockIdx, blockDim, threadIdx (dim3/uint3) per emulated thread.
//   - Every CUDA thread of a block is a fiber (a minimal stack switch on x86-64, else ucontext)
//     with its own stack and its own copy of the kernel arguments. Blocks run one after another, in a seeded random order. Inside a
//     block a fiber runs until it reaches a barrier (__syncthreads*, a warp intrinsic) or
//     returns; the next fiber to run is picked at random (seeded). So code that reads what
//     another thread wrote without a barrier between them sees stale data on most seeds.
//   - __syncthreads(), __syncthreads_or/and/count: wait for every thread of the block that has
//     not returned. A barrier some live threads never reach (divergent barrier) is an error.
//   - Warp intrinsics (__shfl_sync/_up/_down/_xor, __ballot_sync, __any_sync, __all_sync,
//     __syncwarp): the lanes named in the mask meet, exchange, and go on together (lockstep at
//     each intrinsic). A mask naming a lane that returned or does not exist is an error.
//   - __shared__ variables are function statics (one instance: blocks run one at a time). Those
//     of non-template functions sit in one linker section that is filled with seeded garbage
//     before every block, as real shared memory starts undefined; GCC ignores the section
//     attribute on statics of template instantiations, so those keep the previous block's
//     values (stale data, which a missing barrier still reads wrongly). Every subscript of a
//     shared array is bounds-checked: the emulated build compiles with -fsanitize=bounds-strict,
//     and the handler (MPL_EMU_DEFINE_BOUNDS_HANDLER) turns an out-of-range index into an error.
//   - Dynamic shared memory (MPL_DYNAMIC_SHARED in launch.cuh; `extern __shared__` cannot be
//     expressed with host-compiler macros) is exactly the launch's byte count, placed so that it
//     ends at an inaccessible page: a read or write past its end is caught (SIGSEGV -> error).
//     Its contents are seeded garbage too.
//   - Atomics (atomicAdd/Sub/Min/Max/Exch/CAS/Or/And) on shared and global memory: a fiber is
//     never interrupted inside one, so they are atomic.
//   - __fadd_rn-style intrinsics: IEEE float/double operations of the host (round to nearest).
//     NOT modelled: nvcc's FMA contraction and flush-to-zero under --use_fast_math; the GPU
//     acceptance run (benchmarks/gpu_acceptance.py) is what checks real-GPU rounding.
//   - Launch limits checked at each launch (an error, as the launch would fail on a GPU): block
//     and grid dimensions (1..1024 threads per block, z <= 64, grid x < 2^31, y/z <= 65535, no
//     zero dimension), threads per block <= the kernel's __launch_bounds__ (bounds registered by
//     the emulated build, see register_launch_bounds), static + dynamic shared memory <= 48 KB
//     (static size: the shared section of the build, all its kernels together; statics of
//     template functions are not in it), kernel parameter bytes <= 4096 (the classic limit our
//     kernel-argument structs are sized for).
//   - Global memory is host memory and is not bounds-checked; a segmentation fault inside a
//     kernel (a wild pointer) becomes an error naming the kernel instead of killing the process,
//     and a wrong read shows as a wrong result.
// Errors are thrown as mpl_emu::Error from the launch. Streams are ignored: launches run to
// completion, in order, on the calling thread.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("mpl_emu_shared"), aligned(16)))

using cudaStream_t = void*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

extern "C" {
extern char __start_mpl_emu_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_mpl_emu_shared[] __attribute__((weak, visibility("hidden")));
}

// Fiber switch. On x86-64 a minimal switch of the callee-saved registers, stack pointer and
// floating-point control words (swapcontext makes a signal-mask system call per switch, which
// made the emulated tests several times slower); elsewhere ucontext.
#if defined(__x86_64__) && defined(__linux__)
#define MPL_EMU_FAST_SWITCH 1
extern "C" void mpl_emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl mpl_emu_switch
  .hidden mpl_emu_switch
  .type mpl_emu_switch, @function
mpl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mpl_emu_switch, .-mpl_emu_switch
)");
#else
#define MPL_EMU_FAST_SWITCH 0
#endif

namespace mpl_emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;
constexpr size_t kMaxParamBytes = 4096;
constexpr size_t kFiberStack = 256 * 1024;

namespace detail {

enum class Wait { none, block, warp, done };

struct Context {
#if MPL_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void switch_context(Context& from, Context& to) {
#if MPL_EMU_FAST_SWITCH
  mpl_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

struct Fiber {
  Context ctx;
  uint3 tid;
  int linear = 0;
  Wait wait = Wait::none;
  unsigned warp_mask = 0;
  int predicate = 0;      // __syncthreads_or/and/count input, then its result
  uint64_t shfl_out = 0;  // value handed to a warp intrinsic
  unsigned gen = 0;       // warp generation whose buffer this lane reads
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
};

struct Warp {
  uint64_t slots[2][kWarpSize];
  unsigned gen = 0;
};

struct State {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<char*> stacks;
  Fiber* current = nullptr;
  Context scheduler;
  std::mt19937_64 rng{1};
  uint64_t seed = 1;
  std::string error;
  const char* kernel = "";
  // dynamic shared memory: mapping, pointer and size of this launch
  char* dyn_map = nullptr;
  size_t dyn_map_bytes = 0;
  char* dyn_ptr = nullptr;
  size_t dyn_bytes = 0;
  sigjmp_buf fault_jump;
  volatile sig_atomic_t in_kernel = 0;
  void* fault_addr = nullptr;
  std::map<std::string, int> launch_bounds;
  std::vector<char> alt_stack;
};

inline State& state() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const std::string& what) { throw Error(what); }

inline Fiber& self() { return *state().current; }

inline void yield_to_scheduler() {
  State& s = state();
  Fiber* me = s.current;
  switch_context(me->ctx, s.scheduler);
}

}  // namespace detail

// Seed of the scheduler (thread order, block order, shared-memory garbage).
inline void set_seed(uint64_t seed) {
  detail::state().seed = seed;
  detail::state().rng.seed(seed);
}

// Threads-per-block bound of a kernel, by the name it is launched with (template arguments
// dropped), as declared by its __launch_bounds__.
inline void register_launch_bounds(const std::string& kernel, int max_threads) {
  detail::state().launch_bounds[kernel] = max_threads;
}

// Bytes of the kernel parameters, laid out as CUDA lays them out (each at its alignment).
template <typename... P>
constexpr size_t param_bytes() {
  size_t offset = 0;
  ((offset = (offset + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return offset;
}

inline size_t static_shared_bytes() {
  if (__start_mpl_emu_shared == nullptr) return 0;
  return static_cast<size_t>(__stop_mpl_emu_shared - __start_mpl_emu_shared);
}

// ------------------------------------------------------------------ device-side API

namespace detail {

inline void block_barrier(int predicate) {
  Fiber& me = self();
  me.wait = Wait::block;
  me.predicate = predicate;
  yield_to_scheduler();
}

// Lanes of `mask` meet; each hands in `value`; returns the warp generation to read from.
inline unsigned warp_meet(unsigned mask, uint64_t value) {
  State& s = state();
  Fiber& me = self();
  const int lane = me.linear % kWarpSize;
  if (!(mask >> lane & 1u)) fail(std::string(s.kernel) + ": a warp intrinsic was called by lane " +
                                 std::to_string(lane) + " that its mask does not name");
  Warp& w = s.warps[me.linear / kWarpSize];
  w.slots[(w.gen + 1) & 1][lane] = value;
  me.wait = Wait::warp;
  me.warp_mask = mask;
  yield_to_scheduler();
  return me.gen;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp intrinsics move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
inline T shuffle_from(unsigned mask, T v, int source_lane_in_warp) {
  const unsigned gen = warp_meet(mask, to_bits(v));
  State& s = state();
  Fiber& me = self();
  const Warp& w = s.warps[me.linear / kWarpSize];
  return from_bits<T>(w.slots[gen & 1][source_lane_in_warp]);
}

}  // namespace detail
}  // namespace mpl_emu

#define threadIdx (::mpl_emu::detail::state().current->tid)
#define blockIdx (static_cast<const uint3&>(::mpl_emu::detail::block_index()))
#define blockDim (static_cast<const uint3&>(::mpl_emu::detail::block_dim()))
#define gridDim (static_cast<const uint3&>(::mpl_emu::detail::grid_dim()))

namespace mpl_emu::detail {
inline const uint3& block_index() { return reinterpret_cast<const uint3&>(state().block_idx); }
inline const uint3& block_dim() { return reinterpret_cast<const uint3&>(state().block); }
inline const uint3& grid_dim() { return reinterpret_cast<const uint3&>(state().grid); }
static_assert(sizeof(dim3) == sizeof(uint3));
}  // namespace mpl_emu::detail

inline void __syncthreads() { ::mpl_emu::detail::block_barrier(0); }
inline int __syncthreads_or(int p) {
  ::mpl_emu::detail::block_barrier(p != 0);
  return ::mpl_emu::detail::self().predicate;
}
inline int __syncthreads_and(int p) {
  ::mpl_emu::detail::block_barrier(p != 0);
  return ::mpl_emu::detail::self().predicate >> 1 & 1;
}
inline int __syncthreads_count(int p) {
  ::mpl_emu::detail::block_barrier(p != 0);
  return ::mpl_emu::detail::self().predicate >> 2;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::mpl_emu::detail::warp_meet(mask, 0); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::mpl_emu::detail::self().linear % 32;
  const int base = lane / width * width;
  return ::mpl_emu::detail::shuffle_from(mask, v, base + (src % width + width) % width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::mpl_emu::detail::self().linear % 32;
  const int in_segment = lane % width;
  const int src = in_segment + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return ::mpl_emu::detail::shuffle_from(mask, v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::mpl_emu::detail::self().linear % 32;
  const int in_segment = lane % width;
  const int src = in_segment >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::mpl_emu::detail::shuffle_from(mask, v, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::mpl_emu::detail::self().linear % 32;
  const int src = lane ^ lane_mask;
  return ::mpl_emu::detail::shuffle_from(mask, v, src / width == lane / width ? src : lane);
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  const unsigned gen = ::mpl_emu::detail::warp_meet(mask, p != 0);
  const auto& w = ::mpl_emu::detail::state().warps[::mpl_emu::detail::self().linear / 32];
  unsigned out = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && w.slots[gen & 1][lane]) out |= 1u << lane;
  return out;
}
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }
inline int __all_sync(unsigned mask, int p) { return __ballot_sync(mask, p) == mask; }

// Atomics: a fiber is never preempted inside one.
template <typename T>
inline T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}
template <typename T>
inline T atomicSub(T* address, T v) {
  const T old = *address;
  *address = old - v;
  return old;
}
template <typename T>
inline T atomicMin(T* address, T v) {
  const T old = *address;
  *address = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T v) {
  const T old = *address;
  *address = v > old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* address, T v) {
  const T old = *address;
  *address = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T v) {
  const T old = *address;
  if (old == compare) *address = v;
  return old;
}
template <typename T>
inline T atomicOr(T* address, T v) {
  const T old = *address;
  *address = old | v;
  return old;
}
template <typename T>
inline T atomicAnd(T* address, T v) {
  const T old = *address;
  *address = old & v;
  return old;
}

// Round-to-nearest intrinsics: the host's IEEE operations (never contracted: separate calls).
__attribute__((noinline)) inline float __fadd_rn(float a, float b) { return a + b; }
__attribute__((noinline)) inline float __fsub_rn(float a, float b) { return a - b; }
__attribute__((noinline)) inline float __fmul_rn(float a, float b) { return a * b; }
__attribute__((noinline)) inline float __fdiv_rn(float a, float b) { return a / b; }
__attribute__((noinline)) inline double __dadd_rn(double a, double b) { return a + b; }
__attribute__((noinline)) inline double __dsub_rn(double a, double b) { return a - b; }
__attribute__((noinline)) inline double __dmul_rn(double a, double b) { return a * b; }
__attribute__((noinline)) inline double __ddiv_rn(double a, double b) { return a / b; }
using std::isfinite;
using std::isinf;
using std::isnan;
// CUDA's min/max overloads for integers and floats of one type, plus mixed int/int64 calls.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ------------------------------------------------------------------ launch

namespace mpl_emu {
namespace detail {

inline void fiber_entry() {
  State& s = state();
  Fiber* me = s.current;
  try {
    me->body(me->arg);
  } catch (const std::exception& e) {
    if (s.error.empty()) s.error = e.what();
  }
  me->wait = Wait::done;
  switch_context(me->ctx, s.scheduler);
  __builtin_unreachable();  // a finished fiber is never resumed
}

// A fresh fiber on `stack` that starts in fiber_entry.
inline void start_context(Context& c, char* stack, size_t bytes) {
#if MPL_EMU_FAST_SWITCH
  // What mpl_emu_switch pops: control words, six registers, then fiber_entry as the return
  // address, placed so that fiber_entry starts with the stack aligned as after a call.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15)) - 2;
  top[0] = reinterpret_cast<uint64_t>(&fiber_entry);
  top[1] = 0;  // no caller above fiber_entry
  uint64_t* sp = top - 7;
  uint32_t mxcsr = 0;
  uint16_t fpu_cw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  std::memset(sp, 0, 7 * sizeof(uint64_t));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpu_cw, 2);
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fiber_entry, 0);
#endif
}

inline void on_fault(int sig, siginfo_t* info, void*) {
  State& s = state();
  if (!s.in_kernel) {
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  s.in_kernel = 0;
  s.fault_addr = info->si_addr;
  siglongjmp(s.fault_jump, 1);
}

inline std::string fault_message(const State& s) {
  const char* a = static_cast<const char*>(s.fault_addr);
  std::string where = std::string(s.kernel) + ", block (" + std::to_string(s.block_idx.x) + "," +
                      std::to_string(s.block_idx.y) + "," + std::to_string(s.block_idx.z) + ")";
  if (s.dyn_map != nullptr && a >= s.dyn_ptr + s.dyn_bytes && a < s.dyn_map + s.dyn_map_bytes) {
    return where + ": dynamic shared memory accessed at byte " + std::to_string(a - s.dyn_ptr) +
           " beyond the " + std::to_string(s.dyn_bytes) + " bytes the launch declared";
  }
  return where + ": segmentation fault at address " + std::to_string(reinterpret_cast<uintptr_t>(a)) +
         " (an out-of-range global-memory access)";
}

// Releases whatever barrier every waiting thread has reached; false if nothing can move.
inline bool release_barriers(State& s, std::vector<int>& ready) {
  const int n = static_cast<int>(s.fibers.size());
  // Warps first: lanes that all wait at a warp intrinsic with the same mask go on.
  bool released = false;
  for (size_t w = 0; w < s.warps.size(); ++w) {
    const int first = static_cast<int>(w) * kWarpSize;
    const int last = std::min(first + kWarpSize, n);
    unsigned waiting = 0, mask = 0;
    bool any = false;
    for (int i = first; i < last; ++i) {
      if (s.fibers[i].wait == Wait::warp) {
        waiting |= 1u << (i - first);
        mask = s.fibers[i].warp_mask;
        any = true;
      }
    }
    if (!any || waiting != mask) continue;
    Warp& warp = s.warps[w];
    ++warp.gen;
    for (int i = first; i < last; ++i) {
      if (s.fibers[i].wait == Wait::warp) {
        s.fibers[i].wait = Wait::none;
        s.fibers[i].gen = warp.gen;
        ready.push_back(i);
      }
    }
    released = true;
  }
  if (released) return true;
  int live = 0, at_block = 0, any_or = 0, all_and = 1, count = 0;
  for (auto& f : s.fibers) {
    if (f.wait == Wait::done) continue;
    ++live;
    if (f.wait == Wait::block) {
      ++at_block;
      any_or |= f.predicate;
      all_and &= f.predicate;
      count += f.predicate;
    }
  }
  if (live > 0 && at_block == live) {
    const int result = any_or | (all_and << 1) | (count << 2);
    for (int i = 0; i < n; ++i) {
      if (s.fibers[i].wait == Wait::block) {
        s.fibers[i].wait = Wait::none;
        s.fibers[i].predicate = result;
        ready.push_back(i);
      }
    }
    return true;
  }
  if (live == 0) return false;
  // Stuck: name what the threads wait for.
  std::string what;
  for (size_t w = 0; w < s.warps.size(); ++w) {
    const int first = static_cast<int>(w) * kWarpSize;
    for (int i = first; i < std::min(first + kWarpSize, n); ++i) {
      const Fiber& f = s.fibers[i];
      if (f.wait == Wait::warp) {
        unsigned waiting = 0;
        for (int j = first; j < std::min(first + kWarpSize, n); ++j)
          if (s.fibers[j].wait == Wait::warp) waiting |= 1u << (j - first);
        what = "warp " + std::to_string(w) + " waits at a warp intrinsic with mask " + std::to_string(f.warp_mask) +
               " but only lanes " + std::to_string(waiting) + " reached it (a lane returned, does not exist, "
               "or waits at __syncthreads)";
        break;
      }
    }
    if (!what.empty()) break;
  }
  if (what.empty()) what = "some threads wait at __syncthreads() that other live threads never reach";
  fail(std::string(s.kernel) + ", block (" + std::to_string(s.block_idx.x) + "): deadlock: " + what);
}

inline void run_block(State& s) {
  const int n = static_cast<int>(s.fibers.size());
  // Uninitialised shared memory: seeded garbage.
  const size_t static_bytes = static_shared_bytes();
  for (size_t i = 0; i < static_bytes; ++i) __start_mpl_emu_shared[i] = static_cast<char>(s.rng());
  for (size_t i = 0; i < s.dyn_bytes; ++i) s.dyn_ptr[i] = static_cast<char>(s.rng());
  for (auto& w : s.warps) w.gen = 0;
  std::vector<int> ready(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.wait = Wait::none;
    start_context(f.ctx, s.stacks[i], kFiberStack);
    ready[i] = i;
  }
  while (true) {
    if (ready.empty()) {
      if (!release_barriers(s, ready)) break;
      continue;
    }
    const size_t pick = s.rng() % ready.size();
    const int i = ready[pick];
    ready[pick] = ready.back();
    ready.pop_back();
    s.current = &s.fibers[i];
    switch_context(s.scheduler, s.fibers[i].ctx);
    s.current = nullptr;
    if (!s.error.empty()) fail(s.error);
  }
}

template <typename Tuple, typename Kernel>
struct ThreadArgs {
  Kernel kernel;
  Tuple args;  // each thread's own copy: kernels may modify their by-value parameters
  static void run(void* self) {
    auto* me = static_cast<ThreadArgs*>(self);
    std::apply(me->kernel, me->args);
  }
};

inline std::string base_name(const char* expr) {
  std::string name(expr);
  const size_t angle = name.find('<');
  if (angle != std::string::npos) name.resize(angle);
  while (!name.empty() && name.back() == ' ') name.pop_back();
  const size_t colon = name.rfind("::");
  if (colon != std::string::npos) name = name.substr(colon + 2);
  return name;
}

inline void check_config(State& s, const char* name, dim3 grid, dim3 block, size_t dyn, size_t params) {
  const std::string k = std::string(name) + ": ";
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    fail(k + "launch with a zero grid or block dimension (grid " + std::to_string(grid.x) + "x" +
         std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" +
         std::to_string(block.y) + "x" + std::to_string(block.z) + "): invalid configuration on a GPU");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > kMaxThreadsPerBlock)
    fail(k + std::to_string(threads) + " threads per block, more than a GPU runs (1024)");
  const auto bound = s.launch_bounds.find(base_name(name));
  if (bound != s.launch_bounds.end() && threads > static_cast<uint64_t>(bound->second))
    fail(k + std::to_string(threads) + " threads per block, more than its __launch_bounds__(" +
         std::to_string(bound->second) + ")");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    fail(k + "grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) +
         " is beyond a GPU's limits");
  const size_t shared = static_shared_bytes() + dyn;
  if (shared > kMaxSharedBytes)
    fail(k + std::to_string(shared) + " bytes of shared memory (static " + std::to_string(static_shared_bytes()) +
         " + dynamic " + std::to_string(dyn) + "), more than 48 KB without an opt-in");
  if (params > kMaxParamBytes)
    fail(k + std::to_string(params) + " bytes of kernel parameters, more than the " +
         std::to_string(kMaxParamBytes) + " our argument structs are sized for");
}

inline void prepare(State& s, dim3 block, size_t dyn) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  while (static_cast<int>(s.stacks.size()) < n) {
    void* stack = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED) fail("mpl_emu: cannot map a fiber stack");
    s.stacks.push_back(static_cast<char*>(stack));
  }
  s.fibers.assign(n, Fiber{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                  static_cast<unsigned>(i / (block.x * block.y))};
  }
  s.warps.assign((n + kWarpSize - 1) / kWarpSize, Warp{});
  // Dynamic shared memory ends exactly at an inaccessible page.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t data_pages = (dyn + page - 1) / page;
  s.dyn_map_bytes = (data_pages + 1) * page;
  void* map = mmap(nullptr, s.dyn_map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map == MAP_FAILED) fail("mpl_emu: cannot map dynamic shared memory");
  s.dyn_map = static_cast<char*>(map);
  mprotect(s.dyn_map + data_pages * page, page, PROT_NONE);
  s.dyn_bytes = dyn;
  s.dyn_ptr = s.dyn_map + data_pages * page - dyn;
}

inline void release(State& s) {
  if (s.dyn_map != nullptr) munmap(s.dyn_map, s.dyn_map_bytes);
  s.dyn_map = nullptr;
  s.dyn_ptr = nullptr;
  s.dyn_bytes = 0;
  s.fibers.clear();
  s.current = nullptr;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t dyn;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    State& s = state();
    check_config(s, name, grid, block, dyn, param_bytes<P...>());
    using Tuple = std::tuple<std::decay_t<P>...>;
    const Tuple packed(static_cast<std::decay_t<P>>(args)...);  // CUDA copies the arguments
    s.kernel = name;
    s.grid = grid;
    s.block = block;
    s.error.clear();
    prepare(s, block, dyn);
    std::vector<ThreadArgs<Tuple, void (*)(P...)>> per_thread(s.fibers.size(), {kernel, packed});
    // Blocks in a seeded random order.
    std::vector<uint64_t> order(uint64_t(grid.x) * grid.y * grid.z);
    for (uint64_t b = 0; b < order.size(); ++b) order[b] = b;
    std::shuffle(order.begin(), order.end(), s.rng);
    struct sigaction action {}, old_segv {}, old_bus {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    s.alt_stack.resize(1 << 16);
    stack_t alt{}, old_alt{};
    alt.ss_sp = s.alt_stack.data();
    alt.ss_size = s.alt_stack.size();
    sigaltstack(&alt, &old_alt);
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGBUS, &action, &old_bus);
    std::string failure;
    if (sigsetjmp(s.fault_jump, 1) != 0) {
      failure = fault_message(s);
    } else {
      try {
        for (uint64_t b : order) {
          s.block_idx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                             static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y)));
          for (size_t i = 0; i < s.fibers.size(); ++i) {
            per_thread[i] = {kernel, packed};
            s.fibers[i].body = &ThreadArgs<Tuple, void (*)(P...)>::run;
            s.fibers[i].arg = &per_thread[i];
          }
          s.in_kernel = 1;
          run_block(s);
          s.in_kernel = 0;
        }
      } catch (const std::exception& e) {
        failure = e.what();
      }
    }
    s.in_kernel = 0;
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
    release(s);
    if (!failure.empty()) fail(failure);
  }
};

}  // namespace detail

template <typename... P>
detail::Launch<P...> make_launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dyn) {
  return {kernel, name, grid, block, dyn};
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::state().dyn_ptr);
}

}  // namespace mpl_emu

// -fsanitize=bounds(-strict) reports an out-of-range array subscript to these handlers (no UBSan
// runtime is linked); they turn it into an emulator error. Expand once, in the emulated build's
// one translation unit.
namespace mpl_emu::detail {
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
[[noreturn]] inline void out_of_bounds(void* data, uintptr_t index) {
  const auto* where = static_cast<const SourceLocation*>(data);  // first member of UBSan's record
  fail(std::string(state().kernel) + ": array index " + std::to_string(static_cast<intptr_t>(index)) +
       " out of bounds at " + where->file + ":" + std::to_string(where->line) +
       " (a __shared__ or local array too small)");
}
}  // namespace mpl_emu::detail

#define MPL_EMU_DEFINE_BOUNDS_HANDLER                                                             \
  extern "C" void __ubsan_handle_out_of_bounds(void* data, uintptr_t index) {                     \
    ::mpl_emu::detail::out_of_bounds(data, index);                                                \
  }                                                                                               \
  extern "C" void __ubsan_handle_out_of_bounds_abort(void* data, uintptr_t index) {               \
    ::mpl_emu::detail::out_of_bounds(data, index);                                                \
  }
