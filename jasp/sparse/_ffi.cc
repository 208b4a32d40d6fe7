// jasp.sparse: 2:4 sparse-tensor-core matmul for JAX through cuSPARSELt.
//
// Two XLA FFI handlers (CUDA platform) and two plain C functions for ctypes:
//
//   jasp_cslt_compress  (w) -> (compressed uint8[bytes], invalid int32[1], scratch)
//   jasp_cslt_matmul    (compressed, x, bias) -> (y, fallback workspace)
//   jasp_cslt_compressed_size(m, k, dtype, a_order, &bytes, &buffer_bytes, err, errlen)
//   jasp_cslt_version()
//
// The matmul computes y = x . W (+ bias) for a Flax kernel W (in=k, out=m) that
// is 2:4 along `in`. cuSPARSELt's sparse operand is A, so the handler computes
// D = A . op(B) with A = W^T (m x k, 2:4 along k), op(B) = x^T (k x t) and D
// (m x t) stored column-major, which is y (t x m) row-major: no transpose of
// x or y is ever materialised. A is stored either row-major (a_order=0: the
// compressed form of W^T (m, k), K contiguous, the layout PyTorch's linear
// path uses) or column-major (a_order=1: W (k, m) as Flax stores it).
//
// Plans (descriptors, algorithm selection, workspace size) are cached per
// (device, m, k, t, dtype, a_order, bias); the first call of a shape runs
// cusparseLtMatmulSearch on the real buffers and keeps the fastest algorithm.
// The matmul workspace comes from XLA's scratch allocator; the compression
// buffer is an extra (discarded) output of the compress call.
// No CUDA device code and no CUDA runtime calls of our own: cuSPARSELt
// launches everything on the stream that XLA hands over.

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include <driver_types.h>
#include <library_types.h>

#include "cusparseLt.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr uint32_t kAlignment = 16;

std::string StatusText(cusparseStatus_t s) {
  const char* name = cusparseLtGetErrorName(s);
  const char* text = cusparseLtGetErrorString(s);
  return std::string(name ? name : "?") + " (" + (text ? text : "") + ")";
}

#define JASP_CSLT(expr)                                                      \
  do {                                                                       \
    cusparseStatus_t status_ = (expr);                                       \
    if (status_ != CUSPARSE_STATUS_SUCCESS) {                                \
      return ffi::Error::Internal(std::string("jasp.sparse: ") + #expr +     \
                                  " failed: " + StatusText(status_));        \
    }                                                                        \
  } while (0)

// One cuSPARSELt handle per device, created on first use on that device (the
// context XLA made current for the call is the one the handle binds to).
std::mutex g_mu;
std::map<int32_t, std::unique_ptr<cusparseLtHandle_t>> g_handles;

ffi::Error GetHandle(int32_t device, cusparseLtHandle_t** out) {
  auto it = g_handles.find(device);
  if (it == g_handles.end()) {
    auto h = std::make_unique<cusparseLtHandle_t>();
    JASP_CSLT(cusparseLtInit(h.get()));
    it = g_handles.emplace(device, std::move(h)).first;
  }
  *out = it->second.get();
  return ffi::Error::Success();
}

bool CudaType(ffi::DataType t, cudaDataType* out) {
  switch (t) {
    case ffi::DataType::BF16:
      *out = CUDA_R_16BF;
      return true;
    case ffi::DataType::F16:
      *out = CUDA_R_16F;
      return true;
    default:
      return false;
  }
}

cudaDataType CodeType(int64_t code) { return code == 1 ? CUDA_R_16F : CUDA_R_16BF; }

// The structured operand A (m x k, 2:4 along k).
cusparseStatus_t InitA(const cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* d, int64_t m,
                       int64_t k, cudaDataType type, int64_t a_order) {
  if (a_order == 0) {
    return cusparseLtStructuredDescriptorInit(h, d, m, k, k, kAlignment, type, CUSPARSE_ORDER_ROW,
                                              CUSPARSELT_SPARSITY_50_PERCENT);
  }
  return cusparseLtStructuredDescriptorInit(h, d, m, k, m, kAlignment, type, CUSPARSE_ORDER_COL,
                                            CUSPARSELT_SPARSITY_50_PERCENT);
}

