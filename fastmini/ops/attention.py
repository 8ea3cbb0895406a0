"""Multi-head self-attention core: ``softmax(q k^T / sqrt(d) + mask) v`` per head.

The probabilities (B, A, S, S) are materialised only when ``need_weights`` is set (the
distiller and ``output_attentions=True`` need them); otherwise torch's
``scaled_dot_product_attention`` picks a fused kernel and never writes them out.

Packed (unpadded) tokens attend through the padded layout, or one sequence at a time where that
does less work: on the CPU when the padded layout would spend more than half its attention FLOPs
on padding (measured here: 40% padding, 32 x 85: 20.6 -> 8.9 ms; at 3-9% padding the loop is
~30% slower than one batched call). On CUDA, backend "cuda" runs torch's variable-length flash
attention on the packed tokens directly (``torch.nn.attention.varlen``, torch >= 2.9, a GPU of compute
capability >= 8.0; fp16/bf16, head size a multiple of 8 up to 256, no dropout, no probabilities, at least
one token: other calls keep the padded path). Its tests passed on an H200, so CUDA tensors take it by
themselves where it can serve the call. VARLEN_KERNEL can put cuDNN's kernel in its place (unverified).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from fastmini.ops.autocasting import autocast_dtype_for
from fastmini.ops.checks import check_probability, check_tensor
from fastmini.ops.dispatch import BackendUnavailableError
from fastmini.ops.key_padding import KeyPadding, as_key_padding
from fastmini.ops.packing import Packing
from fastmini.ops.softmax_dropout import softmax_dropout

PACKED_ATTENTION_BACKENDS = ("torch", "cuda")
# tests/test_varlen_attention.py's GPU tests passed on an H200 (2026-11-26): CUDA picks it by itself. On the
# ragged benchmark (64 x 128, 48% padding, bf16) the model ran 1.16x faster with it than with the torch path.
_VERIFIED_ON_GPU: tuple[str, ...] = ("cuda",)
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)
# The flash kernel's head sizes: multiples of 8 up to 256 (it raises on others, e.g. the tiny test configs' 6).
_VARLEN_HEAD_SIZE_MULTIPLE, _VARLEN_MAX_HEAD_SIZE = 8, 256
_VARLEN_MIN_CAPABILITY = (8, 0)  # torch's flash kernels: Ampere and newer
# How the padded layout hands its key padding mask to SDPA. "bool": as it is, and SDPA converts it to an additive
# mask on every call (three kernels a recursion on a GPU). "additive": the KeyPadding's bias, which the encoder
# makes once a forward (ops.key_padding). On an H200 (2026-11-27, session 20, bf16) the GPU tests of the additive
# mask passed, SDPA kept its cuDNN kernel, and the graphed (1, 128) forward ran 88 kernels instead of 104 in less
# kernel time in both runs that timed it (0.335 against 0.349 ms; 0.332 against 0.350); its wall-clock medians
# (benchmarks/test_encoder_forward_gpu.py, interleaved) were 0.446 against 0.507 ms in one run and 0.458 against
# 0.444 in the other, so the kernel time is the steady gain; on this project's CPU (2 threads, fp32) the two
# took the same time (8 x 128, ragged 32 x 128, 1 x 32). A row with no real key
# attends uniformly over its padded keys (as the eager path and SDPA's cuDNN kernel do) where some SDPA kernels
# give zeros under the bool mask: such rows are all padding, and no output reads them.
SDPA_MASKS = ("bool", "additive")
SDPA_MASK = "additive"


def _check_qkv(op: str, query: object, key: object, value: object, num_heads: object, dropout_p: object) -> None:
    """q/k/v: floating tensors of one shape, dtype and device; ``num_heads`` divides their width; a dropout
    probability in [0, 1). Tensor attributes and Python scalars only: no host-device sync."""
    check_tensor(op, "query", query)
    device = query.device
    for name, tensor in (("key", key), ("value", value)):
        check_tensor(op, name, tensor, device)
        if tensor.shape != query.shape:
            raise ValueError(f"{op}: {name} must have query's shape {tuple(query.shape)}, got {tuple(tensor.shape)}")
        if tensor.dtype != query.dtype:
            raise TypeError(f"{op}: {name} must have query's dtype {query.dtype}, got {tensor.dtype}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"{op}: num_heads must be a Python int, got {type(num_heads).__name__}")
    hidden = query.shape[-1] if query.dim() > 0 else 0
    if hidden == 0:
        raise ValueError(f"{op}: query must be (..., H) with H > 0, got shape {tuple(query.shape)}")
    if num_heads <= 0 or hidden % num_heads != 0:
        raise ValueError(f"{op}: num_heads must be > 0 and divide the width of query ({hidden}), got {num_heads}")
    check_probability(op, "dropout_p", dropout_p)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H) -> (B, A, S, H/A)."""
    batch, seq, hidden = x.shape
    return x.view(batch, seq, num_heads, hidden // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, A, S, D) -> (B, S, A*D)."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def self_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | KeyPadding | None,
    dropout_p: float,
    low_precision_maps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention over (B, A, S, D) heads; returns (context, probabilities).

    The scores are one ``baddbmm``: the 1/sqrt(D) scale is its alpha and the padding mask an additive
    (B*A, 1, S) bias of half the scores' dtype's lowest value (``additive_key_mask``; a KeyPadding keeps it for
    the next recursion), so no pass over the (B, A, S, S) scores divides or masks them, forward or backward (the
    distiller asks for probabilities at every recursion: at 8 x 12 x 128 x 128 fp32 on 2 CPU threads,
    forward+backward 58 -> 46 ms, the same values). A masked key's score then becomes that value exactly in
    fp32, bf16 and fp64; in fp16 only about (its range is small).
    A row with no real key at all gets uniform probabilities (fp16: about), and, unlike a masked fill, its
    scores pass a gradient to its queries and keys: nothing reaches them unless a loss reads such a row.
    ``low_precision_maps``: under autocast, the probabilities in the scores' dtype (bf16/fp16) rather than
    autocast's fp32 (half the bytes of every pass over them); without autocast it changes nothing.
    """
    batch, heads, seq, head_dim = query.shape
    queries = query.reshape(batch * heads, seq, head_dim)
    keys_t = key.reshape(batch * heads, seq, head_dim).transpose(1, 2)
    if key_padding_mask is None:
        bias, beta = queries.new_zeros(()), 0.0  # beta 0: the bias is never read
    else:
        dtype = autocast_dtype_for(query)  # the scores' dtype: a bias autocast cast would lose its value
        bias = as_key_padding(key_padding_mask).bias(dtype)
        bias, beta = bias.expand(batch, heads, 1, seq).reshape(batch * heads, 1, seq), 1.0
    scores = torch.baddbmm(bias, queries, keys_t, beta=beta, alpha=head_dim**-0.5)
    # Autocast computes a softmax in fp32 and returns it so: (B, A, S, S) fp32 maps, which the next matmul casts
    # back. An explicit dtype keeps them in the scores' (fp32 arithmetic inside, rounded once on the way out).
    # (under torch.compile, torch's two kernels rather than inductor's fused one: see softmax_dropout)
    probabilities, dropped = softmax_dropout(scores, dropout_p, scores.dtype if low_precision_maps else None)
    shape = (batch, heads, seq, seq)
    return torch.matmul(dropped.view(shape), value), probabilities.view(shape)


def _check_key_padding_mask(mask: object, query: torch.Tensor) -> None:
    """A (B, S) bool mask: a float one would be an additive bias to SDPA (no masking) and an error to the
    eager path. A KeyPadding's mask likewise."""
    op = "self_attention"
    if isinstance(mask, KeyPadding):
        mask = mask.mask
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{op}: key_padding_mask must be a torch.Tensor, a fastmini.ops.KeyPadding or None, "
            f"got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: key_padding_mask must be bool (True for real tokens), got {mask.dtype}")
    if mask.shape != query.shape[:2]:
        raise ValueError(
            f"{op}: key_padding_mask must be (B, S) = {tuple(query.shape[:2])} like query, got {tuple(mask.shape)}"
        )
    if mask.device != query.device:
        raise ValueError(f"{op}: key_padding_mask is on {mask.device} but query is on {query.device}")


