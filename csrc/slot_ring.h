// The slot ring: host-side protocol state one directed channel (sender -> receiver) keeps in
// POSIX shared memory. Host-only (no CUDA); the CUDA engine and the host test ring both use it.
//
//   seq s (1, 2, ...) lives in slot (s - 1) % num_slots.
//   posted   = last seq the sender published (its header is written, its copy enqueued).
//   released = last seq the receiver released (its read is enqueued / done).
//   The sender may write seq s only when released >= s - num_slots (back-pressure).
//   The receiver may read seq s only when posted >= s, and checks slot header seq == s.
//
// Both counters only grow and each has one writer, so plain release/acquire atomics suffice.
// See csrc/README.md for how the CUDA engine layers events on top of this.
#pragma once
#include <sched.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <new>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "errors.h"
#include "message.h"

namespace hdrt {

constexpr uint64_t kRingMagic = 0x31474e5254524448ULL;  // "HDRTRNG1"
constexpr uint32_t kRingVersion = 1;
static_assert(std::atomic<uint64_t>::is_always_lock_free, "need lock-free 64-bit atomics");

// Error codes stored in RingControl::error_code (first error wins).
enum RingError : uint64_t { kNoError = 0, kMismatch = 1, kSenderFailed = 2, kReceiverFailed = 3 };

struct TensorDesc {
  uint64_t nbytes;
  int32_t ndim;
  char dtype[kDtypeChars];
  int64_t shape[kMaxDims];
};

// Describes the chunk a slot holds and the message it belongs to.
struct MessageDesc {
  uint64_t msg_index;      // 1-based message number on this channel
  uint64_t total_bytes;    // packed layout bytes
  uint64_t payload_bytes;  // sum of tensor sizes
  uint64_t chunk_offset;   // in the packed layout
  uint64_t chunk_bytes;
  uint32_t num_chunks;
  uint32_t chunk_index;
  int32_t ntensors;
  char what[kWhatChars];
  TensorDesc tensors[kMaxTensors];
};

struct alignas(64) SlotHeader {
  uint64_t seq;
  MessageDesc desc;
};

struct alignas(64) PaddedCounter {
  std::atomic<uint64_t> v;
};

struct RingControl {
  uint64_t magic;
  uint32_t version;
  uint32_t num_slots;
  uint64_t slot_bytes;
  uint64_t data_offset;  // byte offset of the host data area in the segment, 0 if none
  int32_t sender_rank;
  int32_t receiver_rank;
  PaddedCounter sender_pid;
  PaddedCounter receiver_pid;
  PaddedCounter posted;
  PaddedCounter released;
  PaddedCounter closed;      // bit 1: sender closed, bit 2: receiver closed
  PaddedCounter error_code;  // RingError; message in error_msg
  char error_msg[1024];
  // SlotHeader[num_slots] follows at header_offset()
};

inline uint64_t ring_header_offset() { return align_up(sizeof(RingControl), 64); }
inline uint64_t ring_control_bytes(uint32_t num_slots) {
  return ring_header_offset() + uint64_t(num_slots) * sizeof(SlotHeader);
}
// Segment size; with_data adds a page-aligned host data area of num_slots * slot_bytes.
inline uint64_t ring_segment_bytes(uint32_t num_slots, uint64_t slot_bytes, bool with_data) {
  uint64_t ctl = align_up(ring_control_bytes(num_slots), 4096);
  return with_data ? ctl + uint64_t(num_slots) * slot_bytes : ctl;
}
inline SlotHeader* ring_slots(RingControl* c) {
  return reinterpret_cast<SlotHeader*>(reinterpret_cast<char*>(c) + ring_header_offset());
}

// Initialise a zeroed segment (creator only).
inline void ring_init(void* base, uint32_t num_slots, uint64_t slot_bytes, bool with_data,
                      int sender_rank, int receiver_rank) {
  if (num_slots < 1 || num_slots > 1024)
    throw ProtocolError("num_slots must be in 1..1024, got " + std::to_string(num_slots));
  if (slot_bytes < kTensorAlign || slot_bytes % kTensorAlign)
    throw ProtocolError("slot_bytes must be a positive multiple of 256, got " +
                        std::to_string(slot_bytes));
  auto* c = new (base) RingControl();
  c->version = kRingVersion;
  c->num_slots = num_slots;
  c->slot_bytes = slot_bytes;
  c->data_offset = with_data ? align_up(ring_control_bytes(num_slots), 4096) : 0;
  c->sender_rank = sender_rank;
  c->receiver_rank = receiver_rank;
  std::atomic_thread_fence(std::memory_order_release);
  reinterpret_cast<std::atomic<uint64_t>*>(&c->magic)->store(kRingMagic, std::memory_order_release);
}

// Validate a segment opened by the non-creating side.
inline RingControl* ring_attach(void* base, uint64_t segment_bytes, const std::string& name) {
  auto* c = static_cast<RingControl*>(base);
  if (segment_bytes < sizeof(RingControl) ||
      reinterpret_cast<std::atomic<uint64_t>*>(&c->magic)->load(std::memory_order_acquire) !=
          kRingMagic)
    throw ProtocolError("shared memory segment " + name +
                        " is not a hybridiff_rt slot ring (bad magic)");
  if (c->version != kRingVersion)
    throw ProtocolError("slot ring " + name + " has protocol version " +
                        std::to_string(c->version) + ", this build speaks " +
                        std::to_string(kRingVersion) + "; rebuild both sides from one checkout");
  if (segment_bytes < ring_control_bytes(c->num_slots))
    throw ProtocolError("slot ring " + name + " is truncated");
  return c;
}

// ---------------------------------------------------------------------------------------------
// Liveness and waiting

inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// True unless pid is known to have exited (ESRCH, or a zombie/dead entry in /proc).
inline bool pid_alive(int pid) {
  if (pid <= 0) return true;
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (!f) return true;  // no procfs: trust kill()
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* rp = std::strrchr(buf, ')');  // state follows "pid (comm) "
  if (rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X' || rp[2] == 'x')) return false;
  return true;
}

// How to wait for a peer: timeout, whether its pid can be checked, and a hook called about every
// 20 ms (e.g. to check Python signals or an engine shutdown; it may throw).
struct WaitPolicy {
  int64_t timeout_ms = 30000;
  bool check_pid = true;
  std::function<void()> poll;
};

// Raised when the peer has recorded an error in the shared block.
[[noreturn]] inline void throw_peer_error(RingControl* c, const std::string& who) {
  for (int i = 0; i < 1000000 && c->error_code.v.load(std::memory_order_acquire) == 0xffffffffULL;
       ++i)
    cpu_relax();
  std::string msg(c->error_msg, strnlen(c->error_msg, sizeof(c->error_msg)));
  uint64_t code = c->error_code.v.load(std::memory_order_acquire);
  if (code == kMismatch) throw MessageMismatch(msg);
  throw PeerTimeout(who + ": the channel failed: " + msg);
}

// Record an error for the peer to see (first error wins). The code is claimed with a CAS, the
// message written, then the final code published, so a reader never sees a half-written message.
constexpr uint64_t kErrorWriting = 0xffffffffULL;
inline void ring_set_error(RingControl* c, RingError code, const std::string& msg) {
  uint64_t expected = kNoError;
  if (!c->error_code.v.compare_exchange_strong(expected, kErrorWriting, std::memory_order_acq_rel))
    return;
  std::snprintf(c->error_msg, sizeof(c->error_msg), "%s", msg.c_str());
  c->error_code.v.store(code, std::memory_order_release);
}

// Spin, then yield, then sleep until ready() holds. Throws PeerTimeout when the peer exited,
// closed its end, or the timeout passed; rethrows a peer-recorded error. `peer_pid` is the
// counter holding the peer's pid; `closed_bit` is the peer's bit in RingControl::closed.
template <class Ready>
void ring_wait(RingControl* c, Ready ready, const PaddedCounter& peer_pid, uint64_t closed_bit,
               const WaitPolicy& policy, const std::function<std::string()>& describe) {
  if (ready()) return;
  const int64_t start = now_ns();
  const int64_t deadline = start + policy.timeout_ms * 1000000LL;
  int64_t next_check = start + 20000000LL;  // 20 ms
  uint64_t iter = 0;
  for (;;) {
    if (ready()) return;
    if (c->error_code.v.load(std::memory_order_acquire) != kNoError)
      throw_peer_error(c, describe());
    if (c->closed.v.load(std::memory_order_acquire) & closed_bit)
      throw PeerExited(describe() + ": the peer closed the channel");
    ++iter;
    int64_t t = 0;
    if (iter < 4096) {
      cpu_relax();
      if ((iter & 255) != 0) continue;
      t = now_ns();
      if (t - start < 50000) continue;  // hot spin for the first 50 us
    } else {
      t = now_ns();
      if (t - start < 2000000) {
        sched_yield();
      } else {
        timespec ts{0, 50000};  // 50 us
        nanosleep(&ts, nullptr);
      }
      t = now_ns();
    }
    if (t >= next_check) {
      next_check = t + 20000000LL;
      if (ready()) return;
      int pid = static_cast<int>(peer_pid.v.load(std::memory_order_acquire));
      if (policy.check_pid && pid > 0 && !pid_alive(pid))
        throw PeerExited(describe() + ": the peer process (pid " + std::to_string(pid) +
                          ") exited");
      if (policy.poll) policy.poll();
    }
    if (t >= deadline) {
      if (ready()) return;
      throw PeerTimeout(describe() + ": no answer from the peer within " +
                        std::to_string(policy.timeout_ms) +
                        " ms (it may be stuck, dead, or running a different program; raise "
                        "timeout_s if it is only slow)");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Message descriptions

inline void fill_desc(MessageDesc& d, const std::vector<TensorSpec>& specs, const Plan& plan,
                      uint64_t msg_index, uint32_t chunk_index, const std::string& what) {
  std::memset(&d, 0, sizeof(d));
  d.msg_index = msg_index;
  d.total_bytes = plan.total_bytes;
  d.payload_bytes = plan.payload_bytes;
  d.chunk_offset = plan.chunks[chunk_index].offset;
  d.chunk_bytes = plan.chunks[chunk_index].bytes;
  d.num_chunks = static_cast<uint32_t>(plan.chunks.size());
  d.chunk_index = chunk_index;
  d.ntensors = static_cast<int32_t>(specs.size());
  std::snprintf(d.what, sizeof(d.what), "%s", what.c_str());
  for (size_t i = 0; i < specs.size(); ++i) {
    TensorDesc& t = d.tensors[i];
    t.nbytes = specs[i].nbytes;
    t.ndim = static_cast<int32_t>(specs[i].shape.size());
    std::snprintf(t.dtype, sizeof(t.dtype), "%s", specs[i].dtype.c_str());
    for (size_t k = 0; k < specs[i].shape.size(); ++k) t.shape[k] = specs[i].shape[k];
  }
}

inline TensorSpec desc_spec(const TensorDesc& t) {
  TensorSpec s;
  s.dtype = std::string(t.dtype, strnlen(t.dtype, sizeof(t.dtype)));
  int nd = t.ndim < 0 ? 0 : (t.ndim > kMaxDims ? kMaxDims : t.ndim);
  s.shape.assign(t.shape, t.shape + nd);
  s.nbytes = t.nbytes;
  return s;
}

inline std::string specs_str(const std::vector<TensorSpec>& specs) {
  std::string out = "[";
  for (size_t i = 0; i < specs.size(); ++i) out += (i ? ", " : "") + spec_str(specs[i]);
  return out + "]";
}

// Empty string when the slot's chunk is what the receiver expects, else why not.
inline std::string desc_mismatch(const MessageDesc& got, const std::vector<TensorSpec>& want,
                                 const Plan& plan, uint64_t msg_index, uint32_t chunk_index) {
  if (got.msg_index != msg_index)
    return "it holds message " + std::to_string(got.msg_index) + ", expected message " +
           std::to_string(msg_index);
  if (got.chunk_index != chunk_index || got.num_chunks != plan.chunks.size())
    return "it holds chunk " + std::to_string(got.chunk_index) + " of " +
           std::to_string(got.num_chunks) + ", expected chunk " + std::to_string(chunk_index) +
           " of " + std::to_string(plan.chunks.size());
  std::vector<TensorSpec> sent;
  int n = got.ntensors < 0 ? 0 : (got.ntensors > kMaxTensors ? kMaxTensors : got.ntensors);
  for (int i = 0; i < n; ++i) sent.push_back(desc_spec(got.tensors[i]));
  bool same = sent.size() == want.size();
  for (size_t i = 0; same && i < sent.size(); ++i)
    same = sent[i].dtype == want[i].dtype && sent[i].shape == want[i].shape &&
           sent[i].nbytes == want[i].nbytes;
  if (!same)
    return "the sender sent " + std::to_string(sent.size()) + " tensor(s) " + specs_str(sent) +
           " but the receiver expects " + std::to_string(want.size()) + " tensor(s) " +
           specs_str(want);
  if (got.total_bytes != plan.total_bytes || got.chunk_bytes != plan.chunks[chunk_index].bytes ||
      got.chunk_offset != plan.chunks[chunk_index].offset)
    return "the chunk layout differs (sender total " + std::to_string(got.total_bytes) +
           " B, receiver total " + std::to_string(plan.total_bytes) + " B)";
  return "";
}

// ---------------------------------------------------------------------------------------------
// The two endpoints of a channel. Neither owns the memory; both are cheap to copy.

struct RingEndpoint {
  RingControl* ctl = nullptr;
  std::string label;  // e.g. "channel rank 0 -> rank 1"
  uint32_t slot_of(uint64_t seq) const { return uint32_t((seq - 1) % ctl->num_slots); }
  SlotHeader& header(uint32_t slot) const { return ring_slots(ctl)[slot]; }
  void check_error() const {
    if (ctl->error_code.v.load(std::memory_order_acquire) != kNoError)
      throw_peer_error(ctl, label);
  }
};

struct RingSender : RingEndpoint {
  uint64_t next_seq = 1;    // next sequence number to write
  uint64_t next_msg = 1;    // next message index

  // Register this process as the sender (fails if another live sender is attached).
  void attach(int pid) {
    uint64_t expected = 0;
    if (!ctl->sender_pid.v.compare_exchange_strong(expected, uint64_t(pid)))
      throw ProtocolError(label + ": a sender (pid " + std::to_string(expected) +
                          ") is already attached");
  }
  // Block until the slot for `seq` may be overwritten; returns the slot index.
  uint32_t acquire(uint64_t seq, const WaitPolicy& policy) {
    check_error();
    const uint64_t n = ctl->num_slots;
    if (seq > n) {
      ring_wait(
          ctl,
          [&] { return ctl->released.v.load(std::memory_order_acquire) >= seq - n; },
          ctl->receiver_pid, 2, policy, [&] {
            return label + ": sender waits for the receiver to release sequence " +
                   std::to_string(seq - n) + " (slot " + std::to_string(slot_of(seq)) +
                   ") before writing sequence " + std::to_string(seq);
          });
    }
    return slot_of(seq);
  }
  // Publish sequence `seq` (its header and payload, or the copy producing it, are in place).
  void post(uint64_t seq) {
    if (seq != ctl->posted.v.load(std::memory_order_relaxed) + 1)
      throw ProtocolError(label + ": sequence " + std::to_string(seq) +
                          " posted out of order (last posted " +
                          std::to_string(ctl->posted.v.load()) + ")");
    ctl->posted.v.store(seq, std::memory_order_release);
  }
  void close() { ctl->closed.v.fetch_or(1, std::memory_order_acq_rel); }
};

struct RingReceiver : RingEndpoint {
  uint64_t next_seq = 1;
  uint64_t next_msg = 1;

  void attach(int pid) {
    uint64_t expected = 0;
    if (!ctl->receiver_pid.v.compare_exchange_strong(expected, uint64_t(pid)))
      throw ProtocolError(label + ": a receiver (pid " + std::to_string(expected) +
                          ") is already attached");
  }
  // Block until `seq` is posted; check the slot holds it; returns the slot index.
  uint32_t wait_posted(uint64_t seq, const WaitPolicy& policy, const std::string& what) {
    check_error();
    ring_wait(
        ctl, [&] { return ctl->posted.v.load(std::memory_order_acquire) >= seq; },
        ctl->sender_pid, 1, policy, [&] {
          return label + ": receiver waits for sequence " + std::to_string(seq) + " (slot " +
                 std::to_string(slot_of(seq)) + ", '" + what + "')";
        });
    const uint32_t slot = slot_of(seq);
    const uint64_t held = header(slot).seq;
    if (held != seq) {
      std::string msg = label + ": slot " + std::to_string(slot) + " holds sequence " +
                        std::to_string(held) + " but sequence " + std::to_string(seq) +
                        " was expected ('" + what + "'); the shared state is corrupt or two "
                        "senders share the channel";
      ring_set_error(ctl, kReceiverFailed, msg);
      throw ProtocolError(msg);
    }
    return slot;
  }
  // Refuse the message in `slot`: record the reason for the sender and throw.
  [[noreturn]] void refuse(uint32_t slot, uint64_t seq, const std::string& why,
                           const std::string& what) {
    const MessageDesc& d = header(slot).desc;
    std::string msg = label + ": refused sequence " + std::to_string(seq) + " in slot " +
                      std::to_string(slot) + " (sender '" +
                      std::string(d.what, strnlen(d.what, sizeof(d.what))) + "', receiver '" +
                      what + "'): " + why;
    ring_set_error(ctl, kMismatch, msg);
    throw MessageMismatch(msg);
  }
  // Release `seq` (must be the oldest unreleased one): the sender may now reuse its slot.
  void release(uint64_t seq) {
    if (seq != ctl->released.v.load(std::memory_order_relaxed) + 1)
      throw ProtocolError(label + ": sequence " + std::to_string(seq) +
                          " released out of order (last released " +
                          std::to_string(ctl->released.v.load()) + ")");
    ctl->released.v.store(seq, std::memory_order_release);
  }
  void close() { ctl->closed.v.fetch_or(2, std::memory_order_acq_rel); }
};

}  // namespace hdrt
