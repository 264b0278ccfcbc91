"""Convert a pretrained causal LM into a SpeLLM model by online self-distillation.

    deepspeed --num_gpus 2 launch/distill.py --deepspeed ds_configs/zero3.json [flags]
    torchrun --nproc_per_node 2 launch/distill.py ...      mpirun -np 2 python launch/distill.py ...

With no --model/--data it distils the embedded SmolLM2-135M-Instruct on the built-in five-source corpus.
The default recipe trains the char heads behind a residual MLP read-out on the teacher's own final
hidden state (the fallback path is then exactly the teacher); --trainable_layers 5 --readout_width 0
is the paper's (heads + the FFNs of the last 5 layers). docs/fidelity-pilots.md measures both.
Values left "auto" in the DeepSpeed config (batch sizes, lr, schedule) are filled from the flags.
"""

from __future__ import annotations

import argparse

from spellm_ds import cli
from spellm_ds.config import DEFAULTS as BUILT_IN, READOUT_PER_HIDDEN, RunConfig
from spellm_ds.losses import LABEL_RULES, REG_TARGETS
from spellm_ds.precision import PRECISIONS
from spellm_ds.train import run

DEFAULTS = RunConfig()


def parse_args() -> RunConfig:
    p = cli.ArgumentParser(__doc__)
    cli.add_model_and_data_args(p)
    p.add_argument("--train_blocks", type=int, default=None, metavar="N",
                   help="train on the first N packed training blocks only (a random subset of the documents), "
                        "read again pass after pass (default: every block)")
    p.add_argument("--teacher_cache", action="store_true",
                   help="store the teacher's output per block in --output_dir/teacher_cache the first time a block "
                        "is read and read it back on later passes and evaluations, so a pass after the first skips "
                        "the teacher; disk: about 2 x hidden size + 44 bytes per position in bf16 (1.2 KB for "
                        "SmolLM2-135M), 8 more per candidate beyond 5 with --soft_char_candidates")
    p.add_argument("--teacher_cache_from", default=None, metavar="RUN_DIR",
                   help="with --teacher_cache: first link in the entries of RUN_DIR/teacher_cache, a run of the same "
                        "model, precision, blocks and batch composition (pilots that differ only in how the student "
                        "trains), and read them from the first step instead of running the teacher")
    p.add_argument("--deepspeed", default=DEFAULTS.deepspeed, help="student DeepSpeed config (default: %(default)s)")
    p.add_argument("--teacher_deepspeed", default=DEFAULTS.teacher_deepspeed,
                   help="teacher DeepSpeed config, no optimizer (default: %(default)s)")
    p.add_argument("--teacher_stage", type=int, choices=(0, 3), default=None,
                   help="override the teacher's ZeRO stage: 0 = replicated (fast when it fits), 3 = sharded")
    p.add_argument("--teacher_offload", action="store_true", help="keep the ZeRO-3 teacher's parameters in CPU memory")
    p.add_argument("--output_dir", default=DEFAULTS.output_dir, help="checkpoints, tensorboard/, run_config.json, "
                   "model/ (default: %(default)s)")
    p.add_argument("--k", type=int, default=DEFAULTS.k, help="characters per token = number of heads (default: %(default)s)")
    p.add_argument("--charset", default=None, help="charset.json or a text file of extra characters")
    p.add_argument("--trainable_layers", type=int, default=DEFAULTS.trainable_layers,
                   help="train the FFN blocks of this many last decoder layers (the paper: 5); 0 trains only the "
                        "heads and read-out on the teacher's own final hidden state, so the fallback path is the "
                        "teacher (default: %(default)s)")
    p.add_argument("--train_attention", action="store_true",
                   help="beyond the paper: train the attention blocks of those layers too")
    p.add_argument("--readout_width", type=int, default=None,
                   help="beyond the paper: a residual MLP read-out of this width before the char heads, trained "
                        f"with them at --lr; 0 = the paper's linear heads (default: {READOUT_PER_HIDDEN} x the "
                        "model's hidden size)")
    p.add_argument("--wide_heads", action="store_true",
                   help="beyond the paper: the read-out's hidden layer also feeds the char logits directly (width x "
                        "k|C| weights), not only through its hidden-size output")
    p.add_argument("--head_init", choices=("embedding", "random"), default=DEFAULTS.head_init,
                   help="char head start: mean token embeddings per (position, char), or random (default: %(default)s)")
    p.add_argument("--seq_len", type=int, default=DEFAULTS.seq_len, help="tokens per packed block (default: %(default)s)")
    p.add_argument("--micro_batch", type=int, default=None,
                   help=f"blocks per rank per micro step (default: config or {BUILT_IN['micro_batch']})")
    p.add_argument("--grad_accum", type=int, default=None,
                   help=f"micro steps per optimizer step (default: config or {BUILT_IN['grad_accum']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of the char heads (default: config or {BUILT_IN['lr']:g})")
    p.add_argument("--ffn_lr", type=float, default=None,
                   help="peak learning rate of the pretrained blocks that train (FFNs, and attention with "
                        f"--train_attention) (default: {BUILT_IN['ffn_lr']:g})")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=DEFAULTS.max_steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--reg_weight", type=float, default=DEFAULTS.reg_weight,
                   help="weight of the token-level regularisation loss when FFNs train; unused with --trainable_layers "
                        "0, where the LM head reads the teacher's own state (default: %(default)s)")
    p.add_argument("--reg_target", choices=REG_TARGETS, default=DEFAULTS.reg_target,
                   help="what the token regulariser pulls the LM-head distribution of the student's hidden state "
                        "towards: the selected label (CE) or the teacher (KL over its top-5 plus the rest) "
                        "(default: %(default)s)")
    p.add_argument("--soft_char_weight", type=float, default=DEFAULTS.soft_char_weight,
                   help="weight of an auxiliary per-head CE with the characters of the teacher's top candidates, "
                        "weighted by its probabilities (default: %(default)s)")
    p.add_argument("--soft_char_candidates", type=int, default=DEFAULTS.soft_char_candidates,
                   help="how many of the teacher's top candidates those soft targets read, 5..1024 (the labels keep "
                        "its top-5; its top-256 hold 94%% of its probability on held-out BoolQ text, its top-5 67%%) "
                        "(default: %(default)s)")
    p.add_argument("--soft_char_prefix", action=argparse.BooleanOptionalAction, default=DEFAULTS.soft_char_prefix,
                   help="head i's soft targets only from the candidates that share the selected label's first i "
                        "characters (against blends of candidates; beyond the paper) (default: %(default)s)")
    p.add_argument("--spelling_kl_weight", type=float, default=DEFAULTS.spelling_kl_weight,
                   help="weight of the KL from the teacher's top-5 to the char heads' token distribution (normalised "
                        "over every valid spelling: what likelihood scoring reads); costs a [positions x valid "
                        "tokens] score per micro step (default: %(default)s)")
    p.add_argument("--spelling_kl_fraction", type=float, default=DEFAULTS.spelling_kl_fraction,
                   help="share of the positions the spelling KL is computed on, a fresh uniform sample each micro "
                        "step, scaled so the loss keeps its expectation; its cost scales with it "
                        "(default: %(default)s: every position)")
    p.add_argument("--state_noise", type=float, default=DEFAULTS.state_noise, metavar="SIGMA",
                   help="beyond the paper: train on the teacher's final state plus Gaussian noise of SIGMA x its RMS "
                        "per position, labelled by the teacher's LM head at that state (a new state for every read "
                        "of a block; costs the LM head per training position); read-out recipe only "
                        "(default: %(default)s: the states the text gives)")
    p.add_argument("--anchored_rows", type=int, default=DEFAULTS.anchored_rows, metavar="N",
                   help="beyond the paper: add N rows of new states to each micro-batch, real states moved towards "
                        "tokens drawn uniformly from those the training text holds, labelled by the teacher's LM "
                        "head there (contexts for rare tokens; costs the LM head per added state); read-out "
                        "recipe only (default: %(default)s: the states the text gives)")
    p.add_argument("--rare_label_power", type=float, default=DEFAULTS.rare_label_power, metavar="POWER",
                   help="beyond the paper: weight each position's char loss by (count + 1)^-POWER, count being how "
                        "often its label token occurs in the training text, so rarely seen spellings get more of the "
                        "gradient (the loss stays a weighted mean; it cost raw agreement in pilots) "
                        "(default: %(default)s: every label alike)")
    p.add_argument("--label_selection", choices=LABEL_RULES, default=DEFAULTS.label_selection,
                   help="label among the teacher's top-5: the one the student spells best (student_nll, the paper's "
                        "rule), best by char NLL - w x log p_teacher (joint), or the teacher's first spellable "
                        "candidate (teacher_top1) (default: %(default)s)")
    p.add_argument("--label_prior_weight", type=float, default=DEFAULTS.label_prior_weight,
                   help="w, the weight of the teacher's log-probability in the joint rule (default: %(default)s)")
    p.add_argument("--label_per_char", action=argparse.BooleanOptionalAction, default=DEFAULTS.label_per_char,
                   help="beyond the paper: score candidates by char NLL per counted character, not summed, so a "
                        "long candidate is not out-scored for its length alone (default: %(default)s)")
    p.add_argument("--label_gate", type=float, default=DEFAULTS.label_gate, metavar="P",
                   help="beyond the paper: where the teacher gives its top-1 probability >= P, that token is the "
                        "label whatever the rule scores (default: never)")
    p.add_argument("--ignore_after_end", action=argparse.BooleanOptionalAction, default=DEFAULTS.ignore_after_end,
                   help="leave the characters after a label's first <end> out of the char loss and the label score "
                        "(decoding always ignores them) (default: %(default)s)")
    p.add_argument("--eval_every", type=int, default=DEFAULTS.eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval_fraction", type=float, default=DEFAULTS.eval_fraction,
                   help="share of documents held out (default: %(default)s)")
    p.add_argument("--eval_blocks", type=int, default=DEFAULTS.eval_blocks,
                   help="held-out blocks evaluated (default: %(default)s)")
    p.add_argument("--save_every", type=int, default=DEFAULTS.save_every, help="steps between checkpoints (0: never)")
    p.add_argument("--keep_checkpoints", type=int, default=DEFAULTS.keep_checkpoints,
                   help="complete checkpoints to keep (default: %(default)s)")
    p.add_argument("--resume", default=DEFAULTS.resume, metavar="auto|none|PATH",
                   help="auto: continue from the latest complete checkpoint in --output_dir; none: start fresh; "
                        "PATH: a checkpoints/stepN directory (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew in an --output_dir that holds a run (checkpoints or a model): the old run is "
                        "renamed aside (OUTPUT_DIR.replaced-TIME), never mixed or deleted")
    p.add_argument("--extend_schedule", action="store_true",
                   help="allow resuming with a larger --max_steps than the checkpoint's run; the LR decay is then "
                        "laid over the new total from the resumed step on (any other changed run flag is refused)")
    p.add_argument("--stop_at", type=int, default=None, metavar="STEP",
                   help="save and exit 0 after this step; the schedule still runs to --max_steps (time-boxed jobs)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--no_activation_checkpointing", dest="activation_checkpointing", action="store_false",
                   help="keep activations instead of recomputing them (non-reentrant checkpointing is on by default)")
    p.add_argument("--no_shared_trunk", dest="shared_trunk", action="store_false",
                   help="run the student's frozen lower layers itself instead of starting from the teacher's "
                        "hidden state (slower; the result is the same)")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                   help="bf16 or fp32 compute; auto: bf16 where the hardware computes it fast (a GPU with bf16, a "
                        "CPU with avx512_bf16 or AMX, or an emulating CPU where a matmul probe finds it faster), fp32 "
                        "elsewhere; the DeepSpeed config's bf16 \"auto\" follows it (default: %(default)s)")
    p.add_argument("--collective_timeout_s", type=float, default=DEFAULTS.collective_timeout_s,
                   help="a collective waiting longer than this ends the job (default: %(default)s)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = vars(p.parse_args())
    args.pop("local_rank")
    return RunConfig(**args)


def main() -> None:
    run(parse_args())


if __name__ == "__main__":
    cli.run(main)
