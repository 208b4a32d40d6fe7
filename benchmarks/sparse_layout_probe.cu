// Which cuSPARSELt operand layout runs y = x . W fastest on this GPU?
//
// A stand-alone probe (CUDA C++, built with nvcc on the GPU machine by
// benchmarks/sparse_layout_probe.py) that informed the layout jasp.sparse
// uses. For each problem (N out, K in, T tokens) it times, in one process:
//   * dense cuBLAS (cublasGemmEx, fp32 accumulation) with W (K, N) row-major
//     as Flax stores it ("dense");
//   * one cuSPARSELt configuration (argv[2]), after cusparseLtMatmulSearch:
//       a_row   sparse A = W^T (N x K) row-major, B = x (T x K) row-major used
//               transposed, D = y^T (N x T) column-major  (jasp's layout <= 0.1)
//       a_col   as a_row with A column-major (W (K, N) as stored)
//       a_row_bn sparse A row-major, B = x^T (K x T) row-major, D (N x T) row-major:
//               the layout of PyTorch's _cslt_sparse_mm(W, X)
//               (needs x^T and gives y^T: a reference, not a drop-in)
//       b_row   dense A = x (T x K) row-major, sparse B = W (K x N) row-major,
//               D = y (T x N) row-major: no transpose anywhere
//       b_t     dense A = x, sparse B = W^T (N x K) row-major used transposed,
//               D = y (T x N) row-major
// and checks 64 sampled outputs against a float64 host product of the same
// 16-bit operands. Prints one JSON line per problem.
//
// Usage: sparse_layout_probe {bf16|fp16} CONFIG N,K,T [N,K,T ...]
// With PROBE_CONFIG_ID=<id> in the environment it runs that algorithm
// configuration instead of searching.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CK(x)                                                                   \
  do {                                                                          \
    cudaError_t e_ = (x);                                                       \
    if (e_ != cudaSuccess) {                                                    \
      printf("{\"error\": \"%s: %s\"}\n", #x, cudaGetErrorString(e_));          \
      fflush(stdout);                                                           \
      exit(2);                                                                  \
    }                                                                           \
  } while (0)
#define CL(x)                                                                   \
  do {                                                                          \
    cusparseStatus_t s_ = (x);                                                  \
    if (s_ != CUSPARSE_STATUS_SUCCESS) {                                        \
      snprintf(err, sizeof(err), "%s: %s", #x, cusparseLtGetErrorString(s_));   \
      return false;                                                             \
    }                                                                           \
  } while (0)

static char err[512];

__host__ __device__ inline uint32_t mix(uint64_t v) {
  v ^= v >> 33;
  v *= 0xff51afd7ed558ccdULL;
  v ^= v >> 33;
  v *= 0xc4ceb9fe1a85ec53ULL;
  v ^= v >> 33;
  return static_cast<uint32_t>(v);
}

// Logical values: x(t, k) and W(k, n), W 2:4 along k (2 kept of each group of 4).
__host__ __device__ inline float xval(int64_t t, int64_t k) {
  return (mix(t * 1000003ULL + k + 7) % 2001) / 1000.0f - 1.0f;
}
__host__ __device__ inline float wval(int64_t k, int64_t n) {
  uint32_t h = mix((k / 4) * 7919ULL + n * 104729ULL + 1);
  int p1 = h % 4, p2 = (p1 + 1 + (h >> 2) % 3) % 4;
  int p = k % 4;
  if (p != p1 && p != p2) return 0.0f;
  return (mix(k * 31ULL + n * 1000033ULL + 3) % 2001) / 1000.0f - 1.0f;
}

template <typename T>
__device__ inline T from_f(float f);
template <>
__device__ inline __nv_bfloat16 from_f(float f) { return __float2bfloat16(f); }
template <>
__device__ inline __half from_f(float f) { return __float2half(f); }

// Fills a rows x cols matrix (leading dimension ld, row- or column-major) with
// the logical values of x (what=0, logical (t, k)) or W (what=1, logical (k, n));
// `swap` says the stored matrix is the logical one transposed.
template <typename T>
__global__ void fill(T* p, int64_t rows, int64_t cols, int64_t ld, int row_major, int what,
                     int swap) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * cols) return;
  int64_t r = i / cols, c = i % cols;
  int64_t a = swap ? c : r, b = swap ? r : c;
  float v = what == 0 ? xval(a, b) : wval(a, b);
  p[row_major ? r * ld + c : c * ld + r] = from_f<T>(v);
}