struct Plan {
  const cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t a, b, c;
  cusparseLtMatmulDescriptor_t mm;
  cusparseLtMatmulAlgSelection_t alg;
  cusparseLtMatmulPlan_t plan;
  bool has_a = false, has_b = false, has_c = false, has_alg = false, has_plan = false;
  size_t workspace = 0;
  bool searched = false;
  const void* bias = nullptr;

  ~Plan() {
    if (has_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (has_alg) cusparseLtMatmulAlgSelectionDestroy(&alg);
    if (has_c) cusparseLtMatDescriptorDestroy(&c);
    if (has_b) cusparseLtMatDescriptorDestroy(&b);
    if (has_a) cusparseLtMatDescriptorDestroy(&a);
  }
};

using PlanKey = std::tuple<int32_t, int64_t, int64_t, int64_t, int, int64_t, int64_t>;
std::map<PlanKey, std::unique_ptr<Plan>> g_plans;

ffi::Error MakePlan(const cusparseLtHandle_t* h, int64_t m, int64_t k, int64_t t,
                    cudaDataType type, int64_t a_order, Plan* p) {
  p->handle = h;
  JASP_CSLT(InitA(h, &p->a, m, k, type, a_order));
  p->has_a = true;
  // B: x (t, k) row-major, used transposed (k x t).
  JASP_CSLT(cusparseLtDenseDescriptorInit(h, &p->b, t, k, k, kAlignment, type,
                                          CUSPARSE_ORDER_ROW));
  p->has_b = true;
  // C = D: (m x t) column-major == y (t, m) row-major.
  JASP_CSLT(cusparseLtDenseDescriptorInit(h, &p->c, m, t, m, kAlignment, type,
                                          CUSPARSE_ORDER_COL));
  p->has_c = true;
  JASP_CSLT(cusparseLtMatmulDescriptorInit(h, &p->mm, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                           CUSPARSE_OPERATION_TRANSPOSE, &p->a, &p->b, &p->c,
                                           &p->c, CUSPARSE_COMPUTE_32F));
  JASP_CSLT(cusparseLtMatmulAlgSelectionInit(h, &p->alg, &p->mm, CUSPARSELT_MATMUL_ALG_DEFAULT));
  p->has_alg = true;
  JASP_CSLT(cusparseLtMatmulPlanInit(h, &p->plan, &p->mm, &p->alg));
  p->has_plan = true;
  JASP_CSLT(cusparseLtMatmulGetWorkspace(h, &p->plan, &p->workspace));
  return ffi::Error::Success();
}

// The bias pointer lives in the matmul descriptor: re-initialise the plan when
// it changes (a parameter's buffer normally keeps its address across calls).
ffi::Error SetBias(Plan* p, const void* bias) {
  if (p->bias == bias) return ffi::Error::Success();
  void* ptr = const_cast<void*>(bias);
  JASP_CSLT(cusparseLtMatmulDescSetAttribute(p->handle, &p->mm, CUSPARSELT_MATMUL_BIAS_POINTER,
                                             &ptr, sizeof(ptr)));
  if (p->has_plan) {
    cusparseLtMatmulPlanDestroy(&p->plan);
    p->has_plan = false;
  }
  JASP_CSLT(cusparseLtMatmulPlanInit(p->handle, &p->plan, &p->mm, &p->alg));
  p->has_plan = true;
  JASP_CSLT(cusparseLtMatmulGetWorkspace(p->handle, &p->plan, &p->workspace));
  p->bias = bias;
  return ffi::Error::Success();
}

int64_t LeadingCount(ffi::AnyBuffer::Dimensions dims) {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) n *= dims[i];
  return n;
}

