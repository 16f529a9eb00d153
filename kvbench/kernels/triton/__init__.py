"""Triton kernels, each with the signature of its twin in :mod:`kvbench.kernels.reference`.

Kernels work on contiguous ``(B, H, T, ...)`` buffers (the cache allocates them so); on a CPU they run only
under ``TRITON_INTERPRET=1`` (slow: about 1 ms per program instance). One module per kernel: :mod:`.pack`,
:mod:`.quantize`, and the decode paths :mod:`.split_k`, :mod:`.cuda_core`, :mod:`.tensor_core`, dispatched
by :mod:`.decode`; shared ``@triton.jit`` helpers in :mod:`.common`.
"""

from .decode import PATHS, choose, decode_attention
from .pack import pack_codes, unpack_codes
from .quantize import quantize_pack_keys, quantize_pack_values

__all__ = ["PATHS", "choose", "decode_attention", "pack_codes", "quantize_pack_keys", "quantize_pack_values",
           "unpack_codes"]
