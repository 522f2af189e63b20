// The sm_90a marker (csrc/sm90a_marker.cuh) alone, for tests/csrc/test_sm90a_marker.py to compile per architecture.
// A host function uses the probe so that the marker kernel is referenced, as in gemm_sm90.cu.
#include "sm90a_marker.cuh"

int sm90a_marker_probe() { return ditq::gemm::sm90::loaded_code_is_sm90a(); }
