"""SpeLLM as a transformers model: a base causal LM whose output head is k character heads.

``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` returns
:class:`SpeLLMForCausalLM` (or, where :mod:`spellm_ds` is imported, without remote code), and it
works where other causal LMs do: ``generate()`` (greedy, sampling, beams, streamers, stopping
criteria, left-padded batches, the KV cache), ``pipeline("text-generation")``, ``lm_eval --model
hf``, perplexity scripts, ``Trainer.evaluate``, ``device_map`` and ``dtype``.

- ``forward()`` returns SpeLLM's own next-token distribution as ``logits`` (fp32 log-probabilities:
  ``log_softmax`` leaves them unchanged): the char heads' distribution over the tokens they can
  spell where they decide, the original LM head's where the row falls back (mean head entropy at or
  above ``tau``, or an unknown character), re-ranked by ``rerank_k`` LM-head rows when set
  (:meth:`~.char_decoding.CharDecoder.mixture_log_probs`). Tokens the heads cannot spell get
  probability 0 where the heads decide. Cost per position: the base decoder, the heads, the scores
  of every valid spelling (about V x k / 2 gathers and a ``[V]`` row, cheaper than the LM head's
  V x d products on CPU), and the full LM head on the positions that fall back.
- ``generate()`` decodes as SpeLLM does: in greedy search the token emitted is the heads' argmax
  string where it spells a token (the paper's rule), else AutoCorrect's, else (fallback) the LM
  head's; that token is raised to the top of the row's logits, so logits processors still act on
  SpeLLM's distribution. With no processor and no scores returned, ``forward()`` names the token
  alone (a one-hot row), as the package's own loop does. Sampling and beam search read the
  distribution as it is. ``tau``, ``rerank_k``, ``shortlist`` and ``autocorrect`` may be passed to
  ``generate()``; the config holds the defaults.
- ``shortlist`` U (beyond the paper): where the heads decide, the LM head also scores the U tokens
  most frequent in the text the heads trained on (counts stored with the weights), beside the
  token the heads' argmax string spells, and the best is emitted (U of the LM head's V rows per
  position).

The spelling of every token (its first k char ids and its length) is stored with the weights, so
decoding needs no tokenizer. An export may store only what changed (``config.base_weights``): the
base model's weights are then read from where it names, checked against their sha256, and this
directory's tensors put over them (:meth:`SpeLLMForCausalLM.from_pretrained`). Torch and
transformers only: this file, ``configuration_spellm.py``, ``char_decoding.py`` and
``char_heads.py`` are copied into every exported model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .char_decoding import CharDecoder, Spellings, frequent_spellings, greedy_tokens
from .char_heads import CharHeads
from .configuration_spellm import SpeLLMConfig

_UNSET = object()


@dataclass
class _Decoding:
    """The settings of one ``generate()`` call, read by ``forward()`` while it runs."""

    tau: float | None
    rerank_k: int
    shortlist: int
    autocorrect: bool
    greedy: bool
    eos_token_id: int | None
    argmax_only: bool = False
    """Greedy search with no logits processor and no scores returned reads only each row's argmax
    (set by :meth:`SpeLLMForCausalLM._get_logits_processor`)."""


class SpeLLMPreTrainedModel(PreTrainedModel):
    config_class = SpeLLMConfig
    config: SpeLLMConfig
    base_model_prefix = "base"
    _keys_to_ignore_on_load_missing = [r"^token_counts$"]  # exports before 2026-12-08 record none (no shortlist)
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class SpeLLMForCausalLM(SpeLLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: SpeLLMConfig, base: PreTrainedModel | None = None) -> None:
        """``base``: an already loaded base causal LM of ``config.text_config`` (export wraps the
        base model it loaded); by default one is built from the config (``from_pretrained`` then
        loads its weights)."""
        super().__init__(config)
        text = config.get_text_config()
        self.base = AutoModelForCausalLM.from_config(text) if base is None else base
        self.char_heads = CharHeads(text.hidden_size, config.k, len(config.charset), config.readout_width,
                                    config.wide_heads, config.prototypes)
        vocab = self.base.get_output_embeddings().weight.shape[0]
        # each token's spelling: its first k char ids (END-padded) and its length (0: unspellable)
        self.register_buffer("spelling_chars", torch.zeros(vocab, config.k, dtype=torch.long))
        self.register_buffer("spelling_lengths", torch.zeros(vocab, dtype=torch.long))
        # how often each token occurs in the text the heads trained on (all 0: not recorded); the
        # shortlist is the most frequent
        self.register_buffer("token_counts", torch.zeros(vocab, dtype=torch.long))
        self._decoders: dict = {}
        self._decoding: _Decoding | None = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base_model_path: str | None = None,
                        **kwargs):
        """transformers' ``from_pretrained``; an export that stores only what changed is assembled
        from its base model's weights (from ``config.base_weights``, or ``base_model_path`` where the
        base model has moved) and its own tensors. That costs a second copy of the model in memory
        while it loads."""
        config = kwargs.pop("config", None)
        if not isinstance(config, SpeLLMConfig):
            config = SpeLLMConfig.from_pretrained(pretrained_model_name_or_path, **_hub_settings(kwargs))
        if config.base_weights is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        directory = _local_directory(pretrained_model_name_or_path, kwargs)
        state = _assembled_state(directory, config.base_weights, base_model_path)
        for name in _HUB_KEYS:
            kwargs.pop(name, None)
        loaded = super().from_pretrained(None, *model_args, config=config, state_dict=state, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        return loaded

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The token counts an older export lacks are none (0); nothing else to do: the char heads
        initialise themselves when built, the base model its own modules, and ``from_pretrained``
        loads both."""
        if module is self:
            self.token_counts.zero_()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        """The original LM head: what SpeLLM falls back to."""
        return self.base.get_output_embeddings()

    def get_decoder(self) -> torch.nn.Module:
        return self.base.get_decoder()

    # ----------------------------------------------------------------- decoding
    def spellings(self) -> Spellings:
        """The spelling table from the stored buffers, on the model's device."""
        return self.char_decoder(None, 0).table

    def char_decoder(self, tau: float | None | object = _UNSET, shortlist: int | None = None) -> CharDecoder:
        """The decoder at ``tau`` with a ``shortlist`` of that many tokens (defaults: the config's),
        with the model's spelling temperature; built once per device, setting and content of the
        spelling buffers."""
        tau = self.config.tau if tau is _UNSET else tau
        shortlist = self.config.shortlist if shortlist is None else shortlist
        chars, counts = self.spelling_chars, self.token_counts
        key = (chars.device, chars.data_ptr(), chars._version, self.spelling_lengths._version, tau,
               self.config.spelling_temperature, shortlist, counts._version if shortlist else None)
        if key not in self._decoders:
            table = Spellings.from_chars(len(self.config.charset), chars, self.spelling_lengths).to(chars.device)
            frequent = None
            if shortlist:
                if not bool(counts.any()):
                    raise ValueError("this SpeLLM model records no token counts, which a shortlist ranks tokens "
                                     "by; re-export it from its checkpoint with this version of spellm-ds, or "
                                     "decode without a shortlist")
                frequent = frequent_spellings(table, counts, shortlist)
            self._decoders[key] = CharDecoder(table, tau, self.config.spelling_temperature, frequent)
        return self._decoders[key]

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """SpeLLM's next-token log-probabilities ``[..., V]`` (fp32) from final hidden states ``[..., d]``
        (see the module docstring; inside ``generate()``, with its settings). In a greedy ``generate()``
        that reads only the argmax (``_Decoding.argmax_only``), a one-hot row of the token instead: the
        token is the same, and the full distribution (every valid spelling scored on every row) doubled
        the output head's time per step at batch 8 and 32 (bf16, CPU)."""
        decoding = self._decoding
        if decoding is None:
            tau, rerank_k, shortlist = self.config.tau, self.config.rerank_k, self.config.shortlist
        else:
            tau, rerank_k, shortlist = decoding.tau, decoding.rerank_k, decoding.shortlist
        rows = hidden.reshape(-1, hidden.shape[-1])
        decoder = self.char_decoder(tau, shortlist)
        lm_head = self.get_output_embeddings()
        char_logits = self.char_heads(rows)
        if decoding is not None and decoding.argmax_only:  # greedy, and nothing reads the distribution
            log_probs, proposal, fallback_logits = None, decoder.propose(char_logits, autocorrect=False), None
        else:
            log_probs, proposal, fallback_logits = decoder.mixture_log_probs(char_logits, rows, lm_head, rerank_k)
        if decoding is not None and decoding.greedy:
            host = torch.cat([proposal.fallback, proposal.hit]).cpu()
            ids, _ = greedy_tokens(decoder, char_logits, rows, lm_head, proposal, host[: len(rows)], host[len(rows):],
                                   rerank_k, decoding.autocorrect, decoding.eos_token_id, fallback_logits)
            if log_probs is None:
                log_probs = torch.zeros(len(rows), lm_head.weight.shape[0], device=rows.device).scatter_(
                    1, ids.unsqueeze(1), 1.0)
            else:
                top = log_probs.max(-1, keepdim=True).values
                log_probs = log_probs.scatter(1, ids.unsqueeze(1), top + 1.0)
        return log_probs.view(*hidden.shape[:-1], -1)

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                     use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.next_token_logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *, tau=_UNSET,
                 rerank_k: int | None = None, shortlist: int | None = None, autocorrect: bool = True, **kwargs):
        """transformers' ``generate()`` with SpeLLM's output head (module docstring). ``tau`` (None:
        never fall back), ``rerank_k`` (greedy only), ``shortlist`` and ``autocorrect`` (False:
        greedy only, without re-ranking or a shortlist, a string that spells no token ends its row
        with EOS) override the config for this call."""
        settings = generation_config if generation_config is not None else self.generation_config
        do_sample = kwargs.get("do_sample", settings.do_sample)
        beams = kwargs.get("num_beams", settings.num_beams) or 1
        rerank_k = self.config.rerank_k if rerank_k is None else rerank_k
        shortlist = self.config.shortlist if shortlist is None else shortlist
        if (rerank_k or not autocorrect) and (do_sample or beams > 1):
            raise ValueError("rerank_k and autocorrect=False are greedy decoding; drop do_sample/num_beams, "
                             "or set rerank_k=0 and autocorrect=True")
        if (rerank_k or shortlist) and not autocorrect:
            raise ValueError("re-ranking and the shortlist choose a token on every row the heads decide, so "
                             "autocorrect=False does not apply; drop it, or set rerank_k=0 and shortlist=0")
        eos = kwargs.get("eos_token_id", settings.eos_token_id)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if not autocorrect and eos is None:
            raise ValueError("autocorrect=False ends a row at a string that spells no token, which needs an eos_token_id")
        self._decoding = _Decoding(self.config.tau if tau is _UNSET else tau, rerank_k, shortlist, autocorrect,
                                   greedy=not do_sample and beams == 1, eos_token_id=eos)
        try:
            return super().generate(inputs, generation_config, **kwargs)
        finally:
            self._decoding = None

    def _get_logits_processor(self, generation_config: GenerationConfig, *args, **kwargs):
        """transformers' processors for this ``generate()`` call; where greedy search has none and
        returns no scores, ``forward()`` need only name each row's token (:meth:`next_token_logits`)."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if self._decoding is not None:
            wanted = processors or generation_config.output_scores or generation_config.output_logits
            self._decoding.argmax_only = self._decoding.greedy and not wanted
        return processors


# ----------------------------------------------------------------- exports that store only what changed
_HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies",
             "trust_remote_code")


def _hub_settings(kwargs: dict) -> dict:
    return {name: kwargs[name] for name in _HUB_KEYS if name in kwargs}


def _local_directory(name_or_path, kwargs: dict) -> Path:
    """The export's directory: a local path as it is, a Hub repository through the Hugging Face cache."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                                  token=kwargs.get("token")))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _base_directory(reference: dict, override: str | None) -> Path:
    """The base model's directory: ``override``, the recorded path, or its Hub snapshot (the cache)."""
    if override is not None:
        return Path(override)
    if Path(reference["path"]).is_dir():
        return Path(reference["path"])
    if reference.get("hub_id"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(reference["hub_id"], revision=reference.get("revision")))
    raise ValueError(f"the base model this SpeLLM export builds on is not at {reference['path']}; pass "
                     "base_model_path=DIR (the same weights) to from_pretrained")


def _assembled_state(directory: Path, reference: dict, override: str | None) -> dict[str, torch.Tensor]:
    """The base model's state dict (under ``base.``), checked file by file against the recorded
    sha256, with the export's own tensors put over it."""
    from safetensors.torch import load_file

    base_dir = _base_directory(reference, override)
    for name, expected in reference["sha256"].items():
        if not (base_dir / name).is_file() or file_sha256(base_dir / name) != expected:
            raise ValueError(f"the base model at {base_dir} is not the one this SpeLLM export was made from "
                             f"({name} {'differs' if (base_dir / name).is_file() else 'is missing'}); pass "
                             "base_model_path=DIR holding the original weights")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    state = {f"{SpeLLMPreTrainedModel.base_model_prefix}.{name}": tensor for name, tensor in base.state_dict().items()}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state
