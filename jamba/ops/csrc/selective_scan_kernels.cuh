// Device code of the selective scan (included by selective_scan.cu; see there for the algorithm).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace jamba_scan {

constexpr int kN = 16;           // d_state
constexpr int kT = 16;           // steps per tile = lanes per channel
constexpr int kCPB = 8;          // channels per block
constexpr int kThreads = kCPB * kN;
constexpr int kChunk = 256;      // most steps between stored states (bounds the backward's shared memory)
constexpr int kTilesPerChunk = kChunk / kT;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const void *u, *dt, *z, *B, *C, *dout, *y;
  const float *A, *D, *bias;
  void *out, *y_out, *du, *ddt, *dz;
  float *ck, *dA, *dD, *dbias, *dB, *dC;
  int dim, L, n_ck, ck_len;  // states stored every ck_len steps (a multiple of 16, at most kChunk)
  int64_t su_b, su_d, sdt_b, sdt_d, sz_b, sz_d, sB_b, sB_n, sC_b, sC_n;
  bool softplus, has_z, has_D, has_bias, vec_BC;
};

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(float v) { return v; }

__device__ __forceinline__ float softplus_f(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

// The block's B and C for one tile of 16 steps, shared by its 8 channels. Thread tid loads 4 consecutive
// steps of one state row of B (tid < 64) or C (tid >= 64) one tile ahead (so the loads are in flight while
// the current tile computes), then writes them as fp32 into the step-major shared tile
// tile[step][state] = {B, C}; each lane then reads one 8-byte {B, C} per step, a broadcast for the warp.
// (Loading its own 16-step rows from global memory made every thread touch 16 cache lines per tile and
// left the kernels bound on L1 throughput.)
template <typename T>
struct BCTile {
  alignas(16) T v[4];
  const T* row;
  int q, r, isC;
  __device__ __forceinline__ void init(const Params& p, int b) {
    const int tid = threadIdx.x;
    isC = tid >= 64;
    r = (tid >> 2) & 15;
    q = tid & 3;
    row = isC ? static_cast<const T*>(p.C) + b * p.sC_b + r * p.sC_n
              : static_cast<const T*>(p.B) + b * p.sB_b + r * p.sB_n;
  }
  __device__ __forceinline__ void load(int t0, int L, bool vec) {
    const int s = t0 + q * 4;
    if (vec && s + 4 <= L) {
      if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<uint2*>(v) = __ldg(reinterpret_cast<const uint2*>(row + s));
      } else {
        *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(row + s));
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = s + j < L ? row[s + j] : T(0);
    }
  }
  __device__ __forceinline__ void store(float2 (*tile)[kN]) const {
    float* f = reinterpret_cast<float*>(tile);
#pragma unroll
    for (int j = 0; j < 4; ++j) f[((q * 4 + j) * kN + r) * 2 + isC] = to_f(v[j]);
  }
};

// This lane's step t of a per-channel row (zero past L).
template <typename T>
__device__ __forceinline__ T at_step(const T* row, int t, int L) {
  return t < L ? row[t] : T(0);
}

// v[i] over the 16 lanes of a half-warp -> lane n returns the sum over those lanes of v[n]
// (a transposing butterfly: 15 shuffles for 16 sums).
__device__ __forceinline__ float transpose_sum16(float (&v)[kT], int n) {
  float w8[8], w4[4], w2[2];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const bool up = n & 8;
    float send = up ? v[i] : v[i + 8], keep = up ? v[i + 8] : v[i];
    w8[i] = keep + __shfl_xor_sync(kFull, send, 8);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const bool up = n & 4;
    float send = up ? w8[i] : w8[i + 4], keep = up ? w8[i + 4] : w8[i];
    w4[i] = keep + __shfl_xor_sync(kFull, send, 4);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const bool up = n & 2;
    float send = up ? w4[i] : w4[i + 2], keep = up ? w4[i + 2] : w4[i];
    w2[i] = keep + __shfl_xor_sync(kFull, send, 2);
  }
  const bool up = n & 1;
  float send = up ? w2[0] : w2[1], keep = up ? w2[1] : w2[0];
  return keep + __shfl_xor_sync(kFull, send, 1);
}

struct Lane {
  int n, half, warp, d, b;
};

// Lane l of warp w: state l % 16 of channel blockIdx.x * 8 + 2 w + l / 16; half = first lane of its half-warp.
__device__ __forceinline__ Lane lane_of() {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  return {lane & 15, lane & 16, warp, static_cast<int>(blockIdx.x) * kCPB + warp * 2 + (lane >> 4),
          static_cast<int>(blockIdx.y)};
}

