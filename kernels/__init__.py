"""Triton kernels of fastmini, installed as ``fastmini.kernels`` (one file per op).

Never imported as a top-level ``kernels`` package: transformers probes for Hugging Face's own
package of that name. The torch oracle of each kernel sits beside its public op in
``fastmini/ops/<op>.py``; this package is imported only when a Triton backend is chosen.
"""
