// `tessera eval`: the held-out loss and accuracy of a checkpoint, computed
// on this machine's CPU without any server.

#ifndef TESSERA_CLI_EVAL_H_
#define TESSERA_CLI_EVAL_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "proto/tessera.pb.h"

namespace tessera {

// What evaluating one checkpoint found.
struct CheckpointEvaluation {
  std::string checkpoint;    // the step folder, "DIR/step-NNNNNNNNNN"
  int64_t step = 0;          // SYNC: completed steps; ASYNC/SSP: version
  int64_t samples = 0;       // held-out rows evaluated
  double test_loss = 0;      // mean per-row loss
  double test_accuracy = 0;  // classification only
  bool classification = false;
};

// Loads the newest complete checkpoint in `dir` written for `job` (a
// validated job: its model and optimizer type must match the checkpoint's)
// and evaluates its parameters on the job's held-out data with the CPU
// backend, in the chunks the trainer's epoch-end evaluation uses, so the
// figures equal the ones a worker printed for the same parameters.
// Errors name the folder: kNotFound when `dir` does not exist or holds no
// complete checkpoint, kFailedPrecondition when the newest complete one is
// of another model or optimizer; data errors name their file.
absl::StatusOr<CheckpointEvaluation> EvaluateCheckpoint(const tessera::v1::JobSpec& job,
                                                        const std::string& dir);

// "checkpoint DIR/step-N: test_loss: 0.4123 - test_accuracy: 0.8512"
// (accuracy only for classification).
std::string FormatEvaluation(const CheckpointEvaluation& e);

// The evaluation as one JSON object (checkpoint, step, samples, test_loss
// and, for classification, test_accuracy), newline-terminated.
std::string EvaluationJson(const CheckpointEvaluation& e);

}  // namespace tessera

#endif  // TESSERA_CLI_EVAL_H_
