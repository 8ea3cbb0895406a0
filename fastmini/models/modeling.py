"""The fastmini model family as transformers PreTrainedModels.

FastMiniModel is the MiniALBERT encoder (embeddings, optional E -> H projector, N recursions of
one shared layer with optional per-recursion adapters); the task classes add the heads of
SPEC.md. Loading (fastmini, original MiniALBERT and ALBERT checkpoints) lives in loading.py,
adapter tuning in adapter_tuning.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from fastmini.data.masking import IGNORE_INDEX
from fastmini.models import adapter_tuning
from fastmini.models.configuration import MINIALBERT_FIXED_LAYER_NORM_EPS, FastMiniConfig
from fastmini.models.loading import load_pretrained
from fastmini.modules import BottleneckAdapter, Embeddings, MaskedLMHead, RecursiveEncoder
from fastmini.ops import Packing
from fastmini.ops.dispatch import recording_a_graph
from fastmini.ops.prepacked_linear import PrepackedWeightsMixin, checked_row_counts

if TYPE_CHECKING:  # fastmini.runtime is imported on first use of graphed_encoder only
    from fastmini.runtime import GraphedEncoder


class FastMiniPreTrainedModel(PreTrainedModel):
    config_class = FastMiniConfig
    config: FastMiniConfig
    base_model_prefix = "fastmini"
    main_input_name = "input_ids"
    _no_split_modules = ["SharedLayer", "BottleneckAdapter"]
    supports_gradient_checkpointing = True  # one recursion at a time (modules/encoder.py)
    # Attention runs through scaled_dot_product_attention unless probabilities are asked for, whatever
    # attn_implementation says; declaring it lets callers that pass attn_implementation="sdpa" load us.
    _supports_sdpa = True

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any, **kwargs: Any
    ) -> Self | tuple[Self, dict[str, list]]:
        """Load a fastmini directory, an original MiniALBERT or an ALBERT checkpoint (local or hub).

        Original checkpoints are recognised by their config.json and converted on the fly;
        ``save_pretrained`` then writes a fastmini directory with the same outputs. With
        ``output_loading_info=True``, (model, loading info) as transformers returns them.
        """
        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **options):
        """transformers' switch (``activation_checkpointing_enable``, ``gradient_checkpointing_enable`` before 5.23);
        its ``every_n_layers`` counts recursions, the layers of this model: every n-th is checkpointed, the others
        keep their activations."""
        every = options.get("every_n_layers", 1)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every_n_layers must be an int >= 1 (1: every recursion), got {every!r}")
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **options)
        self.base_model.encoder.checkpoint_every = every if enable else 1

    def train_adapters_only(self) -> dict[str, int]:
        """Adapter tuning (SPEC.md, Model 6): freeze embeddings, projector and shared layer.

        Adapters and the task head stay trainable; a model without adapters gets fresh ones.
        Returns {"trainable": ..., "total": ...} parameter counts (also logged).
        """
        return adapter_tuning.train_adapters_only(self)

    def save_adapters(self, directory: str | os.PathLike) -> None:
        """Write only the adapters and the task head (``adapters.safetensors`` + ``fastmini_adapters.json``)."""
        adapter_tuning.save_adapters(self, directory)

    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Load what ``save_adapters`` wrote (adding adapters to a model without them)."""
        adapter_tuning.load_adapters(self, directory)

    def optimize_for_inference(
        self,
        prepacked_weights: bool = True,
        varlen_attention: bool | None = None,
        cpu_token_counts: Sequence[int] = (),
    ) -> Self:
        """Switch on the inference fast paths; returns the model. Training is unaffected.

        ``prepacked_weights``: on the CPU, the GEMM weights of the shared layer, of the adapters' up-projections
        (and of the masked-LM head) are reordered once for oneDNN and stay so across recursions and calls
        (fastmini.ops.prepacked_linear), residual adds and GELU fused into those GEMMs; where only the last hidden
        state is wanted the N recursions then run as one lean loop (fastmini.modules.prepacked_recursion); the cache
        follows in-place updates, optimizer steps, ``load_state_dict`` and ``.to()`` by itself, but
        not writes through ``param.data`` (they bypass version counters): call this again after
        those. ``False`` switches it off again.
        ``varlen_attention``: on CUDA, whether unpadded batches attend through torch's variable-length
        flash kernel on the packed tokens (fp16/bf16; a model on the CPU, other dtypes and dropout keep the
        usual path). ``None``, the default: the automatic choice, which takes that kernel where it runs
        (verified on an H200, tests/test_varlen_attention.py); ``True`` insists on it (an error where torch
        lacks it); ``False`` keeps attention in the padded layout of each batch (torch's SDPA).
        ``cpu_token_counts``: for fixed-shape CPU serving, the token counts its forwards carry (batch x length
        of full batches; with unpadding on, the default, the real tokens of padded ones): for each, the prepacked
        GEMM weights are also packed for MKL's packed sgemm at that count, which forwards of exactly that many
        tokens then take (other counts: the oneDNN path). Measured on a 2-core AVX-512 CPU at the published size:
        a (1, 32) forward 18.2 -> 15.9 ms; smaller gains as counts grow, a loss at 4096. Costs memory per count:
        the GEMM weights once more (~27 MB for the published encoder, ~90 MB more for its masked-LM decoder), and
        their packing at the first forward (~8 ms, ~40 ms for that decoder); nothing where torch lacks MKL (see
        ops.prepacked_linear). Each call sets every switch anew: counts not given are none.
        """
        if varlen_attention is not None and not isinstance(varlen_attention, bool):
            raise TypeError(
                f"optimize_for_inference: varlen_attention must be True, False or None, got {varlen_attention!r}"
            )
        token_counts = checked_row_counts(cpu_token_counts, "optimize_for_inference: cpu_token_counts")
        if token_counts and not prepacked_weights:
            raise ValueError("optimize_for_inference: cpu_token_counts needs prepacked_weights=True")
        for module in self.modules():
            if isinstance(module, PrepackedWeightsMixin):  # the shared layer, the adapters, the masked-LM head
                module.use_prepacked_weights(prepacked_weights, token_counts)
        backend = {None: None, True: "cuda", False: "torch"}[varlen_attention]  # ops.attention's packed backends
        self.base_model.encoder.shared_layer.packed_attention_backend = backend
        return self

    def graphed_encoder(self, *, unpadded: bool = False, **options: Any) -> GraphedEncoder:
        """The encoder's last hidden state, (B, S, H), replayed through one CUDA graph per shape
        bucket: ``fastmini.runtime.GraphedEncoder`` over ``encode(..., unpad=False)`` (options:
        its bucket and capture arguments). For inference on CUDA, model in ``eval()`` (a capture refuses
        train mode); graphs keep the settings they were captured with: ``reset()`` the encoder after
        changing the model's dtype, adapters or ``set_*`` / ``optimize_for_inference`` switches. Calls from
        several threads take turns (its buffers are shared), on one CUDA stream; ``prepare()`` before serving.
        Verified on an H200 (tests/test_runtime_cuda_graphs.py).

        ``unpadded=True``: ``fastmini.runtime.UnpaddedGraphedEncoder``, one graph per (batch, sequence,
        token count) bucket running the unpadded path on the real tokens (for ragged batches; one host
        sync a call reads the mask). Verified on an H200 (tests/test_runtime_unpadded_graphs.py)."""
        from fastmini.runtime import GraphedEncoder, UnpaddedGraphedEncoder

        base = self.base_model

        def check_eval() -> None:  # dropout would run in every capture and be frozen into its graph
            if base.training:
                raise RuntimeError("graphed_encoder: the model is in train() mode; call model.eval() first")

        check_eval()
        options.setdefault("max_sequence_length", self.config.max_position_embeddings)
        # where prepare() captures before any call: read when needed, so that it follows the model moved + reset()
        options.setdefault("device", lambda: base.device)
        # Only the last hidden state: a config's output_hidden_states / output_attentions would have every graph
        # compute (and re-pad) what it throws away, and attention maps take the slower eager attention.
        only_the_sequence = dict(output_attentions=False, output_hidden_states=False, repad_hidden_states=False)

        # These run at capture (warm-ups included) and for shapes beyond the buckets, never in a CUDA graph's
        # replay: a check there costs replays nothing and catches a model put back in train() since.
        def encode_padded(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            check_eval()
            return base.encode(ids, mask, unpad=False, **only_the_sequence).sequence

        def encode_packed(ids: torch.Tensor, mask: torch.Tensor, packing: Packing | None) -> torch.Tensor:
            check_eval()
            encoded = base.encode(ids, mask, packing=packing, **only_the_sequence)
            return encoded.repad(encoded.sequence)

        embeddings, shared_layer = base.embeddings, base.encoder.shared_layer

        def weights_fingerprint() -> tuple:
            """Where two of the weights live (~3 us, every call): .to() and load_state_dict(assign=True) move them
            all. Looked up from their parents: assign=True replaces the Parameter objects themselves, and
            set_input_embeddings() the embedding module."""
            embedding, shared = embeddings.word_embeddings.weight, shared_layer.ffn_output.weight
            return embedding.data_ptr(), embedding.dtype, shared.data_ptr(), shared.dtype

        options.setdefault("weights_fingerprint", weights_fingerprint)
        if not unpadded:
            # beyond the buckets the model's own layout (unpadded unless set_unpadding(False)): no graph to fit
            options.setdefault("eager_fn", lambda ids, mask: encode_packed(ids, mask, None))
            return GraphedEncoder(encode_padded, **options)
        return UnpaddedGraphedEncoder(encode_packed, **options)

    def set_unpadding(self, enabled: bool = True) -> Self:
        """Whether padded batches run on their real tokens only (the default) or in the padded layout
        with padded keys masked; returns the model. The outputs are the same either way (zeros at
        padded positions, padding never in a loss; of the attention maps, the rows of real tokens:
        a padded query's row means nothing in either layout). The padded layout spends work on padding but no
        shape depends on the mask's values and no host sync reads it: what ``torch.compile(...,
        fullgraph=True)``, ``mode="reduce-overhead"`` and CUDA graphs need. With unpadding on,
        ``torch.compile`` still works, with a graph break where the mask is read."""
        self.base_model.unpadding = bool(enabled)
        return self

    def set_low_precision_maps(self, enabled: bool = True) -> Self:
        """Whether, under autocast (bf16/fp16), the attention probabilities that ``output_attentions`` returns
        stay in autocast's dtype (softmax computed in fp32 inside, rounded once) instead of autocast's fp32;
        returns the model. The distiller asks for them in every recursion and step, so they are the step's
        largest tensors: fp32 maps are twice the memory and bytes moved, and the next matmul casts them back.
        Without autocast nothing changes. Off by default (``--low-precision-maps`` of ``fastmini.distill``)."""
        self.base_model.encoder.shared_layer.low_precision_maps = bool(enabled)
        return self

    def set_low_precision_norms(self, enabled: bool = True) -> Self:
        """Whether, under autocast (bf16/fp16), the residual LayerNorms of the recursion (the shared layer's two
        and the adapters') return autocast's dtype (statistics in fp32 inside, output rounded once) instead of
        autocast's fp32; returns the model. The residual stream then stays in bf16 between the GEMMs, which
        read it without a cast, and the adds and LayerNorms move half the bytes. Without autocast nothing
        changes. Off by default (``--low-precision-norms`` of ``fastmini.distill``). It applies to the adapters the
        model has when called: call it again after ``load_adapters`` adds some."""
        self.base_model.encoder.shared_layer.low_precision_norms = bool(enabled)
        for module in self.base_model.encoder.modules():
            if isinstance(module, BottleneckAdapter):
                module.low_precision_norms = bool(enabled)
        return self


def refuse_head_mask(head_mask: torch.Tensor | None) -> None:
    """transformers 4's ALBERT took ``head_mask`` and transformers 5's accepts and ignores it: None is taken, for
    code written against either; a mask is refused rather than ignored (no head of the shared layer is ever
    masked here)."""
    if head_mask is not None:
        raise ValueError("head_mask is not supported: pass None (transformers 5's ALBERT ignores it too)")


def _check_mask_shape(attention_mask: torch.Tensor, shape: torch.Size) -> None:
    if attention_mask.shape != shape:
        raise ValueError(
            f"attention_mask must have the (batch, sequence) shape of the input, {tuple(shape)}; "
            f"got {tuple(attention_mask.shape)}"
        )


def packing_for(attention_mask: torch.Tensor | None, shape: torch.Size) -> Packing | None:
    """A Packing when the batch has padding; None when every token is real (nothing to skip).

    Whether there is padding is read off the packing's own token count: one read of the mask on the host
    (on a GPU, a wait for the queued work) where asking ``mask.all()`` first would be a second."""
    if attention_mask is None:
        return None
    _check_mask_shape(attention_mask, shape)
    packing = Packing.from_attention_mask(attention_mask)
    return None if packing.indices.numel() == attention_mask.numel() else packing


def _zero_padding(hidden: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(~key_padding_mask[..., None], 0.0)


@dataclass
class Encoded:
    """The encoder's result before re-padding: heads read ``sequence`` (packed when ``packing``)."""

    sequence: torch.Tensor
    packing: Packing | None
    hidden_states: tuple[torch.Tensor, ...] | None  # re-padded unless encode() was asked not to
    attentions: tuple[torch.Tensor, ...] | None
    key_padding_mask: torch.Tensor | None = None  # (B, S) True for real tokens, in the padded layout only

    def repad(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token values in ``sequence``'s layout as (B, S, ...) with zeros at padded positions."""
        if self.packing is not None:
            return self.packing.unpack(tokens)
        if self.key_padding_mask is not None and tokens is not self.sequence:  # encode() zeroed sequence already
            return _zero_padding(tokens, self.key_padding_mask)
        return tokens

    def first_tokens(self) -> torch.Tensor:
        """(B, H): each row's first real token, what classification reads ([CLS] with right and with left
        padding alike; zeros for a row without real tokens). Without padding, ``sequence[:, 0]``."""
        if self.packing is None and self.sequence.shape[1] == 0:
            raise ValueError("the input has sequence length 0: there is no first token to classify or pool")
        if self.packing is not None:
            tokens, width = self.sequence.shape
            offsets = self.packing.cu_seqlens.long()
            empty = offsets[1:] == offsets[:-1]
            if tokens == 0:
                return self.sequence.new_zeros(empty.shape[0], width)
            first = self.sequence.index_select(0, offsets[:-1].clamp(max=tokens - 1))
            return first.masked_fill(empty[:, None], 0.0)
        if self.key_padding_mask is not None:  # encode() zeroed the padding: an empty row reads zeros
            first = self.key_padding_mask.int().argmax(dim=1)
            return self.sequence[torch.arange(self.sequence.shape[0], device=first.device), first]
        return self.sequence[:, 0]

    def token_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Per-token ``labels`` (B, S) aligned with ``sequence``, padding never counted: packed (T,)
        when the batch was unpadded, else (B, S) with IGNORE_INDEX at padded positions. Either layout gives
        the same loss. Labels flattened to (B * S,) are accepted, as ALBERT's heads accept them."""
        labels = self._labels_grid(labels)
        if self.packing is not None:
            return self.packing.pack(labels)
        if self.key_padding_mask is not None:
            return labels.masked_fill(~self.key_padding_mask, IGNORE_INDEX)
        return labels

    def _labels_grid(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` as (B, S), the input's token grid; a clear error for any other shape."""
        if self.packing is not None:
            grid = (self.packing.batch_size, self.packing.seq_len)
        elif self.key_padding_mask is not None:
            grid = tuple(self.key_padding_mask.shape)
        else:
            grid = tuple(self.sequence.shape[:2])
        if tuple(labels.shape) == grid:
            return labels
        if labels.dim() == 1 and labels.numel() == grid[0] * grid[1]:
            return labels.view(grid)
        raise ValueError(
            f"labels must be (batch, sequence) = {grid}, one per input token (or flattened to {grid[0] * grid[1]}), "
            f"got shape {tuple(labels.shape)}"
        )

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of per-token ``logits`` (aligned with ``sequence``) over the real tokens labelled."""
        labels = self.token_labels(labels.to(logits.device))
        return CrossEntropyLoss()(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class FastMiniModel(FastMiniPreTrainedModel):
    def __init__(self, config: FastMiniConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.projector = (
            nn.Linear(config.embedding_size, config.hidden_size) if config.use_embedding_projection else None
        )
        self.encoder = RecursiveEncoder(config)
        self.unpadding = True  # see set_unpadding
        # transformers' ALBERT classifies from a tanh pooler; MiniALBERT from the first token directly.
        self.pooler = (
            nn.Linear(config.hidden_size, config.hidden_size)
            if add_pooling_layer and config.head_variant == "albert"
            else None
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def encode(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        repad_hidden_states: bool = True,
        unpad: bool | None = None,
        packing: Packing | None = None,
    ) -> Encoded:
        """Embeddings, unpadding, projector and the recursion; heads call this directly so that
        they too run on real tokens only. With ``repad_hidden_states=False`` the hidden states of
        a padded batch stay packed (T, H), for callers that work on real tokens (the distiller).

        ``unpad=False`` keeps the padded (B, S) layout and masks padded keys instead: more work,
        but no shape depends on the mask's values and no host sync reads it, which is what CUDA
        graph capture needs (fastmini.runtime). Padded positions of the outputs are zeros either way.
        ``None``: the model's setting (``set_unpadding``; on by default), except while ``torch.jit.trace``
        or ``torch.export`` records a graph: the padded layout then.

        ``packing``: the caller's own Packing of ``attention_mask`` (fastmini.runtime's unpadded CUDA graphs
        build one from static buffers, so that no host sync reads the mask inside the graph); the model then
        runs unpadded on its tokens whatever ``unpad`` says."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("FastMiniModel: give exactly one of input_ids or inputs_embeds")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if len(shape) != 2:
            given = "input_ids" if input_ids is not None else "inputs_embeds"
            full = tuple((input_ids if input_ids is not None else inputs_embeds).shape)
            raise ValueError(
                f"FastMiniModel: {given} must be batched, (batch, sequence{'' if input_ids is not None else ', E'}); "
                f"got shape {full} (one sequence: add a batch dimension, e.g. {given}[None])"
            )
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.config.embedding_size:
            raise ValueError(
                f"FastMiniModel: inputs_embeds must be embedding_size ({self.config.embedding_size}) wide, the "
                f"width of the word embeddings (factorised: not hidden_size); got {inputs_embeds.shape[-1]}"
            )
        key_padding_mask = None
        if unpad is None:
            # A recorded graph serves every later input: unpadding would bake in the example's mask (its branch,
            # its number of real tokens), so recorders get the padded layout, whose shapes do not depend on it.
            unpad = self.unpadding and not recording_a_graph()
        if packing is not None:
            if not isinstance(packing, Packing) or (packing.batch_size, packing.seq_len) != tuple(shape):
                raise ValueError(f"FastMiniModel.encode: packing must be a Packing of a {tuple(shape)} batch")
        elif unpad:
            packing = packing_for(attention_mask, shape)
        elif attention_mask is not None:
            _check_mask_shape(attention_mask, shape)
            packing, key_padding_mask = None, attention_mask.bool()
        else:
            packing = None

        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        if packing is not None:
            hidden = packing.pack(hidden)  # before the E -> H projector: E is the narrower width
        if self.projector is not None:
            hidden = self.projector(hidden)
        encoded = self.encoder(
            hidden,
            packing,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            key_padding_mask=key_padding_mask,
        )
        sequence, hidden_states = encoded.last_hidden_state, encoded.hidden_states
        if hidden_states is not None and packing is not None and repad_hidden_states:
            hidden_states = tuple(packing.unpack(h) for h in hidden_states)
        if key_padding_mask is not None:
            sequence = _zero_padding(sequence, key_padding_mask)
            if hidden_states is not None:
                hidden_states = tuple(_zero_padding(h, key_padding_mask) for h in hidden_states)
        return Encoded(sequence, packing, hidden_states, encoded.attentions, key_padding_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Padded positions of ``last_hidden_state`` and ``hidden_states`` are zeros: no work is
        spent on them."""
        refuse_head_mask(head_mask)
        encoded = self.encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
        )
        sequence = encoded.repad(encoded.sequence)
        pooled = torch.tanh(self.pooler(encoded.first_tokens())) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(
            last_hidden_state=sequence,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return _finish(output, return_dict, self.config)


def _finish(output, return_dict: bool | None, config: FastMiniConfig):
    return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class FastMiniForMaskedLM(FastMiniPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "fastmini.embeddings.word_embeddings.weight"}

    def __init__(self, config: FastMiniConfig):
        super().__init__(config)
        self.fastmini = FastMiniModel(config, add_pooling_layer=False)
        self.lm_head = MaskedLMHead(config, MINIALBERT_FIXED_LAYER_NORM_EPS)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> MaskedLMOutput | tuple:
        """``labels`` (B, S): token ids at the positions to predict, -100 elsewhere."""
        refuse_head_mask(head_mask)
        encoded = self.fastmini.encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
        )
        logits = self.lm_head(encoded.sequence)  # real tokens only when the batch is padded
        loss = encoded.token_loss(logits, labels) if labels is not None else None
        logits = encoded.repad(logits)
        output = MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return _finish(output, return_dict, self.config)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: FastMiniConfig) -> torch.Tensor:
    """The loss transformers' classifiers pick from ``config.problem_type`` (set on first use)."""
    labels = labels.to(logits.device)
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return MSELoss()(logits.squeeze(), labels.squeeze()) if num_labels == 1 else MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    # In fp32 at least (fp64 stays): soft targets such as 0.3 are not rounded to a 16-bit logits dtype (autocast
    # computes transformers' BCE in fp32 too), and integer 0/1 labels of an explicit problem_type work.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return BCEWithLogitsLoss()(logits.to(dtype), labels.to(dtype))


class FastMiniForSequenceClassification(FastMiniPreTrainedModel):
    def __init__(self, config: FastMiniConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.fastmini = FastMiniModel(config, add_pooling_layer=True)
        self.dropout = nn.Dropout(config.effective_classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput | tuple:
        refuse_head_mask(head_mask)
        encoded = self.fastmini.encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
        )
        first_token = encoded.first_tokens()  # no re-padding: B rows are read, not B x S
        pooled = torch.tanh(self.fastmini.pooler(first_token)) if self.fastmini.pooler is not None else first_token
        logits = self.classifier(self.dropout(pooled))
        loss = sequence_classification_loss(logits, labels, self.config) if labels is not None else None
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return _finish(output, return_dict, self.config)


class FastMiniForTokenClassification(FastMiniPreTrainedModel):
    def __init__(self, config: FastMiniConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.fastmini = FastMiniModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.effective_classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> TokenClassifierOutput | tuple:
        """``labels`` (B, S): class ids per token, -100 where no loss is wanted."""
        refuse_head_mask(head_mask)
        encoded = self.fastmini.encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
        )
        logits = self.classifier(self.dropout(encoded.sequence))
        loss = encoded.token_loss(logits, labels) if labels is not None else None
        logits = encoded.repad(logits)
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return _finish(output, return_dict, self.config)