template <typename T, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_fwd_kernel(Params p) {
  __shared__ float2 s_bc[2][kT][kN];  // double-buffered {B, C} tiles: one barrier per tile
  const Lane ln = lane_of();
  const int n = ln.n, d = ln.d, b = ln.b;
  const float A2 = p.A[d * kN + n] * kLog2e;
  const float Dv = p.has_D ? p.D[d] : 0.f, bias = p.has_bias ? p.bias[d] : 0.f;
  const T* u = static_cast<const T*>(p.u) + b * p.su_b + d * p.su_d;
  const T* dt = static_cast<const T*>(p.dt) + b * p.sdt_b + d * p.sdt_d;
  const T* z = p.has_z ? static_cast<const T*>(p.z) + b * p.sz_b + d * p.sz_d : nullptr;
  const int64_t row = (static_cast<int64_t>(b) * p.dim + d) * p.L;  // out / y_out are contiguous (b, dim, L)
  T* out = static_cast<T*>(p.out) + row;
  T* y_out = p.has_z ? static_cast<T*>(p.y_out) + row : nullptr;
  BCTile<T> bc;
  bc.init(p, b);
  bc.load(0, p.L, p.vec_BC);
  T un = at_step(u, n, p.L), dtn = at_step(dt, n, p.L), zn = p.has_z ? at_step(z, n, p.L) : T(0);
  float h = 0.f;
  int buf = 0;
  for (int t0 = 0; t0 < p.L; t0 += kT, buf ^= 1) {
    if (t0 % p.ck_len == 0)
      p.ck[((static_cast<int64_t>(b) * p.n_ck + t0 / p.ck_len) * p.dim + d) * kN + n] = h;
    const int t = t0 + n;
    const bool tv = t < p.L;
    bc.store(s_bc[buf]);
    const float u_o = to_f(un), dtr = to_f(dtn) + bias, zv = to_f(zn);
    if (t0 + kT < p.L) {  // the next tile's loads, in flight while this one computes
      bc.load(t0 + kT, p.L, p.vec_BC);
      un = at_step(u, t + kT, p.L);
      dtn = at_step(dt, t + kT, p.L);
      if (p.has_z) zn = at_step(z, t + kT, p.L);
    }
    const float dt_o = tv ? (p.softplus ? softplus_f(dtr) : dtr) : 0.f;
    const float dtu_o = dt_o * u_o;
    __syncthreads();
    float pv[kT];
#pragma unroll
    for (int i = 0; i < kT; ++i) {
      const float dti = __shfl_sync(kFull, dt_o, ln.half + i);
      const float dtui = __shfl_sync(kFull, dtu_o, ln.half + i);
      const float2 w = s_bc[buf][i][n];
      h = exp2f(dti * A2) * h + dtui * w.x;
      pv[i] = w.y * h;
    }
    float y = transpose_sum16(pv, n);
    if (tv) {
      y += Dv * u_o;
      if (p.has_z) {
        y_out[t] = static_cast<T>(y);
        out[t] = static_cast<T>(y * zv * sigmoid_f(zv));
      } else {
        out[t] = static_cast<T>(y);
      }
    }
  }
}

