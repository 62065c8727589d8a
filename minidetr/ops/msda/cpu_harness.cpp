// Run the CUDA kernels of cupy_kernels.cu on the CPU, unchanged, to test their arithmetic
// on a machine without a GPU.
//
// Build (cpu_harness.py does this):
//   g++ -std=c++17 -O1 -fPIC -shared -fno-strict-aliasing cpu_harness.cpp -o libmsda_harness.so
// and call harness_launch("msda_forward<float, 4>", grid, block, params) through ctypes,
// where params[i] points to the i-th kernel argument, as with cuLaunchKernel.
//
// How CUDA is emulated
//   * __global__ / __device__ / __forceinline__ become nothing / inline: the kernels are
//     plain C++ templates.
//   * A launch runs the blocks one after another. The threads of a block are fibers
//     (ucontext coroutines) on one OS thread, run round-robin. A fiber runs until it
//     finishes or reaches a warp collective, so between collectives each thread runs
//     alone: atomicAdd is a plain read-modify-write and cannot race.
//   * __shfl_down_sync(mask, x, delta, width) is emulated exactly: every lane named in
//     mask publishes x in its warp's exchange slots and waits until all of them have;
//     then each lane reads lane + delta (its own x if that falls past its width-segment
//     of the warp), and all wait again before a slot may be reused. The warp thus runs
//     in lockstep at every shuffle, as on the GPU. A lane named in mask that has exited,
//     or a missing lane, is reported as an error (on a GPU it is undefined behaviour),
//     and so is a deadlock (no fiber can make progress).
//   * threadIdx, blockIdx, blockDim, gridDim are read from the running fiber / launch.
//   * floor() is std::floor. Only what cupy_kernels.cu uses is provided.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ucontext.h>

// ------------------------------------------------------------------------- CUDA keywords
#define __global__
#define __device__
#define __forceinline__ inline

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

using std::floor;

namespace harness {

constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 64 * 1024;

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    dim3 thread_idx;
    bool done = false;
};

// One warp's shuffle state: the published values and a generation-counted barrier.
struct Warp {
    unsigned long long slot[kWarpSize];   // raw bytes of each lane's value (<= 8 bytes)
    unsigned mask = 0;                    // the lanes the pending barrier waits for
    int arrived = 0;
    long generation = 0;
};

struct Launch {
    dim3 grid, block, block_idx;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    ucontext_t scheduler;
    int current = 0;
    long progress = 0;                 // bumped on every barrier arrival or thread exit
    std::function<void()> body;        // the kernel call with its arguments bound
    std::string error;
};

Launch* g_launch = nullptr;            // the launch being run (one at a time)
std::string g_last_error;

inline Fiber& me() { return g_launch->fibers[g_launch->current]; }

// Hand control back to the scheduler; returns when this fiber is resumed.
inline void yield() {
    Fiber& f = me();
    swapcontext(&f.context, &g_launch->scheduler);
}

[[noreturn]] inline void fail(const std::string& message) {
    if (g_launch->error.empty()) g_launch->error = message;
    for (;;) yield();                  // never resumed: the launch stops on an error
}

// Wait until every lane in mask of this warp has arrived here.
inline void warp_barrier(Warp& w, unsigned mask, int warp) {
    const int expected = __builtin_popcount(mask);
    for (int lane = 0; lane < kWarpSize; ++lane) {
        if (!((mask >> lane) & 1u)) continue;
        const int t = warp * kWarpSize + lane;
        if (t >= static_cast<int>(g_launch->fibers.size()) || g_launch->fibers[t].done) {
            fail("__shfl_down_sync: lane " + std::to_string(lane) + " of warp " +
                 std::to_string(warp) + " is named in the mask but has exited or does not exist");
        }
    }
    const long generation = w.generation;
    ++g_launch->progress;
    w.mask = mask;
    if (++w.arrived == expected) {
        w.arrived = 0;
        ++w.generation;
        return;
    }
    while (w.generation == generation) yield();
}

void fiber_entry() {
    g_launch->body();
    me().done = true;
    ++g_launch->progress;
    // returning switches to uc_link, the scheduler
}

// Run one block: all its threads as fibers, round-robin, until all are done.
bool run_block() {
    Launch& L = *g_launch;
    const int threads = static_cast<int>(L.block.x * L.block.y * L.block.z);
    for (int t = 0; t < threads; ++t) {
        Fiber& f = L.fibers[t];
        f.done = false;
        f.thread_idx.x = t % L.block.x;
        f.thread_idx.y = (t / L.block.x) % L.block.y;
        f.thread_idx.z = t / (L.block.x * L.block.y);
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = f.stack.size();
        f.context.uc_link = &L.scheduler;
        makecontext(&f.context, fiber_entry, 0);
    }
    for (Warp& w : L.warps) w = Warp();
    int remaining = threads;
    while (remaining > 0) {
        const long before = L.progress;
        for (int t = 0; t < threads; ++t) {
            if (L.fibers[t].done) continue;
            L.current = t;
            swapcontext(&L.scheduler, &L.fibers[t].context);
            if (!L.error.empty()) return false;
            if (!L.fibers[t].done) continue;
            --remaining;
            const Warp& w = L.warps[t / kWarpSize];
            if (w.arrived > 0 && ((w.mask >> (t % kWarpSize)) & 1u)) {
                L.error = "lane " + std::to_string(t % kWarpSize) + " of warp " +
                          std::to_string(t / kWarpSize) + " exited while its warp waits for "
                          "it at a __shfl_down_sync whose mask names it";
                return false;
            }
        }
        if (remaining > 0 && L.progress == before) {
            L.error = "deadlock: every remaining thread waits at a warp collective";
            return false;
        }
    }
    return true;
}

}  // namespace harness

