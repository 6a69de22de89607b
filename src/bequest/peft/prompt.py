"""Prompt tuning (Lester et al., EMNLP 2021): virtual token embeddings put before the input.

The vectors write the hidden space as token embeddings do, so they grow as the embedding table does.
"""

from __future__ import annotations

from bequest.peft.kind import WRITE, PromptLearning, as_dict, saved_heads


class Prompt(PromptLearning):
    name, peft_type, order = "prompt", "PROMPT_TUNING", 3

    def config(self, fam, task_type, s):
        from peft import PromptTuningConfig

        # Sampled vocabulary embeddings start where real tokens live (N(0, 1) would be far off-scale).
        return as_dict(PromptTuningConfig(task_type=task_type, num_virtual_tokens=s.virtual_tokens,
                                          prompt_tuning_init="SAMPLE_VOCAB", modules_to_save=saved_heads(fam, task_type)))

    def skeleton(self, config):
        return {**config, "prompt_tuning_init": "RANDOM"}  # sampling the vocabulary needs its weights

    def free_axes(self, key):
        return [None, (("hidden",), WRITE)] if key == "prompt_embeddings" else None


KIND = Prompt()
