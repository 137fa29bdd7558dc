// The CUDA IPC transfer engine (one per rank). See csrc/README.md for the protocol.
//
// Per directed channel src -> dst: the receiver owns num_slots receive slots of slot_bytes each
// (device memory exported with cudaIpcGetMemHandle, or pinned shared host memory when the two
// devices cannot map each other's memory), num_slots "free" IPC events, and the shared-memory
// slot ring (slot_ring.h). The sender owns num_slots "full" IPC events, a copy stream and a
// worker thread that enqueues copies so send() never blocks the caller. The receiver also has a
// receive stream and a worker thread for posted receives (post_recv): they drain the slots into
// the destination buffers as chunks arrive, so a sender never waits for the receiver's wait().
//
// No wait of the engine blocks inside the CUDA driver: GPU completion is polled (cudaEventQuery /
// cudaStreamQuery) with a deadline and a liveness check of the peer, so a peer that dies with
// copies outstanding (whose IPC events then never fire) cannot hang send(), quiesce() or close().
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
  // Posted receive: the channel's worker receives the next message from `src` into `dsts` as its
  // chunks arrive (copies on the engine's receive stream, ordered after the work on `stream` at
  // post time), releasing each slot as soon as its copy is enqueued. Never blocks; returns a
  // ticket for wait_recv(). Messages are received in the order they were posted; recv() and
  // recv_view() are refused while posted receives are pending.
  uint64_t post_recv(int src, const std::vector<TensorRef>& dsts, const std::string& what,
                     uintptr_t stream);
  // Block the host until posted receive `ticket` has been drained (all its copies enqueued), then
  // make `stream` wait for its copies. Rethrows the receive's error (MessageMismatch, PeerTimeout,
  // ...). Past timeout_ms throws PeerTimeout and the receive stays posted (wait again).
  void wait_recv(int src, uint64_t ticket, uintptr_t stream, const std::function<void()>& poll);
  // Highest posted-receive ticket from `src` whose copies are enqueued (or that failed or was
  // dropped); until then its buffers must stay allocated.
  uint64_t recv_settled(int src) const;
  // Zero-copy receive: device pointers of the message's tensors inside the slot; `stream` waits
  // for the data. The slot stays reserved until release_view().
  std::vector<uintptr_t> recv_view(int src, const std::vector<TensorSpec>& specs,
                                   const std::string& what, uintptr_t stream,
                                   const std::function<void()>& poll);
  void release_view(int src, uintptr_t stream);

  uintptr_t copy_stream(int dst) const;
  uintptr_t recv_stream(int src) const;
  std::string staging(int peer) const;
  uint64_t bytes_sent(int dst) const;
  // Highest send ticket to `dst` the engine is done with: its copies are enqueued on the copy
  // stream (or it failed / was dropped, so nothing more will be enqueued for it). Tickets settle
  // in order. Until a ticket settles its source tensors must stay allocated.
  uint64_t settled(int dst) const;
  // Wait (up to timeout_ms) until all enqueued sends have been issued and their copies finished;
  // false on timeout or when a peer with copies outstanding has exited.
  bool quiesce(int64_t timeout_ms);
  // Change the peer-wait limit of every channel (e.g. from the set-up limit to the transfer
  // limit once the set-up self-test is done). Waits up to 1 s for sends being issued and posted
  // receives being drained, then refuses.
  void set_timeout(int64_t timeout_ms);
  int64_t timeout_ms() const { return cfg_.timeout_ms; }
  // Record `reason` as this rank's error on every channel, so peers blocked on this rank fail
  // now (PeerTimeout naming the reason) instead of at their timeout. Frees nothing; call close().
  void abort(const std::string& reason);
  // Stop the workers, drain (bounded) the copies that read or write this rank's slots, then free
  // everything. Never blocks on a dead peer: what cannot be drained in time is leaked.
  void close();
  const EngineConfig& config() const { return cfg_; }

 private:
  // A send (tensors: the sources) or a posted receive (tensors: the destinations); `ready` is
  // recorded on the caller's stream when the job is queued.
  struct Job {
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
    std::deque<Job> queue;
    bool stopping = false, busy = false;  // busy: a job is being issued (worker or inline)
    std::atomic<bool> peer_gone{false};   // the receiver exited or closed (seen by any channel)
    uint64_t next_ticket = 1, done_ticket = 0;
    uint64_t settled_ticket = 0;  // see settled()
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
    // Posted receives (post_recv), drained by `worker` on `stream`. The worker waits for a
    // message's first chunk without a limit (wait_recv() bounds the caller's wait), for later
    // chunks with `policy`'s limit; both end when the engine closes.
    cudaStream_t stream = nullptr;
    std::thread worker;
    mutable std::mutex mu;
    std::condition_variable cv;
    std::deque<Job> queue;
    bool stopping = false, busy = false;
    uint64_t next_ticket = 1, done_ticket = 0, settled_ticket = 0;
    std::exception_ptr error;
    std::vector<cudaEvent_t> ready_pool;
    std::vector<DoneMark> done;
    WaitPolicy first_policy, rest_policy;
  };

  SendChannel& send_channel(int dst);
  RecvChannel& recv_channel(int src);
  void worker_loop(SendChannel* ch);
  void process_job(SendChannel& ch, Job& job);
  void fail_send_channel(SendChannel& ch, std::exception_ptr err, Job& job);
  void recv_worker_loop(RecvChannel* ch);
  // Receive one message into `dsts` with copies on `stream`: the wait for the first chunk uses
  // `first`, the others `rest`. Shared by recv() and the posted receives.
  void receive_message(RecvChannel& ch, const std::vector<TensorRef>& dsts,
                       const std::string& what, cudaStream_t stream, const WaitPolicy& first,
                       const WaitPolicy& rest);
  // Record `ticket`'s completion mark on `stream` in `marks` (reusing a mark first waits, bounded,
  // for its older ticket).
  void record_mark(std::vector<DoneMark>& marks, std::mutex& mu, uint64_t ticket,
                   cudaStream_t stream, const WaitPolicy& policy, int peer_pid,
                   const std::string& label);
  // Bookkeeping for a receive on `ch` that threw `e` (the caller rethrows): PeerExited marks the
  // send channel to that peer gone; a PeerTimeout fails the channel only when `mid_message` (part
  // of the message was already consumed); anything else fails the channel once and records the
  // error in shared memory so the sender fails too.
  void fail_recv_channel(RecvChannel& ch, const std::exception& e, bool mid_message);
  bool ring_has_room(const SendChannel& ch, size_t chunks) const;
  // Poll `event` until it completed, bounded like a peer wait (`policy`'s timeout and poll hook,
  // the liveness of `peer_pid`): PeerExited / PeerTimeout naming `what` otherwise.
  void wait_event(cudaEvent_t event, const WaitPolicy& policy, int peer_pid,
                  const std::string& what);
  // Bounded drains for quiesce()/close(): true once the channel's GPU work is done, false when
  // `deadline_ns` passed or the peer exited first.
  bool drain_send(SendChannel& ch, int64_t deadline_ns);
  bool drain_recv(RecvChannel& ch, int64_t deadline_ns);
  char* slot_ptr(char* base, uint32_t slot) const { return base + uint64_t(slot) * cfg_.slot_bytes; }
  uint32_t recv_chunk(RecvChannel& ch, const Plan& plan, const std::vector<TensorSpec>& specs,
                      uint64_t msg, uint32_t c, const std::string& what, cudaStream_t stream,
                      const WaitPolicy& policy);
  // Refuse recv()/recv_view() while posted receives are pending on `ch`.
  void check_no_posted(const RecvChannel& ch, const char* call) const;

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
