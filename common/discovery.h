// Finding a process's place in the cluster from what the platform provides:
// a StatefulSet pod's ordinal in its hostname, an Indexed Job's completion
// index, a DNS name pattern for the servers. Pure functions: callers read
// the hostname and environment and pass them in.

#ifndef TESSERA_COMMON_DISCOVERY_H_
#define TESSERA_COMMON_DISCOVERY_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tessera {

// The trailing "-N" of a hostname such as "tessera-server-3" (also with a
// domain: "tessera-server-3.tessera-server.ns.svc"). kInvalidArgument naming
// the hostname when it has none.
absl::StatusOr<int> OrdinalFromHostname(absl::string_view hostname);

// A non-negative integer from an environment variable's value; `name` is
// used in errors. kInvalidArgument when unset (null) or not a number.
absl::StatusOr<int> IndexFromEnvValue(absl::string_view name, const char* value);

// Server addresses from a pattern: "{i}" is replaced by 0..count-1, e.g.
// "tessera-server-{i}.tessera-server:7070". kInvalidArgument when the
// pattern has no "{i}" or no port.
absl::StatusOr<std::vector<std::string>> ExpandServerPattern(absl::string_view pattern,
                                                              int count);

}  // namespace tessera

#endif  // TESSERA_COMMON_DISCOVERY_H_
