"""What kernels share: compilation and chunking (``cpu``), vector maths (``mathfn``), the
CUDA side (``cuda``, imported only on a CUDA call), and where compiled kernels are cached
(``cache``: installed here, before any kernel of lossforge is decorated)."""

import numba.core.caching

from lossforge.runtime import cache

cache.install(numba.core.caching)
