#include "shm_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "errors.h"

namespace hdrt {

void check_shm_name(const std::string& name) {
  bool ok = name.size() >= 2 && name.size() <= 201 && name[0] == '/';
  for (size_t i = 1; ok && i < name.size(); ++i) {
    char c = name[i];
    ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '.';
  }
  if (!ok)
    throw ProtocolError("invalid shared memory name '" + name +
                        "': use '/' followed by 1-200 letters, digits, '_', '-' or '.'");
}

ShmRegion& ShmRegion::operator=(ShmRegion&& o) noexcept {
  if (this != &o) {
    reset();
    name_ = std::move(o.name_);
    data_ = o.data_;
    size_ = o.size_;
    owner_ = o.owner_;
    linked_ = o.linked_;
    o.data_ = nullptr;
    o.size_ = 0;
    o.owner_ = o.linked_ = false;
  }
  return *this;
}

ShmRegion::~ShmRegion() { reset(); }

void ShmRegion::reset() {
  if (owner_ && linked_) shm_unlink(name_.c_str());
  linked_ = false;
  if (data_) munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

static std::string errno_str(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

ShmRegion ShmRegion::create(const std::string& name, uint64_t bytes) {
  check_shm_name(name);
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0)
    throw ProtocolError("shm_open('" + name + "', create) failed: " + errno_str(errno) +
                        (errno == EEXIST ? "; a stale segment with this name exists in /dev/shm"
                                         : ""));
  ShmRegion r;
  r.name_ = name;
  r.owner_ = true;
  r.linked_ = true;
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int e = errno;
    close(fd);
    throw ProtocolError("ftruncate of shared memory '" + name + "' to " + std::to_string(bytes) +
                        " B failed: " + errno_str(e));
  }
  int rc = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
    close(fd);
    throw ProtocolError("cannot reserve " + std::to_string(bytes >> 20) +
                        " MiB of shared memory for '" + name + "': " + errno_str(rc) +
                        "; enlarge /dev/shm (docker: --shm-size) or use fewer/smaller slots");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) throw ProtocolError("mmap of shared memory '" + name + "' failed: " + errno_str(e));
  r.data_ = p;
  r.size_ = bytes;
  return r;  // ftruncate zero-fills
}

ShmRegion ShmRegion::open(const std::string& name) {
  check_shm_name(name);
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0)
    throw ProtocolError("shm_open('" + name + "') failed: " + errno_str(errno) +
                        " (is the peer on this node and sharing /dev/shm? was it already closed?)");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    throw ProtocolError("fstat of shared memory '" + name + "' failed: " + errno_str(e));
  }
  void* p = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) throw ProtocolError("mmap of shared memory '" + name + "' failed: " + errno_str(e));
  ShmRegion r;
  r.name_ = name;
  r.data_ = p;
  r.size_ = static_cast<uint64_t>(st.st_size);
  return r;
}

void ShmRegion::unlink() {
  if (owner_ && linked_) {
    shm_unlink(name_.c_str());
    linked_ = false;
  }
}

}  // namespace hdrt
