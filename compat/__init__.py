"""pytest plugins and the expected-difference list for .ci/compat (see docs/ci.md)."""
