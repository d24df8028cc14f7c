"""QSUN: int4 / int8 weight-only quantization of the shared decode tree.

* ``layout``      which linears are quantized, mixed-precision names, layer-layout helpers;
* ``rtn``         ``quantize_tree`` (round-to-nearest, after AWQ when asked);
* ``awq``         AWQ's activation-aware scale and clipping searches;
* ``spec``        the QSUN spec a manifest records (defaults, normalisation, abstract tree);
* ``size``        bytes and parameters of a tree;
* ``perplexity``  held-out perplexity.
"""

from sunjax.quant.awq import CLIP_RATIOS, awq_scale, collect_inputs
from sunjax.quant.layout import LINEAR_NAMES, LINEARS, METHODS, check_int8
from sunjax.quant.perplexity import perplexity, read_text
from sunjax.quant.rtn import quantize_tree
from sunjax.quant.size import bytes_report, tree_bytes
from sunjax.quant.spec import (
    QUANT_DEFAULTS,
    QUANT_KEYS,
    abstract_decode,
    check_restorable,
    decode_quant_of,
    normalize_quant,
)

__all__ = [
    "CLIP_RATIOS",
    "LINEARS",
    "LINEAR_NAMES",
    "METHODS",
    "QUANT_DEFAULTS",
    "QUANT_KEYS",
    "abstract_decode",
    "awq_scale",
    "bytes_report",
    "check_int8",
    "check_restorable",
    "collect_inputs",
    "decode_quant_of",
    "normalize_quant",
    "perplexity",
    "quantize_tree",
    "read_text",
    "tree_bytes",
]
