"""The CTR bridge: behaviour log -> CTR samples -> text / knowledge / LLM features -> a CTR model -> AUC.

`recforge eval ctr` (DIN / DCN-v2 with KAR's adaptor, BAHE's cached lower-layer behaviour encoding with
trainable upper LLM layers, LARR's scene aggregation) and `recforge export-features` (versioned tables).
"""
