// Mamba-1 selective scan for d_state = 16: one thread per (channel, state), sequential in time.
//
//   dt = softplus(delta + delta_bias),  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,
//   y_t = sum_n C_t[n] h_t[n] + D u_t,  out = y * silu(z)
//
// Layout: a block of 128 threads owns 8 channels of one batch row; lane l of a warp holds channel
// 2 * warp + l / 16 and state n = l % 16. Time advances in tiles of 16 steps: lane n loads step t0 + n of its
// channel's per-channel operands (coalesced) and the 16 lanes of a channel exchange them by shuffles, so each
// thread runs its own state's recurrence sequentially with no block-wide scan. B and C, shared by all
// channels, are loaded once per block and tile into shared memory. Sums over the 16 states (y in forward;
// du, ddelta in backward) are one transposing butterfly per tile (15 shuffles for 16 steps). In backward
// the block sums dB and dC over its 8 channels before one atomic add per (state, step): 8x fewer atomics
// than one block per channel. Every tile's global loads are issued a tile ahead.
//
// Backward needs h_t in reverse order. The forward stores the state entering every chunk of ck_len steps
// (16, one per tile, while that takes at most 1 GiB, else 256: selective_scan_cuda.state_interval). With a
// state per tile the backward walks the tiles in reverse, prefetching each one's stored state with its other
// operands; with longer chunks it walks chunks in reverse and first re-runs the chunk forward once to keep
// the state entering each tile (shared memory). For each tile it recomputes the 16 states in registers and
// runs the reverse recurrence g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}; du and ddelta come from the sums over
// states of g B and g A exp(dt A) h_{t-1}, scaled by the step's own dt and u. The forward also keeps y before
// the gate (as mamba-ssm keeps its `out`) for dz.
//
// Device code: selective_scan_kernels.cuh. Measured against mamba-ssm: python -m launch.bench_scan.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdio>
#include <cstdlib>
#include <utility>
#include "selective_scan_kernels.cuh"

namespace {

using namespace jamba_scan;

// Blocks per SM the kernels are compiled for (register budget), forward and backward. JAMBA_SCAN_OCC=F,B
// picks another compiled pair (F in 4, 5, 6, 8; B in 2, 3, 4), for tuning sweeps (launch/bench_scan.py).
std::pair<int, int> occupancy() {
  static const std::pair<int, int> occ = [] {
    std::pair<int, int> o{5, 4};
    if (const char* e = std::getenv("JAMBA_SCAN_OCC")) {
      TORCH_CHECK(std::sscanf(e, "%d,%d", &o.first, &o.second) == 2, "JAMBA_SCAN_OCC must be F,B, got ", e);
    }
    return o;
  }();
  return occ;
}

template <typename T>
void launch_fwd(int mb, dim3 grid, cudaStream_t stream, const Params& p) {
  switch (mb) {
    case 4: scan_fwd_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p); break;
    case 5: scan_fwd_kernel<T, 5><<<grid, kThreads, 0, stream>>>(p); break;
    case 6: scan_fwd_kernel<T, 6><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: scan_fwd_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p); break;
    default: TORCH_CHECK(false, "JAMBA_SCAN_OCC: forward blocks per SM must be 4, 5, 6 or 8, got ", mb);
  }
}

template <typename T, int kMinBlocks>
void launch_bwd_with(dim3 grid, cudaStream_t stream, const Params& p) {
  if (p.ck_len == kT) {
    scan_bwd_kernel<T, kMinBlocks, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    scan_bwd_kernel<T, kMinBlocks, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_bwd(int mb, dim3 grid, cudaStream_t stream, const Params& p) {
  switch (mb) {
    case 2: launch_bwd_with<T, 2>(grid, stream, p); break;
    case 3: launch_bwd_with<T, 3>(grid, stream, p); break;
    case 4: launch_bwd_with<T, 4>(grid, stream, p); break;
    default: TORCH_CHECK(false, "JAMBA_SCAN_OCC: backward blocks per SM must be 2, 3 or 4, got ", mb);
  }
}

void check_common(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const c10::optional<at::Tensor>& z) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3, "selective_scan_cuda: u must be a (batch, dim, L) CUDA tensor");
  const auto batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(dim % kCPB == 0, "selective_scan_cuda: dim=", dim, " must be a multiple of ", kCPB);
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.is_contiguous() && A.size(0) == dim && A.size(1) == kN,
              "selective_scan_cuda: A must be contiguous fp32 (dim, 16), got ", A.sizes());
  for (const auto* t : {&dt, &B, &C}) TORCH_CHECK(t->scalar_type() == u.scalar_type(), "dtype mismatch");
  TORCH_CHECK(dt.sizes() == u.sizes() && u.stride(2) == 1 && dt.stride(2) == 1, "u, delta: (batch, dim, L), unit L-stride");
  TORCH_CHECK(B.dim() == 3 && B.size(0) == batch && B.size(1) == kN && B.size(2) == L && B.stride(2) == 1,
              "B must be (batch, 16, L) with unit L-stride, got ", B.sizes());
  TORCH_CHECK(C.sizes() == B.sizes() && C.stride(2) == 1, "C must be (batch, 16, L) with unit L-stride");
  if (z.has_value()) TORCH_CHECK(z->sizes() == u.sizes() && z->stride(2) == 1 && z->scalar_type() == u.scalar_type(), "z like u");
}

