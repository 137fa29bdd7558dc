// The only device code: a kernel that keeps a stream busy for a given time (tests use it to make a
// consumer slow without a host sleep). Kept free of pybind11 so nvcc compiles it quickly.
#include <cuda_runtime.h>

#include <cstdint>

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
