"""Parts several backends share: the BLIP-2 Q-Former with its LAVIS checkpoint layout (XrayGPT, RaDialog v1)
and a Vicuna/Llama directory loaded with every tensor checked. Importable with torch + transformers alone."""