def self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | KeyPadding | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    check_inputs: bool = True,
    low_precision_maps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over projected (B, S, H) query/key/value; returns ((B, S, H) context, probs or None).

    ``key_padding_mask`` is (B, S) bool, True for real tokens, or a KeyPadding of one (which keeps the additive
    form for the next call: callers attending N times with one mask make one); padded keys get no weight.
    Padded queries attend too (their rows are those of a real query, as in transformers): callers ignore or
    zero them.
    A row with no real token at all has no key to attend to: its probabilities are spread over its S
    (padded) keys (uniformly; in fp16 about, see ``self_attention_ref``) and its context is whatever
    the kernel gives (zeros from torch 2.13's SDPA on the CPU).
    ``dropout_p`` is applied whenever it is > 0 (callers pass 0 in eval mode); the probabilities
    returned are those before dropout. ``need_weights=True`` runs the eager ``self_attention_ref``
    (``low_precision_maps``: see there).
    ``check_inputs=False`` skips the argument checks (a few microseconds a call), for callers whose
    tensors are built to fit; misuse then fails, if at all, deep inside torch.
    """
    if check_inputs:
        _check_qkv("self_attention", query, key, value, num_heads, dropout_p)
        if query.dim() != 3:
            raise ValueError(f"self_attention: query must be (B, S, H), got shape {tuple(query.shape)}")
        if key_padding_mask is not None:
            _check_key_padding_mask(key_padding_mask, query)
    heads = (split_heads(t, num_heads) for t in (query, key, value))
    context, probabilities = attend_heads(*heads, key_padding_mask, dropout_p, need_weights, low_precision_maps)
    return merge_heads(context), probabilities


def attend_heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | KeyPadding | None,
    dropout_p: float,
    need_weights: bool,
    low_precision_maps: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``self_attention`` on (B, A, S, D) heads, unchecked: ((B, A, S, D) context, probabilities or None)."""
    if need_weights:
        return self_attention_ref(query, key, value, key_padding_mask, dropout_p, low_precision_maps)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=_sdpa_mask(key_padding_mask, query), dropout_p=dropout_p
    ), None


