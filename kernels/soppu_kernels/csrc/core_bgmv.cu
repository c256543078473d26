// Per-token core multiply of SOPPU's shared-basis LoRA (BGMV-like), plain CUDA.
//
// Semantics: g[t] = S[a] @ h[t]   (diag: g[t] = S[a] * h[t])   for a = idx[t] >= 0,
//            g[t] = 0                                          for a == -1.
//
//   g   [T, k] float32, written (every row)       h   [T, k] float32, read
//   S   [N, k, k] (full) or [N, k] (diag), float32 / float16 / bfloat16, rows contiguous
//   idx [T] int32 or int64 in [-1, N)
//
// Nothing else is modified. This file has no torch dependency, so `nvcc -c -arch=sm_90
// core_bgmv.cu` checks it on a machine without a GPU; core_bgmv_binding.cpp wraps it for torch.
//
// Full cores: one block per token, one warp per output row i (rows strided over the block's
// warps); lanes stride over j, so S[a, i, :] and h[t, :] are read coalesced, then a warp shuffle
// reduction. Works for any k. Diag cores: one thread per (t, i) element.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace soppu {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

constexpr int kWarpsPerBlock = 4;

template <typename scalar_t, typename index_t>
__global__ void core_bgmv_full_kernel(float* __restrict__ g, const float* __restrict__ h,
                                      const scalar_t* __restrict__ S,
                                      const index_t* __restrict__ idx, int T, int k,
                                      int64_t stride_gt, int64_t stride_ht, int64_t stride_sn,
                                      int64_t stride_si) {
  const int t = blockIdx.x;
  if (t >= T) return;
  const int lane = threadIdx.x;  // 0..31
  const int warp = threadIdx.y;  // 0..kWarpsPerBlock-1
  const int64_t a = static_cast<int64_t>(idx[t]);
  float* g_row = g + static_cast<int64_t>(t) * stride_gt;
  if (a < 0) {
    for (int i = warp * 32 + lane; i < k; i += 32 * kWarpsPerBlock) g_row[i] = 0.0f;
    return;
  }
  const float* h_row = h + static_cast<int64_t>(t) * stride_ht;
  const scalar_t* s_a = S + a * stride_sn;
  for (int i = warp; i < k; i += kWarpsPerBlock) {
    const scalar_t* s_row = s_a + static_cast<int64_t>(i) * stride_si;
    float acc = 0.0f;
    for (int j = lane; j < k; j += 32) acc += to_float(s_row[j]) * h_row[j];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) g_row[i] = acc;
  }
}

template <typename scalar_t, typename index_t>
__global__ void core_bgmv_diag_kernel(float* __restrict__ g, const float* __restrict__ h,
                                      const scalar_t* __restrict__ S,
                                      const index_t* __restrict__ idx, int T, int k,
                                      int64_t stride_gt, int64_t stride_ht, int64_t stride_sn) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(T) * k) return;
  const int64_t t = e / k;
  const int i = static_cast<int>(e - t * k);
  const int64_t a = static_cast<int64_t>(idx[t]);
  g[t * stride_gt + i] = a < 0 ? 0.0f : to_float(S[a * stride_sn + i]) * h[t * stride_ht + i];
}

template <typename scalar_t, typename index_t>
cudaError_t launch(float* g, const float* h, const void* S, const void* idx, int T, int k,
                   int64_t stride_gt, int64_t stride_ht, int64_t stride_sn, int64_t stride_si,
                   bool diag, cudaStream_t stream) {
  if (T <= 0 || k <= 0) return cudaSuccess;
  const scalar_t* s = static_cast<const scalar_t*>(S);
  const index_t* ix = static_cast<const index_t*>(idx);
  if (diag) {
    const int threads = 256;
    const int64_t total = static_cast<int64_t>(T) * k;
    const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
    core_bgmv_diag_kernel<scalar_t, index_t><<<blocks, threads, 0, stream>>>(
        g, h, s, ix, T, k, stride_gt, stride_ht, stride_sn);
  } else {
    const dim3 block(32, kWarpsPerBlock);
    core_bgmv_full_kernel<scalar_t, index_t><<<T, block, 0, stream>>>(
        g, h, s, ix, T, k, stride_gt, stride_ht, stride_sn, stride_si);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t dispatch_index(float* g, const float* h, const void* S, const void* idx,
                           int idx_is_int64, int T, int k, int64_t stride_gt, int64_t stride_ht,
                           int64_t stride_sn, int64_t stride_si, bool diag, cudaStream_t stream) {
  if (idx_is_int64)
    return launch<scalar_t, int64_t>(g, h, S, idx, T, k, stride_gt, stride_ht, stride_sn,
                                     stride_si, diag, stream);
  return launch<scalar_t, int32_t>(g, h, S, idx, T, k, stride_gt, stride_ht, stride_sn,
                                   stride_si, diag, stream);
}

}  // namespace soppu

// C entry point (no CUDA types in the signature, so the torch binding needs no CUDA headers).
// s_dtype: 0 = float32, 1 = float16, 2 = bfloat16; stream: a cudaStream_t. Returns a
// cudaError_t (0 = success); cudaErrorInvalidValue for an unknown s_dtype. g, h, S must have a
// contiguous last dimension.
extern "C" int soppu_core_bgmv(float* g, const float* h, const void* S, int s_dtype,
                               const void* idx, int idx_is_int64, int T, int k,
                               int64_t stride_gt, int64_t stride_ht, int64_t stride_sn,
                               int64_t stride_si, int diag, void* stream_ptr) {
  using namespace soppu;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (s_dtype) {
    case 0:
      return dispatch_index<float>(g, h, S, idx, idx_is_int64, T, k, stride_gt, stride_ht,
                                   stride_sn, stride_si, diag != 0, stream);
    case 1:
      return dispatch_index<__half>(g, h, S, idx, idx_is_int64, T, k, stride_gt, stride_ht,
                                    stride_sn, stride_si, diag != 0, stream);
    case 2:
      return dispatch_index<__nv_bfloat16>(g, h, S, idx, idx_is_int64, T, k, stride_gt,
                                           stride_ht, stride_sn, stride_si, diag != 0, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Text of a cudaError_t returned by soppu_core_bgmv.
extern "C" const char* soppu_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
