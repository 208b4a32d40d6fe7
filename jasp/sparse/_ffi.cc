// jasp.sparse: 2:4 sparse-tensor-core matmul for JAX through cuSPARSELt.
//
// Two XLA FFI handlers (CUDA platform) and two plain C functions for ctypes:
//
//   jasp_cslt_compress  (w) -> (compressed uint8[bytes], scratch)
//   jasp_cslt_matmul    (compressed, x, bias) -> (y, fallback workspace)
//   jasp_cslt_compressed_size(m, k, dtype, a_order, &bytes, &buffer_bytes, err, errlen)
//   jasp_cslt_version(), jasp_cslt_header_version(), jasp_cslt_library_path(buf, len)
//   jasp_cslt_plans(buf, len), jasp_cslt_preset(m, k, t, dtype, a_order, bias, alg_id, ms)
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
// (device, m, k, t, dtype, a_order, bias); the first call of a shape times
// every algorithm configuration cuSPARSELt offers for it, on the real
// buffers, each with the workspace its own plan reports, and keeps the fastest
// (see Search below; cusparseLtMatmulSearch is not used: it takes no workspace
// size, while configurations report different workspace sizes). The matmul
// workspace comes from XLA's scratch allocator;
// compression goes through a plan (cusparseLtSpMMACompress) and its buffer is
// an extra (discarded) output of the compress call.
// No CUDA device code of our own: cuSPARSELt launches everything on the stream
// that XLA hands over; the search times candidates with CUDA driver events,
// resolved at run time from libcuda (no link-time CUDA dependency).

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <driver_types.h>
#include <library_types.h>

#include "cusparseLt.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr uint32_t kAlignment = 16;
constexpr uintptr_t kWorkspaceAlignment = 256;
// The token count of the plan that compression goes through (the compressed
// form depends only on the structured operand).
constexpr int64_t kCompressTokens = 16;

std::string StatusText(cusparseStatus_t s) {
  const char* name = cusparseLtGetErrorName(s);
  const char* text = cusparseLtGetErrorString(s);
  return std::string(name ? name : "?") + " (" + (text ? text : "") + ")";
}