def _sdpa_mask(key_padding_mask: torch.Tensor | KeyPadding | None, query: torch.Tensor) -> torch.Tensor | None:
    """SDPA's attn_mask for a key padding mask, as SDPA_MASK says: (B, 1, 1, S) bool, or the KeyPadding's bias."""
    if key_padding_mask is None:
        return None
    if isinstance(key_padding_mask, KeyPadding):
        if SDPA_MASK == "additive":
            # in the scores' dtype: an fp32 bias that autocast cast to fp16 would turn into -inf
            return key_padding_mask.bias(autocast_dtype_for(query))
        key_padding_mask = key_padding_mask.mask
    return key_padding_mask[:, None, None, :]


def per_sequence_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Packed (T, A, D) heads -> (T, A, D) context, one sequence at a time: no padding anywhere.

    The CPU path for mostly padded batches, and the varlen kernel's contract (its oracle)."""
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (A, L, D)
        outputs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p).transpose(0, 1))
    return torch.cat(outputs)


def _mostly_padding(packing: Packing) -> bool:
    """Would the padded layout spend more than half of attention's work (sum of L^2 against
    B * S^2) on padding? Host integers only: meant for CPU tensors, where reading them is free."""
    lengths = packing.cu_seqlens.diff().tolist()
    return 2 * sum(length * length for length in lengths) < packing.batch_size * packing.seq_len**2


# Which kernel serves varlen attention on CUDA. "flash": torch.nn.attention.varlen (flash-attention 2's kernel),
# what ran on the H200. "cudnn": cuDNN's fused attention on the same packed layout (the aten op torch's
# nested-tensor SDPA calls with cumulative sequence lengths), for calls that need no gradient: on the ragged
# benchmark (64 x 128, 48% padding, bf16; session 15, H200) the flash kernel took 28 us a call where cuDNN's took
# 24 us on the padded layout, twice the tokens. Never run on a GPU: "flash" stays the default until
# tests/test_varlen_attention.py's GPU test of "cudnn" passes and benchmarks/test_encoder_forward_gpu.py's
# "fastmini-graphed-unpadded-cudnn" contender is faster.
VARLEN_KERNELS = ("flash", "cudnn")
VARLEN_KERNEL = "flash"


