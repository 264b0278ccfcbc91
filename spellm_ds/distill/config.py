"""The run configuration and DeepSpeed config resolution.

DeepSpeed itself cannot read ``"auto"`` (an HF Trainer feature): every ``"auto"`` is filled here
from the run config before DeepSpeed sees the file, and a concrete value in the file that
contradicts a command-line flag is an error rather than a silent choice.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spellm_ds.data.assets import EMBEDDED_MODEL
from spellm_ds.distill.losses import (
    LABEL_RULES,
    MAX_SOFT_CHAR_CANDIDATES,
    REG_TARGETS,
    TOP_K,
    LabelRule,
    LossRecipe,
    label_rule_of,
)
from spellm_ds.errors import SpellmError
from spellm_ds.hf.char_heads import HEAD_INITS
from spellm_ds.runtime.precision import PRECISIONS

DEFAULTS = {"micro_batch": 2, "grad_accum": 1, "lr": 3e-3, "ffn_lr": 1e-3}
"""Used where neither a flag nor the DeepSpeed config gives a value. ``lr`` is the char heads' peak,
``ffn_lr`` the pretrained blocks': new heads learn faster than the blocks can move without losing the
teacher (experiments/fidelity-pilots.md, "Label rule, batch size and learning rates")."""
FULL_SHARDING_PERSISTENCE = 100_000
"""DeepSpeed's own default ``stage3_param_persistence_threshold``: only small tensors (norms,
biases) stay whole; every weight matrix is sharded and gathered when used."""
READOUT_PER_HIDDEN = 2
"""The default read-out's width per unit of hidden size (1152 for SmolLM2-135M). Half a transformer
FFN's ratio: at 435k teacher tokens 2x and 4x agree with the teacher alike (+0.5 [-0.1, +1.1] raw
top-1 for 2x, experiments/2026-12-07-readout-width/), and 2x keeps the char path under 7% of the
LM head's weights at decode."""
RESIDENT_SHARE = 0.25
"""``"auto"`` keeps whole models resident when teacher + student take at most this share of a rank's memory."""


ESSENTIALS = "essentials"
RECIPE = "recipe"
RUNTIME = "runtime and parallelism"
EXPERIMENTAL = "experimental levers (beyond the paper, off by default)"
GROUPS = (ESSENTIALS, RECIPE, RUNTIME, EXPERIMENTAL)
"""The order ``--help`` shows them in: what every run sets first, the levers last."""
REPOSITORY = Path(__file__).resolve().parents[2]


def option(default: Any, help: str, group: str = RECIPE, **argparse: Any) -> Any:
    """A run option declared once: its default, its help, its ``--help`` group and any argparse
    settings (``choices``, ``metavar``); the command line is built from these
    (:func:`spellm_ds.cli.add_options`) and a recipe file (``--config``) may set any of them."""
    return field(default=default, metadata={"help": help, "group": group, **argparse})