// kPerTile: the forward stored the state entering every tile (ck_len == 16), so there is no chunk re-run:
// one reverse walk over all tiles, the stored state of the next tile prefetched with its other operands.
template <typename T, int kMinBlocks, bool kPerTile>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_bwd_kernel(Params p) {
  __shared__ float s_start[kPerTile ? 1 : kTilesPerChunk][kThreads];
  __shared__ float2 s_bc[2][kT][kN];
  // dB/dC partials per warp, double-buffered: a warp writing buffer j % 2 for tile j + 2 has passed tile
  // j + 1's barriers, which every warp reaches after reading tile j's sums.
  __shared__ float s_red[2][2][kThreads / 32][kN][kT + 1];
  const Lane ln = lane_of();
  const int n = ln.n, d = ln.d, b = ln.b, warp = ln.warp;
  const float A = p.A[d * kN + n], A2 = A * kLog2e;
  const float Dv = p.has_D ? p.D[d] : 0.f, bias = p.has_bias ? p.bias[d] : 0.f;
  const T* u = static_cast<const T*>(p.u) + b * p.su_b + d * p.su_d;
  const T* dt = static_cast<const T*>(p.dt) + b * p.sdt_b + d * p.sdt_d;
  const T* z = p.has_z ? static_cast<const T*>(p.z) + b * p.sz_b + d * p.sz_d : nullptr;
  const int64_t row = (static_cast<int64_t>(b) * p.dim + d) * p.L;  // dout, y, du, ddt, dz: contiguous
  const T* dout = static_cast<const T*>(p.dout) + row;
  const T* y = p.has_z ? static_cast<const T*>(p.y) + row : nullptr;
  T* du = static_cast<T*>(p.du) + row;
  T* ddt = static_cast<T*>(p.ddt) + row;
  T* dz = p.has_z ? static_cast<T*>(p.dz) + row : nullptr;
  float* dB = p.dB + static_cast<int64_t>(b) * kN * p.L;  // (batch, N, L) fp32, contiguous
  float* dC = p.dC + static_cast<int64_t>(b) * kN * p.L;
  BCTile<T> bc;
  bc.init(p, b);
  int buf = 0, rbuf = 0;

  float g = 0.f, a_next = 1.f, dA_acc = 0.f, dD_acc = 0.f, dbias_acc = 0.f;
  const float* ck = p.ck + (static_cast<int64_t>(b) * p.n_ck * p.dim + d) * kN + n;  // + (chunk * dim) * kN
  for (int c = kPerTile ? 0 : p.n_ck - 1; c >= 0; --c) {
    const int cs = kPerTile ? 0 : c * p.ck_len, ce = kPerTile ? p.L : min(cs + p.ck_len, p.L);
    const int ntiles = (ce - cs + kT - 1) / kT;
    // Pass 1: the state entering each tile of this chunk (none to compute when chunks are one tile long).
    float h = ck[static_cast<int64_t>(kPerTile ? ntiles - 1 : c) * p.dim * kN];
    if (!kPerTile) s_start[0][threadIdx.x] = h;
    T un, dtn;
    if (!kPerTile && ntiles > 1) {
      bc.load(cs, p.L, p.vec_BC);
      un = at_step(u, cs + n, p.L);
      dtn = at_step(dt, cs + n, p.L);
    }
    for (int k = 0; !kPerTile && k + 1 < ntiles; ++k, buf ^= 1) {
      const int t0 = cs + k * kT, t = t0 + n;
      bc.store(s_bc[buf]);
      const float u_o = to_f(un), dtr = to_f(dtn) + bias;
      if (k + 2 < ntiles) {
        bc.load(t0 + kT, p.L, p.vec_BC);
        un = at_step(u, t + kT, p.L);
        dtn = at_step(dt, t + kT, p.L);
      }
      const float dt_o = t < p.L ? (p.softplus ? softplus_f(dtr) : dtr) : 0.f;
      const float dtu_o = dt_o * u_o;
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        const float dti = __shfl_sync(kFull, dt_o, ln.half + i);
        const float dtui = __shfl_sync(kFull, dtu_o, ln.half + i);
        h = exp2f(dti * A2) * h + dtui * s_bc[buf][i][n].x;
      }
      s_start[k + 1][threadIdx.x] = h;
    }
    // Pass 2: tiles in reverse, each one's loads issued while the previous one computes.
    T don, zn = T(0), yn = T(0);
    {
      const int t0 = cs + (ntiles - 1) * kT, t = t0 + n;
      bc.load(t0, p.L, p.vec_BC);
      un = at_step(u, t, p.L); dtn = at_step(dt, t, p.L); don = at_step(dout, t, p.L);
      if (p.has_z) { zn = at_step(z, t, p.L); yn = at_step(y, t, p.L); }
    }
    for (int k = ntiles - 1; k >= 0; --k, buf ^= 1, rbuf ^= 1) {
      const int t0 = cs + k * kT, t = t0 + n;
      const bool tv = t < p.L;
      bc.store(s_bc[buf]);
      const float u_o = to_f(un), dtr = to_f(dtn) + bias, do_o = to_f(don), zv = to_f(zn), yv = to_f(yn);
      const float h_in = kPerTile ? h : s_start[k][threadIdx.x];  // the state entering this tile
      if (k > 0) {
        bc.load(t0 - kT, p.L, p.vec_BC);
        un = u[t - kT]; dtn = dt[t - kT]; don = dout[t - kT];
        if (p.has_z) { zn = z[t - kT]; yn = y[t - kT]; }
        if (kPerTile) h = ck[static_cast<int64_t>(k - 1) * p.dim * kN];
      }
      const float dt_o = tv ? (p.softplus ? softplus_f(dtr) : dtr) : 0.f;
      float dy_o = do_o;  // gradient of y (before the gate)
      if (p.has_z && tv) {
        const float sz = sigmoid_f(zv);
        dy_o = do_o * zv * sz;
        dz[t] = static_cast<T>(do_o * yv * sz * (1.f + zv * (1.f - sz)));
      }
      __syncthreads();
      // The tile's 16 states again, keeping h_i and dt_i (exp(dt_i A) is recomputed below rather than kept:
      // 16 registers fewer at the peak; ptxas still spills 52 bytes, against 72 when it was kept).
      const float dtu_o = dt_o * u_o;
      float hs[kT], dts[kT];
      float hr = h_in;
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        dts[i] = __shfl_sync(kFull, dt_o, ln.half + i);
        const float dtui = __shfl_sync(kFull, dtu_o, ln.half + i);
        hr = exp2f(dts[i] * A2) * hr + dtui * s_bc[buf][i][n].x;
        hs[i] = hr;
      }
      // Reverse recurrence. Per step: x = exp(dt A) h_{i-1}; the sums over states of g B and g A x give
      // du = dt * sum(g B) and ddelta = u * sum(g B) + sum(g A x) in the lane that owns the step.
      // dB, dC: the warp's two channels are summed as we go (the low half-warp keeps steps 0-7, the high
      // half 8-15, each receiving the other's by one shuffle), then the block's 4 warps after the barrier.
      const bool hi = ln.half != 0;
      float pgB[kT], pgAx[kT], keepB[kT / 2], keepC[kT / 2];
#pragma unroll
      for (int i = kT - 1; i >= 0; --i) {
        const float dyi = __shfl_sync(kFull, dy_o, ln.half + i);
        const float dtui = __shfl_sync(kFull, dtu_o, ln.half + i);
        const float2 w = s_bc[buf][i][n];  // B, C
        const float ai = exp2f(dts[i] * A2);
        g = g * a_next + w.y * dyi;
        // (index guards like i > 0 ? i - 1 : 0 keep the unrolled, never-taken branch in bounds)
        const float x = ai * (i > 0 ? hs[i > 0 ? i - 1 : 0] : h_in);
        dA_acc += g * dts[i] * x;
        pgB[i] = g * w.x;
        pgAx[i] = g * A * x;
        const float bB = g * dtui, bC = dyi * hs[i];
        if (i >= kT / 2) {
          keepB[i - kT / 2] = bB;
          keepC[i - kT / 2] = bC;
        } else {
          const int j = i < kT / 2 ? i : 0;
          const float sB = hi ? bB : keepB[j], kB = hi ? keepB[j] : bB;
          const float sC = hi ? bC : keepC[j], kC = hi ? keepC[j] : bC;
          const int col = (hi ? kT / 2 : 0) + j;
          s_red[rbuf][0][warp][n][col] = kB + __shfl_xor_sync(kFull, sB, 16);
          s_red[rbuf][1][warp][n][col] = kC + __shfl_xor_sync(kFull, sC, 16);
        }
        a_next = ai;
      }
      const float gB_sum = transpose_sum16(pgB, n), gAx_sum = transpose_sum16(pgAx, n);
      if (tv) {
        const float ddt_sum = u_o * gB_sum + gAx_sum;
        const float ddt_pre = p.softplus && dtr <= 20.f ? ddt_sum * sigmoid_f(dtr) : ddt_sum;
        du[t] = static_cast<T>(dt_o * gB_sum + Dv * dy_o);
        ddt[t] = static_cast<T>(ddt_pre);
        dD_acc += dy_o * u_o;
        dbias_acc += ddt_pre;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 2 * kN * kT / kThreads; ++j) {
        const int e = threadIdx.x + j * kThreads;
        const int which = e / (kN * kT), nn = (e / kT) % kN, ii = e % kT;
        if (t0 + ii < p.L) {
          float s = 0.f;
#pragma unroll
          for (int w = 0; w < kThreads / 32; ++w) s += s_red[rbuf][which][w][nn][ii];
          atomicAdd((which ? dC : dB) + nn * p.L + t0 + ii, s);
        }
      }
    }
  }
  atomicAdd(p.dA + d * kN + n, dA_acc);
  // dD, ddelta_bias: per channel, each lane holds the sums over its own steps.
#pragma unroll
  for (int off = 8; off >= 1; off >>= 1) {
    dD_acc += __shfl_xor_sync(kFull, dD_acc, off);
    dbias_acc += __shfl_xor_sync(kFull, dbias_acc, off);
  }
  if (n == 0) {
    if (p.has_D) atomicAdd(p.dD + d, dD_acc);
    if (p.has_bias) atomicAdd(p.dbias + d, dbias_acc);
  }
}

}  // namespace jamba_scan
