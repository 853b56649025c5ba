// Loads the training and held-out sets a job describes.

#ifndef TESSERA_WORKER_JOB_DATA_H_
#define TESSERA_WORKER_JOB_DATA_H_

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "proto/tessera.pb.h"
#include "worker/dataset.h"

namespace tessera {

struct JobData {
  Dataset train;
  Dataset test;  // held-out: the test files, or a validation split
};

// Reads the job's data and checks it against the model: feature count
// equals the model's input size, labels fit the outputs (classification) or
// target width equals them (regression). Errors name the file or field.
absl::StatusOr<JobData> LoadJobData(const tessera::v1::JobSpec& job,
                                    const ModelSpec& model);

// The model's loss as the worker library names it.
LossKind JobLoss(const tessera::v1::JobSpec& job);

}  // namespace tessera

#endif  // TESSERA_WORKER_JOB_DATA_H_
