"""SpeLLM as a transformers model (:class:`SpeLLMForCausalLM`, model type ``spellm``).

The files of this folder are self-contained (torch and transformers, relative imports only): an
export copies them next to its weights, so ``trust_remote_code=True`` loads the model where this
package is not installed. Importing the package registers the classes with the Auto classes, so
where it is installed no remote code runs.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from spellm_ds.hf.configuration_spellm import SpeLLMConfig
from spellm_ds.hf.modeling_spellm import SpeLLMForCausalLM

AutoConfig.register(SpeLLMConfig.model_type, SpeLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(SpeLLMConfig, SpeLLMForCausalLM, exist_ok=True)
# save_pretrained then writes ``auto_map`` and copies these files beside the weights
SpeLLMConfig.register_for_auto_class()
SpeLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["SpeLLMConfig", "SpeLLMForCausalLM"]
