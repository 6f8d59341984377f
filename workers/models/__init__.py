"""Model backends. Importable with torch + transformers + peft + numpy + pillow alone (no Celery, DICOM
or web imports at module level), so the GPU benchmark runs on a machine that has only those."""
