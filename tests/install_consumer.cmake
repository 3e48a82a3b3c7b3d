# ctest "install_consumer": cmake -P script. Installs the build tree BUILD_DIR into a fresh prefix under
# WORK_DIR, then configures, builds and runs tests/consumer against that prefix with find_package(orthoconv),
# the way a user's project would: make_checkpoint writes a checkpoint, orthoconv_consumer (the program of
# docs/library.md, which must quote it verbatim: LIBRARY_DOC) loads and certifies it, on random pixels and, when
# DATA_DIR holds CIFAR-100, on real test images. Also runs the installed `orthoconv verify` (the installed CLI must
# find the installed library on its own: its install RPATH). Fails on the first step that fails.
foreach(var BUILD_DIR WORK_DIR CONSUMER_SOURCE GENERATOR CXX_COMPILER LIBRARY_DOC)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "install_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

file(READ ${CONSUMER_SOURCE}/main.cpp consumer_source)
file(READ ${LIBRARY_DOC} library_doc)
string(FIND "${library_doc}" "${consumer_source}" quoted)
if(quoted EQUAL -1)
  message(FATAL_ERROR "install_consumer: ${LIBRARY_DOC} does not quote ${CONSUMER_SOURCE}/main.cpp verbatim")
endif()

set(prefix ${WORK_DIR}/prefix)
set(consumer_build ${WORK_DIR}/consumer-build)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run_step name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: step '${name}' failed (${rc}):\n${ARGN}\n--- stdout\n${out}\n--- stderr\n${err}")
  endif()
  message(STATUS "install_consumer: ${name}: ok")
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

run_step(install ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} --config ${CONFIG})
foreach(expected include/orthoconv/orthoconv.hpp)
  if(NOT EXISTS ${prefix}/${expected})
    message(FATAL_ERROR "install_consumer: ${expected} was not installed")
  endif()
endforeach()
file(GLOB_RECURSE package_config ${prefix}/*/orthoconvConfig.cmake)
if(NOT package_config)
  message(FATAL_ERROR "install_consumer: no orthoconvConfig.cmake under ${prefix}")
endif()

run_step(configure ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE} -B ${consumer_build} -G ${GENERATOR}
         -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${CONFIG} -DCMAKE_PREFIX_PATH=${prefix}
         "-DCMAKE_CXX_FLAGS=${EXTRA_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${EXTRA_FLAGS}")
run_step(build ${CMAKE_COMMAND} --build ${consumer_build} --config ${CONFIG})
# The consumer must find liborthoconv in the prefix by itself (build-tree RPATH), not through LD_LIBRARY_PATH.
unset(ENV{LD_LIBRARY_PATH})
run_step(make-checkpoint ${consumer_build}/make_checkpoint ${WORK_DIR}/model.safetensors)
run_step(run ${consumer_build}/orthoconv_consumer ${WORK_DIR}/model.safetensors)
message(STATUS "${step_output}")
if(DATA_DIR AND EXISTS ${DATA_DIR}/test.bin)
  run_step(run-cifar ${consumer_build}/orthoconv_consumer ${WORK_DIR}/model.safetensors ${DATA_DIR})
  message(STATUS "${step_output}")
endif()

if(HAS_CLI)
  run_step(installed-cli ${prefix}/bin/orthoconv verify --layer gs-soc --channels 4 --size 4 --groups 2,1 --json)
  if(NOT step_output MATCHES "max_singular_value")
    message(FATAL_ERROR "install_consumer: the installed CLI printed no JSON:\n${step_output}")
  endif()
endif()
