// Multi-scale deformable attention: the CUDA C kernels of the "cupy" backend.
//
// Loaded by cupy_backend.py with cupy.RawModule (NVRTC), which instantiates the templates
// below for T = float / double and VEC = the vector width (name expressions such as
// "msda_forward<float, 4>"). The same file is compiled by nvcc in the tests (sm_80, sm_90)
// and run on the CPU by cpu_harness.cpp, which defines the few CUDA built-ins used here.
// It therefore includes no header: everything it needs is a CUDA built-in.
// docs/gpu-kernels.md explains the design; in short:
//
// Thread-to-work mapping
//   One *group* of G consecutive threads of a warp (G = 1, 2, ..., 32, a power of two)
//   works on one head of one query, (n, q, m): a "head" for short, flat index
//   ((n * Lq + q) * M + m). Lane j of the group owns the channels
//   [j*VEC, j*VEC + VEC) + i*G*VEC, i = 0, 1, ..., so D need not be a power of two
//   and may exceed 32 (the host picks G = min(32, next_pow2(ceil(D / VEC)))).
//   The bilinear set-up of a sampling point (floor, fractions, bounds) is computed once
//   per lane, not once per channel, and every group sits inside one warp.
//
// Memory layout and coalescing (all arrays C-contiguous)
//   value (N, S, M, D): one (pixel, head) row is D contiguous scalars, so the G lanes of a
//   group read a corner's row as consecutive VEC-wide loads (a 128-byte line for D = 32,
//   float32). Locations and weights of one head are contiguous and read by all lanes of
//   the group at the same address (a broadcast). output (N, Lq, M, D) is written like
//   value is read.
//
// Vectorised loads: VEC = 4 (float) or 2 (double) scalars per load/store (16 bytes) when D
//   is a multiple of VEC and the arrays are 16-byte aligned (the host checks both),
//   otherwise 2 or 1.
//
// Backward
//   grad_value: each lane adds a * w_corner * g to its channels of the four corner rows
//   with atomicAdd (msda_backward, atomic_grad_value = 1), or, deterministically,
//   msda_value_contributions + a sort on the host + msda_gather_grad_value, which sums
//   the contributions of every value row in a fixed order, without atomics.
//   grad_sampling_locations and grad_attention_weights: per point, each lane sums its
//   channels' terms; the group adds its lanes' sums with __shfl_down_sync (group_sum)
//   and the group's first lane writes the three results (one owner: no atomics).
//
// Sampling convention (as the NumPy reference, reference.py): w_im = x * W - 0.5,
// h_im = y * H - 0.5, bilinear on the four neighbours floor / floor + 1, neighbours
// outside the map contribute zero, and a point is skipped unless -1 < h_im < H and
// -1 < w_im < W.
//
// Index arithmetic that can exceed 2^31 (offsets into value, output, gradients) is done
// in 64-bit integers; sizes are passed as int.

using index_t = long long;

// ------------------------------------------------------------------------- vector loads
// VEC scalars that the compiler moves with one instruction: alignas makes the struct
// 4*VEC (float) or 8*VEC (double) bytes aligned, so a load of it is ld.global.v{VEC}.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& x) {
    *reinterpret_cast<Vec<T, VEC>*>(p) = x;
}

// ------------------------------------------------------------------------- reduction
// The sum of x over the G lanes of this thread's group, in the group's first lane.
// Tree reduction with warp shuffles: after the step with offset o, lane i holds the sum
// of lanes i .. i+2o-1 of its group. With width = G a lane never reads across its
// group's edge. Every lane of the warp must call this (full mask), with the same G.
template <typename T>
__device__ __forceinline__ T group_sum(T x, int group_size) {
    for (int offset = group_size / 2; offset > 0; offset /= 2) {
        x += __shfl_down_sync(0xffffffffu, x, offset, group_size);
    }
    return x;
}

// ------------------------------------------------------------------------- bilinear set-up
// The four neighbours of one sampling point, in the reference's order
// (h0, w0), (h0, w1), (h1, w0), (h1, w1).
template <typename T>
struct Bilinear {
    bool inside;      // false: the point lies outside (-1, H) x (-1, W) and is skipped
    index_t row[4];   // the neighbour's pixel row s in [0, S) of value, or -1 if outside
    T weight[4];      // bilinear weights (1-lh)(1-lw), (1-lh)lw, lh(1-lw), lh lw
    T lh, lw;         // fractional parts of h_im and w_im
};

