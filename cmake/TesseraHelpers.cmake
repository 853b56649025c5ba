# Small helpers in the spirit of Abseil's CMake/AbseilHelpers.cmake.

# tessera_library(NAME SRCS ... DEPS ...)
function(tessera_library NAME)
  cmake_parse_arguments(ARG "" "" "SRCS;DEPS" ${ARGN})
  add_library(${NAME} STATIC ${ARG_SRCS})
  target_include_directories(${NAME} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  target_link_libraries(${NAME} PUBLIC ${ARG_DEPS})
endfunction()

# tessera_test(NAME SRCS ... DEPS ... [LABELS ...] [ARGS ...])
function(tessera_test NAME)
  if(NOT BUILD_TESTING)
    return()
  endif()
  cmake_parse_arguments(ARG "" "TIMEOUT" "SRCS;DEPS;LABELS;ARGS" ${ARGN})
  add_executable(${NAME} ${ARG_SRCS})
  target_link_libraries(${NAME} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  set_target_properties(${NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
  add_test(NAME ${NAME} COMMAND ${NAME} ${ARG_ARGS})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  # Scratch files go to build/test-tmp (emptied at the start of every ctest
  # run by the fixture below), not /tmp.
  set_tests_properties(${NAME} PROPERTIES TIMEOUT ${ARG_TIMEOUT}
    ENVIRONMENT "TEST_TMPDIR=${PROJECT_BINARY_DIR}/test-tmp"
    FIXTURES_REQUIRED tessera_test_tmp)
  if(ARG_LABELS)
    set_tests_properties(${NAME} PROPERTIES LABELS "${ARG_LABELS}")
  endif()
endfunction()

# Empties build/test-tmp before the tests that use it (ctest adds this setup
# step to any selection of them; it shows up as test_tmp_reset).
function(tessera_test_tmp_fixture)
  if(NOT BUILD_TESTING)
    return()
  endif()
  add_test(NAME test_tmp_reset
    COMMAND ${CMAKE_COMMAND} -DDIR=${PROJECT_BINARY_DIR}/test-tmp
            -P ${PROJECT_SOURCE_DIR}/cmake/ResetDir.cmake)
  set_tests_properties(test_tmp_reset PROPERTIES FIXTURES_SETUP tessera_test_tmp)
endfunction()
