"""ART decode kernels: the CPU C kernel, the Triton kernel, and the dispatch that picks one."""
