import os

# Without a GPU the CUDA kernel runs under Numba's simulator, read when numba is imported: set
# it before anything imports numba, or the conformance kit fails its CUDA check
# (NUMBA_ENABLE_CUDASIM=0 in the environment tests a real GPU).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