ffi::Error MatmulImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, int32_t device,
                      ffi::AnyBuffer compressed, ffi::AnyBuffer x, ffi::AnyBuffer bias,
                      ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> ws_out,
                      int64_t m, int64_t k, int64_t a_order,
                      int64_t has_bias, int64_t search) {
  cudaDataType type;
  if (!CudaType(x.element_type(), &type)) {
    return ffi::Error::InvalidArgument("jasp.sparse: x must be bfloat16 or float16");
  }
  if (y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("jasp.sparse: y must have x's dtype");
  }
  auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() != k) {
    return ffi::Error::InvalidArgument("jasp.sparse: the last axis of x must have size k=" +
                                       std::to_string(k));
  }
  const int64_t t = LeadingCount(xd);
  if (static_cast<int64_t>(y->element_count()) != t * m) {
    return ffi::Error::InvalidArgument("jasp.sparse: y must hold t*m elements");
  }
  if (LeadingCount(compressed.dimensions()) != 1) {
    return ffi::Error::InvalidArgument(
        "jasp.sparse: vmap over the compressed weight is not supported (one weight per call)");
  }
  if (has_bias) {
    if (bias.element_type() != x.element_type() ||
        static_cast<int64_t>(bias.element_count()) != m) {
      return ffi::Error::InvalidArgument(
          "jasp.sparse: bias must have m elements of x's dtype (vmap over the bias is not "
          "supported)");
    }
  }
  if (t == 0) return ffi::Error::Success();

  std::lock_guard<std::mutex> lock(g_mu);
  cusparseLtHandle_t* h = nullptr;
  if (auto err = GetHandle(device, &h); err.failure()) return err;
  PlanKey key{device, m, k, t, static_cast<int>(type), a_order, has_bias};
  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    auto p = std::make_unique<Plan>();
    if (auto err = MakePlan(h, m, k, t, type, a_order, p.get()); err.failure()) return err;
    it = g_plans.emplace(key, std::move(p)).first;
  }
  Plan* p = it->second.get();
  if (has_bias) {
    if (auto err = SetBias(p, bias.untyped_data()); err.failure()) return err;
  }
  // Workspace: XLA's scratch allocator, else the fixed-size workspace output.
  auto workspace = [&](size_t need, void** out) -> ffi::Error {
    *out = nullptr;
    if (need == 0) return ffi::Error::Success();
    auto mem = scratch.Allocate(need, 16);
    if (mem.has_value()) {
      *out = *mem;
    } else if (need <= ws_out->size_bytes()) {
      *out = ws_out->untyped_data();
    } else {
      return ffi::Error::Internal("jasp.sparse: could not allocate the matmul workspace (" +
                                  std::to_string(need) + " bytes) from XLA");
    }
    return ffi::Error::Success();
  };
  void* ws = nullptr;
  if (auto err = workspace(p->workspace, &ws); err.failure()) return err;
  const float alpha = 1.0f, beta = 0.0f;
  void* out = y->untyped_data();
  cudaStream_t streams[1] = {stream};
  if (search && !p->searched) {
    JASP_CSLT(cusparseLtMatmulSearch(h, &p->plan, &alpha, compressed.untyped_data(),
                                     x.untyped_data(), &beta, out, out, ws, streams, 1));
    p->searched = true;
    size_t need = 0;
    JASP_CSLT(cusparseLtMatmulGetWorkspace(h, &p->plan, &need));
    if (need > p->workspace) {
      // The search's last run may not be the chosen algorithm: run it again
      // with the workspace it needs.
      p->workspace = need;
      if (auto err = workspace(need, &ws); err.failure()) return err;
    }
  }
  JASP_CSLT(cusparseLtMatmul(h, &p->plan, &alpha, compressed.untyped_data(), x.untyped_data(),
                             &beta, out, out, ws, streams, 1));
  return ffi::Error::Success();
}

