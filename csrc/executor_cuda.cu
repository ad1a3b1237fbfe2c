// ffc plan executor for CUDA: runs a whole graph as a sequence of kernel launches on one
// stream from a single Python call (optionally captured once into a CUDA graph per shape).
// Pointers bound from Python are device pointers this executor allocated (ffc_module.h): the
// library links the CUDA runtime statically and the runtime finds the driver (libcuda.so.1) when
// first called, so a GPU machine needs only its driver, neither a CUDA torch nor libcudart.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <tuple>
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
  Executor(int, int device) : device_(device) {
    const std::string why = device_check(device);
    if (!why.empty()) throw std::runtime_error(why);
    for (int i = 0; i < ffc_num_kernels; ++i) kernels_[ffc_kernel_names[i]] = ffc_kernel_table[i];
    use();
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~Executor() {
    cudaSetDevice(device_);
    cudaStreamDestroy(stream_);
  }

  // "" when GPU `ordinal` can run kernels, else why not, in words a user can act on.
  static std::string device_check(int ordinal) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0))
      return "the CUDA driver sees no GPU (is CUDA_VISIBLE_DEVICES empty?)";
    if (e != cudaSuccess) {
      int driver = 0;
      cudaDriverGetVersion(&driver);
      const std::string runtime = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
      std::string why = driver == 0
          ? "no CUDA driver could be loaded (libcuda.so.1 is missing or broken: install the NVIDIA driver)"
          : "the CUDA driver (" + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) +
                ") is older than the CUDA runtime " + runtime + " these kernels were built with: update the driver";
      return why + " [" + cudaGetErrorName(e) + "]";
    }
    if (ordinal < 0 || ordinal >= n)
      return "GPU " + std::to_string(ordinal) + " was asked for, but the CUDA driver sees " + std::to_string(n);
    return "";
  }

  uintptr_t alloc(int64_t bytes) {
    if (bytes < 0) throw std::invalid_argument("alloc: negative size");
    use();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, size_t(std::max<int64_t>(bytes, 1)));
    if (e != cudaSuccess) {
      cudaGetLastError();   // an out-of-memory error is not sticky: clear it
      throw std::runtime_error("cannot allocate " + std::to_string(bytes >> 20) + " MiB on GPU " +
                               std::to_string(device_) + ": " + cudaGetErrorString(e));
    }
    return reinterpret_cast<uintptr_t>(p);
  }
  void release(uintptr_t p) {
    use();
    cudaFree(reinterpret_cast<void*>(p));
  }
  void upload(uintptr_t dst, uintptr_t src, int64_t bytes) { copy(dst, src, bytes, cudaMemcpyHostToDevice, "upload"); }
  void download(uintptr_t dst, uintptr_t src, int64_t bytes) { copy(dst, src, bytes, cudaMemcpyDeviceToHost, "download"); }
  void copy_rows(uintptr_t dst, uintptr_t src, int64_t width, int64_t height, int64_t pitch, int64_t count,
                 int64_t stride) {
    if (width <= 0 || height <= 0 || count <= 0) return;
    use();
    py::gil_scoped_release nogil;
    for (int64_t g = 0; g < count; ++g)   // in order on one stream: a group may read what the one before wrote
      check(cudaMemcpy2DAsync(reinterpret_cast<void*>(dst + g * stride), size_t(pitch),
                              reinterpret_cast<const void*>(src + g * stride), size_t(pitch), size_t(width),
                              size_t(height), cudaMemcpyDeviceToDevice, stream_),
            "copy_rows");
    check(cudaStreamSynchronize(stream_), "copy_rows");
  }
  std::pair<int64_t, int64_t> memory_info() {
    use();
    size_t free = 0, total = 0;
    check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return {int64_t(free), int64_t(total)};
  }

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
    use();
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
    use();
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

  // Trace of one run: (step, 0, start, end) per kernel in steady-clock nanoseconds, the GPU's own
  // times (events on the stream) placed after the host time at which the run began.
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> trace(const std::string& graph, int64_t T, int64_t N,
                                                                     int64_t S) {
    auto it = graphs_.find(graph);
    if (it == graphs_.end()) throw std::runtime_error("graph " + graph + " is not bound");
    const int64_t dims[3] = {T, N, S};
    const std::vector<Step>& prog = it->second;
    use();
    std::vector<cudaEvent_t> ev(2 * prog.size() + 1);
    for (auto& e : ev) check(cudaEventCreate(&e), "cudaEventCreate");
    check(cudaStreamSynchronize(stream_), "trace");
    const int64_t host0 = std::chrono::duration_cast<std::chrono::nanoseconds>(
                              std::chrono::steady_clock::now().time_since_epoch()).count();
    cudaEventRecord(ev[0], stream_);
    for (size_t i = 0; i < prog.size(); ++i) {
      cudaEventRecord(ev[2 * i + 1], stream_);
      prog[i].fn(prog[i].args.data(), dims, stream_);
      cudaEventRecord(ev[2 * i + 2], stream_);
    }
    check(cudaStreamSynchronize(stream_), ("graph " + graph).c_str());
    std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> out;
    for (size_t i = 0; i < prog.size(); ++i) {
      float a = 0.0f, b = 0.0f;
      cudaEventElapsedTime(&a, ev[0], ev[2 * i + 1]);
      cudaEventElapsedTime(&b, ev[0], ev[2 * i + 2]);
      out.emplace_back(int64_t(i), 0, host0 + int64_t(a * 1e6), host0 + int64_t(b * 1e6));
    }
    for (auto& e : ev) cudaEventDestroy(e);
    return out;
  }

  int threads() const { return 1; }

 private:
  // The runtime's current device is per host thread: every entry point selects this executor's.
  void use() const { check(cudaSetDevice(device_), "cudaSetDevice"); }
  // Host <-> device on the executor's stream, so a copy is ordered after the kernels launched before it.
  void copy(uintptr_t dst, uintptr_t src, int64_t bytes, cudaMemcpyKind kind, const char* what) {
    if (bytes <= 0) return;
    use();
    py::gil_scoped_release nogil;
    check(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), size_t(bytes), kind, stream_),
          what);
    check(cudaStreamSynchronize(stream_), what);
  }

  int device_;
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
  const std::string why = Executor::device_check(0);
  if (!why.empty()) throw std::runtime_error(why);
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
