# cmake -DDIR=path -P ResetDir.cmake: removes DIR and creates it empty.
if(NOT DIR)
  message(FATAL_ERROR "ResetDir.cmake: DIR is not set")
endif()
file(REMOVE_RECURSE "${DIR}")
file(MAKE_DIRECTORY "${DIR}")
