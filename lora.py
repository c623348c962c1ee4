"""The public face of LoRA: hands on the names of :mod:`samlora.models.lora`, where the code lives.

The package never imports a root module, so the code cannot live here; ``import lora``
keeps working for users and scripts.
"""
from samlora.models.lora import (  # noqa: F401
    DEFAULT_TARGETS,
    TARGETS,
    LoRALinear,
    Target,
    check_not_merged,
    count_parameters,
    inject_lora,
    injected_targets,
    is_lora_key,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    merged_state_dict,
    parse_targets,
    remove_lora,
    unmerge_lora,
)

__all__ = [
    'LoRALinear',
    'Target',
    'TARGETS',
    'DEFAULT_TARGETS',
    'parse_targets',
    'lora_layers',
    'inject_lora',
    'remove_lora',
    'injected_targets',
    'merge_lora',
    'unmerge_lora',
    'count_parameters',
    'mark_only_lora_as_trainable',
    'is_lora_key',
    'lora_state_dict',
    'check_not_merged',
    'load_lora_state_dict',
    'merged_state_dict',
]