template <typename T>
__device__ __forceinline__ Bilinear<T> locate(T x, T y, int H, int W, index_t level_start) {
    Bilinear<T> b;
    const T w_im = x * W - T(0.5);   // pixel coordinates: pixel j has its centre at j + 0.5
    const T h_im = y * H - T(0.5);
    b.inside = h_im > T(-1) && h_im < T(H) && w_im > T(-1) && w_im < T(W);
    if (!b.inside) {                 // also catches NaN; keeps huge values from the cast
        for (int c = 0; c < 4; ++c) { b.row[c] = -1; b.weight[c] = T(0); }
        b.lh = b.lw = T(0);
        return b;
    }
    const T h0f = floor(h_im);
    const T w0f = floor(w_im);
    const int h0 = static_cast<int>(h0f);
    const int w0 = static_cast<int>(w0f);
    b.lh = h_im - h0f;
    b.lw = w_im - w0f;
    const T hh = T(1) - b.lh;
    const T hw = T(1) - b.lw;
    const bool top = h0 >= 0, bottom = h0 + 1 <= H - 1;
    const bool left = w0 >= 0, right = w0 + 1 <= W - 1;
    const index_t base = level_start + static_cast<index_t>(h0) * W + w0;
    b.row[0] = (top && left) ? base : -1;
    b.row[1] = (top && right) ? base + 1 : -1;
    b.row[2] = (bottom && left) ? base + W : -1;
    b.row[3] = (bottom && right) ? base + W + 1 : -1;
    b.weight[0] = hh * hw;
    b.weight[1] = hh * b.lw;
    b.weight[2] = b.lh * hw;
    b.weight[3] = b.lh * b.lw;
    return b;
}

// ------------------------------------------------------------------------- forward
// output[n, q, m, :] = sum_{l, k} A[n, q, m, l, k] * bilinear(value_l[n, :, m, :], loc).
// Grid: ceil(N * Lq * M * G / blockDim.x) blocks; one group of G lanes per head.
template <typename T, int VEC>
__global__ void msda_forward(const T* __restrict__ value,                 // (N, S, M, D)
                             const index_t* __restrict__ spatial_shapes,  // (L, 2)
                             const index_t* __restrict__ level_start_index,  // (L,)
                             const T* __restrict__ sampling_locations,    // (N, Lq, M, L, K, 2)
                             const T* __restrict__ attention_weights,     // (N, Lq, M, L, K)
                             T* __restrict__ output,                      // (N, Lq, M, D)
                             int N, int S, int M, int D, int Lq, int L, int K,
                             int group_size) {
    const index_t thread = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const index_t head = thread / group_size;                  // flat (n, q, m)
    const int lane = static_cast<int>(thread % group_size);
    if (head >= static_cast<index_t>(N) * Lq * M) return;      // no shuffles below
    const int m = static_cast<int>(head % M);
    const index_t n = head / (static_cast<index_t>(Lq) * M);
    const index_t row_stride = static_cast<index_t>(M) * D;    // from pixel s to s + 1
    const T* value_nm = value + n * S * row_stride + static_cast<index_t>(m) * D;
    const T* loc = sampling_locations + head * L * K * 2;      // (L, K, 2) of this head
    const T* attn = attention_weights + head * L * K;          // (L, K)

    for (int c = lane * VEC; c < D; c += group_size * VEC) {   // this lane's channels
        T acc[VEC];
        for (int j = 0; j < VEC; ++j) acc[j] = T(0);
        for (int l = 0; l < L; ++l) {
            const int H = static_cast<int>(spatial_shapes[2 * l]);
            const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
            const index_t start = level_start_index[l];
            for (int k = 0; k < K; ++k) {
                const int p = l * K + k;
                const Bilinear<T> b = locate(loc[2 * p], loc[2 * p + 1], H, W, start);
                if (!b.inside) continue;
                T sample[VEC];                                 // bilinear(value_l)[c:c+VEC]
                for (int j = 0; j < VEC; ++j) sample[j] = T(0);
                for (int corner = 0; corner < 4; ++corner) {
                    if (b.row[corner] < 0) continue;           // zero padding
                    const T* row = value_nm + b.row[corner] * row_stride;
                    const Vec<T, VEC> v = load_vec<T, VEC>(row + c);
                    for (int j = 0; j < VEC; ++j) sample[j] += b.weight[corner] * v.v[j];
                }
                const T a = attn[p];
                for (int j = 0; j < VEC; ++j) acc[j] += a * sample[j];
            }
        }
        Vec<T, VEC> out;
        for (int j = 0; j < VEC; ++j) out.v[j] = acc[j];
        store_vec<T, VEC>(output + head * D + c, out);
    }
}

