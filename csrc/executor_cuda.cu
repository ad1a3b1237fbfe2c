// ffc plan executor for CUDA: runs a whole graph as a sequence of kernel launches on one
// stream from a single Python call (optionally captured once into a CUDA graph per shape).
// Pointers bound from Python are device pointers (torch CUDA tensors).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "ffc_cuda.h"
#include "ffc_module.h"


namespace py = pybind11;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

struct Step {
  ffc_kernel_fn fn;
  std::vector<void*> args;
  std::string name;
};

class Executor {
 public:
  explicit Executor(int) {
    for (int i = 0; i < ffc_num_kernels; ++i) kernels_[ffc_kernel_names[i]] = ffc_kernel_table[i];
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~Executor() { cudaStreamDestroy(stream_); }

  void bind(const std::string& graph, const std::vector<std::pair<std::string, std::vector<uintptr_t>>>& steps) {
    std::vector<Step> prog;
    for (const auto& s : steps) {
      auto it = kernels_.find(s.first);
      if (it == kernels_.end()) throw std::runtime_error("kernel " + s.first + " is not in this library; rebuild it");
      Step st{it->second, {}, s.first};
      for (uintptr_t a : s.second) st.args.push_back(reinterpret_cast<void*>(a));
      prog.push_back(std::move(st));
    }
    graphs_[graph] = std::move(prog);
  }

  void run(const std::string& graph, int64_t T, int64_t N, int64_t S) {
    auto it = graphs_.find(graph);
    if (it == graphs_.end()) throw std::runtime_error("graph " + graph + " is not bound");
    const int64_t dims[3] = {T, N, S};
    py::gil_scoped_release nogil;
    for (const Step& s : it->second) {
      s.fn(s.args.data(), dims, stream_);
      cudaError_t e = cudaPeekAtLastError();
      if (e != cudaSuccess) throw std::runtime_error("kernel " + s.name + " failed to launch: " + cudaGetErrorString(e));
    }
    check(cudaStreamSynchronize(stream_), ("graph " + graph).c_str());
  }

  std::vector<double> profile(const std::string& graph, int64_t T, int64_t N, int64_t S) {
    auto it = graphs_.find(graph);
    if (it == graphs_.end()) throw std::runtime_error("graph " + graph + " is not bound");
    const int64_t dims[3] = {T, N, S};
    std::vector<double> out;
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (const Step& s : it->second) {
      cudaEventRecord(a, stream_);
      s.fn(s.args.data(), dims, stream_);
      cudaEventRecord(b, stream_);
      cudaEventSynchronize(b);
      float ms = 0.0f;
      cudaEventElapsedTime(&ms, a, b);
      out.push_back(ms * 1e-3);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return out;
  }

  int threads() const { return 1; }

 private:
  cudaStream_t stream_{};
  std::unordered_map<std::string, ffc_kernel_fn> kernels_;
  std::unordered_map<std::string, std::vector<Step>> graphs_;
};

__global__ void ffc_read_kernel(const float4* a, int64_t n, float* sink) {
  float s = 0.0f;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = a[i];
    s += v.x + v.y + v.z + v.w;
  }
  if (s == 12345.678f) *sink = s;  // keeps the loads alive
}

double read_bandwidth(int64_t bytes, int reps, int) {
  const int64_t n = bytes / sizeof(float4);
  float4* a = nullptr;
  float* sink = nullptr;
  check(cudaMalloc(&a, n * sizeof(float4)), "cudaMalloc");
  check(cudaMalloc(&sink, sizeof(float)), "cudaMalloc");
  cudaMemset(a, 0, n * sizeof(float4));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(e0);
    ffc_read_kernel<<<1024, 256>>>(a, n, sink);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, e0, e1);
    best = std::max(best, double(n * sizeof(float4)) / (ms * 1e-3));
  }
  cudaFree(a);
  cudaFree(sink);
  return best;
}

}  // namespace

PYBIND11_MODULE(ffc_kernels, m) {
  ffc_define_module<Executor>(m, "ffc generated CUDA kernels and plan executor", std::string("cuda"), &read_bandwidth);
}

// The extension's entry point, PyInit_<the build's name>, sits in a one-line object build.ninja
// generates (module_init.o) and returns this definition: the name changes with every edit of the
// sources, this file does not, so ninja never recompiles it for an edit elsewhere.
extern "C" __attribute__((visibility("hidden"))) PyObject* ffc_module_init() { return PyInit_ffc_kernels(); }
