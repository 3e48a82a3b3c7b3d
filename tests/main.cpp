// The Catch2 (v2) test runner: every tests/test_*.cpp is linked into one executable, orthoconv_tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