// ------------------------------------------------------------------------- backward
// For one point (l, k) of head (n, q, m) with g = grad_output[n, q, m, :], a = A and the
// neighbours v_c with weights w_c (c = corner):
//   grad_value[row_c, :]  += a * w_c * g            (atomicAdd, if atomic_grad_value)
//   grad_attention_weight  = sum_c w_c (g . v_c)
//   grad_location_x        = W * a * sum_c (d w_c / d w_im) (g . v_c)
//   grad_location_y        = H * a * sum_c (d w_c / d h_im) (g . v_c)
// with d w / d w_im = (-(1-lh), 1-lh, -lh, lh) and d w / d h_im = (-(1-lw), -lw, 1-lw, lw).
// The dot products g . v_c run over the D channels: each lane sums its own channels,
// then group_sum adds the lanes. grad_value must be zero on entry.
// With atomic_grad_value = 0, grad_value is left alone (see msda_gather_grad_value).
template <typename T, int VEC>
__global__ void msda_backward(const T* __restrict__ grad_output,          // (N, Lq, M, D)
                              const T* __restrict__ value,                // (N, S, M, D)
                              const index_t* __restrict__ spatial_shapes,
                              const index_t* __restrict__ level_start_index,
                              const T* __restrict__ sampling_locations,
                              const T* __restrict__ attention_weights,
                              T* __restrict__ grad_value,                 // (N, S, M, D)
                              T* __restrict__ grad_sampling_locations,    // (N, Lq, M, L, K, 2)
                              T* __restrict__ grad_attention_weights,     // (N, Lq, M, L, K)
                              int N, int S, int M, int D, int Lq, int L, int K,
                              int group_size, int atomic_grad_value) {
    const index_t thread = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const index_t num_heads = static_cast<index_t>(N) * Lq * M;
    const int lane = static_cast<int>(thread % group_size);
    // The shuffles in group_sum need every lane of the warp, so threads past the last
    // head do not return: they redo the last head's work and write nothing.
    const bool active = thread / group_size < num_heads;
    const index_t head = active ? thread / group_size : num_heads - 1;
    const int m = static_cast<int>(head % M);
    const index_t n = head / (static_cast<index_t>(Lq) * M);
    const index_t row_stride = static_cast<index_t>(M) * D;
    const T* value_nm = value + n * S * row_stride + static_cast<index_t>(m) * D;
    T* grad_value_nm = grad_value + n * S * row_stride + static_cast<index_t>(m) * D;
    const T* g_head = grad_output + head * D;
    const T* loc = sampling_locations + head * L * K * 2;
    const T* attn = attention_weights + head * L * K;

    for (int l = 0; l < L; ++l) {
        const int H = static_cast<int>(spatial_shapes[2 * l]);
        const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
        const index_t start = level_start_index[l];
        for (int k = 0; k < K; ++k) {
            const int p = l * K + k;
            const Bilinear<T> b = locate(loc[2 * p], loc[2 * p + 1], H, W, start);
            const T a = attn[p];
            T g_dot_v[4] = {T(0), T(0), T(0), T(0)};        // this lane's share of g . v_c
            if (b.inside) {
                for (int c = lane * VEC; c < D; c += group_size * VEC) {
                    const Vec<T, VEC> g = load_vec<T, VEC>(g_head + c);
                    for (int corner = 0; corner < 4; ++corner) {
                        if (b.row[corner] < 0) continue;
                        const index_t offset = b.row[corner] * row_stride + c;
                        const Vec<T, VEC> v = load_vec<T, VEC>(value_nm + offset);
                        const T aw = a * b.weight[corner];
                        for (int j = 0; j < VEC; ++j) {
                            g_dot_v[corner] += g.v[j] * v.v[j];
                            if (atomic_grad_value && active) {
                                atomicAdd(grad_value_nm + offset + j, aw * g.v[j]);
                            }
                        }
                    }
                }
            }
            // Outside the branch: groups of one warp may differ in b.inside.
            const T hh = T(1) - b.lh, hw = T(1) - b.lw;
            T d_attn = b.weight[0] * g_dot_v[0] + b.weight[1] * g_dot_v[1]
                     + b.weight[2] * g_dot_v[2] + b.weight[3] * g_dot_v[3];
            T d_w_im = -hh * g_dot_v[0] + hh * g_dot_v[1] - b.lh * g_dot_v[2] + b.lh * g_dot_v[3];
            T d_h_im = -hw * g_dot_v[0] - b.lw * g_dot_v[1] + hw * g_dot_v[2] + b.lw * g_dot_v[3];
            d_attn = group_sum(d_attn, group_size);
            d_w_im = group_sum(d_w_im, group_size);
            d_h_im = group_sum(d_h_im, group_size);
            if (active && lane == 0) {                         // one owner per (head, l, k)
                const index_t point = head * L * K + p;
                grad_attention_weights[point] = d_attn;
                grad_sampling_locations[2 * point] = a * d_w_im * W;      // w_im = x W - 0.5
                grad_sampling_locations[2 * point + 1] = a * d_h_im * H;  // h_im = y H - 0.5
            }
        }
    }
}

