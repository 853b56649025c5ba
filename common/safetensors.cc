#include "common/safetensors.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace tessera {
namespace {

std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppend(&out, "\\u00", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

uint32_t Crc32(const char* data, size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  while (n > 0) {
    const uInt chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data), chunk);
    data += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

// What the header says, in a canonical form: every metadata entry but the
// two checksums, and every tensor's name, shape and byte range, each field
// ended by a NUL. "header_crc32" is the CRC-32 of this, so that a damaged
// header which still parses (a digit of the step, of an update count or of
// an offset) is caught like damaged data.
struct TensorEntry {
  std::vector<int64_t> shape;
  int64_t begin = 0;
  int64_t end = 0;
};
constexpr char kDataCrcKey[] = "crc32";
constexpr char kHeaderCrcKey[] = "header_crc32";

std::string HeaderDigestInput(const std::map<std::string, std::string>& metadata,
                              const std::map<std::string, TensorEntry>& tensors) {
  std::string out;
  for (const auto& [k, v] : metadata) {
    if (k == kDataCrcKey || k == kHeaderCrcKey) continue;
    absl::StrAppend(&out, k, absl::string_view("\0", 1), v, absl::string_view("\0", 1));
  }
  for (const auto& [name, t] : tensors) {
    absl::StrAppend(&out, name, absl::string_view("\0", 1));
    for (int64_t d : t.shape) absl::StrAppend(&out, d, ",");
    absl::StrAppend(&out, absl::string_view("\0", 1), t.begin, ",", t.end,
                    absl::string_view("\0", 1));
  }
  return out;
}

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " '", path, "': ", std::strerror(errno)));
}

