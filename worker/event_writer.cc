#include "worker/event_writer.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <array>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tessera {
namespace {

// Reflected form of the Castagnoli polynomial 0x1EDC6F41.
constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;
constexpr uint32_t kMaskDelta = 0xa282ead8u;
constexpr char kFileVersion[] = "brain.Event:2";

constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kCastagnoliReflected : c >> 1;
    table[i] = c;
  }
  return table;
}

// Computed at compile time: no start-up cost and no global constructor.
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

void AppendLittleEndian(uint64_t value, int bytes, std::string* out) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

absl::Status WriteError(const std::string& path, int err) {
  const std::string message =
      absl::StrCat("write TensorBoard events '", path, "': ", strerror(err));
  return err == ENOSPC || err == EDQUOT ? absl::ResourceExhaustedError(message)
                                        : absl::FailedPreconditionError(message);
}

std::string HostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

}  // namespace

uint32_t Crc32c(absl::string_view data, uint32_t crc) {
  crc = ~crc;
  for (unsigned char byte : data) crc = kCrcTable[(crc ^ byte) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t MaskCrc32c(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + kMaskDelta; }

void AppendTfRecord(absl::string_view data, std::string* out) {
  const size_t start = out->size();
  AppendLittleEndian(data.size(), 8, out);
  const uint32_t length_crc = MaskCrc32c(Crc32c(absl::string_view(*out).substr(start, 8)));
  AppendLittleEndian(length_crc, 4, out);
  out->append(data.data(), data.size());
  AppendLittleEndian(MaskCrc32c(Crc32c(data)), 4, out);
}

absl::StatusOr<std::unique_ptr<EventWriter>> EventWriter::Create(const std::string& logdir) {
  if (logdir.empty()) return absl::InvalidArgumentError("TensorBoard logdir: must not be empty");
  std::error_code ec;
  std::filesystem::create_directories(logdir, ec);
  if (ec || !std::filesystem::is_directory(logdir)) {
    return absl::FailedPreconditionError(
        absl::StrCat("TensorBoard logdir '", logdir, "': cannot create the folder",
                     ec ? absl::StrCat(": ", ec.message()) : std::string(": not a folder")));
  }
  // TensorFlow's own name, so that tools which glob for it find the file.
  const std::string base = absl::StrFormat("%s/events.out.tfevents.%010d.%s", logdir,
                                           absl::ToUnixSeconds(absl::Now()), HostName());
  // Two writers started in the same second must not share (and interleave)
  // a file: open exclusively and number the later ones.
  std::string path = base;
  FILE* file = nullptr;
  for (int attempt = 1;; ++attempt) {
    file = fopen(path.c_str(), "wbx");
    if (file != nullptr) break;
    if (errno != EEXIST || attempt >= 100) {
      return absl::FailedPreconditionError(absl::StrCat(
          "TensorBoard logdir '", logdir, "': cannot create '", path, "': ", strerror(errno)));
    }
    path = absl::StrCat(base, ".", attempt);
  }
  auto writer = std::unique_ptr<EventWriter>(new EventWriter(path, file));
  writer->event_.set_wall_time(absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()));
  writer->event_.set_step(0);
  writer->event_.set_file_version(kFileVersion);
  if (absl::Status s = writer->WriteEvent(); !s.ok()) return s;
  // The header goes out at once: TensorBoard skips files without it.
  if (absl::Status s = writer->Flush(); !s.ok()) return s;
  return writer;
}

EventWriter::~EventWriter() { fclose(file_); }

absl::Status EventWriter::AddScalar(absl::string_view tag, int64_t step, double value) {
  event_.set_wall_time(absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()));
  event_.set_step(step);
  // Overwrite the one value in place instead of clearing: clearing would
  // free the nested messages and allocate them again on every call.
  tessera::tensorboard::Summary* summary = event_.mutable_summary();
  tessera::tensorboard::Summary::Value* v =
      summary->value_size() == 0 ? summary->add_value() : summary->mutable_value(0);
  v->mutable_tag()->assign(tag.data(), tag.size());
  v->set_simple_value(static_cast<float>(value));
  return WriteEvent();
}

absl::Status EventWriter::Flush() {
  if (fflush(file_) != 0) return WriteError(path_, errno);
  return absl::OkStatus();
}

absl::Status EventWriter::WriteEvent() {
  if (!event_.SerializeToString(&serialized_)) {
    return absl::InternalError(
        absl::StrCat("write TensorBoard events '", path_, "': cannot serialise an event"));
  }
  record_.clear();
  AppendTfRecord(serialized_, &record_);
  if (fwrite(record_.data(), 1, record_.size(), file_) != record_.size()) {
    return WriteError(path_, errno);
  }
  return absl::OkStatus();
}

}  // namespace tessera
