"""XrayGPT (mbzuai-oryx/XrayGPT): EVA-CLIP ViT-g -> ln_vision -> BLIP-2 Q-Former (32 queries) -> llama_proj
-> radiology-tuned Vicuna-7B (LLaMA-1), as the released code runs it (shared/reference/xraygpt-model.md).

Modules: ``prompts`` (torch-free: conversation text, post-processing), ``eva_vit`` (vision tower and its
published key layout), ``model`` (the modules put together, image splicing), ``preprocess`` (224 px bicubic,
CLIP mean/std), ``files`` / ``loader`` (local files -> model, every tensor checked), ``backend`` (the
ModelBackend and what the engine serves), ``tiny`` (a test checkpoint set in the published formats).
This package's ``__init__`` and ``prompts`` import nothing heavy: the API reads the prompts.
"""
