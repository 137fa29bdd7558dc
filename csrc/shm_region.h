// A POSIX shared-memory segment (shm_open + mmap), RAII. The creator unlinks the name on
// unlink() or destruction; the mapping stays valid until every process unmaps it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace hdrt {

class ShmRegion {
 public:
  ShmRegion() = default;
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;
  ShmRegion(ShmRegion&& o) noexcept { *this = std::move(o); }
  ShmRegion& operator=(ShmRegion&& o) noexcept;
  ~ShmRegion();

  // Create a new zero-filled segment; fails if the name exists. Space is reserved up front so a
  // full /dev/shm gives a clear error here, not SIGBUS later.
  static ShmRegion create(const std::string& name, uint64_t bytes);
  // Map an existing segment.
  static ShmRegion open(const std::string& name);

  void unlink();  // remove the name (creator only; idempotent)
  void* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }

 private:
  void reset();
  std::string name_;
  void* data_ = nullptr;
  uint64_t size_ = 0;
  bool owner_ = false;
  bool linked_ = false;
};

// Check a segment name: "/" followed by 1..200 of [A-Za-z0-9_.-].
void check_shm_name(const std::string& name);

}  // namespace hdrt
