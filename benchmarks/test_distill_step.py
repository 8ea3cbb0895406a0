"""One distillation step, fastmini's distiller vs the original recipe's step.

Two setups (one step = teacher forward + student forward/backward + all four losses, no optimizer
update, both in train mode with dropout 0.1):
- "cpu" (CPU only; target >= 2x): a MiniLM-L6-H384-sized BERT teacher *with* an MLM head (so all
  four losses run: V=30522, H=384, A=12, I=1536, 6 layers; random weights) and the demo student
  (E=128, N=6, r=16, adapters); batch 8 x 128 of Wikipedia-like windows (six full, two shorter
  last-of-document ones), fp32.
- "cuda" (CUDA only; target >= 3x tokens/s and <= 0.5x peak memory): a bert-base-sized teacher
  (H=768, 12 layers, I=3072, MLM head; random weights) and the published student (E=128, H=768,
  N=6, r=16, every second teacher layer); batch 48 x 256 (40 full windows, 8 shorter), teacher in
  bf16, student under bf16 autocast, for both contenders.
"fastmini" steps as the trainer does by default on that device (fastmini.distill.speed_defaults: on CUDA the
teacher replayed from CUDA graphs, ``--graph-teacher``, and the student's attention maps in bf16,
``--low-precision-maps``; on the CPU neither applies). "fastmini-checkpointed" adds ``--gradient-checkpointing``
(one recursion recomputed at a time in backward): what it costs in time, and on CUDA what it saves in peak
memory. On CUDA also: "fastmini-low-precision" adds ``--low-precision-norms`` (the residual LayerNorms' outputs
in bf16), "fastmini-eager-teacher" runs the teacher eagerly (``--no-graph-teacher``) and "fastmini-switches-off"
does that with fp32 maps too (``--no-low-precision-maps``, the defaults before session 13's measurements),
"fastmini-padded-student" runs the student on the padded batch (``set_unpadding(False)``: ~9% padding here, no
packing copies, every op on the padded layout the attention maps have anyway);
test_distillation_step_compiled times fastmini with ``--compile-student`` (the student side through
torch.compile) against it, in a test of its own (its compile takes a minute or more of the GPU run's budget);
test_distillation_step_compiled_graphs, last, an experiment with no trainer switch yet: the student's encoder
compiled with mode="reduce-overhead" (CUDA graphs) on the padded layout, head and losses eager
(GraphedPaddedEncoderSide; on the CPU it gave the eager padded step's loss and gradients to 1e-6).
Inputs are 15% masked. On CUDA the results also hold each step's top kernels, its host waits (with the line
that causes each) and its phases: the teacher's forward alone, and the host's time to issue a step against the
step's (``Steps.phases``); on both, the time of fastmini's kernels (the CPU's: its time) in the teacher's forward,
the student's, the losses and the backward (``phase_ms_*``, ``Steps.phase_times``).

Baseline ("original"): the original recipe's step (nlpie-research/MiniALBERT
general_distillation.py) rebuilt on transformers 5: fastmini.baselines.original's MiniALBERT
(transformers' ALBERT modules, eager attention, attention maps everywhere), the teacher's
full forward with eager attention and full-vocabulary logits, full-vocabulary student logits,
and the losses as SPEC.md writes them (masked_select of the counted rows, KLDivLoss "mean" /
CosineEmbeddingLoss / KLDivLoss "batchmean" / cross-entropy). fastmini: ``Distiller`` (teacher
under inference_mode, student unpadded, MLM heads and output KL on masked rows only, attention
KL without extra saved maps, the teacher's maps only in the layers the attention loss reads (SDPA in the
others: fastmini.distill.teacher_attention), no host reads of device values: the batch is built on the CPU and moved
by ``Batch.to``, which works out its token positions there, as the trainer does).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import unittest.mock
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmini import FastMiniConfig, FastMiniForMaskedLM
from fastmini.baselines.original import OriginalMiniAlbertForMaskedLM, original_config_like
from fastmini.distill import distiller as distiller_module
from fastmini.distill.distiller import Batch, Distiller, StudentSide, compiled_student_side, teacher_forward
from fastmini.distill.losses import LossWeights
from fastmini.distill.models import Teacher
from fastmini.distill.speed_defaults import graph_teacher_by_default, low_precision_maps_by_default
from fastmini.flops import encoder_flops, masked_lm_head_flops
from fastmini.models.modeling import Encoded
from fastmini.training.memory import enable_activation_checkpointing


@dataclass(frozen=True)
class Setup:
    device: str
    teacher: dict
    student: dict
    layers: tuple[int, ...]  # teacher layer matched to each recursion
    lengths: tuple[int, ...]  # real tokens of each sequence; the batch is padded to the longest
    bf16: bool
    rounds: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.lengths), max(self.lengths)


MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
STUDENT = dict(num_recursions=6, embedding_size=128, use_adapter=True, reduction_factor=16)
SETUPS = {
    "cpu": Setup("cpu", MINILM, STUDENT, (1, 2, 3, 4, 5, 6), (128,) * 6 + (100, 60), bf16=False, rounds=8),
    "cuda": Setup("cuda", BERT_BASE, STUDENT, (2, 4, 6, 8, 10, 12), (256,) * 40 + (200, 180, 150, 120, 100, 80, 60, 40),
                  bf16=True, rounds=20),
}  # fmt: skip


def available(name: str) -> bool:
    """The CPU setup where there is no GPU (a GPU machine's time goes to the GPU setup)."""
    return torch.cuda.is_available() == (name == "cuda")


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request) -> Setup:
    if not available(request.param):
        pytest.skip(f"the {request.param} setup runs {'on CUDA only' if request.param == 'cuda' else 'without CUDA'}")
    return SETUPS[request.param]