// JASP_SPARSE_DEBUG=1 traces the plan search on stderr.
bool Debug() {
  static const bool on = [] {
    const char* v = std::getenv("JASP_SPARSE_DEBUG");
    return v && v[0] == '1';
  }();
  return on;
}
// Seconds since the first trace line (the trace's time stamps).
double TraceClock() {
  static const auto t0 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
#define JASP_TRACE(...)                                           \
  do {                                                            \
    if (Debug()) {                                                \
      std::fprintf(stderr, "[jasp.sparse %9.3fs] ", TraceClock()); \
      std::fprintf(stderr, __VA_ARGS__);                          \
      std::fflush(stderr);                                        \
    }                                                             \
  } while (0)

// CUDA driver events for the algorithm search, looked up in libcuda.so.1 at
// run time (the driver is loaded in every process that runs on a GPU).
struct DriverEvents {
  using Event = void*;
  int (*create)(Event*, unsigned int) = nullptr;
  int (*record)(Event, cudaStream_t) = nullptr;
  int (*synchronize)(Event) = nullptr;
  int (*elapsed)(float*, Event, Event) = nullptr;
  int (*destroy)(Event) = nullptr;
  bool ok = false;
};

const DriverEvents& Events() {
  static const DriverEvents ev = [] {
    DriverEvents e;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) return e;
    e.create = reinterpret_cast<decltype(e.create)>(dlsym(lib, "cuEventCreate"));
    e.record = reinterpret_cast<decltype(e.record)>(dlsym(lib, "cuEventRecord"));
    e.synchronize = reinterpret_cast<decltype(e.synchronize)>(dlsym(lib, "cuEventSynchronize"));
    void* el = dlsym(lib, "cuEventElapsedTime_v2");
    if (!el) el = dlsym(lib, "cuEventElapsedTime");
    e.elapsed = reinterpret_cast<decltype(e.elapsed)>(el);
    e.destroy = reinterpret_cast<decltype(e.destroy)>(dlsym(lib, "cuEventDestroy_v2"));
    e.ok = e.create && e.record && e.synchronize && e.elapsed && e.destroy;
    return e;
  }();
  return ev;
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

// One algorithm configuration: its matmul descriptor, algorithm selection and
// execution plan, built fresh and never re-initialised (re-initialising a plan
// over a destroyed one crashes cuSPARSELt 0.8.0).
struct Config {
  cusparseLtMatmulDescriptor_t mm;
  cusparseLtMatmulAlgSelection_t alg;
  cusparseLtMatmulPlan_t plan;
  bool has_alg = false, has_plan = false;
  int id = 0;
  size_t workspace = 0;

  Config() = default;
  Config(const Config&) = delete;
  Config& operator=(const Config&) = delete;
  ~Config() {
    if (has_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (has_alg) cusparseLtMatmulAlgSelectionDestroy(&alg);
  }
};

// The operand descriptors of one (m, k, t, dtype, layout) problem, and the
// configuration in use.
struct Plan {
  const cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t a, b, c;
  bool has_a = false, has_b = false, has_c = false;
  std::unique_ptr<Config> cfg;  // null until built (or after a failed rebuild)
  bool searched = false;
  bool from_cache = false;  // the configuration came from jasp_cslt_preset, not a search
  cudaDataType type = CUDA_R_16BF;
  int alg_id = 0;         // the configuration chosen
  float search_ms = -1;   // its per-call time in the search (-1: not searched)
  const void* bias = nullptr;

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    cfg.reset();
    if (has_c) cusparseLtMatDescriptorDestroy(&c);
    if (has_b) cusparseLtMatDescriptorDestroy(&b);
    if (has_a) cusparseLtMatDescriptorDestroy(&a);
  }

  size_t workspace() const { return cfg ? cfg->workspace : 0; }

  // Builds configuration `id` over these descriptors (and the bias pointer).
  // Plan initialisation is host work that takes up to ~0.3 s per fp16
  // configuration (cuSPARSELt 0.8.0 and 0.10.0, H100), so the search builds
  // each candidate once.
  cusparseStatus_t Build(int id, std::unique_ptr<Config>* out) const {
    auto cf = std::make_unique<Config>();
    cf->id = id;
    cusparseStatus_t s = cusparseLtMatmulDescriptorInit(
        handle, &cf->mm, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_TRANSPOSE, &a, &b,
        &c, &c, CUSPARSE_COMPUTE_32F);
    if (s != CUSPARSE_STATUS_SUCCESS) return s;
    if (bias != nullptr) {
      void* ptr = const_cast<void*>(bias);
      s = cusparseLtMatmulDescSetAttribute(handle, &cf->mm, CUSPARSELT_MATMUL_BIAS_POINTER, &ptr,
                                           sizeof(ptr));
      if (s != CUSPARSE_STATUS_SUCCESS) return s;
    }
    s = cusparseLtMatmulAlgSelectionInit(handle, &cf->alg, &cf->mm, CUSPARSELT_MATMUL_ALG_DEFAULT);
    if (s != CUSPARSE_STATUS_SUCCESS) return s;
    cf->has_alg = true;
    s = cusparseLtMatmulAlgSetAttribute(handle, &cf->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &id,
                                        sizeof(id));
    if (s != CUSPARSE_STATUS_SUCCESS) return s;
    s = cusparseLtMatmulPlanInit(handle, &cf->plan, &cf->mm, &cf->alg);
    if (s != CUSPARSE_STATUS_SUCCESS) return s;
    cf->has_plan = true;
    s = cusparseLtMatmulGetWorkspace(handle, &cf->plan, &cf->workspace);
    if (s != CUSPARSE_STATUS_SUCCESS) return s;
    *out = std::move(cf);
    return CUSPARSE_STATUS_SUCCESS;
  }

  // Makes configuration `id` the one in use (none on failure).
  cusparseStatus_t Select(int id) {
    cfg.reset();
    cusparseStatus_t s = Build(id, &cfg);
    if (s == CUSPARSE_STATUS_SUCCESS) alg_id = id;
    return s;
  }
};

using PlanKey = std::tuple<int32_t, int64_t, int64_t, int64_t, int, int64_t, int64_t>;
std::map<PlanKey, std::unique_ptr<Plan>> g_plans;

// Search results of earlier processes (jasp_cslt_preset, from jasp's search
// cache file): (m, k, t, dtype, a_order, bias) -> (configuration, its time).
// A plan whose key is here builds that configuration instead of searching.
using PresetKey = std::tuple<int64_t, int64_t, int64_t, int, int64_t, int64_t>;
std::map<PresetKey, std::pair<int, float>> g_presets;

// The descriptors only; a configuration is built by Select or the search.
ffi::Error MakePlan(const cusparseLtHandle_t* h, int64_t m, int64_t k, int64_t t,
                    cudaDataType type, int64_t a_order, Plan* p) {
  p->handle = h;
  p->type = type;
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
  return ffi::Error::Success();
}

// The bias pointer lives in the matmul descriptor: re-initialise the plan when
// it changes (a parameter's buffer normally keeps its address across calls).
// A plan without a configuration yet only records the pointer: the search or
// the first Select builds with it.
ffi::Error SetBias(Plan* p, const void* bias) {
  if (p->bias == bias) return ffi::Error::Success();
  p->bias = bias;
  if (p->cfg) JASP_CSLT(p->Select(p->alg_id));
  return ffi::Error::Success();
}

// cuSPARSELt 0.8.x on Hopper: every fp16 algorithm configuration from 36 on
// stops the kernel with CUDA_ERROR_ILLEGAL_INSTRUCTION inside a JAX process,
// leaving the CUDA context unusable (the same configurations run correctly in
// a plain C++ process and under PyTorch; cause unknown, see KNOWN_ISSUES.md).
// Configurations 0-35 run and match the reference, so the search stops at 35
// for fp16 on 0.8.x; -1: no cap.
int Fp16ConfigCap() {
  int major = 0, minor = 0;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  return (major == 0 && minor == 8) ? 35 : -1;
}

// Times every algorithm configuration of the plan (CONFIG_ID 0..MAX_ID) on the
// call's real buffers and keeps the fastest. Each candidate runs with a
// workspace of the size its own plan reports (one buffer of the largest size
// is allocated from XLA's scratch); a configuration that cuSPARSELt refuses,
// or that needs more workspace than XLA could give, is skipped. Per-call time:
// the median of 3 timed repetitions of L back-to-back calls (L chosen so a
// repetition lasts >= ~0.2 ms) after one warm-up call, on XLA's stream
// (which the search synchronises: it runs once per shape).
template <typename AllocFn>
ffi::Error Search(Plan* p, cudaStream_t stream, const void* a, const void* b, void* d,
                  AllocFn&& alloc) {
  const DriverEvents& ev = Events();
  JASP_TRACE("search: driver events %s\n", ev.ok ? "found" : "missing");
  if (!ev.ok) {
    return ffi::Error::Internal(
        "jasp.sparse: the algorithm search needs the CUDA driver's event API (libcuda.so.1)");
  }
  // Configuration 0 (cuSPARSELt's default) is a candidate too; its algorithm
  // selection tells how many configurations there are.
  std::vector<std::unique_ptr<Config>> cands(1);
  JASP_CSLT(p->Build(0, &cands[0]));
  int max_id = 0;
  JASP_CSLT(cusparseLtMatmulAlgGetAttribute(p->handle, &cands[0]->alg,
                                            CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_id,
                                            sizeof(max_id)));
  if (p->type == CUDA_R_16F && Fp16ConfigCap() >= 0 && max_id > Fp16ConfigCap()) {
    JASP_TRACE("search: fp16 configurations > %d skipped (they trap with this cuSPARSELt)\n",
               Fp16ConfigCap());
    max_id = Fp16ConfigCap();
  }
  JASP_TRACE("search: max config id %d\n", max_id);
  size_t need = cands[0]->workspace;
  for (int id = 1; id <= max_id; ++id) {
    std::unique_ptr<Config> cf;
    cusparseStatus_t st = p->Build(id, &cf);
    JASP_TRACE("search: config %d -> status %d, workspace %zu\n", id, static_cast<int>(st),
               cf ? cf->workspace : 0);
    if (st != CUSPARSE_STATUS_SUCCESS) continue;
    need = std::max(need, cf->workspace);
    cands.push_back(std::move(cf));
  }
  void* ws = nullptr;
  size_t have = 0;
  alloc(need, &ws, &have);
  JASP_TRACE("search: %zu candidates, workspace %zu of %zu bytes at %p\n", cands.size(), have,
             need, ws);
  DriverEvents::Event e0 = nullptr, e1 = nullptr;
  if (ev.create(&e0, 0) != 0 || ev.create(&e1, 0) != 0) {
    if (e0) ev.destroy(e0);
    return ffi::Error::Internal("jasp.sparse: cuEventCreate failed in the algorithm search");
  }
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t streams[1] = {stream};
  int best = -1;
  float best_ms = 0;
  auto timed = [&](const Config& cf, int calls, float* ms) -> bool {
    if (ev.record(e0, stream) != 0) return false;
    for (int i = 0; i < calls; ++i) {
      if (cusparseLtMatmul(p->handle, &cf.plan, &alpha, a, b, &beta, d, d, ws, streams, 1) !=
          CUSPARSE_STATUS_SUCCESS) {
        return false;
      }
    }
    if (ev.record(e1, stream) != 0 || ev.synchronize(e1) != 0) return false;
    return ev.elapsed(ms, e0, e1) == 0;
  };
  for (size_t i = 0; i < cands.size(); ++i) {
    const Config& cf = *cands[i];
    if (cf.workspace > have) continue;
    float one = 0;
    JASP_TRACE("search: timing config %d\n", cf.id);
    if (!timed(cf, 1, &one)) continue;  // warm-up (and a first estimate)
    int calls = std::clamp(static_cast<int>(0.2f / std::max(one, 1e-3f)), 1, 64);
    float reps[3];
    bool ok = true;
    for (float& r : reps) {
      float ms = 0;
      ok = ok && timed(cf, calls, &ms);
      r = ms / calls;
    }
    if (!ok) continue;
    std::sort(reps, reps + 3);
    JASP_TRACE("search: config %d: %.4f ms per call\n", cf.id, reps[1]);
    if (best < 0 || reps[1] < best_ms) {
      best = static_cast<int>(i);
      best_ms = reps[1];
    }
  }
  ev.destroy(e0);
  ev.destroy(e1);
  if (best < 0) {
    return ffi::Error::Internal("jasp.sparse: no cuSPARSELt algorithm ran for this shape");
  }
  JASP_TRACE("search: chose config %d (%.4f ms)\n", cands[best]->id, best_ms);
  // The winner's plan is kept as it is (no rebuild).
  p->cfg = std::move(cands[best]);
  p->alg_id = p->cfg->id;
  p->search_ms = best_ms;
  p->searched = true;
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
  JASP_TRACE("matmul m=%lld k=%lld t=%lld a_order=%lld bias=%lld search=%lld\n",
             static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(t),
             static_cast<long long>(a_order), static_cast<long long>(has_bias),
             static_cast<long long>(search));
  if (has_bias) {
    if (auto err = SetBias(p, bias.untyped_data()); err.failure()) return err;
  }
  // Workspace: XLA's scratch allocator, else the fixed-size workspace output.
  // 256-byte aligned (like cudaMalloc's): XLA's scratch allocator takes at
  // most 16-byte alignment, so over-allocate and round up.
  auto alloc = [&](size_t need, void** out, size_t* got) {
    *out = nullptr;
    *got = 0;
    if (need == 0) return;
    const uintptr_t align = kWorkspaceAlignment;
    auto mem = scratch.Allocate(need + align, 16);
    if (mem.has_value()) {
      uintptr_t p = reinterpret_cast<uintptr_t>(*mem);
      *out = reinterpret_cast<void*>((p + align - 1) / align * align);
      *got = need;
    } else {
      *out = ws_out->untyped_data();
      *got = ws_out->size_bytes();
    }
    JASP_TRACE("workspace: %zu bytes at %p from %s\n", need, *out,
               mem.has_value() ? "XLA's scratch allocator" : "the fallback output");
  };
  void* out = y->untyped_data();
  if (search && !p->searched) {
    auto pre = g_presets.find(PresetKey{m, k, t, static_cast<int>(type), a_order, has_bias});
    if (pre != g_presets.end() && p->Select(pre->second.first) == CUSPARSE_STATUS_SUCCESS) {
      p->searched = true;
      p->from_cache = true;
      p->search_ms = pre->second.second;
      JASP_TRACE("search: config %d from the search cache\n", p->alg_id);
    }
  }
  if (search && !p->searched) {
    if (auto err = Search(p, stream, compressed.untyped_data(), x.untyped_data(), out, alloc);
        err.failure()) {
      return err;
    }
  }
  if (!p->cfg) {
    JASP_CSLT(p->Select(p->alg_id));
  }
  void* ws = nullptr;
  size_t got = 0;
  alloc(p->workspace(), &ws, &got);
  if (got < p->workspace()) {
    return ffi::Error::Internal("jasp.sparse: could not allocate the matmul workspace (" +
                                std::to_string(p->workspace()) + " bytes) from XLA");
  }
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t streams[1] = {stream};
  JASP_CSLT(cusparseLtMatmul(h, &p->cfg->plan, &alpha, compressed.untyped_data(), x.untyped_data(),
                             &beta, out, out, ws, streams, 1));
  return ffi::Error::Success();
}

ffi::Error CompressImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer w,
                        ffi::Result<ffi::AnyBuffer> compressed, ffi::Result<ffi::AnyBuffer> buffer,
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
  // The plan-based helpers (not the deprecated descriptor-based *2 ones): with
  // cuSPARSELt 0.8.0, fp16 data compressed by SpMMACompress2 makes some
  // algorithm configurations trap (CUDA_ERROR_ILLEGAL_INSTRUCTION) while the
  // same configurations run correctly on data compressed through a plan.
  Plan cp;
  if (auto err = MakePlan(h, m, k, kCompressTokens, type, a_order, &cp); err.failure()) return err;
  JASP_CSLT(cp.Select(0));
  size_t size = 0, buf_size = 0;
  JASP_CSLT(cusparseLtSpMMACompressedSize(h, &cp.cfg->plan, &size, &buf_size));
  if (compressed->size_bytes() < size || buffer->size_bytes() < buf_size) {
    return ffi::Error::InvalidArgument(
        "jasp.sparse: the compressed buffers are too small (" +
        std::to_string(compressed->size_bytes()) + " < " + std::to_string(size) + " or " +
        std::to_string(buffer->size_bytes()) + " < " + std::to_string(buf_size) + " bytes)");
  }
  JASP_CSLT(cusparseLtSpMMACompress(h, &cp.cfg->plan, w.untyped_data(), compressed->untyped_data(),
                                    buffer->untyped_data(), stream));
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
  Plan cp;
  if (auto e = MakePlan(h, m, k, kCompressTokens, CodeType(dtype), a_order, &cp); e.failure()) {
    return fail("jasp.sparse: a " + std::to_string(m) + "x" + std::to_string(k) +
                " operand: " + std::string(e.message()));
  }
  cusparseStatus_t s = cp.Select(0);
  if (s != CUSPARSE_STATUS_SUCCESS) {
    return fail("jasp.sparse: a " + std::to_string(m) + "x" + std::to_string(k) +
                " operand: building its plan failed: " + StatusText(s));
  }
  size_t size = 0, buffer = 0;
  s = cusparseLtSpMMACompressedSize(h, &cp.cfg->plan, &size, &buffer);
  if (s != CUSPARSE_STATUS_SUCCESS) {
    return fail("cusparseLtSpMMACompressedSize failed: " + StatusText(s));
  }
  *bytes = static_cast<int64_t>(size);
  *buffer_bytes = static_cast<int64_t>(buffer);
  return 0;
}