@dataclass
class RunConfig:
    model: str = option(EMBEDDED_MODEL, f"'{EMBEDDED_MODEL}' (the embedded SmolLM2-135M-Instruct), a local HF model "
                        "directory or a Hub ID org/name[@revision] (through the Hugging Face cache)", ESSENTIALS)
    data: list[str] | None = option(None, ".txt/.jsonl/.json/.parquet files or datasets.save_to_disk directories "
                                    "(default: the built-in five-source English corpus)", ESSENTIALS, metavar="PATH")
    text_field: str = option("text", "field holding the text in .jsonl/.json/.parquet/dataset inputs", ESSENTIALS)
    output_dir: str = option("outputs/spellm", "checkpoints, tensorboard/, run_config.json and the exported model/",
                             ESSENTIALS)
    deepspeed: str = option(str(REPOSITORY / "ds_configs" / "zero3.json"), "the student's DeepSpeed config",
                            ESSENTIALS, metavar="JSON")
    max_steps: int = option(300, "optimizer steps", ESSENTIALS)
    train_blocks: int | None = option(None, "train on the first N packed training blocks only (a random sample of "
                                      "the training text, in pieces of about 4,000 characters), read again pass after "
                                      "pass (default: every block)",
                                      ESSENTIALS, metavar="N")
    teacher_cache: bool = option(False, "store the teacher's output per block in OUTPUT_DIR/teacher_cache the first "
                                 "time a block is read and read it back on later passes and evaluations (a pass "
                                 "after the first skips the teacher); about 1.2 KB per position for SmolLM2-135M",
                                 ESSENTIALS)
    resume: str = option("auto", "auto: continue from the latest complete checkpoint in OUTPUT_DIR; none: start "
                         "fresh; PATH: a checkpoints/stepN directory", ESSENTIALS, metavar="auto|none|PATH")
    overwrite: bool = option(False, "start anew in an OUTPUT_DIR that holds a run (checkpoints or a model): the old "
                             "run is renamed aside (OUTPUT_DIR.replaced-TIME), never mixed or deleted", ESSENTIALS)
    precision: str = option("auto", "bf16 or fp32 compute; auto: bf16 where the hardware computes it fast (a GPU "
                            "with bf16, a CPU with avx512_bf16 or AMX, or an emulating CPU where a matmul probe finds "
                            "it faster), fp32 elsewhere; the DeepSpeed config's bf16 \"auto\" follows it", ESSENTIALS,
                            choices=PRECISIONS)
    k: int = option(10, "characters per token = number of char heads (the paper: 10)")
    charset: str | None = option(None, "charset.json or a text file of extra characters (default: the 105 symbols)",
                                 metavar="FILE")
    trainable_layers: int = option(0, "train the FFN blocks of this many last decoder layers (the paper: 5); 0 trains "
                                   "only the heads and read-out on the teacher's own final hidden state, so the "
                                   "fallback path is the teacher")
    readout_width: int | None = option(None, "a residual MLP read-out of this width before the char heads (beyond "
                                       f"the paper); 0: the paper's linear heads (default: {READOUT_PER_HIDDEN} x the "
                                       "model's hidden size)")
    head_init: str = option("embedding", "char head start: mean token embeddings per (position, char), or random",
                            choices=HEAD_INITS)
    seq_len: int = option(256, "tokens per packed block")
    micro_batch: int | None = option(None, f"blocks per rank per micro step (default: the DeepSpeed config's, else "
                                     f"{DEFAULTS['micro_batch']})")
    grad_accum: int | None = option(None, f"micro steps per optimizer step (default: the DeepSpeed config's, else "
                                    f"{DEFAULTS['grad_accum']})")
    lr: float | None = option(None, f"peak learning rate of the char heads (default: the DeepSpeed config's, else "
                              f"{DEFAULTS['lr']:g})")
    ffn_lr: float | None = option(None, "peak learning rate of the pretrained blocks that train (default: "
                                  f"{DEFAULTS['ffn_lr']:g})")
    warmup: int = option(20, "linear warm-up steps")
    reg_weight: float = option(3.0, "weight of the token-level regularisation loss when FFNs train (unused with "
                               "--trainable_layers 0, where the LM head reads the teacher's own state)")
    reg_target: str = option("teacher", "what the token regulariser pulls the student's LM-head distribution "
                             "towards: the selected label (CE) or the teacher (KL over its top-5 plus the rest)",
                             choices=REG_TARGETS)
    soft_char_weight: float = option(0.5, "weight of an auxiliary per-head CE with the characters of the teacher's "
                                     "top candidates, weighted by its probabilities")
    label_selection: str = option("joint", "label among the teacher's top-5: the one the student spells best "
                                  "(student_nll, the paper's rule), best by char NLL - w x log p_teacher (joint), or "
                                  "the teacher's first spellable candidate (teacher_top1)", choices=LABEL_RULES)
    label_prior_weight: float = option(1.0, "w, the weight of the teacher's log-probability in the joint rule")
    ignore_after_end: bool = option(True, "leave the characters after a label's first <end> out of the char loss "
                                    "and the label score (decoding always ignores them)")
    eval_every: int = option(50, "steps between held-out evaluations")
    eval_fraction: float = option(0.02, "share of documents held out")
    eval_blocks: int = option(32, "held-out blocks evaluated")
    save_every: int = option(100, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = option(2, "complete checkpoints to keep")
    stop_at: int | None = option(None, "save and exit 0 after this step; the schedule still runs to --max_steps "
                                 "(time-boxed jobs)", metavar="STEP")
    extend_schedule: bool = option(False, "allow resuming with a larger --max_steps than the checkpoint's run; the "
                                   "LR decay is then laid over the new total from the resumed step on")
    teacher_cache_from: str | None = option(None, "with --teacher_cache: first link in the entries of "
                                            "RUN_DIR/teacher_cache, a run of the same model, precision, blocks and "
                                            "batch composition, and read them instead of running the teacher",
                                            metavar="RUN_DIR")
    seed: int = option(0, "the data split, order and head initialisation")
    teacher_deepspeed: str = option(str(REPOSITORY / "ds_configs" / "teacher.json"), "the teacher's DeepSpeed "
                                    "config (no optimizer)", RUNTIME, metavar="JSON")
    teacher_stage: int | None = option(None, "override the teacher's ZeRO stage: 0 = replicated (fast when it fits), "
                                       "3 = sharded", RUNTIME, choices=(0, 3))
    teacher_offload: bool = option(False, "keep the ZeRO-3 teacher's parameters in CPU memory", RUNTIME)
    activation_checkpointing: bool = option(True, "recompute activations in backward (non-reentrant)", RUNTIME)
    shared_trunk: bool = option(True, "start the student from the teacher's hidden state below its trainable layers "
                                "instead of running its frozen lower layers itself (the result is the same)", RUNTIME)
    collective_timeout_s: float = option(300.0, "a collective waiting longer than this ends the job", RUNTIME)
    train_attention: bool = option(False, "train the attention blocks of the trainable layers too", EXPERIMENTAL)
    wide_heads: bool = option(False, "the read-out's hidden layer also feeds the char logits directly "
                              "(width x k|C| weights), not only through its hidden-size output", EXPERIMENTAL)
    whiten_readout: bool = option(False, "the read-out reads the teacher's state centred and whitened, with "
                                  "statistics from the first step's blocks (the teacher reads them once more); folded "
                                  "into the read-out at export", EXPERIMENTAL)
    prototypes: int = option(0, "each head scores a character by the max of this many rows, started from the LM-head "
                             "rows of the most frequent tokens spelled with it there (0: one linear row, the "
                             "paper's)", EXPERIMENTAL)
    soft_char_candidates: int = option(5, "how many of the teacher's top candidates the soft targets read, 5..1024 "
                                       "(the labels keep its top-5)", EXPERIMENTAL)
    soft_char_prefix: bool = option(False, "head i's soft targets only from the candidates that share the selected "
                                    "label's first i characters", EXPERIMENTAL)
    spelling_kl_weight: float = option(0.0, "weight of the KL from the teacher's top-5 to the char heads' token "
                                       "distribution (costs a [positions x valid tokens] score per micro step)",
                                       EXPERIMENTAL)
    spelling_kl_fraction: float = option(1.0, "share of the positions the spelling KL is computed on, a fresh "
                                         "uniform sample each micro step", EXPERIMENTAL)
    state_noise: float = option(0.0, "train on the teacher's final state plus Gaussian noise of SIGMA x its RMS, "
                                "labelled by the teacher's LM head there (read-out recipe only)", EXPERIMENTAL,
                                metavar="SIGMA")
    anchored_rows: int = option(0, "add N rows of states moved towards tokens of the training text, labelled by "
                                "the teacher's LM head there (read-out recipe only)", EXPERIMENTAL, metavar="N")
    rare_label_power: float = option(0.0, "weight each position's char loss by (count + 1)^-POWER, count being how "
                                     "often its label occurs in the training text", EXPERIMENTAL, metavar="POWER")
    label_per_char: bool = option(False, "score label candidates by char NLL per counted character, not summed",
                                  EXPERIMENTAL)
    copy_lists: float = option(0.0, "this share of the training blocks are list texts (words of the training text, "
                               "drawn uniformly, listed twice: the teacher copies them), so rare words are labels "
                               "as often as common ones (spellm_ds.data.copy_lists); held-out blocks stay natural",
                               EXPERIMENTAL, metavar="SHARE")
    label_gate: float | None = option(None, "where the teacher gives its top-1 probability >= P, that token is the "
                                      "label whatever the rule scores", EXPERIMENTAL, metavar="P")
    head_lr: float | None = option(None, "peak learning rate of the char heads' output rows (the prototypes with "
                                   "--prototypes), apart from the read-out's --lr: a lower one keeps more of what "
                                   "their informed start knows (default: --lr)", EXPERIMENTAL, metavar="LR")

    def validate(self) -> None:
        """Every flag that can be checked without loading anything; one line per problem."""
        for name, value in self.to_dict().items():
            if isinstance(value, float) and not math.isfinite(value):
                raise SpellmError(f"--{name} {value} is not a finite number; pass a real value")
        checks = [
            (self.k >= 1, f"--k {self.k} must be at least 1 (the paper uses 10)"),
            (self.seq_len >= 2, f"--seq_len {self.seq_len} must be at least 2"),
            (self.train_blocks is None or self.train_blocks >= 1,
             f"--train_blocks {self.train_blocks} must be at least 1 (leave it out to train on every block)"),
            (self.max_steps >= 1, f"--max_steps {self.max_steps} must be at least 1"),
            (self.trainable_layers >= 0, f"--trainable_layers {self.trainable_layers} must be >= 0"),
            (self.readout_width is None or self.readout_width >= 0,
             f"--readout_width {self.readout_width} must be >= 0 (0: the paper's linear heads)"),
            (not self.wide_heads or self.readout_width != 0, "--wide_heads needs a read-out; drop --readout_width 0"),
            (self.prototypes >= 0, f"--prototypes {self.prototypes} must be >= 0"),
            (not (self.prototypes and self.wide_heads), "--prototypes and --wide_heads do not combine; drop one"),
            (not self.whiten_readout or self.readout_width != 0, "--whiten_readout needs a read-out; drop "
                                                                  "--readout_width 0"),
            (self.reg_weight >= 0, f"--reg_weight {self.reg_weight} must be >= 0"),
            (0 < self.eval_fraction < 1, f"--eval_fraction {self.eval_fraction} must be in (0, 1)"),
            (self.eval_every >= 1, f"--eval_every {self.eval_every} must be at least 1"),
            (self.eval_blocks >= 1, f"--eval_blocks {self.eval_blocks} must be at least 1"),
            (self.micro_batch is None or self.micro_batch >= 1,
             f"--micro_batch {self.micro_batch} must be at least 1"),
            (self.grad_accum is None or self.grad_accum >= 1,
             f"--grad_accum {self.grad_accum} must be at least 1"),
            (self.lr is None or self.lr > 0, f"--lr {self.lr} must be positive"),
            (self.ffn_lr is None or self.ffn_lr > 0, f"--ffn_lr {self.ffn_lr} must be positive"),
            (self.head_lr is None or self.head_lr > 0, f"--head_lr {self.head_lr} must be positive"),
            (self.head_lr is None or self.readout_width != 0,
             f"--head_lr {self.head_lr} needs a read-out (without one the heads' rows are all that train, at --lr); "
             "drop --readout_width 0 or --head_lr"),
            (self.ffn_lr is None or self.trainable_layers > 0,
             f"--ffn_lr {self.ffn_lr} needs FFN blocks to train; pass --trainable_layers > 0 or drop --ffn_lr"),
            (self.reg_target in REG_TARGETS, f"--reg_target {self.reg_target!r}: use one of {', '.join(REG_TARGETS)}"),
            (self.soft_char_weight >= 0, f"--soft_char_weight {self.soft_char_weight} must be >= 0"),
            (TOP_K <= self.soft_char_candidates <= MAX_SOFT_CHAR_CANDIDATES,
             f"--soft_char_candidates {self.soft_char_candidates} must be in {TOP_K}..{MAX_SOFT_CHAR_CANDIDATES} "
             f"({TOP_K}: the teacher's top-{TOP_K}, the labels' candidates)"),
            (self.spelling_kl_weight >= 0, f"--spelling_kl_weight {self.spelling_kl_weight} must be >= 0"),
            (0 < self.spelling_kl_fraction <= 1,
             f"--spelling_kl_fraction {self.spelling_kl_fraction} must be in (0, 1] (1: every position)"),
            (self.state_noise >= 0, f"--state_noise {self.state_noise} must be >= 0 (0: the states the text gives)"),
            (self.rare_label_power >= 0,
             f"--rare_label_power {self.rare_label_power} must be >= 0 (0: every label weighs the same)"),
            (0 <= self.copy_lists < 1, f"--copy_lists {self.copy_lists} must be in [0, 1) (0: natural text only)"),
            (self.anchored_rows >= 0,
             f"--anchored_rows {self.anchored_rows} must be >= 0 (0: the states the text gives)"),
            *((value == 0 or (self.trainable_layers == 0 and self.shared_trunk),
               f"--{flag} {value} needs the read-out recipe's shared trunk, the teacher's final state "
               f"(the only one its LM head labels): drop --trainable_layers/--no_shared_trunk or --{flag}")
              for flag, value in (("state_noise", self.state_noise), ("anchored_rows", self.anchored_rows))),
            (self.label_prior_weight >= 0, f"--label_prior_weight {self.label_prior_weight} must be >= 0"),
            (self.label_gate is None or 0 < self.label_gate <= 1,
             f"--label_gate {self.label_gate} must be in (0, 1] (leave it out to never gate)"),
            (self.label_gate is None or self.label_selection != "teacher_top1",
             "--label_gate has nothing to gate with --label_selection teacher_top1; drop one of them"),
            (self.warmup >= 1, f"--warmup {self.warmup} must be at least 1 (DeepSpeed's schedule needs a warm-up step)"),
            (self.save_every >= 0, f"--save_every {self.save_every} must be >= 0 (0: only at the end)"),
            (self.stop_at is None or 1 <= self.stop_at <= self.max_steps,
             f"--stop_at {self.stop_at} must be a step in 1..--max_steps ({self.max_steps})"),
            (self.collective_timeout_s > 0, f"--collective_timeout_s {self.collective_timeout_s} must be positive"),
            (self.teacher_stage in (None, 0, 3), f"--teacher_stage {self.teacher_stage} must be 0 or 3"),
            (self.precision in PRECISIONS, f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"),
            (self.label_selection in LABEL_RULES,
             f"--label_selection {self.label_selection!r}: use one of {', '.join(LABEL_RULES)}"),
            (self.teacher_cache_from is None or self.teacher_cache,
             f"--teacher_cache_from {self.teacher_cache_from} needs --teacher_cache (this run's own cache)"),
            (self.keep_checkpoints >= 1, f"--keep_checkpoints {self.keep_checkpoints} must be at least 1"),
            (self.head_init in HEAD_INITS, f"--head_init {self.head_init!r}: use one of {', '.join(HEAD_INITS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpellmError(message)

    def fit_to_model(self, num_layers: int, hidden_size: int) -> None:
        """Checks and defaults that need the model's config (read before any weights load)."""
        if not 0 <= self.trainable_layers <= num_layers:
            raise SpellmError(f"--trainable_layers {self.trainable_layers} is out of range; the model has "
                              f"{num_layers} layers")
        if self.readout_width is None:
            self.readout_width = READOUT_PER_HIDDEN * hidden_size

    @property
    def wide_k(self) -> int | None:
        """The teacher's top-M the soft targets read, when wider than its top-5."""
        return self.soft_char_candidates if self.soft_char_weight > 0 and self.soft_char_candidates > TOP_K else None

    @property
    def needs_token_logits(self) -> bool:
        """The token regulariser needs the student's LM-head logits; with no trainable layer that
        head reads the teacher's own state, so there is nothing to regularise."""
        return self.reg_weight > 0 and self.trainable_layers > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def spellm_config(self, base_config, charset):
        """The :class:`~spellm_ds.hf.SpeLLMConfig` a model trained by this run records (``base_config``:
        the base model's, ``charset``: the run's)."""
        from spellm_ds.model.spellm import spellm_config

        if self.readout_width is None:
            raise ValueError("readout_width is unresolved: call fit_to_model() first")
        return spellm_config(base_config, charset, k=self.k, trainable_layers=self.trainable_layers,
                             train_attention=self.train_attention, head_init=self.head_init,
                             readout_width=self.readout_width, wide_heads=self.wide_heads,
                             prototypes=self.prototypes, teacher=self.model,
                             label_selection=self.label_selection, label_prior_weight=self.label_prior_weight,
                             label_per_char=self.label_per_char, label_gate=self.label_gate,
                             ignore_after_end=self.ignore_after_end)

    def label_rule(self) -> LabelRule:
        return label_rule_of(self)

    def loss_recipe(self) -> LossRecipe:
        """The loss's knobs, each the run config's field of the same name (matched by name, not position)."""
        return LossRecipe(**{field.name: getattr(self, field.name) for field in fields(LossRecipe)})


def load_json_config(path: str | Path, flag: str) -> dict[str, Any]:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpellmError(f"DeepSpeed config {path} does not exist; pass an existing file with {flag}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpellmError(f"DeepSpeed config {path} is not readable JSON ({e}); fix the file or pass another "
                          f"with {flag}") from None
    if not isinstance(config, dict):
        raise SpellmError(f"DeepSpeed config {path} must be a JSON object; fix the file")
    return config


def _settle(config: dict[str, Any], key: str, cli_value: Any, flag: str, source: str) -> Any:
    """One value from a config key and a flag: ``auto``/missing takes the flag, equal values agree."""
    file_value = config.get(key, "auto")
    if file_value == "auto":
        return cli_value
    if cli_value is not None and file_value != cli_value:
        raise SpellmError(f"{source} sets {key}={file_value} but {flag} is {cli_value}; "
                          f"drop one of them or make them equal")
    return file_value


def _reject_auto(config: Any, source: str, path: str = "") -> None:
    """Refuse what DeepSpeed would take silently: an ``"auto"`` left unfilled, a NaN or infinity."""
    if isinstance(config, dict):
        for key, value in config.items():
            _reject_auto(value, source, f"{path}.{key}" if path else key)
    elif isinstance(config, list):
        for index, value in enumerate(config):
            _reject_auto(value, source, f"{path}[{index}]")
    elif config == "auto":
        raise SpellmError(f"{source} leaves {path}=\"auto\" that spellm-ds cannot fill; set a value")
    elif isinstance(config, float) and not math.isfinite(config):
        raise SpellmError(f"{source} sets {path}={config}, not a finite number; set a real value")


def parameter_sizes(model_dir: str | Path) -> tuple[int, int]:
    """(total, largest) parameter count of a model directory, from its safetensors headers
    (nothing is loaded); (0, 0) when it has none."""
    from safetensors import safe_open

    total = largest = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():
                numel = 1
                for size in weights.get_slice(name).get_shape():
                    numel *= size
                total, largest = total + numel, max(largest, numel)
    return total, largest


def auto_persistence_threshold(total: int, largest: int, memory_per_rank: float) -> int:
    """What ``"stage3_param_persistence_threshold": "auto"`` becomes.

    A model whose teacher and student copies fit in ``RESIDENT_SHARE`` of one rank's memory keeps
    every parameter whole on every rank (threshold above its largest tensor): ZeRO-3 then never
    all-gathers it, where re-gathering a 135M model each step costs more than holding it. Anything
    larger gets DeepSpeed's default and is fully sharded, from the same command and config.
    """
    if 0 < largest and 2 * total * 4 <= RESIDENT_SHARE * memory_per_rank:  # fp32 size: an upper bound
        return largest + 1
    return FULL_SHARDING_PERSISTENCE


def memory_per_rank(world_size: int) -> float:
    """Bytes of the accelerator one rank has; on CPU the ranks of a node share its memory."""
    import deepspeed

    accelerator = deepspeed.get_accelerator()
    ranks = world_size if accelerator.device_name() == "cpu" else 1
    return accelerator.total_memory() / ranks


def _fill_persistence(config: dict[str, Any], auto_persistence: int) -> None:
    zero = config.get("zero_optimization", {})
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = auto_persistence


def resolve_student_config(run: RunConfig, world_size: int, auto_persistence: int = FULL_SHARDING_PERSISTENCE,
                           bf16: bool = True) -> dict[str, Any]:
    """The student's DeepSpeed config with batch sizes, lr and schedule filled from ``run``, an
    ``"auto"`` persistence threshold with ``auto_persistence`` (:func:`auto_persistence_threshold`)
    and an ``"auto"`` bf16 switch with ``bf16`` (:func:`spellm_ds.runtime.precision.choose`); a concrete
    switch that contradicts ``--precision`` is an error."""
    config = load_json_config(run.deepspeed, "--deepspeed")
    source = f"DeepSpeed config {run.deepspeed}"
    _fill_persistence(config, auto_persistence)
    setting = config.get("bf16", {}).get("enabled")
    if setting == "auto":
        config["bf16"]["enabled"] = bf16
    elif setting is not None and run.precision != "auto" and bool(setting) != (run.precision == "bf16"):
        raise SpellmError(f"{source} sets bf16.enabled={setting} but --precision is {run.precision}; "
                          "drop one of them or make them agree")
    micro = _settle(config, "train_micro_batch_size_per_gpu", run.micro_batch, "--micro_batch", source)
    accum = _settle(config, "gradient_accumulation_steps", run.grad_accum, "--grad_accum", source)
    micro = DEFAULTS["micro_batch"] if micro is None else micro
    accum = DEFAULTS["grad_accum"] if accum is None else accum
    config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = micro, accum
    config["train_batch_size"] = _settle(config, "train_batch_size", micro * accum * world_size,
                                         "micro_batch x grad_accum x world_size", source)
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = optimizer.setdefault("params", {})
    lr = _settle(params, "lr", run.lr, "--lr", source)
    params["lr"] = DEFAULTS["lr"] if lr is None else lr
    scheduler = config.get("scheduler", {}).get("params", {})
    # a parameter group per peak (char heads, their output rows, pretrained blocks); one when only --lr applies
    if run.ffn_lr is None and run.trainable_layers > 0:
        run.ffn_lr = DEFAULTS["ffn_lr"]
    peaks = [lr for lr in (params["lr"], run.head_lr, run.ffn_lr) if lr is not None]
    peak = peaks if len(peaks) > 1 else peaks[0]
    for key, value in (("warmup_max_lr", peak), ("warmup_num_steps", run.warmup),
                       ("total_num_steps", run.max_steps)):
        if scheduler.get(key) == "auto":
            scheduler[key] = value
    _reject_auto(config, source)
    run.micro_batch, run.grad_accum, run.lr = micro, accum, params["lr"]
    return config


def resolve_teacher_config(run: RunConfig, student: dict[str, Any], world_size: int,
                           auto_persistence: int = FULL_SHARDING_PERSISTENCE) -> dict[str, Any]:
    """The frozen teacher's config: no optimizer, the student's precision and micro batch."""
    config = load_json_config(run.teacher_deepspeed, "--teacher_deepspeed")
    _fill_persistence(config, auto_persistence)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["train_micro_batch_size_per_gpu"] = student["train_micro_batch_size_per_gpu"]
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = student["train_micro_batch_size_per_gpu"] * world_size
    for precision in ("bf16", "fp16"):
        if config.get(precision, {}).get("enabled") == "auto" or precision in student:
            config[precision] = {"enabled": bool(student.get(precision, {}).get("enabled", False))}
    zero = config.setdefault("zero_optimization", {})
    if run.teacher_stage is not None:
        zero["stage"] = run.teacher_stage
    if run.teacher_offload:
        if zero.get("stage", 0) != 3:
            raise SpellmError("--teacher_offload needs a ZeRO-3 teacher; drop --teacher_stage 0")
        zero["offload_param"] = {"device": "cpu"}
    _reject_auto(config, f"DeepSpeed config {run.teacher_deepspeed}")
    return config


def mixed_precision_dtype(ds_config: dict[str, Any]):
    import torch

    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
