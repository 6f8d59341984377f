"""RaDialog v2 (RaDialog-LLaVA): BioViL-T + CheXpert classifier + LLaVA-1.5-7B with merged LoRA.

Modules: ``biovil`` (image encoder), ``classifier`` (findings), ``llava`` (vision-language model and
generation), ``loader`` (files -> model, with checks), ``backend`` (the ModelBackend), ``tiny`` (test
checkpoint), ``transforms`` (per-branch image transforms), ``checkpoint_io``/``state_dicts`` (safe reading).
"""
