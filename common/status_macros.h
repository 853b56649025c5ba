// Status propagation macros. Debian's Abseil (20220623) predates
// ABSL_RETURN_IF_ERROR and friends, so the project keeps its own.

#ifndef TESSERA_COMMON_STATUS_MACROS_H_
#define TESSERA_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

// Returns from the enclosing function when `expr` is not OK.
#define TESSERA_RETURN_IF_ERROR(expr)                    \
  do {                                                   \
    ::absl::Status tessera_status_ = (expr);             \
    if (!tessera_status_.ok()) return tessera_status_;   \
  } while (0)

#define TESSERA_STATUS_CONCAT_INNER_(a, b) a##b
#define TESSERA_STATUS_CONCAT_(a, b) TESSERA_STATUS_CONCAT_INNER_(a, b)

// `lhs = value of expr` or return its error status.
#define TESSERA_ASSIGN_OR_RETURN(lhs, expr)                                   \
  TESSERA_ASSIGN_OR_RETURN_IMPL_(                                             \
      TESSERA_STATUS_CONCAT_(tessera_statusor_, __LINE__), lhs, expr)

#define TESSERA_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();  \
  lhs = std::move(statusor).value()

namespace tessera {

// Returns `status` with `context` prepended to its message ("pull shard 2: ..."),
// keeping the code. OK stays OK.
inline absl::Status Annotate(const absl::Status& status,
                             absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(context, ": ", status.message()));
}

}  // namespace tessera

#endif  // TESSERA_COMMON_STATUS_MACROS_H_
