// The only device code: a kernel that keeps a stream busy for a given time (tests use it to make a
// consumer slow without a host sleep). Kept free of pybind11 so nvcc compiles it quickly.
// A build without nvcc (pip CUDA runtime, see CMakeLists.txt) compiles this file as C++: there
// is no device code then, and device_sleep reports cudaErrorNotSupported (torch.cuda._sleep is
// the stand-in).
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>

namespace {

__global__ void sleep_kernel(uint64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

}  // namespace

namespace hdrt {

// Enqueue a one-thread kernel on `stream` that returns after `ns` nanoseconds of GPU time.
cudaError_t launch_device_sleep(cudaStream_t stream, uint64_t ns) {
  sleep_kernel<<<1, 1, 0, stream>>>(ns);
  return cudaGetLastError();
}

}  // namespace hdrt

#else  // host C++ only
#include <cuda_runtime_api.h>

namespace hdrt {

cudaError_t launch_device_sleep(cudaStream_t, uint64_t) { return cudaErrorNotSupported; }

}  // namespace hdrt
#endif
