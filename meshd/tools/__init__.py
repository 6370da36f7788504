"""Small tools shipped with meshd for demos, smoke tests and benchmarks."""