def _varlen_attention(query, key, value, cu_seqlens, max_seqlen):
    """(T, A, D) context of packed (T, A, D) query, key, value; ``cu_seqlens`` int32 offsets. VARLEN_KERNEL's
    kernel, except that a call whose inputs need gradients always takes flash (its backward is verified)."""
    if VARLEN_KERNEL not in VARLEN_KERNELS:
        raise ValueError(f"packed attention: VARLEN_KERNEL must be one of {VARLEN_KERNELS}, got {VARLEN_KERNEL!r}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if VARLEN_KERNEL == "cudnn" and not needs_grad:
        return _cudnn_varlen_attention(query, key, value, cu_seqlens, max_seqlen)
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9; CUDA only

    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _cudnn_varlen_attention(query, key, value, cu_seqlens, max_seqlen):
    """cuDNN's attention over packed sequences (no dropout, not causal, the default 1/sqrt(D) scale)."""
    no_bias, no_logsumexp = None, False
    outputs = torch.ops.aten._cudnn_attention_forward(
        query, key, value, no_bias, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, no_logsumexp
    )
    return outputs[0]


def _varlen_serves(query: torch.Tensor, head_size: int, dropout_p: float, need_weights: bool) -> bool:
    """Whether the varlen flash kernel can run this call of a CUDA backend, asked for by name or chosen (the
    others take the padded path)."""
    return (
        query.dtype in _VARLEN_DTYPES
        and head_size % _VARLEN_HEAD_SIZE_MULTIPLE == 0
        and head_size <= _VARLEN_MAX_HEAD_SIZE
        and dropout_p == 0.0
        and not need_weights
        and query.shape[0] > 0
        and _varlen_runs_on(query.device)
    )


@functools.cache
def _varlen_module_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


@functools.cache
def _varlen_runs_on(device: torch.device) -> bool:
    """torch's varlen module exists (torch >= 2.9) and the GPU has flash attention (compute capability >= 8.0)."""
    return _varlen_module_available() and torch.cuda.get_device_capability(device) >= _VARLEN_MIN_CAPABILITY


def _packed_backend(x: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        return "cuda" if x.is_cuda and "cuda" in _VERIFIED_ON_GPU and _varlen_runs_on(x.device) else "torch"
    if backend not in PACKED_ATTENTION_BACKENDS:
        raise ValueError(f"packed attention: unknown backend '{backend}'; expected one of {PACKED_ATTENTION_BACKENDS}")
    if backend == "cuda":
        if not x.is_cuda:
            raise BackendUnavailableError(
                f"packed attention: backend 'cuda' needs a CUDA tensor, got one on {x.device}"
            )
        if not _varlen_module_available():
            raise BackendUnavailableError(
                f"packed attention: backend 'cuda' needs torch.nn.attention.varlen (torch >= 2.9); this is "
                f"torch {torch.__version__}"
            )
    return backend


def packed_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    packing: Packing,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    backend: str | None = None,
    check_inputs: bool = True,
    low_precision_maps: bool = False,
    key_padding: KeyPadding | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over packed (T, H) tokens: each token attends to the real tokens of its sequence.

    Only attention may see the padded layout again (its cost per token is 4*S*H against the layer's
    ~8H^2 + 4HI), so every GEMM, adapter and LayerNorm of the layer runs on real tokens only; on the
    CPU a mostly padded batch attends one sequence at a time instead (see the module doc).
    Returns the packed (T, H) context and, when asked, the (B, A, S, S) probabilities of
    ``self_attention`` on the padded layout (zero weight on padded keys; a padded query's row is uniform over its
    sequence's real keys, its query being zero here: such rows mean nothing in either layout).
    ``backend="cuda"``: the varlen flash kernel where it can serve the call (see the module doc).
    ``check_inputs=False`` skips the argument checks and ``low_precision_maps`` applies, as in ``self_attention``.
    ``key_padding``: a KeyPadding of ``packing.key_padding_mask`` for a caller that attends N times with one
    packing (the encoder makes one a forward), so that the padded layout's additive mask is made once.
    """
    if check_inputs:
        op = "packed_self_attention"
        _check_qkv(op, query, key, value, num_heads, dropout_p)
        if not isinstance(packing, Packing):
            raise TypeError(f"{op}: packing must be a fastmini.ops.Packing, got {type(packing).__name__}")
        if query.dim() != 2 or query.shape[0] != packing.indices.shape[0]:
            raise ValueError(
                f"{op}: query must be packed (T, H) with T = {packing.indices.shape[0]} real tokens of packing, "
                f"got shape {tuple(query.shape)}"
            )
        if packing.indices.device != query.device:
            raise ValueError(f"{op}: packing is on {packing.indices.device} but query is on {query.device}")
        # Its mask is read as given (no host read compares values): it must be the packing's own.
        if key_padding is not None and (
            not isinstance(key_padding, KeyPadding) or key_padding.mask is not packing.key_padding_mask
        ):
            raise ValueError(f"{op}: key_padding must be KeyPadding(packing.key_padding_mask), made of that tensor")
    chosen = _packed_backend(query, backend)
    tokens, hidden = query.shape
    head_size = hidden // num_heads
    heads = (t.reshape(tokens, num_heads, head_size) for t in (query, key, value))
    if chosen == "cuda" and _varlen_serves(query, head_size, dropout_p, need_weights):
        context = _varlen_attention(*heads, packing.cu_seqlens, packing.seq_len)
        return context.reshape(tokens, hidden), None
    # The sequence-by-sequence loop reads the lengths on the host: eager CPU only (under torch.compile it would
    # break the graph in every recursion; the padded layout below gives the same attention).
    if (
        query.device.type == "cpu"
        and not need_weights
        and not torch.compiler.is_compiling()
        and _mostly_padding(packing)
    ):
        return per_sequence_attention(*heads, packing.cu_seqlens, dropout_p).reshape(tokens, hidden), None
    # Straight into (and out of) the heads' padded layout: one scatter a tensor in, one gather out.
    padded = packing.unpack_heads((query, key, value), num_heads)
    mask = key_padding if key_padding is not None else packing.key_padding_mask
    context, probabilities = attend_heads(*padded, mask, dropout_p, need_weights, low_precision_maps)
    return packing.pack_heads(context), probabilities
