// Checking CUDA runtime calls: every failure becomes a C++ exception naming the call.
// Only included by CUDA-enabled translation units.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "errors.h"

namespace hdrt {

inline bool cuda_unavailable_code(cudaError_t e) {
  return e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice ||
         e == cudaErrorStubLibrary || e == cudaErrorDevicesUnavailable;
}

inline std::string cuda_error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + std::to_string(static_cast<int>(e)) + "): " +
         cudaGetErrorString(e);
}

// The file name of a __FILE__ path: errors name "ipc_engine.cpp:123", never the build machine's
// source directory.
inline const char* source_file_name(const char* path) {
  const char* name = path;
  for (const char* p = path; *p; ++p)
    if (*p == '/' || *p == '\\') name = p + 1;
  return name;
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  std::string what = call;
  auto paren = what.find('(');
  std::string name = paren == std::string::npos ? what : what.substr(0, paren);
  std::string msg = name + " failed: " + cuda_error_text(e) + " [" + source_file_name(file) + ":" +
                    std::to_string(line) + "]";
  if (cuda_unavailable_code(e))
    throw CudaUnavailable(msg + "; no usable CUDA driver or device: install/upgrade the NVIDIA "
                                "driver, check CUDA_VISIBLE_DEVICES, or use transport='torch'");
  throw CudaCallError(msg);
}

}  // namespace hdrt

#define HDRT_CUDA_CHECK(call)                                           \
  do {                                                                  \
    cudaError_t hdrt_err_ = (call);                                     \
    if (hdrt_err_ != cudaSuccess)                                       \
      ::hdrt::throw_cuda(hdrt_err_, #call, __FILE__, __LINE__);         \
  } while (0)
