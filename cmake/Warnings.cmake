# cmake/Warnings.cmake: one set of compiler warnings for the library, the command line and the tests.
# -Wshadow: a local that hides another (a member, a parameter, an outer loop's index) is how a series term or a
# group index silently gets read from the wrong variable. ORTHOCONV_WERROR (CI turns it on) makes every warning
# an error; it stays off by default so that a newer compiler's new warning does not break a user's build.
option(ORTHOCONV_WERROR "Treat compiler warnings as errors (CI)" OFF)
function(orthoconv_warnings target)
  set(flags -Wall -Wextra -Wshadow -Wno-unknown-pragmas)
  if(ORTHOCONV_WERROR)
    list(APPEND flags -Werror)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # GCC 12's flow-sensitive warnings report code that is not ours, inlined into ours: Eigen's AVX-512
      # reductions (_mm256_undefined_pd in GCC's own intrinsics, -Wmaybe-uninitialized) and "literal" + std::string
      # (GCC bug 105329, -Wrestrict). They stay warnings.
      list(APPEND flags -Wno-error=maybe-uninitialized -Wno-error=restrict)
    endif()
  endif()
  list(JOIN flags ";" joined)
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${joined}>")
endfunction()