@pytest.fixture(scope="module")
def pair(setup):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(**setup.teacher, attn_implementation="eager")).eval().requires_grad_(False)
    config = FastMiniConfig.from_teacher(teacher.config, **setup.student)
    original = OriginalMiniAlbertForMaskedLM(original_config_like(config)).train()
    teacher_dtype = torch.bfloat16 if setup.bf16 else torch.float32
    student = FastMiniForMaskedLM(config).set_low_precision_maps(low_precision_maps_by_default(autocast_of(setup)))
    return teacher.to(setup.device, teacher_dtype), student.train().to(setup.device), original.to(setup.device)


def autocast_of(setup: Setup) -> torch.dtype | None:
    return torch.bfloat16 if setup.bf16 else None


@pytest.fixture(scope="module")
def batch(setup) -> Batch:
    return masked_batch(setup)


def masked_batch(setup: Setup) -> Batch:
    """The setup's windows of random words, 15% masked (never the first or last token), on its device."""
    generator = torch.Generator().manual_seed(0)
    size, seq = setup.shape
    lengths = torch.tensor(setup.lengths)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1000, 30000, (size, seq), generator=generator) * mask
    special = torch.zeros_like(mask, dtype=torch.bool)
    special[:, 0] = True
    special[torch.arange(size), lengths - 1] = True
    selected = (torch.rand(size, seq, generator=generator) < 0.15) & mask.bool() & ~special
    labels = input_ids.masked_fill(~selected, -100)
    return Batch(input_ids.masked_fill(selected, 103), mask, torch.zeros_like(input_ids), labels).to(setup.device)


def original_losses(student, teacher, batch: Batch, layers: tuple[int, ...]) -> torch.Tensor:
    """general_distillation.py's DistillationWrapper.forward, as SPEC.md writes the losses."""
    mask = batch.attention_mask
    logits, hidden_states, attentions = student(batch.input_ids, mask, batch.token_type_ids)
    with torch.no_grad():
        t = teacher(
            input_ids=batch.input_ids, attention_mask=mask, token_type_ids=batch.token_type_ids,
            output_hidden_states=True, output_attentions=True,
        )  # fmt: skip
    mlm = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.labels.view(-1), ignore_index=-100)
    attention = hidden = 0.0
    for i, s_map in enumerate(attentions):
        t_map = t.attentions[layers[i] - 1].float()
        select = mask.unsqueeze(1).repeat(1, s_map.shape[1], 1).unsqueeze(-1).expand_as(s_map).bool()
        s = torch.masked_select(s_map.float(), select).view(-1, s_map.shape[-1]) + 1e-12
        tt = torch.masked_select(t_map, select).view(-1, s_map.shape[-1]) + 1e-12
        attention = attention + nn.KLDivLoss(reduction="mean")(torch.log(s), tt)
        s_hidden, t_hidden = hidden_states[1:][i], t.hidden_states[1:][layers[i] - 1]
        select = mask.unsqueeze(-1).expand_as(s_hidden).bool()
        sh = torch.masked_select(s_hidden, select).view(-1, s_hidden.shape[-1])
        th = torch.masked_select(t_hidden, select).view(-1, s_hidden.shape[-1])
        hidden = hidden + nn.CosineEmbeddingLoss()(sh, th, sh.new_ones(sh.shape[0]))
    select = (batch.labels > -1).unsqueeze(-1).expand_as(logits).bool()
    s_logits = torch.masked_select(logits, select).view(-1, logits.shape[-1])
    t_logits = torch.masked_select(t.logits, select).view(-1, logits.shape[-1])
    output = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_logits, -1), F.softmax(t_logits, -1))
    return 1.0 * mlm + 3.0 * (attention + hidden) + 5.0 * output


