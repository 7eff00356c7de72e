// The length-index builder: reads the `length` column of uncompressed MDS shards directly
// from the shard files (memory-mapped), without decoding images or token arrays.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>

#include "planner.h"

namespace fastross {

namespace {
struct Mapped {
  const unsigned char* data = nullptr;
  size_t size = 0;
  explicit Mapped(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw std::runtime_error("cannot open MDS shard " + path);
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw std::runtime_error("cannot stat MDS shard " + path);
    }
    size = static_cast<size_t>(st.st_size);
    void* p = size ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    ::close(fd);
    if (size && p == MAP_FAILED) throw std::runtime_error("cannot map MDS shard " + path);
    data = static_cast<const unsigned char*>(p);
  }
  ~Mapped() {
    if (data) ::munmap(const_cast<unsigned char*>(data), size);
  }
  template <typename T>
  T at(size_t off, const std::string& path) const {
    if (off + sizeof(T) > size) throw std::runtime_error("MDS shard " + path + " is truncated");
    T v;
    std::memcpy(&v, data + off, sizeof(T));
    return v;
  }
};
}  // namespace

std::vector<int64_t> read_mds_int_column(const std::vector<std::string>& shard_files, int num_var,
                                         int num_var_before, int64_t fixed_before) {
  std::vector<int64_t> out;
  for (const auto& path : shard_files) {
    Mapped m(path);
    const uint32_t n = m.at<uint32_t>(0, path);
    out.reserve(out.size() + n);
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t begin = m.at<uint32_t>(4 * (1 + size_t(i)), path);
      size_t off = begin + 4 * size_t(num_var) + size_t(fixed_before);
      for (int k = 0; k < num_var_before; ++k) off += m.at<uint32_t>(begin + 4 * size_t(k), path);
      out.push_back(m.at<int64_t>(off, path));
    }
  }
  return out;
}

}  // namespace fastross
