"""The SpeLLM distillation recipe, top to bottom.

Features
- online self-distillation: the frozen original model is the teacher; its top-5 next tokens,
  their probabilities and its entropy are computed on the fly (LM head chunked along the sequence);
- the student is the same model plus k char heads. By default only the heads and a residual MLP
  read-out before them train, on the teacher's own final hidden state (``trainable_layers`` 0:
  the fallback path is the teacher); the paper's recipe trains the heads and the FFN blocks of
  the last ``trainable_layers`` (5) decoder layers (``readout_width`` 0). The label of each
  position is the teacher candidate with the lowest char NLL - log p_teacher
  (``--label_selection student_nll``: char NLL alone, the paper's rule; either way one spelling,
  no blending); the loss is char CE (characters after the label's first END ignored) +
  ``soft_char_weight`` x soft per-head targets (from the teacher's top ``soft_char_candidates``,
  5 by default) (+ ``spelling_kl_weight`` x KL from the teacher's
  top-5 to the heads' token distribution, off by default, on a ``spelling_kl_fraction`` sample of
  positions), and, where FFNs train, ``reg_weight`` x KL to the
  teacher's distribution (top-5 and the rest) through the frozen LM head, in fp32;
- two learning rates: the new char heads at ``lr`` (3e-3), the pretrained blocks at ``ffn_lr``
  (1e-3), one warm-up and linear decay;
- with ``--teacher_cache``, the teacher's output per block is stored on disk the first time the
  block is read and read back on later passes and evaluations (:mod:`spellm_ds.distill.teacher_cache`):
  a second pass then costs the student's part of a step only, and ``--teacher_cache_from`` reuses
  another run's cache, so runs that differ only in the student's training share the teacher;
- ``--rare_label_power`` (beyond the paper, off): the char loss weighted by each label token's count
  in the training text to the power ``-p``, so the spellings seen rarely get more of the gradient;
- ``--state_noise`` (beyond the paper, read-out recipe): the student reads the teacher's final state
  plus Gaussian noise, labelled by the teacher's LM head there: new training states for the cost
  of the LM head, where new text costs the whole teacher;
- ``--anchored_rows`` (beyond the paper, read-out recipe): each micro-batch adds that many rows of
  new states, real ones moved towards tokens drawn uniformly from those the training text holds,
  labelled by the teacher's LM head there (:class:`spellm_ds.distill.teacher.StateAnchors`): contexts for
  the tokens the text names too rarely for the heads to learn them; training metrics count the
  text's positions only (off: it cost raw agreement in pilots);
- ``--copy_lists SHARE`` (beyond the paper, off): that share of the training blocks are list texts
  of the training text's words drawn uniformly, read twice, so the teacher's top-1 is a rare word
  as often as a common one (:mod:`spellm_ds.data.copy_lists`);
- ``--whiten_readout`` (beyond the paper, off): the read-out reads the teacher's final state centred
  and whitened, with statistics fixed from the first step's blocks before training
  (:meth:`spellm_ds.hf.char_heads.CharHeads.add_whitening`); folded into the read-out at export;
- two DeepSpeed engines per rank (:mod:`spellm_ds.distill.engines`: student with optimizer, teacher
  without), ZeRO-3 by default; teacher stage 0 or 3, optional teacher parameter offload;
- bf16 where the accelerator computes it natively, fp32 elsewhere (``"auto"`` in the configs);
  non-reentrant activation checkpointing;
- shared trunk (default): the student's layers below the trainable ones are frozen copies of the
  teacher's, so they run once, in the teacher (:func:`spellm_ds.distill.forward.teacher_and_student`), and
  the student engine does not hold them;
- every rank runs the same forward sequence (same batch counts in training and evaluation);
- rank 0 logs a progress bar and TensorBoard scalars and writes the resolved run config;
  timed regions synchronise the accelerator first;
- checkpoints every ``save_every`` steps and at the end, resumed exactly (``--resume auto``); a
  resume that would change the run (model, data, split, order, schedule) is refused;
  SIGTERM/SIGUSR1 stop all ranks at the same step boundary with a checkpoint (exit 0);
  collectives time out, so a dead rank ends the job instead of hanging it;
- the run ends with an HF-format SpeLLM export in ``output_dir/model``, written by rank 0 after
  the process group is gone (no collective waits on it, however long it takes), the char heads'
  spelling temperature fitted there on the held-out blocks (:mod:`spellm_ds.export.calibration`).

Limits
- the teacher is a second full copy of the model in memory (ZeRO-3 shards it);
- packed blocks attend across document boundaries (standard packing).
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
from pathlib import Path

import deepspeed
import psutil
import torch
import torch.distributed as dist

from spellm_ds import cli
from spellm_ds.data import assets
from spellm_ds.data.packing import (
    PACKING_VERSION,
    PackedData,
    cached_packing,
    data_files,
    first_read_steps,
    step_rows,
)
from spellm_ds.distill import checkpoint
from spellm_ds.distill.config import (
    RunConfig,
    auto_persistence_threshold,
    memory_per_rank,
    mixed_precision_dtype,
    parameter_sizes,
    resolve_student_config,
    resolve_teacher_config,
)
from spellm_ds.distill.engines import build_student, build_teacher, held_parameter_bytes
from spellm_ds.distill.forward import student_and_labels, synchronized_clock
from spellm_ds.distill.losses import TOP_K, LossParts, distillation_loss, rare_label_weights
from spellm_ds.distill.metrics import match_sums, rates
from spellm_ds.distill.teacher import (
    StateAnchors,
    joined_signals,
    noised_states,
    teacher_signal,
    top_tokens_from_hidden,
)
from spellm_ds.distill.teacher_cache import TeacherCache
from spellm_ds.errors import SpellmError
from spellm_ds.export import export
from spellm_ds.hf.char_decoding import CharDecoder
from spellm_ds.model import loading as model_loading
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable, model_vocab_size
from spellm_ds.model.spellm import shared_trunk_layer
from spellm_ds.runtime import distributed, precision, provenance
from spellm_ds.runtime.atomic import recover_dir, set_aside
from spellm_ds.runtime.progress import Progress
from spellm_ds.runtime.provenance import content_hash, model_files
from spellm_ds.runtime.shutdown import GracefulShutdown

PREEMPTED = "PREEMPTED"


def run(config: RunConfig) -> Path | None:
    """Distil ``config.model`` into a SpeLLM model; returns the exported model directory, or None
    when a signal or ``--stop_at`` stopped the run early (after saving a checkpoint)."""
    config.validate()
    cli.check_output_dir(config.output_dir, "--output_dir")
    rank, _ = distributed.init(config.collective_timeout_s)
    distillation = None
    try:
        distillation = Distillation(config)
        final = distillation.train()
    finally:
        del distillation  # the engines hold process-group handles: free them before teardown
        distributed.teardown()
    if final is None:
        return None
    exported = Path(config.output_dir) / "model"
    if rank == 0:
        export.export(final, exported)
        print(f"exported SpeLLM model: {exported}", flush=True)
    return exported


def first_rows(parts: tuple, count: int) -> tuple:
    """The first ``count`` rows of each tensor of a named tuple of batched tensors (None stays None)."""
    return type(parts)(*(None if part is None else part[:count] for part in parts))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Distillation:
    """Set-up (everything checked before any weights load), one step, evaluation, the loop."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        self.output_dir = Path(config.output_dir)
        self.model_dir = assets.resolve_model(config.model)
        model_config = model_loading.load_config(self.model_dir)
        model_loading.check_weight_files(self.model_dir)
        text_config = model_config.get_text_config()
        config.fit_to_model(text_config.num_hidden_layers, text_config.hidden_size)
        self.tokenizer = assets.load_tokenizer(self.model_dir)
        self.charset = Charset.from_file(config.charset) if config.charset else Charset.default()
        persistence = auto_persistence_threshold(*parameter_sizes(self.model_dir), memory_per_rank(self.world_size))
        chosen = precision.choose(self.device.type, config.precision)
        bf16 = self._on_every_rank(chosen.bf16)  # a timing probe could differ between ranks: all take the safe one
        self.student_ds = resolve_student_config(config, self.world_size, persistence, bf16)
        self.teacher_ds = resolve_teacher_config(config, self.student_ds, self.world_size, persistence)
        used = mixed_precision_dtype(self.student_ds) == torch.bfloat16
        self.precision = chosen if used == chosen.bf16 else precision.Precision(used, "the DeepSpeed config sets it")
        self.content = {"data_sha256": content_hash(data_files(config.data)),
                        "model_sha256": content_hash(model_files(self.model_dir)), "packing_version": PACKING_VERSION}
        self.resume_from = checkpoint.find_resume_point(config.resume, self.output_dir)
        if self.resume_from is None:
            self._start_anew()
        else:  # refuse before anything is built or written
            checkpoint.check_compatible(checkpoint.read_state(self.resume_from), config.to_dict(), self.charset,
                                        self.world_size, self.resume_from, self.content)
        self.recipe = config.loss_recipe()
        self.table = SpellingTable.from_tokenizer(self.tokenizer, self.charset, config.k,
                                                  model_vocab_size(model_config)).to(self.device)
        self.decoder = CharDecoder(self.table, tau=None)  # the valid spellings, for the spelling KL
        self.trunk_layer = (shared_trunk_layer(text_config.num_hidden_layers,
                                               config.trainable_layers) if config.shared_trunk else None)
        self.data = self._packed_data()
        # the tokens' counts in the training text, the same on every rank (metrics split by them)
        counts = torch.bincount(self.data.train.flatten(), minlength=self.table.vocab_size)
        self.token_counts = counts.to(self.device)
        self.label_weights = None
        if config.rare_label_power > 0:
            self.label_weights = rare_label_weights(counts, config.rare_label_power).to(self.device)
        blocks_per_step = config.micro_batch * config.grad_accum * self.world_size
        self.first_read = first_read_steps(len(self.data.train), blocks_per_step, config.seed)
        self.cache = self._teacher_cache() if config.teacher_cache else None
        self.teacher = build_teacher(self.model_dir, self.teacher_ds)
        self.anchors = None
        if config.anchored_rows:
            named = ((counts > 0) & self.table.spellable.cpu()).nonzero().squeeze(1)
            self.anchors = StateAnchors(self.teacher.module.get_output_embeddings(), named)
        self.student = build_student(self.model_dir, self.student_ds, config, self.charset, self.table,
                                     self.trunk_layer, counts)
        self.start_step = checkpoint.load(self.student, self.resume_from) if self.resume_from else 0
        if config.whiten_readout and not self.resume_from:  # a resumed run's statistics are in its checkpoint
            self._fit_whitening()
        if self.resume_from and self.rank == 0:
            print(f"resumed from {self.resume_from} at step {self.start_step}", flush=True)
        self.writer = self._tensorboard()
        if self.rank == 0:
            print(self.header(), flush=True)

    def _start_anew(self) -> None:
        """A fresh run never mixes with or overwrites another in its ``--output_dir``: one there (a
        complete checkpoint or an exported model) is refused, or with ``--overwrite`` renamed aside."""
        found = checkpoint.complete_checkpoints(self.output_dir) or (self.output_dir / "model").exists()
        if found and not self.config.overwrite:
            raise SpellmError(f"--output_dir {self.output_dir} holds a run that starting anew would overwrite; resume "
                              "it (--resume auto), choose another --output_dir, or pass --overwrite to set it aside "
                              "(renamed, not deleted)")
        if found and self.rank == 0:
            print(f"--overwrite: the earlier run is kept as {set_aside(self.output_dir, 'replaced')}", flush=True)
        if self.rank == 0:
            recover_dir(self.output_dir / "model")  # what a killed export left
        dist.barrier()

    def _packed_data(self) -> PackedData:
        """The run's blocks, tokenised once (:func:`spellm_ds.data.packing.cached_packing`): rank 0 packs them
        if no earlier run did, the others read what it wrote."""
        cfg = self.config
        settings = (cfg.data, cfg.text_field, self.tokenizer, cfg.seq_len, cfg.eval_fraction, cfg.seed,
                    cfg.train_blocks, cfg.copy_lists)
        data = cached_packing(*settings) if self.rank == 0 else None
        dist.barrier()
        return data if data is not None else cached_packing(*settings, build=False)

    def _teacher_cache(self) -> TeacherCache:
        """The run's teacher cache, started anew (rank 0, before any rank uses it) unless it was
        written for the same model, precision, blocks and batch composition, with
        ``--teacher_cache_from``'s entries linked in; the blocks it holds are marked as read before
        the first step in ``first_read``."""
        cfg = self.config
        fingerprint = {"model_sha256": self.content["model_sha256"],
                       "dtype": str(mixed_precision_dtype(self.teacher_ds)),
                       "trunk_layer": self.trunk_layer, "wide_k": cfg.wide_k, "micro_batch": cfg.micro_batch,
                       "world_size": self.world_size, "seed": cfg.seed,
                       **{f"{split}_sha1": hashlib.sha1(getattr(self.data, split).numpy().tobytes()).hexdigest()
                          for split in ("train", "held_out")}}
        cache = TeacherCache(self.output_dir / "teacher_cache", fingerprint)
        source = Path(cfg.teacher_cache_from) / "teacher_cache" if cfg.teacher_cache_from else None
        if source is not None and (refusal := cache.refusal(source)):  # every rank raises: none waits
            raise SpellmError(f"--teacher_cache_from {cfg.teacher_cache_from}: {refusal}; name a --teacher_cache run "
                              "of the same model, precision, blocks and batch composition, or drop the flag")
        if self.rank == 0:
            kept = cache.prepare()
            adopted = f", {cache.adopt(source)} entries linked from {source}" if source is not None else ""
            print(f"teacher cache: {cache.directory} ({'kept' if kept else 'new'}{adopted})", flush=True)
        dist.barrier()
        self.first_read[cache.stored("train")] = -1  # stored before this run: readable from its first step
        dist.barrier()  # every rank has listed the cache before any rank writes to it
        return cache

    def _tensorboard(self):
        if self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / PREEMPTED).unlink(missing_ok=True)
        resolved = {"run": self.config.to_dict(), "world_size": self.world_size,
                    "precision": {"bf16": self.precision.bf16, "reason": self.precision.reason},
                    "packed_train_blocks": len(self.data.train),
                    "student_deepspeed": self.student_ds,
                    "teacher_deepspeed": self.teacher_ds, "model_dir": str(self.model_dir),
                    "content": self.content, "commit": provenance.commit(), "versions": provenance.versions()}
        (self.output_dir / "run_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        # purge_step drops events a dead run logged after its last checkpoint
        return SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.start_step + 1)

    # ----------------------------------------------------------------- one step
    def _forward(self, split: str, rows: torch.Tensor, with_token_logits: bool, cached: bool, store: list[bool],
                 wide_k: int | None = None, noise: torch.Generator | None = None,
                 anchors: torch.Generator | None = None):
        """Teacher and student forward on blocks ``rows`` of ``split`` (``wide_k``: see
        :func:`spellm_ds.distill.teacher.top_tokens_from_hidden`). With the teacher cache, the teacher's output
        is read from it when, on every rank, ``cached`` and every row is stored (so all ranks run the
        teacher, or none: its ZeRO-3 gathers are collectives); else computed and stored where ``store``.
        With ``noise`` (``--state_noise``, on every rank alike) the student reads the teacher's state
        noised, and the signal is the LM head's there; the cache keeps the clean one (without a cache the
        clean state's LM head is not run). With ``anchors`` (``--anchored_rows``, on every rank alike) the
        student also reads ``anchored_rows`` rows of anchored states after the text's, the LM head's
        signal theirs.
        Returns the signal, the student's output, the labels, the teacher's seconds and whether it was read."""
        started = synchronized_clock()
        input_ids = getattr(self.data, split)[rows].to(self.device)
        read = self.cache is not None and self._on_every_rank(cached and self.cache.has(split, rows.tolist()))
        if read:
            signal, trunk = self.cache.read(split, rows.tolist(), self.device)
        else:
            # the clean state's signal is for the cache; with noise and no cache nothing would read it
            signal, trunk = teacher_signal(self.teacher.module, input_ids, top_k=TOP_K, trunk_layer=self.trunk_layer,
                                           wide_k=wide_k, with_signal=noise is None or self.cache is not None)
            if self.cache is not None:
                self.cache.write(split, rows.tolist(), signal, trunk, store)
        if noise is not None:
            trunk = noised_states(trunk, self.config.state_noise, noise)
            signal = top_tokens_from_hidden(trunk, self.teacher.module.get_output_embeddings(), TOP_K, wide_k=wide_k)
        if anchors is not None:
            anchored = self.anchors.states(trunk, self.config.anchored_rows, anchors)
            lm_head = self.teacher.module.get_output_embeddings()
            signal = joined_signals(signal, top_tokens_from_hidden(anchored, lm_head, TOP_K, wide_k=wide_k))
            trunk = torch.cat([trunk, anchored])
        teacher_s = synchronized_clock() - started
        out, labels = student_and_labels(self.student, input_ids, signal, trunk, self.table, self.config.label_rule(),
                                         with_token_logits)
        return signal, out, labels, teacher_s, read

    @torch.no_grad()
    def _fit_whitening(self) -> None:
        """``--whiten_readout``: the mean and covariance of the read-out's input at the start (the
        teacher's final normed state) over the first step's blocks of every rank, from one extra
        teacher forward per micro step of that step (the cache does not store them); fixed for the
        rest of the run."""
        cfg = self.config
        final_layer = self.teacher.module.config.get_text_config().num_hidden_layers
        sums = 0
        for micro_step in range(cfg.grad_accum):
            rows, _ = step_rows(len(self.data.train), 0, micro_step, cfg.grad_accum, cfg.micro_batch, self.rank,
                                self.world_size, cfg.seed)
            _, states = teacher_signal(self.teacher.module, self.data.train[rows].to(self.device),
                                       trunk_layer=final_layer, with_signal=False)
            states = states.flatten(0, -2).double()
            sums = sums + torch.cat([states.sum(0), (states.T @ states).flatten(), states.new_tensor([len(states)])])
        dist.all_reduce(sums)
        sums = sums.cpu()
        d, count = states.shape[1], sums[-1]
        mean = sums[:d] / count
        covariance = sums[d:-1].view(d, d) / count - torch.outer(mean, mean)
        variances = self.student.module.char_heads.fit_whitening(mean, covariance)
        if self.rank == 0:
            print(f"whitening the read-out's input: {int(count)} positions, variance {variances.min():.3g} to "
                  f"{variances.max():.3g} along the covariance's eigenvectors, mean state norm {mean.norm():.3g}",
                  flush=True)

    def _on_every_rank(self, flag: bool) -> bool:
        agreed = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        return bool(agreed.item())

    def _mean_over_ranks(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.clone()
        dist.all_reduce(counts)
        return counts / self.world_size

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(sums)
        flat = torch.cat([sums[n].reshape(-1).double().cpu() for n in names]).to(self.device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        out, offset = {}, 0
        for name in names:
            size = sums[name].numel()
            out[name] = flat[offset : offset + size].reshape(sums[name].shape)
            offset += size
        return rates(out)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        teacher_s = student_s = backward_s = 0.0
        reads = 0
        sums: dict[str, torch.Tensor] = {}
        losses = torch.zeros(len(LossParts._fields), dtype=torch.float64)
        for micro_step in range(cfg.grad_accum):
            rows, passes = step_rows(len(self.data.train), step, micro_step, cfg.grad_accum, cfg.micro_batch,
                                     self.rank, self.world_size, cfg.seed)
            # a block's cache entry is written in the step that first reads it: later steps may read it
            cached = bool((self.first_read[rows] < step).all())
            # the spelling KL's sample of positions and the state noise: pure functions of the position in
            # the run, as the batch is
            sample = torch.Generator().manual_seed(hash((cfg.seed, step, micro_step, self.rank)))
            noise = torch.Generator().manual_seed(hash((cfg.seed, step, micro_step, self.rank, 1))) \
                if cfg.state_noise else None
            anchors = torch.Generator().manual_seed(hash((cfg.seed, step, micro_step, self.rank, 2))) \
                if cfg.anchored_rows else None
            started = synchronized_clock()
            signal, out, labels, t_s, read = self._forward("train", rows, cfg.needs_token_logits, cached,
                                                           store=(passes == 0).tolist(), wide_k=cfg.wide_k, noise=noise,
                                                           anchors=anchors)
            reads += read
            loss = distillation_loss(out.char_logits, out.token_logits, labels, signal, self.table, self.recipe,
                                     self._mean_over_ranks, self.decoder, sample, self.label_weights)
            backward_started = synchronized_clock()
            self.student.backward(loss.total)
            self.student.step()
            finished = synchronized_clock()
            backward_s += finished - backward_started
            student_s += finished - started - t_s
            teacher_s += t_s
            losses += torch.stack(list(loss)).detach().double().cpu()  # one host sync
            text = len(rows)  # the metrics count the text's positions, not the anchored states'
            for name, value in match_sums(out.char_logits[:text].detach(), first_rows(signal, text),
                                          first_rows(labels, text), self.table, self.token_counts).items():
                sums[name] = sums.get(name, 0) + value.cpu()
        losses = (losses / cfg.grad_accum).to(self.device)
        dist.all_reduce(losses)
        metrics = self._reduce(sums)
        metrics.update({f"loss/{name}": value / self.world_size for name, value in zip(LossParts._fields, losses.tolist())})
        metrics.update({"perf/teacher_s": teacher_s, "perf/student_s": student_s, "perf/backward_s": backward_s})
        if self.cache is not None:
            metrics["perf/teacher_cache_read"] = reads / cfg.grad_accum  # this rank's share of micro-batches
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out match rates; every rank evaluates the same number of batches."""
        cfg = self.config
        blocks = torch.arange(min(cfg.eval_blocks, len(self.data.held_out)))
        per_rank = len(blocks) // self.world_size
        if per_rank == 0:  # fewer held-out blocks than ranks: every rank evaluates the same ones
            mine = blocks
        else:
            mine = blocks[self.rank * per_rank : (self.rank + 1) * per_rank]
        self.student.eval()
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, len(mine), cfg.micro_batch):
            rows = mine[start : start + cfg.micro_batch]  # the same micro-batches every evaluation
            signal, out, labels, *_ = self._forward("held_out", rows, with_token_logits=False, cached=True,
                                                    store=[True] * len(rows))
            for name, value in match_sums(out.char_logits, signal, labels, self.table, self.token_counts).items():
                sums[name] = sums.get(name, 0) + value.cpu()
        self.student.train()
        return {f"eval/{name}": value for name, value in self._reduce(sums).items()}

    # ----------------------------------------------------------------- the loop
    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def save(self, step: int) -> Path:
        return checkpoint.save(self.student, self.output_dir, step, self.config.to_dict(), self.charset,
                               self.model_dir, self.config.keep_checkpoints, self.content)

    def _stop_if_not_finite(self, metrics: dict[str, float], step: int) -> None:
        """A non-finite loss or gradient norm ends the run here, before anything is saved or exported:
        the last complete checkpoint stays the last good one. The values are all-reduced, so every
        rank stops at the same step."""
        norm = self.student.get_global_grad_norm()
        metrics["grad_norm"] = float(norm) if norm is not None else 0.0
        bad = {name: metrics[name] for name in ("loss/total", "grad_norm") if not math.isfinite(metrics[name])}
        if bad:
            found = checkpoint.complete_checkpoints(self.output_dir)
            kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
            raise SpellmError(f"step {step}: {', '.join(f'{name} is {value}' for name, value in bad.items())}; "
                              f"training stopped without saving ({kept}): lower --lr or check the data, and start "
                              "anew in another --output_dir")

    def train(self) -> Path | None:
        """Train to ``max_steps``; returns the final checkpoint (None when stopped early)."""
        cfg = self.config
        if self.start_step >= cfg.max_steps:
            if self.rank == 0:
                print(f"the run already finished: {self.resume_from} is at step {self.start_step} = --max_steps; "
                      f"nothing to train, exporting it again (to train on, pass a larger --max_steps with "
                      f"--extend_schedule)", flush=True)
            return self.resume_from
        if self.start_step == 0:
            self._log(self.evaluate(), 0)
        self.student.train()
        shutdown = GracefulShutdown()
        try:
            return self._loop(shutdown)
        finally:
            shutdown.close()
            if self.writer is not None:
                self.writer.close()

    def phases(self) -> list[tuple[str, int]]:
        """The run's phases as (name, step it ends at): with a teacher cache the first pass runs the
        teacher and the passes after it read the cache, about ten times faster per step."""
        cfg = self.config
        first_pass = int(self.first_read.max()) + 1  # the steps until every block has been read once
        if cfg.teacher_cache and first_pass < cfg.max_steps:
            return [("first pass", first_pass), ("cached passes", cfg.max_steps)]
        return [("training", cfg.max_steps)]

    def header(self) -> str:
        """What the run is about to do, in a few lines (rank 0 prints it)."""
        cfg = self.config
        blocks_per_step = cfg.micro_batch * cfg.grad_accum * self.world_size
        teacher_blocks = min(len(self.data.train), cfg.max_steps * blocks_per_step)
        lists = f" ({cfg.copy_lists:.0%} of them copy lists)" if cfg.copy_lists else ""
        plan = ", then ".join(f"{name} to step {end:,}" for name, end in self.phases())
        return "\n".join([
            f"model: {cfg.model} ({self.model_dir})",
            f"data: {', '.join(cfg.data) if cfg.data else 'the default corpus'}: {len(self.data.train):,} training "
            f"blocks of {cfg.seq_len} tokens{lists}, {len(self.data.held_out):,} held out",
            f"plan: {cfg.max_steps:,} steps of {blocks_per_step} blocks ({blocks_per_step * cfg.seq_len:,} tokens); "
            f"{teacher_blocks * cfg.seq_len:,} tokens through the teacher"
            f"{' once (teacher cache)' if cfg.teacher_cache else ''}; {plan}",
            f"ranks: {self.world_size} x {torch.get_num_threads()} threads on {self.device.type}; "
            f"precision {self.precision.describe()}",
            f"output: {self.output_dir} (TensorBoard: {self.output_dir / 'tensorboard'})"])

    def _loop(self, shutdown: GracefulShutdown) -> Path | None:
        cfg = self.config
        tokens_per_step = cfg.micro_batch * cfg.grad_accum * cfg.seq_len
        progress = Progress(cfg.max_steps, self.start_step, self.phases(), self.rank == 0)
        for step in range(self.start_step, cfg.max_steps):
            started = synchronized_clock()
            metrics = self.train_step(step)
            elapsed = synchronized_clock() - started
            metrics.update({"perf/tokens_per_s": tokens_per_step / elapsed,
                            "perf/tokens_per_s_all": tokens_per_step * self.world_size / elapsed,
                            "perf/step_s": elapsed, "mem/rss_gb": psutil.Process().memory_info().rss / 2**30})
            metrics.update(zip(("lr", "lr/ffn"), self.student.get_lr()))  # the heads', the blocks'
            self._stop_if_not_finite(metrics, step + 1)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
                metrics.update(self.evaluate())
                progress.note(f"step {step + 1}: held-out exact+prefix {metrics['eval/match/exact_or_prefix']:.1%}, "
                              f"match@5 {metrics['eval/match/at5']:.1%}")
            self._log(metrics, step + 1)
            progress.update(step + 1, metrics)
            stop_reason = "signal" if shutdown.agreed(self.device) else "--stop_at" if step + 1 == cfg.stop_at else ""
            if stop_reason and step + 1 < cfg.max_steps:
                saved = self.save(step + 1)
                if self.rank == 0 and stop_reason == "signal":  # tells a job script to requeue
                    (self.output_dir / PREEMPTED).write_text(f"{step + 1}\n")
                progress.close()
                if self.rank == 0:
                    print(f"stopped by {stop_reason} after step {step + 1}; checkpoint {saved}; rerun the same "
                          "command to resume", flush=True)
                return None
            if step + 1 < cfg.max_steps and cfg.save_every and (step + 1) % cfg.save_every == 0:
                progress.note(f"step {step + 1}: checkpoint {self.save(step + 1)}")
        progress.close()
        final = self.save(cfg.max_steps)
        held = {name: held_parameter_bytes(engine.module) for name, engine in (("teacher", self.teacher),
                                                                             ("student", self.student))}
        accelerator = (f", accelerator {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"
                       if self.device.type == "cuda" else "")
        print(f"rank {self.rank} peak RSS: {_peak_rss_gb():.2f} GB{accelerator}; parameters held: " + ", ".join(
            f"{name} {mine / 2**20:.3f} of {whole / 2**20:.3f} MB" for name, (mine, whole) in held.items()), flush=True)
        return final