Params make_params(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                   const c10::optional<at::Tensor>& bias, bool softplus, int64_t ck_len) {
  TORCH_CHECK(ck_len % kT == 0 && ck_len > 0 && ck_len <= kChunk, "selective_scan_cuda: ck_len=", ck_len,
              " must be a positive multiple of ", kT, " up to ", kChunk);
  Params p{};
  p.u = u.data_ptr(); p.dt = dt.data_ptr(); p.B = B.data_ptr(); p.C = C.data_ptr();
  p.z = z.has_value() ? z->data_ptr() : nullptr;
  p.A = A.data_ptr<float>();
  p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.dim = u.size(1); p.L = u.size(2); p.ck_len = static_cast<int>(ck_len); p.n_ck = (p.L + p.ck_len - 1) / p.ck_len;
  p.su_b = u.stride(0); p.su_d = u.stride(1); p.sdt_b = dt.stride(0); p.sdt_d = dt.stride(1);
  p.sz_b = z.has_value() ? z->stride(0) : 0; p.sz_d = z.has_value() ? z->stride(1) : 0;
  p.sB_b = B.stride(0); p.sB_n = B.stride(1); p.sC_b = C.stride(0); p.sC_n = C.stride(1);
  p.softplus = softplus; p.has_z = z.has_value(); p.has_D = D.has_value(); p.has_bias = bias.has_value();
  const int64_t align = 4;  // BCTile loads 4 elements per thread: 8 (bf16/fp16) or 16 (fp32) bytes
  p.vec_BC = p.sB_b % align == 0 && p.sB_n % align == 0 && p.sC_b % align == 0 && p.sC_n % align == 0 &&
             reinterpret_cast<uintptr_t>(p.B) % 16 == 0 && reinterpret_cast<uintptr_t>(p.C) % 16 == 0;
  return p;
}

}  // namespace

// Returns out, y (pre-gate, only with z; else an empty tensor), ck (batch, n_chunks, dim, 16) fp32.
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                 const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
                                 bool softplus, int64_t ck_len) {
  check_common(u, dt, A, B, C, z);
  const at::cuda::CUDAGuard guard(u.device());
  Params p = make_params(u, dt, A, B, C, D, z, bias, softplus, ck_len);
  auto out = at::empty(u.sizes(), u.options());
  auto y = z.has_value() ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  auto ck = at::empty({u.size(0), p.n_ck, u.size(1), kN}, u.options().dtype(at::kFloat));
  p.out = out.data_ptr(); p.y_out = z.has_value() ? y.data_ptr() : nullptr; p.ck = ck.data_ptr<float>();
  dim3 grid(u.size(1) / kCPB, u.size(0));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_fwd", [&] {
    launch_fwd<scalar_t>(occupancy().first, grid, stream, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, y, ck};
}

// Returns du, ddelta, dA, dB, dC, dD, ddelta_bias, dz (absent ones as empty tensors); dB, dC fp32.
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                 const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
                                 bool softplus, int64_t ck_len, const at::Tensor& dout, const at::Tensor& y,
                                 const at::Tensor& ck) {
  check_common(u, dt, A, B, C, z);
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.is_contiguous() && dout.scalar_type() == u.scalar_type(),
              "dout must be contiguous like u");
  const at::cuda::CUDAGuard guard(u.device());
  Params p = make_params(u, dt, A, B, C, D, z, bias, softplus, ck_len);
  TORCH_CHECK(ck.size(1) == p.n_ck, "checkpoint count mismatch");
  if (z.has_value()) TORCH_CHECK(y.sizes() == u.sizes() && y.is_contiguous(), "y must be contiguous like u");
  const auto f32 = u.options().dtype(at::kFloat);
  auto du = at::empty(u.sizes(), u.options());
  auto ddt = at::empty(u.sizes(), u.options());
  auto dz = z.has_value() ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  auto dA = at::zeros(A.sizes(), f32);
  auto dB = at::zeros({u.size(0), kN, u.size(2)}, f32);
  auto dC = at::zeros({u.size(0), kN, u.size(2)}, f32);
  auto dD = at::zeros({u.size(1)}, f32);
  auto dbias = at::zeros({u.size(1)}, f32);
  p.dout = dout.data_ptr(); p.y = z.has_value() ? y.data_ptr() : nullptr; p.ck = ck.data_ptr<float>();
  p.du = du.data_ptr(); p.ddt = ddt.data_ptr(); p.dz = z.has_value() ? dz.data_ptr() : nullptr;
  p.dA = dA.data_ptr<float>(); p.dB = dB.data_ptr<float>(); p.dC = dC.data_ptr<float>();
  p.dD = dD.data_ptr<float>(); p.dbias = dbias.data_ptr<float>();
  dim3 grid(u.size(1) / kCPB, u.size(0));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_bwd", [&] {
    launch_bwd<scalar_t>(occupancy().second, grid, stream, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {du, ddt, dA, dB, dC, dD, dbias, dz};
}

// Registers, local (spill) bytes and static shared memory of the bf16 kernels, for tuning: the forward, the
// backward with chunk re-runs, the backward with a state per tile.
std::vector<int64_t> kernel_info() {
  std::vector<int64_t> r;
  for (const void* f : {reinterpret_cast<const void*>(&scan_fwd_kernel<c10::BFloat16, 5>),
                        reinterpret_cast<const void*>(&scan_bwd_kernel<c10::BFloat16, 4, false>),
                        reinterpret_cast<const void*>(&scan_bwd_kernel<c10::BFloat16, 4, true>)}) {
    cudaFuncAttributes a;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&a, f));
    r.insert(r.end(), {a.numRegs, static_cast<int64_t>(a.localSizeBytes), static_cast<int64_t>(a.sharedSizeBytes)});
  }
  return r;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kernel_info", &kernel_info, "[regs, local bytes, shared bytes] of the bf16 forward, chunked backward, per-tile backward");
  m.def("fwd", &scan_fwd, "Mamba-1 selective scan forward (d_state 16)");
  m.def("bwd", &scan_bwd, "Mamba-1 selective scan backward (d_state 16)");
}