def step_flops(setup: Setup, student_config, masked: int) -> int:
    """Useful work of one step: teacher forward, student forward + backward (2x), masked-row heads."""
    teacher_encoder = encoder_flops(
        FastMiniConfig(**{**setup.teacher, "embedding_size": setup.teacher["hidden_size"], "use_adapter": False}),
        list(setup.lengths),
    )  # a BERT layer is the shared layer without adapters
    student = encoder_flops(student_config, list(setup.lengths)) + masked_lm_head_flops(student_config, masked)
    return teacher_encoder + masked_lm_head_flops(student_config, masked) + 3 * student


def _synchronise(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def resident_bytes(*models: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in models for t in (*m.parameters(), *m.buffers()))


def peak_memory(step, setup: Setup, models: tuple[nn.Module, ...]) -> int | None:
    """Peak bytes allocated on the GPU (torch's allocator; not what it reserves) by one step, as a process
    holding only ``models`` (the teacher and this contender's student) would see it: what the step adds
    above the memory in use before it, plus those models' weights. The benchmark holds three students at
    once; counting them all would add the same fixed amount to every contender and push every ratio towards
    1. The step runs once before, so that one-time allocations count against no contender. None on the CPU.
    A graphed teacher's static outputs are allocated in that first run and stay: they are the step's own memory
    (an eager teacher allocates its outputs inside the step), counted as resident (``GraphedTeacher.static_bytes``)."""
    if setup.device != "cuda":
        return None
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    graphed = getattr(getattr(step, "distiller", None), "graphed_teacher", None)
    kept_by_graphs = graphed.static_bytes if graphed is not None else 0
    return torch.cuda.max_memory_allocated() - before + resident_bytes(*models) + kept_by_graphs


def in_range(name: str, function):
    """``function`` called inside a ``torch.profiler.record_function(name)`` range."""

    def ranged_call(*arguments, **keywords):
        with torch.profiler.record_function(name):
            return function(*arguments, **keywords)

    return ranged_call


def ranged(owner, attribute: str, name: str) -> None:
    setattr(owner, attribute, in_range(name, getattr(owner, attribute)))


def between_events(function, spans: list):
    """``function`` between two CUDA events, appended to ``spans`` each call: the GPU time of all it issues,
    replayed CUDA graphs included (the GPU may idle inside the span while the host issues: an upper bound)."""

    def timed_call(*arguments, **keywords):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = function(*arguments, **keywords)
        end.record()
        spans.append((start, end))
        return result

    return timed_call


class GraphedPaddedEncoderSide(StudentSide):
    """The experiment behind "fastmini-compiled-graphs" (no trainer switch yet): the student's encoder alone through
    ``torch.compile(mode="reduce-overhead")``, inductor's kernels replayed from CUDA graphs, on the padded layout,
    whose shapes depend on the batch's (B, S) alone (the unpadded path's token counts, like the masked rows of the
    MLM head, change from batch to batch: a graph each). The MLM head, the projection and the losses stay eager.
    Every forward starts a CUDA-graph iteration, so the step must not accumulate gradients across forwards."""

    def __init__(self, student, projection=None):
        super().__init__(student, projection)
        self._compiled_encode = torch.compile(self._padded_encode, mode="reduce-overhead", dynamic=False)

    def _padded_encode(self, input_ids, attention_mask, token_type_ids, need_hidden: bool, need_attentions: bool):
        encoded = self.student.fastmini.encode(
            input_ids, attention_mask, token_type_ids, output_attentions=need_attentions,
            output_hidden_states=need_hidden, repad_hidden_states=False, unpad=False,
        )  # fmt: skip
        return encoded.sequence, encoded.hidden_states, encoded.attentions, encoded.key_padding_mask

    def encode(self, batch, positions, need_hidden, need_attentions):
        torch.compiler.cudagraph_mark_step_begin()
        sequence, hidden, attentions, real = self._compiled_encode(
            batch.input_ids, batch.attention_mask, batch.token_type_ids, need_hidden, need_attentions
        )
        return Encoded(sequence, None, hidden, attentions, real), False


@dataclass
class Steps:
    """The contenders' steps over one setup's pair and batch (each a callable that runs one step and, unless told
    otherwise, waits for the GPU)."""

    setup: Setup
    pair: tuple
    batch: Batch

    def __post_init__(self):
        teacher_model = self.pair[0]
        self.teacher = Teacher(
            encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="bench"
        )
        self.autocast_dtype = autocast_of(self.setup)

    def distiller(
        self, model, compiled: bool = False, graph_teacher: bool | None = None, side_class=StudentSide
    ) -> Distiller:
        """``graph_teacher`` None: the trainer's default; ``side_class``: the student side's (an experiment's)."""
        if graph_teacher is None:
            graph_teacher = graph_teacher_by_default(torch.device(self.setup.device), self.teacher)
        side = side_class(model, None)
        side = compiled_student_side(side) if compiled else side
        return Distiller(
            side, self.teacher, self.setup.layers, LossWeights(), 1.0, self.autocast_dtype,
            graph_teacher="cuda" if graph_teacher else None,
        )  # fmt: skip

    def of(
        self,
        model,
        synchronise: bool = True,
        compiled: bool = False,
        graph_teacher: bool | None = None,
        side_class=StudentSide,
    ):
        """One step of a Distiller of ``model`` (the step's ``distiller`` attribute)."""
        distiller = self.distiller(model, compiled, graph_teacher, side_class)

        def step():
            distiller(self.batch).total.backward()
            model.zero_grad(set_to_none=True)
            if synchronise:
                _synchronise(self.setup)

        step.distiller, step.model = distiller, model
        return step

    def phases(self, unsynchronised_step, rounds: int = 10) -> dict[str, float]:
        """Where a step's time goes (CUDA), medians of ``rounds``: the teacher's forward alone (synchronised),
        and how long the host takes to issue a whole step (returning before the GPU is done) against the
        step's own time; an issue time close to the step's says the GPU waits on the host."""

        def teacher():
            teacher_forward(self.teacher, self.batch, self.setup.layers, True, True, self.teacher.head is not None)

        issue, whole, teacher_alone = [], [], []
        for _ in range(rounds + 1):  # the first round warms up
            _synchronise(self.setup)
            start = time.perf_counter()
            unsynchronised_step()
            issued = time.perf_counter()
            _synchronise(self.setup)
            done = time.perf_counter()
            teacher()
            _synchronise(self.setup)
            issue.append(issued - start)
            whole.append(done - start)
            teacher_alone.append(time.perf_counter() - done)
        return {
            name: round(statistics.median(values[1:]) * 1e3, 2)
            for name, values in (("host_issue", issue), ("step", whole), ("teacher_forward", teacher_alone))
        }

    def phase_times(self, range_times, step) -> dict[str, float]:
        """GPU time (CPU: time) of one of ``of``'s ``step``, phase by phase (``range_times``: the fixture's
        function): the teacher's forward, the student's, the losses (the rest of the forward) and the backward
        (the rest of the step). Its distiller's teacher and student are wrapped in named ranges for good.

        A graphed teacher's replayed kernels belong to no op of its range (the profiler links a graph's kernels to
        no launching op): its GPU time is taken between CUDA events around its call instead, and moved from the
        backward (the rest of "all") to the forward."""
        distiller, model = step.distiller, step.model
        teacher_name = "graphed_teacher" if distiller.graphed_teacher is not None else None
        ranged(distiller, "student_side", "student forward")
        teacher_spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        if teacher_name:
            ranged(distiller, teacher_name, "teacher forward")
            if self.setup.device == "cuda":
                distiller.graphed_teacher = between_events(distiller.graphed_teacher, teacher_spans)
        teacher_forward_of = distiller_module.teacher_forward

        def ranged_step():
            with contextlib.ExitStack() as stack:
                if not teacher_name:  # the distiller calls the module's function
                    stack.enter_context(
                        unittest.mock.patch.object(distiller_module, "teacher_forward",
                                                   in_range("teacher forward", teacher_forward_of))
                    )  # fmt: skip
                with torch.profiler.record_function("forward"):
                    terms = distiller(self.batch)
            terms.total.backward()
            model.zero_grad(set_to_none=True)

        ranged_step()  # a compiled student compiles, a graphed teacher records: outside the profile
        teacher_spans.clear()
        times = range_times(ranged_step, ("teacher forward", "student forward", "forward"), self.setup.device)
        forward = times.pop("forward")
        if teacher_spans:  # range_times synchronised: the events have their times
            start, end = teacher_spans[-1]
            forward += start.elapsed_time(end) - times["teacher forward"]
            times["teacher forward"] = round(start.elapsed_time(end), 3)
        times["losses"] = round(forward - times["teacher forward"] - times["student forward"], 3)
        times["backward"] = round(times.pop("all") - forward, 3)
        return times

    def variant_against_eager(self, benchmark, compare, describe_device, name, step_of, group, described):
        """Times ``step_of(a copy of the student)``, named ``name`` (``described`` in the results), against the
        eager step and the original (``measure``); returns its step."""
        student = self.pair[1]
        variant = copy.deepcopy(student)
        contenders = {"original": self.original, "fastmini": self.of(student), name: step_of(variant)}
        models = {"original": self.pair[2], "fastmini": student, name: variant}
        self.measure(
            benchmark, compare, describe_device, contenders, models, name, group=group,
            backend=f"{name}: {described}; fastmini: eager; both with the trainer's defaults (on CUDA "
            "--graph-teacher --low-precision-maps); original: transformers modules, eager attention, full logits",
        )  # fmt: skip
        return contenders[name]

    def original_body(self):
        teacher_model, _, original = self.pair
        autocast = (
            torch.autocast(self.setup.device, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            loss = original_losses(original, teacher_model, self.batch, self.setup.layers)
        loss.backward()
        original.zero_grad(set_to_none=True)

    def original(self):
        self.original_body()
        _synchronise(self.setup)

    def measure(self, benchmark, compare, describe_device, contenders, models, timed, backend, group=""):
        """Peak memory of each contender (its first runs: a compiled step compiles there), ``timed`` by
        pytest-benchmark, then all of them interleaved against "original"; the medians."""
        setup, student = self.setup, models["fastmini"]
        peaks = {name: peak_memory(step, setup, (self.pair[0], models[name])) for name, step in contenders.items()}
        benchmark.pedantic(contenders[timed], rounds=max(3, setup.rounds // 2), warmup_rounds=1)
        masked = int((self.batch.labels != -100).sum())
        size, seq = setup.shape
        medians = compare(
            benchmark,
            group=f"distillation step {size}x{seq} ({setup.device}){group}",
            contenders=contenders,
            baseline="original",
            flops=step_flops(setup, student.config, masked),
            useful_tokens=sum(setup.lengths),
            rounds=setup.rounds,
            shape=f"batch={size}x{seq} ({sum(setup.lengths)} real tokens, {masked} masked); teacher BERT with MLM "
            f"head (H={setup.teacher['hidden_size']}, {setup.teacher['num_hidden_layers']} layers, V=30522); "
            f"student E=128 H={student.config.hidden_size} N=6 r=16, layers {setup.layers}",
            dtype="bf16 teacher + bf16 autocast student" if setup.bf16 else "float32",
            backend=backend,
            device=describe_device(torch.device(setup.device)),
        )
        if peaks["original"] is not None:  # CUDA's allocator
            benchmark.extra_info["peak_allocated_gib"] = {name: round(peak / 2**30, 2) for name, peak in peaks.items()}
            benchmark.extra_info["peak_memory_ratio"] = {
                name: round(peak / peaks["original"], 3) for name, peak in peaks.items() if name != "original"
            }
        return medians


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")
def test_distillation_step(
    benchmark,
    compare,
    describe_device,
    record_kernel_profile,
    record_host_syncs,
    record_phase_times,
    setup,
    pair,
    batch,
):
    _, student, original = pair
    steps = Steps(setup, pair, batch)
    checkpointed = copy.deepcopy(student)
    enable_activation_checkpointing(checkpointed)  # --gradient-checkpointing
    step_of, original_step, original_body = steps.of, steps.original, steps.original_body
    fastmini_step, checkpointed_step = step_of(student), step_of(checkpointed)

    contenders = {"original": original_step, "fastmini": fastmini_step, "fastmini-checkpointed": checkpointed_step}
    models = {"original": original, "fastmini": student, "fastmini-checkpointed": checkpointed}
    if setup.device == "cuda":  # the trainer's two default switches off one at a time, and the norms switch on
        low_precision = copy.deepcopy(student).set_low_precision_norms()
        fp32_maps = copy.deepcopy(student).set_low_precision_maps(False)
        padded = copy.deepcopy(student).set_unpadding(False)
        contenders["fastmini-padded-student"] = step_of(padded)
        contenders["fastmini-low-precision"] = step_of(low_precision)
        contenders["fastmini-eager-teacher"] = step_of(student, graph_teacher=False)
        contenders["fastmini-switches-off"] = step_of(fp32_maps, graph_teacher=False)
        models.update({"fastmini-low-precision": low_precision, "fastmini-eager-teacher": student,
                       "fastmini-switches-off": fp32_maps, "fastmini-padded-student": padded})  # fmt: skip
    medians = steps.measure(
        benchmark, compare, describe_device, contenders, models, "fastmini",
        backend="fastmini: Distiller with the trainer's defaults (on CUDA --graph-teacher and --low-precision-maps; "
        "-checkpointed: --gradient-checkpointing, one recursion at a time; -low-precision: --low-precision-norms "
        "too, the residual stream in bf16; -eager-teacher: --no-graph-teacher; -switches-off: "
        "--no-graph-teacher --no-low-precision-maps; -padded-student: the student on the padded batch, "
        "set_unpadding(False)); original: transformers modules, eager attention, full logits",
    )  # fmt: skip
    benchmark.extra_info["speedup"] = round(medians["original"] / medians["fastmini"], 2)
    if setup.device == "cuda":  # is the step GPU-bound? kernel time against the median, and the top kernels
        for name in ("original", "fastmini", "fastmini-low-precision"):
            record_kernel_profile(benchmark, name, contenders[name])
        # How often a step makes the host wait for the GPU (the GPU idles while the host catches up after each).
        record_host_syncs(benchmark, "original", original_body)
        record_host_syncs(benchmark, "fastmini", step_of(student, synchronise=False))
        benchmark.extra_info["phases_fastmini_ms"] = steps.phases(step_of(student, synchronise=False))
    record_phase_times(benchmark, "fastmini", lambda range_times: steps.phase_times(range_times, fastmini_step))


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")
def test_distillation_step_compiled(
    benchmark, compare, describe_device, record_kernel_profile, record_phase_times, setup, pair, batch
):
    """``--compile-student`` against the eager step, in a test of its own: its compile (a minute or more) must
    cost the GPU run's budget only this comparison, not the step's main figures above. CUDA only."""
    if setup.device != "cuda":
        pytest.skip("timed on CUDA only: on the CPU the compiled step ran within 5% of the eager one (README)")
    steps = Steps(setup, pair, batch)
    step = steps.variant_against_eager(
        benchmark, compare, describe_device, "fastmini-compiled", lambda model: steps.of(model, compiled=True),
        group=", compiled",
        described="--compile-student (the student side through torch.compile, dynamic shapes)",
    )  # fmt: skip
    record_kernel_profile(benchmark, "fastmini-compiled", step)
    record_phase_times(benchmark, "fastmini-compiled", lambda range_times: steps.phase_times(range_times, step))


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")
def test_distillation_step_compiled_graphs(
    benchmark, compare, describe_device, record_kernel_profile, setup, pair, batch
):
    """An experiment, last in the file (its compile and graph recording must cost a GPU run's budget only this
    test): the student's encoder compiled with mode="reduce-overhead" on the padded layout
    (GraphedPaddedEncoderSide) against the eager step. The compiled step was host-bound on the H200 (session 13:
    33 ms of kernels in a 36.8 ms step); graphs take the host out of the encoder. CUDA only."""
    if setup.device != "cuda":
        pytest.skip("CUDA graphs: CUDA only")
    steps = Steps(setup, pair, batch)
    step = steps.variant_against_eager(
        benchmark, compare, describe_device, "fastmini-compiled-graphs",
        lambda model: steps.of(model, side_class=GraphedPaddedEncoderSide), group=", graphs",
        described="the student's encoder through torch.compile(mode='reduce-overhead') on the padded layout, head "
        "and losses eager (an experiment)",
    )  # fmt: skip
    record_kernel_profile(benchmark, "fastmini-compiled-graphs", step)