#define threadIdx (harness::me().thread_idx)
#define blockIdx (harness::g_launch->block_idx)
#define blockDim (harness::g_launch->block)
#define gridDim (harness::g_launch->grid)

template <typename T>
T atomicAdd(T* address, T value) {     // fibers never interleave here: a plain add
    const T old = *address;
    *address = old + value;
    return old;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
    using namespace harness;
    const int linear = static_cast<int>(threadIdx.x +
                                        blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    const int warp = linear / kWarpSize, lane = linear % kWarpSize;
    if (!((mask >> lane) & 1u)) fail("__shfl_down_sync called by a lane outside its mask");
    if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
        fail("__shfl_down_sync: width must be a power of two <= 32");
    }
    Warp& w = g_launch->warps[warp];
    std::memcpy(&w.slot[lane], &value, sizeof(T));
    warp_barrier(w, mask, warp);                      // every lane has published
    T result = value;
    const int source = lane + static_cast<int>(delta);
    const int segment_end = (lane / width + 1) * width;
    if (source < segment_end) {
        if (!((mask >> source) & 1u)) fail("__shfl_down_sync reads a lane outside the mask");
        std::memcpy(&result, &w.slot[source], sizeof(T));
    }
    warp_barrier(w, mask, warp);                      // every lane has read
    return result;
}

// ------------------------------------------------------------------------- the kernels
#include "cupy_kernels.cu"

// ------------------------------------------------------------------------- self-tests
// Two kernels that test the emulation itself (tests/ops/test_msda_gpu.py): what every lane
// receives from a shuffle, and that a lane leaving before a full-mask shuffle is caught.
template <typename T>
__global__ void harness_shuffle_probe(T* out, int delta, int width) {
    const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    out[t] = __shfl_down_sync(0xffffffffu, static_cast<T>(t) + T(0.5), delta, width);
}

__global__ void harness_early_exit_probe(int* out, int lanes_that_stay) {
    if (static_cast<int>(threadIdx.x) % 32 >= lanes_that_stay) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1, 32);
}

// ------------------------------------------------------------------------- launching
namespace harness {

// Call kernel(*params[0], *params[1], ...) with each argument cast to its parameter type.
template <typename... Args, std::size_t... I>
void call_with_params(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<Args>*>(params[I])...);
}

using Binder = std::function<std::function<void()>(void**)>;

template <typename... Args>
Binder binder(void (*kernel)(Args...)) {
    return [kernel](void** params) {
        return std::function<void()>([kernel, params] {
            call_with_params(kernel, params, std::index_sequence_for<Args...>{});
        });
    };
}

// The instantiations, named exactly as cupy_backend.kernel_names() names them.
#define HARNESS_KERNEL(...) {#__VA_ARGS__, binder(&__VA_ARGS__)}
const std::map<std::string, Binder>& kernels() {
    static const std::map<std::string, Binder> table = {
        HARNESS_KERNEL(msda_forward<float, 1>),
        HARNESS_KERNEL(msda_forward<float, 2>),
        HARNESS_KERNEL(msda_forward<float, 4>),
        HARNESS_KERNEL(msda_forward<double, 1>),
        HARNESS_KERNEL(msda_forward<double, 2>),
        HARNESS_KERNEL(msda_backward<float, 1>),
        HARNESS_KERNEL(msda_backward<float, 2>),
        HARNESS_KERNEL(msda_backward<float, 4>),
        HARNESS_KERNEL(msda_backward<double, 1>),
        HARNESS_KERNEL(msda_backward<double, 2>),
        HARNESS_KERNEL(msda_gather_grad_value<float, 1>),
        HARNESS_KERNEL(msda_gather_grad_value<float, 2>),
        HARNESS_KERNEL(msda_gather_grad_value<float, 4>),
        HARNESS_KERNEL(msda_gather_grad_value<double, 1>),
        HARNESS_KERNEL(msda_gather_grad_value<double, 2>),
        HARNESS_KERNEL(msda_value_contributions<float>),
        HARNESS_KERNEL(msda_value_contributions<double>),
        HARNESS_KERNEL(harness_shuffle_probe<int>),
        HARNESS_KERNEL(harness_shuffle_probe<double>),
        HARNESS_KERNEL(harness_early_exit_probe),
    };
    return table;
}

}  // namespace harness

extern "C" {

// Run kernel `name` on a 1-d grid of `grid` blocks of `block` threads.
// Returns 0 on success, otherwise -1 and harness_last_error() says why.
int harness_launch(const char* name, int grid, int block, void** params) {
    using namespace harness;
    const auto found = kernels().find(name);
    if (found == kernels().end()) {
        g_last_error = std::string("no kernel named '") + name + "' in the harness";
        return -1;
    }
    if (grid < 0 || block <= 0 || block > 1024) {
        g_last_error = "bad launch configuration";
        return -1;
    }
    Launch launch;
    launch.grid.x = grid;
    launch.block.x = block;
    launch.fibers.resize(block);
    for (Fiber& f : launch.fibers) f.stack.resize(kStackBytes);
    launch.warps.resize((block + kWarpSize - 1) / kWarpSize);
    launch.body = found->second(params);
    g_launch = &launch;
    bool ok = true;
    for (int b = 0; b < grid && ok; ++b) {
        launch.block_idx.x = b;
        ok = run_block();
    }
    g_launch = nullptr;
    if (!ok) {
        g_last_error = std::string(name) + ": " + launch.error;
        return -1;
    }
    return 0;
}

const char* harness_last_error() { return harness::g_last_error.c_str(); }

}  // extern "C"