// The cached plans, one line each: "device m k t dtype a_order bias alg_id
// search_ms workspace from_cache" (dtype 0 = bf16, 1 = fp16; search_ms -1 if
// not searched; from_cache 1 if the configuration came from jasp_cslt_preset).
// Writes at most len-1 bytes into buf; returns the length the full text needs.
int jasp_cslt_plans(char* buf, int len) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::string out;
  for (const auto& [key, p] : g_plans) {
    auto [device, m, k, t, type, a_order, bias] = key;
    char line[256];
    std::snprintf(line, sizeof(line), "%d %lld %lld %lld %d %lld %lld %d %.6f %zu %d\n", device,
                  static_cast<long long>(m), static_cast<long long>(k),
                  static_cast<long long>(t), type == CUDA_R_16F ? 1 : 0,
                  static_cast<long long>(a_order), static_cast<long long>(bias), p->alg_id,
                  p->search_ms, p->workspace(), p->from_cache ? 1 : 0);
    out += line;
  }
  if (buf && len > 0) {
    std::strncpy(buf, out.c_str(), len - 1);
    buf[len - 1] = 0;
  }
  return static_cast<int>(out.size()) + 1;
}

// Records the configuration an earlier search chose for (m, k, t, dtype,
// a_order, bias) (dtype 0 = bf16, 1 = fp16): plans of that key made from now on
// build it instead of searching (a configuration that fails to build is
// searched for as usual). search_ms is reported back by jasp_cslt_plans.
void jasp_cslt_preset(int64_t m, int64_t k, int64_t t, int32_t dtype, int64_t a_order,
                      int64_t bias, int32_t alg_id, float search_ms) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_presets[PresetKey{m, k, t, static_cast<int>(CodeType(dtype)), a_order, bias ? 1 : 0}] = {
      alg_id, search_ms};
}

