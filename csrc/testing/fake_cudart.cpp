// A stand-in CUDA runtime for testing the transfer engine's host logic without a GPU
// (CMake -DHYBRIDIFF_RT_FAKE_CUDA=ON; never in a release build).
//
// "Device" memory is POSIX shared memory so CUDA IPC memory handles work across processes;
// copies are synchronous memcpy; streams and events are inert (every operation has completed when
// it returns, so any event wait is trivially satisfied). The engine's sequence/slot protocol,
// chunking, worker thread, tickets and error paths run for real; GPU-side ordering does not.
// Test hooks (fake_cudart.h): a "stuck" mode in which nothing ever completes, and counters of
// released resources.
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>

#include "fake_cudart.h"

namespace {
std::mutex g_mu;
std::map<void*, std::pair<std::string, size_t>> g_allocs;  // cudaMalloc'd: shm name, size
std::map<void*, size_t> g_opened;                          // IPC-opened mappings
std::atomic<int> g_counter{0};
thread_local int g_device = 0;
struct FakeEvent { int dummy; };
struct FakeStream { int dummy; };
std::atomic<bool> g_stuck{false}, g_streams_stuck{false};
std::map<std::string, long> g_counts;  // guarded by g_mu
void count(const char* what) {
  std::lock_guard<std::mutex> lk(g_mu);
  ++g_counts[what];
}
}  // namespace

namespace hdrt {
namespace fake {
void set_stuck(bool stuck, bool streams) {
  g_stuck = stuck;
  g_streams_stuck = stuck && streams;
}
std::map<std::string, long> counters() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_counts;
}
}  // namespace fake
}  // namespace hdrt

extern "C" {

cudaError_t CUDARTAPI cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDevice(int* d) { *d = g_device; return cudaSuccess; }
cudaError_t CUDARTAPI cudaSetDevice(int d) { if (d != 0) return cudaErrorInvalidDevice; g_device = d; return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
const char* CUDARTAPI cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorFake"; }
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "fake CUDA runtime error"; }
cudaError_t CUDARTAPI cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t CUDARTAPI cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceCanAccessPeer(int* ok, int, int) { *ok = 0; return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceGetPCIBusId(char* bus, int len, int) { std::snprintf(bus, len, "0000:00:00.0"); return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDeviceProperties(struct cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof(*p));
  std::snprintf(p->name, sizeof(p->name), "fake device");
  p->major = 9;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMalloc(void** ptr, size_t size) {
  // A random per-process part: a process that died without cudaFree leaves its segment behind,
  // and a later process given the same pid must not collide with it (O_EXCL would fail).
  static const unsigned nonce = std::random_device{}();
  char name[64];
  std::snprintf(name, sizeof(name), "/hdrt_fakedev_%d_%08x_%d", getpid(), nonce, g_counter++);
  int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return cudaErrorMemoryAllocation;
  if (ftruncate(fd, size) != 0) { close(fd); shm_unlink(name); return cudaErrorMemoryAllocation; }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) { shm_unlink(name); return cudaErrorMemoryAllocation; }
  std::lock_guard<std::mutex> lk(g_mu);
  g_allocs[p] = {name, size};
  *ptr = p;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  count("cudaFree");
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_allocs.find(ptr);
  if (it == g_allocs.end()) return cudaErrorInvalidValue;
  munmap(ptr, it->second.second);
  shm_unlink(it->second.first.c_str());
  g_allocs.erase(it);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaIpcGetMemHandle(cudaIpcMemHandle_t* h, void* ptr) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_allocs.find(ptr);
  if (it == g_allocs.end()) return cudaErrorInvalidValue;
  std::memset(h, 0, sizeof(*h));
  std::snprintf(h->reserved, sizeof(h->reserved), "%s", it->second.first.c_str());
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaIpcOpenMemHandle(void** ptr, cudaIpcMemHandle_t h, unsigned int) {
  int fd = shm_open(h.reserved, O_RDWR, 0600);
  if (fd < 0) return cudaErrorInvalidResourceHandle;
  struct stat st;
  fstat(fd, &st);
  void* p = mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return cudaErrorMapBufferObjectFailed;
  std::lock_guard<std::mutex> lk(g_mu);
  g_opened[p] = st.st_size;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaIpcCloseMemHandle(void* ptr) {
  count("cudaIpcCloseMemHandle");
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_opened.find(ptr);
  if (it == g_opened.end()) return cudaErrorInvalidValue;
  munmap(ptr, it->second);
  g_opened.erase(it);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaHostRegister(void*, size_t, unsigned int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaHostUnregister(void*) { count("cudaHostUnregister"); return cudaSuccess; }

cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  *e = reinterpret_cast<cudaEvent_t>(new FakeEvent());
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t e) { delete reinterpret_cast<FakeEvent*>(e); return cudaSuccess; }
cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaEventQuery(cudaEvent_t) { return g_stuck ? cudaErrorNotReady : cudaSuccess; }
cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t) {
  count("cudaEventSynchronize");
  while (g_stuck) usleep(1000);  // like a real GPU stream that never reaches the event
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaIpcGetEventHandle(cudaIpcEventHandle_t* h, cudaEvent_t) {
  std::memset(h, 0x5a, sizeof(*h));
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaIpcOpenEventHandle(cudaEvent_t* e, cudaIpcEventHandle_t) {
  *e = reinterpret_cast<cudaEvent_t>(new FakeEvent());
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetStreamPriorityRange(int* lo, int* hi) { *lo = 0; *hi = -1; return cudaSuccess; }
cudaError_t CUDARTAPI cudaStreamCreateWithPriority(cudaStream_t* s, unsigned int, int) {
  *s = reinterpret_cast<cudaStream_t>(new FakeStream());
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t s) {
  count("cudaStreamDestroy");
  delete reinterpret_cast<FakeStream*>(s);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamQuery(cudaStream_t) {
  return g_streams_stuck ? cudaErrorNotReady : cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemcpyAsync(void* dst, const void* src, size_t n, enum cudaMemcpyKind,
                                      cudaStream_t) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}

}  // extern "C"

namespace hdrt {
cudaError_t launch_device_sleep(cudaStream_t, uint64_t ns) {
  usleep(static_cast<useconds_t>(ns / 1000));
  return cudaSuccess;
}
}  // namespace hdrt
