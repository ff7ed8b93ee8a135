"""Per-layer concept vectors in and out: JSON, safetensors and GGUF control vectors.

The public API; the code lives in the submodules: `common` (VectorSet, the checks every format
shares, format sniffing), `metadata` (how deep, wide and long a file's metadata may be), one
module per format (`json_format`, `safetensors_format`, `gguf_format`), and `codec` (`parse_vectors` / `export_vectors`, which pick the format's module).
"""

from auditor.vectors.codec import export_vectors, parse_vectors
from auditor.vectors.common import DEFAULT_MAX_BYTES, FORMATS, VectorSet, sniff_format
from auditor.vectors.gguf_format import GGUF_ARCH

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMATS",
    "GGUF_ARCH",
    "VectorSet",
    "export_vectors",
    "parse_vectors",
    "sniff_format",
]
