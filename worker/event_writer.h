// TensorBoard event files: scalar summaries written as TFRecord records of
// `Event` protos (proto/tensorboard_event.proto), so that
// `tensorboard --logdir=DIR` plots a run's loss curves.

#ifndef TESSERA_WORKER_EVENT_WRITER_H_
#define TESSERA_WORKER_EVENT_WRITER_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/tensorboard_event.pb.h"

namespace tessera {

// CRC-32C (Castagnoli polynomial, reflected, as in iSCSI and TFRecord) of
// `data`, continuing from `crc` (the CRC of the bytes before; 0 to start).
// Crc32c("123456789") == 0xE3069283.
uint32_t Crc32c(absl::string_view data, uint32_t crc = 0);

// TFRecord's masked CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8. Masking
// keeps a CRC of data that itself contains CRCs from being degenerate.
uint32_t MaskCrc32c(uint32_t crc);

// Appends one TFRecord record holding `data` to `out`: the length as a
// little-endian uint64, the masked CRC-32C of those 8 bytes (uint32 LE),
// the data, the masked CRC-32C of the data (uint32 LE).
void AppendTfRecord(absl::string_view data, std::string* out);

// Writes one TensorBoard event file in a log folder. The file is named
// `events.out.tfevents.<unix seconds>.<hostname>` (TensorBoard only reads
// files whose names contain "tfevents"); its first record is the
// file_version "brain.Event:2" event, each later one a scalar summary.
//
// Records are buffered; Flush() (and the destructor) hand them to the
// operating system so that a running TensorBoard sees them. Writing a scalar
// allocates nothing once the buffers have grown to size, so it may be called
// on every training step.
//
// Not thread-safe (thread-compatible): use from one thread, or serialise.
class EventWriter {
 public:
  // Creates `logdir` (and its parents) when missing and opens a new event
  // file in it. Errors name the folder or file: kInvalidArgument for an
  // empty logdir, kFailedPrecondition when it cannot be created or written.
  static absl::StatusOr<std::unique_ptr<EventWriter>> Create(const std::string& logdir);

  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;
  ~EventWriter();  // flushes and closes; errors at that point are lost

  // Records `value` under `tag` (e.g. "epoch/val_loss") at `step`. TensorBoard
  // stores scalars as float32. Errors name the file.
  absl::Status AddScalar(absl::string_view tag, int64_t step, double value);

  // Hands every buffered record to the operating system.
  absl::Status Flush();

  // The event file's path.
  const std::string& path() const { return path_; }

 private:
  EventWriter(std::string path, FILE* file) : path_(std::move(path)), file_(file) {}
  absl::Status WriteEvent();

  // Constant after construction.
  const std::string path_;
  FILE* const file_;
  // Reused for every record so that steady-state writes do not allocate.
  tessera::tensorboard::Event event_;
  std::string serialized_;
  std::string record_;
};

}  // namespace tessera

#endif  // TESSERA_WORKER_EVENT_WRITER_H_
