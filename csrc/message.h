// Packing of a message (a list of tensors) into fixed-size ring slots. Host-only, no CUDA.
//
// A message's tensors are laid out back to back, each starting at a multiple of kTensorAlign
// bytes ("packed layout"). The packed layout is cut into chunks of at most slot_bytes; chunk c
// occupies one slot and one sequence number. Both sides compute the same plan from their own
// tensor list, so the receiver can check the sender's description before reading.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "errors.h"

namespace hdrt {

constexpr uint64_t kTensorAlign = 256;  // bytes
constexpr int kMaxTensors = 64;
constexpr int kMaxDims = 8;
constexpr int kDtypeChars = 16;
constexpr int kWhatChars = 64;

// What one tensor of a message is: dtype name (e.g. "float16"), shape, payload bytes.
struct TensorSpec {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
};

// One contiguous copy between a tensor and a slot: bytes [tensor_offset, +bytes) of tensor
// `tensor` go to/come from bytes [slot_offset, +bytes) of the chunk's slot.
struct Segment {
  int tensor;
  uint64_t tensor_offset;
  uint64_t slot_offset;
  uint64_t bytes;
};

struct Chunk {
  uint64_t offset;  // in the packed layout
  uint64_t bytes;
  std::vector<Segment> segments;
};

struct Plan {
  std::vector<uint64_t> tensor_offsets;  // in the packed layout
  uint64_t total_bytes = 0;              // packed layout size (includes alignment padding)
  uint64_t payload_bytes = 0;            // sum of tensor sizes
  std::vector<Chunk> chunks;             // at least one (an empty message is one empty chunk)
};

inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

inline std::string spec_str(const TensorSpec& s) {
  std::string out = s.dtype + "[";
  for (size_t i = 0; i < s.shape.size(); ++i) out += (i ? "," : "") + std::to_string(s.shape[i]);
  return out + "] (" + std::to_string(s.nbytes) + " B)";
}

inline void check_specs(const std::vector<TensorSpec>& specs) {
  if (specs.size() > static_cast<size_t>(kMaxTensors))
    throw ProtocolError("a message holds at most " + std::to_string(kMaxTensors) +
                        " tensors, got " + std::to_string(specs.size()) +
                        "; send them as several messages");
  for (const auto& s : specs) {
    if (s.dtype.empty() || s.dtype.size() >= static_cast<size_t>(kDtypeChars))
      throw ProtocolError("dtype name must have 1.." + std::to_string(kDtypeChars - 1) +
                          " characters, got '" + s.dtype + "'");
    if (s.shape.size() > static_cast<size_t>(kMaxDims))
      throw ProtocolError("tensors of at most " + std::to_string(kMaxDims) +
                          " dimensions can be sent, got " + std::to_string(s.shape.size()));
  }
}

// Cut the packed layout of `specs` into chunks of at most slot_bytes.
inline Plan make_plan(const std::vector<TensorSpec>& specs, uint64_t slot_bytes) {
  if (slot_bytes < kTensorAlign || slot_bytes % kTensorAlign != 0)
    throw ProtocolError("slot_bytes must be a positive multiple of " +
                        std::to_string(kTensorAlign) + ", got " + std::to_string(slot_bytes));
  check_specs(specs);
  Plan p;
  uint64_t off = 0;
  for (const auto& s : specs) {
    off = align_up(off, kTensorAlign);
    p.tensor_offsets.push_back(off);
    off += s.nbytes;
    p.payload_bytes += s.nbytes;
  }
  p.total_bytes = off;
  const uint64_t n_chunks = std::max<uint64_t>(1, (off + slot_bytes - 1) / slot_bytes);
  for (uint64_t c = 0; c < n_chunks; ++c) {
    Chunk ch;
    ch.offset = c * slot_bytes;
    ch.bytes = std::min(slot_bytes, off - std::min(off, ch.offset));
    const uint64_t end = ch.offset + ch.bytes;
    for (size_t t = 0; t < specs.size(); ++t) {
      const uint64_t t0 = p.tensor_offsets[t], t1 = t0 + specs[t].nbytes;
      const uint64_t a = std::max(t0, ch.offset), b = std::min(t1, end);
      if (a < b) ch.segments.push_back({static_cast<int>(t), a - t0, a - ch.offset, b - a});
    }
    p.chunks.push_back(std::move(ch));
  }
  return p;
}

}  // namespace hdrt
