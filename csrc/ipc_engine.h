// The CUDA IPC transfer engine (one per rank). See csrc/README.md for the protocol.
//
// Per directed channel src -> dst: the receiver owns num_slots receive slots of slot_bytes each
// (device memory exported with cudaIpcGetMemHandle, or pinned shared host memory when the two
// devices cannot map each other's memory), num_slots "free" IPC events, and the shared-memory
// slot ring (slot_ring.h). The sender owns num_slots "full" IPC events, a copy stream and a
// worker thread that enqueues copies so send() never blocks the caller.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "handles.h"
#include "message.h"
#include "shm_region.h"
#include "slot_ring.h"

namespace hdrt {

// A contiguous device buffer: data pointer, size, and what it holds (for the mismatch check).
struct TensorRef {
  uintptr_t ptr = 0;
  TensorSpec spec;
};

struct EngineConfig {
  int rank = 0;
  int world_size = 1;
  int device = 0;
  uint32_t num_slots = 4;
  uint64_t slot_bytes = 64ull << 20;
  int64_t timeout_ms = 30000;
  std::string shm_prefix;        // unique per job, e.g. "/hdrt_1a2b3c"
  std::vector<int> staging;      // per rank: 0 device, 1 host, ignored for own rank
};

class Engine {
 public:
  explicit Engine(const EngineConfig& cfg);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // This rank's exports for every peer (a blob for decode_exports()).
  std::string export_handles() const;
  // Import `peer`'s exports (its blob); afterwards channels to and from `peer` work.
  void connect(int peer, const std::string& blob, bool check_pid);
  // Remove this rank's shared-memory names once every peer has connected.
  void unlink_shm();

  // Enqueue a copy of `tensors` to `dst`, ordered after the work already on `stream`; returns a
  // ticket for wait_sent(). Never blocks on the peer.
  uint64_t send(int dst, const std::vector<TensorRef>& tensors, const std::string& what,
                uintptr_t stream);
  // Make `stream` wait until the copies of send ticket `ticket` have finished reading the source.
  void wait_sent(int dst, uint64_t ticket, uintptr_t stream, const std::function<void()>& poll);
  // Receive the next message from `src` into `dsts`; `stream` waits for the data, and the copies
  // out of the slots run on it. Blocks the host until the sender has posted the message.
  void recv(int src, const std::vector<TensorRef>& dsts, const std::string& what, uintptr_t stream,
            const std::function<void()>& poll);
  // Zero-copy receive: device pointers of the message's tensors inside the slot; `stream` waits
  // for the data. The slot stays reserved until release_view().
  std::vector<uintptr_t> recv_view(int src, const std::vector<TensorSpec>& specs,
                                   const std::string& what, uintptr_t stream,
                                   const std::function<void()>& poll);
  void release_view(int src, uintptr_t stream);

  uintptr_t copy_stream(int dst) const;
  std::string staging(int peer) const;
  uint64_t bytes_sent(int dst) const;
  // Wait (up to timeout_ms) until all enqueued sends have been issued and their copies finished.
  bool quiesce(int64_t timeout_ms);
  void close();
  const EngineConfig& config() const { return cfg_; }

 private:
  struct SendJob {
    uint64_t ticket;
    std::vector<TensorRef> tensors;
    std::string what;
    cudaEvent_t ready;
  };
  struct DoneMark {
    cudaEvent_t event = nullptr;
    uint64_t ticket = 0;
  };
  struct SendChannel {
    int dst = -1;
    Staging staging = Staging::kDevice;
    bool connected = false;
    ShmRegion shm;  // the receiver's segment, opened
    RingSender tx;
    char* slots = nullptr;  // base of the receiver's slots in this process
    bool mem_opened = false, host_registered = false;
    std::vector<cudaEvent_t> full_events;  // own, exported
    std::vector<cudaEvent_t> free_events;  // the receiver's, imported
    cudaStream_t stream = nullptr;
    std::thread worker;
    mutable std::mutex mu;
    std::condition_variable cv;
    std::deque<SendJob> queue;
    bool stopping = false, busy = false;  // busy: a job is being issued (worker or inline)
    std::atomic<bool> peer_gone{false};   // the receiver exited or closed (seen by any channel)
    uint64_t next_ticket = 1, done_ticket = 0;
    std::exception_ptr error;
    std::vector<cudaEvent_t> ready_pool;
    std::vector<DoneMark> done;
    uint64_t bytes_sent = 0;
    WaitPolicy policy;
  };
  struct RecvChannel {
    int src = -1;
    Staging staging = Staging::kDevice;
    bool connected = false;
    ShmRegion shm;  // created here
    RingReceiver rx;
    char* slots = nullptr;
    bool host_registered = false;
    std::vector<cudaEvent_t> free_events;  // own, exported
    std::vector<cudaEvent_t> full_events;  // the sender's, imported
    bool failed = false;
    std::string failure;
    uint64_t view_seq = 0;  // outstanding zero-copy view, 0 if none
    uint32_t view_slot = 0;
    WaitPolicy policy;
  };

  SendChannel& send_channel(int dst);
  RecvChannel& recv_channel(int src);
  void worker_loop(SendChannel* ch);
  void process_job(SendChannel& ch, SendJob& job);
  void fail_send_channel(SendChannel& ch, std::exception_ptr err, SendJob& job);
  // Bookkeeping for a receive on `ch` that threw `e` (the caller rethrows): PeerExited marks the
  // send channel to that peer gone; a PeerTimeout fails the channel only when `mid_message` (part
  // of the message was already consumed); anything else fails the channel once and records the
  // error in shared memory so the sender fails too.
  void fail_recv_channel(RecvChannel& ch, const std::exception& e, bool mid_message);
  bool ring_has_room(const SendChannel& ch, size_t chunks) const;
  char* slot_ptr(char* base, uint32_t slot) const { return base + uint64_t(slot) * cfg_.slot_bytes; }
  uint32_t recv_chunk(RecvChannel& ch, const Plan& plan, const std::vector<TensorSpec>& specs,
                      uint64_t msg, uint32_t c, const std::string& what, cudaStream_t stream);

  EngineConfig cfg_;
  int pid_;
  bool closed_ = false;
  bool leak_on_close_ = false;
  std::vector<std::unique_ptr<SendChannel>> tx_;
  std::vector<std::unique_ptr<RecvChannel>> rx_;
};

// Enqueue a kernel on `stream` that keeps it busy for `ns` nanoseconds (device_kernels.cu).
cudaError_t launch_device_sleep(cudaStream_t stream, uint64_t ns);

}  // namespace hdrt