absl::Status WriteAll(int fd, const char* data, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Errno("write", path);
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status FsyncDir(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return Errno("open folder", dir);
  const int rc = fsync(fd);
  close(fd);
  if (rc != 0) return Errno("fsync folder", dir);
  return absl::OkStatus();
}

// A parser for the JSON subset a safetensors header uses: objects, strings,
// integers and arrays of integers.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : s_(text) {}

  absl::Status Parse(SafetensorsFile* out, std::map<std::string, std::pair<int64_t, int64_t>>* ranges) {
    TESSERA_RETURN_IF_ERROR(Expect('{'));
    if (Peek() == '}') return Expect('}');
    while (true) {
      std::string key;
      TESSERA_RETURN_IF_ERROR(String(&key));
      TESSERA_RETURN_IF_ERROR(Expect(':'));
      if (key == "__metadata__") {
        TESSERA_RETURN_IF_ERROR(Metadata(&out->metadata));
      } else {
        TESSERA_RETURN_IF_ERROR(Tensor(key, out, ranges));
      }
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect('}');
    }
  }

 private:
  char Peek() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t' ||
                                s_[pos_] == '\r')) {
      ++pos_;
    }
    return pos_ < s_.size() ? s_[pos_] : '\0';
  }
  absl::Status Error(absl::string_view what) {
    return absl::DataLossError(absl::StrCat("malformed header at byte ", pos_, ": ", what));
  }
  absl::Status Expect(char c) {
    if (Peek() != c) return Error(absl::StrCat("expected '", std::string(1, c), "'"));
    ++pos_;
    return absl::OkStatus();
  }
  absl::Status String(std::string* out) {
    TESSERA_RETURN_IF_ERROR(Expect('"'));
    out->clear();
    while (pos_ < s_.size() && s_[pos_] != '"') {
      char c = s_[pos_++];
      if (c == '\\') {
        if (pos_ >= s_.size()) return Error("unterminated escape");
        c = s_[pos_++];
        if (c == 'u') {
          int code = 0;
          if (pos_ + 4 > s_.size() ||
              !absl::SimpleHexAtoi(s_.substr(pos_, 4), &code) || code > 0x7f) {
            return Error("unsupported \\u escape");
          }
          pos_ += 4;
          c = static_cast<char>(code);
        } else if (c == 'n') {
          c = '\n';
        } else if (c == 't') {
          c = '\t';
        }
      }
      out->push_back(c);
    }
    return Expect('"');
  }
  absl::Status Integer(int64_t* out) {
    Peek();
    const size_t start = pos_;
    while (pos_ < s_.size() && (isdigit(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '-')) {
      ++pos_;
    }
    if (!absl::SimpleAtoi(s_.substr(start, pos_ - start), out)) return Error("expected an integer");
    return absl::OkStatus();
  }
  absl::Status IntArray(std::vector<int64_t>* out) {
    TESSERA_RETURN_IF_ERROR(Expect('['));
    out->clear();
    if (Peek() == ']') return Expect(']');
    while (true) {
      int64_t v;
      TESSERA_RETURN_IF_ERROR(Integer(&v));
      out->push_back(v);
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect(']');
    }
  }
  absl::Status Metadata(std::map<std::string, std::string>* out) {
    TESSERA_RETURN_IF_ERROR(Expect('{'));
    if (Peek() == '}') return Expect('}');
    while (true) {
      std::string k, v;
      TESSERA_RETURN_IF_ERROR(String(&k));
      TESSERA_RETURN_IF_ERROR(Expect(':'));
      TESSERA_RETURN_IF_ERROR(String(&v));
      (*out)[k] = v;
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect('}');
    }
  }
  absl::Status Tensor(const std::string& name, SafetensorsFile* out,
                      std::map<std::string, std::pair<int64_t, int64_t>>* ranges) {
    TESSERA_RETURN_IF_ERROR(Expect('{'));
    std::string dtype;
    std::vector<int64_t> shape, offsets;
    bool have_shape = false;
    while (true) {
      std::string key;
      TESSERA_RETURN_IF_ERROR(String(&key));
      TESSERA_RETURN_IF_ERROR(Expect(':'));
      if (key == "dtype") {
        TESSERA_RETURN_IF_ERROR(String(&dtype));
      } else if (key == "shape") {
        TESSERA_RETURN_IF_ERROR(IntArray(&shape));
        have_shape = true;
      } else if (key == "data_offsets") {
        TESSERA_RETURN_IF_ERROR(IntArray(&offsets));
      } else {
        return Error(absl::StrCat("unknown key '", key, "' in tensor ", name));
      }
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      TESSERA_RETURN_IF_ERROR(Expect('}'));
      break;
    }
    if (dtype != "F32") return Error(absl::StrCat("tensor ", name, " has dtype ", dtype, ", expected F32"));
    if (!have_shape || offsets.size() != 2) return Error(absl::StrCat("tensor ", name, " lacks shape or offsets"));
    out->tensors[name].shape = shape;
    (*ranges)[name] = {offsets[0], offsets[1]};
    return absl::OkStatus();
  }

  absl::string_view s_;
  size_t pos_ = 0;
};

}  // namespace

absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::vector<TensorToWrite>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  // Data section first, so that its checksum can go into the header.
  size_t data_bytes = 0;
  for (const TensorToWrite& t : tensors) data_bytes += t.data.size() * sizeof(float);
  std::string data;
  data.reserve(data_bytes);
  std::string entries;
  std::map<std::string, TensorEntry> digest_tensors;
  for (const TensorToWrite& t : tensors) {
    int64_t elements = 1;
    for (int64_t d : t.shape) elements *= d;
    if (elements != static_cast<int64_t>(t.data.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", t.name, ": shape holds ", elements, " elements, data has ", t.data.size()));
    }
    const size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(t.data.data()), t.data.size() * sizeof(float));
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); ++i) absl::StrAppend(&shape, i ? "," : "", t.shape[i]);
    absl::StrAppend(&entries, ",", JsonString(t.name), ":{\"dtype\":\"F32\",\"shape\":[", shape,
                    "],\"data_offsets\":[", begin, ",", data.size(), "]}");
    TensorEntry& e = digest_tensors[t.name];
    e.shape = t.shape;
    e.begin = static_cast<int64_t>(begin);
    e.end = static_cast<int64_t>(data.size());
  }
  if (digest_tensors.size() != tensors.size()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": two tensors with the same name"));
  }
  std::string meta = "{";
  std::map<std::string, std::string> all = metadata;
  all[kDataCrcKey] = absl::StrCat(Crc32(data.data(), data.size()));
  const std::string digest = HeaderDigestInput(all, digest_tensors);
  all[kHeaderCrcKey] = absl::StrCat(Crc32(digest.data(), digest.size()));
  bool first = true;
  for (const auto& [k, v] : all) {
    absl::StrAppend(&meta, first ? "" : ",", JsonString(k), ":", JsonString(v));
    first = false;
  }
  meta += "}";
  std::string header = absl::StrCat("{\"__metadata__\":", meta, entries, "}");
  // The format lets the header be padded with spaces; 8-byte alignment keeps
  // the data section aligned for readers that map the file.
  header.append((8 - header.size() % 8) % 8, ' ');
  char length[8];
  uint64_t n = header.size();
  std::memcpy(length, &n, 8);  // little-endian host (see tensor_codec.cc)

  const std::string tmp = path + ".tmp";
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("create", tmp);
  absl::Status s = WriteAll(fd, length, 8, tmp);
  if (s.ok()) s = WriteAll(fd, header.data(), header.size(), tmp);
  if (s.ok()) s = WriteAll(fd, data.data(), data.size(), tmp);
  if (s.ok() && fsync(fd) != 0) s = Errno("fsync", tmp);
  close(fd);
  if (s.ok() && rename(tmp.c_str(), path.c_str()) != 0) s = Errno("rename to", path);
  if (!s.ok()) {
    unlink(tmp.c_str());
    return s;
  }
  return FsyncDir(path);
}

absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 8) return absl::DataLossError(absl::StrCat("'", path, "' is truncated"));
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  if (header_len > bytes.size() - 8) {
    return absl::DataLossError(absl::StrCat("'", path, "': header length ", header_len,
                                            " exceeds the file size"));
  }
  SafetensorsFile out;
  std::map<std::string, std::pair<int64_t, int64_t>> ranges;
  HeaderParser parser(absl::string_view(bytes).substr(8, header_len));
  TESSERA_RETURN_IF_ERROR(Annotate(parser.Parse(&out, &ranges), path));
  const char* data = bytes.data() + 8 + header_len;
  const size_t data_size = bytes.size() - 8 - header_len;
  auto crc = out.metadata.find(kDataCrcKey);
  if (crc == out.metadata.end() ||
      crc->second != absl::StrCat(Crc32(data, data_size))) {
    return absl::DataLossError(absl::StrCat("'", path, "': checksum mismatch (corrupt or partial file)"));
  }
  // Files written before the header had a checksum of its own lack the key;
  // their data section is still checked above.
  auto header_crc = out.metadata.find(kHeaderCrcKey);
  if (header_crc != out.metadata.end()) {
    std::map<std::string, TensorEntry> entries;
    for (const auto& [name, t] : out.tensors) {
      entries[name] = {t.shape, ranges[name].first, ranges[name].second};
    }
    const std::string digest = HeaderDigestInput(out.metadata, entries);
    if (header_crc->second != absl::StrCat(Crc32(digest.data(), digest.size()))) {
      return absl::DataLossError(
          absl::StrCat("'", path, "': header checksum mismatch (corrupt header)"));
    }
  }
  for (auto& [name, t] : out.tensors) {
    const auto [begin, end] = ranges[name];
    // A corrupt header may hold negative or huge dimensions: check before
    // multiplying, so the product can neither wrap nor match by accident.
    int64_t elements = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || __builtin_mul_overflow(elements, d, &elements)) {
        return absl::DataLossError(absl::StrCat("'", path, "': tensor ", name, " has a bad shape"));
      }
    }
    int64_t bytes;
    if (__builtin_mul_overflow(elements, static_cast<int64_t>(sizeof(float)), &bytes) ||
        begin < 0 || end < begin || static_cast<size_t>(end) > data_size || end - begin != bytes) {
      return absl::DataLossError(absl::StrCat("'", path, "': tensor ", name, " has a bad byte range"));
    }
    t.data.resize(elements);
    if (end > begin) std::memcpy(t.data.data(), data + begin, end - begin);  // data() may be null
  }
  return out;
}

}  // namespace tessera