template <typename T>
void launch_fill(T* p, int64_t rows, int64_t cols, int64_t ld, int row_major, int what, int swap) {
  int64_t n = rows * cols;
  fill<T><<<(n + 255) / 256, 256>>>(p, rows, cols, ld, row_major, what, swap);
  CK(cudaGetLastError());
}

float round16(float v, bool bf16) {
  if (bf16) return __bfloat162float(__float2bfloat16(v));
  return __half2float(__float2half(v));
}

template <typename T>
float to_f(T v);
template <>
float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
float to_f(__half v) { return __half2float(v); }

template <typename F>
double time_ms(F&& f, cudaStream_t s) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<double> reps;
  for (int r = 0; r < 7; ++r) {
    const int iters = 10;
    CK(cudaEventRecord(a, s));
    for (int i = 0; i < iters; ++i) f();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    reps.push_back(ms / iters);
  }
  std::sort(reps.begin(), reps.end());
  return reps[reps.size() / 2];
}

template <typename T>
bool run(const std::string& cfg, bool bf16, int64_t n, int64_t k, int64_t t, cublasHandle_t cb,
         cusparseLtHandle_t* h, cudaStream_t s) {
  cudaDataType dt = bf16 ? CUDA_R_16BF : CUDA_R_16F;
  T *w = nullptr, *x = nullptr, *y = nullptr, *wd = nullptr, *yd = nullptr;
  CK(cudaMalloc(&w, n * k * sizeof(T)));
  CK(cudaMalloc(&wd, n * k * sizeof(T)));
  CK(cudaMalloc(&x, t * k * sizeof(T)));
  CK(cudaMalloc(&y, t * n * sizeof(T)));
  CK(cudaMalloc(&yd, t * n * sizeof(T)));
  // Dense reference operands: W (K, N) row-major, x (T, K) row-major, y (T, N).
  launch_fill(wd, k, n, n, 1, 1, 0);
  // Layout of the sparse problem.
  cusparseLtMatDescriptor_t da, db, dc;
  cusparseOperation_t opa = CUSPARSE_OPERATION_NON_TRANSPOSE, opb = CUSPARSE_OPERATION_NON_TRANSPOSE;
  bool sparse_a = true;
  bool y_transposed = false;  // D holds y^T (N x T) row-major
  const uint32_t al = 16;
  if (cfg == "a_row" || cfg == "a_col" || cfg == "a_row_bn") {
    if (cfg == "a_col") {
      CL(cusparseLtStructuredDescriptorInit(h, &da, n, k, n, al, dt, CUSPARSE_ORDER_COL,
                                            CUSPARSELT_SPARSITY_50_PERCENT));
      launch_fill(w, n, k, n, 0, 1, 1);
    } else {
      CL(cusparseLtStructuredDescriptorInit(h, &da, n, k, k, al, dt, CUSPARSE_ORDER_ROW,
                                            CUSPARSELT_SPARSITY_50_PERCENT));
      launch_fill(w, n, k, k, 1, 1, 1);
    }
    if (cfg == "a_row_bn") {
      CL(cusparseLtDenseDescriptorInit(h, &db, k, t, t, al, dt, CUSPARSE_ORDER_ROW));
      launch_fill(x, k, t, t, 1, 0, 1);
      CL(cusparseLtDenseDescriptorInit(h, &dc, n, t, t, al, dt, CUSPARSE_ORDER_ROW));
      y_transposed = true;
    } else {
      CL(cusparseLtDenseDescriptorInit(h, &db, t, k, k, al, dt, CUSPARSE_ORDER_ROW));
      launch_fill(x, t, k, k, 1, 0, 0);
      opb = CUSPARSE_OPERATION_TRANSPOSE;
      CL(cusparseLtDenseDescriptorInit(h, &dc, n, t, n, al, dt, CUSPARSE_ORDER_COL));
    }
  } else if (cfg == "b_row" || cfg == "b_t") {
    sparse_a = false;
    CL(cusparseLtDenseDescriptorInit(h, &da, t, k, k, al, dt, CUSPARSE_ORDER_ROW));
    launch_fill(x, t, k, k, 1, 0, 0);
    if (cfg == "b_row") {
      CL(cusparseLtStructuredDescriptorInit(h, &db, k, n, n, al, dt, CUSPARSE_ORDER_ROW,
                                            CUSPARSELT_SPARSITY_50_PERCENT));
      launch_fill(w, k, n, n, 1, 1, 0);
    } else {
      CL(cusparseLtStructuredDescriptorInit(h, &db, n, k, k, al, dt, CUSPARSE_ORDER_ROW,
                                            CUSPARSELT_SPARSITY_50_PERCENT));
      launch_fill(w, n, k, k, 1, 1, 1);
      opb = CUSPARSE_OPERATION_TRANSPOSE;
    }
    CL(cusparseLtDenseDescriptorInit(h, &dc, t, n, n, al, dt, CUSPARSE_ORDER_ROW));
  } else {
    snprintf(err, sizeof(err), "unknown config %s", cfg.c_str());
    return false;
  }
  CK(cudaDeviceSynchronize());
  cusparseLtMatmulDescriptor_t mm;
  CL(cusparseLtMatmulDescriptorInit(h, &mm, opa, opb, &da, &db, &dc, &dc, CUSPARSE_COMPUTE_32F));
  cusparseLtMatmulAlgSelection_t alg;
  CL(cusparseLtMatmulAlgSelectionInit(h, &alg, &mm, CUSPARSELT_MATMUL_ALG_DEFAULT));
  if (const char* forced = getenv("PROBE_CONFIG_ID")) {  // time one configuration, no search
    int id = atoi(forced);
    CL(cusparseLtMatmulAlgSetAttribute(h, &alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &id, sizeof(id)));
  }
  cusparseLtMatmulPlan_t plan;
  CL(cusparseLtMatmulPlanInit(h, &plan, &mm, &alg));
  size_t csize = 0, cbuf = 0;
  CL(cusparseLtSpMMACompressedSize(h, &plan, &csize, &cbuf));
  void *wc = nullptr, *wcbuf = nullptr;
  CK(cudaMalloc(&wc, csize));
  CK(cudaMalloc(&wcbuf, std::max<size_t>(cbuf, 16)));
  CL(cusparseLtSpMMACompress(h, &plan, w, wc, wcbuf, s));
  size_t ws = 0;
  CL(cusparseLtMatmulGetWorkspace(h, &plan, &ws));
  void* wsp = nullptr;
  const size_t ws_cap = 256 << 20;
  CK(cudaMalloc(&wsp, ws_cap));
  float alpha = 1.f, beta = 0.f;
  const void* pa = sparse_a ? wc : static_cast<const void*>(x);
  const void* pb = sparse_a ? static_cast<const void*>(x) : wc;
  auto sparse_call = [&]() {
    cusparseLtMatmul(h, &plan, &alpha, pa, pb, &beta, y, y, wsp, &s, 1);
  };
  // Default algorithm first, then the searched one.
  CL(cusparseLtMatmul(h, &plan, &alpha, pa, pb, &beta, y, y, wsp, &s, 1));
  CK(cudaStreamSynchronize(s));
  double default_ms = time_ms(sparse_call, s);
  if (!getenv("PROBE_CONFIG_ID")) {
    CL(cusparseLtMatmulSearch(h, &plan, &alpha, pa, pb, &beta, y, y, wsp, &s, 1));
  }
  CL(cusparseLtMatmulGetWorkspace(h, &plan, &ws));
  if (ws > ws_cap) {
    snprintf(err, sizeof(err), "workspace %zu > cap", ws);
    return false;
  }
  int alg_id = -1, split_k = -1;
  cusparseLtMatmulAlgGetAttribute(h, &alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id,
                                  sizeof(alg_id));
  cusparseLtMatmulAlgGetAttribute(h, &alg, CUSPARSELT_MATMUL_SPLIT_K, &split_k, sizeof(split_k));
  CL(cusparseLtMatmul(h, &plan, &alpha, pa, pb, &beta, y, y, wsp, &s, 1));
  CK(cudaStreamSynchronize(s));
  double sparse_ms = time_ms(sparse_call, s);
  // Dense cuBLAS: y^T (N x T, col-major) = W^T (N x K, col-major view of W (K, N)) . x^T.
  T* xd = nullptr;
  CK(cudaMalloc(&xd, t * k * sizeof(T)));
  launch_fill(xd, t, k, k, 1, 0, 0);
  CK(cudaDeviceSynchronize());
  auto dense_call = [&]() {
    cublasGemmEx(cb, CUBLAS_OP_N, CUBLAS_OP_N, n, t, k, &alpha, wd, dt, n, xd, dt, k, &beta, yd,
                 dt, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  double dense_ms = time_ms(dense_call, s);
  CK(cudaDeviceSynchronize());
  // Check 64 sampled entries of both products against float64 on the host.
  std::vector<T> hy(t * n), hyd(t * n);
  CK(cudaMemcpy(hy.data(), y, t * n * sizeof(T), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hyd.data(), yd, t * n * sizeof(T), cudaMemcpyDeviceToHost));
  double max_rel = 0, max_rel_dense = 0, scale = 0;
  std::vector<std::pair<int64_t, int64_t>> pts;
  for (int i = 0; i < 64; ++i) pts.push_back({mix(i * 11 + 5) % t, mix(i * 13 + 9) % n});
  std::vector<double> refs;
  for (auto [tt, nn] : pts) {
    double ref = 0;
    for (int64_t kk = 0; kk < k; ++kk) {
      ref += static_cast<double>(round16(xval(tt, kk), bf16)) * round16(wval(kk, nn), bf16);
    }
    refs.push_back(ref);
    scale = std::max(scale, std::fabs(ref));
  }
  for (size_t i = 0; i < pts.size(); ++i) {
    auto [tt, nn] = pts[i];
    float got = to_f(hy[y_transposed ? nn * t + tt : tt * n + nn]);
    float gd = to_f(hyd[tt * n + nn]);
    max_rel = std::max(max_rel, std::fabs(got - refs[i]) / scale);
    max_rel_dense = std::max(max_rel_dense, std::fabs(gd - refs[i]) / scale);
  }
  printf("{\"dtype\": \"%s\", \"config\": \"%s\", \"N\": %ld, \"K\": %ld, \"T\": %ld, "
         "\"dense_ms\": %.5f, \"sparse_default_ms\": %.5f, \"sparse_ms\": %.5f, "
         "\"speedup\": %.4f, \"alg_id\": %d, \"split_k\": %d, \"workspace\": %zu, "
         "\"max_err\": %.3e, \"max_err_dense\": %.3e}\n",
         bf16 ? "bf16" : "fp16", cfg.c_str(), (long)n, (long)k, (long)t, dense_ms, default_ms,
         sparse_ms, dense_ms / sparse_ms, alg_id, split_k, ws, max_rel, max_rel_dense);
  fflush(stdout);
  cusparseLtMatmulPlanDestroy(&plan);
  cusparseLtMatmulAlgSelectionDestroy(&alg);
  cusparseLtMatDescriptorDestroy(&da);
  cusparseLtMatDescriptorDestroy(&db);
  cusparseLtMatDescriptorDestroy(&dc);
  cudaFree(w);
  cudaFree(wd);
  cudaFree(x);
  cudaFree(xd);
  cudaFree(y);
  cudaFree(yd);
  cudaFree(wc);
  cudaFree(wcbuf);
  cudaFree(wsp);
  return true;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s {bf16|fp16} CONFIG N,K,T [N,K,T ...]\n", argv[0]);
    return 1;
  }
  bool bf16 = std::string(argv[1]) == "bf16";
  std::string cfg = argv[2];
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  cublasHandle_t cb;
  cublasCreate(&cb);
  cublasSetStream(cb, s);
  cusparseLtHandle_t h;
  if (cusparseLtInit(&h) != CUSPARSE_STATUS_SUCCESS) {
    printf("{\"error\": \"cusparseLtInit failed\"}\n");
    return 2;
  }
  int major = 0, minor = 0, patch = 0;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  cusparseLtGetProperty(PATCH_LEVEL, &patch);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("{\"device\": \"%s\", \"cusparselt\": \"%d.%d.%d\"}\n", prop.name, major, minor, patch);
  for (int i = 3; i < argc; ++i) {
    long n, k, t;
    if (sscanf(argv[i], "%ld,%ld,%ld", &n, &k, &t) != 3) continue;
    bool ok = bf16 ? run<__nv_bfloat16>(cfg, true, n, k, t, cb, &h, s)
                   : run<__half>(cfg, false, n, k, t, cb, &h, s);
    if (!ok) {
      printf("{\"dtype\": \"%s\", \"config\": \"%s\", \"N\": %ld, \"K\": %ld, \"T\": %ld, "
             "\"error\": \"%s\"}\n", argv[1], cfg.c_str(), n, k, t, err);
      fflush(stdout);
    }
  }
  cusparseLtDestroy(&h);
  return 0;
}
