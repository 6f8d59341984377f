"""RaDialog v1 (ChantalMP/RaDialog, release "weights"): BioViL-T with a 1408-channel projector -> ln_vision ->
BLIP-2 Q-Former (32 queries) -> img_proj -> Vicuna-7B v1.3 with a LoRA on q_proj/v_proj, the 32 query outputs
spliced where the prompt holds 32 ``<IMG>``; CheXpert findings from the classifier in the prompt
(shared/reference/radialog-v1-model.md).

Modules: ``prompts`` (torch-free: prompt text, limits), ``tokens`` (prompt ids as transformers 4.28 made them),
``projector`` (the projector the reference trained with, replayed), ``model`` (the modules put together, the
reshape quirk, the splice), ``files`` / ``loader`` (local files -> model, every tensor checked), ``backend`` (the
ModelBackend), ``serving`` (what the engine serves), ``tiny`` (a test set in the published formats).
This package's ``__init__`` and ``prompts`` import nothing heavy: the API reads the prompts.
"""