// ------------------------------------------------------------------------- deterministic
// Step 1 of 3. One thread per sampling point (n, q, m, l, k); entry e = 4 * point + corner
// receives the value row that the corner adds to, as a flat (n, s, m) index
// ((n * S + s) * M + m), or N * S * M (after every real row) when the corner is outside,
// and the corner's coefficient a * w_corner.
// Step 2 (host): sort the entries by (target, e) and find where each target's run starts.
template <typename T>
__global__ void msda_value_contributions(const index_t* __restrict__ spatial_shapes,
                                         const index_t* __restrict__ level_start_index,
                                         const T* __restrict__ sampling_locations,
                                         const T* __restrict__ attention_weights,
                                         index_t* __restrict__ target,    // (N*Lq*M*L*K*4,)
                                         T* __restrict__ coefficient,     // (N*Lq*M*L*K*4,)
                                         int N, int S, int M, int Lq, int L, int K) {
    const index_t point = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (point >= static_cast<index_t>(N) * Lq * M * L * K) return;
    const int l = static_cast<int>((point / K) % L);
    const index_t head = point / (static_cast<index_t>(L) * K);
    const int m = static_cast<int>(head % M);
    const index_t n = head / (static_cast<index_t>(Lq) * M);
    const int H = static_cast<int>(spatial_shapes[2 * l]);
    const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
    const Bilinear<T> b = locate(sampling_locations[2 * point], sampling_locations[2 * point + 1],
                                 H, W, level_start_index[l]);
    const T a = attention_weights[point];
    const index_t outside = static_cast<index_t>(N) * S * M;
    for (int corner = 0; corner < 4; ++corner) {
        const bool valid = b.row[corner] >= 0;
        target[4 * point + corner] = valid ? (n * S + b.row[corner]) * M + m : outside;
        coefficient[4 * point + corner] = valid ? a * b.weight[corner] : T(0);
    }
}

// Step 3 of 3. One group of G lanes per value row (n, s, m):
//   grad_value[n, s, m, :] = sum over its entries e, in sorted order, of
//                            coefficient[e] * grad_output[n, q(e), m, :].
// order: the entries sorted by target; run_start (N*S*M + 1,): the run of row r is
// order[run_start[r] : run_start[r + 1]]. Each row has one owner and a fixed summation
// order, so the result is the same bit for bit on every run.
template <typename T, int VEC>
__global__ void msda_gather_grad_value(const T* __restrict__ grad_output,   // (N, Lq, M, D)
                                       const index_t* __restrict__ order,
                                       const index_t* __restrict__ run_start,
                                       const T* __restrict__ coefficient,
                                       T* __restrict__ grad_value,          // (N, S, M, D)
                                       int N, int S, int M, int D, int L, int K,
                                       int group_size) {
    const index_t thread = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const index_t row = thread / group_size;                   // flat (n, s, m)
    const int lane = static_cast<int>(thread % group_size);
    if (row >= static_cast<index_t>(N) * S * M) return;        // no shuffles here
    const index_t begin = run_start[row], end = run_start[row + 1];
    for (int c = lane * VEC; c < D; c += group_size * VEC) {
        T acc[VEC];
        for (int j = 0; j < VEC; ++j) acc[j] = T(0);
        for (index_t i = begin; i < end; ++i) {
            const index_t entry = order[i];
            const index_t head = entry / (4 * static_cast<index_t>(L) * K);  // (n, q, m)
            const T coef = coefficient[entry];
            const Vec<T, VEC> g = load_vec<T, VEC>(grad_output + head * D + c);
            for (int j = 0; j < VEC; ++j) acc[j] += coef * g.v[j];
        }
        Vec<T, VEC> out;
        for (int j = 0; j < VEC; ++j) out.v[j] = acc[j];
        store_vec<T, VEC>(grad_value + row * D + c, out);
    }
}