ffi::Error CompressImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer w,
                        ffi::Result<ffi::AnyBuffer> compressed,
                        ffi::Result<ffi::AnyBuffer> invalid, ffi::Result<ffi::AnyBuffer> buffer,
                        int64_t m, int64_t k, int64_t a_order) {
  cudaDataType type;
  if (!CudaType(w.element_type(), &type)) {
    return ffi::Error::InvalidArgument("jasp.sparse: the weight must be bfloat16 or float16");
  }
  if (static_cast<int64_t>(w.element_count()) != m * k) {
    return ffi::Error::InvalidArgument("jasp.sparse: the weight must hold m*k elements");
  }
  std::lock_guard<std::mutex> lock(g_mu);
  cusparseLtHandle_t* h = nullptr;
  if (auto err = GetHandle(device, &h); err.failure()) return err;
  cusparseLtMatDescriptor_t a;
  JASP_CSLT(InitA(h, &a, m, k, type, a_order));
  struct Guard {
    cusparseLtMatDescriptor_t* d;
    ~Guard() { cusparseLtMatDescriptorDestroy(d); }
  } guard{&a};
  size_t size = 0, buf_size = 0;
  JASP_CSLT(cusparseLtSpMMACompressedSize2(h, &a, &size, &buf_size));
  if (compressed->size_bytes() < size || buffer->size_bytes() < buf_size) {
    return ffi::Error::InvalidArgument(
        "jasp.sparse: the compressed buffers are too small (" +
        std::to_string(compressed->size_bytes()) + " < " + std::to_string(size) + " or " +
        std::to_string(buffer->size_bytes()) + " < " + std::to_string(buf_size) + " bytes)");
  }
  JASP_CSLT(cusparseLtSpMMAPruneCheck2(h, &a, 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                       w.untyped_data(),
                                       reinterpret_cast<int*>(invalid->untyped_data()), stream));
  JASP_CSLT(cusparseLtSpMMACompress2(h, &a, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, w.untyped_data(),
                                     compressed->untyped_data(), buffer->untyped_data(), stream));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaspCsltMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // compressed weight
                                  .Arg<ffi::AnyBuffer>()  // x (..., k)
                                  .Arg<ffi::AnyBuffer>()  // bias (m,) or (0,)
                                  .Ret<ffi::AnyBuffer>()  // y (..., m)
                                  .Ret<ffi::AnyBuffer>()  // fallback workspace (bytes,)
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("a_order")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("search"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaspCsltCompress, CompressImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // dense 2:4 weight
                                  .Ret<ffi::AnyBuffer>()  // compressed (bytes,) uint8
                                  .Ret<ffi::AnyBuffer>()  // invalid flag (1,) int32
                                  .Ret<ffi::AnyBuffer>()  // compression scratch (bytes,)
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("a_order"));

extern "C" {

// The compressed size of an m x k 2:4 operand; dtype 0 = bf16, 1 = fp16.
// Returns 0 on success, else writes the error into err.
int jasp_cslt_compressed_size(int64_t m, int64_t k, int32_t dtype, int32_t a_order,
                              int64_t* bytes, int64_t* buffer_bytes, char* err, int errlen) {
  auto fail = [&](const std::string& msg) {
    if (err && errlen > 0) {
      std::strncpy(err, msg.c_str(), errlen - 1);
      err[errlen - 1] = 0;
    }
    return 1;
  };
  std::lock_guard<std::mutex> lock(g_mu);
  cusparseLtHandle_t* h = nullptr;
  if (auto e = GetHandle(-1, &h); e.failure()) return fail(e.message());
  cusparseLtMatDescriptor_t a;
  cusparseStatus_t s = InitA(h, &a, m, k, CodeType(dtype), a_order);
  if (s != CUSPARSE_STATUS_SUCCESS) {
    return fail("cusparseLtStructuredDescriptorInit(" + std::to_string(m) + "x" +
                std::to_string(k) + ") failed: " + StatusText(s));
  }
  size_t size = 0, buffer = 0;
  s = cusparseLtSpMMACompressedSize2(h, &a, &size, &buffer);
  cusparseLtMatDescriptorDestroy(&a);
  if (s != CUSPARSE_STATUS_SUCCESS) {
    return fail("cusparseLtSpMMACompressedSize2 failed: " + StatusText(s));
  }
  *bytes = static_cast<int64_t>(size);
  *buffer_bytes = static_cast<int64_t>(buffer);
  return 0;
}

// cuSPARSELt's version as major*10000 + minor*100 + patch.
int jasp_cslt_version() {
  int major = 0, minor = 0, patch = 0;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  cusparseLtGetProperty(PATCH_LEVEL, &patch);
  return major * 10000 + minor * 100 + patch;
}

}  // extern "C"
