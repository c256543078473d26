// torch binding for csrc/core_bgmv.cu; built just in time by soppu_kernels.cuda_ops on a GPU machine.
// Includes no CUDA header: the caller passes the current stream as an integer (so this file also
// compiles against a CPU-only torch, which the compile checks use).
#include <torch/extension.h>

extern "C" int soppu_core_bgmv(float* g, const float* h, const void* S, int s_dtype,
                               const void* idx, int idx_is_int64, int T, int k,
                               int64_t stride_gt, int64_t stride_ht, int64_t stride_sn,
                               int64_t stride_si, int diag, void* stream);
extern "C" const char* soppu_cuda_error_string(int err);

// Semantics: g[t] = S[a] @ h[t] (diag: S[a] * h[t]) for a = idx[t] >= 0, g[t] = 0 for a == -1.
// h [T, k] float32 CUDA; S [N, k, k] or [N, k] float32/float16/bfloat16; idx [T] int32/int64;
// stream: torch.cuda.current_stream().cuda_stream, with h's device current.
// Returns a new float32 tensor g [T, k]; nothing is modified.
torch::Tensor core_bgmv(torch::Tensor h, torch::Tensor S, torch::Tensor idx, bool diag,
                        int64_t stream) {
  TORCH_CHECK(h.is_cuda() && S.is_cuda() && idx.is_cuda(),
              "core_bgmv: `h`, `S`, `idx` must be CUDA tensors");
  TORCH_CHECK(h.device() == S.device() && h.device() == idx.device(),
              "core_bgmv: `h`, `S`, `idx` must be on one device");
  TORCH_CHECK(h.dim() == 2, "core_bgmv: `h` must be [T, k], got ", h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat, "core_bgmv: `h` must be float32, got ", h.scalar_type());
  const int64_t T = h.size(0), k = h.size(1);
  if (diag) {
    TORCH_CHECK(S.dim() == 2 && S.size(1) == k, "core_bgmv: `S` must be [N, ", k,
                "] with diag=true, got ", S.sizes());
  } else {
    TORCH_CHECK(S.dim() == 3 && S.size(1) == k && S.size(2) == k, "core_bgmv: `S` must be [N, ",
                k, ", ", k, "] with diag=false, got ", S.sizes());
  }
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == T, "core_bgmv: `idx` must be [", T, "], got ",
              idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
              "core_bgmv: `idx` must be int32/int64, got ", idx.scalar_type());
  int s_dtype = -1;
  switch (S.scalar_type()) {
    case at::kFloat: s_dtype = 0; break;
    case at::kHalf: s_dtype = 1; break;
    case at::kBFloat16: s_dtype = 2; break;
    default:
      TORCH_CHECK(false, "core_bgmv: `S` must be float32/float16/bfloat16, got ", S.scalar_type());
  }
  auto hc = h.contiguous();
  auto Sc = S.contiguous();
  auto ic = idx.contiguous();
  auto g = torch::empty({T, k}, hc.options());
  const int err = soppu_core_bgmv(
      g.data_ptr<float>(), hc.data_ptr<float>(), Sc.data_ptr(), s_dtype, ic.data_ptr(),
      idx.scalar_type() == at::kLong ? 1 : 0, static_cast<int>(T), static_cast<int>(k),
      g.stride(0), hc.stride(0), Sc.stride(0), diag ? 0 : Sc.stride(1), diag ? 1 : 0,
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "core_bgmv: CUDA launch failed: ", soppu_cuda_error_string(err));
  return g;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("core_bgmv", &core_bgmv, "SOPPU per-token core multiply (BGMV)", py::arg("h"),
        py::arg("S"), py::arg("idx"), py::arg("diag"), py::arg("stream"));
}
