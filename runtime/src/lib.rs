//! qcc runtime: the CPU reference executor (and, later, the CUDA executor and artifact loader).
