"""`fulmine bench`: latency of any OpenAI-compatible endpoint, and fulmine vs llama.cpp side by side."""