// cuSPARSELt's version as major*10000 + minor*100 + patch.
int jasp_cslt_version() {
  int major = 0, minor = 0, patch = 0;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  cusparseLtGetProperty(PATCH_LEVEL, &patch);
  return major * 10000 + minor * 100 + patch;
}

// The version of the cusparseLt.h this file was compiled against, in the same
// encoding (-1 if the header defines no version macros).
int jasp_cslt_header_version() {
#ifdef CUSPARSELT_VER_MAJOR
  return CUSPARSELT_VER_MAJOR * 10000 + CUSPARSELT_VER_MINOR * 100 + CUSPARSELT_VER_PATCH;
#else
  return -1;
#endif
}

// The file of the libcusparseLt that this extension's calls are bound to:
// another library (PyTorch preloads its own libcusparseLt.so.0) may have put
// a different copy in the process first. Writes at most len bytes (with the
// terminating 0) and returns the length needed; 0 if it cannot be told.
int jasp_cslt_library_path(char* buf, int len) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&cusparseLtInit), &info) == 0 || !info.dli_fname) return 0;
  std::string out(info.dli_fname);
  if (buf && len > 0) {
    std::strncpy(buf, out.c_str(), len - 1);
    buf[len - 1] = 0;
  }
  return static_cast<int>(out.size()) + 1;
}

}  // extern "C"
